"""The generation API people expect, through the openai SDK and gRPC against a real server on the
tiny demo: structured output (OpenAI's response_format and vLLM's extra_body names) with any
adapter, in the same batch as free requests; top log-probabilities; n choices; echo."""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from clients import LoraplexClient
from tests.server_process import openai_client, start_demo_http_server, stopped_cleanly

BASE = "model"
ADAPTERS = ["attn-r4", "attn-r8", "all-r16", "all-r64-rslora", "mlp-r8-bf16"]
SCHEMA = {"type": "object",
          "properties": {"label": {"enum": ["spam", "ham"]}, "urgent": {"type": "boolean"}},
          "required": ["label", "urgent"], "additionalProperties": False}
PROMPT = "Classify this message"
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def server(demo_cache, tmp_path_factory):
    store = tmp_path_factory.mktemp("gen") / "store"
    with stopped_cleanly(start_demo_http_server(demo_cache, store)) as process:
        yield process


@pytest.fixture(scope="module")
def api(server):
    with openai_client(server, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    with LoraplexClient(server.target, timeout=300) as client:
        yield client


# ---- structured output --------------------------------------------------------------------------

def _constraints():
    """(name, request kwargs, check of the text): one per way of asking."""
    json_schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    return [
        ("response_format json_schema", {"response_format": json_schema},
         lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ("response_format json_object", {"response_format": {"type": "json_object"}},
         lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
        ("guided_json", {"extra_body": {"guided_json": SCHEMA}},
         lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ("guided_regex", {"extra_body": {"guided_regex": r"[a-z]{3}-[0-9]{2}"}},
         lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t) or pytest.fail(t)),
        ("guided_choice", {"extra_body": {"guided_choice": ["red", "green", "blue"]}},
         lambda t: t in ("red", "green", "blue") or pytest.fail(t)),
        ("structured_outputs.grammar",
         {"extra_body": {"structured_outputs": {"grammar": 'root ::= "a" [0-9] [0-9]'}}},
         lambda t: re.fullmatch(r"a[0-9]{2}", t) or pytest.fail(t)),
    ]


def test_constrained_requests_for_every_adapter_in_one_batch_always_parse(api):
    """A seeded set: each way of asking x each adapter and the base, sampled, all in flight
    together with free requests. Every one that ends by the grammar (stop or EOS) parses; any
    cut by length is counted apart (the tiny random model may wander inside a JSON string)."""
    jobs = [(name, kwargs, check, model, seed)
            for name, kwargs, check in _constraints()
            for seed, model in enumerate([BASE, *ADAPTERS])]

    def run(job):
        name, kwargs, check, model, seed = job
        reply = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
            temperature=0.8, seed=seed, **kwargs)
        return job, reply.choices[0]

    def free(model):
        return api.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        free_replies = [pool.submit(free, m) for m in ADAPTERS]
        replies = list(pool.map(run, jobs))
    cut = 0
    for (name, _, check, model, _), choice in replies:
        if choice.finish_reason == "length":
            cut += 1
            continue
        assert choice.finish_reason == "stop", (name, model)
        check(choice.message.content)
    assert cut <= len(jobs) // 4, f"{cut} of {len(jobs)} cut by length"
    for model, reply in zip(ADAPTERS, free_replies):
        alone = free(model)
        assert reply.result().choices[0].text == alone.choices[0].text


@pytest.mark.parametrize("kwargs, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": {"type": 7}}}},
     "json_schema constraint cannot be compiled"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "regex constraint cannot be compiled"),
    ({"extra_body": {"guided_choice": "not a list"}}, "must be a list of strings"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "give one structured"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_a_constraint_the_library_refuses_is_400_with_its_reason(api, kwargs, reason):
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model="attn-r4", messages=[{"role": "user",
                                                                "content": PROMPT}],
                                    max_tokens=4, **kwargs)
    assert reason in error.value.message


def test_grpc_structured_output_and_its_errors(grpc_client):
    reply = grpc_client.generate(PROMPT, adapter="all-r16", max_new_tokens=MAX_TOKENS,
                                 structured_output={"choice": ["north", "south"]})
    assert reply.text in ("north", "south") and reply.finish_reason in ("stop", "eos")
    reply = grpc_client.generate(PROMPT, max_new_tokens=MAX_TOKENS,
                                 structured_output={"regex": r"[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{4}", reply.text)
    from clients import LoraplexError

    with pytest.raises(LoraplexError) as error:
        grpc_client.generate(PROMPT, structured_output={"json_schema": "{bad"})
    assert error.value.code.name == "INVALID_ARGUMENT"
    assert "json_schema constraint cannot be compiled" in error.value.details


# ---- top log-probabilities ----------------------------------------------------------------------

def test_top_logprobs_on_completions_chat_and_grpc(api, grpc_client):
    reply = api.completions.create(model="attn-r8", prompt=PROMPT, max_tokens=6, temperature=0,
                                   logprobs=5)
    lp = reply.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # greedy: the sampled token is the most likely (tokens that decode to the same text,
        # such as parts of one UTF-8 character, share a key in this format)
        assert 1 <= len(top) <= 5 and max(top.values()) <= logprob + 1e-4
    text = reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert "".join(lp.tokens) == text

    chat = api.chat.completions.create(model="attn-r8", messages=[{"role": "user",
                                                                   "content": PROMPT}],
                                       max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=20)
    for item in chat.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 20
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] == pytest.approx(
            item.logprob, abs=1e-4)
        assert all(t.bytes is None or bytes(t.bytes).decode() == t.token
                   for t in item.top_logprobs)

    grpc = grpc_client.generate(PROMPT, adapter="attn-r8", max_new_tokens=6, temperature=0,
                                top_logprobs=3)
    assert [len(t) for t in grpc.top_logprobs] == [3] * 6
    assert [t[0][1] for t in grpc.top_logprobs] == pytest.approx(grpc.logprobs, abs=1e-5)
    assert [t[0][0] for t in grpc.top_logprobs] == grpc.token_ids


def test_top_logprobs_need_logprobs_and_stop_at_twenty(api):
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=BASE, messages=messages, top_logprobs=3)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=BASE, messages=messages, logprobs=True,
                                    top_logprobs=21)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=BASE, prompt=PROMPT, logprobs=21)


# ---- n choices, echo -----------------------------------------------------------------------------

def test_n_choices_each_with_its_own_seed(api):
    kwargs = dict(model="all-r16", prompt=PROMPT, max_tokens=8, temperature=1.0)
    reply = api.completions.create(n=3, seed=40, best_of=3, **kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for i, choice in enumerate(reply.choices):
        alone = api.completions.create(seed=40 + i, **kwargs).choices[0]
        assert choice.text == alone.text
    assert reply.usage.completion_tokens == sum(8 for _ in reply.choices)
    assert reply.usage.prompt_tokens == api.completions.create(seed=1, **kwargs).usage.prompt_tokens

    chat = api.chat.completions.create(model="all-r16", messages=[{"role": "user",
                                                                  "content": PROMPT}],
                                       n=2, max_tokens=8, temperature=1.0, seed=7)
    assert [c.index for c in chat.choices] == [0, 1]


def test_n_choices_stream_with_their_indices(api):
    chunks = list(api.completions.create(model="attn-r4", prompt=PROMPT, max_tokens=6,
                                         temperature=1.0, seed=3, n=2, stream=True,
                                         stream_options={"include_usage": True}))
    *deltas, usage = chunks
    texts = {0: "", 1: ""}
    for chunk in deltas:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    whole = api.completions.create(model="attn-r4", prompt=PROMPT, max_tokens=6,
                                   temperature=1.0, seed=3, n=2)
    assert texts == {c.index: c.text for c in whole.choices}
    assert usage.usage.completion_tokens == 12


def hits(server) -> float:
    text = urllib.request.urlopen(server.http_url + "/metrics", timeout=30).read().decode()
    return float(re.search(r"^loraplex_prefix_cache_hits_total (\S+)$", text, re.M)[1])


def test_the_later_choices_share_the_first_one_s_prompt(api, server):
    prompt = " ".join(f"w{i}" for i in range(60))
    before = hits(server)
    reply = api.completions.create(model="attn-r8", prompt=prompt, max_tokens=2, n=4,
                                   temperature=1.0, seed=9)
    assert len(reply.choices) == 4
    full_blocks = (reply.usage.prompt_tokens - 1) // 16 * 16
    assert hits(server) - before == 3 * full_blocks > 0  # choices 2-4 computed only the rest


def test_best_of_other_than_n_is_400(api):
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=BASE, prompt=PROMPT, n=2, best_of=3)


def test_echo_puts_the_prompt_before_the_completion(api):
    plain = api.completions.create(model="mlp-r8-bf16", prompt=PROMPT, max_tokens=5,
                                   temperature=0)
    echoed = api.completions.create(model="mlp-r8-bf16", prompt=PROMPT, max_tokens=5,
                                    temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="mlp-r8-bf16", prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
        stream=True))
    assert streamed == echoed.choices[0].text


def test_echo_with_logprobs_gives_the_prompt_s_too(api):
    reply = api.completions.create(model="attn-r4", prompt=PROMPT, max_tokens=3, temperature=0,
                                   echo=True, logprobs=2)
    plain = api.completions.create(model="attn-r4", prompt=PROMPT, max_tokens=3,
                                   temperature=0, logprobs=2)
    lp, completion = reply.choices[0].logprobs, plain.choices[0].logprobs
    prompt_tokens = reply.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert lp.tokens[prompt_tokens:] == completion.tokens
    assert lp.token_logprobs[prompt_tokens:] == pytest.approx(completion.token_logprobs,
                                                               abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # computed whole
