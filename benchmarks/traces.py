"""Synthetic workloads in the manner of S-LoRA (open-loop traces) and Punica (batch modes).

Open-loop trace (S-LoRA's evaluation): `num_requests` requests over `num_adapters` adapters.

- Adapter popularity follows a power law with parameter alpha: adapter = floor(n · u) with u
  drawn from the power distribution p(u) = alpha · u^(alpha - 1) on [0, 1] (numpy's `power`).
  alpha = 1 is uniform; a smaller alpha piles the requests onto the low adapter indices.
- Arrivals form a Gamma process: gaps between requests are Gamma(shape = 1 / cv², scale =
  cv² / rate), so the mean rate is `rate` requests/s and the gaps' coefficient of variation is
  `cv` (cv = 1 is a Poisson process; larger is burstier).
- Prompt and output lengths are uniform integers in their inclusive ranges.

Closed-loop batch modes (Punica's evaluation): how the B requests of one batch share adapters.

- distinct:  every request its own adapter (B adapters, one request each);
- uniform:   ceil(sqrt(B)) adapters with equal shares (they differ by at most one request);
- skewed:    Zipf-1.5 shares: 1, floor(1.5), floor(1.5²), ... requests while they fit, the rest
             to one more adapter (B = 32: 11, 7, 5, 3, 2, 2, 1, 1);
- identical: one adapter for the whole batch.

Everything is seeded: the same arguments give the same workload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BATCH_MODES = ("distinct", "uniform", "skewed", "identical")
ZIPF_EXPONENT = 1.5


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival: float  # seconds since the trace start
    adapter: int  # in [0, num_adapters)
    prompt_len: int
    output_len: int


def adapter_indices(num_adapters: int, alpha: float, count: int,
                    rng: np.random.Generator) -> np.ndarray:
    """[count] adapter indices, power-law popular with parameter alpha (1 = uniform)."""
    if num_adapters < 1 or alpha <= 0:
        raise ValueError("num_adapters must be >= 1 and alpha > 0")
    return np.minimum((rng.power(alpha, count) * num_adapters).astype(np.int64), num_adapters - 1)


def gamma_arrivals(rate: float, cv: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count] arrival times (s) of a Gamma process with mean rate `rate`/s and gap CV `cv`."""
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be > 0")
    gaps = rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=count)
    return np.cumsum(gaps)


def make_trace(num_adapters: int, *, alpha: float, rate: float, cv: float, num_requests: int,
               prompt_range: tuple[int, int], output_range: tuple[int, int],
               seed: int = 0) -> list[TraceRequest]:
    """An open-loop trace; lengths are drawn in their inclusive (low, high) ranges."""
    rng = np.random.default_rng(seed)
    adapters = adapter_indices(num_adapters, alpha, num_requests, rng)
    arrivals = gamma_arrivals(rate, cv, num_requests, rng)
    prompts = rng.integers(prompt_range[0], prompt_range[1] + 1, num_requests)
    outputs = rng.integers(output_range[0], output_range[1] + 1, num_requests)
    return [TraceRequest(i, float(arrivals[i]), int(adapters[i]), int(prompts[i]), int(outputs[i]))
            for i in range(num_requests)]


def batch_counts(mode: str, batch_size: int) -> list[int]:
    """How many of a batch's requests each adapter gets, most popular first (Punica's modes)."""
    if mode == "distinct":
        return [1] * batch_size
    if mode == "identical":
        return [batch_size]
    if mode == "uniform":
        n = math.ceil(math.sqrt(batch_size))
        return [batch_size // n + (i < batch_size % n) for i in range(n)]
    if mode == "skewed":
        counts, share = [], 1.0
        while sum(counts) + math.floor(share) < batch_size:
            counts.append(math.floor(share))
            share *= ZIPF_EXPONENT
        counts.append(batch_size - sum(counts))
        return sorted(counts, reverse=True)
    raise ValueError(f"unknown batch mode {mode!r} (one of {', '.join(BATCH_MODES)})")


def batch_adapters(mode: str, batch_size: int, seed: int = 0) -> list[int]:
    """The adapter of each request of one closed-loop batch: adapter i gets batch_counts[i]
    requests, in a seeded random order."""
    counts = batch_counts(mode, batch_size)
    adapters = np.repeat(np.arange(len(counts)), counts)
    return [int(a) for a in np.random.default_rng(seed).permutation(adapters)]


def prompt_tokens(request: TraceRequest, vocab: int, seed: int = 0) -> list[int]:
    """The request's prompt: `prompt_len` token ids drawn from [5, vocab), seeded by its index
    (ids below 5 are the demo tokenizer's special tokens)."""
    rng = np.random.default_rng([seed, request.index])
    return [int(t) for t in rng.integers(5, vocab, request.prompt_len)]
