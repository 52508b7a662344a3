// Shared pieces of the quantized CPU kernels (int8_gemm.cpp, int4_gemm.cpp):
// input checks with readable messages, activation preparation, output
// finishing, and the blocked fp32 / int16 "dot" micro-kernels that the GEMM
// paths run on dequantized weight panels.
//
// Every output element is computed by one thread with one fixed summation
// order (lanes over K, then a fixed horizontal reduction, then K blocks in
// order), whatever the tile it falls in and however N is split across threads,
// so results do not depend on torch.get_num_threads().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>

#include "cpu/isa.h"

#if FASTKERN_X86
#include <immintrin.h>
#endif

namespace fastkern {
namespace cpu {
namespace quant {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline std::string describe(const char* name, const at::Tensor& t) {
  std::ostringstream os;
  os << name << " (shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device() << ")";
  return os.str();
}

inline bool is_float(const at::Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fastkern_C::", op, ": ", describe(name, t), " must be a CPU tensor");
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(is_float(t), "fastkern_C::", op, ": ", describe(name, t),
              " must be float32, float16 or bfloat16");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == want, "fastkern_C::", op, ": ", describe(name, t), " must have dtype ", want);
}

inline void check_2d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "fastkern_C::", op, ": ", describe(name, t), " must be 2-D");
}

inline void check_x(const char* op, const char* name, const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "fastkern_C::", op, ": ", describe(name, x),
              " must have shape [..., ", k, "] (K from the weight)");
}

inline void check_vec(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fastkern_C::", op, ": ", describe(name, t), " must have shape [", n,
              "]");
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return;
  check_float(op, "bias", *bias);
  check_vec(op, "bias", *bias, n);
}

// Output shape x.shape[:-1] + [n].
inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 1);
  s.push_back(n);
  return s;
}

// Number of rows of x [..., K] (the product of the leading dims; K may be 0).
inline int64_t rows_of(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// x [..., K] (any float dtype, any strides) -> contiguous fp32 [M, kp], columns K..kp zero.
inline at::Tensor x_f32_padded(const at::Tensor& x, int64_t k, int64_t kp) {
  at::Tensor x2 = x.reshape({rows_of(x), k}).to(at::kFloat).contiguous();
  if (kp == k) return x2;
  at::Tensor out = at::zeros({x2.size(0), kp}, x2.options());
  out.narrow(1, 0, k).copy_(x2);
  return out;
}

// Whether x holds a magnitude above lim (inf and NaN count too): the kernels that sum x
// against integer weights before applying the weight scales route such inputs to a path that
// dequantizes the weight first, as the reference does (x * (q * s) stays finite where
// sum(x * q) would overflow). One pass over x's bits, branch-free so that it vectorizes.
inline bool holds_beyond(const at::Tensor& x, float lim) {
  const at::Tensor xc = x.contiguous();
  std::atomic<bool> found{false};
  auto scan = [&](const auto* p, auto mag, auto l) {
    at::parallel_for(0, xc.numel(), int64_t(1) << 16, [&](int64_t b, int64_t e) {
      uint32_t any = 0;
      for (int64_t i = b; i < e; ++i) any |= uint32_t((p[i] & mag) > l);
      if (any) found.store(true, std::memory_order_relaxed);
    });
  };
  if (xc.scalar_type() == at::kFloat) {
    uint32_t l;
    std::memcpy(&l, &lim, sizeof(l));
    scan(static_cast<const uint32_t*>(xc.data_ptr()), 0x7FFFFFFFu, l);
  } else {  // half precision: lim in x's format (rounded to nearest; fp16 saturates to inf, so
            // only NaN counts there)
    const uint16_t l = (xc.scalar_type() == at::kBFloat16 ? c10::BFloat16(lim).x : c10::Half(lim).x) & 0x7FFFu;
    scan(static_cast<const uint16_t*>(xc.data_ptr()), uint16_t(0x7FFFu), l);
  }
  return found.load();
}

// The bias as contiguous fp32 (undefined without one), for kernels that add it themselves
inline at::Tensor bias_f32(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}
inline const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// fp32 [M, N] result -> (+ bias in fp32) -> x.dtype, shaped x.shape[:-1] + [N].
inline at::Tensor finish(at::Tensor out, const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n) {
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  return out.reshape(out_shape(x, n));
}

// Several GEMV / GEMM bounds were measured on 48 KiB L1ds (Zen 5, Xeon) and again on a 32 KiB one
// (Zen 4), where some differ: whether this CPU's L1d is the smaller kind.
constexpr int64_t kLargeL1dBytes = 48 << 10;
inline bool small_l1d() { return features().l1d_bytes() < kLargeL1dBytes; }

// Where the int8-weight GEMVs' software prefetch of their weight stream (a few KB ahead)
// puts the lines: into L1 (T0) where the L1d holds 48 KiB or more, else into L2 (T1). On a
// 32 KiB L1d the lines prefetched into L1 evict the rows of x that every weight row meets
// again (2 Zen 4 cores, W8A8 M = 1 on the AVX2 GEMV, 8 KB ahead, weights beyond L3, 7 rounds
// alternating in one process: L2 against L1 0.70-0.86x the time at 4096 x 4096, 11008 x 4096
// and 4096 x 14336, 0.85-0.95x at M = 4; W8A16 M = 1 on the AVX2 stream GEMV 0.68-0.71x; W8A8
// M = 1 on the AVX-512 VNNI GEMV 0.91-0.96x; W8A16 M = 1-4 on AVX-512 and W8A8 M = 8 on the
// AVX-512 row GEMV 0.96-1.03x, neutral); on the Zen 5 and
// Xeon hosts (48 KiB) L1 was the measured choice. FASTKERN_GEMV_PF_L1 (1: L1, 0: L2; read per
// call) overrides.
inline bool gemv_prefetch_l1() {
  const int64_t knob = env_knob("FASTKERN_GEMV_PF_L1", -1);
  if (knob >= 0) return knob != 0;
  return !small_l1d();
}
#if FASTKERN_X86
inline void prefetch_stream(const void* p, bool l1) {
  if (l1)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  else
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}
#endif

// Rows [0, n) split over threads in units of `unit` rows (so tile boundaries
// never depend on the thread count).
template <class F>
inline void parallel_rows(int64_t n, int64_t unit, int64_t min_units, const F& f) {
  int64_t units = (n + unit - 1) / unit;
  at::parallel_for(0, units, std::max<int64_t>(min_units, 1), [&](int64_t b, int64_t e) {
    f(b * unit, std::min(e * unit, n));
  });
}

// Rows of row_bytes each in about `bytes`: a multiple of unit, at least one unit; all n where
// bytes <= 0.
inline int64_t rows_in_bytes(int64_t bytes, int64_t row_bytes, int64_t unit, int64_t n) {
  return bytes <= 0 ? n : std::max<int64_t>(1, bytes / std::max<int64_t>(row_bytes, 1) / unit) * unit;
}

// GEMVs that pass over the weight more than once (one pass per few rows of x): rows [0, n)
// split over threads as parallel_rows does, and each thread's share taken in blocks of about
// kGemvBlockBytes of weight, f(n0, n1) per block, so that all passes over a block run before
// the next: the first pass reads it from DRAM, the others from L2. One pass: one block per
// thread. row_bytes: the weight bytes of one row. FASTKERN_GEMV_BLOCK_KB sets the size (0:
// one block per thread), read on every call for A/B timing.
constexpr int64_t kGemvBlockBytes = 256 << 10;
template <class F>
inline void parallel_row_blocks(int64_t n, int64_t unit, int64_t min_units, int64_t row_bytes, int64_t passes,
                                const F& f) {
  const int64_t bytes = passes <= 1 ? 0 : env_knob("FASTKERN_GEMV_BLOCK_KB", kGemvBlockBytes >> 10) << 10;
  const int64_t rb = rows_in_bytes(bytes, row_bytes, 16, n);
  parallel_rows(n, unit, min_units, [&](int64_t r0, int64_t r1) {
    for (int64_t n0 = r0; n0 < r1; n0 += rb) f(n0, std::min(r1, n0 + rb));
  });
}

// M rows of x in passes of at most `rows` (ceil(M / rows) passes), spread evenly (M = 9 in
// passes of 4: 3 + 3 + 3): f(m0, mr) per pass, in order.
template <class F>
inline void for_each_pass(int64_t M, int64_t rows, const F& f) {
  const int64_t passes = (M + rows - 1) / rows;
  for (int64_t p = 0, m0 = 0; p < passes; ++p) {
    const int64_t mr = (M - m0) / (passes - p) + ((M - m0) % (passes - p) ? 1 : 0);
    f(m0, mr);
    m0 += mr;
  }
}
// f(std::integral_constant<int, R>{}) with R = r for a runtime row count r in [1, Max], R = Max
// above it: one template instance of a kernel per row count
template <int Max, class F>
inline void with_rows(int64_t r, const F& f) {
  if constexpr (Max > 1) {
    if (r < Max) return with_rows<Max - 1>(r, f);
  }
  f(std::integral_constant<int, Max>{});
}
// the rows of for_each_pass's largest (first) pass
inline int64_t largest_pass(int64_t M, int64_t rows) {
  const int64_t passes = (M + rows - 1) / rows;
  return (M + passes - 1) / passes;
}

// ------------------------------------------------------------------ fp32 dot tiles
//
// C[m][n] (+)= sum_k A[m][k] * B[n][k] for k in [0, kc), kc a multiple of 8.
// A and B are row-major with row strides lda / ldb; C has row stride ldc.

inline float hsum8_generic(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

template <int MR, int NR>
inline void dot_tile_f32_generic(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                                 int64_t kc, bool acc) {
  float s[MR][NR][8];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      for (int l = 0; l < 8; ++l) s[i][j][l] = 0.f;
  for (int64_t k = 0; k < kc; k += 8) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        const float* a = A + i * lda + k;
        const float* b = B + j * ldb + k;
        for (int l = 0; l < 8; ++l) s[i][j][l] += a[l] * b[l];
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float v = hsum8_generic(s[i][j]);
      C[i * ldc + j] = acc ? C[i * ldc + j] + v : v;
    }
}

#if FASTKERN_X86
// acc += a * b in place, register operands: in tiles with many accumulators GCC otherwise
// folds a load of the shared operand into every FMA (one load per FMA) and copies
// accumulators around
FASTKERN_AVX512 inline __m512 fma_inplace(__m512 acc, __m512 a, __m512 b) {
  asm("vfmadd231ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

FASTKERN_AVX2 inline float hsum8_avx2(__m256 v) {
  // Same association as hsum8_generic: (l0+l4)+(l2+l6) + (l1+l5)+(l3+l7).
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l0+l4 .. l3+l7
  __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                                    // (0+4)+(2+6), (1+5)+(3+7)
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// the largest lane of v
FASTKERN_AVX2 inline float hmax8_avx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// 8 x 8 dword transpose: lane j of r[i] -> lane i of t[j].
FASTKERN_AVX2 inline void transpose8x8_epi32(const __m256i r[8], __m256i t[8]) {
  __m256i a[8], b[8];
  for (int j = 0; j < 4; ++j) {
    a[2 * j] = _mm256_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
    a[2 * j + 1] = _mm256_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    b[4 * h + 0] = _mm256_unpacklo_epi64(a[4 * h], a[4 * h + 2]);
    b[4 * h + 1] = _mm256_unpackhi_epi64(a[4 * h], a[4 * h + 2]);
    b[4 * h + 2] = _mm256_unpacklo_epi64(a[4 * h + 1], a[4 * h + 3]);
    b[4 * h + 3] = _mm256_unpackhi_epi64(a[4 * h + 1], a[4 * h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x20);
    t[4 + j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x31);
  }
}

// max |x[k]| over k < n (a multiple of 8) into *amax; false if x holds NaN or inf there.
FASTKERN_AVX2 inline bool row_absmax_avx2(const float* x, int64_t n, float* amax) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 a = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) {
    const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
    a = _mm256_max_ps(a, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  float r = 0.f;
  for (int l = 0; l < 8; ++l) r = std::max(r, lanes[l]);
  *amax = r;
  return _mm256_movemask_ps(bad) == 0;
}

// x's packing for the GEMMs whose lanes run along x's rows: dst[k * w + r0 + i] = dword k of
// row r0 + i (i < 8), for k in [k0, k1). Below kv, 8 dwords at a time (vec(i, k): row i's dwords
// k..k+7, zeros past the rows) transposed 8 x 8 in registers, then one(i, k) each (one
// strided store per element took up to half of a small layer's call).
template <class T, class Vec, class One>
FASTKERN_AVX2 inline void pack_rows8(T* dst, int64_t w, int64_t r0, int64_t k0, int64_t k1, int64_t kv,
                                     const Vec& vec, const One& one) {
  static_assert(sizeof(T) == 4, "dwords");
  int64_t k = k0;
  for (; k + 8 <= k1 && k + 8 <= kv; k += 8) {
    __m256i v[8], t[8];
    for (int i = 0; i < 8; ++i) v[i] = vec(i, k);
    transpose8x8_epi32(v, t);
    for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (k + j) * w + r0), t[j]);
  }
  for (; k < k1; ++k)
    for (int i = 0; i < 8; ++i) dst[k * w + r0 + i] = one(i, k);
}

template <int MR, int NR>
FASTKERN_AVX2 inline void dot_tile_f32_avx2(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                                            int64_t ldc, int64_t kc, bool acc) {
  __m256 s[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) s[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 a[MR];
    for (int i = 0; i < MR; ++i) a[i] = _mm256_loadu_ps(A + i * lda + k);
    for (int j = 0; j < NR; ++j) {
      __m256 b = _mm256_loadu_ps(B + j * ldb + k);
      for (int i = 0; i < MR; ++i) s[i][j] = _mm256_fmadd_ps(a[i], b, s[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float v = hsum8_avx2(s[i][j]);
      C[i * ldc + j] = acc ? C[i * ldc + j] + v : v;
    }
}
#endif

// Whole block: M rows of A against nb rows of B.
template <bool AVX2>
inline void dot_block_f32(const float* A, int64_t lda, int64_t M, const float* B, int64_t ldb, int64_t nb, float* C,
                          int64_t ldc, int64_t kc, bool acc);

#define FASTKERN_DOT_TILE(MR, NR)                                                                       \
  (AVX2 ? dot_tile_f32_avx2<MR, NR>(A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, kc, acc) \
        : dot_tile_f32_generic<MR, NR>(A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, kc, acc))

template <bool AVX2, int MR>
inline void dot_rows_f32(const float* A, int64_t lda, int64_t m, const float* B, int64_t ldb, int64_t nb, float* C,
                         int64_t ldc, int64_t kc, bool acc) {
  int64_t n = 0;
#if FASTKERN_X86
  for (; n + 4 <= nb; n += 4) FASTKERN_DOT_TILE(MR, 4);
  switch (nb - n) {
    case 3: FASTKERN_DOT_TILE(MR, 3); break;
    case 2: FASTKERN_DOT_TILE(MR, 2); break;
    case 1: FASTKERN_DOT_TILE(MR, 1); break;
    default: break;
  }
#else
  for (; n + 4 <= nb; n += 4) dot_tile_f32_generic<MR, 4>(A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, kc, acc);
  for (; n < nb; ++n) dot_tile_f32_generic<MR, 1>(A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, kc, acc);
#endif
}
#undef FASTKERN_DOT_TILE

template <bool AVX2>
inline void dot_block_f32(const float* A, int64_t lda, int64_t M, const float* B, int64_t ldb, int64_t nb, float* C,
                          int64_t ldc, int64_t kc, bool acc) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) dot_rows_f32<AVX2, 3>(A, lda, m, B, ldb, nb, C, ldc, kc, acc);
  if (M - m == 2) dot_rows_f32<AVX2, 2>(A, lda, m, B, ldb, nb, C, ldc, kc, acc);
  if (M - m == 1) dot_rows_f32<AVX2, 1>(A, lda, m, B, ldb, nb, C, ldc, kc, acc);
}

// ------------------------------------------------------------------ int16 dot tiles
//
// C[m][n] (+)= sum_k A[m][k] * B[n][k] exactly in int32 (wrapping), int16
// operands, kc a multiple of 16.

template <int MR, int NR>
inline void dot_tile_i16_generic(const int16_t* A, int64_t lda, const int16_t* B, int64_t ldb, int32_t* C,
                                 int64_t ldc, int64_t kc, bool acc) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const int16_t* a = A + i * lda;
      const int16_t* b = B + j * ldb;
      int32_t s = 0;
      for (int64_t k = 0; k < kc; ++k) s += int32_t(a[k]) * int32_t(b[k]);
      uint32_t prev = acc ? uint32_t(C[i * ldc + j]) : 0u;
      C[i * ldc + j] = int32_t(prev + uint32_t(s));
    }
}

#if FASTKERN_X86
FASTKERN_AVX2 inline int32_t hsum8_i32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

template <int MR, int NR>
FASTKERN_AVX2 inline void dot_tile_i16_avx2(const int16_t* A, int64_t lda, const int16_t* B, int64_t ldb,
                                            int32_t* C, int64_t ldc, int64_t kc, bool acc) {
  __m256i s[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) s[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kc; k += 16) {
    __m256i a[MR];
    for (int i = 0; i < MR; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
    for (int j = 0; j < NR; ++j) {
      __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + j * ldb + k));
      for (int i = 0; i < MR; ++i) s[i][j] = _mm256_add_epi32(s[i][j], _mm256_madd_epi16(a[i], b));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      uint32_t v = uint32_t(hsum8_i32_avx2(s[i][j]));
      uint32_t prev = acc ? uint32_t(C[i * ldc + j]) : 0u;
      C[i * ldc + j] = int32_t(prev + v);
    }
}
#endif

#define FASTKERN_DOT_TILE_I16(MR, NR)                                                                   \
  (AVX2 ? dot_tile_i16_avx2<MR, NR>(A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, kc, acc) \
        : dot_tile_i16_generic<MR, NR>(A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, kc, acc))

template <bool AVX2, int MR>
inline void dot_rows_i16(const int16_t* A, int64_t lda, int64_t m, const int16_t* B, int64_t ldb, int64_t nb,
                         int32_t* C, int64_t ldc, int64_t kc, bool acc) {
  int64_t n = 0;
#if FASTKERN_X86
  for (; n + 4 <= nb; n += 4) FASTKERN_DOT_TILE_I16(MR, 4);
  switch (nb - n) {
    case 3: FASTKERN_DOT_TILE_I16(MR, 3); break;
    case 2: FASTKERN_DOT_TILE_I16(MR, 2); break;
    case 1: FASTKERN_DOT_TILE_I16(MR, 1); break;
    default: break;
  }
#else
  for (; n < nb; ++n) dot_tile_i16_generic<MR, 1>(A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, kc, acc);
#endif
}
#undef FASTKERN_DOT_TILE_I16

template <bool AVX2>
inline void dot_block_i16(const int16_t* A, int64_t lda, int64_t M, const int16_t* B, int64_t ldb, int64_t nb,
                          int32_t* C, int64_t ldc, int64_t kc, bool acc) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) dot_rows_i16<AVX2, 3>(A, lda, m, B, ldb, nb, C, ldc, kc, acc);
  if (M - m == 2) dot_rows_i16<AVX2, 2>(A, lda, m, B, ldb, nb, C, ldc, kc, acc);
  if (M - m == 1) dot_rows_i16<AVX2, 1>(A, lda, m, B, ldb, nb, C, ldc, kc, acc);
}

// The cache lines of a weight block, rows [n, n1) x bytes [k0, k1) of rows `ld` bytes apart,
// walked row by row into L2: the next block's weights are prefetched while this block computes,
// one line every (mask + 1) k steps inside the tiles (a burst of them before each tile stalls on
// the full miss queues; at M = 16 the int16 GEMM's burst took most of the time its weight
// widening costs). Nothing where n >= n1.
struct LinePrefetch {
  const char* W = nullptr;
  int64_t ld = 0, n = 0, n1 = 0, k0 = 0, k1 = 0, k = 0, mask = 0;
  LinePrefetch() = default;
  LinePrefetch(const char* w, int64_t ld_, int64_t n_, int64_t n1_, int64_t k0_, int64_t k1_)
      : W(w), ld(ld_), n(n_), n1(n1_), k0(k0_), k1(k1_), k(k0_) {}
  // every line within `tiles` tile calls of `steps` k steps each: mask + 1 a power of two
  void spread(int64_t tiles, int64_t steps) {
    const int64_t per = ((n1 - n) * ((k1 - k0 + 63) / 64) + tiles - 1) / std::max<int64_t>(1, tiles);
    int64_t step = 1;
    while (per > 0 && step * 2 * per <= steps) step *= 2;
    mask = step - 1;
  }
  void one() {
#if FASTKERN_X86
    if (n >= n1) return;
    _mm_prefetch(W + n * ld + k, _MM_HINT_T1);
    k += 64;
    if (k >= k1) k = k0, ++n;
#endif
  }
};

inline bool use_avx2() {
#if FASTKERN_X86
  return active_isa() >= Isa::Avx2;
#else
  return false;
#endif
}

}  // namespace quant
}  // namespace cpu
}  // namespace fastkern
