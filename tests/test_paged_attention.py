"""The Triton decode-attention kernel (server/model/triton_attention.py), which serves decode
steps on CUDA, run here in Triton's interpreter on CPU tensors: reading the paged cache through
the block tables, it equals attention over each sequence's gathered context (GQA, sliding
windows, any block size, 16-bit caches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model.step import select_decode_attention

SCALE = 0.125


@pytest.fixture(scope="module")
def paged_decode():
    kernel = select_decode_attention("triton", "cpu")
    assert kernel is not None
    return kernel


def paged_cache(lengths, *, heads, kv_heads, D, block_size, dtype, gen):
    """q: [B, heads, D]; k, v caches [kv_heads, rows, D] whose blocks are handed out shuffled;
    block tables [B, n] padded with block 0, as the engine pads them."""
    blocks = [-(-n // block_size) for n in lengths]
    total = sum(blocks) + 3  # spare blocks that no sequence owns
    order = torch.randperm(total, generator=gen).tolist()
    tables = torch.zeros(len(lengths), max(blocks), dtype=torch.long)
    for b, n in enumerate(blocks):
        tables[b, :n] = torch.tensor(order[:n])
        order = order[n:]
    k = torch.randn(kv_heads, total * block_size, D, generator=gen).to(dtype)
    v = torch.randn(kv_heads, total * block_size, D, generator=gen).to(dtype)
    q = torch.randn(len(lengths), heads, D, generator=gen).to(dtype)
    return q, k, v, tables


def reference(q, k, v, tables, lengths, block_size, window):
    """Each sequence's context gathered position by position, then SDPA in fp32."""
    heads, kv_heads = q.shape[1], k.shape[0]
    out = []
    for b, n in enumerate(lengths):
        rows = [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(n)]
        kb, vb = k[:, rows].float(), v[:, rows].float()  # [kv_heads, n, D]
        pos = torch.arange(n)
        mask = torch.ones(n, dtype=torch.bool) if window is None else (n - 1 - pos < window)
        o = F.scaled_dot_product_attention(q[b, :, None].float(), kb, vb, attn_mask=mask,
                                           scale=SCALE, enable_gqa=heads != kv_heads)
        out.append(o[:, 0])
    return torch.stack(out)  # [B, heads, D]


LENGTHS = [1, 16, 17, 64, 65, 150]
"""One key, a block boundary, the kernel's 64-position tile boundary, several tiles."""


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2)], ids=["mha", "gqa-3", "gqa-4"])
@pytest.mark.parametrize("block_size", [4, 16, 128])
@pytest.mark.parametrize("window", [None, 5, 70], ids=["full", "window-5", "window-70"])
def test_fp32_equals_attention_over_the_gathered_context(paged_decode, heads, kv_heads,
                                                         block_size, window):
    gen = torch.Generator().manual_seed(heads * 1000 + block_size)
    q, k, v, tables = paged_cache(LENGTHS, heads=heads, kv_heads=kv_heads, D=32,
                                  block_size=block_size, dtype=torch.float32, gen=gen)
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    got = paged_decode(q, k, v, tables, lens, block_size, SCALE, window)
    torch.testing.assert_close(got, reference(q, k, v, tables, LENGTHS, block_size, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_caches_within_rounding(paged_decode, dtype):
    """Scores and the softmax stay fp32; the weights meet V rounded to its dtype."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, tables = paged_cache(LENGTHS, heads=6, kv_heads=2, D=24, block_size=16,
                                  dtype=dtype, gen=gen)
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    got = paged_decode(q, k, v, tables, lens, 16, SCALE, None)
    assert got.dtype == dtype and got.shape == q.shape
    want = reference(q, k, v, tables, LENGTHS, 16, None)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_the_device_chooses_the_attention():
    assert select_decode_attention("auto", "cpu") is None
    assert select_decode_attention("torch", "cuda") is None
    with pytest.raises(ValueError, match="must be one of"):
        select_decode_attention("flash", "cpu")
