"""LoRA on the vocabulary-side modules: the token embedding (embed_tokens) and the output layer.

Few adapters target them, and each runs once per step (not once per decoder layer), so they hold
per-slot tensors at each adapter's own rank (no [S, R, vocab] table: vocab is large) and loop
over the slots of the step that have one. For a token or logits row of slot s, as PEFT computes:

    embed_tokens:  h[t]      += scale_s · (A_s[:, id_t] @ B_sᵀ)   A_s: lora_embedding_A [r, vocab]
                                                                  B_s: lora_embedding_B [hidden, r]
    lm_head:       logits[n] += scale_s · ((x_n @ A_sᵀ) @ B_sᵀ)   A_s: lora_A [r, hidden]
                                                                  B_s: lora_B [vocab, r]

Both tensors are stored transposed, so that what a row needs is contiguous: the embedding's
A as [vocab, r] (one row per token id), lm_head's B as [r, vocab]. A tied embedding needs
nothing special: each wrapper adds its own adapter's update to the shared base weight's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.host_to_device import upload


@dataclass(frozen=True)
class _SlotLora:
    first: torch.Tensor  # embed_tokens: Aᵀ [vocab, r]; lm_head: A [r, hidden]
    second: torch.Tensor  # [r, out]: Bᵀ of either
    scale: float


class _VocabLora(nn.Module):
    """The base module plus the adapters of the slots that target it."""

    def __init__(self, base: nn.Module, context, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.context = context  # server.lora.layer.LoraContext
        self.dtype = dtype
        self.device = device
        self._slots: dict[int, _SlotLora] = {}

    def reset_lora(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def _store(self, slot: int, first: torch.Tensor, second: torch.Tensor, scale: float) -> None:
        as_table = lambda t: t.to(device=self.device, dtype=self.dtype,  # noqa: E731
                                  non_blocking=True).contiguous()
        self._slots[slot] = _SlotLora(as_table(first), as_table(second), float(scale))

    def _rows_by_slot(self, slots: list[int]):
        """(adapter, row indices on the device) for each slot of this step that has an adapter
        here. slots: the slot of each row of this module's input, on the host."""
        for slot in sorted(self._slots.keys() & self.context.mapping.present):
            rows = [i for i, s in enumerate(slots) if s == slot]
            if rows:
                yield self._slots[slot], upload(torch.tensor(rows), self.device)


class MultiLoraEmbedding(_VocabLora):
    """embed_tokens with per-slot LoRA; reads the step's token slots from the context."""

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """a: lora_embedding_A [r, vocab], b: lora_embedding_B [hidden, r]."""
        self._store(slot, a.t(), b.t(), scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.base(ids)  # [T, hidden]
        if self._slots:
            for lora, rows in self._rows_by_slot(self.context.token_slots):
                after_a = F.embedding(ids.index_select(0, rows), lora.first)  # [n, r]
                delta = (after_a @ lora.second) * lora.scale  # [n, hidden]
                h.index_add_(0, rows, delta.to(h.dtype))
        return h


class MultiLoraLMHead(_VocabLora):
    """lm_head with per-slot LoRA, applied to the rows whose logits the step returns; reads
    their slots (`logit_slots`) from the context."""

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """a: lora_A [r, hidden], b: lora_B [vocab, r]."""
        self._store(slot, a, b.t(), scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [N, vocab]
        if self._slots:
            for lora, rows in self._rows_by_slot(self.context.logit_slots):
                xs = x.index_select(0, rows).to(self.dtype)  # [n, hidden]
                delta = ((xs @ lora.first.t()) @ lora.second) * lora.scale  # [n, vocab]
                y.index_add_(0, rows, delta.to(y.dtype))
        return y
