"""Isolation: one request's preparation, size or adapter never stalls the others.

Order of completion and status codes only, never times: a request held while it is prepared (its
tokenizer blocks until the test lets it go) must not keep a small request from finishing; an
oversized body or prompt is refused before anything tokenizes it; one adapter's full queue
refuses that adapter's requests with a retry hint and no one else's.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from tests.engine_helpers import make_core
from tests.inprocess_server import post_json, serving

HELD = "held "  # a prompt starting with this is held in the tokenizer until released
MIB = 1 << 20


class HoldingTokenizer:
    """The model's tokenizer, except that prompts starting with HELD wait for `release`; it
    records the length of every text it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.holding = threading.Event()
        self.release = threading.Event()
        self.lengths: list[int] = []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        if text.startswith(HELD):
            self.holding.set()
            assert self.release.wait(120), "the test never released the held prompt"
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dirs):
    """An in-process server (gRPC and HTTP, 16 MiB messages) on the tiny model whose tokenizer
    can hold a prompt; adapters a8 and a4; two requests of one adapter may wait at most."""
    core = make_core(tiny_model_dir, {"a8": tiny_adapter_dirs["all-r8"],
                                      "a4": tiny_adapter_dirs["attn-r4"]},
                     max_batch_size=1, max_queue_per_adapter=2)
    core.tokenizer = HoldingTokenizer(core.tokenizer)
    with serving(core, http=True, max_message_bytes=16 * MIB) as (channel, running):
        running.stub = inference_pb2_grpc.InferenceStub(channel)
        yield running


def _generate(prompt: str | list[int], adapter: str = "", tokens: int = 3) -> pb.GenerateRequest:
    given = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    return pb.GenerateRequest(adapter_id=adapter, **given,
                              params=pb.SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def _post(server, path: str, body: bytes) -> tuple[int, object, dict]:
    return post_json(server.http_url + path, body, timeout=120)


def _completion(server, prompt, model=None, **fields) -> bytes:
    model = model or server.backend.ready().core.model.name
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": 3, "temperature": 0,
                       **fields}).encode()


@pytest.fixture
def tokenizer(server) -> HoldingTokenizer:
    tokenizer = server.backend.ready().core.tokenizer
    tokenizer.holding.clear()
    tokenizer.release.clear()
    tokenizer.lengths.clear()
    yield tokenizer
    tokenizer.release.set()


def test_small_requests_finish_while_a_large_one_is_being_prepared(server, tokenizer):
    held_grpc = server.stub.Generate.future(_generate(HELD + "x " * 500))
    assert tokenizer.holding.wait(60)
    held_http = threading.Thread(target=_post, args=(
        server, "/v1/completions", _completion(server, HELD + "y " * 500)))
    held_http.start()
    # Both large prompts are now inside preparation; small ones on both faces still finish.
    assert server.stub.Generate(_generate([1, 2, 3], "a8"), timeout=60).usage.completion_tokens == 3
    assert server.stub.Generate(_generate("a small prompt"), timeout=60).token_ids
    status, _, reply = _post(server, "/v1/completions", _completion(server, [1, 2, 3]))
    assert status == 200 and reply["usage"]["completion_tokens"] == 3
    assert not held_grpc.done() and held_http.is_alive()  # the small ones finished first
    tokenizer.release.set()
    assert held_grpc.result(timeout=60).usage.completion_tokens == 3
    held_http.join(60)


def test_a_10_mb_prompt_is_refused_without_being_tokenized(server, tokenizer):
    prompt = "word " * (2 * MIB)  # 10 MiB of text, under the 16 MiB message limit
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(_generate(prompt), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "characters" in error.value.details()
    status, _, reply = _post(server, "/v1/completions", _completion(server, prompt))
    assert status == 400 and "characters" in reply["error"]["message"]
    chat = json.dumps({"model": server.backend.ready().core.model.name, "max_tokens": 3,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    assert _post(server, "/v1/chat/completions", chat)[0] == 400
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Tokenize(pb.TokenizeRequest(text=prompt), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert max(tokenizer.lengths, default=0) < len(prompt)  # nobody tokenized it


def test_an_http_body_over_the_message_limit_is_413_unread(server):
    body = _completion(server, "z" * (17 * MIB))
    status, _, reply = _post(server, "/v1/completions", body)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    assert "--max-message-mb" in reply["error"]["message"]


def test_a_full_adapter_queue_refuses_that_adapter_only_with_a_retry_hint(server):
    stub = server.stub
    # The one place in the batch is taken; a8's queue then fills (two may wait).
    running = stub.GenerateStream(_generate([1, 2], "", tokens=400))
    next(running)
    waiting = [stub.Generate.future(_generate([3, 4], "a8")) for _ in range(2)]
    try:
        _until_waiting(server, "a8", 2)
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(_generate([5, 6], "a8"), timeout=60)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queue-per-adapter 2" in error.value.details()
        assert int(dict(error.value.trailing_metadata())["grpc-retry-pushback-ms"]) > 0
        status, headers, reply = _post(server, "/v1/completions",
                                       _completion(server, [5, 6], model="a8"))
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert reply["error"]["code"] == "resource_exhausted"
        other = stub.Generate.future(_generate([7, 8], "a4"))  # another adapter still queues
        _until_waiting(server, "a4", 1)
    finally:
        running.cancel()
    assert all(w.result(timeout=60).usage.completion_tokens == 3 for w in waiting)
    assert other.result(timeout=60).usage.completion_tokens == 3


def _until_waiting(server, adapter: str, count: int) -> None:
    """Polls the engine's published stats (at most a minute) until `adapter` has `count`
    requests waiting."""
    for _ in range(6000):
        if server.backend.ready().engine.stats.waiting_by_adapter.get(adapter) == count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{adapter} never had {count} requests waiting")
