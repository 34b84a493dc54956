"""The engine serving adapters from the registry: leases, cold loads off the step loop, and
replace / delete while requests run, on the real tiny model."""

from __future__ import annotations

import asyncio
import threading

import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters_registry.registry import AdapterRegistry
from adapters_registry.store import AdapterStore, UnknownAdapterError
from server.engine.async_engine import Engine
from tests.engine_helpers import greedy_request, make_core, run_to_completion

PROMPT = [1, 7, 8, 9]
TOKENS = 12


@pytest.fixture(scope="module")
def versions(tiny_adapter_dirs):
    """Two contents of one adapter: v1 as PEFT wrote it, v2 with every lora_B negated."""
    d = tiny_adapter_dirs["all-r8"]
    config, weights = (d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes()
    negated = save_safetensors({k: -t if "lora_B" in k else t
                                for k, t in load_safetensors(weights).items()})
    return {1: (config, weights), 2: (config, negated)}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, versions):
    """Greedy tokens of PROMPT on each version, from a core that holds the adapter resident."""
    core = make_core(tiny_model_dir, {})
    out = {}
    for version, files in versions.items():
        core.registry.register("a", *files)
        out[version] = run_to_completion(core, {0: [("r", greedy_request(PROMPT, "a", TOKENS))]})[
            "r"][0]
    assert out[1] != out[2]
    return out


@pytest.fixture
def served(tiny_model_dir, tmp_path, versions):
    """(engine, registry) with adapter "a" registered at version 1."""
    store = AdapterStore(tmp_path / "store")

    def open_registry(spec):
        return AdapterRegistry(store, spec, max_rank=64, cache_bytes=2**24)

    core = make_core(tiny_model_dir, {}, max_slots=2, registry=open_registry)
    registry = core.registry
    registry.register("a", *versions[1])
    engine = Engine(core)
    yield engine, registry
    engine.close()
    registry.close()
    store.close()


def slot_versions(engine: Engine) -> dict[int, str]:
    return {slot: f"{key.name}@{key.version}" for key, slot in engine.core.slots.slot_of.items()}


async def first_token_then(engine: Engine, action):
    """Starts a request for "a", runs `action()` after its first token; returns its tokens."""
    tokens = []
    async for out in engine.stream(greedy_request(PROMPT, "a", TOKENS)):
        if not tokens:
            await asyncio.to_thread(action)
        tokens += out.new_token_ids
    return tokens


def test_registry_adapters_serve_the_same_tokens_as_resident_ones(served, reference):
    engine, registry = served
    result = asyncio.run(engine.generate(greedy_request(PROMPT, "a", TOKENS)))
    assert result.token_ids == reference[1]
    assert {f"{k.name}@{k.version}": s.refs for k, s in registry.resident().items()} == {"a@1": 0}


def test_replace_while_running(served, versions, reference):
    engine, registry = served

    async def scenario():
        running = asyncio.create_task(first_token_then(
            engine, lambda: registry.register("a", *versions[2])))
        old_tokens = await running
        new = await engine.generate(greedy_request(PROMPT, "a", TOKENS))
        return old_tokens, new.token_ids

    old_tokens, new_tokens = asyncio.run(scenario())
    assert old_tokens == reference[1]  # finished on the version it started with
    assert new_tokens == reference[2]  # the next request got the new version
    assert {f"{k.name}@{k.version}" for k in registry.resident()} == {"a@2"}
    assert sorted(slot_versions(engine).values()) == ["a@2"]  # v1's slot was freed


def test_delete_while_running(served, reference):
    engine, registry = served
    refused = []

    def delete_then_request():
        registry.delete("a")
        with pytest.raises(UnknownAdapterError):
            asyncio.run(engine.generate(greedy_request(PROMPT, "a", TOKENS)))
        refused.append(True)

    tokens = asyncio.run(first_token_then(engine, delete_then_request))
    assert refused and tokens == reference[1]
    assert registry.resident() == {}  # both copies freed when the last request ended
    assert slot_versions(engine) == {}
    assert all(refs == 0 for refs in engine.core.slots.refs)


def test_a_cold_load_does_not_stall_other_requests(served):
    engine, registry = served
    gate = threading.Event()
    original = registry.store.open_files

    def slow_open(*args, **kwargs):
        assert gate.wait(30)
        return original(*args, **kwargs)

    registry.store.open_files = slow_open

    async def scenario():
        cold = asyncio.create_task(engine.generate(greedy_request(PROMPT, "a", 2)))
        base = await engine.generate(greedy_request([1, 2, 3], None, 5))  # runs meanwhile
        assert not cold.done()
        gate.set()
        return base, await cold

    base, cold = asyncio.run(scenario())
    assert base.completion_tokens == 5 and cold.completion_tokens == 2


def test_a_request_cancelled_while_its_adapter_loads_leaks_nothing(served):
    engine, registry = served
    gate = threading.Event()
    original = registry.store.open_files
    registry.store.open_files = lambda *args, **kwargs: (gate.wait(30), original(*args, **kwargs))[1]

    async def scenario():
        task = asyncio.create_task(engine.generate(greedy_request(PROMPT, "a", 2)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        for _ in range(300):
            if registry.resident():
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert [s.refs for s in registry.resident().values()] == [0]


def test_an_embedding_and_lm_head_adapter_serves_from_the_registry(tiny_model_dir,
                                                                   tiny_vocab_adapter_dirs,
                                                                   tmp_path):
    """Registered and leased like any adapter, it serves the tokens a resident copy serves; a
    copy whose saved base embedding differs from the served one is refused, nothing stored."""
    from adapters_registry.peft_format import AdapterFormatError

    directory = tiny_vocab_adapter_dirs["embed-head-r16-rslora"]
    config, weights = (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes()
    resident = make_core(tiny_model_dir, {"v": directory})
    want = run_to_completion(resident, {0: [("r", greedy_request(PROMPT, "v", TOKENS))]})["r"][0]
    base = run_to_completion(resident, {0: [("r", greedy_request(PROMPT, None, TOKENS))]})["r"][0]
    assert want != base

    store = AdapterStore(tmp_path / "store")

    def open_registry(spec):
        return AdapterRegistry(store, spec, max_rank=64, cache_bytes=2**24)

    core = make_core(tiny_model_dir, {}, max_slots=2, registry=open_registry)
    registry = core.registry
    engine = Engine(core)
    try:
        registry.register("v", config, weights)
        result = asyncio.run(engine.generate(greedy_request(PROMPT, "v", TOKENS)))
        assert result.token_ids == want
        tensors = load_safetensors(weights)
        key = "base_model.model.model.embed_tokens.base_layer.weight"
        tensors[key] = tensors[key] * 2
        with pytest.raises(AdapterFormatError, match="differs from the served model's"):
            registry.register("other", config, save_safetensors(tensors))
        assert "other" not in store
    finally:
        engine.close()
        registry.close()
        store.close()
