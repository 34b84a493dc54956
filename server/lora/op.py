"""The batched multi-LoRA op: every token of a packed batch gets its own adapter's low-rank update.

For a packed batch of T tokens, with slot tables padded to rank R:

    x: [T, in]   slot: [T] (-1 = base model only)   A: [S, R, in]   B: [S, R, out]   scale: [S]
    y[t] += scale[slot[t]] * (A[slot[t]] @ x[t]) @ B[slot[t]]      for every t with slot[t] >= 0

B is stored as [S, R, out] (PEFT's lora_B: [out, r], transposed): the rank-R intermediate expands
to the output by combining R contiguous rows of out values.

`lora_reference` is that loop, the meaning of the op. `SlotMapping.build(slot)` runs once per
model step and precomputes how tokens group by slot; `lora_apply(y, x, mapping, A, B, scale)`
then runs per wrapped Linear with a handful of tensor ops:

- "heavy" slots (>= HEAVY_TOKENS tokens, e.g. a prefill) each get two plain matmuls on their rows;
- the other ("light") slots go through two batched matmuls over a padded [NB, M, *] layout
  (NB slot entries x M rows each), reading the slot table in place (a `narrow` view) when the
  light slots span a compact range, or gathering their weights otherwise.

Padded rows repeat a real token of the same entry; their scale is 0, so they add exactly 0.
A mapping may weigh each token's update (`token_weights`, a weighted mixture's): the op is linear
in x, so x is scaled once per call and every path below runs unchanged.
Tables may be fp32 or bf16: x is cast to the table dtype, the result back to y's dtype.

Two kernels serve the slots of a plan (`_KernelPlan`: tokens grouped by slot) instead:

- on the CPU, a C++ kernel (`server.lora.cpu_kernel`) for the slots with fewer than
  `LoraKernel.max_tokens` tokens: it reads each slot's table rows in place (fp32 math whatever
  the table dtype) and skips the zero rows past each slot's rank;
- on CUDA, Triton shrink and expand kernels (`server.lora.triton_kernel`) for every slot; on
  CPU tensors they run in Triton's interpreter, which is how tests check them without a GPU.

A kernel takes a call only when it is its kind (its device, dtypes it takes); any other call
runs the PyTorch path. `select_kernel(mode, device)` chooses once, at engine start
(`--lora-kernel`); it is the one place that knows which kernel serves which device:

- `auto` (default): on the CPU the C++ kernel for the slots with fewer than KERNEL_MAX_TOKENS
  tokens and PyTorch segments for the larger ones; on CUDA the Triton kernels;
- `cpp`: the C++ kernel for every slot (CPU only);
- `triton`: the Triton kernels (on a CPU device, interpreted: slow, for tests);
- `torch`: never a kernel.

If the chosen kernel cannot be built or imported (no compiler, no Triton, ...) under `auto`,
one warning is logged and PyTorch serves every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from server.host_to_device import upload
from server.lora import cpu_kernel as lora_cpu_kernel
from server.triton_support import load_kernels

HEAVY_TOKENS = 32
"""A slot with at least this many tokens gets its own two matmuls; fewer, it joins the padded
batch: batching wins for several small slots, a lone large slot (a prefill) is best alone
(`python -m benchmarks.lora_op_micro` measures both)."""

SPAN_SLACK = 2
"""Light slots read the table in place when their span is at most SPAN_SLACK x their count."""

KERNEL_MAX_TOKENS = 1024
"""In `auto` mode, a slot with fewer tokens than this goes to the C++ kernel, else to PyTorch:
about where the two tie with fp32 tables (`python -m benchmarks.lora_op_micro` measures both)."""


@dataclass(frozen=True)
class LoraKernel:
    """A kernel as chosen at engine start: it serves slots with fewer than `max_tokens` tokens.
    `run(y, x, A, B, scale, rank, plan)` returns False, doing nothing, when the call is not its
    kind."""

    name: str  # cpp, triton
    run: Callable[..., bool]
    max_tokens: float


def select_kernel(mode: str, device: torch.device | str) -> LoraKernel | None:
    """The kernel for `mode` (auto, cpp, triton, torch) on `device`, built or loaded now;
    None: PyTorch serves every call."""
    if mode not in ("auto", "cpp", "triton", "torch"):
        raise ValueError(f"the LoRA kernel mode must be auto, cpp, triton or torch, not {mode!r}")
    kind = torch.device(device).type
    if mode == "torch":
        return None
    if mode == "triton" or (mode == "auto" and kind == "cuda"):
        return _triton_kernel(kind, required=mode == "triton")
    if kind != "cpu":
        if mode == "cpp":
            raise ValueError(f"the C++ LoRA kernel runs on the CPU only, not on {kind}")
        return None
    module = lora_cpu_kernel.load()
    if module is None:
        return None

    def run(y, x, A, B, scale, rank, plan) -> bool:
        return module.lora_apply_cpu(y, x, A, B, scale, rank, plan.entries, plan.tokens)

    return LoraKernel("cpp", run, KERNEL_MAX_TOKENS if mode == "auto" else float("inf"))


def _triton_kernel(kind: str, *, required: bool) -> LoraKernel | None:
    """The Triton kernels, compiled for CUDA or interpreted for CPU tensors; None (with a
    warning) when Triton is missing and `required` is not set."""
    kernels = load_kernels("server.lora.triton_kernel", kind, required=required,
                           what="LoRA kernels")
    if kernels is None:
        return None

    def run(y, x, A, B, scale, rank, plan) -> bool:
        return kernels.lora_apply_triton(y, x, A, B, scale, rank, plan.entries, plan.tokens,
                                         plan.max_entry_tokens)

    return LoraKernel("triton", run, float("inf"))


_NO_RANK = torch.empty(0, dtype=torch.int32)


def lora_reference(x: torch.Tensor, slot: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """The op's meaning, one token at a time, computed in fp32.

    x: [T, in], slot: [T] int (-1 = no adapter), A: [S, R, in], B: [S, R, out], scale: [S].
    Returns delta: [T, out] with delta[t] = scale[s] * (A[s] @ x[t]) @ B[s] for s = slot[t] >= 0,
    and delta[t] = 0 for s = -1.
    """
    delta = torch.zeros(x.shape[0], B.shape[2], dtype=torch.float32, device=x.device)
    for t, s in enumerate(slot.tolist()):
        if s < 0:
            continue
        h = A[s].float() @ x[t].float()  # [R]
        delta[t] = scale[s].float() * (h @ B[s].float())  # [out]
    return delta


@dataclass(frozen=True)
class _Segment:
    """One heavy slot: its tokens are x[start:stop] when `rows` is None, else x[rows]."""

    slot: int
    start: int
    stop: int
    rows: torch.Tensor | None  # [n] token indices, when not contiguous


@dataclass(frozen=True)
class _Batch:
    """The light slots, laid out as NB entries of M rows each.

    Entry b uses table slot `first + b` when `table_slots` is None (a view of the table), else
    `table_slots[b]` (a gather). Row (b, m) reads token src[b * M + m]; `row_scale_mask` is 0 for
    padding rows and 1 for real ones, or None when every row is real. When every token of the
    step is in the batch, the result rows are gathered back by `inverse` (cheaper than a
    scatter-add); otherwise they are scatter-added by `src` (padding rows add 0).
    """

    first: int
    table_slots: torch.Tensor | None  # [NB]
    num_entries: int  # NB
    rows_per_entry: int  # M
    src: torch.Tensor  # [NB * M] token index of each row
    row_scale_mask: torch.Tensor | None  # [NB, M, 1] fp32 0/1
    inverse: torch.Tensor | None  # [T] the row of each token, when every token has one row
    identity: bool  # src == arange(NB * M), every row real: x[:NB * M] as is, no scatter


@dataclass(frozen=True)
class _KernelPlan:
    """A kernel's share of a step: entry e is slot entries[e, 0] for the tokens
    tokens[entries[e, 1]:entries[e, 2]]; the slots too big for it stay PyTorch `segments`.

    `run(y, x, A, B, scale, rank, plan)` is the kernel; it returns False, doing nothing, when
    the call is not its kind.
    """

    run: Callable[..., bool]
    entries: torch.Tensor  # [E, 3] int32 (slot, begin, end)
    tokens: torch.Tensor  # [N] int32 token indices, grouped by slot
    max_entry_tokens: int  # the most tokens of one entry
    segments: tuple[_Segment, ...]


@dataclass(frozen=True)
class SlotMapping:
    """How the tokens of one model step group by slot; built once, shared by every LoRA layer.

    `segments` + `batch` cover every slot in PyTorch; `kernel`, when set, covers them all too
    (kernel entries + its own segments), and lora_apply takes it when the call qualifies.
    """

    num_tokens: int
    has_lora: bool  # False when every slot is -1: callers skip all LoRA work
    segments: tuple[_Segment, ...]
    batch: _Batch | None
    kernel: _KernelPlan | None = None
    rows: torch.Tensor | None = None  # [T] long, slot + 1 of each token (0 = base): row indices
                                      # of per-slot tables whose row 0 is the base's
    present: frozenset[int] = frozenset()  # the slots (>= 0) this step uses
    token_weights: torch.Tensor | None = None  # [T, 1] fp32: each token's update is scaled by
                                               # it (a mixture's weight); None: all 1

    @staticmethod
    def build(slot: torch.Tensor, kernel: LoraKernel | None = None,
              host: list[int] | None = None,
              weights: list[float] | None = None) -> "SlotMapping":
        """slot: [T] int, -1 = base model only; kernel: from `select_kernel`, None = PyTorch;
        host: the same slots as a host list, when the caller has them (no device read);
        weights: [T] each token's weight (None: all 1)."""
        slot = slot.reshape(-1).long()
        slots = slot.tolist() if host is None else host
        groups: dict[int, list[int]] = {}
        for t, s in enumerate(slots):
            if s >= 0:
                groups.setdefault(s, []).append(t)
        heavy = {s: rows for s, rows in groups.items() if len(rows) >= HEAVY_TOKENS}
        light = {s: rows for s, rows in groups.items() if len(rows) < HEAVY_TOKENS}
        segments = tuple(_segment(s, rows, slot.device) for s, rows in sorted(heavy.items()))
        batch = _batch(light, len(slots), slot.device) if light else None
        plan = None
        if groups and kernel is not None:
            plan = _kernel_plan(kernel, groups, slot.device)
        token_weights = None
        if weights is not None and groups:
            token_weights = upload(torch.tensor(weights, dtype=torch.float32).view(-1, 1),
                                   slot.device)
        return SlotMapping(len(slots), bool(groups), segments, batch, plan, slot + 1,
                           frozenset(groups), token_weights)


def _segment(s: int, rows: list[int], device: torch.device) -> _Segment:
    if rows[-1] - rows[0] + 1 == len(rows):
        return _Segment(s, rows[0], rows[-1] + 1, None)
    return _Segment(s, rows[0], rows[-1] + 1, upload(torch.tensor(rows), device))


def _kernel_plan(kernel: LoraKernel, groups: dict[int, list[int]],
                 device: torch.device) -> _KernelPlan:
    entries, tokens, segments = [], [], []
    for s, rows in sorted(groups.items()):
        if len(rows) < kernel.max_tokens:
            entries.append((s, len(tokens), len(tokens) + len(rows)))
            tokens += rows
        else:
            segments.append(_segment(s, rows, device))
    longest = max((end - begin for _, begin, end in entries), default=0)
    return _KernelPlan(kernel.run,
                       upload(torch.tensor(entries, dtype=torch.int32).view(-1, 3), device),
                       upload(torch.tensor(tokens, dtype=torch.int32), device), longest,
                       tuple(segments))


def _batch(light: dict[int, list[int]], num_tokens: int, device: torch.device) -> _Batch:
    order = sorted(light)
    first, span = order[0], order[-1] - order[0] + 1
    entries = range(first, first + span) if span <= SPAN_SLACK * len(order) else order
    m = max(len(rows) for rows in light.values())
    any_row = light[order[0]][0]
    src, real = [], []
    for s in entries:
        rows = light.get(s, [any_row])
        src += rows + [rows[0]] * (m - len(rows))
        real += [s in light] * len(rows) + [False] * (m - len(rows))
    table_slots = (None if span <= SPAN_SLACK * len(order)
                   else upload(torch.tensor(order), device))
    mask = None
    if not all(real):
        mask = upload(torch.tensor(real, dtype=torch.float32).view(len(entries), m, 1), device)
    identity = mask is None and src == list(range(len(src)))
    inverse = None
    if sum(len(rows) for rows in light.values()) == num_tokens:
        row_of = [0] * num_tokens
        for row, (t, is_real) in enumerate(zip(src, real)):
            if is_real:
                row_of[t] = row
        inverse = upload(torch.tensor(row_of), device)
    return _Batch(first, table_slots, len(entries), m, upload(torch.tensor(src), device), mask,
                  inverse, identity)


def lora_apply(y: torch.Tensor, x: torch.Tensor, mapping: SlotMapping, A: torch.Tensor,
               B: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor | None = None) -> None:
    """y += the op (see `lora_reference`), in place, in y's dtype.

    y: [T, out], x: [T, in] (leading dims are flattened), A: [S, R, in], B: [S, R, out],
    scale: [S] fp32. A and B share a dtype (fp32 or bf16). rank: [S] int32 or None; when given,
    rows >= rank[s] of A[s] and B[s] must be zero, and the C++ kernel skips them.
    """
    if not mapping.has_lora:
        return
    if x.dim() != 2:
        x, y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # [T, in], [T, out]
    if mapping.token_weights is not None:  # the op is linear in x: w·Δ(x) = Δ(w·x)
        x = x * mapping.token_weights.to(x.dtype)
    plan = mapping.kernel
    if plan is not None and plan.run(y, x, A, B, scale, _NO_RANK if rank is None else rank,
                                     plan):
        for seg in plan.segments:
            _apply_segment(y, x, seg, A, B, scale)
        return
    for seg in mapping.segments:
        _apply_segment(y, x, seg, A, B, scale)
    if mapping.batch is not None:
        _apply_batch(y, x, mapping.batch, A, B, scale)


def _apply_segment(y: torch.Tensor, x: torch.Tensor, seg: _Segment, A: torch.Tensor,
                   B: torch.Tensor, scale: torch.Tensor) -> None:
    s = seg.slot
    if seg.rows is None:
        xs = x[seg.start:seg.stop]  # [n, in]
    else:
        xs = x.index_select(0, seg.rows)
    h = xs.to(A.dtype) @ A[s].t()  # [n, R]
    h.mul_(scale[s])
    if seg.rows is None and y.dtype == B.dtype:
        y[seg.start:seg.stop].addmm_(h, B[s])
        return
    out = (h @ B[s]).to(y.dtype)  # [n, out]
    if seg.rows is None:
        y[seg.start:seg.stop] += out
    else:
        y.index_add_(0, seg.rows, out)


def _apply_batch(y: torch.Tensor, x: torch.Tensor, b: _Batch, A: torch.Tensor, B: torch.Tensor,
                 scale: torch.Tensor) -> None:
    nb, m, n = b.num_entries, b.rows_per_entry, b.num_entries * b.rows_per_entry
    wa, wb, sc = _entry_tables(b, A, B, scale)  # [NB, R, in], [NB, R, out], [NB]
    xg = x[:n] if b.identity else x.index_select(0, b.src)  # [NB * M, in]
    h = torch.bmm(xg.to(A.dtype).view(nb, m, -1), wa.transpose(1, 2))  # [NB, M, R]
    row_scale = sc.view(nb, 1, 1)
    if b.row_scale_mask is not None:
        row_scale = row_scale * b.row_scale_mask  # [NB, M, 1]
    h.mul_(row_scale)
    if b.identity and y.dtype == wb.dtype and y.is_contiguous():
        y[:n].view(nb, m, -1).baddbmm_(h, wb)
        return
    out = torch.bmm(h, wb).view(n, -1)  # [NB * M, out]
    if b.identity:
        y[:n] += out
    elif b.inverse is not None:
        y += out.index_select(0, b.inverse)
    else:
        y.index_add_(0, b.src, out.to(y.dtype))


def _entry_tables(b: _Batch, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor):
    """The tables of the batch's NB entries: the whole table, a view of it, or a gather."""
    if b.table_slots is not None:
        idx = b.table_slots
        return A.index_select(0, idx), B.index_select(0, idx), scale.index_select(0, idx)
    if b.num_entries == A.shape[0]:
        return A, B, scale
    nb = b.num_entries
    return A.narrow(0, b.first, nb), B.narrow(0, b.first, nb), scale.narrow(0, b.first, nb)
