// Shared pieces of the CPU float GEMM kernels (gemm.cpp, sparse_gemm.cpp):
// input checks, float conversion, the register-blocked micro-kernels and the
// cache-blocked driver that packs A and B panels around them.
//
// Every kernel accumulates in fp32 and never splits a K reduction across
// threads: each output element is summed in the same order whatever the
// thread count, so results do not change with torch.set_num_threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "cpu/isa.h"
#include "cpu/scratch.h"

#if FASTKERN_X86
#include <immintrin.h>
#endif

namespace fastkern {
namespace cpu {
namespace gemm {

// ------------------------------------------------------------------ checks

inline std::string describe(const char* name, const at::Tensor& t) {
  std::ostringstream s;
  s << name << " (shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device() << ")";
  return s.str();
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fastkern_C::", op, ": ", describe(name, t), " must be a CPU tensor");
  TORCH_CHECK(is_float_type(t.scalar_type()), "fastkern_C::", op, ": ", describe(name, t),
              " must be float32, float16 or bfloat16");
}

// Leading dims of x [..., K] flattened into M rows.
inline int64_t rows_of(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 1);
  s.push_back(n);
  return s;
}

// fp32 result [M, N] (+ bias in fp32) -> x's dtype with x's leading dims.
inline at::Tensor finish(at::Tensor out32, const c10::optional<at::Tensor>& bias, const at::Tensor& x,
                         int64_t n) {
  if (bias.has_value() && bias->defined() && out32.numel() > 0) out32.add_(bias->to(at::kFloat));
  at::Tensor out = x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
  return out.view(out_shape(x, n));
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return;
  check_cpu_float(op, "bias", *bias);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fastkern_C::", op, ": ", describe("bias", *bias),
              " must have shape [", n, "]");
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }

// ------------------------------------------------------------------ conversion

inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }

#if FASTKERN_X86
FASTKERN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
// F16C converts 8 halves in one instruction.
FASTKERN_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// bf16 is the top half of an fp32: widen and shift.
FASTKERN_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
// The first n (< 8) elements, zeros after: never reads past p[n-1].
template <class T>
FASTKERN_AVX2 inline __m256 load_partial8(const T* p, int64_t n) {
  T tmp[8];
  std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
  std::memcpy(static_cast<void*>(tmp), p, n * sizeof(T));
  return load8(tmp);
}
// 16 elements as fp32 in a zmm; the masked forms read only the lanes in the
// mask (masked-off lanes never fault), so tails need no copies.
FASTKERN_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FASTKERN_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FASTKERN_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
FASTKERN_AVX512 inline __m512 maskz_load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
FASTKERN_AVX512 inline __m512 maskz_load16(__mmask16 m, const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
FASTKERN_AVX512 inline __m512 maskz_load16(__mmask16 m, const c10::BFloat16* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
FASTKERN_AVX512 inline __mmask16 first_lanes16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

FASTKERN_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ------------------------------------------------------------------ micro-kernels
//
// C[m, n] (+)= sum_k A[k][i] * B[k][j] over one packed A sliver (kc x mr,
// k-major) and one packed B sliver (kc x nr, k-major). accumulate=false
// overwrites C (first K block), true adds to it (later K blocks), so C needs
// no zeroing. Partial tiles (m < mr or n < nr) go through a local tile.

using UKernelFn = void (*)(int64_t kc, const float* A, const float* B, float* C, int64_t ldc, int m, int n,
                           bool accumulate, const float* next_c);

// nb: the order blocked_gemm runs the kernel in (see the driver). 0: each B sliver
// (KC x nr) stays in L1 while every A sliver of the M block passes over it; > 0: each A
// sliver (KC x mr) stays in L1 while it passes over nb columns of B slivers, which stay
// in L2 from one A sliver to the next, through fn_stream (the kernel with B prefetch), or
// fn_rows where A's rows are read in place (A[i * lda + k] instead of a packed sliver).
using UKernelRowsFn = void (*)(int64_t kc, const float* A, int64_t lda, const float* B, float* C, int64_t ldc,
                               int m, int n, bool accumulate, const float* next_c);
struct MicroKernel {
  int mr;
  int nr;
  UKernelFn fn;
  int64_t nb = 0;
  UKernelFn fn_stream = nullptr;
  UKernelRowsFn fn_rows = nullptr;
};

inline void store_partial_tile(const float* tile, int tile_ld, float* C, int64_t ldc, int m, int n,
                               bool accumulate) {
  for (int i = 0; i < m; ++i) {
    float* c = C + i * ldc;
    const float* t = tile + i * tile_ld;
    if (accumulate) {
      for (int j = 0; j < n; ++j) c[j] += t[j];
    } else {
      for (int j = 0; j < n; ++j) c[j] = t[j];
    }
  }
}

// Portable 4x8: the j loop is written so the compiler keeps c[][] in SSE registers.
inline void ukernel_generic_4x8(int64_t kc, const float* A, const float* B, float* C, int64_t ldc, int m,
                                int n, bool accumulate, const float* /*next_c*/) {
  float c[4][8];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) c[i][j] = 0.f;
  for (int64_t k = 0; k < kc; ++k) {
    const float* a = A + k * 4;
    const float* b = B + k * 8;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) c[i][j] += a[i] * b[j];
  }
  store_partial_tile(&c[0][0], 8, C, ldc, m, n, accumulate);
}

#if FASTKERN_X86
// 6x16 with ymm: 12 accumulators hide the FMA latency (4 cycles at 2 FMAs per
// cycle needs >= 8 independent chains); per k it does 2 B loads and 6 A
// broadcasts for 12 FMAs, within the load ports.
//
// The k loop is inline assembly with the accumulators pinned to ymm0-11, B in
// ymm12-13 and the broadcast A values alternating in ymm14-15: the loop needs
// all 16 ymm registers, and GCC 12 scheduling the same loop written with
// intrinsics spilled an accumulator to the stack (a store and a reload every
// 4 k, store-forwarding latency added to a chain with little slack) and
// shuffled accumulators between registers. Measured on Zen 5 with the kernel
// fed from L1/L2 (kc 192, 22 A slivers per B sliver): 116 against 111-112
// GFLOP/s per core, of a 114-117 measured peak; 2048^3 on 2 threads with
// the AVX2 cap: 89-90% of peak against 86% (both with the B-sliver prefetch
// of blocked_gemm). Together with that prefetch, M=2048 against 4096x4096 and
// 11008x4096 weights went from 175 and 194 to 209 and 216 GFLOP/s (2 threads,
// AVX2 cap, medians). The sums leave through a 384-byte stack tile that the C
// update reads back from L1.
#define FK_AVX2_ROW(a_off, ya, c0, c1)                 \
  "vbroadcastss " a_off "(%[a]), %%ymm" ya "\n\t"      \
  "vfmadd231ps %%ymm12, %%ymm" ya ", %%ymm" c0 "\n\t"  \
  "vfmadd231ps %%ymm13, %%ymm" ya ", %%ymm" c1 "\n\t"
// One k step: B[k][0..15] into ymm12-13, then A[k][0..5] against it; the
// offsets are in bytes from the current A and B pointers.
#define FK_AVX2_STEP(b0, b1, a0, a1, a2, a3, a4, a5)                                          \
  "vmovaps " b0 "(%[b]), %%ymm12\n\t"                                                         \
  "vmovaps " b1 "(%[b]), %%ymm13\n\t"                                                         \
  FK_AVX2_ROW(a0, "14", "0", "1") FK_AVX2_ROW(a1, "15", "2", "3") FK_AVX2_ROW(a2, "14", "4", "5") \
  FK_AVX2_ROW(a3, "15", "6", "7") FK_AVX2_ROW(a4, "14", "8", "9") FK_AVX2_ROW(a5, "15", "10", "11")

FASTKERN_AVX2 inline void ukernel_avx2_6x16(int64_t kc, const float* A, const float* B, float* C, int64_t ldc,
                                            int m, int n, bool accumulate, const float* next_c) {
  // The next call's C tile (6 rows of 64 bytes, two lines if unaligned) is
  // requested now and arrives while this tile computes (see ukernel_avx512).
  for (int i = 0; i < 6; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(next_c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(next_c + i * ldc + 15), _MM_HINT_T0);
  }
  alignas(32) float acc[6 * 16];  // row i: acc[16 * i .. 16 * i + 15]
  int64_t k4 = kc / 4, k1 = kc % 4;
  asm volatile(
      "vxorps %%ymm0, %%ymm0, %%ymm0\n\t"
      "vxorps %%ymm1, %%ymm1, %%ymm1\n\t"
      "vxorps %%ymm2, %%ymm2, %%ymm2\n\t"
      "vxorps %%ymm3, %%ymm3, %%ymm3\n\t"
      "vxorps %%ymm4, %%ymm4, %%ymm4\n\t"
      "vxorps %%ymm5, %%ymm5, %%ymm5\n\t"
      "vxorps %%ymm6, %%ymm6, %%ymm6\n\t"
      "vxorps %%ymm7, %%ymm7, %%ymm7\n\t"
      "vxorps %%ymm8, %%ymm8, %%ymm8\n\t"
      "vxorps %%ymm9, %%ymm9, %%ymm9\n\t"
      "vxorps %%ymm10, %%ymm10, %%ymm10\n\t"
      "vxorps %%ymm11, %%ymm11, %%ymm11\n\t"
      "test %[k4], %[k4]\n\t"
      "jz 2f\n\t"
      ".p2align 5\n\t"
      "1:\n\t"
      // A sliver rows stream from L2: ask for the line 8 k steps ahead.
      "prefetcht0 192(%[a])\n\t"
      FK_AVX2_STEP("0", "32", "0", "4", "8", "12", "16", "20")
      FK_AVX2_STEP("64", "96", "24", "28", "32", "36", "40", "44")
      FK_AVX2_STEP("128", "160", "48", "52", "56", "60", "64", "68")
      FK_AVX2_STEP("192", "224", "72", "76", "80", "84", "88", "92")
      "add $96, %[a]\n\t"
      "add $256, %[b]\n\t"
      "dec %[k4]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      "test %[k1], %[k1]\n\t"
      "jz 4f\n\t"
      "3:\n\t"
      FK_AVX2_STEP("0", "32", "0", "4", "8", "12", "16", "20")
      "add $24, %[a]\n\t"
      "add $64, %[b]\n\t"
      "dec %[k1]\n\t"
      "jnz 3b\n\t"
      "4:\n\t"
      "vmovaps %%ymm0, 0(%[acc])\n\t"
      "vmovaps %%ymm1, 32(%[acc])\n\t"
      "vmovaps %%ymm2, 64(%[acc])\n\t"
      "vmovaps %%ymm3, 96(%[acc])\n\t"
      "vmovaps %%ymm4, 128(%[acc])\n\t"
      "vmovaps %%ymm5, 160(%[acc])\n\t"
      "vmovaps %%ymm6, 192(%[acc])\n\t"
      "vmovaps %%ymm7, 224(%[acc])\n\t"
      "vmovaps %%ymm8, 256(%[acc])\n\t"
      "vmovaps %%ymm9, 288(%[acc])\n\t"
      "vmovaps %%ymm10, 320(%[acc])\n\t"
      "vmovaps %%ymm11, 352(%[acc])\n\t"
      : [a] "+r"(A), [b] "+r"(B), [k4] "+r"(k4), [k1] "+r"(k1)
      : [acc] "r"(acc)
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  if (m == 6 && n == 16) {
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      float* ci = C + i * ldc;
      __m256 lo = _mm256_load_ps(acc + 16 * i), hi = _mm256_load_ps(acc + 16 * i + 8);
      if (accumulate) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(ci));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(ci + 8));
      }
      _mm256_storeu_ps(ci, lo);
      _mm256_storeu_ps(ci + 8, hi);
    }
    return;
  }
  store_partial_tile(acc, 16, C, ldc, m, n, accumulate);
}
#undef FK_AVX2_STEP
#undef FK_AVX2_ROW
#endif

#if FASTKERN_X86
// MR x (16*NV) with zmm. 12x32 gives 24 of the 32 zmm registers to
// accumulators: per k, 2 B loads and 12 A broadcasts feed 24 FMAs (12 cycles at
// 2 FMAs per cycle), well within the load ports, and 24 independent chains
// cover the FMA latency. C is the one operand that comes from far away (a
// 16 MB C at 2048^2 lives in L3/DRAM and is revisited once per KC block): while
// it computes, the kernel prefetches the C tile of the next call, one line
// per k step, so the loads at the end hit L1. Tails: n < 16*NV by lane masks,
// m < MR by storing only m rows, so no scratch tile is needed. PFB > 0: each k step
// also prefetches the B row PFB steps ahead, for B slivers that stream from L2
// (blocked_gemm with nb > 0). ROWS: A is read in place, row i of the sliver at
// A + i * lda with unit stride along k (ukernel_avx512_rows), instead of a packed sliver.
template <int MR, int NV, int PFB, bool ROWS>
FASTKERN_AVX512 inline __attribute__((always_inline)) void ukernel_avx512_body(int64_t kc, const float* A, int64_t lda,
                                                                            const float* B, float* C, int64_t ldc,
                                                                            int m, int n, bool accumulate,
                                                                            const float* next_c) {
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = _mm512_setzero_ps();
#define FK_STEP512()                                                            \
  {                                                                             \
    if (PFB > 0) {                                                              \
      _Pragma("GCC unroll 4") for (int j = 0; j < NV; ++j)                      \
          _mm_prefetch(reinterpret_cast<const char*>(B + PFB * 16 * NV + 16 * j), _MM_HINT_T0); \
    }                                                                           \
    __m512 b[NV];                                                               \
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; ++j) b[j] = _mm512_load_ps(B + 16 * j); \
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {                    \
      const __m512 a = _mm512_set1_ps(ROWS ? A[i * lda] : A[i]);                \
      _Pragma("GCC unroll 4") for (int j = 0; j < NV; ++j) c[i][j] = _mm512_fmadd_ps(a, b[j], c[i][j]); \
    }                                                                           \
    A += ROWS ? 1 : MR;                                                         \
    B += 16 * NV;                                                               \
  }
  int64_t k = 0;
  for (int p = 0; p < MR * NV && k < kc; ++p, ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(next_c + (p / NV) * ldc + 16 * (p % NV)), _MM_HINT_T0);
    FK_STEP512()
  }
  for (; k < kc; ++k) FK_STEP512()
#undef FK_STEP512
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const int left = std::max(0, std::min(16, n - 16 * j));
    mask[j] = static_cast<__mmask16>((1u << left) - 1u);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i >= m) break;
    float* ci = C + i * ldc;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      __m512 v = c[i][j];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[j], ci + 16 * j));
      _mm512_mask_storeu_ps(ci + 16 * j, mask[j], v);
    }
  }
}
template <int MR, int NV, int PFB>
FASTKERN_AVX512 void ukernel_avx512(int64_t kc, const float* A, const float* B, float* C, int64_t ldc, int m, int n,
                                    bool accumulate, const float* next_c) {
  ukernel_avx512_body<MR, NV, PFB, false>(kc, A, 0, B, C, ldc, m, n, accumulate, next_c);
}
template <int MR, int NV, int PFB>
FASTKERN_AVX512 void ukernel_avx512_rows(int64_t kc, const float* A, int64_t lda, const float* B, float* C,
                                         int64_t ldc, int m, int n, bool accumulate, const float* next_c) {
  ukernel_avx512_body<MR, NV, PFB, true>(kc, A, lda, B, C, ldc, m, n, accumulate, next_c);
}
#endif

inline MicroKernel micro_kernel(Isa isa) {
#if FASTKERN_X86
  if (isa >= Isa::Avx512)
    return {12, 32, &ukernel_avx512<12, 2, 0>, 512, &ukernel_avx512<12, 2, 16>, &ukernel_avx512_rows<12, 2, 16>};
  if (isa >= Isa::Avx2) return {6, 16, &ukernel_avx2_6x16};
#endif
  (void)isa;
  return {4, 8, &ukernel_generic_4x8};
}

// ------------------------------------------------------------------ packing
//
// A packer fills one sliver: dst[k * width + r] = src(row0 + r, k0 + k) for
// r < rows, zero for rows <= r < width (so partial tiles need no masking in the
// micro-kernel).

#if FASTKERN_X86
FASTKERN_AVX2 inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// One 8-k step of a packed sliver: dst[i * width + r] = lane i of row8(r) (i < 8) for the
// rows r < rows, 0 for rows <= r < width. 8 rows at a time as 8 vectors, transposed in
// registers, so both the reads and the writes are whole vectors.
template <class Row8>
FASTKERN_AVX2 inline __attribute__((always_inline)) void pack_k8_avx2(int rows, int width, float* dst,
                                                                     const Row8& row8) {
  for (int g = 0; g < width; g += 8) {
    __m256 v[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) v[i] = g + i < rows ? row8(g + i) : _mm256_setzero_ps();
    transpose8x8(v);
    const int w = std::min(8, width - g);
    if (w == 8) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * width + g, v[i]);
    } else {
      alignas(32) float t[8];
      for (int i = 0; i < 8; ++i) {
        _mm256_store_ps(t, v[i]);
        std::memcpy(dst + i * width + g, t, w * sizeof(float));
      }
    }
  }
}

// The sliver of rows with unit stride along k: 8 rows x 8 k are loaded (and converted to
// fp32) and packed by pack_k8_avx2; packing costs a few percent of the product instead of
// the element-by-element scatter's tens of percent.
template <class T>
FASTKERN_AVX2 void pack_rows_avx2(const T* src, int64_t ld, int rows, int64_t kc, int width, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8)
    pack_k8_avx2(rows, width, dst + k * width, [&](int r) FASTKERN_AVX2 { return load8(src + r * ld + k); });
  for (; k < kc; ++k)
    for (int r = 0; r < width; ++r) dst[k * width + r] = r < rows ? to_f32(src[r * ld + k]) : 0.f;
}
#endif

// Rows of a strided [R, K] matrix of T.
template <class T>
struct StridedRows {
  const T* p;
  int64_t s_row;
  int64_t s_k;
  Isa isa = Isa::Generic;
  // fp32 rows with unit stride along k, which a kernel can read in place: the rows, their
  // stride in ld; else nullptr, ld 0
  const float* fp32_rows(int64_t& ld) const {
    const bool direct = std::is_same<T, float>::value && s_k == 1 && s_row > 0;
    ld = direct ? s_row : 0;
    return direct ? reinterpret_cast<const float*>(p) : nullptr;
  }
  void operator()(int64_t row0, int rows, int64_t k0, int64_t kc, int width, float* dst) const {
    const T* base = p + row0 * s_row + k0 * s_k;
#if FASTKERN_X86
    if (s_k == 1 && isa >= Isa::Avx2) {
      pack_rows_avx2(base, s_row, rows, kc, width, dst);
      return;
    }
#endif
    if (s_row == 1 && s_k != 1) {  // a transposed matrix: each k is a contiguous run of rows
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = base + k * s_k;
        float* d = dst + k * width;
        for (int r = 0; r < rows; ++r) d[r] = to_f32(src[r]);
        for (int r = rows; r < width; ++r) d[r] = 0.f;
      }
      return;
    }
    for (int r = 0; r < rows; ++r) {
      const T* src = base + r * s_row;
      float* d = dst + r;
      if (s_k == 1) {
        for (int64_t k = 0; k < kc; ++k) d[k * width] = to_f32(src[k]);
      } else {
        for (int64_t k = 0; k < kc; ++k) d[k * width] = to_f32(src[k * s_k]);
      }
    }
    for (int r = rows; r < width; ++r)
      for (int64_t k = 0; k < kc; ++k) dst[k * width + r] = 0.f;
  }
};

// An A packer may also offer fp32_rows(ld) (StridedRows does): rows that a kernel with
// fn_rows can read in place, where it returns them.
template <class P, class = void>
struct has_fp32_rows : std::false_type {};
template <class P>
struct has_fp32_rows<P, std::void_t<decltype(std::declval<const P&>().fp32_rows(std::declval<int64_t&>()))>>
    : std::true_type {};

// ------------------------------------------------------------------ the blocked driver
//
// Goto/BLIS loop order: an NC x KC panel of B is packed once and shared by the
// cores through L3; each task packs an MC x KC block of A into its own L2 and
// sweeps the B slivers (KC x NR) against it, each sliver staying in L1/L2
// while all A slivers of the block pass over it. With KC x MC x NC =
// 192 x 144 x 3072 fp32:
//   B sliver KC*NR*4 = 12 KB (NR 16) or 24 KB (NR 32) in L1, next to the A sliver
//   streaming past it (KC*MR*4 = 9 KB at MR 12: 33 KB of a 48 KiB L1d);
//   A block  MC*KC*4 <= 108 KB (L2), B panel KC*NC*4 = 2.3 MB (L3, shared).
// KC 192 against 256 (B sliver 32 KB + A sliver 12 KB, nearly all of L1): 2048^3 on
// 2 Zen 5 cores 465-473 GFLOP/s against 350-370, measured back to back.
// The sizes are shared by every ISA (tests aim at the KC and NC boundaries, and the
// skinny driver sums each output over the same KC blocks, so both give identical results).
//
// The zmm kernel (12 x 32, nb = 512) runs the other order inside a task, as BLIS does on
// AVX-512 cores: each A sliver (KC x MR, 9 KB) stays in L1 while it passes over 512
// columns of B slivers (16 slivers, 384 KB), which stay in L2 from one A sliver to the
// next and stream into the kernel (it prefetches 16 k steps ahead). Measured on 2 Sapphire
// Rapids class cores (KVM guest, alternating calls in one process, 25-30 rounds,
// 2048^3, medians), with the thread-kept huge-page B panel below: 0.89-0.96x the time of
// the first order. Its kernel alone (packing skipped) ran 182-188 against 170-175 GFLOP/s
// per core. Also measured, within the noise of this: KC 256 / 384 (with KB 4 x 384),
// MC 288 / 432, nb 256 / 1024; the same order with the ymm kernel was 3-8% slower.
//
// With the AVX2 6x16 kernel (B sliver 12 KB), KC 256 and 384 (and KB 6 x 256,
// 4 x 384), MC 72/96/192 and NC 1024 were measured against these on 2 Zen 5
// cores with the AVX2 cap: within the run-to-run noise (+-3%) at 2048^3; KC 384
// won ~6% at K=11008 and lost ~2% at 4096x4096 x M=2048, so none was taken.
constexpr int64_t kKC = 192;
constexpr int64_t kMC = 144;
constexpr int64_t kNC = 3072;

// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelMinMacs = int64_t(1) << 17;

// A parallel_for grain (in items) that keeps each task at least kParallelMinMacs.
inline int64_t grain_for(int64_t items, int64_t macs_per_item) {
  return std::max<int64_t>(1, std::min<int64_t>(items, kParallelMinMacs / std::max<int64_t>(1, macs_per_item)));
}

// parallel_for with chunks of `grain` items handed out one at a time from a
// shared counter instead of one fixed range per thread. The machines this runs
// on are often shared: when one thread is descheduled, the other keeps taking
// chunks instead of waiting at the join for the slow one's fixed half. Each
// item is still computed by the same code whichever thread takes it, so
// results do not depend on the thread count or the schedule.
template <class F>
void parallel_for_dynamic(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end <= begin) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t nchunks = div_up(end - begin, grain);
  const int64_t nt = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), nchunks);
  if (nt <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < nchunks;)
      f(begin + c * grain, std::min(end, begin + (c + 1) * grain));
  });
}

inline void prefetch_l1(const float* p) {
#if FASTKERN_X86
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Whether a kernel with fn_rows reads its MR rows of A, lda floats apart, in place. At each k
// it reads one line of every row and needs all of them again at the next k: where the rows'
// stride is a multiple of the L1's set period (sets x line bytes, 4 KiB on the x86 cores in
// use) every row lands in the same set, and more rows than the L1 has ways keep evicting one
// another. A 2048 x 2048 fp32 A (8 KiB rows) on 2 Zen 4 cores (32 KiB 8-way L1d): in place
// 1.15-1.23x the time of the same rows padded to 2064 floats or of packed slivers (1 thread:
// 1.20x; packed 200 GFLOP/s, 86% of the FMA peak); 12 rows in one set of a 12-way L1 (Xeon,
// 48 KiB) had run as fast as padded rows. So A is packed where more
// than `ways` of the rows share a set. FASTKERN_GEMM_A_IN_PLACE (read on every call): 0 never
// in place, 1 wherever the layout allows, unset or -1 by this rule.
inline bool a_in_place(int64_t lda, int rows) {
  const int64_t knob = env_knob("FASTKERN_GEMM_A_IN_PLACE", -1);
  if (knob >= 0) return knob != 0;
  return !rows_alias_in_l1(lda * static_cast<int64_t>(sizeof(float)), rows);
}

// K rows of B packed per pass: one packing region and one compute region per
// (NC panel, KB pass), instead of two per KC block. Each parallel region ends
// in a join, and on a shared machine every join can cost a scheduler tick while
// a descheduled thread catches up; 2048^3 now has 2 joins instead of 16.
// The packed B of a pass takes at most KB x NC x 4 = 24 MB (L3-sized).
constexpr int64_t kKB = 8 * kKC;

// bias (fp32 [N], optional): added to each output after its last K block, while the task's
// C block is still in cache (as finish() would add it, so bitwise the same), where a pass
// over the whole output afterwards read it back from memory: 4096 x 1536 x 384 (2 threads,
// AVX2) spent ~4% of a W4A16 call in that pass.
template <class PackA, class PackB>
void blocked_gemm(int64_t M, int64_t N, int64_t K, const MicroKernel& uk, const PackA& pack_a,
                  const PackB& pack_b, float* C, int64_t ldc, const float* bias = nullptr) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const int MR = uk.mr, NR = uk.nr;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // M blocks: as few as fit in L2, but a multiple of the thread count so no core idles.
  int64_t nmb = div_up(M, kMC);
  if (nmb > 1 || M >= 2 * MR * nthreads) nmb = round_up(nmb, nthreads);
  const int64_t mc = round_up(div_up(M, nmb), MR);
  nmb = div_up(M, mc);
  const int64_t ncr_max = round_up(std::min(kNC, N), NR);
  const int64_t kb_max = std::min(kKB, K);
  // Thread-kept and (from 4 MB) on huge pages: a fresh buffer of up to 19 MB was mapped
  // one 4 KiB page at a time on every call, and its TLB misses slowed the kernels' B
  // loads (2048^3, 1 thread: 0.94x the time).
  Scratch bbuf(ScratchSlot::Out, size_t(ncr_max * kb_max + 16) * sizeof(float));
  float* Bp = bbuf.as<float>();
  // fp32 A with unit stride along K, in the second order: the kernel reads its full A
  // slivers in place (12 rows lda apart; the sliver still stays in L1 over its B chunk),
  // and only a partial last sliver of an M block is packed. Packing A took ~3% of 2048^3;
  // in place, 0.94-0.96x the time (2 Xeon cores, 1 and 2 threads, alternating calls).
  int64_t lda_direct = 0;
  const float* a_direct = nullptr;
  if constexpr (has_fp32_rows<PackA>::value) {
    if (uk.nb > 0 && uk.fn_rows != nullptr) a_direct = pack_a.fp32_rows(lda_direct);
    if (a_direct != nullptr && !a_in_place(lda_direct, MR)) a_direct = nullptr, lda_direct = 0;
  }
  // The packed A of a task, in the taking thread's kept buffer (a task may be taken by any thread).
  const size_t abuf_bytes = size_t(mc * std::min(kKC, K) + 16) * sizeof(float);

  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    const int64_t nsl = div_up(nc, NR), ncr = nsl * NR;
    // Too few M blocks to feed every core: also split the panel's slivers.
    const int64_t njs = nmb >= 2 * nthreads ? 1 : std::min(nsl, div_up(2 * nthreads, nmb));
    for (int64_t kb0 = 0; kb0 < K; kb0 += kKB) {
      const int64_t kb1 = std::min(K, kb0 + kKB);
      const int64_t npc = div_up(kb1 - kb0, kKC);
      // The slivers of KC block q sit at Bp + (q * KC) * ncr, sliver s of it at + s * kc * NR.
      auto sliver = [&](int64_t q, int64_t s, int64_t kc) { return Bp + q * kKC * ncr + s * kc * NR; };
      // One chunk packs one sliver column, all KC blocks of the pass in k order, so
      // each of its NR source rows is read as one run of up to KB elements that the
      // hardware prefetcher follows. Block-major order (every sliver of KC block 0,
      // then of block 1, ...) read runs of KC elements only: packing 2048x2048 fp32
      // from DRAM on one core took 2.2-2.3 ms against 1.6-2.0 ms this way.
      parallel_for_dynamic(0, npc * nsl, npc, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t s = t / npc, q = t % npc;
          const int64_t pc = kb0 + q * kKC, kc = std::min(kKC, kb1 - pc);
          pack_b(jc + s * NR, static_cast<int>(std::min<int64_t>(NR, nc - s * NR)), pc, kc, NR, sliver(q, s, kc));
        }
      });
      // A task owns one C block (M block x slice of the panel) and runs all the KC
      // blocks of the pass over it, so C stays in cache between them.
      const int64_t macs_per_task = div_up(M, nmb) * div_up(nc, njs) * (kb1 - kb0);
      parallel_for_dynamic(0, nmb * njs, grain_for(nmb * njs, macs_per_task), [&](int64_t b, int64_t e) {
        Scratch abuf(ScratchSlot::Worker0, abuf_bytes);
        float* Ap = abuf.as<float>();
        for (int64_t t = b; t < e; ++t) {
          const int64_t ib = t / njs, js = t % njs;
          const int64_t i0 = ib * mc, m = std::min(mc, M - i0);
          const int64_t na = div_up(m, MR);
          const int64_t s0 = js * nsl / njs, s1 = (js + 1) * nsl / njs;
          for (int64_t q = 0; q < npc; ++q) {
            const int64_t pc = kb0 + q * kKC, kc = std::min(kKC, kb1 - pc);
            for (int64_t s = lda_direct > 0 ? m / MR : 0; s < na; ++s)
              pack_a(i0 + s * MR, static_cast<int>(std::min<int64_t>(MR, m - s * MR)), pc, kc, MR, Ap + s * kc * MR);
            if (uk.nb > 0) {
              // A sliver in L1 over a chunk of B slivers in L2; the next call's C tile is the
              // next one in the row of tiles, then the first of the chunk's next row.
              const int64_t nbs = std::max<int64_t>(1, uk.nb / NR);
              for (int64_t jb = s0; jb < s1; jb += nbs) {
                const int64_t je = std::min(s1, jb + nbs);
                for (int64_t ir = 0; ir < na; ++ir) {
                  const int mm = static_cast<int>(std::min<int64_t>(MR, m - ir * MR));
                  float* crow = C + (i0 + ir * MR) * ldc + jc;
                  for (int64_t jr = jb; jr < je; ++jr) {
                    const int nn = static_cast<int>(std::min<int64_t>(NR, nc - jr * NR));
                    const float* next = jr + 1 < je ? crow + (jr + 1) * NR : ir + 1 < na ? crow + MR * ldc + jb * NR : crow;
                    if (lda_direct > 0 && mm == MR)
                      uk.fn_rows(kc, a_direct + (i0 + ir * MR) * lda_direct + pc, lda_direct, sliver(q, jr, kc),
                                 crow + jr * NR, ldc, mm, nn, pc > 0, next);
                    else
                      uk.fn_stream(kc, Ap + ir * kc * MR, sliver(q, jr, kc), crow + jr * NR, ldc, mm, nn, pc > 0,
                                   next);
                  }
                }
              }
              continue;
            }
            for (int64_t jr = s0; jr < s1; ++jr) {
              const int nn = static_cast<int>(std::min<int64_t>(NR, nc - jr * NR));
              const float* bp = sliver(q, jr, kc);
              // The next B sliver (the next one of this slice, else the first one of the
              // next KC block) is requested a few lines per micro-kernel call while the A
              // slivers sweep this one, so it is in L1 when its sweep starts. Without it
              // the first call on each sliver waited for its kc x NR floats from L3,
              // as one in na calls (1 in 22 at 2048^2): 2048^3, AVX2 cap, 1 thread
              // 102 against 95 GFLOP/s (before the assembly k loop).
              const int64_t nkc = jr + 1 < s1 ? kc : q + 1 < npc ? std::min(kKC, kb1 - pc - kc) : 0;
              const float* nb = jr + 1 < s1 ? sliver(q, jr + 1, kc) : nkc > 0 ? sliver(q + 1, s0, nkc) : bp;
              const int64_t nb_lines = nkc * NR / 16;
              int64_t line = 0;
              for (int64_t ir = 0; ir < na; ++ir) {
                for (const int64_t end = (ir + 1) * nb_lines / na; line < end; ++line)
                  prefetch_l1(nb + line * 16);
                const int mm = static_cast<int>(std::min<int64_t>(MR, m - ir * MR));
                float* c = C + (i0 + ir * MR) * ldc + jc + jr * NR;
                // The tile the next call works on, for the kernel to prefetch.
                const float* next = ir + 1 < na ? c + MR * ldc
                                    : jr + 1 < s1 ? C + i0 * ldc + jc + (jr + 1) * NR
                                                  : C + i0 * ldc + jc + s0 * NR;
                uk.fn(kc, Ap + ir * kc * MR, bp, c, ldc, mm, nn, pc > 0, next);
              }
            }
          }
          if (bias != nullptr && kb1 == K) {
            const int64_t j0 = jc + s0 * NR, j1 = jc + std::min(nc, s1 * NR);
            for (int64_t i = i0; i < i0 + m; ++i) {
              float* c = C + i * ldc;
              for (int64_t j = j0; j < j1; ++j) c[j] += bias[j];
            }
          }
        }
      });
    }
  }
}

}  // namespace gemm
}  // namespace cpu
}  // namespace fastkern
