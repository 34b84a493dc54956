"""Resolve on first request: an adapter nobody registered, found in an --adapter-resolver source
(a directory, or S3 on the real moto server) when a request names it; one lookup per name; a
name found nowhere remembered for the negative TTL; a bad adapter in a source refused with its
reason."""

from __future__ import annotations

import shutil
import threading

import pytest
import requests

from adapters_registry.resolver import AdapterResolveError, AdapterResolver
from adapters_registry.store import UnknownAdapterError
from server.config import RegistryConfig
from server.engine.core import make_registry
from server.tools.demo import build_demo
from tests.engine_helpers import make_core
from tests.server_process import start_server
from tests.test_adapter_sources import s3_client


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    return make_core(tiny_model_dir, {}).model.spec


@pytest.fixture
def registry(spec, source):
    config = RegistryConfig(adapter_source_roots=str(source), adapter_resolver=str(source))
    config.validate()
    registry = make_registry(spec, 64, config=config)
    yield registry
    registry.close()


def place(tiny_adapter_dirs, source, name, adapter="attn-r4"):
    shutil.copytree(tiny_adapter_dirs[adapter], source / name)


def test_an_adapter_placed_in_the_source_is_found_when_first_asked(registry, source,
                                                                   tiny_adapter_dirs):
    for name in ("late", "acme/support-bot"):  # an org/name id is <uri>/org/name/
        with pytest.raises(UnknownAdapterError):
            registry.acquire(name)
        place(tiny_adapter_dirs, source, name)
        registry.resolver.resolve(name).result()
        lease = registry.acquire(name).result()
        assert lease.key.name == name
        registry.release(lease)
    assert registry.resolver.counts["resolved"] == 2


def test_a_name_found_nowhere_is_remembered_for_the_ttl(spec, source, tiny_adapter_dirs):
    registry = make_registry(spec, 64, config=RegistryConfig(adapter_source_roots=str(source)))
    clock = Clock()
    resolver = AdapterResolver(registry, [str(source)], negative_ttl=10, clock=clock)
    with pytest.raises(UnknownAdapterError, match="no --adapter-resolver source holds it"):
        resolver.resolve("ghost").result()
    place(tiny_adapter_dirs, source, "ghost")
    clock.now = 9.9
    with pytest.raises(UnknownAdapterError):
        resolver.resolve("ghost")  # at once, from the negative cache
    assert (resolver.counts["absent"], resolver.counts["absent_cached"]) == (1, 1)
    clock.now = 10.1
    resolver.resolve("ghost").result()  # asked again after the TTL: there now
    assert resolver.counts["resolved"] == 1
    resolver.close()
    registry.close()


def test_one_lookup_per_name_however_many_ask(registry, source, tiny_adapter_dirs, monkeypatch):
    place(tiny_adapter_dirs, source, "popular")
    release, calls = threading.Event(), []
    original = registry.register_source

    def slow_register(name, uri):
        calls.append(name)
        release.wait(30)
        return original(name, uri)

    monkeypatch.setattr(registry, "register_source", slow_register)
    futures = [registry.resolver.resolve("popular") for _ in range(5)]
    assert all(f is futures[0] for f in futures)
    release.set()
    futures[0].result()
    assert calls == ["popular"]


def test_a_bad_adapter_in_the_source_is_refused_with_its_reason(registry, source,
                                                                tiny_adapter_dirs):
    place(tiny_adapter_dirs, source, "broken")
    (source / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterResolveError, match="found at .*broken cannot be served: .+"):
        registry.resolver.resolve("broken").result()
    assert "broken" not in registry.store and registry.resolver.counts["failed"] == 1


def test_a_resolver_directory_must_lie_under_the_source_roots(tmp_path):
    from server.errors import ConfigError

    with pytest.raises(ConfigError, match="under --adapter-source-roots"):
        RegistryConfig(adapter_resolver=str(tmp_path)).validate()


# ---- a real server that knows only its resolver sources -----------------------------------------

def test_a_replica_serves_an_adapter_uploaded_to_the_bucket_after_it_started(
        s3_endpoint, demo_cache, tmp_path):
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="team-adapters")
    local = tmp_path / "local"
    local.mkdir()
    env = {"LORAPLEX_CACHE_DIR": str(demo_cache), "AWS_ENDPOINT_URL": s3_endpoint,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    server = start_server("--http-port", "auto", "--threads", "1", "--store",
                          str(tmp_path / "store"), "--adapter-source-roots", str(local),
                          "--adapter-resolver", f"s3://team-adapters/prod,{local}", env=env)
    demo = build_demo(demo_cache, progress=None)

    def complete(model):
        return requests.post(f"{server.http_url}/v1/completions", timeout=120, json={
            "model": model, "prompt": "Once", "max_tokens": 3, "temperature": 0})

    try:
        assert complete("acme/late").status_code == 404  # nowhere yet
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            client.put_object(Bucket="team-adapters", Key=f"prod/acme/fresh/{file}",
                              Body=(demo.adapters["attn-r8"] / file).read_bytes())
        served = complete("acme/fresh")
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["text"] == complete("attn-r8").json()[
            "choices"][0]["text"]  # the same weights as the demo's attn-r8
        shutil.copytree(demo.adapters["all-r16"], local / "from-disk")
        assert complete("from-disk").status_code == 200
        shutil.copytree(demo.adapters["all-r16"], local / "bad")
        (local / "bad" / "adapter_config.json").write_text("{}")
        bad = complete("bad")
        assert bad.status_code == 422 and "cannot be served" in bad.json()["error"]["message"]
        metrics = requests.get(f"{server.http_url}/metrics", timeout=60).text
        for outcome, count in (("resolved", 2), ("absent", 1), ("failed", 1)):
            assert f'loraplex_adapter_resolutions_total{{outcome="{outcome}"}} {count}.0' in metrics
    finally:
        assert server.stop() == 0, server.output()


def test_a_lookup_that_ends_at_once_does_not_deadlock(registry, source, tiny_adapter_dirs):
    """A name registered meanwhile ends its lookup before `resolve` has added its callback."""
    place(tiny_adapter_dirs, source, "quick")
    registry.resolver.resolve("quick").result(timeout=60)
    for _ in range(20):  # already stored: each lookup returns at once
        registry.resolver.resolve("quick").result(timeout=60)
