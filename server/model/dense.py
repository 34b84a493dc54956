"""Unquantized Linear layers served on the CPU from oneDNN's prepacked weight layout.

`F.linear` hands oneDNN a plain [out, in] weight, which oneDNN reorders into its blocked layout
on every call; for the small batches of a decode step that reorder is a large share of the
matmul. `use_packed_linears` reorders each unquantized Linear's weight once, at load, and keeps
the packed copy beside the plain weight (which stays: state dicts, DoRA's probes, vocabulary
adapters and tied embeddings read it). vLLM's CPU backend prepacks the same way.

The packed copy costs as much memory as the weight; `packed_bytes` counts it for the cost report.
Only layers whose weight is unquantized (fp32 or bf16) on a CPU with oneDNN are packed; the choice
is made once, at load (`--prepack auto|off`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_HINT = 32
"""The batch size oneDNN is told to expect when packing; any batch size runs."""


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward multiplies by its oneDNN-packed weight."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                             "_reorder_linear_weight")


def use_packed_linears(hf: nn.Module) -> int:
    """Packs every unquantized nn.Linear of `hf` (on the CPU); returns how many."""
    if not available():
        log.warning("oneDNN is not available in this torch build; Linear layers run unpacked")
        return 0
    packed = 0
    for module in hf.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is nn.Linear and weight.device.type == "cpu"
                and weight.dtype in (torch.float32, torch.bfloat16)):
            module.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
            module.__class__ = PackedLinear
            packed += 1
    return packed


def packed_bytes(hf: nn.Module) -> int:
    """Bytes of the packed weight copies (the weights' own bytes: oneDNN's layout pads little)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in hf.modules()
               if isinstance(m, PackedLinear))
