"""Micro-benchmark of the batched LoRA op candidates on SmolLM2-135M module shapes (2 threads).

    .venv/bin/python -m benchmarks.lora_op_micro [--step-only] [--rounds N]

Two tables:
1. "hot": us per module call, the same tables called repeatedly (they stay in cache).
2. "step": ms per model step over all 210 modules (30 layers x q,k,v,o,gate,up,down), each with
   its own tables, so the tables come from DRAM as in a real step; the decode rows are the number
   the ~15 ms target is about. The candidates run interleaved, one step each per round.

Candidates:
- gather_bmm:   A[slot], B[slot] per token (a copy of the weights), then two bmm.
- slot_loop:    for each active slot, index_select its rows, two matmuls, index_add_.
- dense_masked: x @ (active slots' A stacked) for every token, mask to its own slot, then one
                matmul against the active slots' B stacked ([K*R, out]).
- torch:        server.lora.op.lora_apply with --lora-kernel torch (segments for heavy
                slots, padded bmm over a table view otherwise).
- cpp:          lora_apply with --lora-kernel cpp: the C++ kernel (server/lora/csrc/lora_cpu.cpp)
                for every slot.
- auto:         lora_apply as served (the default `auto`): the kernel for light slots, PyTorch
                segments for slots with >= KERNEL_MAX_TOKENS tokens.
The kernel is built once per machine; without it, cpp and auto are "n/a".
Every lora_apply candidate gets the rank array a MultiLoraLinear passes: all R, except in the
STEP case "rank 8" (adapters of rank 8 in R=16 tables, the rows past 8 zero; the kernel skips
them, the other candidates multiply them).

Timings are medians over rounds; other processes on the same cores distort them, so run it on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from server.lora import cpu_kernel as lora_cpu_kernel
from server.lora.op import SlotMapping, lora_apply, lora_reference, select_kernel

NA = "n/a"

R = 16
S = 32
MODULES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
NUM_LAYERS = 30


def case_slots(name: str, gen: torch.Generator) -> torch.Tensor:
    """slot: [T] for one of the benchmark cases."""
    if name in ("T=32, 32 distinct", "T=32, 32 x rank 8"):
        return torch.randperm(S, generator=gen)
    if name == "T=32, 4 slots":
        chosen = torch.randperm(S, generator=gen)[:4]
        return chosen.repeat(8)[torch.randperm(32, generator=gen)]
    if name == "T=512, 2 slots":
        chosen = torch.randperm(S, generator=gen)[:2]
        return chosen.repeat_interleave(256)
    if name == "T=1024, 32 x 32":
        return torch.randperm(S, generator=gen).repeat_interleave(32)
    raise ValueError(name)


CASES = ["T=32, 32 distinct", "T=32, 4 slots", "T=512, 2 slots", "T=1024, 32 x 32"]
"""Two decode steps (32 sequences on 32 or 4 adapters), two prefill steps (2 prompts of 256
tokens; 32 prompts of 32 tokens on 32 adapters)."""
STEP_CASES = CASES[:2] + ["T=32, 32 x rank 8"] + CASES[2:]


def case_rank(name: str) -> int:
    """The adapters' rank in a case (the tables are always padded to R)."""
    return 8 if "rank 8" in name else R

Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""op(y, x, A, B, scale); a candidate is make(slot, adapter_rank) -> Op, or NA."""


def gather_bmm(slot: torch.Tensor, adapter_rank: int) -> Op:
    idx = slot.clamp(min=0)  # [T]
    valid = (slot >= 0).float()  # [T]

    def op(y, x, A, B, scale):
        h = torch.bmm(x.to(A.dtype).unsqueeze(1), A[idx].transpose(1, 2))  # [T, 1, R]
        h.mul_((scale[idx] * valid).view(-1, 1, 1))
        y += torch.bmm(h, B[idx]).squeeze(1)  # [T, out]
    return op


def slot_loop(slot: torch.Tensor, adapter_rank: int) -> Op:
    groups = [(s, (slot == s).nonzero().squeeze(1)) for s in slot.unique().tolist() if s >= 0]

    def op(y, x, A, B, scale):
        for s, rows in groups:
            h = x.index_select(0, rows).to(A.dtype) @ A[s].t()  # [n, R]
            h.mul_(scale[s])
            y.index_add_(0, rows, (h @ B[s]).to(y.dtype))
    return op


def dense_masked(slot: torch.Tensor, adapter_rank: int) -> Op:
    active = slot[slot >= 0].unique()  # [K]
    k = len(active)
    onehot = (slot.unsqueeze(1) == active.unsqueeze(0)).float()  # [T, K]

    def op(y, x, A, B, scale):
        wa = A.index_select(0, active).view(k * R, -1)  # [K*R, in]
        wb = B.index_select(0, active).view(k * R, -1)  # [K*R, out]
        h = (x.to(A.dtype) @ wa.t()).view(-1, k, R)  # [T, K, R]
        h = h * (onehot * scale.index_select(0, active)).to(h.dtype).unsqueeze(2)
        y += h.view(-1, k * R) @ wb
    return op


def apply_op(mode: str) -> Callable[[torch.Tensor, int], Op | str]:
    """lora_apply with its mapping built for --lora-kernel mode."""
    kernel = select_kernel(mode, "cpu")

    def make(slot: torch.Tensor, adapter_rank: int) -> Op | str:
        mapping = SlotMapping.build(slot, kernel)
        if mode != "torch" and mapping.kernel is None:
            return NA
        rank = torch.full((S,), adapter_rank, dtype=torch.int32)

        def op(y, x, A, B, scale):
            lora_apply(y, x, mapping, A, B, scale, rank)
        return op
    return make


def make_tables(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator,
                adapter_rank: int = R):
    """A: [S, R, in], B: [S, R, out], scale: [S] like real slot tables (B small, scale 2), the
    rows past adapter_rank zero."""
    n_in, n_out = shape
    A = (torch.randn(S, R, n_in, generator=gen) / n_in ** 0.5).to(dtype)
    B = (torch.randn(S, R, n_out, generator=gen) / R ** 0.5).to(dtype)
    A[:, adapter_rank:], B[:, adapter_rank:] = 0, 0
    return A, B, torch.full((S,), 2.0)


def timed(fn: Callable[[], None], calls: int, rounds: int) -> float:
    """Median over rounds of seconds per call."""
    fn()
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_round)


def check(name: str, op: Op, slot: torch.Tensor, dtype: torch.dtype, gen: torch.Generator,
          adapter_rank: int = R) -> None:
    """Fails loudly if a candidate disagrees with the reference."""
    A, B, scale = make_tables((576, 192), dtype, gen, adapter_rank)
    x = torch.randn(len(slot), 576, generator=gen)
    y = torch.zeros(len(slot), 192)
    op(y, x, A, B, scale)
    ref = lora_reference(x, slot, A, B, scale)
    err = float((y - ref).abs().max() / ref.abs().max())
    assert err < 3e-2, f"{name} off by {err:.2e} relative"


def header(first: str, names: list[str]) -> str:
    return first + " ".join(f"{n:>12s}" for n in names)


def hot_table(candidates, rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    names = list(candidates)
    print(f"\nHOT: us per module call, same tables every call (in cache), "
          f"median of {rounds} rounds")
    print(header(f"{'case':19s} {'dtype':5s} {'module':8s} ", names))
    for case in CASES:
        slot = case_slots(case, gen)
        for dtype in (torch.float32, torch.bfloat16):
            ops = {n: make(slot, R) for n, make in candidates.items()}
            for n, op in ops.items():
                if op != NA:
                    check(n, op, slot, dtype, gen)
            for mod, shape in MODULES.items():
                A, B, scale = make_tables(shape, dtype, gen)
                x = torch.randn(len(slot), shape[0], generator=gen)
                y = torch.zeros(len(slot), shape[1])
                calls = 20 if len(slot) > 64 else 100
                cells = []
                for n, op in ops.items():
                    if op == NA:
                        cells.append(f"{NA:>12s}")
                        continue
                    sec = timed(lambda: op(y, x, A, B, scale), calls, rounds)
                    cells.append(f"{sec * 1e6:12.1f}")
                print(f"{case:19s} {dtype_name(dtype):5s} {mod:8s} " + " ".join(cells), flush=True)


def step_table(candidates, rounds: int) -> None:
    """Each module has its own tables (from DRAM, as in a step); x and y are shared per shape
    (in cache, as in a real step where the previous op just produced x and the base layer y)."""
    gen = torch.Generator().manual_seed(1)
    names = list(candidates)
    shapes = LAYER * NUM_LAYERS
    print(f"\nSTEP: ms per step over all {len(shapes)} modules, each with its own tables "
          f"(S={S}, R={R}), median of {rounds} rounds")
    print(header(f"{'case':19s} {'dtype':5s} {'MB':>5s} ", names))
    for case in STEP_CASES:
        slot, rank = case_slots(case, gen), case_rank(case)
        for dtype in (torch.float32, torch.bfloat16):
            io = {shape: (torch.zeros(len(slot), shape[1]),
                          torch.randn(len(slot), shape[0], generator=gen))
                  for shape in MODULES.values()}
            tables = [make_tables(shape, dtype, gen, rank) for shape in shapes]
            mb = sum(A.nbytes + B.nbytes for A, B, _ in tables) / 1e6
            mods = [io[shape] + table for shape, table in zip(shapes, tables)]
            ops = {n: make(slot, rank) for n, make in candidates.items()}
            for n, op in ops.items():
                if op != NA:
                    check(n, op, slot, dtype, gen, rank)
            steps = {n: (lambda op=op: [op(y, x, A, B, sc) for y, x, A, B, sc in mods])
                     for n, op in ops.items() if op != NA}
            per_round = {n: [] for n in steps}
            for step in steps.values():
                step()
            for _ in range(rounds):
                for n, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    per_round[n].append(time.perf_counter() - t0)
            cells = [f"{statistics.median(per_round[n]) * 1e3:12.2f}" if n in steps
                     else f"{NA:>12s}" for n in names]
            del mods
            print(f"{case:19s} {dtype_name(dtype):5s} {mb:5.0f} " + " ".join(cells), flush=True)
            del tables


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--step-only", action="store_true", help="only the STEP table")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    built = lora_cpu_kernel.load() is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, R={R}, S={S}; C++ kernel "
          + (f"ready in {time.perf_counter() - start:.1f} s" if built else "unavailable"))
    candidates = {"gather_bmm": gather_bmm, "slot_loop": slot_loop, "dense_masked": dense_masked,
                  "torch": apply_op("torch"), "cpp": apply_op("cpp"), "auto": apply_op("auto")}
    if not args.step_only:
        hot_table(candidates, args.rounds)
    step_table({n: candidates[n] for n in ("torch", "cpp", "auto")}, max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
