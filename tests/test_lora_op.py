"""The batched LoRA op: the fast path `lora_apply` computes exactly what the per-token loop
`lora_reference` defines, for every slot pattern and every strategy (PyTorch segments, padded
batch, the C++ CPU kernel in `auto` and `cpp` modes, and the Triton kernels in the interpreter).

    y[t] += scale[slot[t]] * (A[slot[t]] @ x[t]) @ B[slot[t]]    for slot[t] >= 0
"""

from __future__ import annotations

import pytest
import torch

from server.lora import op as lora_op
from server.lora.op import SlotMapping, lora_apply, lora_reference, select_kernel

S = 8  # slot table size used by these tests

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_REL_TOL = 2e-2
"""bf16 tables: x and the rank-R intermediate are rounded to bf16 (8 mantissa bits) inside the
fast path, so it may differ from the fp32 reference by up to 2% of the largest delta."""


def make_tables(n_in: int, n_out: int, R: int, gen: torch.Generator, dtype=torch.float32):
    """Slot tables of S adapters with random ranks <= R, zero-padded to R, and random scales.

    A: [S, R, in], B: [S, R, out], scale: [S]; the last slot is empty (zeros, scale 0).
    """
    A = torch.zeros(S, R, n_in)
    B = torch.zeros(S, R, n_out)
    scale = torch.rand(S, generator=gen) * 4
    for s in range(S - 1):
        r = int(torch.randint(1, R + 1, (1,), generator=gen))
        A[s, :r] = torch.randn(r, n_in, generator=gen) / n_in ** 0.5
        B[s, :r] = torch.randn(r, n_out, generator=gen)
    scale[S - 1] = 0.0
    return A.to(dtype), B.to(dtype), scale


def fast_delta(x, slot, A, B, scale, kernel=None) -> torch.Tensor:
    """What lora_apply adds to a random y, computed as y_after - y_before."""
    gen = torch.Generator().manual_seed(123)
    y = torch.randn(x.shape[0], B.shape[2], generator=gen)
    y_before = y.clone()
    lora_apply(y, x, SlotMapping.build(slot, kernel), A, B, scale)
    return y - y_before


def pattern(name: str, gen: torch.Generator) -> torch.Tensor:
    """slot: [T] for a named slot pattern, over a table of S slots."""
    if name == "rows with -1":
        return torch.randint(-1, S, (37,), generator=gen)
    if name == "repeated slots":
        return torch.randint(0, S, (40,), generator=gen)
    if name == "one slot for all":
        return torch.full((25,), 3)
    if name == "all distinct":
        return torch.randperm(S, generator=gen)
    if name == "T=1":
        return torch.tensor([5])
    if name == "slots in token order (identity)":
        return torch.arange(S)
    if name == "sorted slots, base-only tokens last":
        return torch.tensor([0, 1, 2, 3, -1, -1])
    if name == "two far-apart slots":
        return torch.tensor([0, 7, 7, 0, -1, 7])
    if name == "large T: two prefills + decodes":
        decode = torch.randint(-1, S, (40,), generator=gen)
        return torch.cat([torch.full((300,), 2), decode, torch.full((260,), 6)])
    raise ValueError(name)


PATTERNS = ["rows with -1", "repeated slots", "one slot for all", "all distinct", "T=1",
            "slots in token order (identity)", "sorted slots, base-only tokens last",
            "two far-apart slots",
            "large T: two prefills + decodes"]

STRATEGIES = {
    "torch default": dict(kernel="torch"),
    "torch all segments": dict(kernel="torch", HEAVY_TOKENS=1),
    "torch all batched, table view": dict(kernel="torch", HEAVY_TOKENS=10**9, SPAN_SLACK=10**9),
    "torch all batched, gathered weights": dict(kernel="torch", HEAVY_TOKENS=10**9, SPAN_SLACK=0),
    "auto (kernel for light slots)": dict(kernel="auto"),
    "cpp (kernel for every slot)": dict(kernel="cpp"),
    "triton (CUDA kernels, interpreted)": dict(kernel="triton"),
}
"""The C++ strategies run PyTorch where the kernel cannot be built (tests/test_lora_cpu_kernel.py
checks that it is built wherever a compiler is); the Triton one runs the CUDA kernels in Triton's
interpreter (tests/test_lora_triton_kernel.py has the cases only they have)."""


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, monkeypatch):
    """Forces lora_apply through one strategy (the mapping picks it at build time); returns the
    kernel to build mappings with."""
    settings = dict(STRATEGIES[request.param])
    kernel = select_kernel(settings.pop("kernel"), "cpu")
    for name, value in settings.items():
        monkeypatch.setattr(lora_op, name, value)
    return kernel


def test_reference_is_the_formula_on_a_hand_computed_example():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # [T=3, in=2]
    slot = torch.tensor([1, -1, 0])
    A = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [S=2, R=1, in=2]
    B = torch.tensor([[[1.0, 10.0]], [[2.0, 3.0]]])  # [S=2, R=1, out=2]
    scale = torch.tensor([0.5, 2.0])
    expected = torch.tensor([
        [2.0 * 2.0 * 2.0, 2.0 * 3.0 * 2.0],  # slot 1: h = x[1] = 2
        [0.0, 0.0],  # no adapter
        [0.5 * 1.0 * 5.0, 0.5 * 10.0 * 5.0],  # slot 0: h = x[0] = 5
    ])
    torch.testing.assert_close(lora_reference(x, slot, A, B, scale), expected)


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("n_in,n_out,R", [(48, 80, 16), (96, 24, 8)])
def test_fast_path_equals_reference_fp32(strategy, name, n_in, n_out, R):
    gen = torch.Generator().manual_seed(PATTERNS.index(name) * 1000 + n_in)
    slot = pattern(name, gen)
    A, B, scale = make_tables(n_in, n_out, R, gen)
    x = torch.randn(len(slot), n_in, generator=gen)
    expected = lora_reference(x, slot, A, B, scale)
    torch.testing.assert_close(fast_delta(x, slot, A, B, scale, strategy), expected, **FP32_TOL)


@pytest.mark.parametrize("name", PATTERNS)
def test_fast_path_with_bf16_tables_matches_reference_on_the_same_rounded_tables(strategy, name):
    gen = torch.Generator().manual_seed(PATTERNS.index(name))
    slot = pattern(name, gen)
    A, B, scale = make_tables(64, 40, 16, gen, dtype=torch.bfloat16)
    x = torch.randn(len(slot), 64, generator=gen)
    expected = lora_reference(x, slot, A, B, scale)  # fp32 math on the bf16 values
    tol = BF16_REL_TOL * float(expected.abs().max())
    torch.testing.assert_close(fast_delta(x, slot, A, B, scale, strategy), expected, rtol=BF16_REL_TOL,
                               atol=tol)


def test_padding_a_rank_4_adapter_to_rank_16_changes_nothing(strategy):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(4, 32, generator=gen)  # lora_A: [r=4, in]
    b = torch.randn(24, 4, generator=gen)  # lora_B: [out, r=4]
    x = torch.randn(10, 32, generator=gen)
    unpadded = 2.0 * (x @ a.t()) @ b.t()  # [T, out]
    A = torch.zeros(S, 16, 32)
    B = torch.zeros(S, 16, 24)
    A[3, :4], B[3, :4] = a, b.t()
    scale = torch.zeros(S)
    scale[3] = 2.0
    slot = torch.full((10,), 3)
    torch.testing.assert_close(fast_delta(x, slot, A, B, scale, strategy), unpadded, **FP32_TOL)


@pytest.mark.parametrize("slot", [torch.full((12,), -1), torch.empty(0, dtype=torch.long)],
                         ids=["all -1", "no tokens"])
def test_base_only_step_has_no_lora_and_leaves_y_unchanged(slot):
    gen = torch.Generator().manual_seed(5)
    A, B, scale = make_tables(16, 8, 4, gen)
    x = torch.randn(len(slot), 16, generator=gen)
    y = torch.randn(len(slot), 8, generator=gen)
    y_before = y.clone()
    mapping = SlotMapping.build(slot)
    assert not mapping.has_lora
    lora_apply(y, x, mapping, A, B, scale)
    assert torch.equal(y, y_before)


def test_result_is_added_in_place_in_y_dtype():
    gen = torch.Generator().manual_seed(6)
    A, B, scale = make_tables(32, 16, 8, gen)
    slot = torch.tensor([0, 1, -1, 1])
    x = torch.randn(4, 32, generator=gen)
    y = torch.randn(4, 16, generator=gen).to(torch.bfloat16)
    y_before, storage = y.clone(), y.data_ptr()
    lora_apply(y, x, SlotMapping.build(slot), A, B, scale)
    assert y.dtype == torch.bfloat16 and y.data_ptr() == storage
    expected = (y_before.float() + lora_reference(x, slot, A, B, scale)).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)


def test_leading_batch_dims_are_flattened():
    gen = torch.Generator().manual_seed(7)
    A, B, scale = make_tables(32, 16, 8, gen)
    slot = torch.tensor([2, -1, 0, 2, 5])
    x = torch.randn(1, 5, 32, generator=gen)  # [batch=1, T, in]
    y = torch.zeros(1, 5, 16)
    lora_apply(y, x, SlotMapping.build(slot), A, B, scale)
    torch.testing.assert_close(y[0], lora_reference(x[0], slot, A, B, scale), **FP32_TOL)


def test_mapping_gives_each_prefill_its_own_contiguous_segment():
    slot = torch.cat([torch.full((100,), 4), torch.tensor([1, -1, 3]), torch.full((50,), 0)])
    mapping = SlotMapping.build(slot)
    assert [(s.slot, s.start, s.stop, s.rows) for s in mapping.segments] == [
        (0, 103, 153, None), (4, 0, 100, None)]
    assert mapping.batch.num_entries == 3 and mapping.batch.rows_per_entry == 1


def test_mapping_reads_the_table_in_place_for_distinct_decode_tokens():
    slot = torch.randperm(32, generator=torch.Generator().manual_seed(8))
    batch = SlotMapping.build(slot).batch
    assert batch.table_slots is None  # a narrow() view of the table, no weight gather
    assert (batch.first, batch.num_entries, batch.rows_per_entry) == (0, 32, 1)
    assert batch.row_scale_mask is None
