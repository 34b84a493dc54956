"""vLLM's runtime adapter routes on a real server, called with plain HTTP the way the Gateway API
Inference Extension's lora-syncer calls them: load from a directory under the source roots,
load in place, unload; vLLM's statuses and sentences; the admin token."""

from __future__ import annotations

import shutil

import pytest
import requests

from clients import LoraplexClient, LoraplexError
from server.tools.demo import build_demo
from tests.server_process import start_server

ADMIN_TOKEN = "vllm-admin-token"
TOKEN = "vllm-inference-token"


@pytest.fixture(scope="module")
def server(demo_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-routes")
    (tmp / "admin").write_text(ADMIN_TOKEN)
    (tmp / "token").write_text(TOKEN)
    roots = tmp / "adapters"
    demo = build_demo(demo_cache, progress=None)
    for name in ("attn-r4", "all-r16"):
        shutil.copytree(demo.adapters[name], roots / name)
    process = start_server("--http-port", "auto", "--threads", "1",
                           "--store", str(tmp / "store"), "--admin-token-file", str(tmp / "admin"),
                           "--inference-token-file", str(tmp / "token"),
                           "--adapter-source-roots", str(roots),
                           "--served-model-name", "acme/smol-base",
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    process.roots = roots
    yield process
    assert process.stop() == 0, process.output()


def post(server, route: str, body: dict, token: str | None = ADMIN_TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{server.http_url}/v1/{route}", json=body, headers=headers, timeout=120)


def models(server) -> list[str]:
    reply = requests.get(f"{server.http_url}/v1/models", timeout=60,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    return [m["id"] for m in reply.json()["data"]]


def complete(server, model: str) -> requests.Response:
    return requests.post(f"{server.http_url}/v1/completions", timeout=120,
                         headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"model": model, "prompt": "Once", "max_tokens": 4,
                               "temperature": 0})


def test_load_serve_reload_in_place_and_unload(server):
    path = str(server.roots / "attn-r4")
    assert "syncer-a" not in models(server)
    loaded = post(server, "load_lora_adapter", {"lora_name": "syncer-a", "lora_path": path})
    assert loaded.status_code == 200, loaded.text
    assert loaded.text == "Success: LoRA adapter 'syncer-a' added successfully."
    assert "syncer-a" in models(server)
    first = complete(server, "syncer-a")
    assert first.status_code == 200
    with LoraplexClient(server.target, token=TOKEN) as client:
        assert client.generate("Once", adapter="syncer-a", max_new_tokens=4,
                               temperature=0).text == first.json()["choices"][0]["text"]

    again = post(server, "load_lora_adapter", {"lora_name": "syncer-a", "lora_path": path})
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"][
        "message"]
    replaced = post(server, "load_lora_adapter", {"lora_name": "syncer-a", "load_inplace": True,
                                                  "lora_path": str(server.roots / "all-r16")})
    assert replaced.status_code == 200
    assert complete(server, "syncer-a").json()["choices"][0]["text"] == complete(
        server, "all-r16").json()["choices"][0]["text"]  # the demo's all-r16: same weights

    unloaded = post(server, "unload_lora_adapter", {"lora_name": "syncer-a"})
    assert unloaded.status_code == 200
    assert unloaded.text == "Success: LoRA adapter 'syncer-a' removed successfully."
    assert complete(server, "syncer-a").status_code == 404
    assert "syncer-a" not in models(server)
    with LoraplexClient(server.target, token=TOKEN) as client, pytest.raises(LoraplexError) as e:
        client.generate("Once", adapter="syncer-a", max_new_tokens=4)
    assert e.value.code.name == "NOT_FOUND"
    gone = post(server, "unload_lora_adapter", {"lora_name": "syncer-a"})
    assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]


@pytest.mark.parametrize("body, status, says", [
    ({"lora_name": "x"}, 400, "Both 'lora_name' and 'lora_path'"),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "allowed"),  # outside the source roots
    ({"lora_name": "../x", "lora_path": "/tmp"}, 400, "name"),
    ({"lora_name": "x", "lora_path": "ftp://host/x"}, 400, "unsupported scheme"),
])
def test_bad_loads_are_refused_with_the_registry_s_reasons(server, body, status, says):
    before = models(server)
    response = post(server, "load_lora_adapter", body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert models(server) == before


def test_a_malformed_adapter_is_refused_and_nothing_is_stored(server):
    broken = server.roots / "broken"
    shutil.copytree(server.roots / "attn-r4", broken)
    (broken / "adapter_config.json").write_text('{"r": "eight"}')
    before = models(server)
    response = post(server, "load_lora_adapter", {"lora_name": "broken", "lora_path": str(broken)})
    assert response.status_code == 400 and "adapter_config.json" in response.text
    assert models(server) == before


def test_the_routes_need_the_admin_token(server):
    body = {"lora_name": "y", "lora_path": str(server.roots / "attn-r4")}
    assert post(server, "load_lora_adapter", body, token=None).status_code == 401
    assert post(server, "load_lora_adapter", body, token=TOKEN).status_code == 403
    assert post(server, "unload_lora_adapter", {"lora_name": "y"}, token=TOKEN).status_code == 403


def test_served_model_name_is_the_base_model_s_public_id(server):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    models = requests.get(f"{server.http_url}/v1/models", headers=headers, timeout=60).json()
    assert models["data"][0]["id"] == "acme/smol-base"
    assert all(m["parent"] == "acme/smol-base" for m in models["data"][1:])
    assert complete(server, "acme/smol-base").status_code == 200


def test_hub_style_names_work_everywhere(server):
    """An org/name id: loaded over HTTP, served by name on HTTP and gRPC, listed, pinned and
    labelled in metrics; traversal stays refused."""
    name = "acme/support-bot"
    loaded = post(server, "load_lora_adapter",
                  {"lora_name": name, "lora_path": str(server.roots / "attn-r4")})
    assert loaded.status_code == 200, loaded.text
    over_http = complete(server, name)
    assert over_http.status_code == 200 and over_http.json()["model"] == name
    with LoraplexClient(server.target, token=TOKEN, admin_token=ADMIN_TOKEN) as client:
        over_grpc = client.generate("Once", adapter=name, max_new_tokens=4, temperature=0)
        assert over_grpc.text == over_http.json()["choices"][0]["text"]
        assert name in client.list_models().adapters
        assert client.get_adapter(name).name == name
    pinned = requests.post(f"{server.http_url}/api/admin/adapters/{name}/pin", timeout=60,
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    metrics = requests.get(f"{server.http_url}/metrics", timeout=60).text
    assert f'loraplex_adapter_requests_total{{adapter="{name}"}}' in metrics
    for bad in ("acme/../x", "a/b/c", "/x"):
        refused = post(server, "load_lora_adapter",
                       {"lora_name": bad, "lora_path": str(server.roots / "attn-r4")})
        assert refused.status_code == 400 and "invalid adapter name" in refused.text
