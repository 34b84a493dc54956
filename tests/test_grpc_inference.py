"""The Inference gRPC service, served in-process on a free port and called over a real channel."""

from __future__ import annotations


import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from tests.engine_helpers import greedy_request, make_core, run_to_completion
from tests.inprocess_server import serving


@pytest.fixture(scope="module")
def core(tiny_model_dir, tiny_adapter_dirs):
    return make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=2, max_rank=64)


@pytest.fixture(scope="module")
def channel(core):
    with serving(core) as (chan, _):
        yield chan


@pytest.fixture(scope="module")
def stub(channel):
    return inference_pb2_grpc.InferenceStub(channel)


def _request(prompt_ids, adapter="", max_new_tokens=6, **params):
    return pb.GenerateRequest(prompt_token_ids=prompt_ids, adapter_id=adapter,
                              params=pb.SamplingParams(max_new_tokens=max_new_tokens, **params))


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="loraplex.v1.Inference"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_generate_equals_the_engine_run_directly(stub, tiny_model_dir, tiny_adapter_dirs):
    prompt = [1, 40, 41, 42, 43]
    reference = make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=2, max_rank=64)
    for adapter in ["", "all-r8", "qkvo-r64"]:
        want = run_to_completion(reference, {0: [("r", greedy_request(prompt, adapter or None, 6))]})
        reply = stub.Generate(_request(prompt, adapter))
        assert list(reply.token_ids) == want["r"][0]
        assert reply.text == want["r"][1]
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.usage.completion_tokens == 6


def test_stream_deltas_add_up_to_the_unary_result(stub):
    request = _request([1, 99, 98, 97], "attn-r4", max_new_tokens=8, temperature=0.8, seed=7)
    whole = stub.Generate(request)
    messages = list(stub.GenerateStream(request))
    assert [m.finish_reason for m in messages[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(messages) - 1)
    assert messages[-1].finish_reason == whole.finish_reason
    assert [t for m in messages for t in m.token_ids] == list(whole.token_ids)
    assert "".join(m.text for m in messages) == whole.text
    assert messages[-1].usage.completion_tokens == 8


def test_text_prompt_and_logprobs(stub):
    reply = stub.Generate(pb.GenerateRequest(prompt="Hello there", return_logprobs=True,
                                             params=pb.SamplingParams(max_new_tokens=3)))
    assert len(reply.token_ids) == 3
    assert len(reply.logprobs) == 3 and all(lp <= 0 for lp in reply.logprobs)


def test_messages_are_rendered_with_the_chat_template(stub, core):
    """A conversation in `messages` is the prompt the model's chat template makes of it."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = core.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]
    chat = stub.Generate(pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in conversation], adapter_id="all-r8",
        params=pb.SamplingParams(max_new_tokens=5)))
    plain = stub.Generate(_request(list(rendered), "all-r8", max_new_tokens=5))
    assert chat.usage.prompt_tokens == len(rendered)
    assert list(chat.token_ids) == list(plain.token_ids) and chat.text == plain.text


def test_tokenize(stub):
    reply = stub.Tokenize(pb.TokenizeRequest(text="Hello", add_special_tokens=True))
    assert reply.token_ids[0] == 1 and len(reply.token_ids) > 1


@pytest.mark.parametrize("request_, code", [
    (pb.GenerateRequest(adapter_id="no-such-adapter", prompt="hi"), grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt_token_ids=[10**6]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(top_p=1.5)),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=10**7)),
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_precise_status_codes(stub, request_, code):
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as error:
            call(request_)
        assert error.value.code() == code, error.value.details()
        assert error.value.details()
