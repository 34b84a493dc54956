"""A Triton kernel for decode attention over the paged KV cache (CUDA; in Triton's interpreter
on CPU tensors, for tests). Import it through `server.triton_support.load_kernels`.

One query per sequence. Program (b, h) reads sequence b's keys and values of KV head h straight
from the cache through its block table, a tile of positions at a time, and keeps an online
softmax (running max and sum) for the GROUP = heads / kv_heads query heads that share h (GQA):
no sequence's context is gathered into a contiguous copy. Shapes:

    q: [B, heads, D]   k_cache, v_cache: [kv_heads, num_blocks * block_size, D] (one layer)
    block_tables: [B, n] block ids   context_lens: [B] int32, the query's position + 1
    out: [B, heads, D] in q's dtype

Position p of sequence b lives at row block_tables[b, p // block_size] * block_size +
p % block_size. With a sliding window w (Mistral), the query at position t sees p > t - w.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.triton_common import dot, dot_flags
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_N = 64
"""Positions per tile (any block size: a tile may span several blocks)."""


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, sm_scale, window,
                   block_size, head_dim, q_stride_b, q_stride_h, kv_stride_h, kv_stride_row,
                   table_stride, out_stride_b, out_stride_h,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < GROUP
    d_ok = d < head_dim
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G_PAD, D_PAD]
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
    first = (first // BLOCK_N) * BLOCK_N
    kv_base = kv_head.to(tl.int64) * kv_stride_h
    best = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    total = tl.full((G_PAD,), 0.0, dtype=tl.float32)
    acc = tl.full((G_PAD, D_PAD), 0.0, dtype=tl.float32)
    for p0 in range(first, length, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        p_ok = p < length
        if HAS_WINDOW:
            p_ok = p_ok & (p >= length - window)
        block = tl.load(tables_ptr + b * table_stride + p // block_size, mask=p_ok, other=0)
        row = block.to(tl.int64) * block_size + p % block_size  # [BLOCK_N] cache rows
        kt = tl.load(k_ptr + kv_base + row[None, :] * kv_stride_row + d[:, None],
                     mask=p_ok[None, :] & d_ok[:, None], other=0.0)  # [D_PAD, BLOCK_N]
        vt = tl.load(v_ptr + kv_base + row[:, None] * kv_stride_row + d[None, :],
                     mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D_PAD]
        scores = dot(q.to(kt.dtype), kt, IEEE, UPCAST)
        scores = tl.where(p_ok[None, :], scores * sm_scale, float("-inf"))  # [G_PAD, BLOCK_N]
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(weights, 1)
        acc = acc * rescale[:, None] + dot(weights.to(vt.dtype), vt, IEEE, UPCAST)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + b * out_stride_b + heads[:, None] * out_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, window: int | None) -> torch.Tensor:
    """Attention of one query per sequence over its paged context (see the module docstring).
    Returns [B, heads, D] in q's dtype."""
    B, heads, D = q.shape
    kv_heads = k_cache.shape[0]
    group = heads // kv_heads
    out = torch.empty(B, heads, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    _decode_kernel[(B, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, float(scale), int(window or 0),
        block_size, D, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)),
        D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_N=BLOCK_N, HAS_WINDOW=window is not None,
        **dot_flags(k_cache.dtype))
    return out
