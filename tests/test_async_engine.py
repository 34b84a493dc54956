"""The asyncio Engine: the Python API the servers call, over the core on its own thread."""

from __future__ import annotations

import asyncio

import pytest

from adapters_registry.peft_format import read_adapter_files
from adapters_registry.store import UnknownAdapterError
from server.engine.async_engine import Engine
from tests.engine_helpers import greedy_request, make_core, run_to_completion

REQUESTS = [([1, 20, 21, 22], None), ([1, 5, 6], "attn-r4"), ([1] + list(range(40, 70)), "all-r8"),
            ([1, 9], "qkvo-r64"), ([1, 11, 12, 13, 14], "all-r8")]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dirs):
    engine = Engine(make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=2, max_rank=64))
    yield engine
    engine.close()


def test_concurrent_generate_equals_solo_runs(engine, tiny_model_dir, tiny_adapter_dirs):
    reference = make_core(tiny_model_dir, tiny_adapter_dirs, max_slots=2, max_rank=64)
    want = [run_to_completion(reference, {0: [("r", greedy_request(p, a, 10))]})["r"][0]
            for p, a in REQUESTS]

    async def all_at_once():
        return await asyncio.gather(*(engine.generate(greedy_request(p, a, 10))
                                      for p, a in REQUESTS))

    results = asyncio.run(all_at_once())
    assert [r.token_ids for r in results] == want
    assert all(r.finish_reason == "length" and r.completion_tokens == 10 for r in results)


def test_validation_errors_reach_the_caller(engine):
    with pytest.raises(UnknownAdapterError):
        asyncio.run(engine.generate(greedy_request([1, 2], "missing", 3)))


def test_cancelling_a_stream_ends_it_within_a_few_steps_and_frees_its_blocks_and_slot(engine):
    core = engine.core
    limit = core.max_model_len - 3  # to the context limit, EOS ignored: thousands of steps
    request = greedy_request([1, 2, 3], "all-r8", limit)

    async def cancel_after_two_tokens() -> int:
        async def consume():
            async for _ in engine.stream(request):
                seen.append(1)
                if len(seen) == 2:
                    started.set()
        seen, started = [], asyncio.Event()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        at_cancel = engine.stats.steps
        while engine.stats.running:  # freed at a step boundary
            assert engine.stats.steps - at_cancel <= limit // 10, "still running after cancel"
            await asyncio.sleep(0.001)
        return engine.stats.steps - at_cancel

    asyncio.run(cancel_after_two_tokens())
    assert not core.scheduler.running and not core.scheduler.waiting
    assert core.kv.allocator.num_free == core.kv.num_blocks
    assert all(refs == 0 for refs in core.slots.refs)


def test_adapters_can_be_added_and_removed_from_another_thread(engine, tiny_adapter_dirs):
    engine.registry.register("late", *read_adapter_files(tiny_adapter_dirs["attn-r4"], "late"))
    result = asyncio.run(engine.generate(greedy_request([1, 5, 6], "late", 4)))
    same = asyncio.run(engine.generate(greedy_request([1, 5, 6], "attn-r4", 4)))
    assert result.token_ids == same.token_ids
    engine.registry.delete("late")
    with pytest.raises(UnknownAdapterError):
        asyncio.run(engine.generate(greedy_request([1, 5, 6], "late", 4)))
