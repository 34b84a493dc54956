"""Replacing or deleting an adapter while requests on it generate, over gRPC and HTTP.

A request in flight finishes on the version it started with, token for token; a request that
starts after the change gets the new version (replace) or NOT_FOUND / 404 (delete). Each request
runs long enough (hundreds of tokens, EOS ignored) that the change lands while it generates, and
the test checks that it did.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from tests.engine_helpers import make_core
from tests.inprocess_server import serving
from tests.test_churn import variant_files

PROMPT = [1, 7, 8, 9]
TOKENS = 1000


@pytest.fixture(scope="module")
def versions(tiny_adapter_dirs):
    """Two contents of one adapter (lora_B x1 and x-1): same shapes, different outputs."""
    v1, v2 = variant_files(tiny_adapter_dirs["all-r8"], scales=[1.0, -1.0])
    return {1: (v1[0].encode(), v1[1]), 2: (v2[0].encode(), v2[1])}


@pytest.fixture(scope="module")
def server(tiny_model_dir, versions):
    """(stub, http url, engine, registry, want): want[v] = greedy tokens of version v."""
    core = make_core(tiny_model_dir, {}, max_slots=4)
    with serving(core, http=True) as (channel, running):
        stub = inference_pb2_grpc.InferenceStub(channel)
        registry = core.registry
        want = {}
        for version, files in versions.items():
            registry.register(f"ref-v{version}", *files)
            want[version] = list(stub.Generate(grpc_request(f"ref-v{version}")).token_ids)
        assert want[1] != want[2] and len(want[1]) == TOKENS
        yield stub, running.http_url, running.backend.ready().engine, registry, want


def grpc_request(adapter: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=PROMPT, adapter_id=adapter, params=pb.SamplingParams(
        max_new_tokens=TOKENS, ignore_eos=True))


def http_completion(url: str, adapter: str, stream: bool):
    body = json.dumps({"model": adapter, "prompt": PROMPT, "max_tokens": TOKENS,
                       "temperature": 0, "ignore_eos": True, "logprobs": 0,
                       "stream": stream}).encode()
    return urllib.request.urlopen(urllib.request.Request(
        url + "/v1/completions", body, {"Content-Type": "application/json"}), timeout=120)


def http_tokens(url: str, adapter: str) -> list[str]:
    """The generated tokens' texts of a non-streamed completion."""
    with http_completion(url, adapter, stream=False) as reply:
        return json.load(reply)["choices"][0]["logprobs"]["tokens"]


def sse_tokens(reply) -> list[str]:
    tokens = []
    for line in reply:
        line = line.decode().strip()
        if line.startswith("data: {"):
            tokens += json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
    return tokens


def token_texts(engine, ids: list[int]) -> list[str]:
    return [engine.core.tokenizer.decode([t]) for t in ids]


def changed_while_generating(engine, change) -> None:
    """Applies `change` while the engine's loop is held between two steps of a running request,
    then lets it go on: the change lands mid-generation, however the threads are scheduled."""
    held, release = threading.Event(), threading.Event()
    engine._submit(lambda: (held.set(), release.wait(60)))
    assert held.wait(60)
    try:
        assert engine.stats.running >= 1, "the request ended before the change: raise TOKENS"
        change()
    finally:
        release.set()


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_grpc_in_flight_requests_finish_on_their_version(server, versions, change):
    stub, _, engine, registry, want = server
    name = f"grpc-{change}"
    registry.register(name, *versions[1])
    stream = stub.GenerateStream(grpc_request(name))
    first = next(stream)
    if change == "replace":
        changed_while_generating(engine, lambda: registry.register(name, *versions[2]))
        assert list(stub.Generate(grpc_request(name)).token_ids) == want[2]  # new: new version
    else:
        changed_while_generating(engine, lambda: registry.delete(name))
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(grpc_request(name))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    got = list(first.token_ids) + [t for message in stream for t in message.token_ids]
    assert got == want[1]


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_http_in_flight_requests_finish_on_their_version(server, versions, change):
    _, url, engine, registry, want = server
    name = f"http-{change}"
    registry.register(name, *versions[1])
    with http_completion(url, name, stream=True) as reply:
        first = reply.readline()  # the first event: the request is generating
        if change == "replace":
            changed_while_generating(engine, lambda: registry.register(name, *versions[2]))
            assert http_tokens(url, name) == token_texts(engine, want[2])
        else:
            changed_while_generating(engine, lambda: registry.delete(name))
            with pytest.raises(urllib.error.HTTPError) as error:
                http_tokens(url, name)
            assert error.value.code == 404
        got = sse_tokens([first, *reply])
    assert got == token_texts(engine, want[1])
