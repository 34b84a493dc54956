"""Multi-LoRA Linear layers: the base layer plus slot tables plus one shared per-step mapping.

After the model is built, `wrap_lora_targets` swaps every target Linear (q, k, v, o, gate, up,
down) for a `MultiLoraLinear`, and embed_tokens and lm_head for their wrappers
(server/lora/vocab.py). Each Linear holds preallocated tables for `max_slots` adapters, padded to
`max_rank`; an adapter occupies the same slot index in every module. The token -> slot mapping is
set ONCE per step on the shared `LoraContext`; the modules only read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters_registry.weights import LoraWeights
from adapters_registry.spec import TARGET_MODULES, module_path
from server.host_to_device import upload
from server.lora.dora import dora_factor, weight_row_sq_norms
from server.lora.op import LoraKernel, SlotMapping, lora_apply
from server.lora.vocab import MultiLoraEmbedding, MultiLoraLMHead


class LoraContext:
    """The per-step token -> slot mapping shared by every wrapped module; the slots of the
    step's tokens and logits rows also as host lists (token_slots, logit_slots).

    A token of a `cat` mixture runs through several slots, each with a weight: `mapping` holds
    every token's first (slot, weight), `more_mappings` the further ones (tokens without one
    are base-only there), and a wrapped Linear adds the op of each."""

    def __init__(self, kernel: LoraKernel | None = None):
        """kernel: the kernel chosen at engine start (`select_kernel`); None = PyTorch."""
        self.kernel = kernel
        self.set_step(torch.empty(0, dtype=torch.long))

    def set_step(self, token_slots: torch.Tensor, logit_slots: list[int] | None = None,
                 host_slots: list[int] | None = None, weights: list[float] | None = None,
                 more_slots: list[tuple[list[int], list[float]]] = ()) -> None:
        """token_slots: [T] adapter slot of each packed token, -1 = base model; logit_slots: the
        slots of the rows whose logits the step computes (lm_head's input), default none;
        host_slots: token_slots as a host list, when the caller has it (no device read);
        weights: [T] each token's weight in its slot (None: all 1); more_slots: the further
        (slots, weights) passes of cat mixtures' tokens, as host lists."""
        self.mapping = SlotMapping.build(token_slots, self.kernel, host_slots, weights)
        device = token_slots.device
        self.more_mappings = [
            SlotMapping.build(upload(torch.tensor(slots, dtype=torch.long), device),
                              self.kernel, slots, pass_weights)
            for slots, pass_weights in more_slots]
        self.token_slots = token_slots.tolist() if host_slots is None else host_slots
        self.logit_slots = logit_slots or []


class MultiLoraLinear(nn.Module):
    """y = base(x) + scale[s] * (A[s] @ x) @ B[s] for each token's slot s (none for s = -1).

    Tables: lora_a [S, R, in], lora_b [S, R, out] (PEFT's B transposed), scale [S] fp32, and
    lora_rank [S] int32 (each slot's true rank; the rows past it are zero and the CPU kernel
    skips them). A DoRA slot s (server/lora/dora.py) stores diag(g)·B in lora_b and g in row s + 1 of
    dora_g [S + 1, out] (row 0 and plain slots: ones): its tokens' base output (without bias)
    is scaled by g first.
    """

    def __init__(self, base: nn.Module, context: LoraContext, *, max_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.context = context
        self.compute_dtype = compute_dtype  # the activations' dtype
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
        # [S + 1, out] fp32, allocated with the first DoRA adapter (plain LoRA never pays for it)
        self.register_buffer("dora_g", None, persistent=False)
        self._dora_slots: set[int] = set()
        self._weight_sq_norms: torch.Tensor | None = None  # ||W_o||², at the first DoRA load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [T, out]
        mapping = self.context.mapping
        if mapping.has_lora:
            if self._dora_slots and not self._dora_slots.isdisjoint(mapping.present):
                self._scale_base_output(y, mapping.rows)
            lora_apply(y, x, mapping, self.lora_a, self.lora_b, self.scale, self.lora_rank)
        for more in self.context.more_mappings:
            lora_apply(y, x, more, self.lora_a, self.lora_b, self.scale, self.lora_rank)
        return y

    def _scale_base_output(self, y: torch.Tensor, rows: torch.Tensor) -> None:
        """y = g ⊙ (y - bias) + bias for each token, with g = 1 for all but DoRA slots."""
        g = self.dora_g.index_select(0, rows).to(y.dtype)  # [T, out]
        bias = getattr(self.base, "bias", None)
        if bias is None:
            y.mul_(g)
        else:
            y.sub_(bias).mul_(g).add_(bias)

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float,
                 magnitude: torch.Tensor | None = None) -> None:
        """Writes one adapter's A: [r, in] and B: [out, r] into `slot`, zero-padding to max rank;
        with a DoRA `magnitude` [out], B is stored as diag(g)·B and g in dora_g.

        Rows past a slot's rank are always zero, so only the rows the previous occupant used
        beyond `r` need zeroing: a slot write costs the adapter's size, not max_rank's.
        """
        if magnitude is not None:
            g = self._dora_factor(a, b, scale, magnitude)
            b = b.to(g.device, non_blocking=True).float() * g.unsqueeze(1)
            if self.dora_g is None:
                self.dora_g = torch.ones(self.lora_a.shape[0] + 1, self.out_features,
                                         dtype=torch.float32, device=self.lora_a.device)
            self.dora_g[slot + 1] = g
            self._dora_slots.add(slot)
        elif slot in self._dora_slots:
            self._clear_dora(slot)
        r, previous = a.shape[0], self._ranks[slot]
        self.lora_a[slot, :r].copy_(a, non_blocking=True)  # from pinned memory on CUDA
        self.lora_b[slot, :r].t().copy_(b, non_blocking=True)  # into [r, out]: b's order is faster
        self._zero_rows(slot, r, previous)
        self.scale[slot] = scale
        self.lora_rank[slot] = r
        self._ranks[slot] = r

    def reset_lora(self, slot: int) -> None:
        self._zero_rows(slot, 0, self._ranks[slot])
        self.scale[slot] = 0.0
        self.lora_rank[slot] = 0
        self._ranks[slot] = 0
        if slot in self._dora_slots:
            self._clear_dora(slot)

    def _clear_dora(self, slot: int) -> None:
        self.dora_g[slot + 1].fill_(1.0)
        self._dora_slots.discard(slot)

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ with the served (possibly quantized) weights."""
        y = self.base(x)
        bias = getattr(self.base, "bias", None)
        return y - bias if bias is not None else y

    @torch.no_grad()
    def _dora_factor(self, a: torch.Tensor, b: torch.Tensor, scale: float,
                     magnitude: torch.Tensor) -> torch.Tensor:
        device = self.lora_a.device
        if self._weight_sq_norms is None:
            self._weight_sq_norms = weight_row_sq_norms(self._base_without_bias, self.in_features,
                                                        self.compute_dtype, device)
        return dora_factor(self._base_without_bias, self._weight_sq_norms, a.to(device),
                           b.to(device), scale, magnitude.to(device), self.compute_dtype)

    def _zero_rows(self, slot: int, start: int, stop: int) -> None:
        if stop > start:
            self.lora_a[slot, start:stop].zero_()
            self.lora_b[slot, start:stop].zero_()


@dataclass
class LoraModules:
    """Every LoRA-wrapped module of a model; an adapter occupies the same slot in all of them."""

    linears: dict[tuple[int, str], MultiLoraLinear]  # by (layer, module)
    embed_tokens: MultiLoraEmbedding
    lm_head: MultiLoraLMHead

    def write(self, slot: int, weights: LoraWeights) -> None:
        """Loads every module of an adapter into `slot`; modules it does not target are cleared."""
        for key, layer in self.linears.items():
            module = weights.modules.get(key)
            if module is None:
                layer.reset_lora(slot)
            else:
                layer.set_lora(slot, module.a, module.b, module.scale, module.magnitude)
        for wrapper, module in ((self.embed_tokens, weights.embed_tokens),
                                (self.lm_head, weights.lm_head)):
            if module is None:
                wrapper.reset_lora(slot)
            else:
                wrapper.set_lora(slot, module.a, module.b, module.scale)

    def clear(self, slot: int) -> None:
        for layer in self.linears.values():
            layer.reset_lora(slot)
        self.embed_tokens.reset_lora(slot)
        self.lm_head.reset_lora(slot)


def wrap_lora_targets(hf: nn.Module, context: LoraContext, *, max_slots: int, max_rank: int,
                      dtype: torch.dtype, device: torch.device,
                      compute_dtype: torch.dtype = torch.float32) -> LoraModules:
    """Replaces every target Linear of every decoder layer, embed_tokens and lm_head."""
    linears = {}
    for layer in range(hf.config.num_hidden_layers):
        for name in TARGET_MODULES:
            path = module_path(layer, name)
            parent_path, _, attr = path.rpartition(".")
            parent = hf.get_submodule(parent_path)
            module = MultiLoraLinear(getattr(parent, attr), context, max_slots=max_slots,
                                     max_rank=max_rank, dtype=dtype, device=device,
                                     compute_dtype=compute_dtype)
            setattr(parent, attr, module)
            linears[(layer, name)] = module
    embed = MultiLoraEmbedding(hf.model.embed_tokens, context, dtype=dtype, device=device)
    lm_head = MultiLoraLMHead(hf.lm_head, context, dtype=dtype, device=device)
    hf.model.embed_tokens, hf.lm_head = embed, lm_head
    return LoraModules(linears, embed, lm_head)
