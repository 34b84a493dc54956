"""A caller that leaves ends its generation, proven on the server's side.

Every request here would run to the model's context limit (EOS ignored): thousands of engine
steps. After the caller leaves (a cancelled unary call, a cancelled stream, a deadline; over a raw
stub and through loraplex's client), the server must count the request as cancelled, go idle within STEP_BOUND engine steps (counted by the
engine, not timed), and sample no token after that. With cancellation switched off each test fails
on the step bound (see the `ignored_cancellation` check at the end).
"""

from __future__ import annotations

import time

import grpc
import pytest

from clients import LoraplexClient, LoraplexError
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from server.engine.async_engine import Engine
from tests.engine_helpers import make_core
from tests.inprocess_server import serving

PROMPT = [1, 5, 6, 7]
WAIT_SECONDS = 120  # only a guard against a hang: every assertion counts steps or tokens


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dirs):
    """(stub, engine, metrics registry) of an in-process server on the tiny model."""
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=2, max_rank=64)
    with serving(core) as (channel, running):
        stub = inference_pb2_grpc.InferenceStub(channel)
        stub.client = LoraplexClient(f"127.0.0.1:{running.port}")
        yield stub, running.backend.ready().engine, running.metrics.registry
        stub.client.close()


def step_bound(engine: Engine) -> int:
    """A tenth of the steps a request to the context limit takes: far more than cancellation
    needs to travel through gRPC and the event loop, far fewer than ignoring it would run."""
    return (engine.core.max_model_len - len(PROMPT)) // 10


def to_the_limit(engine: Engine, adapter: str = "all-r8") -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=PROMPT, adapter_id=adapter, params=pb.SamplingParams(
        max_new_tokens=engine.core.max_model_len - len(PROMPT), ignore_eos=True))


def cancelled_count(metrics) -> float:
    return metrics.get_sample_value("loraplex_requests_total", {"outcome": "cancelled"}) or 0.0


def wait_for_tokens(engine: Engine, count: int) -> None:
    """Until the engine has sampled `count` more tokens than when called."""
    start, deadline = engine.stats.generated_tokens, time.monotonic() + WAIT_SECONDS
    while engine.stats.generated_tokens < start + count:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.001)


def assert_ends_within_steps(engine: Engine, metrics, cancelled_before: float) -> int:
    """From now on the engine goes idle within the step bound and then samples nothing more;
    the request counts as cancelled. Returns the steps it took."""
    at_cancel = engine.stats
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        stats = engine.stats
        steps = stats.steps - at_cancel.steps
        assert steps <= step_bound(engine), f"still running {steps} steps after the caller left"
        if stats.running == stats.waiting == 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert stats.generated_tokens - at_cancel.generated_tokens <= steps  # one sequence
    while cancelled_count(metrics) < cancelled_before + 1:  # counted when the abort is applied
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert engine.stats.generated_tokens == stats.generated_tokens  # and nothing since
    core = engine.core
    assert core.kv.allocator.num_free == core.kv.num_blocks
    assert all(refs == 0 for refs in core.slots.refs)
    return steps


def cancel_unary(stub, engine: Engine) -> None:
    call = stub.Generate.future(to_the_limit(engine))
    wait_for_tokens(engine, 2)
    call.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()


def cancel_stream(stub, engine: Engine) -> None:
    stream = stub.GenerateStream(to_the_limit(engine))
    next(stream), next(stream)
    stream.cancel()


def miss_deadline(stub, engine: Engine) -> None:
    call = stub.Generate.future(to_the_limit(engine), timeout=1.0)
    with pytest.raises(grpc.RpcError) as error:
        call.result()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def close_client_stream(stub, engine: Engine) -> None:
    """Leaving a client stream's loop early closes it, which cancels the request."""
    for i, _ in enumerate(stub.client.stream(prompt_token_ids=PROMPT, adapter="all-r8",
                                             max_new_tokens=engine.core.max_model_len - len(PROMPT),
                                             ignore_eos=True)):
        if i == 1:
            break


def miss_client_deadline(stub, engine: Engine) -> None:
    with pytest.raises(LoraplexError) as error:
        stub.client.generate(prompt_token_ids=PROMPT, ignore_eos=True, timeout=1.0,
                             max_new_tokens=engine.core.max_model_len - len(PROMPT))
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


LEAVING = {"unary cancelled": cancel_unary, "stream cancelled": cancel_stream,
           "deadline exceeded": miss_deadline, "client stream closed": close_client_stream,
           "client deadline exceeded": miss_client_deadline}


@pytest.mark.parametrize("leave", list(LEAVING))
def test_a_caller_leaving_ends_the_generation_within_a_few_steps(server, leave):
    stub, engine, metrics = server
    before = cancelled_count(metrics)
    LEAVING[leave](stub, engine)
    assert_ends_within_steps(engine, metrics, before)


def test_the_check_fails_when_cancellation_is_ignored(server, monkeypatch):
    """The step bound is what catches a server that lets abandoned requests run."""
    stub, engine, metrics = server
    monkeypatch.setattr(Engine, "_abort", lambda self, request_id: None)
    before = cancelled_count(metrics)
    cancel_stream(stub, engine)
    with pytest.raises(AssertionError, match="still running"):
        assert_ends_within_steps(engine, metrics, before)
    monkeypatch.undo()
    for request_id in list(engine._requests):  # stop the runaway request for the next tests
        engine._submit(lambda request_id=request_id: engine._abort(request_id))
    deadline = time.monotonic() + WAIT_SECONDS
    while engine.stats.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
