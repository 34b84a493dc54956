"""bitsandbytes 4-bit Linear layers served on the CPU by loraplex's own kernel.

bitsandbytes still quantizes and stores the weights: each layer keeps its `Params4bit` and quant
state, repacked into bitsandbytes' own CPU layout (`packing_format_for_cpu`, what bitsandbytes
itself does at a layer's first forward on a CPU with AVX512-BF16). Only the matmul changes:
`csrc/linear4bit_cpu.cpp` widens the 4-bit codes to bf16 in registers and multiplies with
AVX512-BF16 dot products (bf16 activations) or fp32 FMAs (fp32 activations), where bitsandbytes'
CPU path (`gemv_4bit`) computes one token at a time.

The choice is made once, when the model is loaded (`use_cpu_kernel`): every eligible
`bnb.nn.Linear4bit` becomes a `CpuLinear4bit` (a subclass: state dicts, memory accounting and
isinstance checks see the same layer). A CPU without AVX512-BF16, a failed build or a bitsandbytes
without the CPU packing leaves bitsandbytes serving, with one warning.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import bitsandbytes as bnb
import torch

from server.native import NativeModule

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 32  # output rows per block of bitsandbytes' CPU packing
MAX_BLOCKSIZE = 1024  # the kernel's widened block buffer: kMaxPairs input pairs

KERNEL = NativeModule(
    "loraplex_linear4bit_cpu",
    os.path.join(os.path.dirname(__file__), "csrc", "linear4bit_cpu.cpp"),
    what="4-bit CPU kernel", fallback="bitsandbytes' own 4-bit path serves",
    logger=log)

_warned_unsupported = False


def load() -> ModuleType | None:
    """The kernel module, or None where it cannot run (not built, or no AVX512-BF16)."""
    global _warned_unsupported
    module = KERNEL.load()
    if module is None:
        return None
    if not module.supported():
        if not _warned_unsupported:
            _warned_unsupported = True
            log.warning("4-bit CPU kernel needs AVX512-BF16, which this CPU lacks; "
                        "bitsandbytes' own 4-bit path serves")
        return None
    return module


def _cpu_packing():
    """bitsandbytes' CPU repacking (a private function of bitsandbytes 0.50), or None for a
    version without it."""
    import bitsandbytes.functional as F
    return getattr(F, "_convert_weight_packed_for_cpu", None)


def _fits(layer) -> bool:
    """Whether the kernel takes this layer's shapes and quantization blocks."""
    state = layer.weight.quant_state
    return (layer.weight.device.type == "cpu" and state is not None
            and layer.out_features % ROWS_PER_BLOCK == 0
            and state.blocksize % 2 == 0 and state.blocksize <= MAX_BLOCKSIZE
            and layer.in_features % state.blocksize == 0)


class CpuLinear4bit(bnb.nn.Linear4bit):
    """A bitsandbytes Linear4bit whose forward runs loraplex's 4-bit CPU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._pack()
        state = self.weight.quant_state
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        y = KERNEL.load().linear4bit_cpu(rows, self.weight.data, state.absmax, state.code,
                                         state.blocksize, out_dtype)
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _pack(self) -> None:
        """bitsandbytes' own repacking into its CPU layout, as its forward would do."""
        if not getattr(self.weight.quant_state, "packing_format_for_cpu", False):
            self.weight.data, self.weight.quant_state = _cpu_packing()(self.weight.data,
                                                                       self.weight.quant_state)


def use_cpu_kernel(hf: torch.nn.Module) -> int:
    """Serves every eligible 4-bit Linear of `hf` with the CPU kernel; returns how many."""
    layers = [m for m in hf.modules() if type(m) is bnb.nn.Linear4bit]
    if not layers or load() is None:
        return 0
    if _cpu_packing() is None:
        log.warning("bitsandbytes %s has no CPU 4-bit packing; its own 4-bit path serves",
                    bnb.__version__)
        return 0
    served = 0
    for layer in layers:
        if _fits(layer):
            layer.__class__ = CpuLinear4bit
            served += 1
    return served
