"""Multi-LoRA Linear layers: the base layer plus slot tables plus one shared per-step mapping.

After the model is built, `wrap_lora_targets` swaps every target Linear (q, k, v, o, gate, up,
down) for a `MultiLoraLinear`. Each holds preallocated tables for `max_slots` adapters, padded to
`max_rank`; an adapter occupies the same slot index in every layer. The token -> slot mapping is
set ONCE per step on the shared `LoraContext`; the layers only read it.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters_registry.peft_format import LoraWeights
from adapters_registry.spec import TARGET_MODULES, module_path
from server.lora_op import SlotMapping, lora_apply


class LoraContext:
    """The per-step token -> slot mapping shared by every wrapped layer."""

    def __init__(self):
        self.mapping = SlotMapping.build(torch.empty(0, dtype=torch.long))

    def set_step(self, token_slots: torch.Tensor) -> None:
        """token_slots: [T] adapter slot of each packed token, -1 = base model."""
        self.mapping = SlotMapping.build(token_slots)


class MultiLoraLinear(nn.Module):
    """y = base(x) + scale[s] * (A[s] @ x) @ B[s] for each token's slot s (none for s = -1).

    Tables: lora_a [S, R, in], lora_b [S, R, out] (PEFT's B transposed), scale [S] fp32, and
    lora_rank [S] int32 (each slot's true rank; the rows past it are zero and the CPU kernel
    skips them).
    """

    def __init__(self, base: nn.Module, context: LoraContext, *, max_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.context = context
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.register_buffer("lora_a", torch.zeros(max_slots, max_rank, self.in_features,
                                                   dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_slots, max_rank, self.out_features,
                                                   dtype=dtype, device=device), persistent=False)
        self.register_buffer("scale", torch.zeros(max_slots, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("lora_rank", torch.zeros(max_slots, dtype=torch.int32, device=device),
                             persistent=False)
        self._ranks = [0] * max_slots  # lora_rank on the host: no device read per slot write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [T, out]
        mapping = self.context.mapping
        if mapping.has_lora:
            lora_apply(y, x, mapping, self.lora_a, self.lora_b, self.scale, self.lora_rank)
        return y

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Writes one adapter's A: [r, in] and B: [out, r] into `slot`, zero-padding to max rank.

        Rows past a slot's rank are always zero, so only the rows the previous occupant used
        beyond `r` need zeroing: a slot write costs the adapter's size, not max_rank's.
        """
        r, previous = a.shape[0], self._ranks[slot]
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :r].t().copy_(b)  # into [r, out]; iterating in b's order is faster
        self._zero_rows(slot, r, previous)
        self.scale[slot] = scale
        self.lora_rank[slot] = r
        self._ranks[slot] = r

    def reset_lora(self, slot: int) -> None:
        self._zero_rows(slot, 0, self._ranks[slot])
        self.scale[slot] = 0.0
        self.lora_rank[slot] = 0
        self._ranks[slot] = 0

    def _zero_rows(self, slot: int, start: int, stop: int) -> None:
        if stop > start:
            self.lora_a[slot, start:stop].zero_()
            self.lora_b[slot, start:stop].zero_()


def wrap_lora_targets(hf: nn.Module, context: LoraContext, *, max_slots: int, max_rank: int,
                      dtype: torch.dtype, device: torch.device
                      ) -> dict[tuple[int, str], MultiLoraLinear]:
    """Replaces every target Linear of every decoder layer; returns them by (layer, module)."""
    wrapped = {}
    for layer in range(hf.config.num_hidden_layers):
        for name in TARGET_MODULES:
            path = module_path(layer, name)
            parent_path, _, attr = path.rpartition(".")
            parent = hf.get_submodule(parent_path)
            module = MultiLoraLinear(getattr(parent, attr), context, max_slots=max_slots,
                                     max_rank=max_rank, dtype=dtype, device=device)
            setattr(parent, attr, module)
            wrapped[(layer, name)] = module
    return wrapped


def write_adapter_to_slot(layers: dict[tuple[int, str], MultiLoraLinear], slot: int,
                          weights: LoraWeights) -> None:
    """Loads every module of an adapter into `slot`; modules it does not target are zeroed."""
    for key, layer in layers.items():
        module = weights.modules.get(key)
        if module is None:
            layer.reset_lora(slot)
        else:
            layer.set_lora(slot, module.a, module.b, module.scale)


def clear_slot(layers: dict[tuple[int, str], MultiLoraLinear], slot: int) -> None:
    for layer in layers.values():
        layer.reset_lora(slot)
