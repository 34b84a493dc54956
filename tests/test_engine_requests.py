"""One request's life in the engine: sampling parameters, stops, logprobs, cancel, adapter swaps."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from adapters_registry.peft_format import read_adapter_files
from adapters_registry.store import UnknownAdapterError
from server.engine.core import GenerationRequest
from server.engine.sampler import SampleRow, SamplingParams, sample, uniform
from server.errors import InvalidRequest
from tests.engine_helpers import greedy_request, make_core, record_logits, run_to_completion

PROMPT = [1, 72, 101, 108, 108, 111, 32, 119]


@pytest.fixture(scope="module")
def core(tiny_model_dir, tiny_adapter_dirs):
    return make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=4, max_rank=64)


def _sampled(seed, adapter=None, n=10, **params):
    return GenerationRequest(prompt_token_ids=PROMPT, adapter_id=adapter, params=SamplingParams(
        max_new_tokens=n, temperature=0.9, top_p=0.95, top_k=50, seed=seed, ignore_eos=True,
        **params))


def test_same_seed_same_tokens_alone_or_in_a_busy_batch(core):
    alone = run_to_completion(core, {0: [("s", _sampled(42, "all-r8"))]})["s"][0]
    busy = run_to_completion(core, {
        0: [("g1", greedy_request([1, 9, 8], "attn-r4", 20)), ("x", _sampled(1, "all-r8"))],
        1: [("s", _sampled(42, "all-r8")), ("y", _sampled(42, "qkvo-r64"))],
        3: [("g2", greedy_request([1] + list(range(100, 140)), None, 5))],
    })
    assert busy["s"][0] == alone
    assert busy["x"][0] != alone, "a different seed should give different tokens"


def test_max_new_tokens_ends_with_length(core):
    tokens, _, reason = run_to_completion(core, {0: [("r", greedy_request(PROMPT, None, 5))]})["r"]
    assert len(tokens) == 5 and reason == "length"


def test_stop_token_id_ends_generation_at_its_first_occurrence(core):
    full, _, _ = run_to_completion(core, {0: [("r", greedy_request(PROMPT, "all-r8", 12))]})["r"]
    stop_token = full[3]
    first = full.index(stop_token)
    tokens, _, reason = run_to_completion(core, {0: [("r", greedy_request(
        PROMPT, "all-r8", 12, stop_token_ids=[stop_token]))]})["r"]
    assert tokens == full[:first + 1] and reason == "stop"


def test_stop_string_cuts_the_text_before_it_and_is_never_streamed(core):
    request = lambda **p: GenerationRequest(prompt="Once upon a time", adapter_id="all-r8",  # noqa: E731
                                            params=SamplingParams(max_new_tokens=24, ignore_eos=True, **p))
    _, full_text, _ = run_to_completion(core, {0: [("r", request())]})["r"]
    visible = full_text.replace("\ufffd", "")
    assert len(visible) >= 8, f"need some text to cut: {full_text!r}"
    stop = visible[4:7]
    _, text, reason = run_to_completion(core, {0: [("r", request(stop=[stop]))]})["r"]
    assert reason == "stop"
    assert text == full_text[:full_text.index(stop)]


def test_logprobs_are_the_model_distribution_of_the_chosen_tokens(core):
    logits = record_logits(core)
    request = greedy_request(PROMPT, "qkvo-r64", 4, logprobs=True)
    core.add_request(request, "r")
    outputs = []
    while core.has_work():
        outputs += core.step()
    got = [lp for out in outputs for lp in out.new_logprobs]
    want = [float(torch.log_softmax(row, -1)[out.new_token_ids[0]])
            for row, out in zip(logits["r"], outputs)]
    assert got == pytest.approx(want, abs=1e-6)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seen = [[1, 2, 3, 3], [0, 49], [7]]
    rows = [SampleRow(SamplingParams(repetition_penalty=1.3), None, len(s), s) for s in seen]
    tokens = [d.token for d in sample(logits, rows)]
    for i, s in enumerate(seen):
        want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([s]), logits[i:i + 1].clone())
        assert tokens[i] == int(want.argmax())


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    def draws(**params):
        rows = [SampleRow(SamplingParams(temperature=5.0, **params), 0, position, None)
                for position in range(300)]
        return {d.token for d in sample(logits.expand(300, -1), rows)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=1e-6) == {0}
    assert draws() == set(range(6))


def test_draws_follow_the_distribution_and_depend_on_seed_and_position_only():
    """The counter-based draws: frequencies match the softmax (6000 positions), the same
    (seed, position) gives the same token alone or among other rows, and seeds differ."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0])
    want = torch.softmax(logits, -1)
    rows = [SampleRow(SamplingParams(temperature=1.0), 7, position, None)
            for position in range(6000)]
    tokens = [d.token for d in sample(logits.expand(6000, -1).clone(), rows)]
    freq = torch.bincount(torch.tensor(tokens), minlength=5) / 6000
    assert (freq - want).abs().max() < 0.025, (freq, want)
    alone = [d.token for d in sample(logits[None].clone(), [rows[123]])]
    assert alone == [tokens[123]]
    assert uniform(7, 123) != uniform(8, 123) and uniform(7, 123) != uniform(7, 124)
    assert all(0 < uniform(seed, p) < 1 for seed in (0, 2**63 - 1) for p in (0, 10**6))


def test_cancel_frees_blocks_and_slot_at_once(core):
    core.add_request(greedy_request(PROMPT, "all-r16-rslora", 100), "c")
    core.step()
    core.step()
    assert core.kv.allocator.num_free < core.kv.num_blocks
    out = core.abort("c")
    assert out.finished and out.finish_reason == "cancelled"
    assert core.kv.allocator.num_free == core.kv.num_blocks
    assert all(refs == 0 for refs in core.slots.refs)
    assert not core.has_work()


def test_replacing_an_adapter_keeps_running_requests_on_their_version(tiny_model_dir,
                                                                      tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=4, max_rank=64)
    old = run_to_completion(core, {0: [("r", greedy_request(PROMPT, "all-r8", 8))]})["r"][0]
    new_files = read_adapter_files(tiny_adapter_dirs["qkvo-r64"], "all-r8")
    new = run_to_completion(core, {0: [("r", greedy_request(PROMPT, "qkvo-r64", 8))]})["r"][0]

    results = {"running": [], "after": []}
    def collect(outputs):
        for out in outputs:
            results[out.request_id] += out.new_token_ids

    core.add_request(greedy_request(PROMPT, "all-r8", 8), "running")
    for _ in range(3):
        collect(core.step())
    core.registry.register("all-r8", *new_files)  # replaced while "running" decodes
    core.add_request(greedy_request(PROMPT, "all-r8", 8), "after")
    while core.has_work():
        collect(core.step())
    assert results["running"] == old
    assert results["after"] == new


def test_removed_adapter_is_unknown_to_new_requests(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=4, max_rank=64)
    core.registry.delete("attn-r4")
    with pytest.raises(UnknownAdapterError):
        core.add_request(greedy_request(PROMPT, "attn-r4", 4))


@pytest.mark.parametrize("request_", [
    GenerationRequest(),
    GenerationRequest(prompt_token_ids=[1, 512]),
    GenerationRequest(prompt="x", params=SamplingParams(max_new_tokens=0)),
    GenerationRequest(prompt="x", params=SamplingParams(temperature=-1)),
    GenerationRequest(prompt="x", params=SamplingParams(top_p=0)),
    GenerationRequest(prompt="x", params=SamplingParams(repetition_penalty=0)),
    GenerationRequest(prompt="x", params=SamplingParams(stop=[""])),
    GenerationRequest(prompt="x", params=SamplingParams(max_new_tokens=10**6)),
])
def test_invalid_requests_are_rejected_before_they_run(core, request_):
    with pytest.raises(InvalidRequest):
        core.add_request(request_)
    assert not core.has_work()
