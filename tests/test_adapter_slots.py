"""The device slot table: a write replaces everything a slot held, so an evicted or dropped slot
is reused without clearing it first; a version whose write failed is never handed out again."""

from __future__ import annotations

import torch

from adapters_registry.host_cache import AdapterKey
from server.engine.adapter_slots import AdapterSlots, Placement
from tests.engine_helpers import make_core


def slot_state(core, slot: int) -> dict:
    """Every table entry of `slot`, in every LoRA-wrapped module."""
    state = {}
    for key, layer in core.layers.linears.items():
        state[key] = (layer.lora_a[slot].clone(), layer.lora_b[slot].clone(),
                      float(layer.scale[slot]), int(layer.lora_rank[slot]),
                      _dora_factor(layer, slot), slot in layer._dora_slots)
    for name in ("embed_tokens", "lm_head"):
        lora = getattr(core.layers, name)._slots.get(slot)
        state[name] = None if lora is None else (lora.first, lora.second, lora.scale)
    return state


def _dora_factor(layer, slot: int) -> torch.Tensor:
    """The slot's DoRA factor g [out]; ones for plain LoRA (dora_g exists after a DoRA write)."""
    if layer.dora_g is None:
        return torch.ones(layer.out_features)
    return layer.dora_g[slot + 1].clone()


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for module in want:
        if want[module] is None or got[module] is None:
            assert got[module] is want[module] is None, module
            continue
        for a, b in zip(got[module], want[module]):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            assert same, f"{module} differs after a write over another adapter"


def test_a_write_over_any_adapter_equals_a_write_into_a_cleared_slot(
        tiny_model_dir, tiny_adapter_dirs, tiny_dora_adapter_dirs, tiny_vocab_adapter_dirs):
    adapters = {**tiny_adapter_dirs, **tiny_dora_adapter_dirs, **tiny_vocab_adapter_dirs}
    core = make_core(tiny_model_dir, adapters, max_rank=64, max_slots=2)
    leases = [core.registry.acquire(name).result() for name in adapters]
    weights = {lease.key.name: lease.weights for lease in leases}
    for name in adapters:
        core.layers.clear(1)
        core.layers.write(1, weights[name])
        fresh = slot_state(core, 1)
        for previous in adapters:  # ranks 4..64, DoRA, embed_tokens / lm_head, other targets
            core.layers.write(0, weights[previous])
            core.layers.write(0, weights[name])
            assert_same_state(slot_state(core, 0), fresh)


def key(name: str) -> AdapterKey:
    return AdapterKey(name, 1, name)


def test_eviction_reuses_the_least_recently_used_idle_slot_and_asks_for_a_write():
    slots = AdapterSlots(2)
    for name in ("a", "b"):
        assert slots.acquire(key(name)).needs_write
        slots.release(key(name))
    assert slots.acquire(key("a")) == Placement(0, needs_write=False)  # a hit
    slots.release(key("a"))
    assert slots.acquire(key("c")) == Placement(1, needs_write=True)  # "b" was idle the longest
    assert key("b") not in slots.slot_of and slots.evictions == 1
    assert (slots.loads, slots.hits) == (3, 1)


def test_a_version_whose_write_failed_is_written_again_by_its_next_user():
    """The engine retires a version whose write failed; its slot frees when its users end."""
    slots = AdapterSlots(1)
    placed = slots.acquire(key("broken"))
    slots.retire(key("broken"))  # what the engine does when the write raises
    assert not slots.can_place(key("good"))  # still referenced by the failed admission
    slots.release(key("broken"))
    assert slots.free_slots() == 1 and slots.refs == [0]
    assert slots.acquire(key("broken")) == Placement(placed.slot, needs_write=True)
