"""Structured output and top log-probabilities in the engine: constrained rows (JSON schema, any
JSON object, regex, a choice, an EBNF grammar) share a batch with free rows under different
adapters; each constrained output matches its constraint and each free output equals its run
alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from server.engine.core import FinishReason, GenerationRequest
from server.engine.sampler import SamplingParams
from server.engine.structured import StructuredOutput
from server.errors import InvalidRequest
from tests.engine_helpers import greedy_request, make_core, record_logits, run_to_completion

SCHEMA = {"type": "object",
          "properties": {"label": {"enum": ["spam", "ham"]}, "urgent": {"type": "boolean"},
                         "note": {"type": "string", "maxLength": 12}},
          "required": ["label", "urgent", "note"], "additionalProperties": False}
REGEX = r"[a-c]{2,4}-[0-9]{1,3}"
CHOICES = ("yes", "no", "maybe later")
GRAMMAR = 'root ::= "(" [0-9] " + " [0-9] ")"'
PROMPT = [1, 17, 23, 5, 99, 41]


def constrained(kind, value, adapter=None, seed=None, max_tokens=256):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if seed is not None else 0,
                            seed=seed, structured=StructuredOutput(kind, value))
    return GenerationRequest(prompt_token_ids=PROMPT, adapter_id=adapter, params=params)


def check(kind, value, text):
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(value))
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(value, text), text
    elif kind == "choice":
        assert text in value
    else:
        assert re.fullmatch(r"\([0-9] \+ [0-9]\)", text), text


CASES = [("json_schema", json.dumps(SCHEMA)), ("json_object", ""), ("regex", REGEX),
         ("choice", CHOICES), ("grammar", GRAMMAR)]


@pytest.fixture(scope="module")
def core(tiny_model_dir, tiny_adapter_dirs):
    return make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64)


def test_constrained_and_free_rows_share_a_batch(core):
    adapters = [None, "attn-r4", "all-r8", "all-r16-rslora"]
    free = {f"free-{a}": greedy_request(PROMPT, a, 12) for a in adapters}
    alone = {rid: run_to_completion(core, {0: [(rid, req)]})[rid] for rid, req in free.items()}
    requests = dict(free)
    for i, (kind, value) in enumerate(CASES):
        for seed in (None, 1, 2):  # greedy, and two sampled runs
            requests[f"{kind}-{seed}"] = constrained(kind, value, adapters[i % 4], seed)
    results = run_to_completion(core, {0: list(requests.items())})
    for rid in free:
        assert results[rid][0] == alone[rid][0], rid
    finished = 0
    for i, (kind, value) in enumerate(CASES):
        for seed in (None, 1, 2):
            tokens, text, reason = results[f"{kind}-{seed}"]
            if reason == FinishReason.LENGTH:
                continue  # cut: reported apart by the benchmark; the rest must parse
            assert reason in (FinishReason.EOS, FinishReason.STOP)
            check(kind, value, text)
            finished += 1
    assert finished >= 12  # the tiny random model closes most of them within 256 tokens


def test_a_grammar_ending_finishes_even_with_ignore_eos(core):
    params = SamplingParams(max_new_tokens=50, ignore_eos=True,
                            structured=StructuredOutput("choice", ("yes", "no")))
    request = GenerationRequest(prompt_token_ids=PROMPT, params=params)
    tokens, text, reason = run_to_completion(core, {0: [("r", request)]})["r"]
    assert reason == FinishReason.STOP and text in ("yes", "no")


def test_a_schema_the_library_refuses_is_invalid_with_its_reason(core):
    for kind, value in [("json_schema", "{not json"), ("regex", "(unclosed"),
                        ("grammar", "root ::= ")]:
        with pytest.raises(InvalidRequest, match=f"the {kind} constraint cannot be compiled: .+"):
            core.prepare(constrained(kind, value))
    with pytest.raises(InvalidRequest, match="choice"):
        core.prepare(constrained("choice", ()))


def test_grammars_compile_in_prepare_off_the_step_loop(core):
    prepared = core.prepare(constrained("regex", REGEX))
    assert prepared.grammar is not None
    assert core.prepare(greedy_request(PROMPT)).grammar is None


def test_top_logprobs_are_the_raw_distribution_s_most_likely_tokens(core):
    logits = record_logits(core)
    params = SamplingParams(max_new_tokens=4, logprobs=True, top_logprobs=5,
                            repetition_penalty=1.5)
    core.add_request(GenerationRequest(prompt_token_ids=PROMPT, adapter_id="all-r8",
                                       params=params), "t")
    outs = [out for out in run_to_completion_outputs(core)]
    assert all(len(out.new_top_logprobs) == 1 for out in outs)
    for out, row in zip(outs, logits["t"]):
        raw = torch.log_softmax(row, dim=-1)  # before the repetition penalty
        top = out.new_top_logprobs[0]
        want = raw.topk(5)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=1e-5)
        assert out.new_logprobs[0] == pytest.approx(raw[out.new_token_ids[0]].item(), abs=1e-5)


def run_to_completion_outputs(core):
    while core.has_work():
        yield from core.step()


def test_top_logprobs_beyond_twenty_are_invalid(core):
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        core.prepare(GenerationRequest(prompt_token_ids=PROMPT,
                                       params=SamplingParams(top_logprobs=21)))


def test_prompt_logprobs_equal_the_distribution_after_each_prefix(core):
    """Prompt token k's log-probability is what a request for the prompt's first k tokens sees
    as its next-token distribution; the first token has none; the prefix cache is bypassed."""
    prompt = PROMPT + [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211]
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=3)
    run_to_completion(core, {0: [("warm", greedy_request(prompt, "all-r8", 2))]})  # cached
    core.add_request(GenerationRequest(prompt_token_ids=prompt, adapter_id="all-r8",
                                       params=params), "p")
    first = [out for out in run_to_completion_outputs(core) if out.request_id == "p"][0]
    assert first.prompt_token_ids == prompt and len(first.prompt_logprobs) == len(prompt) - 1
    assert first.cached_tokens == 0
    logits = record_logits(core)
    for k in (1, 5, len(prompt) - 1):
        run_to_completion(core, {0: [(f"k{k}", greedy_request(prompt[:k], "all-r8", 1))]})
        want = torch.log_softmax(logits[f"k{k}"][0], dim=-1)
        logprob, top = first.prompt_logprobs[k - 1]
        assert logprob == pytest.approx(want[prompt[k]].item(), abs=1e-4)
        assert [t for t, _ in top] == want.topk(3).indices.tolist()
    core.logits_observer = None


def test_prompt_logprobs_survive_preemption_and_chunked_prefill(tiny_model_dir, tiny_adapter_dirs):
    def prompt_lps(core, requests):
        outs = {}
        for rid, req in requests:
            core.add_request(req, rid)
        for out in run_to_completion_outputs(core):
            if out.prompt_logprobs is not None:
                outs[out.request_id] = [lp for lp, _ in out.prompt_logprobs]
        return outs

    requests = [(f"r{i}", GenerationRequest(
        prompt_token_ids=[1] + [(13 * i + 7 * j) % 400 + 5 for j in range(20 + 3 * i)],
        adapter_id=[None, "attn-r4", "all-r8"][i % 3],
        params=SamplingParams(max_new_tokens=12, ignore_eos=True, prompt_logprobs=0)))
        for i in range(8)]
    roomy = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64)
    alone = {rid: prompt_lps(roomy, [(rid, req)])[rid] for rid, req in requests}
    tight = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, kv_block_size=4,
                      kv_cache_mb=0.125, max_step_tokens=16, max_batch_size=4)
    together = prompt_lps(tight, requests)
    assert tight.scheduler.preemptions > 0
    for rid, lps in alone.items():
        assert together[rid] == pytest.approx(lps, abs=1e-4), rid
