"""The prefix cache: KV blocks computed under one adapter version, shared with later sequences
that start the same way under the same version, and never under another.

The outputs with the cache equal the outputs without it (greedy tokens identical, logits within
fp32 tolerance) across adapters, multi-turn conversations, chunked prefill, preemption and
eviction; every block goes back to the pool.
"""

from __future__ import annotations

import pytest

from adapters_registry.host_cache import AdapterKey
from adapters_registry.peft_format import read_adapter_files
from server.engine.kv_cache import BlockAllocator, block_hashes
from tests.engine_helpers import greedy_request, make_core, record_logits, run_to_completion

ADAPTERS = [None, "attn-r4", "all-r8", "all-r16-rslora"]
SYSTEM = [1] + [(7 * j) % 400 + 3 for j in range(45)]  # a shared "system prompt", 46 tokens
LOGITS_RTOL = 1e-4  # fp32: a shorter prefill does the same arithmetic in other shapes


def _question(i: int) -> list[int]:
    return [(31 * i + 11 * j) % 400 + 3 for j in range(5 + i % 4)]


def _conversations() -> list[tuple[str, list[int], str | None]]:
    """(request id, prompt, adapter): each adapter asked two questions after the same system
    prompt, then a second turn that repeats a whole first turn."""
    first = [(f"{adapter}-q{i}", SYSTEM + _question(i), adapter)
             for i, adapter in enumerate(ADAPTERS * 2)]
    again = [(f"{adapter}-turn2", SYSTEM + _question(0) + [9, 8, 7] + _question(5), adapter)
             for adapter in ADAPTERS]
    return first + again


def _run(core, one_at_a_time: bool):
    """Runs the conversations (one after another, or all at once) -> (results, logits)."""
    logits = record_logits(core)
    requests = [(rid, greedy_request(prompt, adapter, max_new_tokens=6))
                for rid, prompt, adapter in _conversations()]
    if one_at_a_time:
        results = {}
        for rid, request in requests:
            results.update(run_to_completion(core, {0: [(rid, request)]}))
    else:
        results = run_to_completion(core, {0: requests})
    return results, logits


@pytest.fixture(scope="module")
def without_cache(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, prefix_cache=False)
    results, logits = _run(core, one_at_a_time=True)
    assert core.scheduler.prefix_hit_tokens == 0 and core.kv.allocator.num_cached == 0
    return results, logits


def _assert_same(results, logits, expected):
    expected_results, expected_logits = expected
    assert {r: v[0] for r, v in results.items()} == {r: v[0] for r, v in expected_results.items()}
    for rid, rows in expected_logits.items():
        for got, want in zip(logits[rid], rows):
            error = (got - want).abs().max() / want.abs().max()
            assert error <= LOGITS_RTOL, f"{rid}: logits differ by {error:.2e} (relative)"


def _assert_no_leak(core):
    allocator = core.kv.allocator
    assert allocator.num_free == core.kv.num_blocks, "KV blocks leaked"
    assert all(refs == 0 for refs in allocator._refs), "block references leaked"


@pytest.mark.parametrize("constraint", [
    dict(),
    dict(kv_block_size=4),
    dict(kv_block_size=4, max_step_tokens=8, max_batch_size=4),  # chunked prefill, shared blocks
], ids=["blocks-16", "blocks-4", "chunked-prefill"])
def test_one_after_another_equals_no_cache_and_hits(constraint, without_cache, tiny_model_dir,
                                                    tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, **constraint)
    results, logits = _run(core, one_at_a_time=True)
    _assert_same(results, logits, without_cache)
    block = core.kv.block_size
    # Each adapter's second question reuses the system prompt's full blocks; its second turn,
    # the whole first turn's (prompt and answer) full blocks.
    assert core.scheduler.prefix_hit_tokens >= len(ADAPTERS) * (len(SYSTEM) // block) * block
    _assert_no_leak(core)


def test_blocks_are_never_shared_across_adapters(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, kv_block_size=4)
    cached = {}
    for adapter in ADAPTERS + ADAPTERS:
        request = greedy_request(SYSTEM + [5], adapter, max_new_tokens=2)
        core.add_request(request, "r")
        while core.has_work():
            for out in core.step():
                if out.finished:
                    cached.setdefault(adapter, []).append(out.cached_tokens)
    # The first request of each adapter finds nothing, although the same tokens were computed
    # under the others; the second finds every full block but the one with the last token.
    assert all(first == 0 for first, _ in cached.values())
    assert all(second == 44 for _, second in cached.values())  # 11 blocks of the 47 tokens
    _assert_no_leak(core)


@pytest.mark.parametrize("constraint", [
    dict(kv_block_size=4, kv_cache_mb=0.125),  # waits, preemptions and evictions
    dict(kv_block_size=4, max_batch_size=3),
], ids=["tiny-kv-cache", "small-batches"])
def test_all_at_once_equals_no_cache(constraint, without_cache, tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, **constraint)
    results, logits = _run(core, one_at_a_time=False)
    _assert_same(results, logits, without_cache)
    assert core.scheduler.prefix_hit_tokens > 0
    _assert_no_leak(core)


def test_the_tiny_cache_preempts_and_evicts(tiny_model_dir, tiny_adapter_dirs):
    """Guards the scenario above: the small cache does preempt and reclaim cached blocks."""
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, kv_block_size=4,
                     kv_cache_mb=0.125)
    _run(core, one_at_a_time=False)
    assert core.scheduler.preemptions > 0
    assert core.kv.allocator.evictions > 0


def test_a_replaced_adapter_never_reuses_the_old_versions_blocks(tiny_model_dir,
                                                                 tiny_adapter_dirs):
    core = make_core(tiny_model_dir, {}, max_rank=64, kv_block_size=4)
    fresh = make_core(tiny_model_dir, {}, max_rank=64, kv_block_size=4, prefix_cache=False)
    old = read_adapter_files(tiny_adapter_dirs["attn-r4"], "x")
    new = read_adapter_files(tiny_adapter_dirs["all-r8"], "x")
    core.registry.register("x", *old)
    fresh.registry.register("x", *new)
    prompt = SYSTEM + [5, 6]

    # v1 computes the prompt; then, while a v1 request still runs, x is replaced by v2.
    run_to_completion(core, {0: [("v1-a", greedy_request(prompt, "x", 4))]})
    core.add_request(greedy_request(prompt, "x", max_new_tokens=20), "v1-running")
    core.step()
    core.registry.register("x", *new)
    core.add_request(greedy_request(prompt, "x", max_new_tokens=8), "v2")
    outputs = {}
    while core.has_work():
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert outputs["v1-running"][-1].cached_tokens > 0  # v1's own blocks, before the change
    assert outputs["v2"][-1].cached_tokens == 0
    v2_tokens = [t for out in outputs["v2"] for t in out.new_token_ids]
    expected = run_to_completion(fresh, {0: [("v2", greedy_request(prompt, "x", 8))]})
    assert v2_tokens == expected["v2"][0]
    _assert_no_leak(core)


def test_cached_tokens_are_reported_per_request(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, kv_block_size=16)
    reports = []
    for rid in ("first", "second"):
        core.add_request(greedy_request(SYSTEM + [5], "all-r8", max_new_tokens=2), rid)
        while core.has_work():
            reports += [out.cached_tokens for out in core.step() if out.finished]
    assert reports == [0, 32]  # two full blocks of 16 of the 47-token prompt
    stats = core.stats()
    assert stats.prefix_hit_tokens == 32 and stats.prefix_queried_tokens == 2 * 47
    assert stats.kv_blocks_cached > 0 and stats.kv_blocks_free == stats.kv_blocks


# ---- the block pool alone -----------------------------------------------------------------------

KEY = AdapterKey("a", 1, "digest")


def _hashes(tokens, adapter=KEY):
    return block_hashes(tokens, 4, adapter, [])


def test_hashes_chain_over_blocks_and_depend_on_the_adapter_version():
    tokens = list(range(10))
    hashes = _hashes(tokens)
    assert len(hashes) == 2  # full blocks only
    assert block_hashes(tokens, 4, KEY, hashes[:1]) == hashes  # computed on from known ones
    assert _hashes([0, 1, 2, 3] + [9, 9, 9, 9])[0] == hashes[0]
    assert _hashes([9, 1, 2, 3, 4, 5, 6, 7])[1] != hashes[1]  # the chain carries the prefix
    for other in (None, AdapterKey("a", 2, "digest"), AdapterKey("a", 1, "other"),
                  AdapterKey("b", 1, "digest")):
        assert set(_hashes(tokens, other)).isdisjoint(hashes)


def test_shared_blocks_are_reference_counted_and_kept_when_unused():
    pool = BlockAllocator(4)
    first = pool.allocate(2)
    hashes = _hashes(list(range(8)))
    for block, h in zip(first, hashes):
        pool.register(block, h, KEY)
    assert pool.cached_prefix(hashes) == first
    pool.take(first)  # a second sequence shares them
    pool.free(first)
    assert pool.num_free == 2 and pool.num_cached == 0  # still used by the second
    pool.free(first)
    assert pool.num_free == 4 and pool.num_cached == 2  # unused, kept, and counted free
    assert pool.unused(first) == 2
    assert pool.cached_prefix(hashes) == first


def test_allocation_reclaims_cached_blocks_least_recent_first_table_tails_first():
    pool = BlockAllocator(4)
    blocks = pool.allocate(4)
    hashes = _hashes(list(range(16)))
    for block, h in zip(blocks, hashes):
        pool.register(block, h, KEY)
    pool.free(blocks)
    assert pool.allocate(1) == [blocks[3]]  # the table's tail goes first
    assert pool.evictions == 1
    assert pool.cached_prefix(hashes) == blocks[:3]


def test_a_forgotten_adapters_blocks_are_freed_or_unhashed():
    pool = BlockAllocator(4)
    kept, used = pool.allocate(1), pool.allocate(1)
    h = _hashes(list(range(8)))
    pool.register(kept[0], h[0], KEY)
    pool.register(used[0], h[1], KEY)
    pool.free(kept)
    pool.forget_adapter(lambda key: key.name == "a")
    assert pool.cached_prefix(h) == [] and pool.num_cached == 0 and pool.num_free == 3
    pool.free(used)
    assert pool.num_free == 4 and pool.num_cached == 0


def test_a_hash_computed_twice_keeps_the_first_block():
    pool = BlockAllocator(2)
    a, b = pool.allocate(2)
    h = _hashes(list(range(4)))[0]
    pool.register(a, h, KEY)
    pool.register(b, h, KEY)
    pool.free([a, b])
    assert pool.cached_prefix([h]) == [a] and pool.num_cached == 1


def test_no_prefix_cache_keeps_nothing(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, max_rank=64, prefix_cache=False)
    for rid in ("a", "b"):
        run_to_completion(core, {0: [(rid, greedy_request(SYSTEM + [5], None, 2))]})
    assert core.stats().prefix_hit_tokens == 0 and core.kv.allocator.num_cached == 0
    assert core.kv.allocator.num_free == core.kv.num_blocks
