"""DoRA at serving time: each output channel's magnitude factor, fixed once per slot load.

PEFT's DoRA layer computes, for a base weight W [out, in] (dequantized when quantized), LoRA
factors A [r, in], B [out, r], scale s and the trained magnitude m [out]:

    g = m / ||W + s·B·A||   (the norm of each output row, treated as a constant)
    y = g ⊙ (x Wᵀ) + bias + g ⊙ s·(x Aᵀ Bᵀ)

so per slot it is plain LoRA with B' = diag(g)·B plus one more per-slot vector: the base
output (without bias) of the slot's tokens is scaled by g. The row norms are expanded so that no
[out, in] matrix is ever built per adapter:

    ||W_o + s(BA)_o||² = ||W_o||² + 2s·⟨B_o, (W Aᵀ)_o⟩ + s²·⟨B_o, (B·A·Aᵀ)_o⟩

||W_o||² is computed once per layer from the served weights (through the layer itself, so a
quantized layer contributes exactly what it serves), W Aᵀ by running the r rows of A through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Identity rows per probe of a layer's weights: bounds the probe's memory to PROBE_ROWS x out.
PROBE_ROWS = 256


def weight_row_sq_norms(linear: Callable[[torch.Tensor], torch.Tensor], in_features: int,
                        dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """||W_o||² for every output row of the layer computing `linear(x) = x Wᵀ` (no bias), as a
    float64 [out] vector; W is read by passing identity rows through the layer."""
    total = None
    for start in range(0, in_features, PROBE_ROWS):
        rows = min(PROBE_ROWS, in_features - start)
        probe = torch.zeros(rows, in_features, dtype=dtype, device=device)
        probe[:, start:start + rows].fill_diagonal_(1)
        block = linear(probe).double()  # [rows, out]: rows of Wᵀ
        part = (block * block).sum(0)
        total = part if total is None else total + part
    return total


def dora_factor(linear: Callable[[torch.Tensor], torch.Tensor], row_sq_norms: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """g = m / ||W + s·B·A|| per output row, float32 [out] (see the module docstring)."""
    a64, b64 = a.double(), b.double()
    w_at = linear(a.to(device=row_sq_norms.device, dtype=dtype)).double().t()  # [out, r] = W Aᵀ
    ba_at = b64 @ (a64 @ a64.t())  # [out, r] = B A Aᵀ
    sq = row_sq_norms + 2 * scale * (b64 * w_at).sum(1) + scale * scale * (ba_at * b64).sum(1)
    return (magnitude.double() / sq.clamp_min(0).sqrt()).float()
