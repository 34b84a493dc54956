"""The Triton LoRA kernels (server/lora/triton_kernel.py), which serve the op on CUDA, run here in
Triton's interpreter on CPU tensors: what only they do, beyond the slot patterns that
tests/test_lora_op.py runs through every strategy.

    y[t] += scale[slot[t]] * (A[slot[t]] @ x[t]) @ B[slot[t]]    for slot[t] >= 0
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.lora import op as lora_op
from server.lora.op import SlotMapping, lora_apply, lora_reference, select_kernel

S = 6


@pytest.fixture(scope="module")
def triton_kernel():
    kernel = select_kernel("triton", "cpu")
    assert kernel is not None and kernel.name == "triton" and kernel.max_tokens == float("inf")
    return kernel


def tables(n_in, n_out, R, ranks, gen, dtype=torch.float32, garbage_past_rank=False):
    """A: [S, R, in], B: [S, R, out], scale: [S], rank: [S] int32; slot s has rank ranks[s] (0 =
    empty). With garbage_past_rank, the rows past each rank hold noise the kernels must skip."""
    A = torch.randn(S, R, n_in, generator=gen) / n_in ** 0.5
    B = torch.randn(S, R, n_out, generator=gen)
    rank = torch.tensor(ranks, dtype=torch.int32)
    if not garbage_past_rank:
        for s, r in enumerate(ranks):
            A[s, r:], B[s, r:] = 0, 0
    scale = torch.rand(S, generator=gen) + 0.5
    return A.to(dtype), B.to(dtype), scale, rank


def truncated(A, B, rank):
    """The tables with each slot's rows past its rank zeroed: what the op means."""
    A, B = A.clone(), B.clone()
    for s, r in enumerate(rank.tolist()):
        A[s, r:], B[s, r:] = 0, 0
    return A, B


def apply(kernel, x, slot, A, B, scale, rank, y_dtype=torch.float32):
    y = torch.randn(x.shape[0], B.shape[2], generator=torch.Generator().manual_seed(1)).to(y_dtype)
    before = y.clone()
    lora_apply(y, x, SlotMapping.build(slot, kernel), A, B, scale, rank)
    return y.float() - before.float()


@pytest.mark.parametrize("n_in,n_out,R", [(70, 90, 5), (64, 33, 16), (130, 200, 24), (17, 16, 64)],
                         ids=["odd", "out-33", "in-130-out-200", "rank-64"])
def test_odd_shapes_and_mixed_ranks_match_the_reference(triton_kernel, n_in, n_out, R):
    gen = torch.Generator().manual_seed(n_in + n_out)
    ranks = [R, 1, 0, max(1, R // 2), R, 3 if R >= 3 else 1]  # slot 2 is empty
    A, B, scale, rank = tables(n_in, n_out, R, ranks, gen)
    slot = torch.randint(-1, S, (29,), generator=gen)
    x = torch.randn(29, n_in, generator=gen)
    torch.testing.assert_close(apply(triton_kernel, x, slot, A, B, scale, rank),
                               lora_reference(x, slot, A, B, scale), rtol=1e-5, atol=1e-5)


def test_rows_past_a_slots_rank_are_never_read(triton_kernel):
    gen = torch.Generator().manual_seed(3)
    A, B, scale, rank = tables(48, 40, 16, [16, 4, 1, 9, 0, 12], gen, garbage_past_rank=True)
    slot = torch.tensor([0, 1, 2, 3, 4, 5, -1, 1, 3])
    x = torch.randn(9, 48, generator=gen)
    A_meant, B_meant = truncated(A, B, rank)
    torch.testing.assert_close(apply(triton_kernel, x, slot, A, B, scale, rank),
                               lora_reference(x, slot, A_meant, B_meant, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 16, 17, 64, 150], ids=lambda n: f"{n}-tokens")
def test_one_slot_over_several_token_blocks(triton_kernel, tokens):
    """Decode entries (<= 16 tokens) and prefill chunks (blocks of 64) in one step."""
    gen = torch.Generator().manual_seed(tokens)
    A, B, scale, rank = tables(40, 24, 8, [8, 8, 2, 5, 8, 1], gen)
    decodes = torch.tensor([0, 2, -1, 5])
    slot = torch.cat([torch.full((tokens,), 3), decodes, torch.full((tokens,), 1)])
    x = torch.randn(len(slot), 40, generator=gen)
    torch.testing.assert_close(apply(triton_kernel, x, slot, A, B, scale, rank),
                               lora_reference(x, slot, A, B, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["x-fp32", "x-bf16", "x-fp16"])
def test_half_tables_and_activations(triton_kernel, table_dtype, act_dtype):
    """x is rounded to the tables' dtype and the rank-R intermediate to it again, as in the
    PyTorch path; the sums are fp32 and y gets one rounding to its dtype."""
    gen = torch.Generator().manual_seed(11)
    A, B, scale, rank = tables(64, 48, 16, [16, 8, 0, 4, 16, 2], gen, dtype=table_dtype)
    slot = torch.randint(-1, S, (21,), generator=gen)
    x = torch.randn(21, 64, generator=gen).to(act_dtype)
    expected = lora_reference(x, slot, A, B, scale)
    got = apply(triton_kernel, x, slot, A, B, scale, rank, y_dtype=act_dtype)
    tol = 2e-2 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=tol)


def test_base_only_tokens_and_an_empty_slot_add_exactly_nothing(triton_kernel):
    gen = torch.Generator().manual_seed(5)
    A, B, scale, rank = tables(32, 16, 8, [8, 0, 8, 8, 8, 8], gen)
    slot = torch.tensor([-1, 1, -1, 1])
    x = torch.randn(4, 32, generator=gen)
    assert torch.equal(apply(triton_kernel, x, slot, A, B, scale, rank), torch.zeros(4, 16))


def test_calls_not_its_kind_fall_back_to_pytorch(triton_kernel):
    """Integer tables are no dtype the kernels take: the PyTorch path serves the call."""
    gen = torch.Generator().manual_seed(6)
    A, B, scale, rank = tables(16, 16, 4, [4] * S, gen, dtype=torch.float64)
    slot = torch.tensor([0, 3, -1])
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    y = torch.zeros(3, 16, dtype=torch.float64)
    mapping = SlotMapping.build(slot, triton_kernel)
    assert not mapping.kernel.run(y, x, A, B, scale, rank, mapping.kernel)
    lora_apply(y, x, mapping, A, B, scale, rank)
    torch.testing.assert_close(y.float(), lora_reference(x, slot, A, B, scale), rtol=1e-5,
                               atol=1e-5)


def test_the_device_chooses_the_kernel(monkeypatch):
    """One place decides: CUDA gets Triton under auto, the CPU the C++ kernel; cpp is CPU-only."""
    chosen = []
    monkeypatch.setattr(lora_op, "_triton_kernel",
                        lambda kind, required: chosen.append((kind, required)) or "triton")
    assert select_kernel("auto", "cuda") == "triton"
    assert select_kernel("triton", "cpu") == "triton"
    assert chosen == [("cuda", False), ("cpu", True)]
    assert select_kernel("torch", "cuda") is None
    with pytest.raises(ValueError, match="CPU only"):
        select_kernel("cpp", "cuda")
    cpu = select_kernel("auto", "cpu")
    assert cpu is None or cpu.name == "cpp"


def test_every_triton_kernel_compiles_for_an_h100_without_a_gpu():
    """The interpreter runs the kernels' Python; this compiles them as a GPU machine would
    (Triton's compiler and ptxas need no device), in a process outside interpreter mode."""
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "triton_compile_check.py")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "cubin" in line]
    assert len(lines) == 9, done.stdout  # shrink, expand, attention x fp32, bf16, fp16
    assert all(int(line.split("cubin ")[1].split()[0]) > 0 for line in lines)
