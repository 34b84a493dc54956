"""Unquantized Linear layers served on the CPU from oneDNN's prepacked weight layout.

`F.linear` hands oneDNN a plain [out, in] weight, which oneDNN reorders into its blocked layout
on every call; for the small batches of a decode step that reorder is a large share of the
matmul. `use_packed_linears` reorders a layer's weight once, at load, as vLLM's CPU backend does:

- the decoder's Linear layers (all of them with --quantize none, else those 4-bit cannot take)
  keep only the packed weight: nothing else reads their plain weight (DoRA probes the layer), so
  packing costs no memory;
- lm_head only with `--prepack all`: its plain weight stays (a tied embedding and vocabulary
  adapters read it), so the packed copy costs as much memory as lm_head; `packed_bytes` counts it.

The choice is made once, at load (`--prepack auto|all|off`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_HINT = 32
"""The batch size oneDNN is told to expect when packing; any batch size runs."""


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward multiplies by its oneDNN-packed weight (`packed`, in
    `packed_dtype`); inputs of another dtype are cast to it and the result back."""

    packed: torch.Tensor
    packed_dtype: torch.dtype
    keeps_weight: bool  # the plain weight is still held (lm_head), beside the packed copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.packed_dtype), self.packed, self.bias,
                                               "none", [], "")
        return y.to(x.dtype)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                             "_reorder_linear_weight")


def pack_linear(layer: nn.Linear, keep_weight: bool) -> None:
    """Makes `layer` a PackedLinear; its plain weight is dropped unless `keep_weight`."""
    weight = layer.weight.detach()
    layer.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
    layer.packed_dtype = weight.dtype
    layer.keeps_weight = keep_weight
    if not keep_weight:
        layer.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
    layer.__class__ = PackedLinear


def _packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16))


def use_packed_linears(hf: nn.Module, *, lm_head: bool = False) -> int:
    """Packs the unquantized decoder Linears of `hf` (on the CPU), and lm_head when asked;
    returns how many layers were packed."""
    if not available():
        log.warning("oneDNN is not available in this torch build; Linear layers run unpacked")
        return 0
    head = hf.get_output_embeddings()
    layers = [m for m in hf.model.layers.modules() if _packable(m)]
    for layer in layers:
        pack_linear(layer, keep_weight=False)
    if lm_head and _packable(head):
        pack_linear(head, keep_weight=True)
        layers.append(head)
    return len(layers)


def packed_bytes(hf: nn.Module) -> int:
    """Bytes of the packed weights (the plain weight's size: oneDNN's layout pads little)."""
    return sum(m.in_features * m.out_features * m.packed.element_size() for m in hf.modules()
               if isinstance(m, PackedLinear))
