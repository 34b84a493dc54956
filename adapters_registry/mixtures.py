"""Weighted adapter mixtures: several registered adapters in one request, combined the way PEFT's
`add_weighted_adapter` (peft 0.21) combines them offline.

A request may name up to MAX_ADAPTERS adapters, each with a weight, and a combination type:

- `cat`: the adapters side by side (rank Σr), A_i scaled by w_i·s_i. Its update is exactly the sum
  of each adapter's weighted update, so it is served without building anything: every component
  sits in its own device slot, as for a plain request, and each token's update is summed over
  its slots with their weights (server/lora/op.py).
- `linear`: per module, A = Σ ±√|w_i·s_i|·A_i and B = Σ √|w_i·s_i|·B_i (the sign on A), cross
  terms included; all adapters need one rank.
- `svd`: the dense update Σ w_i·s_i·B_i·A_i, truncated by SVD to the largest component rank. It
  is computed from the low-rank factors (QR of the stacked Bs and As, SVD of the small core):
  the same truncation as PEFT's dense SVD, never an [out, in] matrix.
- `ties`: TIES-merging (trim each tensor to `density` by magnitude, elect a sign per entry,
  average the agreeing entries) of the As and of the Bs separately, with `linear`'s weights.

PEFT's merged adapter has r = lora_alpha = its new rank, so its scale is 1 (√r with rsLoRA,
which it copies from the first adapter); `cat` of one adapter is `linear`, as in PEFT. DARE
(`dare_linear`) is not offered: PEFT's result depends on every random draw its call makes,
including the initialisation of the new adapter's tensors, which no server can replay.

The merged types are built on a registry load worker (`merge`), cached in host RAM like any
adapter version under a key made of the components' versions, the weights, the type and the
density (`mixture_key`), and served from one device slot like any adapter.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

from adapters_registry.host_cache import AdapterKey
from adapters_registry.weights import LoraModuleWeights, LoraWeights

MAX_ADAPTERS = 4
COMBINATIONS = ("linear", "cat", "svd", "ties")
MERGED = ("linear", "svd", "ties")  # built into one adapter; `cat` is served as its parts


class MixtureError(ValueError):
    """A mixture that cannot be served: the message says which adapters and why."""


@dataclass(frozen=True)
class AdapterMix:
    """What a request asks for: adapters[i] with weights[i], combined by `combination`."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    combination: str = "linear"
    density: float | None = None  # ties only: the fraction of each tensor's entries kept

    def __post_init__(self):
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def effective(self) -> str:
        """The combination PEFT applies: one adapter is always `linear`."""
        return "linear" if len(self.adapters) == 1 else self.combination

    @property
    def label(self) -> str:
        """How logs and metrics name the mixture, e.g. `linear(json=0.5,pirate=0.5)`."""
        parts = ",".join(f"{n}={w:g}" for n, w in zip(self.adapters, self.weights))
        density = f";density={self.density:g}" if self.density is not None else ""
        return f"{self.combination}({parts}{density})"

    @property
    def primary(self) -> str:
        """The adapter with the largest |weight| (the first of equals): the mixture waits in its
        admission queue."""
        return max(zip(self.adapters, self.weights), key=lambda nw: abs(nw[1]))[0]

    @functools.cached_property
    def shares(self) -> dict[str, float]:
        """Each adapter's share of the mixture's tokens, by |weight| (equal when all are 0)."""
        total = sum(abs(w) for w in self.weights)
        shares: dict[str, float] = {}
        for name, weight in zip(self.adapters, self.weights):
            share = abs(weight) / total if total else 1 / len(self.adapters)
            shares[name] = shares.get(name, 0.0) + share
        return shares

    def validate(self, max_slots: int | None = None) -> None:
        """Checks what needs no weights; raises MixtureError."""
        if self.combination not in COMBINATIONS:
            raise MixtureError(f"combination type {self.combination!r} is not one of "
                               f"{', '.join(COMBINATIONS)}")
        if not 1 <= len(self.adapters) <= MAX_ADAPTERS:
            raise MixtureError(f"a mixture names 1 to {MAX_ADAPTERS} adapters, not "
                               f"{len(self.adapters)}")
        if len(self.weights) != len(self.adapters):
            raise MixtureError(f"a mixture needs one weight per adapter: {len(self.adapters)} "
                               f"adapters, {len(self.weights)} weights")
        if len(set(self.adapters)) != len(self.adapters):
            raise MixtureError("a mixture names each adapter once")
        if not all(isinstance(n, str) and n for n in self.adapters):
            raise MixtureError("a mixture's adapters are registered adapter names")
        if not all(math.isfinite(w) for w in self.weights):
            raise MixtureError(f"mixture weights must be finite numbers, got {list(self.weights)}")
        if self.effective == "ties":
            if self.density is None or not 0 < self.density <= 1:
                raise MixtureError(f"ties needs a density in (0, 1], got {self.density}")
        elif self.density is not None:
            raise MixtureError(f"density applies to ties only, not to {self.combination}")
        if self.effective == "cat" and max_slots is not None and len(self.adapters) > max_slots:
            raise MixtureError(f"a cat mixture of {len(self.adapters)} adapters needs as many "
                               f"device slots; this server has {max_slots} (--max-slots)")


def mixture_key(mix: AdapterMix, parts: tuple[AdapterKey, ...]) -> AdapterKey:
    """The identity of a mixture of these component versions: its cache and prefix-cache key."""
    identity = repr((mix.effective, mix.weights, mix.density,
                     [(p.name, p.version, p.digest) for p in parts]))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return AdapterKey(mix.label, 0, digest, parts)


def check_mixable(mix: AdapterMix, parts: list[LoraWeights], max_rank: int | None = None) -> None:
    """Refuses components that the combination cannot take (raises MixtureError)."""
    names = mix.adapters
    for name, weights in zip(names, parts):
        if any(m.magnitude is not None for m in weights.modules.values()):
            raise MixtureError(f"adapter {name!r} is a DoRA adapter: DoRA adapters cannot be "
                               f"mixed (their magnitude vectors do not combine linearly)")
        if weights.embed_tokens is not None or weights.lm_head is not None:
            raise MixtureError(f"adapter {name!r} adapts embed_tokens or lm_head: vocabulary "
                               f"adapters cannot be mixed")
    if mix.effective in ("linear", "ties"):
        ranks = {name: weights.rank for name, weights in zip(names, parts)}
        if len(set(ranks.values())) != 1:
            raise MixtureError(f"{mix.effective} needs adapters of one rank, got "
                               f"{', '.join(f'{n}: r={r}' for n, r in ranks.items())}; use cat "
                               f"or svd for different ranks")
        for key in {k for weights in parts for k in weights.modules}:
            module_ranks = {w.modules[key].a.shape[0] for w in parts if key in w.modules}
            if len(module_ranks) > 1:
                raise MixtureError(f"{mix.effective} needs one rank per module; layer {key[0]} "
                                   f"{key[1]} has ranks {sorted(module_ranks)}")
    if max_rank is not None and mix.effective in MERGED:
        rank = max(w.rank for w in parts)
        if rank > max_rank:
            raise MixtureError(f"the merged adapter would have rank {rank}, above --max-rank "
                               f"{max_rank}")


def cat_weights(mix: AdapterMix, parts: list[LoraWeights]) -> list[float]:
    """The weight each component's update gets in a cat mixture (its scale stays in its slot)."""
    return [w * _merged_scale(parts, sum(p.rank for p in parts)) for w in mix.weights]


@torch.no_grad()
def merge(mix: AdapterMix, parts: list[LoraWeights], name: str) -> LoraWeights:
    """One adapter (fp32 tensors) equal to PEFT's add_weighted_adapter of `parts` by `mix`."""
    combination = mix.effective
    rank = max(p.rank for p in parts)
    merged = LoraWeights(name=name, rank=rank)
    scale = _merged_scale(parts, rank)
    for key in sorted({k for p in parts for k in p.modules}):
        present = [(p.modules[key], w) for p, w in zip(parts, mix.weights) if key in p.modules]
        modules = [m for m, _ in present]
        weights = [w * m.scale for m, w in present]  # PEFT: weight x the adapter's scaling
        if combination == "svd":
            a, b = _svd(modules, weights, rank)
        else:
            a, b = _task_arithmetic(modules, weights, combination, mix.density)
        merged.modules[key] = LoraModuleWeights(a=a.contiguous(), b=b.contiguous(), scale=scale)
    return merged


def _merged_scale(parts: list[LoraWeights], rank: int) -> float:
    """The scale of PEFT's new adapter: lora_alpha = r, with the first adapter's rsLoRA."""
    return math.sqrt(rank) if parts[0].rslora else 1.0


def _task_arithmetic(modules: list[LoraModuleWeights], weights: list[float], combination: str,
                     density: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """linear or ties over the As and the Bs: A gets sign(w)·√|w|, B gets √|w|."""
    roots = [math.sqrt(abs(w)) for w in weights]
    weights_a = torch.tensor([r if w >= 0 else -r for r, w in zip(roots, weights)])
    weights_b = torch.tensor(roots)
    a = torch.stack([m.a.float() for m in modules])  # [K, r, in]
    b = torch.stack([m.b.float() for m in modules])  # [K, out, r]
    if combination == "linear":
        return _weighted_sum(a, weights_a), _weighted_sum(b, weights_b)
    return _ties(a, weights_a, density), _ties(b, weights_b, density)


def _weighted_sum(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (tensors * weights.view(-1, 1, 1)).sum(dim=0)


def _ties(tensors: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES: keep each tensor's top `density` entries by magnitude, elect each entry's sign by
    the kept values' sum, average the weighted entries that agree with it."""
    if density < 1:
        k = int(density * tensors[0].numel())
        kept = torch.zeros_like(tensors)
        for i, t in enumerate(tensors):
            top = torch.topk(t.abs().reshape(-1), k=k).indices
            kept[i].view(-1)[top] = t.reshape(-1)[top]
        tensors = kept
    sign = tensors.sign()
    majority = torch.where(tensors.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = sign == majority  # [K, ...]
    weighted = tensors * weights.view(-1, 1, 1)
    total = (weighted * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1.0)


def _svd(modules: list[LoraModuleWeights], weights: list[float],
         rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` SVD of ΔW = Σ w_i·B_i·A_i as (A = Vhᵀ rows, B = U·S), from its factors:
    ΔW = Bc·Ac with Bc = [w_1·B_1 … w_K·B_K] and Ac = [A_1; …; A_K]; QR of both leaves an
    [R, R] core whose SVD gives ΔW's (R = Σ r_i). Rows past ΔW's rank are zero."""
    b_cat = torch.cat([m.b.float() * w for m, w in zip(modules, weights)], dim=1)  # [out, R]
    a_cat = torch.cat([m.a.float() for m in modules], dim=0)  # [R, in]
    q_b, r_b = torch.linalg.qr(b_cat)  # [out, R'], [R', R]
    q_a, r_a = torch.linalg.qr(a_cat.t())  # [in, R''], [R'', R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())  # core [R', R'']
    n = min(rank, s.shape[0])
    b = torch.zeros(b_cat.shape[0], rank)
    a = torch.zeros(rank, a_cat.shape[1])
    b[:, :n] = (q_b @ u[:, :n]) * s[:n]
    a[:n] = vh[:n] @ q_a.t()
    return a, b
