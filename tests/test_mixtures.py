"""Weighted mixtures of adapters equal PEFT's `add_weighted_adapter` (peft 0.21), in any batch.

For each combination type the engine serves (`linear`, `ties`, `svd` merged into one slot; `cat`
as its components' slots with weights; one adapter alone, which PEFT turns into `linear`), the
engine's logits match a PeftModel holding the components and the merged adapter made by PEFT
itself, within 1e-4 relative in fp32, and greedy generations are identical: each mixture alone,
and all of them in one batch with plain adapters and the base model. Also: which mixtures are
refused and why, merged adapters cached in host RAM and retired with their components, `cat`
sharing its components' device slots, and every block, slot and lease returned at the end.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_registry.mixtures import AdapterMix, MixtureError
from adapters_registry.store import UnknownAdapterError
from server.engine.admission import FairQueue
from server.engine.core import GenerationRequest
from server.engine.sampler import SamplingParams
from server.errors import InvalidRequest
from tests.conftest import write_peft_adapter
from tests.engine_helpers import (greedy_request, make_core, peft_greedy, record_logits,
                                  run_to_completion)

NEW_TOKENS = 6
PROMPTS = [[1, 45, 300, 12, 99, 7, 401, 250, 33], [1, 17, 3, 200]]
TOLERANCE = 1e-4  # fp32 on both sides: the same arithmetic in another order

MIXES = {
    # negative weight, partly overlapping targets, equal ranks
    "linear": AdapterMix(("all-r8", "mlp-q-r8"), (0.7, -0.4), "linear"),
    "ties": AdapterMix(("all-r8", "mlp-q-r8"), (0.6, 0.8), "ties", density=0.5),
    # different ranks and scales (rsLoRA on the second)
    "svd": AdapterMix(("attn-r4", "all-r16-rslora"), (1.0, 0.5), "svd"),
    "cat": AdapterMix(("attn-r4", "all-r8", "all-r16-rslora"), (0.8, -0.5, 0.3), "cat"),
    # one adapter: PEFT makes it linear; the merged adapter keeps the first's rsLoRA (scale √r)
    "single": AdapterMix(("all-r16-rslora",), (0.5,), "cat"),
}
PLAIN = [None, "attn-r4", "all-r8"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_adapter_dirs, tiny_model_dir, tmp_path_factory):
    extra = tmp_path_factory.mktemp("mix-adapters") / "mlp-q-r8"
    write_peft_adapter(extra, base_model_dir=tiny_model_dir, seed=41, r=8, lora_alpha=8,
                       target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])
    dirs = {name: tiny_adapter_dirs[name] for name in ("attn-r4", "all-r8", "all-r16-rslora")}
    return {**dirs, "mlp-q-r8": extra}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dirs):
    """PEFT's greedy tokens and logits per (case, prompt index); a case is a mixture's id or a
    plain adapter's name (None: the base)."""
    from peft import PeftModel

    results = {}
    for case in [*MIXES, *PLAIN]:
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model = base.eval()
        if case in MIXES:
            model = _peft_mixture(base, adapter_dirs, MIXES[case])
        elif case is not None:
            model = PeftModel.from_pretrained(base, str(adapter_dirs[case])).eval()
        for index, prompt in enumerate(PROMPTS):
            results[(case, index)] = peft_greedy(model, prompt, NEW_TOKENS)
    return results


def _peft_mixture(base, adapter_dirs, mix: AdapterMix):
    from peft import PeftModel

    first, *others = mix.adapters
    model = PeftModel.from_pretrained(base, str(adapter_dirs[first]), adapter_name=first)
    for name in others:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    model.add_weighted_adapter(list(mix.adapters), list(mix.weights), "mix",
                               combination_type=mix.combination, density=mix.density)
    model.set_adapter("mix")
    return model.eval()


@pytest.fixture(scope="module")
def core(tiny_model_dir, adapter_dirs):
    return make_core(tiny_model_dir, adapter_dirs, max_slots=6, max_rank=64)


def _request(case, index) -> GenerationRequest:
    if case in MIXES:
        return GenerationRequest(prompt_token_ids=list(PROMPTS[index]), mixture=MIXES[case],
                                 params=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return greedy_request(PROMPTS[index], case, NEW_TOKENS)


def _assert_matches(results, logits, reference, cases):
    for case, index in cases:
        request_id = f"{case}/{index}"
        want_tokens, want_rows = reference[(case, index)]
        assert results[request_id][0] == want_tokens, request_id
        for step, (got, want) in enumerate(zip(logits[request_id], want_rows, strict=True)):
            error = float((got - want).abs().max() / want.abs().max())
            assert error <= TOLERANCE, f"{request_id} step {step}: relative error {error:.2e}"


def _assert_all_returned(core):
    """Every KV block free, every slot and host-cache entry unreferenced."""
    allocator = core.kv.allocator
    assert allocator.num_free == core.kv.num_blocks
    assert not any(core.slots.refs)
    assert all(state.refs == 0 for state in core.registry.resident().values())


def test_mixtures_change_the_output(reference):
    """Guards the test: each mixture differs from the base and from each of its components."""
    for case, mix in MIXES.items():
        rows = reference[(case, 0)][1][0]
        for other in [None, *mix.adapters]:
            if other in PLAIN:
                assert float((rows - reference[(other, 0)][1][0]).abs().max()) > 1e-2, case


@pytest.mark.parametrize("case", list(MIXES))
def test_each_mixture_alone_matches_peft(core, reference, case):
    logits = record_logits(core)
    cases = [(case, index) for index in range(len(PROMPTS))]
    for case, index in cases:
        results = run_to_completion(core, {0: [(f"{case}/{index}", _request(case, index))]})
        _assert_matches(results, logits, reference, [(case, index)])
    _assert_all_returned(core)


def test_mixtures_plain_adapters_and_base_in_one_batch_match_peft(core, reference):
    logits = record_logits(core)
    cases = [(case, index) for case in [*MIXES, *PLAIN] for index in range(len(PROMPTS))]
    submissions = {}
    for n, (case, index) in enumerate(cases):  # some join while others decode
        submissions.setdefault(n % 3, []).append((f"{case}/{index}", _request(case, index)))
    results = run_to_completion(core, submissions)
    _assert_matches(results, logits, reference, cases)
    _assert_all_returned(core)


def test_mixtures_survive_preemption_and_chunked_prefill(tiny_model_dir, adapter_dirs,
                                                         reference):
    """A tiny KV cache (blocks of 4 tokens): sequences wait, are preempted and recomputed, and
    prompts are prefilled in chunks; a cat mixture gives back all its slots each time."""
    core = make_core(tiny_model_dir, adapter_dirs, max_slots=6, max_rank=64, kv_block_size=4,
                     kv_cache_mb=0.03, max_step_tokens=8,
                     max_batch_size=8)
    logits = record_logits(core)
    cases = [(case, index) for case in ("cat", "linear", "all-r8", None)
             for index in range(len(PROMPTS))]
    results = run_to_completion(core, {0: [(f"{c}/{i}", _request(c, i)) for c, i in cases]})
    assert core.scheduler.preemptions > 0  # guards the test
    _assert_matches(results, logits, reference, cases)
    _assert_all_returned(core)


@pytest.mark.parametrize("kernels", [dict(lora_kernel="torch"),
                                     dict(lora_kernel="triton", attention_kernel="triton")],
                         ids=["pytorch-op", "cuda-kernels"])
def test_mixtures_match_peft_on_the_other_lora_paths(tiny_model_dir, adapter_dirs, reference,
                                                     kernels):
    """The PyTorch op (no kernel), and the kernels a CUDA device gets, run here in Triton's
    interpreter on CPU tensors: a cat and a linear mixture beside a plain adapter."""
    core = make_core(tiny_model_dir, adapter_dirs, max_slots=6, max_rank=64, **kernels)
    logits = record_logits(core)
    cases = [("cat", 1), ("linear", 1), ("all-r8", 1)]
    results = run_to_completion(core, {0: [(f"{c}/{i}", _request(c, i)) for c, i in cases]})
    _assert_matches(results, logits, reference, cases)


def test_cat_runs_in_its_components_slots_and_merged_mixtures_in_one(core):
    run_to_completion(core, {0: [("cat", _request("cat", 0)), ("linear", _request("linear", 0))]})
    names = {key.name for key in core.slots.slot_of}
    assert {"attn-r4", "all-r8", "all-r16-rslora"} <= names  # cat: its components
    assert MIXES["linear"].label in names  # linear: its merged adapter
    assert MIXES["cat"].label not in names


def test_merged_adapters_are_cached_in_host_ram_and_retired_with_a_component(
        tiny_model_dir, adapter_dirs, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, adapter_dirs, max_slots=4, max_rank=64)
    registry = core.registry
    mix = MIXES["linear"]
    first = run_to_completion(core, {0: [("a", _request("linear", 0))]})
    run_to_completion(core, {0: [("b", _request("linear", 0))]})
    assert registry.merges == 1  # the second request found it in host RAM
    merged = [key for key in registry.resident() if key.name == mix.label]
    assert len(merged) == 1
    entry = registry.resident()[merged[0]]
    assert entry.nbytes > 0
    assert registry.cache.used_bytes >= entry.nbytes  # counted against the host cache

    # all-r8 is replaced (new content): the merged adapter of its old version is stale
    registry.register("all-r8", *_files(adapter_dirs["mlp-q-r8"]))
    assert not any(key.name == mix.label for key in registry.resident())  # retired at once
    again = run_to_completion(core, {0: [("c", _request("linear", 0))]})
    assert registry.merges == 2
    assert again["c"][0] != first["a"][0]
    [current] = [key for key in registry.resident() if key.name == mix.label]
    assert current.parts[0] == registry.current_key("all-r8")
    core.step()  # the stale merged slot is retired at the next step
    assert [key for key in core.slots.slot_of if key.name == mix.label] == [current]
    _assert_all_returned(core)


def _files(directory):
    return ((directory / "adapter_config.json").read_bytes(),
            (directory / "adapter_model.safetensors").read_bytes())


@pytest.mark.parametrize("mix, message", [
    (AdapterMix(("attn-r4", "all-r8"), (1, 1), "linear"), "one rank"),
    (AdapterMix(("attn-r4", "all-r8"), (1, 1), "ties", density=0.5), "one rank"),
    (AdapterMix(("all-r8", "mlp-q-r8"), (1, 1), "ties"), "density"),
    (AdapterMix(("all-r8", "mlp-q-r8"), (1, 1), "linear", density=0.5), "ties only"),
    (AdapterMix(("all-r8", "mlp-q-r8"), (1, math.inf), "linear"), "finite"),
    (AdapterMix(("all-r8", "mlp-q-r8"), (1, math.nan), "cat"), "finite"),
    (AdapterMix(("all-r8", "all-r8"), (1, 1), "cat"), "once"),
    (AdapterMix(("all-r8",) * 5, (1,) * 5, "cat"), "1 to 4"),
    (AdapterMix(("all-r8", "mlp-q-r8"), (1,), "cat"), "one weight per adapter"),
    (AdapterMix(("all-r8", "mlp-q-r8"), (1, 1), "dare_ties"), "not one of"),
])
def test_mixtures_that_cannot_be_served_are_refused(core, mix, message):
    with pytest.raises(MixtureError, match=message):
        core.add_request(_mix_request(mix))
    assert not core.has_work()
    _assert_all_returned(core)


def test_a_cat_mixture_needs_a_device_slot_per_component(tiny_model_dir, adapter_dirs):
    core = make_core(tiny_model_dir, adapter_dirs, max_slots=3, max_rank=64)
    mix = AdapterMix(("attn-r4", "all-r8", "all-r16-rslora", "mlp-q-r8"), (1, 1, 1, 1), "cat")
    with pytest.raises(MixtureError, match="needs as many device slots"):
        core.add_request(_mix_request(mix))
    three = AdapterMix(mix.adapters[:3], mix.weights[:3], "cat")
    run_to_completion(core, {0: [("three", _mix_request(three)), ("plain", greedy_request(
        PROMPTS[0], "mlp-q-r8"))]})  # the plain request waits for a free slot
    _assert_all_returned(core)


def test_dora_and_vocabulary_adapters_are_refused_in_mixtures(
        tiny_model_dir, tiny_adapter_dirs, tiny_dora_adapter_dirs, tiny_vocab_adapter_dirs):
    dirs = {"all-r8": tiny_adapter_dirs["all-r8"],
            "dora-all-r8": tiny_dora_adapter_dirs["dora-all-r8"],
            "head-r8": tiny_vocab_adapter_dirs["head-r8"]}
    core = make_core(tiny_model_dir, dirs, max_slots=4, max_rank=64)
    for other, message in (("dora-all-r8", "DoRA"), ("head-r8", "vocabulary")):
        for combination in ("linear", "cat"):
            mix = AdapterMix(("all-r8", other), (0.5, 0.5), combination)
            with pytest.raises(MixtureError, match=message):
                core.add_request(_mix_request(mix))
    _assert_all_returned(core)


def test_unknown_adapters_and_an_adapter_with_a_mixture_are_refused(core):
    with pytest.raises(UnknownAdapterError, match="nope"):
        core.add_request(_mix_request(AdapterMix(("all-r8", "nope"), (1, 1), "cat")))
    request = _mix_request(MIXES["linear"])
    request.adapter_id = "all-r8"
    with pytest.raises(InvalidRequest, match="not both"):
        core.add_request(request)
    _assert_all_returned(core)


def _mix_request(mix: AdapterMix) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=[1, 2, 3], mixture=mix,
                             params=SamplingParams(max_new_tokens=2))


class _Seq:
    def __init__(self, mixture):
        self.mixture, self.adapter = mixture, None


def test_fair_admission_charges_a_mixtures_tokens_to_its_components_by_weight():
    queue = FairQueue()
    queue.charge(_Seq(AdapterMix(("json", "pirate"), (3.0, -1.0), "linear")), 100)
    assert queue.counters == pytest.approx({"json": 75.0, "pirate": 25.0})
    assert MIXES["cat"].primary == "attn-r4"
    assert AdapterMix(("json", "pirate"), (0.2, -0.6)).primary == "pirate"
