"""The device slot table: a write replaces everything a slot held, so an evicted slot is reused
without clearing it first; a write that fails gives its slot back empty."""

from __future__ import annotations

import pytest
import torch

from adapters_registry.host_cache import AdapterKey, AdapterLease
from server.engine.adapter_slots import AdapterSlots
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
    weights = {name: lease.weights for name, lease in core.adapters.items()}
    for name in adapters:
        core.layers.clear(1)
        core.layers.write(1, weights[name])
        fresh = slot_state(core, 1)
        for previous in adapters:  # ranks 4..64, DoRA, embed_tokens / lm_head, other targets
            core.layers.write(0, weights[previous])
            core.layers.write(0, weights[name])
            assert_same_state(slot_state(core, 0), fresh)


def _lease(name: str) -> AdapterLease:
    return AdapterLease(AdapterKey(name, 1, name), weights=None)


def test_eviction_reuses_the_least_recently_used_idle_slot_without_clearing_it():
    written, cleared = [], []
    slots = AdapterSlots(2, load=lambda slot, lease: written.append((slot, lease.key.name)),
                         clear=cleared.append)
    for name in ("a", "b"):
        slots.acquire(_lease(name))
        slots.release(_lease(name).key)
    assert slots.acquire(_lease("c")) == 0  # "a" was idle the longest
    assert written[-1] == (0, "c") and cleared == []
    assert _lease("a").key not in slots.slot_of and slots.evictions == 1


def test_a_failed_write_returns_its_slot_empty_and_the_next_acquire_gets_it():
    cleared = []

    def load(slot, lease):
        if lease.key.name == "broken":
            raise RuntimeError("write failed half way")

    slots = AdapterSlots(1, load=load, clear=cleared.append)
    with pytest.raises(RuntimeError):
        slots.acquire(_lease("broken"))
    assert cleared == [0] and slots.free_slots() == 1 and slots.refs == [0]
    assert slots.acquire(_lease("good")) == 0
