"""The text a client receives: streamed deltas add up to the unary text, which is the tokenizer's
`decode` of the returned ids (cut before a stop string; a stop token's or the EOS token's text
excluded), for every finish reason, with multi-byte characters split across tokens.

The model's choices are scripted: `sample` is replaced by one that hands each request (keyed by
its seed) the next token of a script drawn by hypothesis from text with multi-byte characters, so
every case is exact. Everything else is the real path: engine, detokenizer, stop strings, the
gRPC servicer and a real channel. A last test samples for real, over seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from server.engine import core as engine_core
from server.engine.sampler import Sampled
from tests.engine_helpers import make_core
from tests.inprocess_server import serving

ALPHABET = "ab \né€😀"  # 1-, 2-, 3- and 4-byte characters
PROMPT = [1, 5, 6]
FINISH = {pb.LENGTH: "length", pb.STOP: "stop", pb.EOS: "eos"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """(stub, tokenizer, scripts): scripts[seed] is the token list a request with that seed gets."""
    core = make_core(tiny_model_dir, {})
    scripts: dict[int, list[int]] = {}
    positions: dict[int, Iterator[int]] = {}
    real_sample = engine_core.sample

    def scripted_sample(logits: torch.Tensor, rows, mask=None):
        if not all(row.params.seed in scripts for row in rows):
            return real_sample(logits, rows, mask)
        return [Sampled(next(positions.setdefault(row.params.seed, iter(scripts[row.params.seed]))))
                for row in rows]

    engine_core.sample = scripted_sample
    try:
        with serving(core) as (channel, _):
            yield inference_pb2_grpc.InferenceStub(channel), core.tokenizer, scripts, positions
    finally:
        engine_core.sample = real_sample


_seeds = itertools.count(1)


def generate(server, script: list[int], **params) -> tuple[pb.GenerateResponse, str, list[int]]:
    """The unary reply, and the streamed text and ids, for one scripted request per call."""
    stub, _, scripts, positions = server
    texts, ids = [], []
    for call in ("unary", "stream"):
        seed = next(_seeds)
        scripts[seed] = script
        request = pb.GenerateRequest(prompt_token_ids=PROMPT, params=pb.SamplingParams(
            seed=seed, temperature=1.0, **params))
        if call == "unary":
            reply = stub.Generate(request)
        else:
            for message in stub.GenerateStream(request):
                texts.append(message.text)
                ids += message.token_ids
                last = message
        del scripts[seed], positions[seed]
    assert last.finish_reason == reply.finish_reason
    return reply, "".join(texts), ids


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


texts = st.text(alphabet=ALPHABET, min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, data=st.data())
def test_length_cuts_anywhere_even_inside_a_character(server, text, data):
    tokenizer = server[1]
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = data.draw(st.integers(1, len(script)), label="max_new_tokens")
    reply, streamed, ids = generate(server, script, max_new_tokens=n, ignore_eos=True)
    assert FINISH[reply.finish_reason] == "length" and list(reply.token_ids) == script[:n] == ids
    assert streamed == reply.text == decode(tokenizer, script[:n])  # U+FFFD for a cut character


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, data=st.data())
def test_a_stop_string_straddling_tokens_and_characters_is_cut_with_what_follows(server, text,
                                                                                data):
    tokenizer = server[1]
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = data.draw(st.integers(0, len(text) - 1), label="start")
    stop = text[start:start + data.draw(st.integers(1, 3), label="length")]
    reply, streamed, ids = generate(server, script + [tokenizer.eos_token_id],
                                    max_new_tokens=len(script) + 1, stop=[stop])
    assert FINISH[reply.finish_reason] == "stop"
    assert streamed == reply.text == text[:text.find(stop)]
    assert list(reply.token_ids) == ids and text.find(stop) <= len(decode(tokenizer, ids))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, data=st.data())
def test_a_stop_token_and_the_eos_token_leave_their_text_out(server, text, data):
    tokenizer = server[1]
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    reply, streamed, ids = generate(server, script + [eos, *script], max_new_tokens=2 * len(script) + 1)
    assert FINISH[reply.finish_reason] == "eos" and list(reply.token_ids) == ids == script + [eos]
    assert streamed == reply.text == decode(tokenizer, script) == text
    cut = data.draw(st.integers(0, len(script) - 1), label="stop token index")
    stop_id = script[cut]
    first = script.index(stop_id)
    reply, streamed, ids = generate(server, script, max_new_tokens=len(script),
                                    stop_token_ids=[stop_id], ignore_eos=True)
    assert FINISH[reply.finish_reason] == "stop" and ids == script[:first + 1]
    assert streamed == reply.text == decode(tokenizer, script[:first])


@pytest.mark.parametrize("seed", range(12))
def test_sampled_streams_equal_the_unary_text_and_decode(server, seed):
    """Real sampling (temperature 1.5 over the byte-level vocabulary: partial characters abound)."""
    stub, tokenizer = server[0], server[1]
    request = pb.GenerateRequest(prompt_token_ids=PROMPT, params=pb.SamplingParams(
        seed=10_000 + seed, temperature=1.5, max_new_tokens=24, ignore_eos=True))
    reply = stub.Generate(request)
    messages = list(stub.GenerateStream(request))
    assert [t for m in messages for t in m.token_ids] == list(reply.token_ids)
    assert "".join(m.text for m in messages) == reply.text == decode(tokenizer, reply.token_ids)
