"""The C++ CPU kernel of the batched LoRA op equals `lora_reference`; without it, PyTorch serves.

The kernel is built once per machine (~10 s, into torch's extension cache); later runs load it.
Its math is fp32 whatever the table dtype, so bf16 tables are held to an fp32 tolerance against
the reference computed on the same bf16 values.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from server.lora import cpu_kernel as lora_cpu_kernel, op as lora_op
from server.lora.layer import LoraContext, MultiLoraLinear
from server.lora.op import LoraKernel, SlotMapping, lora_apply, lora_reference, select_kernel

S = 8
TOL = dict(rtol=1e-5, atol=1e-5)
"""Relative to the largest |delta|: fp32 sums in another order (observed <= 3e-7)."""


@pytest.fixture(scope="module")
def kernel():
    module = lora_cpu_kernel.load()
    if module is None:
        pytest.skip("the C++ kernel could not be built here (see the logged warning)")
    return module


def test_kernel_builds_where_a_compiler_and_ninja_exist():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or no ninja: the PyTorch path serves")
    assert lora_cpu_kernel.load() is not None


def make_tables(n_in, n_out, R, gen, dtype, garbage_past_rank=False):
    """A: [S, R, in], B: [S, R, out], scale: [S], rank: [S] int32 of random ranks <= R.

    Rows past a slot's rank are zero, or random garbage (which a kernel given `rank` must skip);
    slot S-1 is empty (rank 0, scale 0).
    """
    A = torch.randn(S, R, n_in, generator=gen) / n_in ** 0.5
    B = torch.randn(S, R, n_out, generator=gen)
    rank = torch.randint(1, R + 1, (S,), generator=gen, dtype=torch.int32)
    rank[S - 1] = 0
    scale = torch.rand(S, generator=gen) * 4
    scale[S - 1] = 0.0
    clean_A, clean_B = A.clone(), B.clone()
    for s in range(S):
        clean_A[s, rank[s]:], clean_B[s, rank[s]:] = 0, 0
    if not garbage_past_rank:
        A, B = clean_A, clean_B
    return A.to(dtype), B.to(dtype), clean_A.to(dtype), clean_B.to(dtype), scale, rank


def pattern(name: str, gen: torch.Generator) -> torch.Tensor:
    """slot: [T] over a table of S slots."""
    return {
        "rows with -1": lambda: torch.randint(-1, S, (37,), generator=gen),
        "repeated slots": lambda: torch.randint(0, S, (40,), generator=gen),
        "all distinct": lambda: torch.randperm(S, generator=gen),
        "T=1": lambda: torch.tensor([5]),
        "one slot, few tokens": lambda: torch.full((3,), 2),
        "only -1 and the empty slot": lambda: torch.tensor([-1, S - 1, -1]),
        "prefill-sized slots + decodes": lambda: torch.cat([
            torch.full((70,), 1), torch.randint(-1, S, (9,), generator=gen), torch.full((40,), 4)]),
    }[name]()


PATTERNS = ["rows with -1", "repeated slots", "all distinct", "T=1", "one slot, few tokens",
            "only -1 and the empty slot", "prefill-sized slots + decodes"]
SHAPES = [(64, 48, 16), (100, 37, 8), (33, 130, 5), (1536, 576, 16)]
"""(in, out, R): vector-width multiples, odd tails of in and out, a rank not a multiple of 4,
and a real model's down_proj."""


@pytest.fixture(params=["auto", "cpp"])
def kernel_mode(request, kernel) -> LoraKernel:
    """The kernel as an engine selects it for --lora-kernel auto and cpp."""
    return select_kernel(request.param, "cpu")


def run_lora_apply(x, slot, A, B, scale, rank, kernel):
    """(y_before, y_after) for lora_apply on a random y; asserts the kernel took the call."""
    mapping = SlotMapping.build(slot, kernel)
    assert mapping.kernel is not None
    y = torch.randn(x.shape[0], B.shape[2], generator=torch.Generator().manual_seed(9))
    y_before = y.clone()
    lora_apply(y, x, mapping, A, B, scale, rank)
    return y_before, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_in,n_out,R", SHAPES)
@pytest.mark.parametrize("name", PATTERNS)
def test_kernel_equals_reference(kernel_mode, name, n_in, n_out, R, dtype):
    gen = torch.Generator().manual_seed(PATTERNS.index(name) * 100 + n_in)
    slot = pattern(name, gen)
    A, B, _, _, scale, rank = make_tables(n_in, n_out, R, gen, dtype)
    x = torch.randn(len(slot), n_in, generator=gen)
    y_before, y = run_lora_apply(x, slot, A, B, scale, rank, kernel_mode)
    expected = lora_reference(x, slot, A, B, scale)  # fp32 math on the (bf16) table values
    atol = TOL["atol"] * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(y - y_before, expected, rtol=TOL["rtol"], atol=atol)
    base_only = slot < 0
    assert torch.equal(y[base_only], y_before[base_only])  # slot -1 rows untouched, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_past_the_rank_are_skipped(kernel_mode, dtype):
    gen = torch.Generator().manual_seed(21)
    slot = torch.randint(-1, S, (30,), generator=gen)
    A, B, clean_A, clean_B, scale, rank = make_tables(96, 64, 16, gen, dtype,
                                                      garbage_past_rank=True)
    x = torch.randn(len(slot), 96, generator=gen)
    y_before, y = run_lora_apply(x, slot, A, B, scale, rank, kernel_mode)
    expected = lora_reference(x, slot, clean_A, clean_B, scale)
    torch.testing.assert_close(y - y_before, expected, rtol=1e-5,
                               atol=1e-5 * float(expected.abs().max()))


def test_one_thread_and_strided_rows(kernel_mode):
    """torch.set_num_threads(1) runs serially; x and y may be row views of wider tensors."""
    gen = torch.Generator().manual_seed(22)
    slot = torch.randint(-1, S, (12,), generator=gen)
    A, B, _, _, scale, rank = make_tables(64, 32, 8, gen, torch.float32)
    x = torch.randn(len(slot), 80, generator=gen)[:, 8:72]  # [T, 64], row stride 80
    y = torch.zeros(len(slot), 40)[:, :32]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lora_apply(y, x, SlotMapping.build(slot, kernel_mode), A, B, scale, rank)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y, lora_reference(x, slot, A, B, scale), **TOL)


def test_auto_sends_slots_with_many_tokens_to_pytorch(monkeypatch, kernel):
    monkeypatch.setattr(lora_op, "KERNEL_MAX_TOKENS", 10)
    slot = torch.cat([torch.full((12,), 3), torch.tensor([0, 1, -1, 3])])
    plan = SlotMapping.build(slot, select_kernel("auto", "cpu")).kernel
    assert plan.entries.tolist() == [[0, 0, 1], [1, 1, 2]]
    assert [(seg.slot, seg.start, seg.stop) for seg in plan.segments] == [(3, 0, 16)]
    plan = SlotMapping.build(slot, select_kernel("cpp", "cpu")).kernel
    assert plan.entries.tolist() == [[0, 0, 1], [1, 1, 2], [3, 2, 15]] and not plan.segments


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bf16_activations_are_the_kernels_with_one_rounding_of_y(kernel_mode, table_dtype):
    """bf16 x and y: the kernel sums the update in fp32 and rounds y once; base rows untouched."""
    gen = torch.Generator().manual_seed(23)
    slot = torch.tensor([0, 1, -1, 1, 5, 5, 5, -1, 2])
    A, B, _, _, scale, rank = make_tables(96, 64, 8, gen, table_dtype)
    x = torch.randn(len(slot), 96, generator=gen).to(torch.bfloat16)
    y = torch.randn(len(slot), 64, generator=gen).to(torch.bfloat16)
    y_before = y.clone()
    mapping = SlotMapping.build(slot, kernel_mode)
    assert mapping.kernel.run(y, x, A, B, scale, rank, mapping.kernel)
    expected = (y_before.float() + lora_reference(x, slot, A, B, scale)).to(torch.bfloat16)
    assert torch.equal(y, expected) or (y.float() - expected.float()).abs().max() <= \
        2**-8 * float(expected.float().abs().max())  # one bf16 step where fp32 sums tie
    assert torch.equal(y[slot < 0], y_before[slot < 0])


def test_calls_that_are_not_the_kernels_run_pytorch(kernel_mode):
    """fp16 activations are not the kernel's: the PyTorch path serves them."""
    gen = torch.Generator().manual_seed(23)
    slot = torch.tensor([0, 1, -1, 1])
    A, B, _, _, scale, rank = make_tables(32, 16, 8, gen, torch.float32)
    x = torch.randn(4, 32, generator=gen).to(torch.float16)
    y = torch.zeros(4, 16, dtype=torch.float16)
    mapping = SlotMapping.build(slot, kernel_mode)
    assert not mapping.kernel.run(y, x, A, B, scale, rank, mapping.kernel)
    lora_apply(y, x, mapping, A, B, scale, rank)
    expected = lora_reference(x, slot, A, B, scale)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2,
                               atol=2e-2 * float(expected.abs().max()))


def test_torch_mode_selects_no_kernel_and_builds_no_plan():
    assert select_kernel("torch", "cpu") is None
    assert SlotMapping.build(torch.tensor([0, 1, 1]), None).kernel is None


def test_multi_lora_linear_stores_b_transposed_and_the_rank(kernel_mode):
    gen = torch.Generator().manual_seed(24)
    base = torch.nn.Linear(32, 24)
    layer = MultiLoraLinear(base, LoraContext(kernel_mode), max_slots=4, max_rank=16,
                            dtype=torch.bfloat16,
                            device=torch.device("cpu"))
    a = torch.randn(4, 32, generator=gen).bfloat16()  # lora_A: [r=4, in]
    b = torch.randn(24, 4, generator=gen).bfloat16()  # lora_B: [out, r=4]
    layer.set_lora(2, a, b, 0.5)
    assert layer.lora_b.shape == (4, 16, 24) and torch.equal(layer.lora_b[2, :4], b.t())
    assert layer.lora_rank.tolist() == [0, 0, 4, 0]
    x = torch.randn(3, 32, generator=gen)
    layer.context.set_step(torch.tensor([2, -1, 2]))
    has_lora = torch.tensor([[1.0], [0.0], [1.0]])
    with torch.no_grad():
        expected = base(x) + has_lora * 0.5 * (x @ a.float().t()) @ b.float().t()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.reset_lora(2)
    assert layer.lora_rank.tolist() == [0, 0, 0, 0]


def test_a_slot_reused_by_a_smaller_rank_keeps_zeros_past_the_rank():
    layer = MultiLoraLinear(torch.nn.Linear(32, 24), LoraContext(), max_slots=2, max_rank=16,
                            dtype=torch.float32, device=torch.device("cpu"))
    layer.set_lora(1, torch.ones(8, 32), torch.ones(24, 8), 1.0)
    layer.set_lora(1, torch.full((3, 32), 2.0), torch.full((24, 3), 2.0), 1.0)
    assert torch.equal(layer.lora_a[1, :3], torch.full((3, 32), 2.0))
    assert not layer.lora_a[1, 3:].any() and not layer.lora_b[1, 3:].any()
    layer.reset_lora(1)
    assert not layer.lora_a.any() and not layer.lora_b.any() and not layer.scale.any()


def test_a_failed_build_warns_once_and_pytorch_serves(failing_build, caplog):
    failing_build(lora_cpu_kernel.KERNEL)
    gen = torch.Generator().manual_seed(25)
    A, B, _, _, scale, rank = make_tables(48, 40, 8, gen, torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger=lora_cpu_kernel.__name__):
        for _ in range(3):  # three engines starting
            selected = select_kernel("cpp", "cpu")
            assert selected is None
            slot = torch.randint(-1, S, (20,), generator=gen)
            mapping = SlotMapping.build(slot, selected)
            assert mapping.kernel is None
            x = torch.randn(20, 48, generator=gen)
            y = torch.zeros(20, 40)
            lora_apply(y, x, mapping, A, B, scale, rank)
            expected = lora_reference(x, slot, A, B, scale)
            torch.testing.assert_close(y, expected, rtol=2e-2,
                                       atol=2e-2 * float(expected.abs().max()))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "c++: not found" in warnings[0].getMessage()
