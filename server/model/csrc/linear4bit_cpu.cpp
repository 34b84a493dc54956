// y = x Wᵀ for a bitsandbytes 4-bit (NF4 or FP4) weight in bitsandbytes' CPU packing, with the
// 4-bit codes widened to bf16 in registers (see server/model/linear4bit.py):
//
//   x: [M, K] bf16 (unit-stride rows); y: [M, N] fp32 or bf16.
//   packed: [N / 32, K / 2, 32] uint8, bitsandbytes' `packing_format_for_cpu` layout: for each block
//     of 32 output rows and each pair of inputs (2p, 2p + 1), 32 bytes whose low nibbles are rows
//     0..15 and high nibbles rows 16..31, each row's two codes adjacent (the even input first).
//   absmax: [K / blocksize, N] bf16, one scale per output row and quantization block of inputs.
//   code: [16] fp32, the value of each 4-bit code (NF4's or FP4's table).
//
// W[n, k] = bf16(code[q]) * absmax[k / blocksize, n]. The absmax factor is applied once per block:
// the codes of one block are dotted with x unscaled, then the block's sum is scaled into the result.
// Widening a code is one lane permute (vpermw) over a 16-entry bf16 table.
//
// vdpbf16ps multiplies a lane's two bf16 weights (rows r, inputs 2p and 2p + 1) with the same two
// inputs of a token, broadcast, and adds both products into that row's fp32 sum. fp32 activations
// are rounded to bf16 first (by the caller), as bitsandbytes' own CPU kernel does.
//
// Needs AVX512F/BW/BF16 at build time (-march=native); without them `supported()` is false and the
// engine keeps bitsandbytes' own path.

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define LORAPLEX_HAVE_BF16 1
#include <immintrin.h>
#else
#define LORAPLEX_HAVE_BF16 0
#endif

namespace {

constexpr int kRows = 32;       // output rows per block: bitsandbytes' packing
constexpr int kTokenChunk = 64; // tokens whose fp32 results one block keeps at once
constexpr int kMaxPairs = 512;  // input pairs per quantization block: blocksize <= 1024

#if LORAPLEX_HAVE_BF16


// One quantization block of V / 2 packed 32-row blocks, widened: for each input pair p, V vectors
// of bf16 weight pairs, w[p][v] holding rows 16v .. 16v + 15 of the V * 16 rows.
template <int V>
struct Widened {
  __m512i w[kMaxPairs][V];
};

template <int V>
inline void widen_block(const uint8_t* const* bytes, int pairs, __m512i table, Widened<V>& out) {
  const __m512i low_nibble = _mm512_set1_epi16(0x0f);
  for (int p = 0; p < pairs; ++p) {
#pragma GCC unroll 2
    for (int b = 0; b < V / 2; ++b) {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes[b] + p * kRows));
      __m512i words = _mm512_cvtepu8_epi16(raw);
      out.w[p][2 * b] = _mm512_permutexvar_epi16(_mm512_and_si512(words, low_nibble), table);
      out.w[p][2 * b + 1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
    }
  }
}

// acc += the pairwise dot products of bf16 pairs a and b (vdpbf16ps). Inline assembly keeps GCC
// from moving __m512bh casts through the stack.
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

inline uint32_t input_pair(const uint16_t* x, int p) {
  uint32_t v;
  std::memcpy(&v, x + 2 * p, sizeof(v));
  return v;
}

// NT tokens of x against one widened block: acc[t] += scale ⊙ (block codes · x[t]).
// x rows start at the block's first input; acc: [NT][16 V] fp32 result rows.
template <int V, int NT>
void block_tokens(const Widened<V>& w, int pairs, const uint16_t* const* x, const __m512* scale,
                  float* const* acc) {
  __m512 sum[NT][V];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < V; ++v) sum[t][v] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      __m512i xb = _mm512_set1_epi32(int(input_pair(x[t], p)));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) sum[t][v] = dot_pairs(sum[t][v], w.w[p][v], xb);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(acc[t] + 16 * v,
                       _mm512_fmadd_ps(sum[t][v], scale[v], _mm512_loadu_ps(acc[t] + 16 * v)));
}

// Tokens per register block: V * NT sums plus V weights and a broadcast fit in 32 registers.
template <int V>
constexpr int tokens_per_pass() { return V == 4 ? 5 : 8; }

// block_tokens<V, nt> for a run-time nt <= N (the last register block of a chunk is shorter).
template <int V, int N>
void block_tokens_upto(int nt, const Widened<V>& w, int pairs, const uint16_t* const* x,
                       const __m512* scale, float* const* acc) {
  if (nt == N) {
    block_tokens<V, N>(w, pairs, x, scale, acc);
  } else if constexpr (N > 1) {
    block_tokens_upto<V, N - 1>(nt, w, pairs, x, scale, acc);
  }
}

// The tokens [0, count) of a chunk, a register block at a time, against one widened block.
template <int V>
void block_chunk(const Widened<V>& w, int pairs, const uint16_t* x, int64_t x_stride, int64_t k0,
                 int count, const __m512* scale, float* acc) {
  constexpr int NT = tokens_per_pass<V>();
  for (int t0 = 0; t0 < count; t0 += NT) {
    const uint16_t* rows[NT];
    float* sums[NT];
    int nt = count - t0 < NT ? count - t0 : NT;
    for (int t = 0; t < nt; ++t) {
      rows[t] = x + (t0 + t) * x_stride + k0;
      sums[t] = acc + (t0 + t) * 16 * V;
    }
    block_tokens_upto<V, NT>(nt, w, pairs, rows, scale, sums);
  }
}

// Where results go: y [M, N], fp32 or bf16 (rounded to nearest even).
struct Output {
  void* data;
  bool bf16;
  int64_t stride;

  void write(int64_t row, int64_t col, const float* v, int n) const {
    if (!bf16) {
      std::memcpy(static_cast<float*>(data) + row * stride + col, v, sizeof(float) * n);
      return;
    }
    uint16_t* dst = static_cast<uint16_t*>(data) + row * stride + col;
    for (int i = 0; i < n; i += 16) {
      __m256i h;
      asm("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(_mm512_loadu_ps(v + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
    }
  }
};

inline __m512 bf16_to_fp32(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Output rows [16 V n0, 16 V (n0 + 1)) for every token: V / 2 packed blocks at once.
template <int V>
void row_block(const uint16_t* x, int64_t x_stride, int64_t M, int64_t K, int64_t N, int64_t row0,
               const uint8_t* packed, const uint16_t* absmax, int blocksize, __m512i table,
               const Output& y, Widened<V>& w, float* acc) {
  const int pairs = blocksize / 2;
  const int64_t blocks = K / blocksize;
  const uint8_t* rows[V / 2];
  for (int b = 0; b < V / 2; ++b) rows[b] = packed + (row0 + b * kRows) * (K / 2);
  for (int64_t m0 = 0; m0 < M; m0 += kTokenChunk) {
    int count = int(M - m0 < kTokenChunk ? M - m0 : kTokenChunk);
    std::memset(acc, 0, sizeof(float) * count * 16 * V);
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const uint8_t* at[V / 2];
      for (int b = 0; b < V / 2; ++b) at[b] = rows[b] + kb * pairs * kRows;
      widen_block<V>(at, pairs, table, w);
      __m512 scale[V];
      for (int v = 0; v < V; ++v) scale[v] = bf16_to_fp32(absmax + kb * N + row0 + 16 * v);
      block_chunk<V>(w, pairs, x + m0 * x_stride, x_stride, kb * blocksize, count, scale, acc);
    }
    for (int t = 0; t < count; ++t)
      y.write(m0 + t, row0, acc + t * 16 * V, 16 * V);
  }
}

void linear4bit(const uint16_t* x, int64_t x_stride, int64_t M, int64_t K, int64_t N,
                const uint8_t* packed, const uint16_t* absmax, int blocksize, __m512i table,
                const Output& y) {
  // Work items: pairs of 32-row blocks (64 rows), and a last single block when N / 32 is odd.
  const int64_t blocks = N / kRows, items = (blocks + 1) / 2;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    auto wide = std::make_unique<Widened<4>>();
    auto narrow = std::make_unique<Widened<2>>();
    std::vector<float> acc(kTokenChunk * 64);
    for (int64_t i = i0; i < i1; ++i) {
      if (2 * i + 1 < blocks) {
        row_block<4>(x, x_stride, M, K, N, 2 * i * kRows, packed, absmax, blocksize, table, y,
                        *wide, acc.data());
      } else {
        row_block<2>(x, x_stride, M, K, N, 2 * i * kRows, packed, absmax, blocksize, table, y,
                        *narrow, acc.data());
      }
    }
  });
}

#endif  // LORAPLEX_HAVE_BF16

bool supported() { return LORAPLEX_HAVE_BF16; }

at::Tensor linear4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize, at::ScalarType out_dtype) {
  TORCH_CHECK(supported(), "built without AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16,
              "x: [M, K] bf16 with unit-stride rows");
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kFloat, "y: bf16 or fp32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(blocksize % 2 == 0 && blocksize <= 2 * kMaxPairs && K % blocksize == 0,
              "K must be a multiple of an even blocksize <= 1024");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() % (K / 2 * kRows) == 0,
              "packed: [N / 32, K / 2, 32] uint8");
  const int64_t N = packed.numel() / (K / 2);
  TORCH_CHECK(absmax.scalar_type() == at::kBFloat16 && absmax.is_contiguous() &&
                  absmax.numel() == (K / blocksize) * N,
              "absmax: [K / blocksize, N] bf16");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "code: [16] fp32");
  auto y = at::empty({M, N}, x.options().dtype(out_dtype));
#if LORAPLEX_HAVE_BF16
  auto table16 = code.contiguous().to(at::kBFloat16);
  alignas(64) uint16_t table[32] = {};
  std::memcpy(table, table16.data_ptr(), 16 * sizeof(uint16_t));
  const Output out{y.data_ptr(), out_dtype == at::kBFloat16, N};
  linear4bit(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), M, K, N,
             packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(absmax.data_ptr()),
             int(blocksize), _mm512_load_si512(table), out);
#endif
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "built with AVX512F, AVX512BW and AVX512-BF16");
  m.def("linear4bit_cpu", &linear4bit_cpu,
        "y [M, N] fp32 = x Wᵀ for a 4-bit weight in bitsandbytes' CPU packing");
}
