"""Triton kernels of the batched LoRA op, for CUDA (and, in Triton's interpreter, CPU tensors).

They serve the same plan as the C++ kernel (`server.lora.op._KernelPlan`): the tokens of a step
grouped by slot, `tokens` [N] int32 token indices, and `entries` [E, 3] int32 rows
(slot, begin, end): entry e is slot s for the tokens tokens[begin:end]. Two launches per call,
in the manner of Punica's SGMV and vLLM's lora_shrink / lora_expand:

    shrink: h[n, :]         = scale[s] * x[tokens[n]] @ A[s]ᵀ      h: [N, R] fp32 scratch
    expand: y[tokens[n], :] += h[n, :] @ B[s]                      in y's dtype

with s the slot of n's entry. Each program takes one entry and a block of its tokens (a decode
step has one token per sequence, so an entry is a few tokens; a prefill chunk is many), and
reads only the first rank[s] rows of A[s] and B[s] (the rows past a slot's rank are zero).
Tokens of slot -1 are in no entry: they get the base output only. x is cast to the tables'
dtype for the products (as the PyTorch path does), which accumulate in fp32.

Whether the kernels are compiled or interpreted is Triton's choice at import time: import this
module through `server.triton_support.load_kernels` (as `server.lora.op.select_kernel` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.triton_common import INTERPRETED, dot, dot_flags

TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_DOT = 16
"""tl.dot's smallest block side."""


@triton.jit
def _entry_block(entries_ptr, tokens_ptr, rank_ptr, table_rank, HAS_RANK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (entry, block)'s share: its entry's slot, whether the block holds any of the
    entry's tokens, the block's rows in `tokens` [BLOCK_M] (which are real, their tokens), and
    the rank rows [BLOCK_R] (which are within the slot's rank)."""
    entry = tl.program_id(0)
    slot = tl.load(entries_ptr + entry * 3)
    begin = tl.load(entries_ptr + entry * 3 + 1) + tl.program_id(1) * BLOCK_M
    end = tl.load(entries_ptr + entry * 3 + 2)
    rows = begin + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    token = tl.load(tokens_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < (tl.load(rank_ptr + slot) if HAS_RANK else table_rank)
    return slot, begin < end, rows, row_ok, token, r, r_ok


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, scale_ptr, rank_ptr, entries_ptr, tokens_ptr, h_ptr,
                   in_features, table_rank, x_stride, a_stride_slot, a_stride_rank, h_stride,
                   HAS_RANK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    slot, live, rows, row_ok, token, r, r_ok = _entry_block(
        entries_ptr, tokens_ptr, rank_ptr, table_rank, HAS_RANK, BLOCK_M, BLOCK_R)
    if live:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        a_base = a_ptr + slot.to(tl.int64) * a_stride_slot
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < in_features
            xt = tl.load(x_ptr + token[:, None] * x_stride + k[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            at = tl.load(a_base + r[None, :] * a_stride_rank + k[:, None],
                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
            acc += dot(xt.to(at.dtype), at, IEEE, UPCAST)
        acc *= tl.load(scale_ptr + slot)
        tl.store(h_ptr + rows[:, None] * h_stride + r[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, rank_ptr, entries_ptr, tokens_ptr, y_ptr,
                   out_features, table_rank, h_stride, b_stride_slot, b_stride_rank, y_stride,
                   HAS_RANK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    slot, live, rows, row_ok, token, r, r_ok = _entry_block(
        entries_ptr, tokens_ptr, rank_ptr, table_rank, HAS_RANK, BLOCK_M, BLOCK_R)
    if live:
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < out_features
        bt = tl.load(b_ptr + slot.to(tl.int64) * b_stride_slot + r[:, None] * b_stride_rank
                     + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [R, N]
        ht = tl.load(h_ptr + rows[:, None] * h_stride + r[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, R] fp32
        delta = dot(ht.to(bt.dtype), bt, IEEE, UPCAST)
        y_at = y_ptr + token[:, None] * y_stride + n[None, :]
        both = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_at, mask=both, other=0.0)
        tl.store(y_at, (y.to(tl.float32) + delta).to(y.dtype), mask=both)


def _block_m(max_entry_tokens: int) -> int:
    """Token rows per program: a decode step's entries hold a few tokens, a prefill's many."""
    return MIN_DOT if max_entry_tokens <= MIN_DOT else 64


def lora_apply_triton(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      scale: torch.Tensor, rank: torch.Tensor | None, entries: torch.Tensor,
                      tokens: torch.Tensor, max_entry_tokens: int) -> bool:
    """y += the op over the plan's entries (see the module docstring), in place; False, doing
    nothing, when the call is not the kernels' kind (tensors on another device than their
    kind, a dtype they do not take, non-contiguous rows).

    y: [T, out], x: [T, in], A: [S, R, in], B: [S, R, out], scale: [S] fp32, rank: [S] int32
    or None (every slot uses all R rows), entries: [E, 3] int32, tokens: [N] int32.
    """
    if not _is_its_kind(y, x, A, B):
        return False
    E = entries.shape[0]
    if E == 0:
        return True
    R = A.shape[1]
    block_r = max(MIN_DOT, triton.next_power_of_2(R))
    block_m = _block_m(max_entry_tokens)
    token_blocks = triton.cdiv(max_entry_tokens, block_m)
    flags = dot_flags(A.dtype)
    has_rank = rank is not None and rank.numel() > 0
    rank_arg = rank if has_rank else scale  # never read without HAS_RANK
    h = torch.empty(tokens.shape[0], block_r, dtype=torch.float32, device=x.device)
    in_features, out_features = x.shape[1], y.shape[1]
    _shrink_kernel[(E, token_blocks)](
        x, A, scale, rank_arg, entries, tokens, h, in_features, R, x.stride(0), A.stride(0),
        A.stride(1), h.stride(0), HAS_RANK=has_rank, BLOCK_M=block_m,
        BLOCK_K=64, BLOCK_R=block_r, **flags)
    block_n = 64
    _expand_kernel[(E, token_blocks, triton.cdiv(out_features, block_n))](
        h, B, rank_arg, entries, tokens, y, out_features, R, h.stride(0), B.stride(0), B.stride(1),
        y.stride(0), HAS_RANK=has_rank, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_R=block_r, **flags)
    return True


def _is_its_kind(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    device = "cpu" if INTERPRETED else "cuda"
    return (all(t.device.type == device for t in (y, x, A, B))
            and A.dtype in TABLE_DTYPES and B.dtype == A.dtype
            and x.dtype in TABLE_DTYPES and y.dtype in TABLE_DTYPES
            and x.stride(1) == 1 and y.stride(1) == 1
            and A.stride(2) == 1 and B.stride(2) == 1)
