"""Decode attention (one query per sequence) equals SDPA with GQA and a mask; in bf16 it is the
fp32 result rounded once to bf16 (the scores and softmax stay fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.model.step import decode_attention

B, HEADS, KV_HEADS, D, L = 5, 6, 2, 16, 40


def inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, 1, D, generator=gen).to(dtype)
    k = torch.randn(B, KV_HEADS, L, D, generator=gen).to(dtype)
    v = torch.randn(B, KV_HEADS, L, D, generator=gen).to(dtype)
    ends = torch.tensor([40, 1, 17, 33, 8])  # context lengths: full, one key, partial
    key = torch.arange(L)
    mask = (key[None, :] < ends[:, None]) & (ends[:, None] - 1 - key[None, :] < 12)  # window 12
    return q, k, v, mask[:, None, None, :]


def reference(q, k, v, mask):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          scale=0.3, enable_gqa=True)


def test_fp32_equals_sdpa():
    q, k, v, mask = inputs(torch.float32)
    torch.testing.assert_close(decode_attention(q, k, v, mask, 0.3), reference(q, k, v, mask),
                               rtol=1e-5, atol=1e-6)


def test_bf16_is_the_fp32_result_rounded_once():
    q, k, v, mask = inputs(torch.bfloat16)
    out = decode_attention(q, k, v, mask, 0.3)
    assert out.dtype == torch.bfloat16 and out.shape == (B, HEADS, 1, D)
    want = reference(q, k, v, mask)
    assert ((out.float() - want).abs() <= 2**-8 * want.abs() + 1e-6).all()
