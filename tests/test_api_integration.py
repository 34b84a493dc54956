"""The real server (demo model, a child process) through the Python client, RPC by RPC."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from clients import LoraplexClient, LoraplexError
from server.tools.demo import ALL_LINEAR_MODULES, build_demo, write_lora_adapter
from tests.server_process import start_server

ADMIN_TOKEN = "admin-token-for-tests"
TOKEN = "inference-token-for-tests"
BIG_RANK = 672  # all 7 modules of the 4-layer demo model in fp32: ~52 MB of safetensors


@pytest.fixture(scope="module")
def server(demo_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "admin-token").write_text(ADMIN_TOKEN)
    (tmp / "token").write_text(TOKEN)
    (tmp / "roots").mkdir()
    process = start_server(
        "--quantize", "none", "--threads", "1", "--max-rank", "704", "--max-slots", "4",
        "--lora-dtype", "bfloat16", "--admin-token-file", str(tmp / "admin-token"),
        "--inference-token-file", str(tmp / "token"), "--store", str(tmp / "store"),
        "--adapter-source-roots", str(tmp / "roots"),
        env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    process.roots = tmp / "roots"
    yield process
    assert process.stop() == 0, process.output()


@pytest.fixture
def client(server):
    with LoraplexClient(server.target, token=TOKEN, admin_token=ADMIN_TOKEN, timeout=120) as c:
        yield c


def wait_until_idle(client: LoraplexClient) -> None:
    """Until the server runs and queues nothing: what a freed sequence looks like from outside."""
    def idle():
        info = client.server_info()
        return info.running_requests == info.waiting_requests == 0

    _wait_for(idle)


# ---- Inference ------------------------------------------------------------------------------

def test_health_tokenize_generate_and_stream(client):
    assert client.health() == "SERVING"
    ids = client.tokenize("Hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    whole = client.generate(prompt_token_ids=ids, adapter="all-r16", max_new_tokens=12)
    assert whole.finish_reason == "length" and len(whole.token_ids) == 12
    deltas = list(client.stream(prompt_token_ids=ids, adapter="all-r16", max_new_tokens=12))
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 12
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_generate_equals_the_engine_for_adapters_interleaved_concurrently(client, demo_cache):
    """Greedy tokens through the API, 12 requests over 4 adapters and the base at once, equal
    those of an EngineCore driven directly on the same model and adapters."""
    from server.config import EngineConfig
    from server.engine.core import load_engine_core
    from tests.engine_helpers import greedy_request, run_to_completion

    assets = build_demo(demo_cache, progress=None)
    adapters = ["attn-r4", "all-r16", "", "all-r64-rslora", "mlp-r8-bf16", "attn-r8"] * 2
    prompts = [[1] + [(7 * i + j) % 200 + 5 for j in range(3 + i)] for i in range(len(adapters))]
    config = EngineConfig(model=assets.model_dir, quantize="none", device="cpu", threads=1,
                          max_rank=704, max_slots=4, lora_dtype="bfloat16", kv_cache_mb=64)
    core = load_engine_core(config, {name: str(path) for name, path in assets.adapters.items()})
    want = run_to_completion(core, {0: [(str(i), greedy_request(p, a or None, 10))
                                        for i, (p, a) in enumerate(zip(prompts, adapters))]})
    with ThreadPoolExecutor(len(adapters)) as pool:
        got = list(pool.map(lambda pa: client.generate(
            prompt_token_ids=pa[0], adapter=pa[1] or None, max_new_tokens=10),
            zip(prompts, adapters)))
    assert [g.token_ids for g in got] == [want[str(i)][0] for i in range(len(adapters))]


def test_errors_have_their_status(client):
    for call, code in [
        (lambda: client.generate("x", adapter="no-such-adapter"), grpc.StatusCode.NOT_FOUND),
        (lambda: client.generate("x", top_p=5.0), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.generate("x", max_new_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.generate("x", stop=["s"] * 100), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.get_adapter("no-such-adapter"), grpc.StatusCode.NOT_FOUND),
        (lambda: client.register_adapter("x", "/etc"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(LoraplexError) as error:
            call()
        assert error.value.code == code, error.value


@pytest.mark.parametrize("token, admin_token, code", [
    (None, ADMIN_TOKEN, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong", ADMIN_TOKEN, grpc.StatusCode.UNAUTHENTICATED),
])
def test_inference_without_its_token_is_refused(server, token, admin_token, code):
    with LoraplexClient(server.target, token=token, admin_token=admin_token) as c:
        with pytest.raises(LoraplexError) as error:
            c.generate("x", max_new_tokens=1)
        assert error.value.code == code


@pytest.mark.parametrize("admin_token, code", [
    (None, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong", grpc.StatusCode.UNAUTHENTICATED),
    (TOKEN, grpc.StatusCode.PERMISSION_DENIED),
])
def test_admin_without_its_token_is_refused(server, admin_token, code):
    with LoraplexClient(server.target, token=TOKEN, admin_token=admin_token) as c:
        with pytest.raises(LoraplexError) as error:
            c.list_adapters()
        assert error.value.code == code


# ---- Admin ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory, demo_cache):
    directory = tmp_path_factory.mktemp("big") / "big"
    write_lora_adapter(directory, base_model_dir=build_demo(demo_cache, progress=None).model_dir,
                       r=BIG_RANK, lora_alpha=16, target_modules=ALL_LINEAR_MODULES, seed=5)
    return directory


def test_a_50_mb_upload_in_chunks_is_stored_checked_and_served(client, big_adapter):
    size = (big_adapter / "adapter_model.safetensors").stat().st_size
    assert size > 50 * 10**6
    seen = []
    info = client.upload_adapter("big", big_adapter, progress=lambda s, t: seen.append((s, t)))
    assert seen[-1] == (size, size) and len(seen) > 50  # 1 MiB chunks
    assert (info.name, info.rank, info.size_bytes) == ("big", BIG_RANK, size)
    reply = client.generate("Hello", adapter="big", max_new_tokens=3)
    assert len(reply.token_ids) == 3
    client.delete_adapter("big")


def test_an_upload_corrupted_in_transit_is_rejected(client, big_adapter, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(big_adapter, copy)
    weights = copy / "adapter_model.safetensors"

    def corrupt_after_the_header(sent, total):
        if sent == 0:  # the header (with the file's sha256) is on its way; now change a byte
            with weights.open("r+b") as f:
                f.seek(total // 2)
                byte = f.read(1)
                f.seek(total // 2)
                f.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(LoraplexError) as error:
        client.upload_adapter("corrupt", copy, progress=corrupt_after_the_header)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "checksum mismatch" in error.value.details
    with pytest.raises(LoraplexError):
        client.get_adapter("corrupt")


def test_register_list_get_pin_unpin_delete_info(client, server, demo_cache):
    source = build_demo(demo_cache, progress=None).adapters["attn-r8"]
    shutil.copytree(source, server.roots / "mine")
    registered = client.register_adapter("mine", str(server.roots / "mine"))
    assert (registered.name, registered.version, registered.rank) == ("mine", 1, 8)
    assert client.get_adapter("mine") == registered
    names = [a.name for a in client.list_adapters(page_size=2)]
    assert "mine" in names and names == sorted(names)
    assert client.pin_adapter("mine").pinned
    assert client.get_adapter("mine").in_host_memory
    assert not client.unpin_adapter("mine").pinned
    info = client.server_info()
    assert info.adapters_stored == len(names) and info.quantization == "none"
    assert info.memory.base_model_bytes > 0 and info.memory.store_bytes > 0
    client.delete_adapter("mine")
    assert "mine" not in [a.name for a in client.list_adapters()]


# ---- overload -------------------------------------------------------------------------------

def test_a_full_queue_answers_resource_exhausted(demo_cache, tmp_path):
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN)
    process = start_server("--threads", "1", "--max-batch-size", "1", "--max-step-tokens", "1",
                           "--max-queue", "1", "--store", str(tmp_path / "store"),
                           "--admin-token-file", str(tmp_path / "admin-token"),
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    try:
        with LoraplexClient(process.target, admin_token=ADMIN_TOKEN, timeout=120) as c:
            running = c.stream("Once upon a time", max_new_tokens=2000)
            next(running)  # holds the running batch's only place
            queued = ThreadPoolExecutor(1).submit(
                lambda: c.generate("Hello", max_new_tokens=2))
            _wait_for(lambda: c.server_info().waiting_requests == 1)
            with pytest.raises(LoraplexError) as error:
                c.generate("one too many", max_new_tokens=1)
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queue 1" in error.value.details
            running.close()  # frees the place: the queued request runs
            assert queued.result(60).completion_tokens == 2
    finally:
        assert process.stop() == 0, process.output()


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)
