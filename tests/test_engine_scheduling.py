"""Continuous batching under pressure: outputs never depend on what else shares the batch.

Each scenario runs requests alone first, then together under a constraint (few adapter slots, a
small KV cache that forces waiting and preemption, a small step token budget that forces chunked
prefill, arrivals while others run) and asserts the tokens are identical.
"""

from __future__ import annotations

import pytest

from tests.engine_helpers import greedy_request, make_core, run_to_completion

ADAPTERS = [None, "attn-r4", "all-r8", "all-r16-rslora", "qkvo-r64"]


def _requests(n=10, new_tokens=12):
    """n requests cycling over the adapters, with prompts of different lengths."""
    return {f"q{i}": greedy_request([1] + [(37 * i + 5 * j) % 500 + 5 for j in range(3 + 4 * i)],
                                    ADAPTERS[i % len(ADAPTERS)], new_tokens)
            for i in range(n)}


@pytest.fixture(scope="module")
def alone(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=4, max_rank=64)
    return {rid: run_to_completion(core, {0: [(rid, req)]})[rid]
            for rid, req in _requests().items()}


@pytest.mark.parametrize("constraint", [
    dict(max_slots=1),  # adapters queue for the one slot; base requests run beside them
    dict(max_slots=2, kv_cache_mb=0.125, kv_block_size=4),  # waits and preemptions
    dict(max_slots=4, max_step_tokens=8, max_batch_size=4),  # chunked prefill, small batches
], ids=["one-slot", "tiny-kv-cache", "chunked-prefill"])
def test_batched_runs_equal_solo_runs(constraint, alone, tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, **constraint)
    requests = list(_requests().items())
    submissions = {step: requests[2 * step:2 * step + 2] for step in range(len(requests) // 2)}
    results = run_to_completion(core, submissions)
    assert {rid: r[0] for rid, r in results.items()} == {rid: r[0] for rid, r in alone.items()}
    assert core.kv.allocator.num_free == core.kv.num_blocks, "blocks leaked"
    assert all(refs == 0 for refs in core.slots.refs), "slot references leaked"


def test_tiny_kv_cache_actually_preempts(tiny_model_dir, tiny_adapter_dirs):
    """Guards the scenario above: the small cache does force preemptions."""
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, max_slots=2,
                     kv_cache_mb=0.125, kv_block_size=4)
    run_to_completion(core, {0: list(_requests().items())})
    assert core.scheduler.preemptions > 0


def test_more_adapters_than_slots_wait_instead_of_failing(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, max_slots=1)
    results = run_to_completion(core, {0: list(_requests().items())})
    assert all(reason == "length" for _, _, reason in results.values())
    assert core.slots.loads >= 4 and core.slots.evictions >= 3
