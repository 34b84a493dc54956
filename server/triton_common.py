"""What loraplex's Triton kernels share: the dot they all take and the flags that choose it.

Imported only by the kernel modules, which `server.triton_support.load_kernels` imports once
Triton's mode (compiled or interpreted) is set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.triton_support import interpreting

INTERPRETED = interpreting()
"""True when the kernels run in Triton's interpreter (on CPU tensors)."""


@triton.jit
def dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 sums; IEEE: exact fp32 products (no TF32); UPCAST: the operands widened
    to fp32 first (see `dot_flags`)."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


def dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """`dot`'s flags for operands of `dtype`. The interpreter computes on 16-bit floats wrongly
    (it reads their raw bits; conversions are right): there the operands, already rounded to
    `dtype`, are widened to fp32, which is what a 16-bit dot with fp32 sums computes."""
    wide = dtype == torch.float32
    return {"IEEE": wide, "UPCAST": INTERPRETED and not wide}
