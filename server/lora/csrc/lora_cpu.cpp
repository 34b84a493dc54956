// The batched multi-LoRA op on the CPU, reading the slot tables in place (see server/lora_op.py):
//
//   y[t] += scale[s] * (A[s] @ x[t]) @ B[s]      for each token t of an entry with slot s
//
// x: [T, in], y: [T, out] fp32 or bf16 (unit-stride rows), A: [S, R, in], B: [S, R, out] (both fp32
// or both bf16, contiguous), scale: [S] fp32, rank: [S] int32 (rows >= rank[s] of A[s] and B[s]
// are zero and skipped) or empty (all R rows), plan: [E, 3] int32 (slot, begin, end) of each
// entry over tokens: [N] int32. All math is fp32, whatever the table dtype.
//
// Built by torch.utils.cpp_extension with -O3 -march=native on the machine that runs it. GCC
// vector extensions (no intrinsics, so no runtime CPU checks) map V16 to what the CPU has: one
// zmm, two ymm, four xmm. Needs GCC (__builtin_shuffle); elsewhere the build fails and
// server/lora_cpu_kernel.py falls back to PyTorch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

constexpr int kTokenBlock = 8;  // tokens whose rank-R intermediates are live at once

// bf16 tables are read as uint16_t. Two adjacent bf16 values are one uint32_t: the even one is its
// low half (w << 16 as fp32), the odd one its high half (w & 0xffff0000 as fp32). So 32 bf16
// values widen to fp32 in two ops, the even ones in one vector and the odd ones in another; x is
// reordered to match (each 32-block: even | odd), and expand interleaves its two sums at the end.
const U32x16 kHigh = U32x16{} + 0xffff0000u;
const I32x16 kEven = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
const I32x16 kOdd = kEven + 1;
const I32x16 kInterleaveLo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
const I32x16 kInterleaveHi = kInterleaveLo + 8;

inline V16 load16(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, V16 v) { std::memcpy(p, &v, sizeof(v)); }
inline void add16(float* p, V16 v) { store16(p, load16(p) + v); }

inline V16 as_float(U32x16 w) {
  V16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline U32x16 load32_bf16(const uint16_t* p) {
  U32x16 w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}
inline V16 even(U32x16 w) { return as_float(w << 16); }
inline V16 odd(U32x16 w) { return as_float(w & kHigh); }

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t w = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// Round to nearest even (finite values: activations).
inline uint16_t to_bf16(float v) {
  uint32_t w;
  std::memcpy(&w, &v, sizeof(w));
  return uint16_t((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);
}

inline float hsum(V16 v) {
  V8 a, b;
  std::memcpy(&a, &v, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
  a += b;
  V4 c, d;
  std::memcpy(&c, &a, sizeof(c));
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof(c), sizeof(d));
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

template <typename W>
inline void prefetch(const W* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * int64_t(sizeof(W)); i += 64) __builtin_prefetch(c + i, 0, 2);
}

// x as shrink reads it: fp32 tables read x in place, bf16 tables a reordered copy in `scratch`.
inline const float* prepare_x(const float* x, int64_t, float*, float) { return x; }
inline const float* prepare_x(const float* x, int64_t in, float* scratch, uint16_t) {
  for (int64_t i = 0; i + 32 <= in; i += 32) {
    V16 v0 = load16(x + i), v1 = load16(x + i + 16);
    store16(scratch + i, __builtin_shuffle(v0, v1, kEven));
    store16(scratch + i + 16, __builtin_shuffle(v0, v1, kOdd));
  }
  return scratch;
}

// Q rows of A against NT tokens: h[t][r + q] = sc * (a[r + q] . x[t]).
// xp: as prepare_x made it, xr: the raw rows (for the tail of `in` past the vector blocks).
template <int Q, int NT>
inline void shrink_block(const float* a, int64_t in, int r, const float* const* xp,
                         const float* const* xr, float sc, float* const* h) {
  V16 acc[Q][NT] = {};
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    V16 xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = load16(xp[t] + i);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      V16 w = load16(a + (r + q) * in + i);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[q][t] += w * xv[t];
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int t = 0; t < NT; ++t) {
      float d = hsum(acc[q][t]);
      for (int64_t k = i; k < in; ++k) d += a[(r + q) * in + k] * xr[t][k];
      h[t][r + q] = sc * d;
    }
}

template <int Q, int NT>
inline void shrink_block(const uint16_t* a, int64_t in, int r, const float* const* xp,
                         const float* const* xr, float sc, float* const* h) {
  V16 acc[Q][NT] = {};
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    V16 xe[NT], xo[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      xe[t] = load16(xp[t] + i);
      xo[t] = load16(xp[t] + i + 16);
    }
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      U32x16 w = load32_bf16(a + (r + q) * in + i);
      V16 we = even(w), wo = odd(w);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[q][t] += we * xe[t] + wo * xo[t];
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int t = 0; t < NT; ++t) {
      float d = hsum(acc[q][t]);
      for (int64_t k = i; k < in; ++k) d += to_float(a[(r + q) * in + k]) * xr[t][k];
      h[t][r + q] = sc * d;
    }
}

template <int NT, typename W>
inline void shrink(const W* a, int64_t in, int rank, const float* const* xp,
                   const float* const* xr, float sc, float* const* h) {
  int r = 0;
  for (; r + 4 <= rank; r += 4) shrink_block<4, NT>(a, in, r, xp, xr, sc, h);
  for (; r < rank; ++r) shrink_block<1, NT>(a, in, r, xp, xr, sc, h);
}

// y[t][o:o + 64] += h[t] @ b[:, o:o + 64] for NT tokens.
template <int NT>
inline void expand_64(const float* b, int64_t out, int64_t o, int rank, const float* const* h,
                      float* const* y) {
  V16 acc[NT][4] = {};
  for (int r = 0; r < rank; ++r) {
    const float* br = b + r * out + o;
    V16 w[4] = {load16(br), load16(br + 16), load16(br + 32), load16(br + 48)};
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const float hr = h[t][r];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[t][k] += w[k] * hr;
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < 4; ++k) add16(y[t] + o + 16 * k, acc[t][k]);
}

template <int NT>
inline void expand_64(const uint16_t* b, int64_t out, int64_t o, int rank, const float* const* h,
                      float* const* y) {
  V16 e[NT][2] = {}, od[NT][2] = {};
  for (int r = 0; r < rank; ++r) {
    const uint16_t* br = b + r * out + o;
    U32x16 w0 = load32_bf16(br), w1 = load32_bf16(br + 32);
    V16 e0 = even(w0), o0 = odd(w0), e1 = even(w1), o1 = odd(w1);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const float hr = h[t][r];
      e[t][0] += e0 * hr;
      od[t][0] += o0 * hr;
      e[t][1] += e1 * hr;
      od[t][1] += o1 * hr;
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < 2; ++k) {
      add16(y[t] + o + 32 * k, __builtin_shuffle(e[t][k], od[t][k], kInterleaveLo));
      add16(y[t] + o + 32 * k + 16, __builtin_shuffle(e[t][k], od[t][k], kInterleaveHi));
    }
}

// y[t] += h[t] @ b for NT tokens; b: [rank, out] rows.
template <int NT, typename W>
inline void expand(const W* b, int64_t out, int rank, const float* const* h, float* const* y) {
  int64_t o = 0;
  for (; o + 64 <= out; o += 64) expand_64<NT>(b, out, o, rank, h, y);
  for (; o < out; ++o)
    for (int t = 0; t < NT; ++t) {
      float acc = 0.f;
      for (int r = 0; r < rank; ++r) acc += to_float(b[r * out + o]) * h[t][r];
      y[t][o] += acc;
    }
}

// The tokens tok[0:nt] of one slot: a: [rank, in] rows, b: [rank, out] rows.
template <typename W>
void apply_tokens(const W* a, const W* b, int64_t in, int64_t out, int rank, float sc,
                  const float* x, int64_t x_stride, float* y, int64_t y_stride,
                  const int32_t* tok, int nt, float* scratch, float* h, int R) {
  for (int j = 0; j < nt; j += 2) {
    const int n = std::min(2, nt - j);
    const float* xr[2];
    const float* xp[2];
    float* hp[2];
    for (int t = 0; t < n; ++t) {
      xr[t] = x + tok[j + t] * x_stride;
      xp[t] = prepare_x(xr[t], in, scratch + t * in, W{});
      hp[t] = h + (j + t) * R;
    }
    if (n == 2) shrink<2>(a, in, rank, xp, xr, sc, hp);
    else shrink<1>(a, in, rank, xp, xr, sc, hp);
  }
  for (int j = 0; j < nt; j += 2) {
    const int n = std::min(2, nt - j);
    const float* hp[2] = {h + j * R, h + (j + n - 1) * R};
    float* yp[2] = {y + tok[j] * y_stride, y + tok[j + n - 1] * y_stride};
    if (n == 2) expand<2>(b, out, rank, hp, yp);
    else expand<1>(b, out, rank, hp, yp);
  }
}

struct Item {
  int32_t slot, begin, end;
};

// bf16 activations: a block of token rows widened to fp32 (x) and summed in fp32 (y), so that
// apply_tokens sees fp32 rows 0..nt-1; `finish` adds the sums into y, rounding once.
struct Bf16Rows {
  std::vector<float> x, y;
  int32_t local[kTokenBlock];

  Bf16Rows(int64_t in, int64_t out) : x(kTokenBlock * in), y(kTokenBlock * out) {
    for (int t = 0; t < kTokenBlock; ++t) local[t] = t;
  }
  void start(const uint16_t* xs, int64_t x_stride, const int32_t* tok, int nt, int64_t in,
             int64_t out) {
    for (int t = 0; t < nt; ++t)
      for (int64_t k = 0; k < in; ++k) x[t * in + k] = to_float(xs[tok[t] * x_stride + k]);
    std::fill(y.begin(), y.begin() + nt * out, 0.f);
  }
  void finish(uint16_t* ys, int64_t y_stride, const int32_t* tok, int nt, int64_t out) const {
    for (int t = 0; t < nt; ++t)
      for (int64_t k = 0; k < out; ++k) {
        uint16_t& dst = ys[tok[t] * y_stride + k];
        dst = to_bf16(to_float(dst) + y[t * out + k]);
      }
  }
};

// W: the tables' element, A: the activations' (float, or uint16_t for bf16 bits).
template <typename W, typename A_>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
         const at::Tensor& scale, const at::Tensor& rank, const at::Tensor& plan,
         const at::Tensor& tokens) {
  const int64_t in = x.size(1), out = y.size(1), R = A.size(1);
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const A_* xp = static_cast<const A_*>(x.data_ptr());
  A_* yp = static_cast<A_*>(y.data_ptr());
  const W* ap = static_cast<const W*>(A.data_ptr());
  const W* bp = static_cast<const W*>(B.data_ptr());
  const float* sp = scale.data_ptr<float>();
  const int32_t* rp = rank.numel() ? rank.data_ptr<int32_t>() : nullptr;
  const int32_t* pp = plan.data_ptr<int32_t>();
  const int32_t* tp = tokens.data_ptr<int32_t>();
  const int64_t num_entries = plan.size(0), num_tokens = tokens.numel();
  for (int64_t k = 0; k < num_tokens; ++k)
    TORCH_CHECK(tp[k] >= 0 && tp[k] < x.size(0), "token index out of range");
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  auto rank_of = [&](int32_t s) { return int(rp ? std::min<int64_t>(rp[s], R) : R); };

  // Work items: the entries, those with more than their share of the tokens cut into pieces, so
  // that the threads can split the work evenly. Cost of an item ~ its table read (~4 tokens'
  // worth of math) + its tokens.
  std::vector<Item> items;
  std::vector<int64_t> cost_end;  // prefix sums of item cost
  int64_t total = 0;
  const int64_t max_piece = std::max<int64_t>(kTokenBlock, (num_tokens + threads - 1) / threads);
  for (int64_t e = 0; e < num_entries; ++e) {
    const int32_t s = pp[3 * e], begin = pp[3 * e + 1], end = pp[3 * e + 2];
    TORCH_CHECK(s >= 0 && s < A.size(0) && begin >= 0 && begin <= end && end <= num_tokens,
                "plan entry out of range");
    const int64_t r = rank_of(s);
    if (r <= 0 || sp[s] == 0.f || end <= begin) continue;
    const int64_t n = end - begin, pieces = (n + max_piece - 1) / max_piece;
    for (int64_t k = 0; k < pieces; ++k) {
      Item it{s, int32_t(begin + n * k / pieces), int32_t(begin + n * (k + 1) / pieces)};
      total += r * (4 + it.end - it.begin);
      items.push_back(it);
      cost_end.push_back(total);
    }
  }
  if (items.empty()) return;

  auto work = [&](size_t i0, size_t i1) {
    std::vector<float> h(kTokenBlock * R), scratch(std::is_same<W, float>::value ? 0 : 2 * in);
    std::unique_ptr<Bf16Rows> rows;
    if constexpr (!std::is_same<A_, float>::value) rows = std::make_unique<Bf16Rows>(in, out);
    for (size_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const int r = rank_of(it.slot);
      const W* a = ap + it.slot * R * in;
      const W* b = bp + it.slot * R * out;
      // bf16: the hardware prefetchers alone leave DRAM idle while we compute (measured: 18.5
      // -> 14.6 ms per decode step); fp32 is bandwidth-bound without help, and slower with it.
      if (!std::is_same<W, float>::value && i + 1 < i1 && items[i + 1].slot != it.slot) {
        const int32_t s2 = items[i + 1].slot;
        prefetch(ap + s2 * R * in, rank_of(s2) * in);
        prefetch(bp + s2 * R * out, rank_of(s2) * out);
      }
      for (int32_t t = it.begin; t < it.end; t += kTokenBlock) {
        const int nt = std::min<int32_t>(kTokenBlock, it.end - t);
        if constexpr (std::is_same<A_, float>::value) {
          apply_tokens(a, b, in, out, r, sp[it.slot], xp, x_stride, yp, y_stride, tp + t, nt,
                       scratch.data(), h.data(), R);
        } else {
          rows->start(xp, x_stride, tp + t, nt, in, out);
          apply_tokens(a, b, in, out, r, sp[it.slot], rows->x.data(), in, rows->y.data(), out,
                       rows->local, nt, scratch.data(), h.data(), R);
          rows->finish(yp, y_stride, tp + t, nt, out);
        }
      }
    }
  };
  if (items.size() == 1 || threads == 1) {
    work(0, items.size());
    return;
  }
  // Thread k takes the items whose cost ends in (k * total / threads, (k + 1) * total / threads].
  std::vector<size_t> bounds(threads + 1, items.size());
  bounds[0] = 0;
  for (int k = 1; k < threads; ++k) {
    const int64_t target = total * k / threads;
    bounds[k] = std::lower_bound(cost_end.begin(), cost_end.end(), target) - cost_end.begin();
    if (bounds[k] < items.size() && cost_end[bounds[k]] - target <
        target - (bounds[k] ? cost_end[bounds[k] - 1] : 0))
      ++bounds[k];  // the straddling item goes to the side holding more of it
    bounds[k] = std::max(bounds[k], bounds[k - 1]);
  }
  at::parallel_for(0, threads, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) work(bounds[k], bounds[k + 1]);
  });
}

// Returns false, touching nothing, when the call is not the kernel's (CUDA tensors, x and y not
// both fp32 or both bf16, tables neither fp32 nor bf16 or not contiguous): the caller then runs
// PyTorch. bf16 activations are widened to fp32 for the math (Bf16Rows): the update is summed in
// fp32 and added to y with one rounding.
bool lora_apply_cpu(at::Tensor y, at::Tensor x, at::Tensor A, at::Tensor B, at::Tensor scale,
                    at::Tensor rank, at::Tensor plan, at::Tensor tokens) {
  auto activation = [](const at::Tensor& t) {
    return t.dim() == 2 && t.stride(1) == 1 &&
           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
  };
  if (!(x.device().is_cpu() && y.device().is_cpu() && A.device().is_cpu() &&
        B.device().is_cpu() && scale.device().is_cpu() && activation(x) && activation(y) &&
        x.scalar_type() == y.scalar_type() &&
        A.scalar_type() == B.scalar_type() &&
        (A.scalar_type() == at::kFloat || A.scalar_type() == at::kBFloat16) &&
        A.is_contiguous() && B.is_contiguous() && scale.scalar_type() == at::kFloat &&
        scale.is_contiguous()))
    return false;
  TORCH_CHECK(x.size(0) == y.size(0), "x: [T, in], y: [T, out]");
  TORCH_CHECK(A.dim() == 3 && B.dim() == 3 && A.size(0) == B.size(0) && A.size(1) == B.size(1) &&
              A.size(2) == x.size(1) && B.size(2) == y.size(1), "A: [S, R, in], B: [S, R, out]");
  TORCH_CHECK(scale.numel() == A.size(0), "scale: [S]");
  TORCH_CHECK(rank.numel() == 0 || (rank.scalar_type() == at::kInt && rank.is_contiguous() &&
              rank.device().is_cpu() && rank.numel() == A.size(0)), "rank: [S] int32 or empty");
  TORCH_CHECK(plan.scalar_type() == at::kInt && plan.is_contiguous() && plan.dim() == 2 &&
              plan.size(1) == 3 && tokens.scalar_type() == at::kInt && tokens.is_contiguous(),
              "plan: [E, 3] int32, tokens: [N] int32");
  const bool bf16_tables = A.scalar_type() == at::kBFloat16;
  if (x.scalar_type() == at::kBFloat16) {
    if (bf16_tables) run<uint16_t, uint16_t>(y, x, A, B, scale, rank, plan, tokens);
    else run<float, uint16_t>(y, x, A, B, scale, rank, plan, tokens);
  } else {
    if (bf16_tables) run<uint16_t, float>(y, x, A, B, scale, rank, plan, tokens);
    else run<float, float>(y, x, A, B, scale, rank, plan, tokens);
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_apply_cpu", &lora_apply_cpu,
        "y += the batched LoRA op for the planned tokens; false (and nothing done) if the call "
        "is not a CPU call with fp32 or bf16 x and y and fp32 or bf16 tables");
}
