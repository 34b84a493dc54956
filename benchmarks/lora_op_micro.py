"""Micro-benchmark of the batched LoRA op candidates on SmolLM2-135M module shapes (2 threads).

    .venv/bin/python -m benchmarks.lora_op_micro [--no-cpp] [--rounds N]

Two tables:
1. "hot": us per module call, the same tables called repeatedly (they stay in cache).
2. "step": ms per decode step over all 210 modules (30 layers x q,k,v,o,gate,up,down), each with
   its own tables, so the tables come from DRAM as in a real step; the number the ~15 ms target
   is about.

Candidates:
- gather_bmm:   A[slot], B[slot] per token (a copy of the weights), then two bmm.
- slot_loop:    for each active slot, index_select its rows, two matmuls, index_add_.
- dense_masked: x @ (active slots' A stacked) for every token, mask to its own slot, then one
                matmul against the active slots' B stacked ([K*R, out], a copy in this layout).
- lora_apply:   server.lora_op (segments for heavy slots, padded bmm over a table view otherwise).
- cpp_bgmv:     a per-token AVX-512 gemv C++ extension reading table rows in place (benchmark
                only; compiled with torch.utils.cpp_extension on first use, ~20 s).

Timings are medians over rounds: this VM shows rare stalls of 10-50x lasting a few seconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from typing import Callable

import torch

from server.lora_op import SlotMapping, lora_apply, lora_reference

R = 16
S = 32
MODULES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
NUM_LAYERS = 30


def case_slots(name: str, gen: torch.Generator) -> torch.Tensor:
    """slot: [T] for one of the benchmark cases."""
    if name == "T=32, 32 distinct":
        return torch.randperm(S, generator=gen)
    if name == "T=32, 4 slots":
        chosen = torch.randperm(S, generator=gen)[:4]
        return chosen.repeat(8)[torch.randperm(32, generator=gen)]
    if name == "T=512, 2 slots":
        chosen = torch.randperm(S, generator=gen)[:2]
        return chosen.repeat_interleave(256)
    raise ValueError(name)


CASES = ["T=32, 32 distinct", "T=32, 4 slots", "T=512, 2 slots"]

Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def gather_bmm(slot: torch.Tensor) -> Op:
    idx = slot.clamp(min=0)  # [T]
    valid = (slot >= 0).float()  # [T]

    def op(y, x, A, B, scale):
        h = torch.bmm(x.to(A.dtype).unsqueeze(1), A[idx].transpose(1, 2))  # [T, 1, R]
        h.mul_((scale[idx] * valid).view(-1, 1, 1))
        y += torch.bmm(h, B[idx].transpose(1, 2)).squeeze(1)  # [T, out]
    return op


def slot_loop(slot: torch.Tensor) -> Op:
    groups = [(s, (slot == s).nonzero().squeeze(1)) for s in slot.unique().tolist() if s >= 0]

    def op(y, x, A, B, scale):
        for s, rows in groups:
            h = x.index_select(0, rows).to(A.dtype) @ A[s].t()  # [n, R]
            h.mul_(scale[s])
            y.index_add_(0, rows, (h @ B[s].t()).to(y.dtype))
    return op


def dense_masked(slot: torch.Tensor) -> Op:
    active = slot[slot >= 0].unique()  # [K]
    k = len(active)
    onehot = (slot.unsqueeze(1) == active.unsqueeze(0)).float()  # [T, K]

    def op(y, x, A, B, scale):
        wa = A.index_select(0, active).view(k * R, -1)  # [K*R, in]
        wb = B.index_select(0, active).transpose(1, 2).reshape(k * R, -1)  # [K*R, out]
        h = (x.to(A.dtype) @ wa.t()).view(-1, k, R)  # [T, K, R]
        h = h * (onehot * scale.index_select(0, active)).to(h.dtype).unsqueeze(2)
        y += h.view(-1, k * R) @ wb
    return op


def apply_op(slot: torch.Tensor) -> Op:
    mapping = SlotMapping.build(slot)

    def op(y, x, A, B, scale):
        lora_apply(y, x, mapping, A, B, scale)
    return op


CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline __m512 ld16(const float* p, int n) {
  return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
static inline __m512 ld16(const at::BFloat16* p, int n) {
  __m256i v = n >= 16 ? _mm256_loadu_si256((const __m256i*)p)
                      : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
// Lane j of the result = sum of the 16 lanes of v[j].
static inline __m512 reduce16(__m512* v) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2*k], v[2*k+1]), _mm512_unpackhi_ps(v[2*k], v[2*k+1]));
  for (int k = 0; k < 4; ++k) {
    __m512d a = _mm512_castps_pd(t[2*k]), b = _mm512_castps_pd(t[2*k+1]);
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}
// 16 dot products: rows a[j*in : (j+1)*in] with x.
template <typename W>
static inline __m512 dot16(const W* a, const float* x, int64_t in) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 16) {
    int n = (int)std::min<int64_t>(16, in - i);
    __m512 xv = ld16(x + i, n);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(ld16(a + j * in + i, n), xv, acc[j]);
  }
  return reduce16(acc);
}
template <typename W>
static void run(torch::Tensor y, torch::Tensor x, torch::Tensor slot, torch::Tensor A,
                torch::Tensor B, torch::Tensor scale) {
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1), R = A.size(1);
  const float* xp = x.data_ptr<float>(); float* yp = y.data_ptr<float>();
  const int64_t* sp = slot.data_ptr<int64_t>(); const float* cp = scale.data_ptr<float>();
  const W* Ap = A.data_ptr<W>(); const W* Bp = B.data_ptr<W>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> h(R);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t s = sp[t];
      if (s < 0) continue;
      const float* xt = xp + t * in; float* yt = yp + t * out;
      __m512 sc = _mm512_set1_ps(cp[s]);
      for (int64_t r = 0; r < R; r += 16)
        _mm512_storeu_ps(h.data() + r, _mm512_mul_ps(sc, dot16(Ap + (s * R + r) * in, xt, in)));
      const W* bs = Bp + s * out * R;
      int64_t o = 0;
      for (; o + 16 <= out; o += 16)
        _mm512_storeu_ps(yt + o, _mm512_add_ps(_mm512_loadu_ps(yt + o), dot16(bs + o * R, h.data(), R)));
      for (; o < out; ++o) {
        float a = 0;
        for (int64_t r = 0; r < R; ++r) a += float(bs[o * R + r]) * h[r];
        yt[o] += a;
      }
    }
  });
}
void lora_bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor slot, torch::Tensor A,
               torch::Tensor B, torch::Tensor scale) {
  TORCH_CHECK(A.size(1) % 16 == 0 && x.is_contiguous() && y.is_contiguous() &&
              A.is_contiguous() && B.is_contiguous() && y.scalar_type() == at::kFloat);
  if (A.scalar_type() == at::kBFloat16) run<at::BFloat16>(y, x, slot, A, B, scale);
  else run<float>(y, x, slot, A, B, scale);
}
"""


def load_cpp():
    """The C++ candidate's module, or None without a compiler or AVX-512."""
    if shutil.which("c++") is None or "avx512f" not in open("/proc/cpuinfo").read():
        return None
    from torch.utils.cpp_extension import load_inline
    return load_inline("loraplex_bgmv_bench", cpp_sources=CPP_SOURCE, functions=["lora_bgmv"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"])


def cpp_op(module) -> Callable[[torch.Tensor], Op]:
    def make(slot: torch.Tensor) -> Op:
        def op(y, x, A, B, scale):
            module.lora_bgmv(y, x, slot, A, B, scale)
        return op
    return make


def make_tables(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator):
    """A: [S, R, in], B: [S, out, R], scale: [S] like real slot tables (B small, scale 2)."""
    n_in, n_out = shape
    A = (torch.randn(S, R, n_in, generator=gen) / n_in ** 0.5).to(dtype)
    B = (torch.randn(S, n_out, R, generator=gen) / R ** 0.5).to(dtype)
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


def check(op: Op, slot: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Fails loudly if a candidate disagrees with the reference."""
    A, B, scale = make_tables((576, 192), dtype, gen)
    x = torch.randn(len(slot), 576, generator=gen)
    y = torch.zeros(len(slot), 192)
    op(y, x, A, B, scale)
    ref = lora_reference(x, slot, A, B, scale)
    err = float((y - ref).abs().max() / ref.abs().max())
    assert err < 3e-2, f"candidate off by {err:.2e} relative"


def hot_table(candidates, rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    names = list(candidates)
    print("\nHOT: us per module call (tables in cache), median of", rounds, "rounds")
    print(f"{'case':19s} {'dtype':5s} {'module':8s} " + " ".join(f"{n:>12s}" for n in names))
    for case in CASES:
        slot = case_slots(case, gen)
        for dtype in (torch.float32, torch.bfloat16):
            ops = {n: make(slot) for n, make in candidates.items()}
            for op in ops.values():
                check(op, slot, dtype, gen)
            for mod, shape in MODULES.items():
                A, B, scale = make_tables(shape, dtype, gen)
                x = torch.randn(len(slot), shape[0], generator=gen)
                y = torch.zeros(len(slot), shape[1])
                calls = 20 if len(slot) > 64 else 100
                cells = []
                for n in names:
                    sec = timed(lambda: ops[n](y, x, A, B, scale), calls, rounds)
                    cells.append(f"{sec * 1e6:12.1f}")
                print(f"{case:19s} {dtype_name(dtype):5s} {mod:8s} " + " ".join(cells), flush=True)


def step_table(candidates, rounds: int) -> None:
    gen = torch.Generator().manual_seed(1)
    names = list(candidates)
    shapes = LAYER * NUM_LAYERS
    print(f"\nSTEP: ms per step over all {len(shapes)} modules, each with its own tables "
          f"(S={S}, R={R}; read from DRAM), median of {rounds} rounds")
    print(f"{'case':19s} {'dtype':5s} {'MB':>5s} " + " ".join(f"{n:>12s}" for n in names))
    for case in CASES[:2]:
        slot = case_slots(case, gen)
        for dtype in (torch.float32, torch.bfloat16):
            mods = []
            for shape in shapes:
                A, B, scale = make_tables(shape, dtype, gen)
                mods.append((torch.zeros(len(slot), shape[1]),
                             torch.randn(len(slot), shape[0], generator=gen), A, B, scale))
            mb = sum(m[2].nbytes + m[3].nbytes for m in mods) / 1e6
            cells = []
            for n in names:
                op = candidates[n](slot)
                sec = timed(lambda: [op(y, x, A, B, sc) for y, x, A, B, sc in mods], 1, rounds)
                cells.append(f"{sec * 1e3:12.2f}")
            print(f"{case:19s} {dtype_name(dtype):5s} {mb:5.0f} " + " ".join(cells), flush=True)
            del mods


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-cpp", action="store_true", help="skip the C++ extension candidate")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    candidates = {"gather_bmm": gather_bmm, "slot_loop": slot_loop, "dense_masked": dense_masked,
                  "lora_apply": apply_op}
    module = None if args.no_cpp else load_cpp()
    if module is not None:
        candidates["cpp_bgmv"] = cpp_op(module)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, R={R}, S={S}")
    hot_table(candidates, args.rounds)
    step_table(candidates, max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
