// int8 CPU kernels: fastkern_C::int8_gemm, linear_w8a16, linear_w8a8.
//
// Without VNNI, integer products use vpmaddwd on int16-widened operands: it is exact for
// the whole int8 range (-128 * -128 pairs included), which vpmaddubsw is not, and on Zen 5
// with 256-bit vectors it keeps the two multiplier pipes as busy per multiply-add as the
// vpmaddubsw + vpmaddwd pair does (section "AVX2 without VNNI" has the measurements).
//
// AVX2: small M (< kS16GemmMinM, and M = 23, 24 on large weights; int8_gemv_takes) runs a
// GEMV in passes of up to 4 rows of x, widening the int8 weight in registers (at M = 1, and
// where int16 rows of x outgrow the L1d, on int8 x by the sign trick instead: gemv_i8s); each
// thread's weight rows go in L2-sized blocks, all passes over a block before the next
// (parallel_row_blocks), so the weight comes from DRAM once. Larger M runs a transposed-tile
// GEMM on int16 pairs (section "AVX2 without VNNI"). W8A16 runs a GEMV on two int16 limbs of
// x at M <= 2 (M <= 3 on vpdpwssd with AVX512-VNNI; gemv_w8l), its fp32 GEMV (3 rows of x per
// pass, the same row blocks) above, up to kW8a16GemvMaxMAvx2, and the fp32 GEMM drivers with
// B slivers dequantized from the int8 rows above (section "W8A16 GEMM, AVX2"; the generic
// path dequantizes one cache-sized weight panel at a time).
// The previous AVX2 integer path (int16 panels, row-vector dot tiles) stays selectable with
// FASTKERN_INT8_AVX2=panel, for A/B timing; it is also what the generic path runs. With
// AVX-512 VNNI the integer product (int8_gemm, linear_w8a8) runs on vpdpbusd instead: a
// GEMV for M <= 4, GEMV tiles of several weight rows up to M = 12 where K <= 4096, and a
// transposed-tile GEMM above (section "AVX-512 VNNI"); on the amx path the GEMM runs on AMX
// tiles from M = 9, small layers included (section "AMX"). W8A16 with AVX-512 runs the limb
// GEMV (with VNNI; else an fp32 GEMV) up to M = 3, GEMV tiles to M = 24 (32 under a 48 KiB
// L1d; 12 for bf16 x with AVX512-BF16) and fp32 / vdpbf16ps GEMMs above, their last few rows
// past a multiple of 16 by the tiles or the GEMV (w8a16_tail_rows), or within the vdpbf16ps
// GEMM (w8a16_bf16_tail_rows). On small layers
// (BERT/MiniLM-sized weights) at small M the VNNI paths run weight-vector kernels instead
// (section "small M: weight vectors"; use_wv() says where; the AVX2 ones only where
// FASTKERN_INT8_WV_MAX_M asks for them).
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/gemm_blocked.h"
#include "cpu/gemm_skinny.h"
#include "cpu/quant_common.h"
#include "cpu/scratch.h"
#include "cpu/tile_gemm.h"

namespace fastkern {
namespace cpu {
namespace quant {
namespace {

using tiles::kF32KC;
using tiles::kF32TaskRows;
using tiles::next_panel_lines;
using tiles::panel_rows;
#if FASTKERN_X86
using tiles::transpose16x16;
#endif

constexpr int64_t kGemvMaxM = 3;
// linear_w8a16 runs the GEMV kernel in groups of kGemvMaxM rows up to this M (generic path,
// and the AVX2 panel path kept for A/B timing)
constexpr int64_t kW8a16GemvMaxM = 16;
// and on the AVX2 path up to this one, in row blocks (parallel_row_blocks): 2 threads, one
// process, alternating, against the fp32 GEMM drivers with int8 slivers (w8a16_gemm_avx2),
// 11008 x 4096 / 4096 x 11008 / 4096 x 4096: M = 17 7.4 / 7.3 / 2.9 ms vs 12.0 / 12.8 / 4.5,
// M = 32 13.4 / 13.3 / 5.0 vs 18.4 / 21.9 / 7.4, M = 64 25.5 / - / 9.4 vs 28.7 / - / 10.8,
// M = 128 50.7 / - / 18.1 vs 55.7 / - / 19.2, M = 256 97.1 / - / 36.2 vs 96.7 / - / 36.8. The
// GEMV converts each weight once per pass of rows of x (3 then, 4 now), but on other pipes than
// the FMAs, which it keeps busier than the GEMM's packed slivers do. With 4-row passes (Zen 4,
// 32 KiB L1d, same method, GEMV against GEMM; 4096 x 4096 / 11008 x 4096 / 4096 x 14336): M =
// 40 8.0 / 20.9 / 26.9 vs 9.3 / 25.0 / 30.3, M = 64 12.3 / 32.5 / 42.2 vs 12.9 / 35.1 / 45.9,
// M = 128 23.7 / 63.1 / 85.1 vs 26.5 / 63.6 / 86.7 (with 3-row passes the GEMM had won from
// M = 48 there). FASTKERN_W8A16_GEMV_MAX_M overrides it, read on every call (A/B, tests).
constexpr int64_t kW8a16GemvMaxMAvx2 = 128;
// and, with AVX-512, the GEMMs from this M: their 16-row tiles cost the same from M = 1 to
// 16 and overtake the AVX-512 GEMV's 3-row passes at M = 13 with fp32 x (4096 x 4096, one
// thread: M = 12 3.1 vs 3.4 ms, M = 16 4.4 vs 3.5) and at M = 9 with bf16 x (vdpbf16ps:
// M = 8 2.2 vs 2.3 ms, M = 10 2.9 vs 2.2). FASTKERN_W8A16_GEMM_MIN_M sets both.
int64_t w8a16_gemm_min_m(bool bf16) {
  static const int64_t v = [] {
    const char* e = std::getenv("FASTKERN_W8A16_GEMM_MIN_M");
    return e ? std::max<int64_t>(1, std::atoll(e)) : int64_t(0);
  }();
  return v > 0 ? v : (bf16 ? 9 : 13);
}
// Software prefetch distance along each weight row of a GEMV, in bytes: NR interleaved
// row streams cross 4 KiB pages, where the hardware prefetchers stop (see int4_gemm.cpp).
constexpr int64_t kI8Prefetch = 512;
// and 2 KB ahead into L2 only: more lines in flight than the L1 miss buffers allow
constexpr int64_t kI8PrefetchL2 = 2048;
constexpr int64_t kGemvRows = 4;     // weight rows per GEMV tile (and per thread work unit)
constexpr int64_t kPanelRows = 64;   // weight rows per GEMM panel
constexpr int64_t kPanelKI16 = 1024; // K columns per int16 panel (64 x 1024 x 2 B = 128 KB, in L2)
constexpr int64_t kPanelKF32 = 512;  // K columns per fp32 panel (64 x 512 x 4 B = 128 KB, in L2)
// linear_w8a16 sums x * q before the scale on its GEMV paths: 127 |x| summed over any K
// stays finite in fp32 up to this |x| (see holds_beyond)
constexpr float kW8MaxX = 1e30f;
// |sum| <= K * 127 * 128 stays below 2^31 (W8A8 activations never hold -128, the weights may:
// with K * 127 * 127 the bound let K = 132105 .. 133143 of -127 x -128 products wrap).
constexpr int64_t kW8A8MaxK = 132104;
// int8_gemm: both operands may hold -128, |sum| <= K * 128 * 128 < 2^31
constexpr int64_t kInt8GemmMaxK = 131071;

// ------------------------------------------------------------------ GEMV: int8 weights x int16 activations

template <int MR, int NR>
void gemv_i8_generic(const int16_t* A, int64_t lda, const int8_t* W, int64_t K, int32_t* C, int64_t ldc) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const int16_t* a = A + i * lda;
      const int8_t* w = W + j * K;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int32_t(a[k]) * int32_t(w[k]);
      C[i * ldc + j] = s;
    }
}

#if FASTKERN_X86
// A is zero-padded to a multiple of 16 columns; W rows have exactly K bytes, so
// the last partial 16-byte chunk goes through a zeroed copy instead of reading
// past the end of the tensor.
template <int MR, int NR>
FASTKERN_AVX2 inline void gemv_i8_step(__m256i (&s)[MR][NR], const int16_t* A, int64_t lda,
                                       const int8_t* const* wp, int64_t k) {
  __m256i a[MR];
  for (int i = 0; i < MR; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
  for (int j = 0; j < NR; ++j) {
    __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp[j])));
    for (int i = 0; i < MR; ++i) s[i][j] = _mm256_add_epi32(s[i][j], _mm256_madd_epi16(a[i], b));
  }
}

template <int MR, int NR>
FASTKERN_AVX2 void gemv_i8_avx2(const int16_t* A, int64_t lda, const int8_t* W, int64_t K, int32_t* C,
                                int64_t ldc) {
  __m256i s[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) s[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  const int8_t* wp[NR];
  for (; k + 16 <= K; k += 16) {
    for (int j = 0; j < NR; ++j) wp[j] = W + j * K + k;
    if ((k & 63) == 0)
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(wp[j] + kI8Prefetch), _MM_HINT_T0);
    gemv_i8_step<MR, NR>(s, A, lda, wp, k);
  }
  if (k < K) {
    alignas(16) int8_t tail[NR][16];
    for (int j = 0; j < NR; ++j) {
      std::memset(tail[j], 0, 16);
      std::memcpy(tail[j], W + j * K + k, K - k);
      wp[j] = tail[j];
    }
    gemv_i8_step<MR, NR>(s, A, lda, wp, k);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = hsum8_i32_avx2(s[i][j]);
}
#endif

template <int MR>
void gemv_i8_rows(bool avx2, const int16_t* A, int64_t lda, const int8_t* W, int64_t K, int32_t* C, int64_t ldc,
                  int64_t n0, int64_t n1) {
  int64_t n = n0;
#if FASTKERN_X86
  if (avx2) {
    for (; n + 4 <= n1; n += 4) gemv_i8_avx2<MR, 4>(A, lda, W + n * K, K, C + n, ldc);
    for (; n < n1; ++n) gemv_i8_avx2<MR, 1>(A, lda, W + n * K, K, C + n, ldc);
    return;
  }
#endif
  for (; n + 4 <= n1; n += 4) gemv_i8_generic<MR, 4>(A, lda, W + n * K, K, C + n, ldc);
  for (; n < n1; ++n) gemv_i8_generic<MR, 1>(A, lda, W + n * K, K, C + n, ldc);
}

// ------------------------------------------------------------------ AVX-512 VNNI (int8 x int8 -> int32)
//
// vpdpbusd multiplies unsigned by signed bytes, four products per int32 lane; int32
// lanes wrap, so every result below is exact whenever the true sum fits in int32, as in
// the reference. One operand has to be made unsigned by adding 128 (flipping its sign
// bit), and 128 times the other operand's sum is subtracted at the end:
// - GEMV (M <= kVnniGemvMaxM, and gemv_vnni_blocked, see row_gemv_takes()) streams the weight, flips
//   it in registers (one vpxor per 64 bytes, hidden under the memory stream) and subtracts
//   128 * sum_k a[m][k].
// - GEMM flips the activation once, while packing it, so the weight bytes are broadcast
//   as they are (a load and nothing else per 4 bytes of a weight row), and subtracts
//   128 * sum_k w[n][k]; each task sums its own weight rows first, which also pulls those
//   rows into L2 in one sequential stream before its tiles read them.
#if FASTKERN_X86
#define FASTKERN_VNNI512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

// acc += u8(a) . s8(b) per 4 bytes, in place: GCC keeps arrays of _mm512_dpbusd_epi32
// accumulators in registers only by copying each one every iteration (tens of extra
// moves per 16 products); the asm form pins each accumulator to one register.
FASTKERN_VNNI512 inline __m512i dpbusd_inplace(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

constexpr int64_t kVnniGemvMaxM = 4;
constexpr int64_t kVnniKC = 2048;  // K bytes per block of x: 64 rows x 2 KB = 128 KB in L2
// GEMV prefetch distance along a thread's weight stream, in bytes: measured at M = 1,
// 4096 x 4096, one thread, 6-16 KB ahead all read at ~50 GB/s (FBGEMM's rate), 1 KB (L1)
// + 4 KB (L2) ahead at ~40
constexpr int64_t kVnniAhead = 8192;

// GEMV: MR rows of x (int8, zero-padded to a multiple of 64 columns) against weight rows
// [n0, n1), one whole row at a time. The rows of a thread are one contiguous run of
// memory, read front to back as one stream, and the prefetches run a fixed distance ahead
// in that stream (into the next rows: the hardware prefetchers stop at 4 KiB pages, which
// a 4096-byte row is). Four accumulators per row of x cover the vpdpbusd latency.
// Output: int32 C [., ldc], or with f, f[i][n] = float((double(c) * sx[i]) * ws[n]) (the W8A8
// epilogue, in the same pass).
template <int MR>
FASTKERN_VNNI512 void gemv_vnni(const int8_t* A, int64_t lda, const int32_t* asum, const int8_t* W, int64_t K,
                                int32_t* C, int64_t ldc, int64_t n0, int64_t n1, float* f = nullptr,
                                const float* sx = nullptr, const double* ws = nullptr) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int64_t K256 = K & ~int64_t(255);
  const bool pf_l1 = gemv_prefetch_l1();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m512i s[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < 4; ++u) s[i][u] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k < K256; k += 256) {
      for (int u = 0; u < 4; ++u) prefetch_stream(w + k + 64 * u + kVnniAhead, pf_l1);
      for (int u = 0; u < 4; ++u) {
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64 * u), flip);
        for (int i = 0; i < MR; ++i)
          s[i][u] = dpbusd_inplace(s[i][u], wv, _mm512_loadu_si512(A + i * lda + k + 64 * u));
      }
    }
    for (; k < K; k += 64) {
      const int64_t nb = std::min<int64_t>(64, K - k);
      const __mmask64 mk = nb == 64 ? ~__mmask64(0) : (__mmask64(1) << nb) - 1;
      prefetch_stream(w + k + kVnniAhead, pf_l1);
      // masked-off bytes become 0x80 (128) and meet zero activations
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + k), flip);
      for (int i = 0; i < MR; ++i) s[i][0] = dpbusd_inplace(s[i][0], wv, _mm512_loadu_si512(A + i * lda + k));
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i t = _mm512_add_epi32(_mm512_add_epi32(s[i][0], s[i][1]), _mm512_add_epi32(s[i][2], s[i][3]));
      const int32_t c = int32_t(uint32_t(_mm512_reduce_add_epi32(t)) - 128u * uint32_t(asum[i]));
      if (f)
        f[i * ldc + n] = float((double(c) * double(sx[i])) * ws[n]);
      else
        C[i * ldc + n] = c;
    }
  }
}

// GEMV with K blocks (gemv_vnni_blocked): MR rows of x against weight rows [n0, n1), NR at a
// time ((n1 - n0) % NR == 0), over k in [k0, k1) (k0 a multiple of 64; weight bytes past K
// masked), the int32 lane sums added into part[((n - n0) * MR + i) * 16 ..] (stored where
// first). x is packed per 64 bytes of k as [k / 64][MR][64], so one pointer reaches all MR
// rows (with one pointer per row GCC ran out of general registers and spilled in the loop).
// While it runs, one 64-byte line at pf per 64 bytes of weight read is prefetched into L2
// (pf advances, up to pf_end), or, where pf_end is null, each row kVnniAhead bytes ahead of
// its own reads.
template <int MR, int NR>
FASTKERN_VNNI512 void gemv_vnni_kb(const int8_t* xp, const int8_t* W, int64_t K, int64_t k0, int64_t k1, int64_t n0,
                                   int64_t n1, int32_t* part, bool first, const char*& pf_io, const char* pf_end) {
  constexpr int U = MR * NR <= 8 ? 2 : 1;  // independent accumulators per (x row, weight row)
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int64_t kend = std::min(k1, K);
  const int64_t kfull = k0 + ((kend - k0) & ~int64_t(64 * U - 1));
  const char* pf = pf_io;
  const bool pf_l1 = !pf_end && gemv_prefetch_l1();
  for (int64_t n = n0; n + NR <= n1; n += NR) {
    const int8_t* w = W + n * K;
    const int8_t* x = xp + k0 * MR;
    __m512i s[MR][NR][U];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        for (int u = 0; u < U; ++u) s[i][j][u] = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k < kfull; k += 64 * U, x += 64 * U * MR) {
      if (!pf_end) {  // one K block: along each row, kVnniAhead bytes ahead
        for (int j = 0; j < NR; ++j)
          for (int u = 0; u < U; ++u)
            prefetch_stream(w + j * K + k + 64 * u + kVnniAhead, pf_l1);
      } else if (pf < pf_end) {
        for (int u = 0; u < NR * U; ++u) _mm_prefetch(pf + 64 * u, _MM_HINT_T1);
        pf += 64 * NR * U;
      }
      for (int u = 0; u < U; ++u) {
        __m512i wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = _mm512_xor_si512(_mm512_loadu_si512(w + j * K + k + 64 * u), flip);
        for (int i = 0; i < MR; ++i) {
          const __m512i xa = _mm512_loadu_si512(x + (u * MR + i) * 64);
          for (int j = 0; j < NR; ++j) s[i][j][u] = dpbusd_inplace(s[i][j][u], wv[j], xa);
        }
      }
    }
    for (; k < kend; k += 64, x += 64 * MR) {
      const int64_t nb = std::min<int64_t>(64, kend - k);
      const __mmask64 mk = nb == 64 ? ~__mmask64(0) : (__mmask64(1) << nb) - 1;
      // masked-off bytes become 0x80 (128) and meet zero activations
      __m512i wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + j * K + k), flip);
      for (int i = 0; i < MR; ++i) {
        const __m512i xa = _mm512_loadu_si512(x + i * 64);
        for (int j = 0; j < NR; ++j) s[i][j][0] = dpbusd_inplace(s[i][j][0], wv[j], xa);
      }
    }
    for (int j = 0; j < NR; ++j) {
      int32_t* pr = part + (n + j - n0) * MR * 16;
      for (int i = 0; i < MR; ++i) {
        __m512i t = s[i][j][0];
        for (int u = 1; u < U; ++u) t = _mm512_add_epi32(t, s[i][j][u]);
        _mm512_storeu_si512(pr + 16 * i, first ? t : _mm512_add_epi32(_mm512_loadu_si512(pr + 16 * i), t));
      }
    }
  }
  pf_io = pf;
}

// All rows of [n0, n1): kVnniRowNR at a time (two weight vectors per x load: 10 loads per 16
// vpdpbusd at MR = 8 where one row took 9 per 8; 8 x 2 ran ~13% faster than 8 x 1 with the
// weight in L2), an odd last row alone.
constexpr int kVnniRowNR = 2;
template <int MR>
void gemv_vnni_kb_rows(const int8_t* xp, const int8_t* W, int64_t K, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                       int32_t* part, bool first, const char*& pf, const char* pf_end) {
  const int64_t nw = n0 + (n1 - n0) / kVnniRowNR * kVnniRowNR;
  gemv_vnni_kb<MR, kVnniRowNR>(xp, W, K, k0, k1, n0, nw, part, first, pf, pf_end);
  if (nw < n1) gemv_vnni_kb<MR, 1>(xp, W, K, k0, k1, nw, n1, part + (nw - n0) * MR * 16, first, pf, pf_end);
}

// sum_k w[n][k] of rows [n0, n1) (exact in int32 for K < 2^24)
FASTKERN_VNNI512 void row_sums_vnni(const int8_t* W, int64_t K, int64_t n0, int64_t n1, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t K256 = K & ~int64_t(255);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m512i s[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    int64_t k = 0;
    for (; k < K256; k += 256)
      for (int u = 0; u < 4; ++u) s[u] = dpbusd_inplace(s[u], ones, _mm512_loadu_si512(w + k + 64 * u));
    for (; k < K; k += 64) {
      const int64_t nb = std::min<int64_t>(64, K - k);
      const __mmask64 mk = nb == 64 ? ~__mmask64(0) : (__mmask64(1) << nb) - 1;
      s[0] = dpbusd_inplace(s[0], ones, _mm512_maskz_loadu_epi8(mk, w + k));
    }
    out[n - n0] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3])));
  }
}

// 128 sum_k w[n][k] of rows [n0, n1), wrapping as the products do: what the GEMMs on x + 128
// (VNNI, AMX) subtract from each of row n's sums
void vnni_corrections(const int8_t* W, int64_t K, int64_t n0, int64_t n1, int32_t* out) {
  row_sums_vnni(W, K, n0, n1, out);
  for (int64_t n = 0; n < n1 - n0; ++n) out[n] = int32_t(128u * uint32_t(out[n]));
}

// GEMM tile, transposed: CT[n + j][16 v + lane] for NR weight rows and VM vectors of 16
// x rows. x is packed per block of 16 VM rows as [K/4][16 VM][4 bytes] of x + 128 (zero
// rows past M, zero bytes past K), so one 64-byte load holds 4 k of 16 rows; 4 weight
// bytes are broadcast. k4 in [k40, k41); kb4 = K / 4 full groups of 4 bytes in a row.
// [pf, pf_end): bytes to prefetch into L2 while this tile computes, one 64-byte line
// every (pf_mask + 1) k4 steps (the weight rows of the thread's next task, see matmul_vnni).
template <int NR, int VM>
FASTKERN_VNNI512 void gemm_vnni_tile(const int8_t* Ap, const int8_t* W, int64_t K, int64_t k40, int64_t k41,
                                     int32_t* CT, int64_t ldct, bool acc, const char* pf, const char* pf_end,
                                     int64_t pf_mask) {
  __m512i c[NR][VM];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < VM; ++v)
      c[j][v] = acc ? _mm512_loadu_si512(CT + j * ldct + 16 * v) : _mm512_setzero_si512();
  const int64_t kb4 = K / 4;
  const int64_t kfull = std::min(k41, kb4);
  int64_t k4 = k40;
  for (; k4 < kfull; ++k4) {
    if (((k4 - k40) & pf_mask) == 0 && pf < pf_end) {
      _mm_prefetch(pf, _MM_HINT_T1);
      pf += 64;
    }
    __m512i a[VM];
    for (int v = 0; v < VM; ++v) a[v] = _mm512_loadu_si512(Ap + (k4 * 16 * VM + 16 * v) * 4);
    for (int j = 0; j < NR; ++j) {
      int32_t wv;
      std::memcpy(&wv, W + j * K + 4 * k4, 4);
      const __m512i wb = _mm512_set1_epi32(wv);
      for (int v = 0; v < VM; ++v) c[j][v] = dpbusd_inplace(c[j][v], a[v], wb);
    }
  }
  if (k4 < k41) {  // the last K % 4 bytes: never read past a weight row
    __m512i a[VM];
    for (int v = 0; v < VM; ++v) a[v] = _mm512_loadu_si512(Ap + (k4 * 16 * VM + 16 * v) * 4);
    for (int j = 0; j < NR; ++j) {
      int32_t wv = 0;
      std::memcpy(&wv, W + j * K + 4 * k4, K - 4 * k4);
      const __m512i wb = _mm512_set1_epi32(wv);
      for (int v = 0; v < VM; ++v) c[j][v] = dpbusd_inplace(c[j][v], a[v], wb);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < VM; ++v) _mm512_storeu_si512(CT + j * ldct + 16 * v, c[j][v]);
}

// Weight rows [n0, n1) against one block of packed x, into CT from row n0 on (ldct per row).
// [pf, pf_end): the bytes to prefetch while these tiles run, spread evenly over them.
template <int VM, int NR>
void gemm_vnni_rows_nr(const int8_t* Ap, const int8_t* W, int64_t K, int64_t k40, int64_t k41, int32_t* CT,
                       int64_t ldct, int64_t n0, int64_t n1, bool acc, const char* pf, const char* pf_end) {
  const int64_t tiles = std::max<int64_t>(1, (n1 - n0) / NR + (n1 - n0) % NR);
  const int64_t lines = std::max<int64_t>(1, ((pf_end - pf) / 64 + tiles - 1) / tiles);
  int64_t step = 1;  // a power of two: one line every step k4 steps
  while (step * 2 * lines <= k41 - k40) step *= 2;
  const int64_t share = lines * 64;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR, pf += share)
    gemm_vnni_tile<NR, VM>(Ap, W + n * K, K, k40, k41, CT + (n - n0) * ldct, ldct, acc, pf,
                           std::min(pf_end, pf + share), step - 1);
  for (; n < n1; ++n, pf += share)
    gemm_vnni_tile<1, VM>(Ap, W + n * K, K, k40, k41, CT + (n - n0) * ldct, ldct, acc, pf,
                          std::min(pf_end, pf + share), step - 1);
}
// NR weight rows per tile: 12 for one or two x vectors (12 x VM accumulators + VM x vectors
// within 32 zmm), 6 for more. Each step of a tile reads 4 bytes of each of its weight rows, K
// bytes apart: where 12 such rows alias in the L1 (K a multiple of 4 KiB on an 8-way L1d:
// every row's line in one set), tiles of 6 rows. Measured on 2 Zen 4 cores (32 KiB 8-way L1d;
// W8A8, weights beyond L3, 7 rounds alternating in one process), 6 against 12 rows: 4096 x 4096
// M = 16 / 32 0.67x / 0.83x the time, 11008 x 4096 0.66x / 0.79x. Without aliasing, a first
// reading had 12 rows ahead at K = 1024 / 2112 / 6000 (6 rows 1.05-1.10x the time) and behind
// at K = 11008 / 14336 (0.92-0.95x); a second one (tile_gemm.h: six_row_tiles) had 6 rows
// ahead at every K, so an L1d under 48 KiB takes 6 rows throughout. (A 12-way L1, as on the
// Xeon host, holds the 12 lines.) FASTKERN_TILE_ROWS (6 or 12; read per call) forces one.
// Tried on the same cores for the one-vector tiles (M = 16; W8A8 4096 x 4096, weight in the
// L3, one process, alternating), not kept: two accumulators per weight row (even / odd k4, 12
// chains for 6 rows) took the same time (the tiles are not latency-bound); x blocks of 512 /
// 1024 / 4096 bytes of K instead of kVnniKC were within 5% either way (from memory, after the
// six-row change, the four Llama shapes at M = 16 / 32 / 64: 4096 bytes 0-3% faster, 1024 up
// to 7% slower; not changed). The broadcast folded
// into vpdpbusd (an asm operand "m" with {1to16}) took 2.3-2.5x the time, but only because GCC
// then kept the accumulator array in memory (a zmm store per row and step). A standalone loop
// of a 6 x 1 tile with its operands in L1 runs at the vpdpbusd peak either way (234 GMAC/s per
// core with the broadcast folded in by a whole-step asm block, 224-232 as here), so what the
// one-vector tiles lose against that peak (77% of it at M = 16 with the weight in the L3) is
// in the caches, not in the instructions.
template <int VM>
void gemm_vnni_rows(const int8_t* Ap, const int8_t* W, int64_t K, int64_t k40, int64_t k41, int32_t* CT,
                    int64_t ldct, int64_t n0, int64_t n1, bool acc, const char* pf, const char* pf_end) {
  tiles::with_tile_rows<VM>(K, [&](auto nr) {
    gemm_vnni_rows_nr<VM, decltype(nr)::value>(Ap, W, K, k40, k41, CT, ldct, n0, n1, acc, pf, pf_end);
  });
}

// ------------------------------------------------------------------ AMX (the amx path)
//
// The same transposed product as the VNNI GEMM (CT[n][m] = sum_k w[n][k] (x[m][k] + 128),
// less 128 sum_k w[n][k]) on AMX tiles: tdpbsud multiplies a signed tile by an unsigned one,
// 16 x 64 bytes each, into 16 x 16 int32 (exact, wrapping as vpdpbusd does). The signed tile
// is 16 weight rows x 64 bytes of k, read in place (row stride K); the unsigned one is 16
// k-words of a pack_x_vnni block of x (16 x rows of 4 bytes each, row stride 4 x the block's
// width), so x is packed as for the VNNI GEMM. Bytes past K and weight rows past N come from
// zero-padded copies: the last K % 64 bytes of each 16 weight rows and the last k-words of x
// as tiles of their own, a last group of fewer than 16 weight rows whole. Eight tile
// registers hold a 2 x 2 block of 16 x 16 outputs (32 weight rows x 32 rows of x), its two
// weight tiles and two x tiles.
#if FASTKERN_HAVE_AMX
// One tile operand: 16 rows of 64 bytes per k-chunk, chunk c at p + c * step (row stride ld),
// the chunk past the last whole one at tail (row stride 64).
struct AmxOperand {
  const int8_t* p;
  int64_t ld, step;
  const int8_t* tail;
};

// Chunks [c0, c1) of weight tiles a0, a1 against x tiles b0, b1 (`whole` 64-byte chunks in
// place, the one past them from the operands' tails), added to the four 16 x 16 blocks at c +
// (16 i) ldc + 16 j (ldc in int32), which are loaded first where acc; a missing second operand
// repeats the first, and its blocks are neither loaded nor stored.
FASTKERN_AMX void amx_block(const AmxOperand& a0, const AmxOperand& a1, const AmxOperand& b0, const AmxOperand& b1,
                            int64_t c0, int64_t c1, int64_t whole, int32_t* c, int64_t ldc, bool acc, bool two_a,
                            bool two_b) {
  const int64_t ldb = ldc * 4;
  if (acc) {
    _tile_loadd(0, c, ldb);
    if (two_b) _tile_loadd(1, c + 16, ldb);
    if (two_a) _tile_loadd(2, c + 16 * ldc, ldb);
    if (two_a && two_b) _tile_loadd(3, c + 16 * ldc + 16, ldb);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t cw = std::min(c1, whole);
  const int8_t *pa0 = a0.p + c0 * a0.step, *pa1 = a1.p + c0 * a1.step;
  const int8_t *pb0 = b0.p + c0 * b0.step, *pb1 = b1.p + c0 * b1.step;
  for (int64_t i = c0; i < cw; ++i) {
    _tile_loadd(4, pa0, a0.ld);
    _tile_loadd(6, pb0, b0.ld);
    _tile_dpbsud(0, 4, 6);
    _tile_loadd(7, pb1, b1.ld);
    _tile_dpbsud(1, 4, 7);
    _tile_loadd(5, pa1, a1.ld);
    _tile_dpbsud(2, 5, 6);
    _tile_dpbsud(3, 5, 7);
    pa0 += a0.step, pa1 += a1.step, pb0 += b0.step, pb1 += b1.step;
  }
  if (cw < c1) {  // the chunk past the whole ones
    _tile_loadd(4, a0.tail, 64);
    _tile_loadd(6, b0.tail, 64);
    _tile_dpbsud(0, 4, 6);
    _tile_loadd(7, b1.tail, 64);
    _tile_dpbsud(1, 4, 7);
    _tile_loadd(5, a1.tail, 64);
    _tile_dpbsud(2, 5, 6);
    _tile_dpbsud(3, 5, 7);
  }
  _tile_stored(0, c, ldb);
  if (two_b) _tile_stored(1, c + 16, ldb);
  if (two_a) _tile_stored(2, c + 16 * ldc, ldb);
  if (two_a && two_b) _tile_stored(3, c + 16 * ldc + 16, ldb);
}

// Chunks [c0, ceil(K / 64)) of weight rows [n0, n1) (at most 16) as tiles of 16 rows x 64
// bytes, chunk c at wt + 1024 (c - c0), zero past n1 and past K.
FASTKERN_AVX512 void pack_w_amx(const int8_t* W, int64_t K, int64_t n0, int64_t n1, int64_t c0, int8_t* wt) {
  const int64_t chunks = (K + 63) / 64;
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t c = c0; c < chunks; ++c) {
      const int64_t bytes = n0 + r < n1 ? std::min<int64_t>(64, K - 64 * c) : 0;
      const __mmask64 m = bytes ? (~__mmask64(0)) >> (64 - bytes) : 0;
      const int8_t* src = bytes ? W + (n0 + r) * K + 64 * c : W;  // no address past the rows
      _mm512_storeu_si512(wt + 1024 * (c - c0) + 64 * r, _mm512_maskz_loadu_epi8(m, src));
    }
}
#endif

bool use_vnni512() { return active_isa() >= Isa::Avx512 && features().avx512vnni; }
// AVX2 + AVX-VNNI (the avx2vnni path: matmul_vnni256, gemv_vnni256)
bool use_vnni256() { return active_isa() == Isa::Avx2Vnni; }


// Where the products go: int32 C [M, N] (int8_gemm) or, for linear_w8a8, fp32
// out [M, N] = float((double(c) * sx[m]) * ws[n]), the reference's double-precision scaling.
struct VnniOut {
  int32_t* c = nullptr;
  float* f = nullptr;
  const float* sx = nullptr;
  const double* ws = nullptr;
  // fp32 bias [N] added to the scaled output (after its rounding to float, as the reference
  // adds it); read by the GEMMs' epilogues (finish_vnni_block, finish_s16) and put(), while
  // the GEMV paths leave the bias to the op
  const float* bias = nullptr;
  // finish_vnni_block writes whole 16-word blocks with non-temporal stores (set by
  // gemm_vnni_packed for an output beyond the caches, rows of whole aligned lines)
  bool stream = false;
  // Hands the op's bias to the epilogue: converted to fp32 (the returned tensor holds it while
  // the kernel runs); the op then passes no bias to finish().
  at::Tensor take_bias(const c10::optional<at::Tensor>& b) {
    at::Tensor bf = bias_f32(b);
    bias = data_or_null(bf);
    return bf;
  }
  // linear_w8a8's output: out [M, N] fp32, the products scaled by sx [M] and wsd [N] (double)
  static VnniOut scaled(at::Tensor& out, const float* sx, const at::Tensor& wsd) {
    VnniOut o;
    o.f = out.data_ptr<float>();
    o.sx = sx;
    o.ws = wsd.data_ptr<double>();
    return o;
  }
  // the same output from row m0 of x on (rows of ldc outputs)
  VnniOut from_row(int64_t m0, int64_t ldc) const {
    VnniOut r = *this;
    if (r.f) r.f += m0 * ldc, r.sx += m0;
    if (r.c) r.c += m0 * ldc;
    return r;
  }
  // output (i, n) of the exact int32 product v: v itself, or float((double(v) * sx[i]) * ws[n])
  // (+ bias[n])
  void put(int64_t i, int64_t n, int64_t ldc, int32_t v) const {
    if (f) {
      float y = float((double(v) * double(sx[i])) * ws[n]);
      if (bias) y += bias[n];
      f[i * ldc + n] = y;
    } else {
      c[i * ldc + n] = v;
    }
  }
};

// A GEMM output from this size on (FASTKERN_STREAM_OUT_KB) goes out with non-temporal stores
// (half the LLC here: the next layer would not find it in cache; 1536 x 384 x 4096 W8A8, 25 MB
// out, AVX-512: 3.6 against 4.2 ms).
constexpr int64_t kStreamOutBytes = int64_t(16) << 20;

// Whether the GEMM epilogues stream an [M, N] output: large enough, and rows of whole
// 64-byte lines (N % 16 == 0, the tensor 64-byte aligned).
inline bool stream_out(const VnniOut& o, int64_t M, int64_t N) {
  const void* base = o.f ? static_cast<const void*>(o.f) : static_cast<const void*>(o.c);
  return N % 16 == 0 && reinterpret_cast<uintptr_t>(base) % 64 == 0 &&
         M * N * 4 >= env_knob("FASTKERN_STREAM_OUT_KB", kStreamOutBytes >> 10) << 10;
}

// Products of x rows [m0, m0 + 16) and the weight rows n0 + j, j in [jlo, jhi) of the
// 16-column block at n0 (a multiple of 16, so that full blocks store whole cache lines):
// from ct (the row of column n0 + jlo, then ldct per row, 16 x rows per row), less corr[n],
// to out, the 16 x 16 block transposed in registers.
FASTKERN_VNNI512 void finish_vnni_block(const int32_t* ct, int64_t ldct, const int32_t* corr, int64_t M, int64_t N,
                                        int64_t m0, int64_t n0, int64_t jlo, int64_t jhi, const VnniOut& o) {
  const int64_t mm = std::min<int64_t>(16, M - m0);
  __m512i r[16];
  __m512d sxl = _mm512_setzero_pd(), sxh = _mm512_setzero_pd();
  if (o.f) {
    alignas(64) double sxd[16] = {};
    for (int64_t i = 0; i < mm; ++i) sxd[i] = double(o.sx[m0 + i]);
    sxl = _mm512_load_pd(sxd);
    sxh = _mm512_load_pd(sxd + 8);
  }
  for (int64_t j = 0; j < 16; ++j) {
    // columns outside [jlo, jhi) repeat an edge column (never stored): no branch in the loop
    const int64_t jc = std::min(std::max(j, jlo), jhi - 1), n = n0 + jc;
    const __m512i c = _mm512_sub_epi32(_mm512_loadu_si512(ct + (jc - jlo) * ldct), _mm512_set1_epi32(corr[n]));
    if (o.f) {
      const __m512d wsn = _mm512_set1_pd(o.ws[n]);
      const __m512d lo = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(c)), sxl), wsn);
      const __m512d hi = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(c, 1)), sxh), wsn);
      __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
      if (o.bias) f = _mm512_add_ps(f, _mm512_set1_ps(o.bias[n]));
      r[j] = _mm512_castps_si512(f);
    } else {
      r[j] = c;
    }
  }
  transpose16x16(r);
  // whole blocks with plain stores: a masked store to a line not in cache ran far slower
  // (4096 x 1536 x 384 W8A8: 6.9 against 5.0 ms per call, 2 threads)
  const __mmask16 mask = static_cast<__mmask16>(((1u << jhi) - 1u) & ~((1u << jlo) - 1u));
  for (int64_t i = 0; i < mm; ++i) {
    if (o.stream && mask == 0xFFFF)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(o.f ? static_cast<void*>(o.f + (m0 + i) * N + n0)
                                                          : static_cast<void*>(o.c + (m0 + i) * N + n0)),
                          r[i]);
    else if (o.f && mask == 0xFFFF)
      _mm512_storeu_ps(o.f + (m0 + i) * N + n0, _mm512_castsi512_ps(r[i]));
    else if (o.f)
      _mm512_mask_storeu_ps(o.f + (m0 + i) * N + n0, mask, _mm512_castsi512_ps(r[i]));
    else if (mask == 0xFFFF)
      _mm512_storeu_si512(o.c + (m0 + i) * N + n0, r[i]);
    else
      _mm512_mask_storeu_epi32(o.c + (m0 + i) * N + n0, mask, r[i]);
  }
}

// The lines of out that the products of x rows [m0, m1) and weight rows [n0, n1) go to,
// prefetched for writing while the tiles compute them.
inline void prefetch_out_vnni(const VnniOut& o, int64_t N, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const char* base = o.f ? reinterpret_cast<const char*>(o.f) : reinterpret_cast<const char*>(o.c);
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0 / 16 * 16; n < n1; n += 16) _mm_prefetch(base + (m * N + n) * 4, _MM_HINT_ET0);
}

// x rows (int8, row stride lda) -> x + 128 as unsigned bytes, packed per block of 64 rows
// (the last one 16, 32 or 48 wide) as [K4][w][4 bytes]; zero rows past M, zero bytes past K.
void pack_x_vnni(const int8_t* A, int64_t lda, int64_t M, int64_t K, int32_t* ap) {
  const int64_t K4 = (K + 3) / 4, Mp = round_up(M, 16), nmb = (M + 63) / 64;
  constexpr int64_t kChunk = 256;  // words of a row per work item
  const int64_t nkc = (K4 + kChunk - 1) / kChunk;
  at::parallel_for(0, nmb * nkc, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t mb = t / nkc, k0 = (t % nkc) * kChunk, k1 = std::min(K4, k0 + kChunk);
      const int64_t m0 = mb * 64, w = std::min<int64_t>(64, Mp - m0), rows = std::min<int64_t>(w, M - m0);
      int32_t* dst = ap + m0 * K4;
      for (int64_t r = 0; r < w; ++r) {
        if (r >= rows) {
          for (int64_t k4 = k0; k4 < k1; ++k4) dst[k4 * w + r] = 0;
          continue;
        }
        const int8_t* src = A + (m0 + r) * lda;
        const int64_t kf = std::min(k1, K / 4);
        for (int64_t k4 = k0; k4 < kf; ++k4) {
          uint32_t v;
          std::memcpy(&v, src + 4 * k4, 4);
          dst[k4 * w + r] = int32_t(v ^ 0x80808080u);
        }
        if (kf < k1) {  // the last K % 4 bytes, zero after them
          uint8_t bytes[4] = {0, 0, 0, 0};
          for (int64_t k = 4 * kf; k < K; ++k) bytes[k - 4 * kf] = uint8_t(src[k]) ^ 0x80u;
          int32_t v;
          std::memcpy(&v, bytes, 4);
          dst[kf * w + r] = v;
        }
      }
    }
  });
}

// round_half_even(x / s) clamped to +-127, as int32 lanes (s: the row's safe scale)
FASTKERN_AVX2 inline __m256i quantize8_avx2(__m256 x, __m256 s) {
  __m256 v = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-127.f), v));
  return _mm256_cvtps_epi32(v);
}

// The scales of rows [m0, m0 + rows) of X for the quantize-and-pack kernels: S[m] as
// quantize_rows_avx2 sets it, safe[r] the divisor of a quantized row, live[r] false for a row
// past M or one holding NaN / inf (its S NaN), which the packs fill with x = 0.
FASTKERN_AVX2 inline void row_scales_avx2(const float* X, int64_t ldx, int64_t M, int64_t m0, int rows, float* S,
                                          float* safe, bool* live) {
  for (int r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    live[r] = m < M;
    if (!live[r]) continue;
    float a;
    if (!row_absmax_avx2(X + m * ldx, ldx, &a)) {
      S[m] = std::numeric_limits<float>::quiet_NaN();
      live[r] = false;
      continue;
    }
    const float s = a / 127.0f;
    S[m] = s;
    safe[r] = s > 0.f ? s : 1.f;
  }
}

// linear_w8a8's per-token quantization (quantize_rows_avx2's fp32 operations, so the same
// bytes and scales) written straight into pack_x_vnni's layout, with no int8 rows between
// the two: 16 rows at a time (their absmax first), 64 columns of each row quantized into
// one vector of 16 words (x + 128 bytes), the 16 vectors transposed in registers into the
// 16 k-words' stores. Rows past M (up to a multiple of 16) are zero rows; X rows hold ldx
// floats (a multiple of 16, zero past K).
FASTKERN_AVX512 void quantize_pack_vnni(const float* X, int64_t ldx, int64_t M, int64_t K, int32_t* ap, float* S) {
  const int64_t K4 = (K + 3) / 4, Mp = round_up(M, 16);
  TORCH_INTERNAL_ASSERT(ldx % 16 == 0 && ldx >= 4 * K4, "quantize_pack_vnni: row stride ", ldx, " for K=", K);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));
  at::parallel_for(0, Mp / 16, grain, [&](int64_t g0, int64_t g1) FASTKERN_AVX512 {
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t m0 = gi * 16, blk = m0 / 64 * 64, w = std::min<int64_t>(64, Mp - blk);
      int32_t* dst = ap + blk * K4 + (m0 - blk);
      float safe[16];
      bool live[16];
      row_scales_avx2(X, ldx, M, m0, 16, S, safe, live);
      for (int64_t c0 = 0; c0 < K4; c0 += 16) {
        __m512i t[16];
        for (int r = 0; r < 16; ++r) {
          if (!live[r]) {
            t[r] = flip;
            continue;
          }
          const float* x = X + (m0 + r) * ldx + 4 * c0;
          const __m512 vs = _mm512_set1_ps(safe[r]);
          __m512i q = _mm512_setzero_si512();
          for (int j = 0; j < 4; ++j) {
            __m128i b = _mm_setzero_si128();
            if (4 * c0 + 16 * j < ldx) {
              __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + 16 * j), vs);
              v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
              v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
              b = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v));
            }
            q = _mm512_inserti32x4(q, b, j);
          }
          t[r] = _mm512_xor_si512(q, flip);
        }
        transpose16x16(t);
        const int64_t n4 = std::min<int64_t>(16, K4 - c0);
        for (int64_t j = 0; j < n4; ++j) _mm512_storeu_si512(dst + (c0 + j) * w, t[j]);
      }
    }
  });
}

// M <= kVnniRowMaxM (above the one-row GEMV's own range): gemv_vnni_blocked, weight rows
// as vectors along k as well, x in L1-sized K blocks and each thread's rows in L2-sized blocks
// (gemv_vnni_blocked says how they are prefetched). It replaced GEMV tiles of NR weight rows
// x MR rows of x (NR interleaved streams from memory, K <= 4096 only) and the GEMM's 16-row
// tiles, which compute 16 rows whatever M is. Measured in one process against the tiles (2
// threads, W8A8, weights beyond L3, 9 alternating rounds, best ms; an earlier form of this
// kernel, one weight row at a time, x unpacked): 4096 x 4096 M = 5 / 8 / 12: 0.27 / 0.43 /
// 0.55 against 0.43 / 0.56 / 0.56; 11008 x 4096 M = 5 / 8 / 12: 0.74 / 1.02 / 1.37 against
// 1.09 / 1.31 / 1.55; 4096 x 11008 (where the GEMM took M = 5..12 and the one-row GEMV M = 4
// with 44 KB of x) M = 4 / 8 / 9: 1.06 / 1.11 / 1.26 against 1.49 / 1.39 / 1.51. From M = 16
// the GEMM won (4096 x 4096 0.72 against 0.74, 11008 x 4096 1.53 against 1.84). The current
// form against FBGEMM: bench/results/cpu-int8-smallbatch.md.
// It also takes M = 17..20 where a pass's x fits L1 whole (K <= 4096), which the GEMM computes
// as 32 rows; in one process against the GEMM (9 alternating rounds, median speed ratio, W8A8,
// 2 threads), M = 17 / 18 / 20: 4096 x 4096 1.02 / 1.44 / 1.01, 11008 x 4096 1.32 / 1.44 /
// 1.16, 1024 x 4096 1.34 / 1.26 / 1.16 (a second run: 4096 x 4096 1.22 / 1.23 / 1.19, 11008 x
// 4096 1.41 / 0.98 / 0.93); not at M = 16 (0.75-1.04), 13-14 (0.93-1.34), 22-24 (0.74-1.21)
// or with K blocks (4096 x 11008 / 14336 M = 18-20: 0.82-0.87).
// FASTKERN_INT8_ROW_MAX_M overrides both (M up to it, at most kVnniRowMaxMCap; 0 or
// kVnniGemvMaxM: the one-row GEMV for M <= 4 with x in L1, the GEMM above), read per call.
constexpr int64_t kVnniRowMaxM = 12;
constexpr int64_t kVnniRowMaxMCap = 64;
constexpr int64_t kVnniRowBandLo = 17, kVnniRowBandHi = 20;
constexpr int64_t kVnniRowPass = 8;             // rows of x per pass (gemv_vnni_blocked)
constexpr int64_t kVnniRowXBytes = 32 << 10;    // x of a pass whole in L1 up to this
// whether `rows` rows of x (whole 64-byte vectors) fit L1 unsplit in gemv_vnni_blocked
bool row_x_whole(int64_t rows, int64_t K, int64_t limit = kVnniRowXBytes) { return rows * round_up(K, 64) <= limit; }
// ... and whether a pass of `rows` takes K whole: kVnniRowXBytes was measured on 48 KiB L1ds,
// where x took 2/3 of it; on a 32 KiB L1d (Zen 4) 8 rows at K = 4096 fill it all and every
// weight line evicts x: W8A8 4096 x 4096 / 11008 x 4096 M = 8 took 0.90 / 2.51 ms against
// 0.55 / 1.62 in K blocks (FBGEMM 0.55 / 1.44; 2 threads, one process, alternating, weights
// beyond L3). So up to 2/3 of the L1d the CPU reports. FASTKERN_INT8_ROW_X_L1=0 (read per call)
// keeps kVnniRowXBytes alone.
bool row_x_unsplit(int64_t rows, int64_t K) {
  int64_t limit = kVnniRowXBytes;
  const int64_t l1d = features().l1d_bytes();
  if (l1d > 0 && env_knob("FASTKERN_INT8_ROW_X_L1", 1) != 0) limit = std::min(limit, l1d * 2 / 3);
  return row_x_whole(rows, K, limit);
}
// On the amx path the AMX GEMM takes over from M = 9, the band included (2 threads, W8A8,
// weights beyond the LLC, one process, alternating; row GEMV / AMX GEMM ms): 4096 x 4096 M = 8
// 0.71 / 0.81, M = 9 0.87 / 0.87, M = 10 0.89 / 0.85, M = 12 0.92 / 0.84, M = 20 1.16 / 0.86;
// 11008 x 4096 M = 8 1.74 / 2.09, M = 9 2.11 / 2.09, M = 12 2.31 / 2.12, M = 20 3.00 / 2.19.
constexpr int64_t kAmxRowMaxM = 8;
// On a 32 KiB L1d (Zen 4) the row GEMV also beats the GEMM's 16-row tiles at M = 13..15 and
// 17..24, K blocks included, on weights of 4M elements and more (2 threads, W8A8, weights
// beyond L3, one process, 5 alternating rounds, median ms, GEMM / row GEMV (FBGEMM)):
// 4096 x 4096 M = 13 0.91 / 0.80 (0.77), 21 1.58 / 1.27 (1.30), 24 1.78 / 1.60 (1.60);
// 11008 x 4096 M = 21 4.47 / 3.48 (3.73), 24 4.27 / 3.59 (4.26); 4096 x 11008 M = 13 2.49 /
// 2.07 (1.91), 17 4.35 / 2.74 (2.75), 21 4.53 / 3.12 (3.01), 24 4.36 / 3.73 (3.40); 4096 x
// 14336 M = 17 5.85 / 4.09 (3.52), 22 5.67 / 4.71 (4.20); 2048 x 2048 M = 21 0.42 / 0.33
// (0.36); 1024 x 4096 M = 21 0.41 / 0.32 (0.31). Not at M = 16, where the tiles fit exactly
// (0.89 / 0.96, 2.58 / 2.56), nor from M = 30 (4096 x 4096 1.51 / 1.60); on smaller weights
// mixed (3072 x 768 / 768 x 3072 M = 24: 0.29 / 0.30, 0.30 / 0.33). The 48 KiB-L1d Xeon measured
// the opposite at M = 22..24 and with K blocks (above), so this applies where the L1d is
// under 48 KiB, the measurable difference between the two hosts; FASTKERN_INT8_ROW_WIDE (1 /
// 0, read per call) forces it on or off.
constexpr int64_t kVnniRowWideHi = 24;
constexpr int64_t kVnniRowWideMinElems = int64_t(4) << 20;
bool row_wide(int64_t M, int64_t N, int64_t K) {
  const int64_t knob = env_knob("FASTKERN_INT8_ROW_WIDE", -1);
  const bool on = knob >= 0 ? knob != 0 : small_l1d();
  return on && M <= kVnniRowWideHi && M != 16 && N * K >= kVnniRowWideMinElems;
}
bool row_gemv_takes(int64_t M, int64_t N, int64_t K) {
  const char* e = std::getenv("FASTKERN_INT8_ROW_MAX_M");
  if (e && *e) return M <= std::min(kVnniRowMaxMCap, std::max<int64_t>(0, std::atoll(e)));
  if (active_isa() >= Isa::Amx) return M <= kAmxRowMaxM;
  return M <= kVnniRowMaxM ||
         (M >= kVnniRowBandLo && M <= kVnniRowBandHi && row_x_whole(kVnniRowPass, K)) || row_wide(M, N, K);
}
// the one-row GEMV streams x from L1 for every weight row: up to this many bytes of x
constexpr int64_t kVnniGemvXBytes = 24 << 10;
bool use_gemv_vnni(int64_t M, int64_t K) { return M <= kVnniGemvMaxM && M * round_up(K, 64) <= kVnniGemvXBytes; }

// Whether the VNNI GEMV paths take M x K: they read x in whole 64-byte vectors (rows
// zero-padded to a multiple of 64 columns).
bool vnni_gemv(int64_t M, int64_t N, int64_t K) { return use_gemv_vnni(M, K) || row_gemv_takes(M, N, K); }

// Where the GEMM takes M = 16 j + r rows, r <= kVnniTailRows, the last r go to the GEMV
// (gemv_vnni_kb) instead of another 16-row vector (which computed M = 33 as 48 rows): within the
// GEMM, over each task's weight rows right after its tiles, while the rows are in L2
// (VnniTail). A call of its own for them (the previous form, r <= 4) read the weight from
// memory a second time: 11008 x 4096 M = 33 5.48 ms against 4.20 for FBGEMM, and no gain with
// K blocks. Measured (2 threads, W8A8, weights beyond L3, one process, 5-7 alternating rounds,
// median ms, GEMM alone / with the tail (FBGEMM)): 11008 x 4096 M = 33 5.58 / 4.36 (4.29), 36
// 5.42 / 4.42 (4.39), 49 7.12 / 5.90 (6.17), 25 4.63 / 4.39 (4.12), 26 3.95 / 3.60 (3.61), 27
// 3.80 / 3.66 (3.55), 42 5.55 / 5.19 (5.57), 43 5.63 / 5.35 (5.33); 4096 x 4096 M = 33 2.17 /
// 1.72 (1.56), 37 2.03 / 1.66 (1.65), 40 2.18 / 1.92 (1.91), 25 1.56 / 1.38 (1.35), 26 1.60 /
// 1.50 (1.30), 41 2.16 / 2.00 (2.04), 65 3.41 / 2.92 (3.00), 129 5.86 / 5.43 (5.41), 257 10.78
// / 10.25 (10.87); 4096 x 11008 (K blocks) M = 33 5.64 / 4.55 (4.23), 40 6.47 / 5.77 (6.80);
// 2048 x 2048 M = 33 0.52 / 0.40 (0.39); 3072 x 768 M = 24 0.227 / 0.202 (0.167); 1024 x 1024
// M = 33 0.153 / 0.122 (0.121). Not with more rows (4096 x 4096 M = 44 2.12 / 2.10, 28 1.65 /
// 1.92, 31 1.50 / 1.72; 11008 x 4096 M = 31 4.94 / 5.62) nor on smaller weights, where it was
// mixed (384 x 384 M = 33 0.038 / 0.042; 384 x 1536 M = 33 0.091 / 0.075, 43 0.092 / 0.099):
// r <= 11 from 1M weight elements. Not on the amx path, whose GEMM keeps all rows.
// FASTKERN_INT8_GEMV_TAIL (rows, up to kVnniTailCap; 0: off; read per call) sets the rows for
// any size.
constexpr int64_t kVnniTailRows = 11;
constexpr int64_t kVnniTailCap = 15;
constexpr int64_t kVnniTailMinElems = int64_t(1) << 20;
int64_t vnni_tail_rows(int64_t M, int64_t N, int64_t K) {
  if (active_isa() >= Isa::Amx) return 0;
  const int64_t r = tiles::gemv_tail_rows(M, "FASTKERN_INT8_GEMV_TAIL", kVnniTailRows, N * K >= kVnniTailMinElems);
  return r <= kVnniTailCap ? r : 0;
}

FASTKERN_AVX2 void int8_row_sums(const int8_t* X, int64_t ldx, int64_t M, int64_t K, int32_t* out);

// The GEMM's last rows of x as GEMV rows (vnni_tail_rows): r <= kVnniTailCap rows of int8 x
// packed for gemv_vnni_kb in passes of up to kVnniRowPass rows (for_each_pass), pass [m0,
// m0 + mr) at xp + m0 * K64 * 64 as [K64][mr][64] (zero past K), their row sums, and the
// output from their first row on. gemm_vnni_packed runs them over each task's weight rows
// right after the task's tiles, from L2.
struct VnniTail {
  int64_t r = 0;
  const int8_t* xp = nullptr;
  int32_t asum[kVnniTailCap] = {};
  VnniOut o;
};

// rows [0, r) of int8 A (row stride lda, K bytes read per row) into t (xp: r * K64 * 64 bytes)
void pack_vnni_tail(const int8_t* A, int64_t lda, int64_t r, int64_t K, int8_t* xp, const VnniOut& o,
                    VnniTail& t) {
  TORCH_INTERNAL_ASSERT(r > 0 && r <= kVnniTailCap, "pack_vnni_tail: ", r, " rows");
  const int64_t K64 = (K + 63) / 64;
  for_each_pass(r, kVnniRowPass, [&](int64_t m0, int64_t mr) {
    for (int64_t j = 0; j < K64; ++j)
      for (int64_t i = 0; i < mr; ++i) {
        int8_t* d = xp + (m0 * K64 + j * mr + i) * 64;
        const int64_t nb = std::min<int64_t>(64, K - j * 64);
        std::memcpy(d, A + (m0 + i) * lda + j * 64, nb);
        if (nb < 64) std::memset(d + nb, 0, 64 - nb);
      }
  });
  int8_row_sums(A, lda, r, K, t.asum);
  t.r = r;
  t.xp = xp;
  t.o = o;
}

// Weight rows per GEMM task: a multiple of 12 (the 12- and 6-row tiles), about 384 KB of
// weights, which stay in L2 from the row sums to the last tile.
int64_t vnni_task_rows(int64_t K) {
  return std::max<int64_t>(12, std::min<int64_t>(96, (384 * 1024 / std::max<int64_t>(K, 1)) / 12 * 12));
}


// y[i][n] for rows [n0, n1) from the lane sums of gemv_vnni_kb
FASTKERN_VNNI512 void finish_row_parts(const int32_t* part, int64_t M, const int32_t* asum, int64_t n0, int64_t n1,
                                       const VnniOut& o, int64_t ldc) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t i = 0; i < M; ++i) {
      const __m512i t = _mm512_loadu_si512(part + ((n - n0) * M + i) * 16);
      const int32_t c = int32_t(uint32_t(_mm512_reduce_add_epi32(t)) - 128u * uint32_t(asum[i]));
      o.put(i, n, ldc, c);
    }
}


// M rows of x (zero-padded to whole 64-byte vectors) in passes of at most kVnniRowPass rows,
// two weight rows at a time (gemv_vnni_kb): each thread's rows in blocks of about
// kVnniRowBlock bytes of weight, all passes over a block before the next, so only the first
// pass reads it from memory. x in L1 while a block's rows pass: whole when a pass's rows hold
// at most kVnniRowXBytes, else in K blocks of kVnniRowSplitXBytes (median speed ratios of 25
// alternating rounds, 4096 x 11008 M = 4 / 6 / 8 / 12: 16 KB against 32 KB 1.06 / 1.15 / 1.25
// / 1.11, 8 KB against 16 KB 1.07 / 1.17 / 1.06 / 1.11, 4 or 6 KB no better; 8 or 16 KB blocks
// where K fits whole lost at 4096 x 4096 and 11008 x 4096: 0.77-1.05). With one K block the
// rows prefetch their own stream kVnniAhead ahead, as the one-row GEMV does; with several,
// each row is read in pieces, and the next block streams into L2 while the first pass runs
// instead (one sequential stream; without either prefetch the block took twice as long).
// Measured (2 threads, W8A8, 15 alternating rounds, median speed ratio, own stream against
// next-block prefetch): 4096 x 4096 M = 5 / 8: 1.12 / 1.32; 4096 x 11008 (K blocks) M = 4 / 8
// / 12: 0.98 / 0.81 / 0.85.
constexpr int64_t kVnniRowBlock = 128 << 10;
constexpr int64_t kVnniRowSplitXBytes = 8 << 10;
void gemv_vnni_blocked(const int8_t* A, int64_t lda, int64_t M, const int32_t* asum, const int8_t* W, int64_t N,
                       int64_t K, const VnniOut& o) {
  const int64_t rb = rows_in_bytes(kVnniRowBlock, K, kVnniRowNR, N);
  const int64_t mp = largest_pass(M, kVnniRowPass);
  const int64_t kc = row_x_unsplit(mp, K) ? K : std::max<int64_t>(256, kVnniRowSplitXBytes / mp / 256 * 256);
  // x per pass as [k / 64][mr][64] (rows of A hold round_up(K, 64) bytes)
  const int64_t K64 = (K + 63) / 64;
  Scratch xps(ScratchSlot::XPack, size_t(M * K64 * 64));
  int8_t* xpack = xps.as<int8_t>();
  for_each_pass(M, kVnniRowPass, [&](int64_t m0, int64_t mr) {
    int8_t* d = xpack + m0 * K64 * 64;
    for (int64_t j = 0; j < K64; ++j)
      for (int64_t i = 0; i < mr; ++i, d += 64) std::memcpy(d, A + (m0 + i) * lda + j * 64, 64);
  });
  parallel_rows(N, 16, 8, [&](int64_t r0, int64_t r1) {
    Scratch parts(ScratchSlot::Worker0, size_t(std::min(rb, r1 - r0) * mp * 16) * 4);
    int32_t* part = parts.as<int32_t>();
    for (int64_t n0 = r0; n0 < r1; n0 += rb) {
      const int64_t n1 = std::min(r1, n0 + rb);
      // with K blocks, the next block is prefetched during the first pass over this one;
      // without, each row's own stream (pf_end null)
      const char* pf = reinterpret_cast<const char*>(W + n1 * K);
      const char* pf_end = kc >= K ? nullptr : reinterpret_cast<const char*>(W + std::min(r1, n1 + rb) * K);
      for_each_pass(M, kVnniRowPass, [&](int64_t m0, int64_t mr) {
        const int8_t* xp = xpack + m0 * K64 * 64;
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t k1 = std::min(K, k0 + kc);
          switch (mr) {
#define FASTKERN_ROW_CASE(R) \
  case R: gemv_vnni_kb_rows<R>(xp, W, K, k0, k1, n0, n1, part, k0 == 0, pf, pf_end); break;
            FASTKERN_ROW_CASE(1)
            FASTKERN_ROW_CASE(2)
            FASTKERN_ROW_CASE(3)
            FASTKERN_ROW_CASE(4)
            FASTKERN_ROW_CASE(5)
            FASTKERN_ROW_CASE(6)
            FASTKERN_ROW_CASE(7)
            default: gemv_vnni_kb_rows<8>(xp, W, K, k0, k1, n0, n1, part, k0 == 0, pf, pf_end); break;
#undef FASTKERN_ROW_CASE
          }
        }
        finish_row_parts(part, mr, asum + m0, n0, n1, o.from_row(m0, N), N);
      });
    }
  });
}

// The tail rows against weight rows [n0, n1) over all of K, into t.o (part: (n1 - n0) *
// largest_pass(r, kVnniRowPass) * 16 int32). The rows are in L2 after the task's tiles: no
// prefetch (pf == pf_end).
void vnni_tail_task(const VnniTail& t, const int8_t* W, int64_t N, int64_t K, int64_t n0, int64_t n1,
                    int32_t* part) {
  const int64_t K64 = (K + 63) / 64;
  for_each_pass(t.r, kVnniRowPass, [&](int64_t m0, int64_t mr) {
    const int8_t* xp = t.xp + m0 * K64 * 64;
    const char* pf = reinterpret_cast<const char*>(W);
    const char* const pf_end = pf;
    with_rows<kVnniRowPass>(mr, [&](auto R) {
      gemv_vnni_kb_rows<decltype(R)::value>(xp, W, K, 0, K, n0, n1, part, true, pf, pf_end);
    });
    finish_row_parts(part, mr, t.asum + m0, n0, n1, t.o.from_row(m0, N), N);
  });
}

void gemm_vnni_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o,
                      const VnniTail* tail = nullptr);

// A [M, K] (int8 rows, stride lda; where vnni_gemv(M, N, K) zero-padded to a multiple of 64
// columns) x W [N, K]^T -> o; the GEMM's last tail_rows rows (vnni_tail_rows) as its VnniTail.
void matmul_vnni(const int8_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o,
                 int64_t tail_rows = 0) {
  if (vnni_gemv(M, N, K)) {
    TORCH_INTERNAL_ASSERT(o.bias == nullptr, "matmul_vnni: the GEMV paths do not add a bias");
    static_assert(kVnniRowMaxMCap >= kVnniGemvMaxM, "asum holds the rows of either GEMV");
    int32_t asum[kVnniRowMaxMCap] = {};
    int8_row_sums(A, lda, M, K, asum);
    if (!use_gemv_vnni(M, K)) {
      gemv_vnni_blocked(A, lda, M, asum, W, N, K, o);
      return;
    }
    int32_t* C = o.c;
    parallel_rows(N, 16, 8, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: gemv_vnni<1>(A, lda, asum, W, K, C, N, n0, n1, o.f, o.sx, o.ws); break;
        case 2: gemv_vnni<2>(A, lda, asum, W, K, C, N, n0, n1, o.f, o.sx, o.ws); break;
        case 3: gemv_vnni<3>(A, lda, asum, W, K, C, N, n0, n1, o.f, o.sx, o.ws); break;
        default: gemv_vnni<4>(A, lda, asum, W, K, C, N, n0, n1, o.f, o.sx, o.ws); break;
      }
    });
    return;
  }
  const int64_t mh = M - tail_rows;
  Scratch apt(ScratchSlot::XPack, size_t(round_up(mh, 16) * ((K + 3) / 4)) * 4);
  int32_t* ap = apt.as<int32_t>();
  pack_x_vnni(A, lda, mh, K, ap);
  VnniTail t;
  Scratch xts(ScratchSlot::XQuant, size_t(tail_rows * round_up(K, 64)));
  if (tail_rows > 0) pack_vnni_tail(A + mh * lda, lda, tail_rows, K, xts.as<int8_t>(), o.from_row(mh, N), t);
  gemm_vnni_packed(ap, mh, W, N, K, o, tail_rows > 0 ? &t : nullptr);
}

#if FASTKERN_HAVE_AMX
void gemm_amx_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o);
#endif

// x packed by pack_x_vnni (or quantize_pack_vnni) x W [N, K]^T -> o: matmul_vnni's GEMM;
// tail: rows after the M packed ones, computed by the GEMV over each task's weight rows once
// its tiles are done (the rows then in L2; a call of its own read the weight from memory a
// second time).
void gemm_vnni_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o,
                      const VnniTail* tail) {
#if FASTKERN_HAVE_AMX
  if (active_isa() >= Isa::Amx) {
    TORCH_INTERNAL_ASSERT(tail == nullptr, "gemm_vnni_packed: the AMX GEMM takes no tail rows");
    return gemm_amx_packed(ap, M, W, N, K, o);
  }
#endif
  const int64_t K4 = (K + 3) / 4, nmb = (M + 63) / 64, Mp = round_up(M, 16);
  Scratch wst(ScratchSlot::Small, size_t(N) * 4);
  int32_t* corr = wst.as<int32_t>();
  // Each thread takes one contiguous run of rows (12-row units, so the threads' shares
  // differ by at most 12 rows) and goes through it in tasks of nb rows; while a task
  // computes, the next task's rows are prefetched into L2 (spread over its tiles), so the
  // weight stream overlaps the arithmetic instead of preceding it. Within a task, each block
  // of 64 rows of x meets the task's rows over all of K, and its products go out at once
  // from a thread's nb x 64 buffer (in L1 / L2), not through a buffer of the whole output.
  const int64_t nb = vnni_task_rows(K);
  VnniOut os = o;
  os.stream = stream_out(o, M, N);
  parallel_rows(N, 12, 1, [&](int64_t r0, int64_t r1) {
    Scratch cts(ScratchSlot::Worker0, size_t(nb * 64) * 4);
    int32_t* ct = cts.as<int32_t>();
    Scratch tps(ScratchSlot::Worker1, tail ? size_t(nb * largest_pass(tail->r, kVnniRowPass) * 16) * 4 : 0);
    for (int64_t n0 = r0; n0 < r1; n0 += nb) {
      const int64_t n1 = std::min(r1, n0 + nb);
      const char* pf = reinterpret_cast<const char*>(W + n1 * K);
      const char* pf_end = reinterpret_cast<const char*>(W + std::min(r1, n1 + nb) * K);
      // spread over this task's tile calls: nmb x K blocks of them. (W8A8 M = 16, Zen 4, 2
      // threads, weights beyond L3: without it 1.22x the time; two tasks ahead no faster.)
      const int64_t nkb = (K4 + kVnniKC / 4 - 1) / (kVnniKC / 4);
      const int64_t share = ((pf_end - pf) + nmb * nkb - 1) / (nmb * nkb);
      vnni_corrections(W, K, n0, n1, corr + n0);
      for (int64_t mb = 0; mb < nmb; ++mb) {
        const int64_t m0 = mb * 64, vm = std::min<int64_t>(64, Mp - m0) / 16;
        const int8_t* a = reinterpret_cast<const int8_t*>(ap + m0 * K4);
        if (!os.stream) prefetch_out_vnni(o, N, m0, std::min(M, m0 + 64), n0, n1);
        for (int64_t k40 = 0; k40 < K4; k40 += kVnniKC / 4) {
          const int64_t k41 = std::min(K4, k40 + kVnniKC / 4);
          const char* pe = std::min(pf_end, pf + share);
          switch (vm) {
            case 1: gemm_vnni_rows<1>(a, W, K, k40, k41, ct, 64, n0, n1, k40 > 0, pf, pe); break;
            case 2: gemm_vnni_rows<2>(a, W, K, k40, k41, ct, 64, n0, n1, k40 > 0, pf, pe); break;
            case 3: gemm_vnni_rows<3>(a, W, K, k40, k41, ct, 64, n0, n1, k40 > 0, pf, pe); break;
            default: gemm_vnni_rows<4>(a, W, K, k40, k41, ct, 64, n0, n1, k40 > 0, pf, pe); break;
          }
          pf = pe;
        }
        for (int64_t nb16 = n0 / 16 * 16; nb16 < n1; nb16 += 16) {
          const int64_t lo = std::max(n0, nb16), hi = std::min(n1, nb16 + 16);
          for (int64_t m = m0; m < std::min(M, m0 + 64); m += 16)
            finish_vnni_block(ct + (lo - n0) * 64 + (m - m0), 64, corr, M, N, m, nb16, lo - nb16, hi - nb16, os);
        }
      }
      if (tail) vnni_tail_task(*tail, W, N, K, n0, n1, tps.as<int32_t>());
    }
    if (os.stream) _mm_sfence();  // the non-temporal stores before the threads join
  });
}

#if FASTKERN_HAVE_AMX
// Weight rows per AMX task (a multiple of 32, for the 2 x 2 tile blocks), rows of x per pass
// over them (their products, 64 x 256 int32 = 64 KB, stay in the thread's buffer while the K
// blocks accumulate), and 64-byte chunks of k per K block: a pass's x (256 x 4 KB) and the
// task's weight rows (64 x 4 KB) of one K block stay in L2 while its 2 x 2 blocks run. Against
// 32 / 128 weight rows and K blocks of 2 KB or all of K, measured in one process (2 threads,
// W8A8, weights beyond the LLC): 4096 x 14336 M = 256 10.96 ms against 10.56-13.15, M = 64
// 4.03 against 4.00-4.50; 4096 x 4096 M = 64 / 256 1.03 / 2.48 against 1.04-1.13 / 2.48-2.71;
// 11008 x 4096 M = 256 6.46 against 6.40-6.69.
constexpr int64_t kAmxTaskRows = 64;
constexpr int64_t kAmxMRows = 256;
constexpr int64_t kAmxKChunks = 64;

// gemm_vnni_packed on AMX tiles (amx_block): each thread takes a run of 32-row units and goes
// through it in tasks of kAmxTaskRows weight rows (their row sums first). Within a task, for
// each pass of up to kAmxMRows rows of x, per K block of kAmxKChunks chunks, each pair of 16
// weight rows meets the pass's rows, 32 at a time, accumulating in the thread's buffer, which
// the VNNI GEMM's epilogue (finish_vnni_block) writes out once K is done.
void gemm_amx_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o) {
  const int64_t K4 = (K + 3) / 4, Mp = round_up(M, 16), chunks = (K + 63) / 64, whole = K / 64;
  // the k-words of x past the whole chunks, per 16 rows of x: a tile of 16 words a row, zero
  // past K4
  std::vector<int32_t> xtail(whole < chunks ? size_t(Mp) * 16 : 0, 0);
  for (int64_t m16 = 0; whole < chunks && m16 < Mp; m16 += 16) {
    const int64_t m0 = m16 / 64 * 64, w = std::min<int64_t>(64, Mp - m0);
    for (int64_t k4 = whole * 16; k4 < K4; ++k4)
      std::memcpy(&xtail[size_t(m16 * 16 + (k4 - whole * 16) * 16)], ap + m0 * K4 + k4 * w + (m16 - m0), 64);
  }
  std::vector<AmxOperand> xs(Mp / 16);
  for (int64_t v = 0; v < Mp / 16; ++v) {
    const int64_t m0 = v / 4 * 64, w = std::min<int64_t>(64, Mp - m0);
    xs[v] = AmxOperand{reinterpret_cast<const int8_t*>(ap + m0 * K4) + 64 * (v % 4), 4 * w, 64 * w,
                       reinterpret_cast<const int8_t*>(xtail.data() + 16 * 16 * v)};
  }
  Scratch wst(ScratchSlot::Small, size_t(N) * 4);
  int32_t* corr = wst.as<int32_t>();
  const int64_t nb = kAmxTaskRows, mr = std::min(Mp, kAmxMRows);
  VnniOut os = o;
  os.stream = stream_out(o, M, N);
  parallel_rows(N, 32, 1, [&](int64_t r0, int64_t r1) {
    Scratch cts(ScratchSlot::Worker0, size_t(nb * mr) * 4);
    int32_t* ct = cts.as<int32_t>();
    // per 16 weight rows, their tail chunk (1 KB); then one last group of fewer than 16 rows
    Scratch wts(ScratchSlot::Worker1, size_t(nb / 16) * 1024 + size_t(chunks) * 1024);
    int8_t* wt = wts.as<int8_t>();
    int8_t* wlast = wt + (nb / 16) * 1024;
    std::vector<AmxOperand> wa(nb / 16);
    amx_begin();
    for (int64_t n0 = r0; n0 < r1; n0 += nb) {
      const int64_t n1 = std::min(r1, n0 + nb), groups = (n1 - n0 + 15) / 16;
      vnni_corrections(W, K, n0, n1, corr + n0);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t n = n0 + 16 * g;
        if (n + 16 > n1) {  // tiles of their own, zero past n1 and K
          pack_w_amx(W, K, n, n1, 0, wlast);
          wa[g] = AmxOperand{wlast, 64, 1024, wlast + 1024 * whole};
        } else {  // whole chunks in place, the tail chunk from a tile of its own
          int8_t* t = wt + g * 1024;
          if (whole < chunks) pack_w_amx(W, K, n, n + 16, whole, t);
          wa[g] = AmxOperand{W + n * K, K, 64, t};
        }
      }
      for (int64_t p0 = 0; p0 < Mp; p0 += mr) {
        const int64_t v0 = p0 / 16, v1 = std::min(Mp, p0 + mr) / 16;
        for (int64_t c0 = 0; c0 < chunks; c0 += kAmxKChunks) {
          const int64_t c1 = std::min(chunks, c0 + kAmxKChunks);
          for (int64_t g = 0; g < groups; g += 2) {
            const bool two_a = g + 1 < groups;
            for (int64_t v = v0; v < v1; v += 2) {
              const bool two_b = v + 1 < v1;
              amx_block(wa[g], wa[two_a ? g + 1 : g], xs[v], xs[two_b ? v + 1 : v], c0, c1, whole,
                        ct + g * 16 * mr + 16 * (v - v0), mr, c0 > 0, two_a, two_b);
            }
          }
        }
        for (int64_t m = p0; m < std::min(M, p0 + mr); m += 16) {
          if (!os.stream && (m - p0) % 64 == 0) prefetch_out_vnni(o, N, m, std::min(M, m + 64), n0, n1);
          for (int64_t nb16 = n0; nb16 < n1; nb16 += 16)
            finish_vnni_block(ct + (nb16 - n0) * mr + (m - p0), mr, corr, M, N, m, nb16, 0,
                              std::min<int64_t>(16, n1 - nb16), os);
        }
      }
    }
    amx_end();
    if (os.stream) _mm_sfence();  // the non-temporal stores before the threads join
  });
}
#endif

// C [M, N] = A [M, K] (int16 holding int8 values, row stride lda) x W [N, K]^T.
void int_matmul_vnni(const int16_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, int32_t* C) {
  const int64_t la = round_up(K, 64);
  std::vector<int8_t> a8(M * la, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) a8[m * la + k] = int8_t(A[m * lda + k]);
  VnniOut o;
  o.c = C;
  matmul_vnni(a8.data(), la, M, W, N, K, o);
}


// W8A16 GEMV with AVX-512: like gemv_vnni, each thread's weight rows as one stream with
// the prefetch kVnniAhead bytes ahead, one row at a time; 16 int8 -> fp32 per convert,
// four accumulators per row of x. y = x . float(w) (the scale is applied by the caller).
template <int MR>
FASTKERN_AVX512 void gemv_w8f_avx512(const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y, int64_t ldy,
                                     int64_t n0, int64_t n1) {
  const int64_t K64 = K & ~int64_t(63);
  const bool pf_l1 = gemv_prefetch_l1();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m512 s[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < 4; ++u) s[i][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K64; k += 64) {
      prefetch_stream(w + k + kVnniAhead, pf_l1);
      for (int u = 0; u < 4; ++u) {
        const __m512 wv = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * u))));
        for (int i = 0; i < MR; ++i) s[i][u] = _mm512_fmadd_ps(_mm512_loadu_ps(X + i * ldx + k + 16 * u), wv, s[i][u]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + k)));
      for (int i = 0; i < MR; ++i) s[i][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, X + i * ldx + k), wv, s[i][0]);
    }
    for (int i = 0; i < MR; ++i)
      Y[i * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), _mm512_add_ps(s[i][2], s[i][3])));
  }
}

// The same products for K > kW8fBlockK, where a row of fp32 x no longer fits L1 next to the
// weight stream (at K = 14336 the plain loop above read 16 GB/s instead of 38): chunks of
// kW8fRows weight rows go through K in blocks of kW8fBlockK columns, the accumulators
// parked in memory between blocks, so every lane adds the same terms in the same order as
// above (bitwise the same result). The weight is then read out of order, so the next
// chunk's rows are prefetched into L2, one line per 64 bytes consumed (one chunk ahead).
constexpr int64_t kW8fBlockK = 2048;
constexpr int64_t kW8fRows = 8;

template <int MR>
FASTKERN_AVX512 void gemv_w8f_avx512_kblocked(const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y,
                                              int64_t ldy, int64_t n0, int64_t n1) {
  alignas(64) float acc[kW8fRows][MR][4][16];
  for (int64_t c0 = n0; c0 < n1; c0 += kW8fRows) {
    const int64_t c1 = std::min(n1, c0 + kW8fRows);
    const char* pf = reinterpret_cast<const char*>(W + c1 * K);
    for (int64_t k0 = 0; k0 < K; k0 += kW8fBlockK) {
      const int64_t k1 = std::min(K, k0 + kW8fBlockK);
      const int64_t kf = k0 + ((k1 - k0) & ~int64_t(63));
      for (int64_t n = c0; n < c1; ++n) {
        const int8_t* w = W + n * K;
        __m512 s[MR][4];
        for (int i = 0; i < MR; ++i)
          for (int u = 0; u < 4; ++u) s[i][u] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(acc[n - c0][i][u]);
        int64_t k = k0;
        for (; k < kf; k += 64) {
          _mm_prefetch(pf, _MM_HINT_T1);
          pf += 64;
          for (int u = 0; u < 4; ++u) {
            const __m512 wv = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * u))));
            for (int i = 0; i < MR; ++i)
              s[i][u] = _mm512_fmadd_ps(_mm512_loadu_ps(X + i * ldx + k + 16 * u), wv, s[i][u]);
          }
        }
        for (; k < k1; k += 16) {
          const __mmask16 m =
              k1 - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k1 - k)) - 1u);
          const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + k)));
          for (int i = 0; i < MR; ++i)
            s[i][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, X + i * ldx + k), wv, s[i][0]);
        }
        for (int i = 0; i < MR; ++i)
          for (int u = 0; u < 4; ++u) _mm512_store_ps(acc[n - c0][i][u], s[i][u]);
      }
    }
    for (int64_t n = c0; n < c1; ++n)
      for (int i = 0; i < MR; ++i) {
        const __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(acc[n - c0][i][0]), _mm512_load_ps(acc[n - c0][i][1])),
                                       _mm512_add_ps(_mm512_load_ps(acc[n - c0][i][2]), _mm512_load_ps(acc[n - c0][i][3])));
        Y[i * ldy + n] = _mm512_reduce_add_ps(t);
      }
  }
}

// From M = kW8fTileMinM the AVX-512 GEMV takes NR weight rows at a time as well as MR rows
// of x: each 16-weight vector of a row is converted once per MR rows of x and each vector of
// x loaded once per NR weight rows, MR x NR accumulators (one per output, summed over k in
// order, so the result does not depend on the tile shape or the thread split). The one-row
// loop above converts a weight vector per 3 FMAs and loads x for every FMA: it ran at ~45% of
// the FMA peak at M = 4..16 (the loads, not the FMAs, were the bound).
constexpr int64_t kW8fTileMinM = 4;
constexpr int64_t kW8fTileRows = 8;  // rows of x per pass at most

// acc[i][j] += x[i][k .. k + 16) * float(w[j][k .. k + 16)); MASKED: lanes past m zero
template <int MR, int NR, bool MASKED>
FASTKERN_AVX512 inline void w8f_tile_step(__m512 (&acc)[MR][NR], const float* X, int64_t ldx, const int8_t* w,
                                          int64_t K, int64_t k, __mmask16 m) {
  __m512 wv[NR];
  for (int j = 0; j < NR; ++j) {
    const __m128i b = MASKED ? _mm_maskz_loadu_epi8(m, w + j * K + k)
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k));
    wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 xv = MASKED ? _mm512_maskz_loadu_ps(m, X + i * ldx + k) : _mm512_loadu_ps(X + i * ldx + k);
    for (int j = 0; j < NR; ++j) acc[i][j] = fma_inplace(acc[i][j], xv, wv[j]);
  }
}

template <int MR, int NR>
FASTKERN_AVX512 void gemv_w8f_tile_avx512(const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y,
                                          int64_t ldy, int64_t n) {
  const int64_t K64 = K & ~int64_t(63);
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int8_t* w = W + n * K;
  const __mmask16 all = static_cast<__mmask16>(0xFFFF);
  const bool pf_l1 = gemv_prefetch_l1();
  int64_t k = 0;
  for (; k < K64; k += 64) {
    for (int j = 0; j < NR; ++j) prefetch_stream(w + j * K + k + kVnniAhead, pf_l1);
    w8f_tile_step<MR, NR, false>(acc, X, ldx, w, K, k, all);
    w8f_tile_step<MR, NR, false>(acc, X, ldx, w, K, k + 16, all);
    w8f_tile_step<MR, NR, false>(acc, X, ldx, w, K, k + 32, all);
    w8f_tile_step<MR, NR, false>(acc, X, ldx, w, K, k + 48, all);
  }
  for (; k < K; k += 16)
    w8f_tile_step<MR, NR, true>(acc, X, ldx, w, K, k,
                                K - k >= 16 ? all : static_cast<__mmask16>((1u << (K - k)) - 1u));
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[i * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// weight rows [n0, n1) against MR rows of x: NR rows per tile, then single rows
template <int MR, int NR>
void gemv_w8f_tiles_avx512(const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y, int64_t ldy,
                           int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) gemv_w8f_tile_avx512<MR, NR>(X, ldx, W, K, Y, ldy, n);
  for (; n < n1; ++n) gemv_w8f_tile_avx512<MR, 1>(X, ldx, W, K, Y, ldy, n);
}

// mr (kW8fTileMinM ..= kW8fTileRows) rows of x: MR x NR within 24 of the 32 zmm registers
void gemv_w8f_pass_avx512(int64_t mr, const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y, int64_t ldy,
                          int64_t n0, int64_t n1) {
  switch (mr) {
    case 4: gemv_w8f_tiles_avx512<4, 4>(X, ldx, W, K, Y, ldy, n0, n1); break;
    case 5: gemv_w8f_tiles_avx512<5, 4>(X, ldx, W, K, Y, ldy, n0, n1); break;
    case 6: gemv_w8f_tiles_avx512<6, 4>(X, ldx, W, K, Y, ldy, n0, n1); break;
    case 7: gemv_w8f_tiles_avx512<7, 3>(X, ldx, W, K, Y, ldy, n0, n1); break;
    default: gemv_w8f_tiles_avx512<8, 3>(X, ldx, W, K, Y, ldy, n0, n1); break;
  }
}

// ------------------------------------------------------------------ W8A16 GEMM, AVX-512 (fp32 FMA)
//
// The transposed-tile scheme of the VNNI GEMM with fp32 operands: x packed per block of 64
// rows as [K][16 VM] (one 64-byte load = one k of 16 rows), the weight dequantized exactly
// as the reference does (float(w) * s) into a panel of nb rows x kF32KC columns per task
// (in L2) and broadcast one element at a time: NR x VM accumulators, each output one FMA
// chain over k in order (the same for every tile shape and thread count). While a panel's
// tiles run, the next panel's weight lines are prefetched into L2, spread over the tiles.

// [pf, pf + npf): weight lines to prefetch, one every (pf_mask + 1) k steps
template <int NR, int VM>
FASTKERN_AVX512 void w8f_tile(const float* Xp, const float* P, int64_t ldp, int64_t kc, float* CT, int64_t ldct,
                               bool acc, const char* const* pf, int64_t npf, int64_t pf_mask) {
  __m512 c[NR][VM];
#pragma GCC unroll 12
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < VM; ++v) c[j][v] = acc ? _mm512_loadu_ps(CT + j * ldct + 16 * v) : _mm512_setzero_ps();
  int64_t ipf = 0;
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & pf_mask) == 0 && ipf < npf) _mm_prefetch(pf[ipf++], _MM_HINT_T1);
    __m512 a[VM];
#pragma GCC unroll 4
    for (int v = 0; v < VM; ++v) a[v] = _mm512_loadu_ps(Xp + k * 16 * VM + 16 * v);
#pragma GCC unroll 12
    for (int j = 0; j < NR; ++j) {
      const __m512 b = _mm512_set1_ps(P[j * ldp + k]);
#pragma GCC unroll 4
      for (int v = 0; v < VM; ++v) c[j][v] = _mm512_fmadd_ps(a[v], b, c[j][v]);
    }
  }
#pragma GCC unroll 12
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < VM; ++v) _mm512_storeu_ps(CT + j * ldct + 16 * v, c[j][v]);
}


template <int VM>
void w8f_rows(const float* Xp, const float* P, int64_t ldp, int64_t rows, int64_t kc, float* CT, int64_t ldct,
              bool acc, const char* const* pf, int64_t npf) {
  panel_rows<VM>(rows, kc, ldp * 4, pf, npf, [&](auto nr, int64_t r, const char* const* p, int64_t np, int64_t mask) {
    w8f_tile<decltype(nr)::value, VM>(Xp, P + r * ldp, ldp, kc, CT + r * ldct, ldct, acc, p, np, mask);
  });
}


// panel[r][k] = float(W[n0 + r][k0 + k]) * s[n0 + r] for k < kc
FASTKERN_AVX512 void dequant_panel(const int8_t* W, int64_t K, const float* s, int64_t n0, int64_t n1, int64_t k0,
                                    int64_t kc, float* panel, int64_t ldp) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* src = W + n * K + k0;
    float* dst = panel + (n - n0) * ldp;
    const __m512 sv = _mm512_set1_ps(s[n]);
    int64_t k = 0;
    for (; k + 16 <= kc; k += 16)
      _mm512_storeu_ps(dst + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)))),
                                              sv));
    if (k < kc) {
      const __mmask16 m = static_cast<__mmask16>((1u << (kc - k)) - 1u);
      _mm512_mask_storeu_ps(dst + k, m, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                          _mm_maskz_loadu_epi8(m, src + k))),
                                                      sv));
    }
  }
}

// x [M, K] fp32 (row stride ldx) -> per block of 64 rows [K][w], w = 16, 32, 48 or 64
// (zero rows past M); block mb starts at xp + 64 mb K.
// Eight rows at a time by pack_rows8 (one element per strided store took 220 us of a 460 us
// call at M = 64, 48 x 4096 weights, one thread).
void pack_x_f32(const float* X, int64_t ldx, int64_t M, int64_t K, float* xp) {
  const int64_t Mp = round_up(M, 16), nmb = (M + 63) / 64;
  constexpr int64_t kChunk = 256;
  const int64_t nkc = (K + kChunk - 1) / kChunk;
  at::parallel_for(0, nmb * nkc, 1, [&](int64_t b, int64_t e) FASTKERN_AVX2 {
    for (int64_t t = b; t < e; ++t) {
      const int64_t mb = t / nkc, k0 = (t % nkc) * kChunk, k1 = std::min(K, k0 + kChunk);
      const int64_t m0 = mb * 64, w = std::min<int64_t>(64, Mp - m0), rows = std::min<int64_t>(w, M - m0);
      float* dst = xp + m0 * K;
      for (int64_t r0 = 0; r0 < w; r0 += 8) {
        auto row = [&](int64_t i) { return r0 + i < rows ? X + (m0 + r0 + i) * ldx : nullptr; };
        pack_rows8(
            dst, w, r0, k0, k1, K,
            [&](int i, int64_t k) FASTKERN_AVX2 {
              const float* src = row(i);
              return src ? _mm256_castps_si256(_mm256_loadu_ps(src + k)) : _mm256_setzero_si256();
            },
            [&](int i, int64_t k) {
              const float* src = row(i);
              return src ? src[k] : 0.f;
            });
      }
    }
  });
}

// Y [M, N] = X [M, K] (fp32, row stride ldx) x (float(W) * s)^T
void w8a16_gemm_avx512(const float* X, int64_t ldx, int64_t M, const int8_t* W, const float* s, int64_t N,
                       int64_t K, float* Y) {
  const int64_t Mp = round_up(M, 16), nmb = (M + 63) / 64;
  at::Tensor xpt = at::empty({Mp * K}, at::kFloat);
  at::Tensor ctt = at::empty({N * Mp}, at::kFloat);
  float* xp = xpt.data_ptr<float>();
  float* ct = ctt.data_ptr<float>();
  pack_x_f32(X, ldx, M, K, xp);
  const int64_t nb = kF32TaskRows, kcmax = std::min(kF32KC, K);
  parallel_rows(N, 12, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> panel(nb * kcmax);
    std::vector<const char*> pfl;
    pfl.reserve(nb * (kF32KC / 64 + 1));
    for (int64_t n0 = r0; n0 < r1; n0 += nb) {
      const int64_t n1 = std::min(r1, n0 + nb);
      for (int64_t k0 = 0; k0 < K; k0 += kF32KC) {
        const int64_t kc = std::min(kF32KC, K - k0);
        dequant_panel(W, K, s, n0, n1, k0, kc, panel.data(), kcmax);
        next_panel_lines(W, K, K, kF32KC, nb, r1, n0, n1, k0, pfl);
        const int64_t per_mb = (int64_t(pfl.size()) + nmb - 1) / nmb;
        for (int64_t mb = 0; mb < nmb; ++mb) {
          const int64_t m0 = mb * 64, vm = std::min<int64_t>(64, Mp - m0) / 16;
          const float* xb = xp + m0 * K + k0 * 16 * vm;
          float* c = ct + n0 * Mp + m0;
          const int64_t p0 = std::min<int64_t>(pfl.size(), mb * per_mb);
          const int64_t np = std::min<int64_t>(pfl.size() - p0, per_mb);
          const char* const* pp = pfl.data() + p0;
          switch (vm) {
            case 1: w8f_rows<1>(xb, panel.data(), kcmax, n1 - n0, kc, c, Mp, k0 > 0, pp, np); break;
            case 2: w8f_rows<2>(xb, panel.data(), kcmax, n1 - n0, kc, c, Mp, k0 > 0, pp, np); break;
            case 3: w8f_rows<3>(xb, panel.data(), kcmax, n1 - n0, kc, c, Mp, k0 > 0, pp, np); break;
            default: w8f_rows<4>(xb, panel.data(), kcmax, n1 - n0, kc, c, Mp, k0 > 0, pp, np); break;
          }
        }
      }
    }
  });
  tiles::transpose_all(ct, Mp, M, N, Y, nullptr, nullptr);
}

// ------------------------------------------------------------------ W8A16 GEMM, AVX512-BF16 (bf16 activations)
//
// tile_gemm.h's bf16 GEMM on the int8 weight converted to bf16, which is exact (|w| <= 128
// needs 8 significant bits); the scale multiplies the finished sums (as in the GEMV).

// panel[r][k/2] = (bf16(W[n0 + r][k0 + k]), bf16(W[.][k0 + k + 1])) for k < kc (zero past it)
FASTKERN_AVX512BF16 void bf16_panel(const int8_t* W, int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t kc,
                                    uint32_t* panel, int64_t ldp) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* src = W + n * K + k0;
    __m256i* dst = reinterpret_cast<__m256i*>(panel + (n - n0) * ldp);
    for (int64_t k = 0; k < kc; k += 16) {
      const __mmask16 m = kc - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (kc - k)) - 1u);
      const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, src + k)));
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(f);
      if (kc - k >= 16)
        _mm256_storeu_si256(dst + k / 16, h);
      else
        _mm256_mask_storeu_epi16(dst + k / 16, static_cast<__mmask16>((1u << (round_up(kc - k, 2))) - 1u), h);
    }
  }
}

// Y [M, N] (bf16) = s[n] * (X [M, K] (bf16, row stride ldx) x bf16(W)^T) + b[n] (if b), rounded
// once; the last `tail` rows within it (w8a16_bf16_tail_rows)
void w8a16_gemm_bf16(const uint16_t* X, int64_t ldx, int64_t M, const int8_t* W, const float* s, const float* b,
                     int64_t N, int64_t K, uint16_t* Y, int64_t tail = 0) {
  tiles::bf16_tile_gemm(
      X, ldx, M, W, K, N, K, Y, s, b,
      [&](int64_t n0, int64_t n1, int64_t k0, int64_t kc, uint32_t* panel, int64_t ldp) {
        bf16_panel(W, K, n0, n1, k0, kc, panel, ldp);
        return std::pair<const uint32_t*, int64_t>(panel, ldp);
      },
      false, tail);
}
#endif

// C [M, N] int32 = A [M, K] (int16, padded to lda >= round_up(K, 16), zeros) x W [N, K]^T (int8).
void int_matmul(const int16_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, int32_t* C) {
  if (M == 0 || N == 0) return;
  const bool avx2 = use_avx2();
  if (K == 0) {
    std::fill(C, C + M * N, 0);
    return;
  }
#if FASTKERN_X86
  if (use_vnni512()) {
    int_matmul_vnni(A, lda, M, W, N, K, C);
    return;
  }
#endif
  if (M <= kGemvMaxM && avx2) {
    parallel_rows(N, kGemvRows, 16, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: gemv_i8_rows<1>(avx2, A, lda, W, K, C, N, n0, n1); break;
        case 2: gemv_i8_rows<2>(avx2, A, lda, W, K, C, N, n0, n1); break;
        default: gemv_i8_rows<3>(avx2, A, lda, W, K, C, N, n0, n1); break;
      }
    });
    return;
  }
  parallel_rows(N, kPanelRows, 1, [&](int64_t nb0, int64_t nb1) {
    std::vector<int16_t> panel(kPanelRows * kPanelKI16);
    for (int64_t n0 = nb0; n0 < nb1; n0 += kPanelRows) {
      const int64_t nb = std::min(kPanelRows, nb1 - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kPanelKI16) {
        const int64_t kk = std::min(kPanelKI16, K - k0);
        const int64_t kkp = round_up(kk, 16);
        for (int64_t r = 0; r < nb; ++r) {
          const int8_t* src = W + (n0 + r) * K + k0;
          int16_t* dst = panel.data() + r * kkp;
          for (int64_t k = 0; k < kk; ++k) dst[k] = src[k];
          for (int64_t k = kk; k < kkp; ++k) dst[k] = 0;
        }
        if (avx2)
          dot_block_i16<true>(A + k0, lda, M, panel.data(), kkp, nb, C + n0, N, kkp, k0 > 0);
        else
          dot_block_i16<false>(A + k0, lda, M, panel.data(), kkp, nb, C + n0, N, kkp, k0 > 0);
      }
    }
  });
}

// ------------------------------------------------------------------ GEMV: int8 weights x fp32 activations

template <int MR, int NR>
void gemv_w8f_generic(const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y, int64_t ldy) {
  // K blocks of 8 with 8 partial sums (vectorizable), X zero-padded like the AVX2 path.
  float s[MR][NR][8];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      for (int l = 0; l < 8; ++l) s[i][j][l] = 0.f;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    float w[NR][8];
    for (int j = 0; j < NR; ++j)
      for (int l = 0; l < 8; ++l) w[j][l] = float(W[j * K + k + l]);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        for (int l = 0; l < 8; ++l) s[i][j][l] += X[i * ldx + k + l] * w[j][l];
  }
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) s[i][j][k & 7] += X[i * ldx + k] * float(W[j * K + k]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[i * ldy + j] = hsum8_generic(s[i][j]);
}

#if FASTKERN_X86
template <int MR, int NR>
FASTKERN_AVX2 inline void gemv_w8f_step(__m256 (&s)[MR][NR], const float* X, int64_t ldx, const int8_t* const* wp,
                                        int64_t k) {
  __m256 a[MR];
  for (int i = 0; i < MR; ++i) a[i] = _mm256_loadu_ps(X + i * ldx + k);
  for (int j = 0; j < NR; ++j) {
    __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wp[j]))));
    for (int i = 0; i < MR; ++i) s[i][j] = _mm256_fmadd_ps(a[i], b, s[i][j]);
  }
}

template <int MR, int NR>
FASTKERN_AVX2 void gemv_w8f_avx2(const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y, int64_t ldy) {
  __m256 s[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) s[i][j] = _mm256_setzero_ps();
  const int8_t* wp[NR];
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int j = 0; j < NR; ++j) wp[j] = W + j * K + k;
    if ((k & 63) == 0)
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(wp[j] + kI8Prefetch), _MM_HINT_T0);
    gemv_w8f_step<MR, NR>(s, X, ldx, wp, k);
  }
  if (k < K) {
    alignas(16) int8_t tail[NR][8];
    for (int j = 0; j < NR; ++j) {
      std::memset(tail[j], 0, 8);
      std::memcpy(tail[j], W + j * K + k, K - k);
      wp[j] = tail[j];
    }
    gemv_w8f_step<MR, NR>(s, X, ldx, wp, k);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[i * ldy + j] = hsum8_avx2(s[i][j]);
}

// M <= kW8fStreamMaxM: like gemv_s16_avx2, each thread's weight rows as one stream, one row
// at a time, prefetched kW8fAhead bytes ahead (1, 2, 4 and 16 KB measured 0.78, 0.85, 0.96
// and 1.02x as fast at 11008 x 4096), 8 (one row of x) or 4 accumulators per row of x. The
// 4-row tiles above interleave four row streams with the prefetch 512 bytes ahead in each,
// which read the weight at 48-77% of the bandwidth at M = 1 against 84-104% for the int8
// GEMV (AVX2 run of 2026-12-02 00:54). In one process, alternating, against the tiles:
// 4096 x 4096 / 11008 x 4096 / 4096 x 14336 M = 1 1.50 / 1.28 / 1.22x, M = 2 1.56 / 1.23 /
// 1.18x, M = 3 0.95 / 0.82 / 0.84x (the tiles share each x load among 4 weight rows).
constexpr int64_t kW8fStreamMaxM = 2;
constexpr int64_t kW8fAhead = 8192;
// s += x [., k0:k1) * w[k0:k1) for one weight row w, k0 a multiple of 64; k1 < K only at a
// multiple of 64 (x is zero-padded to 8 columns; the weight row is never read past K). With pf,
// one 64-byte line at pf per 64 bytes of weight read is prefetched into L2 (pf advances), else
// the row's own stream kW8fAhead bytes ahead.
template <int MR, int U>
FASTKERN_AVX2 inline void w8f_stream_span(__m256 (&s)[MR][U], const float* X, int64_t ldx, const int8_t* w,
                                          int64_t k0, int64_t k1, int64_t K, const char*& pf, bool pf_l1) {
  const int64_t kf = k0 + ((k1 - k0) & ~int64_t(63));
  int64_t k = k0;
  for (; k < kf; k += 64) {
    if (pf) {
      _mm_prefetch(pf, _MM_HINT_T1);
      pf += 64;
    } else {
      prefetch_stream(w + k + kW8fAhead, pf_l1);
    }
    for (int u = 0; u < 8; ++u) {
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8 * u))));
      for (int i = 0; i < MR; ++i)
        s[i][u % U] = _mm256_fmadd_ps(_mm256_loadu_ps(X + i * ldx + k + 8 * u), wv, s[i][u % U]);
    }
  }
  for (; k < k1; k += 8) {
    alignas(16) int8_t tail[8] = {};
    const int8_t* src = w + k;
    if (K - k < 8) {
      std::memcpy(tail, src, K - k);
      src = tail;
    }
    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))));
    for (int i = 0; i < MR; ++i) s[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(X + i * ldx + k), wv, s[i][0]);
  }
}

// ---- W8A16 GEMV at M <= 2 (AVX2) / 3 (AVX512-VNNI) on int16 limbs
//
// The fp32 GEMV converts every weight to fp32 (vpmovsxbd, vcvtdq2ps, then the FMA: three
// vector instructions per 8 weights). At small M each row of x is split once per call into
// two int16 limbs per block of kW8LimbBlock columns instead: x ~ s_b (a1 + a2 / kW8L2), s_b =
// the block's largest |x| / 32767, a1 = round(x / s_b), a2 = round((x / s_b - a1) kW8L2), both
// within +-32767, so x is kept to 2^-31 of the block's largest |x| (the fp32 contract's 1e-5
// with a wide margin). The weight is widened to int16 (vpmovsxbw: 16 per instruction) and
// multiplied by both limbs in vpmaddwd, exact int32 sums per block, then (d1 + d2 / kW8L2) s_b
// in fp32: five vector instructions per 16 weights (M = 1; register-only, one Zen 4 core:
// 9.9 against 7.6 weights per cycle). A call where a block of a row holds a |x| under
// kW8LimbMinX (but not only zeros) takes the fp32 GEMV (s_b and the products stay normal);
// NaN, inf and |x| > kW8MaxX never reach a GEMV. FASTKERN_W8A16_LIMBS=0 turns it off (read
// on every call: A/B, tests).
constexpr int64_t kW8LimbBlock = 1024;
// AVX-512; at M = 4 the fp32 GEMV tiles (gemv_w8f_tile_avx512) took 0.6-0.8x the limbs' time
// (4 rows of x against 2 or 1 weight rows; one Zen 4 core, in L3 and from memory)
constexpr int64_t kW8LimbMaxM = 3;
constexpr int64_t kW8LimbMaxMAvx2 = 2;
constexpr float kW8L2 = 65534.f;
constexpr float kW8LimbMinX = 1e-30f;
static_assert(kW8fBlockK % kW8LimbBlock == 0, "K blocks of whole limb blocks");

struct W8Limbs {
  const int16_t* a1;  // [M, ld]: round_up(K, 16) columns, zero past K
  const int16_t* a2;
  const float* s;     // [M, lds]: ceil(K / kW8LimbBlock) block scales
  int64_t ld, lds;
};

bool w8_limbs_enabled() {
  const char* e = std::getenv("FASTKERN_W8A16_LIMBS");
  return !(e && e[0] == '0');
}

// The limbs of x [round_up(K, 8)] (zero past K) into a1, a2 [round_up(K, 16)] and s. Returns
// false where a block's largest |x| is under kW8LimbMinX but not zero.
FASTKERN_AVX2 bool w8_limbs_avx2(const float* x, int64_t K, int16_t* a1, int16_t* a2, float* s) {
  const int64_t K8 = round_up(K, 8), K16 = round_up(K, 16);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), l2 = _mm256_set1_ps(kW8L2);
  for (int64_t b0 = 0; b0 < K; b0 += kW8LimbBlock) {
    const int64_t b1 = std::min(K8, b0 + kW8LimbBlock);
    __m256 mx = _mm256_setzero_ps();
    for (int64_t k = b0; k < b1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absm));
    const float amax = hmax8_avx2(mx);
    if (amax != 0.f && amax < kW8LimbMinX) return false;
    s[b0 / kW8LimbBlock] = amax / 32767.f;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    for (int64_t k = b0; k < b1; k += 8) {
      const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x + k), inv);
      const __m256 r1 = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 r2 = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t, r1), l2), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i i1 = _mm256_cvtps_epi32(r1), i2 = _mm256_cvtps_epi32(r2);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a1 + k),
                       _mm_packs_epi32(_mm256_castsi256_si128(i1), _mm256_extracti128_si256(i1, 1)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a2 + k),
                       _mm_packs_epi32(_mm256_castsi256_si128(i2), _mm256_extracti128_si256(i2, 1)));
    }
  }
  for (int64_t k = K8; k < K16; ++k) a1[k] = a2[k] = 0;
  return true;
}

// The limb GEMVs' row kernels (gemv_w8l): acc[r MR + i] (16 floats, 8 used here) += the limb
// products of row i < MR of x and weight row w + r K over [k0, k1) (k0 a multiple of
// kW8LimbBlock; k1 < K only at one), block by block; no row is read past K. R weight rows (up
// to kRows<MR>) share each limb load, MR rows of x each widened weight. One 64-byte line at pf
// is prefetched into L2 per 64 bytes of weight read (pf advances). One accumulator per row
// pair and limb: kW8LimbBlock / 16 vpmaddwd of at most 2 * 128 * 32767 per lane, < 2^30. On
// AVX2 the vector ALUs bound the rate, not the limb loads: at M = 1 4 weight rows against 1
// 1.00-1.14x as fast in L3 and from memory (one Zen 4 core: 27-30 GB/s in L3), 2 in between,
// a prefetch into L1 as well no faster; at M = 2 2 rows (1: no faster than the fp32 GEMV, 3:
// spills), 0.91x the fp32 GEMV's time in L3, 0.87x from memory (2 threads). At M = 3 the
// fp32 GEMV's tiles share each converted weight among 3 rows of x: the limbs (one weight row
// at a time, the limbs of x from memory operands) took 1.28-1.35x their time.
struct W8lAvx2 {
  template <int MR>
  static constexpr int kRows = MR == 1 ? 4 : 2;
  template <int MR, int R>
  FASTKERN_AVX2 static void rows(float (*acc)[16], const W8Limbs& q, const int8_t* w, int64_t k0, int64_t k1,
                                 int64_t K, const char*& pf) {
    const __m256 inv2 = _mm256_set1_ps(1.f / kW8L2);
    __m256 s[R][MR];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MR; ++i) s[r][i] = k0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(acc[r * MR + i]);
    for (int64_t b0 = k0; b0 < k1; b0 += kW8LimbBlock) {
      const int64_t b1 = std::min(k1, b0 + kW8LimbBlock), kf = b0 + ((b1 - b0) & ~int64_t(63));
      __m256i p1[R][MR], p2[R][MR];
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < MR; ++i) p1[r][i] = p2[r][i] = _mm256_setzero_si256();
      int64_t k = b0;
      for (; k < kf; k += 64) {
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(pf, _MM_HINT_T1);
          pf += 64;
        }
        // not unrolled: GCC would sum the 4 steps' products first and spill the accumulators
#pragma GCC unroll 1
        for (int h = 0; h < 64; h += 16) {
          __m256i wv[R];
          for (int r = 0; r < R; ++r)
            wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k + h)));
          for (int i = 0; i < MR; ++i) {
            const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.a1 + i * q.ld + k + h));
            const __m256i a2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.a2 + i * q.ld + k + h));
            for (int r = 0; r < R; ++r) {
              p1[r][i] = _mm256_add_epi32(p1[r][i], _mm256_madd_epi16(wv[r], a1));
              p2[r][i] = _mm256_add_epi32(p2[r][i], _mm256_madd_epi16(wv[r], a2));
            }
          }
        }
      }
      // the last < 64 columns (the limbs hold round_up(K, 16) columns, zero past K)
      for (; k < b1; k += 16) {
        __m256i wv[R];
        for (int r = 0; r < R; ++r) {
          alignas(16) int8_t tail[16] = {};
          const int8_t* src = w + r * K + k;
          if (K - k < 16) {
            std::memcpy(tail, src, K - k);
            src = tail;
          }
          wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        }
        for (int i = 0; i < MR; ++i) {
          const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.a1 + i * q.ld + k));
          const __m256i a2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.a2 + i * q.ld + k));
          for (int r = 0; r < R; ++r) {
            p1[r][i] = _mm256_add_epi32(p1[r][i], _mm256_madd_epi16(wv[r], a1));
            p2[r][i] = _mm256_add_epi32(p2[r][i], _mm256_madd_epi16(wv[r], a2));
          }
        }
      }
      for (int i = 0; i < MR; ++i) {
        const __m256 sb = _mm256_set1_ps(q.s[i * q.lds + b0 / kW8LimbBlock]);
        for (int r = 0; r < R; ++r)
          s[r][i] = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(p2[r][i]), inv2, _mm256_cvtepi32_ps(p1[r][i])),
                                    sb, s[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MR; ++i) _mm256_store_ps(acc[r * MR + i], s[r][i]);
  }
  FASTKERN_AVX2 static float sum(const float* a) { return hsum8_avx2(_mm256_load_ps(a)); }
};

// the sum of one row's U accumulators
template <int U>
FASTKERN_AVX2 inline float w8f_stream_sum(const __m256 (&s)[U]) {
  __m256 t[4] = {s[0], s[1], s[2], s[3]};
  for (int u = 4; u < U; ++u) t[u - 4] = _mm256_add_ps(t[u - 4], s[u]);
  return hsum8_avx2(_mm256_add_ps(_mm256_add_ps(t[0], t[1]), _mm256_add_ps(t[2], t[3])));
}

// Where the rows of fp32 x take more than half the L1d (K > 4096 at M = 1 on a 32 KiB L1d),
// the weight rows go in chunks of kW8fRows through K blocks of kW8fBlockK columns, as
// gemv_w8f_avx512_kblocked does, the accumulators parked between blocks: the same terms in the
// same lanes in the same order, bitwise the result of one pass per row. Measured (Zen 4, 32
// KiB L1d, 2 threads, weights beyond L3, one process, alternating; blocked against one pass):
// 4096 x 11008 / 4096 x 14336 M = 1 0.86-0.90x the time, M = 2 0.71-0.72x; 4096 x 4096 M = 1
// / 2 1.03 / 1.01x (not blocked at M = 1); 4096-column blocks or 16-row chunks no faster,
// 4-row chunks 1.04-1.09x slower at M = 2. FASTKERN_W8F_KBLOCK=0 / 1 forces one pass / blocks
// (read on every call: A/B, tests).
template <int MR>
FASTKERN_AVX2 void gemv_w8f_stream_avx2(const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y,
                                        int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int U = MR == 1 ? 8 : 4;  // FMA chains in flight: 8 for one row of x
  const bool pf_l1 = gemv_prefetch_l1();
  const int64_t kb = env_knob("FASTKERN_W8F_KBLOCK", -1);
  if (kb > 0 || (kb < 0 && MR * K * 4 > features().l1d_bytes() / 2)) {
    alignas(32) float acc[kW8fRows][MR][U][8];
    for (int64_t c0 = n0; c0 < n1; c0 += kW8fRows) {
      const int64_t c1 = std::min(n1, c0 + kW8fRows);
      const char* pf = reinterpret_cast<const char*>(W + c1 * K);
      for (int64_t k0 = 0; k0 < K; k0 += kW8fBlockK) {
        const int64_t k1 = std::min(K, k0 + kW8fBlockK);
        for (int64_t n = c0; n < c1; ++n) {
          __m256 s[MR][U];
          for (int i = 0; i < MR; ++i)
            for (int u = 0; u < U; ++u) s[i][u] = k0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(acc[n - c0][i][u]);
          w8f_stream_span<MR, U>(s, X, ldx, W + n * K, k0, k1, K, pf, pf_l1);
          for (int i = 0; i < MR; ++i)
            for (int u = 0; u < U; ++u) _mm256_store_ps(acc[n - c0][i][u], s[i][u]);
        }
      }
      for (int64_t n = c0; n < c1; ++n)
        for (int i = 0; i < MR; ++i) {
          __m256 s[U];
          for (int u = 0; u < U; ++u) s[u] = _mm256_load_ps(acc[n - c0][i][u]);
          Y[i * ldy + n] = w8f_stream_sum<U>(s);
        }
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    __m256 s[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) s[i][u] = _mm256_setzero_ps();
    const char* pf = nullptr;
    w8f_stream_span<MR, U>(s, X, ldx, W + n * K, 0, K, K, pf, pf_l1);
    for (int i = 0; i < MR; ++i) Y[i * ldy + n] = w8f_stream_sum<U>(s[i]);
  }
}

// ---- W8A16 GEMV at M <= 3 on the int16 limbs of x with AVX512-VNNI
//
// The limbs of w8_limbs_avx2 (kW8LimbBlock blocks), multiplied on vpdpwssd: the int16 products
// and their int32 sum in one instruction, so 32 weights cost a widening (vpmovsxbw) and two
// vpdpwssd, against a widening, a convert and two FMAs per 16 weights in gemv_w8f_avx512.
// One weight row at a time, the limb loads (4 bytes per weight) kept the L1d's read ports
// busy: 33 GB/s from L3 on one Zen 4 core, where the fp32 GEMV read 28; two rows per limb load
// 37-39, four 42-44 (eight no faster). But from memory four rows streamed worse (one thread:
// 20-22 GB/s against 24-27 for two and 23-25 for the fp32 GEMV), so kRows = 2, each row
// prefetched 512 bytes ahead into L1 as well (one thread 24-29 GB/s, two 33-56 with the fp32
// GEMV at 34-47 in the same rounds). At M = 2 / 3 (each widened weight against the limbs of
// every row of x) 4 / 3 weight rows (2: 0.79x the fp32 GEMV's time in L3, 4 / 3: 0.69-0.79x);
// from memory (2 threads) 0.76-0.82x the fp32 GEMV's time, where M = 2 now streams as fast as
// M = 1.
// Tried and dropped: three int8 limbs of x (base 128) on vpdpbusd against the weight bytes
// flipped to unsigned (w + 128; 128 sum(a) per lane taken off exactly), no widening: 0.75x the
// time of these int16 limbs in L3 at M = 1 (0.9x at M = 2, 1.1x at M = 3), but from memory
// 1.0-1.3x slower (4096 x 14336, one and two threads, with prefetch distances of 512-4096
// bytes and plain or masked loads alike); the reason was not found.

// acc += the int16 pair products of a and b, in place (as dpbusd_inplace)
FASTKERN_VNNI512 inline __m512i dpwssd_inplace(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// W8lAvx2's rows on vpdpwssd (zmm: 32 weights per widening; kW8LimbBlock / 32 vpdpwssd of at
// most 2 * 128 * 32767 per lane, < 2^28), the K tail masked
struct W8lVnni512 {
  template <int MR>
  static constexpr int kRows = MR == 1 ? 2 : MR == 2 ? 4 : 3;
  static constexpr int64_t kAhead = 512;
  template <int MR, int R>
  FASTKERN_VNNI512 static void rows(float (*acc)[16], const W8Limbs& q, const int8_t* w, int64_t k0, int64_t k1,
                                    int64_t K, const char*& pf) {
    const __m512 inv2 = _mm512_set1_ps(1.f / kW8L2);
    __m512 s[R][MR];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MR; ++i) s[r][i] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(acc[r * MR + i]);
    for (int64_t b0 = k0; b0 < k1; b0 += kW8LimbBlock) {
      const int64_t b1 = std::min(k1, b0 + kW8LimbBlock), kf = b0 + ((b1 - b0) & ~int64_t(63));
      __m512i p1[R][MR], p2[R][MR];
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < MR; ++i) p1[r][i] = p2[r][i] = _mm512_setzero_si512();
      int64_t k = b0;
      for (; k < kf; k += 64) {
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(pf, _MM_HINT_T1);
          pf += 64;
          _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + kAhead), _MM_HINT_T0);
        }
        for (int h = 0; h < 64; h += 32) {
          __m512i wv[R];
          for (int r = 0; r < R; ++r)
            wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k + h)));
          for (int i = 0; i < MR; ++i) {
            const __m512i a1 = _mm512_loadu_si512(q.a1 + i * q.ld + k + h);
            const __m512i a2 = _mm512_loadu_si512(q.a2 + i * q.ld + k + h);
            for (int r = 0; r < R; ++r) {
              p1[r][i] = dpwssd_inplace(p1[r][i], wv[r], a1);
              p2[r][i] = dpwssd_inplace(p2[r][i], wv[r], a2);
            }
          }
        }
      }
      for (; k < b1; k += 32) {
        const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : __mmask32((1u << (K - k)) - 1u);
        __m512i wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, w + r * K + k));
        for (int i = 0; i < MR; ++i) {
          const __m512i a1 = _mm512_maskz_loadu_epi16(m, q.a1 + i * q.ld + k);
          const __m512i a2 = _mm512_maskz_loadu_epi16(m, q.a2 + i * q.ld + k);
          for (int r = 0; r < R; ++r) {
            p1[r][i] = dpwssd_inplace(p1[r][i], wv[r], a1);
            p2[r][i] = dpwssd_inplace(p2[r][i], wv[r], a2);
          }
        }
      }
      for (int i = 0; i < MR; ++i) {
        const __m512 sb = _mm512_set1_ps(q.s[i * q.lds + b0 / kW8LimbBlock]);
        for (int r = 0; r < R; ++r)
          s[r][i] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(p2[r][i]), inv2, _mm512_cvtepi32_ps(p1[r][i])),
                                    sb, s[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MR; ++i) _mm512_store_ps(acc[r * MR + i], s[r][i]);
  }
  FASTKERN_VNNI512 static float sum(const float* a) { return _mm512_reduce_add_ps(_mm512_load_ps(a)); }
};

// y[n] = x . float(w[n]) for rows [n0, n1) on the limbs q (the scale is applied by the
// caller): chunks of kW8fRows rows through K (in blocks of kW8fBlockK columns where the limbs
// of all K take more than half the L1d), groups of Kern::kRows rows (a last group of the rest)
// by Kern::rows, the next chunk prefetched into L2 as in gemv_w8f_avx512_kblocked; each row's
// lanes add the same terms in the same order for any row split.
template <class Kern, int MR>
void gemv_w8l(const W8Limbs& q, const int8_t* W, int64_t K, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int R = Kern::template kRows<MR>;
  static_assert(R <= 4, "the rest of a chunk in one group of under 4 rows");
  alignas(64) float acc[kW8fRows * MR][16];
  // one pass over K where both limbs of the MR rows of x take at most half the L1d
  const int64_t kb = MR * K * 4 <= features().l1d_bytes() / 2 ? K : kW8fBlockK;
  for (int64_t c0 = n0; c0 < n1; c0 += kW8fRows) {
    const int64_t c1 = std::min(n1, c0 + kW8fRows);
    const char* pf = reinterpret_cast<const char*>(W + c1 * K);
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
      const int64_t k1 = std::min(K, k0 + kb);
      int64_t n = c0;
      for (; n + R <= c1; n += R) Kern::template rows<MR, R>(acc + (n - c0) * MR, q, W + n * K, k0, k1, K, pf);
      switch (c1 - n) {
        case 3: Kern::template rows<MR, 3>(acc + (n - c0) * MR, q, W + n * K, k0, k1, K, pf); break;
        case 2: Kern::template rows<MR, 2>(acc + (n - c0) * MR, q, W + n * K, k0, k1, K, pf); break;
        case 1: Kern::template rows<MR, 1>(acc + (n - c0) * MR, q, W + n * K, k0, k1, K, pf); break;
        default: break;
      }
    }
    for (int64_t n = c0; n < c1; ++n)
      for (int i = 0; i < MR; ++i) Y[i * ldy + n] = Kern::sum(acc[(n - c0) * MR + i]);
  }
}

#endif

template <int MR>
void gemv_w8f_rows(bool avx2, const float* X, int64_t ldx, const int8_t* W, int64_t K, float* Y, int64_t ldy,
                   int64_t n0, int64_t n1) {
  int64_t n = n0;
#if FASTKERN_X86
  if (avx2) {
    // 4 rows of x: 3 weight rows (12 accumulators, as 3 x 4)
    constexpr int NR = MR == 4 ? 3 : 4;
    for (; n + NR <= n1; n += NR) gemv_w8f_avx2<MR, NR>(X, ldx, W + n * K, K, Y + n, ldy);
    for (; n < n1; ++n) gemv_w8f_avx2<MR, 1>(X, ldx, W + n * K, K, Y + n, ldy);
    return;
  }
#endif
  for (; n + 4 <= n1; n += 4) gemv_w8f_generic<MR, 4>(X, ldx, W + n * K, K, Y + n, ldy);
  for (; n < n1; ++n) gemv_w8f_generic<MR, 1>(X, ldx, W + n * K, K, Y + n, ldy);
}

#if FASTKERN_X86
// ------------------------------------------------------------------ AVX2 without VNNI (int8 x int8 -> int32)
//
// Measured on Zen 5 (one core, 256-bit ops, independent chains): vpmaddwd and vpmaddubsw
// both issue twice per cycle, vpsignb twice, vpaddd four times. So the exact int16 product
// (vpmaddwd + vpaddd, 16 multiply-adds) keeps the two multiplier pipes exactly as busy per
// multiply-add as the u8 x s8 pair (vpmaddubsw + vpmaddwd with ones + vpaddd, 32) does, and
// the sign trick that makes symmetric int8 operands fit vpmaddubsw (vpsignb on top) measured
// no faster (117 vs 116 GMAC/s per core; the unsigned-activation triple that FBGEMM runs,
// not exact for signed +-127 activations, 133). vpmaddwd needs no -128 special case, so both
// kernels below use it; what made the previous panel path slow was its shape (row-vector
// dot products: 7 loads per 12 products, a horizontal sum per output, a widened copy of
// every weight in memory), not the instruction. An exact vpmaddubsw GEMM was also built and
// timed (x + 128 as the unsigned operand; weight pairs with |w0| + |w1| > 128, 1.5% of a
// Gaussian weight's pairs, lowered while the weight block is copied and the difference
// added back from a transposed copy of x): 4096 x 4096, 2 threads, it ran 174 / 204 GMAC/s
// at M = 64 / 256 against 199 / 207 here (the copy's data-dependent branches and the
// corrections ate the multiplier-pipe gain), so it was not kept. A third exact vpmaddubsw
// GEMM was built and timed on Zen 4 (2026-12-05): |w| broadcast, x the vector operand read
// from a per-K-block table of each 16-row slice of x under the 16 sign patterns of a 4-byte
// weight group (pattern bytes packed beside |w|), so the sign costs no instruction: 3 vector
// instructions per 32 multiply-adds, FBGEMM's count. Register-only 112 GMAC/s per core against
// the int16 mix's 94, in place 100; but the table (32 stores per group and slice, amortized
// over 384-row tasks) and the per-call packing of |w| and the patterns cost 10-20%, so W8A8
// ran 0.94-1.04x the int16 GEMM's time at M = 64..512 (2 threads; 0.93-0.97x on one),
// still 0.83-0.94x FBGEMM, and it was not kept.
//
// - GEMV (M <= kGemvMaxM): each thread's weight rows as one stream, one row at a time,
//   prefetched kA2Ahead bytes ahead (the hardware prefetchers stop at 4 KiB pages).
// - GEMM: the transposed-tile scheme of the VNNI path with int16 operands. x is packed
//   once per call as int16 pairs per block of 16 rows, [K/2][16][2] (one 32-byte load holds
//   one k pair of 8 rows), the weight rows of a task are widened to int16 a K block at a
//   time (a plain row-major copy in L1/L2, no transpose), and one (w[k], w[k + 1]) pair is
//   broadcast per step: NR x MV accumulators of 8 outputs, kept over all K blocks in CT
//   [rows][Mp], transposed into the output (with the W8A8 scaling) at the end of each task.
// measured at M = 1 (2 threads; 4096 x 4096, 4096 x 14336, 11008 x 4096): 8 KB ahead read
// 64-69 GB/s in the fast memory regime, 2-4 KB 34-56, 16 KB 41-44
constexpr int64_t kA2Ahead = 8192;

// acc += t, in place: as with dpbusd_inplace, GCC otherwise copies every accumulator of
// an array once per step (8 extra moves per 8 products, which made the loop dispatch-bound)
FASTKERN_AVX2 inline __m256i add_inplace(__m256i acc, __m256i t) {
  asm("vpaddd %1, %0, %0" : "+x"(acc) : "x"(t));
  return acc;
}
constexpr int64_t kA2KC = 1024;    // K columns per block (a 16-row slice of x: 32 KB, in L1)
constexpr int64_t kA2TaskRows = 48;  // weight rows per task, 8 tiles (widened block: 96 KB, in L2)
// packed x per chunk of rows (gemm_s16_packed): every task of a thread meets one chunk before
// the next, so x streams from memory once per call instead of once per task
constexpr int64_t kA2XChunkBytes = 512 << 10;
// ... of at least this many rows: each chunk reads and widens the weights again, which cost
// more than the chunks saved below it (AVX2, 2 threads, W8A8 M = 64 / 256 in 16-row chunks
// at K = 11008 / 14336: 0.85-0.94x)
constexpr int64_t kA2ChunkMinRows = 256;
// ... and only where the packed x is larger than this (smaller ones stay in the LLC between
// tasks: 384 x 384 x 4096, 3 MB, ran no faster in chunks, and in some processes 1.4x slower)
constexpr int64_t kA2XWholeBytes = int64_t(8) << 20;

// MR rows of x against weight rows [n, n + NR): one widened weight vector per row and 16 k,
// each x vector loaded once for the NR rows. U accumulators per row pair: with one weight row
// (NR = 1) 4 up to 3 rows of x, 2 for 4 (within the 16 ymm registers); with several, one
// (their vpaddd chains are independent enough).
template <int MR, int NR>
FASTKERN_AVX2 void gemv_s16_rows_avx2(const int16_t* A, int64_t lda, const int8_t* W, int64_t K, int64_t n,
                                      const VnniOut& o, int64_t ldo, bool pf_l1) {
  constexpr int U = NR > 1 ? 1 : MR <= 3 ? 4 : 2;
  const int64_t K64 = K & ~int64_t(63);
  const int8_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = W + (n + j) * K;
  __m256i s[MR][NR][U];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      for (int u = 0; u < U; ++u) s[i][j][u] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k < K64; k += 64) {
    for (int j = 0; j < NR; ++j) prefetch_stream(w[j] + k + kA2Ahead, pf_l1);
    for (int u = 0; u < 4; ++u) {
      __m256i wv[NR];
      for (int j = 0; j < NR; ++j)
        wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + k + 16 * u)));
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k + 16 * u));
        for (int j = 0; j < NR; ++j) s[i][j][u % U] = add_inplace(s[i][j][u % U], _mm256_madd_epi16(xv, wv[j]));
      }
    }
  }
  for (; k < K; k += 16) {  // x is zero-padded to 16 columns; never read past a weight row
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j) {
      alignas(16) int8_t tail[16] = {};
      const int8_t* src = w[j] + k;
      if (K - k < 16) {
        std::memcpy(tail, src, K - k);
        src = tail;
      }
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
      for (int j = 0; j < NR; ++j) s[i][j][0] = _mm256_add_epi32(s[i][j][0], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      __m256i t = s[i][j][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_epi32(t, s[i][j][u]);
      o.put(i, n + j, ldo, hsum8_i32_avx2(t));
    }
}

// MR rows of x against weight rows [n0, n1): with rows3 (MR >= 3), 3 weight rows at a time
// (each x load feeds 3 products), else one at a time (and the last n % 3 rows).
template <int MR>
FASTKERN_AVX2 void gemv_s16_avx2(const int16_t* A, int64_t lda, const int8_t* W, int64_t K, int64_t n0,
                                 int64_t n1, const VnniOut& o, int64_t ldo, bool rows3 = false) {
  const bool pf_l1 = gemv_prefetch_l1();
  int64_t n = n0;
  if (MR >= 3 && rows3)
    for (; n + 3 <= n1; n += 3) gemv_s16_rows_avx2<MR, 3>(A, lda, W, K, n, o, ldo, pf_l1);
  for (; n < n1; ++n) gemv_s16_rows_avx2<MR, 1>(A, lda, W, K, n, o, ldo, pf_l1);
}

// The same GEMV on int8 x by the sign trick: vpmaddubsw(|w|, x * sign(w)). |w| <= 128 as an
// unsigned byte (vpabsb of -128 is 0x80) and x * sign(w) stays in -127..127 while x holds no
// -128 (W8A8 activations never do; int8_gemm checks), so each pair sum is at most
// 2 * 128 * 127 = 32512 and vpmaddubsw never saturates: exact. Per 32 weights one 32-byte
// weight load and one x load (the int16 GEMV above: two widening weight loads, two x loads),
// and x takes half the L1d.
// s += the products of one 32-byte weight vector wv with x's rows at column k
template <int MR>
FASTKERN_AVX2 inline void i8s_step(__m256i* s, int64_t ss, const int8_t* A, int64_t lda, __m256i wv, int64_t k) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i aw = _mm256_abs_epi8(wv);
  for (int i = 0; i < MR; ++i) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
    const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
    s[i * ss] = add_inplace(s[i * ss], _mm256_madd_epi16(p, ones));
  }
}

// MR rows of x (int8, zero-padded to lda >= round_up(K, 32)) against weight row n
template <int MR>
FASTKERN_AVX2 void gemv_i8s_row_avx2(const int8_t* A, int64_t lda, const int8_t* W, int64_t K, int64_t n,
                                     const VnniOut& o, int64_t ldo, bool pf_l1) {
  constexpr int U = MR <= 2 ? 2 : 1;
  const int64_t K64 = K & ~int64_t(63);
  const int8_t* w = W + n * K;
  __m256i s[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) s[i][u] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k < K64; k += 64) {
    prefetch_stream(w + k + kA2Ahead, pf_l1);
    i8s_step<MR>(&s[0][0], U, A, lda, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)), k);
    i8s_step<MR>(&s[0][U - 1], U, A, lda, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32)), k + 32);
  }
  for (; k < K; k += 32) {  // x is zero-padded to 32 columns; never read past a weight row
    alignas(32) int8_t tail[32] = {};
    std::memcpy(tail, w + k, std::min<int64_t>(32, K - k));
    i8s_step<MR>(&s[0][0], U, A, lda, _mm256_load_si256(reinterpret_cast<const __m256i*>(tail)), k);
  }
  for (int i = 0; i < MR; ++i) {
    __m256i t = s[i][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_epi32(t, s[i][u]);
    o.put(i, n, ldo, hsum8_i32_avx2(t));
  }
}

// x rows (int8, row stride lda) -> int16 pairs per block of 16 rows (the last one 8 or 16
// wide): block m0 starts at ap + m0 * K2 and holds [K2][w] words (a[m][2k], a[m][2k + 1]);
// zero rows past M, zero past K.
// Eight rows at a time by pack_rows8, 8 pairs of each widened per step.
void pack_x_s16(const int8_t* A, int64_t lda, int64_t M, int64_t K, int32_t* ap) {
  const int64_t K2 = (K + 1) / 2, Mp = round_up(M, 8), nmb = (M + 15) / 16;
  constexpr int64_t kChunk = 512;  // pairs of a row per work item
  const int64_t nkc = (K2 + kChunk - 1) / kChunk;
  at::parallel_for(0, nmb * nkc, 1, [&](int64_t b, int64_t e) FASTKERN_AVX2 {
    for (int64_t t = b; t < e; ++t) {
      const int64_t mb = t / nkc, k0 = (t % nkc) * kChunk, k1 = std::min(K2, k0 + kChunk);
      const int64_t m0 = mb * 16, w = std::min<int64_t>(16, Mp - m0), rows = std::min<int64_t>(w, M - m0);
      int32_t* dst = ap + m0 * K2;
      for (int64_t r0 = 0; r0 < w; r0 += 8) {
        auto row = [&](int64_t i) { return r0 + i < rows ? A + (m0 + r0 + i) * lda : nullptr; };
        pack_rows8(
            dst, w, r0, k0, k1, K / 2,  // 8 whole pairs: 16 bytes within K
            [&](int i, int64_t k) FASTKERN_AVX2 {
              const int8_t* src = row(i);
              return src ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * k)))
                         : _mm256_setzero_si256();
            },
            [&](int i, int64_t k) {
              const int8_t* src = row(i);
              if (!src) return int32_t(0);
              const uint32_t lo = uint16_t(int16_t(src[2 * k]));
              const uint32_t hi = 2 * k + 1 < K ? uint16_t(int16_t(src[2 * k + 1])) : 0u;
              return int32_t(lo | (hi << 16));
            });
      }
    }
  });
}

// CT[j][8 v + lane] (+)= sum over kc2 k pairs of Ap[k][8 v + lane] . B[j][k] for NR weight
// rows (B: int16 rows, stride ldb) and MV vectors of 8 rows of x (Ap: packed, w = 8 MV wide).
template <int NR, int MV>
FASTKERN_AVX2 void s16_tile(const int32_t* Ap, const int16_t* B, int64_t ldb, int64_t kc2, int32_t* CT,
                            int64_t ldct, bool acc, LinePrefetch& pf) {
  __m256i c[NR][MV];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v)
      c[j][v] = acc ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(CT + j * ldct + 8 * v))
                    : _mm256_setzero_si256();
  const int64_t mask = pf.mask;
  for (int64_t k = 0; k < kc2; ++k) {
    if ((k & mask) == 0) pf.one();
    __m256i a[MV];
    for (int v = 0; v < MV; ++v)
      a[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Ap + k * 8 * MV + 8 * v));
    for (int j = 0; j < NR; ++j) {
      int32_t bw;
      std::memcpy(&bw, B + j * ldb + 2 * k, 4);
      const __m256i b = _mm256_set1_epi32(bw);
      for (int v = 0; v < MV; ++v) c[j][v] = add_inplace(c[j][v], _mm256_madd_epi16(a[v], b));
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(CT + j * ldct + 8 * v), c[j][v]);
}

// Weight rows per tile: 6 x 2 accumulators, the 2 vectors of x and the broadcast fill 15 of
// the 16 ymm registers. Against 4 x 2 (8 accumulators; 2 loads of x and 4 broadcasts per 8
// vpmaddwd instead of 6 per 12), alternating in one process with FBGEMM as the yardstick
// (W8A8, AVX2, 2 threads): 4096^2 M = 64 9.9 / 6.9 -> 8.1 / 6.4 ms, M = 128 13.5 -> 12.5,
// M = 256 31.0 / 25.1 -> 29.0 / 24.0, 4096 x 11008 M = 64 23.5 -> 20.4 (one of 8 runs slower:
// 4096^2 M = 256 27.7 -> 29.7).
constexpr int kA2NR = 6;

// The tiles of `rows` weight rows: kA2NR at a time, then 4, 2 and 1 for the rest.
template <class F>
inline void s16_row_tiles(int64_t rows, const F& tile) {
  int64_t r = 0;
  for (; r + kA2NR <= rows; r += kA2NR) tile(std::integral_constant<int, kA2NR>(), r);
  if (r + 4 <= rows) tile(std::integral_constant<int, 4>(), r), r += 4;
  if (r + 2 <= rows) tile(std::integral_constant<int, 2>(), r), r += 2;
  if (r < rows) tile(std::integral_constant<int, 1>(), r);
}

template <int MV>
void s16_rows(const int32_t* Ap, const int16_t* B, int64_t ldb, int64_t rows, int64_t kc2, int32_t* CT,
              int64_t ldct, bool acc, LinePrefetch& pf) {
  s16_row_tiles(rows, [&](auto nr, int64_t r) {
    s16_tile<decltype(nr)::value, MV>(Ap, B + r * ldb, ldb, kc2, CT + r * ldct, ldct, acc, pf);
  });
}

// dst[r][k] = int16(W[n0 + r][k0 + k]) for k < kc, zero up to round_up(kc, 16)
//
// At M = 16 this pass is 14% of the GEMM's time (one x slice per widened block; skipping it
// altogether, results aside, took 4096^2 from 2.05 to 1.68 ms and 11008 x 4096 from 5.14 to
// 4.36, 1.6-1.8 ms on hot 1536 x 384 / 2048 x 1024 alike, so it is not the weight stream).
// Tried, not kept: widening 16 columns per k step inside the tiles of the first x slice (each
// tile the next one's rows; the chunk in locals, the partial last one after the loop): the same
// time to the percent at M = 16 / 64 / 256 (Zen 4, AVX2, 2 threads, alternating with the pass).
// The tiles issue near their limit: in a register-only probe 12 vpmaddwd + 12 vpaddd take 7.4
// cycles a k step for 6 x 2, 4 x 3, 3 x 4 and 2 x 6 tiles alike (x and B loads folded or not,
// B broadcast or pre-broadcast), against 6 on the two multiply pipes; an independent
// vpmaddwd / vpaddd stream runs 6.8. The widening's load, shuffle and store cost as much
// inside the loop as outside it.
FASTKERN_AVX2 void widen_rows(const int8_t* W, int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t kc,
                              int16_t* dst, int64_t ldd) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* src = W + n * K + k0;
    int16_t* d = dst + (n - n0) * ldd;
    int64_t k = 0;
    for (; k + 16 <= kc; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k),
                          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    if (k < kc) {
      alignas(16) int8_t tail[16] = {};
      std::memcpy(tail, src + k, kc - k);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k),
                          _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(tail))));
    }
  }
}

// out rows [n0, n1) from CT [n1 - n0][Mp]: C[m][n] = CT[n - n0][m], or the W8A8 scaling
// float((double(c) * sx[m]) * ws[n]), 8 x 8 blocks transposed in registers.
FASTKERN_AVX2 void finish_s16(const int32_t* CT, int64_t Mp, int64_t M, int64_t N, int64_t n0, int64_t n1,
                              const VnniOut& o) {
  // the outputs of rows [m0, m0 + 8) x columns [n, n + 8) into t[0..8) (float bits for W8A8)
  auto block = [&](int64_t n, int64_t m0, __m256i t[8]) FASTKERN_AVX2 {
    __m256i r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(CT + (n - n0 + j) * Mp + m0));
    transpose8x8_epi32(r, t);
    if (!o.f) return;
    const int64_t mm = std::min<int64_t>(8, M - m0);
    for (int64_t i = 0; i < mm; ++i) {
      const __m256d sx = _mm256_set1_pd(double(o.sx[m0 + i]));
      const __m256d lo = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(t[i])), sx),
                                       _mm256_loadu_pd(o.ws + n));
      const __m256d hi = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(t[i], 1)), sx),
                                       _mm256_loadu_pd(o.ws + n + 4));
      __m256 y = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
      if (o.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(o.bias + n));
      t[i] = _mm256_castps_si256(y);
    }
  };
  int32_t* out = o.f ? reinterpret_cast<int32_t*>(o.f) : o.c;
  int64_t n = n0;
  while (n + 8 <= n1) {
    if (o.stream && n % 16 == 0 && n + 16 <= n1) {  // whole lines: non-temporal stores
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        __m256i a[8], b[8];
        block(n, m0, a);
        block(n + 8, m0, b);
        for (int64_t i = 0; i < std::min<int64_t>(8, M - m0); ++i) {
          __m256i* d = reinterpret_cast<__m256i*>(out + (m0 + i) * N + n);
          _mm256_stream_si256(d, a[i]);
          _mm256_stream_si256(d + 1, b[i]);
        }
      }
      n += 16;
      continue;
    }
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      __m256i t[8];
      block(n, m0, t);
      for (int64_t i = 0; i < std::min<int64_t>(8, M - m0); ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + i) * N + n), t[i]);
    }
    n += 8;
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      const int32_t c = CT[(n - n0) * Mp + m];
      o.put(m, n, N, c);
    }
}

// The int16 GEMM's last rows of x (s16_gemv_tail) by a GEMV within it: r <= kS16TailCap rows
// of x as int16 [r][ldx] (zero from K to ldx, a multiple of 16), against each widened weight
// block (a task's rows, one K block, in L2) right after the block's tiles; o: the output from
// their first row on.
constexpr int64_t kS16TailCap = 8;  // rows (s16_tail_block's cases)
constexpr int64_t kS16TailRows = 7;  // by default (s16_gemv_tail)
struct S16Tail {
  const int16_t* x = nullptr;
  int64_t ldx = 0, r = 0;
  VnniOut o;
};

// R rows of x (from x, row stride ldx) against NR widened rows of wb (row stride ldb), k in
// [0, kc16): int32 lane sums into part[(j * R + i) * 8 ..], stored where first, else added.
template <int R, int NR>
FASTKERN_AVX2 void s16_tail_tile(const int16_t* x, int64_t ldx, const int16_t* wb, int64_t ldb, int64_t kc16,
                                 int32_t* part, bool first) {
  __m256i acc[R][NR];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kc16; k += 16) {
    __m256i w[NR];
    for (int j = 0; j < NR; ++j) w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * ldb + k));
    for (int i = 0; i < R; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + k));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, w[j]));
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) {
      __m256i* d = reinterpret_cast<__m256i*>(part + (j * R + i) * 8);
      _mm256_storeu_si256(d, first ? acc[i][j] : _mm256_add_epi32(_mm256_loadu_si256(d), acc[i][j]));
    }
}

// t's rows, k in [k0, k0 + kc16), against the widened block wb (rows [0, rows)): lane sums
// into part[(n * r + i) * 8 ..] for block row n.
template <int R>
FASTKERN_AVX2 void s16_tail_block_r(const S16Tail& t, int64_t k0, const int16_t* wb, int64_t ldb, int64_t rows,
                                    int64_t kc16, int32_t* part, bool first) {
  constexpr int NR = R <= 4 ? 2 : 1;  // R x NR accumulators within the 16 ymm registers
  const int16_t* x = t.x + k0;
  int64_t j = 0;
  for (; j + NR <= rows; j += NR) s16_tail_tile<R, NR>(x, t.ldx, wb + j * ldb, ldb, kc16, part + j * R * 8, first);
  for (; j < rows; ++j) s16_tail_tile<R, 1>(x, t.ldx, wb + j * ldb, ldb, kc16, part + j * R * 8, first);
}
void s16_tail_block(const S16Tail& t, int64_t k0, const int16_t* wb, int64_t ldb, int64_t rows, int64_t kc16,
                    int32_t* part, bool first) {
  with_rows<kS16TailCap>(t.r, [&](auto R) {
    s16_tail_block_r<decltype(R)::value>(t, k0, wb, ldb, rows, kc16, part, first);
  });
}
// the tail's outputs for weight rows [n0, n1) from their lane sums
FASTKERN_AVX2 void s16_tail_finish(const S16Tail& t, const int32_t* part, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t i = 0; i < t.r; ++i)
      t.o.put(i, n, N, hsum8_i32_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(part + ((n - n0) * t.r + i) * 8))));
}

void gemm_s16_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o,
                     const S16Tail* tail = nullptr);

// A [M, K] (int8, row stride lda) x W [N, K]^T -> o, for M > kGemvMaxM; the last tail_rows
// rows (s16_gemv_tail) as the GEMM's S16Tail.
void gemm_s16_avx2(const int8_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K,
                   const VnniOut& o, int64_t tail_rows = 0) {
  const int64_t mg = M - tail_rows;
  Scratch apt(ScratchSlot::XPack, size_t(round_up(mg, 8) * ((K + 1) / 2)) * 4);
  int32_t* ap = apt.as<int32_t>();
  pack_x_s16(A, lda, mg, K, ap);
  S16Tail t;
  const int64_t ldx = round_up(K, 16);
  Scratch xts(ScratchSlot::XQuant, size_t(tail_rows * ldx) * 2);
  if (tail_rows > 0) {
    int16_t* xt = xts.as<int16_t>();
    for (int64_t i = 0; i < tail_rows; ++i)
      for (int64_t k = 0; k < ldx; ++k) xt[i * ldx + k] = k < K ? A[(mg + i) * lda + k] : 0;
    t.x = xt, t.ldx = ldx, t.r = tail_rows, t.o = o.from_row(mg, N);
  }
  gemm_s16_packed(ap, mg, W, N, K, o, tail_rows > 0 ? &t : nullptr);
}

// x packed by pack_x_s16 (or quantize_pack_s16) x W [N, K]^T -> o: gemm_s16_avx2's GEMM;
// tail: rows after the M packed ones, by the GEMV within it (S16Tail).
void gemm_s16_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o,
                     const S16Tail* tail) {
  const int64_t K2 = (K + 1) / 2, Mp = round_up(M, 8);
  const int64_t KC = std::min(kA2KC, round_up(K, 2)), ldb = round_up(KC, 16);
  // chunks of MC rows of x, each one's packed x (MC x K int16) kept in L2 while all of a
  // thread's tasks meet it
  const int64_t chunk_bytes = env_knob("FASTKERN_S16_X_CHUNK_KB", kA2XChunkBytes >> 10) << 10;
  const bool whole =
      chunk_bytes <= 0 || Mp * K2 * 4 <= env_knob("FASTKERN_S16_X_WHOLE_KB", kA2XWholeBytes >> 10) << 10;
  const int64_t MC = whole ? round_up(Mp, 16) : std::max<int64_t>(kA2ChunkMinRows, chunk_bytes / (4 * K2) / 16 * 16);
  VnniOut os = o;
  os.stream = stream_out(o, M, N);
  parallel_rows(N, 8, 1, [&](int64_t r0, int64_t r1) {
    Scratch wbs(ScratchSlot::Worker1, size_t(kA2TaskRows * ldb) * 2);
    Scratch cts(ScratchSlot::Worker0, size_t(kA2TaskRows * std::min(MC, Mp)) * 4);
    int16_t* wb = wbs.as<int16_t>();
    int32_t* ct = cts.as<int32_t>();
    alignas(32) int32_t tpart[kA2TaskRows * kS16TailCap * 8];
    for (int64_t mc0 = 0; mc0 < M; mc0 += MC) {
      const int64_t mc1 = std::min(M, mc0 + MC), ldct = std::min(MC, Mp - mc0);
      const int64_t nmb = (mc1 - mc0 + 15) / 16;
      const VnniOut oc = os.from_row(mc0, N);
      for (int64_t n0 = r0; n0 < r1; n0 += kA2TaskRows) {
        const int64_t n1 = std::min(r1, n0 + kA2TaskRows);
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
          const int64_t kc = std::min(KC, K - k0), kc2 = (kc + 1) / 2;
          widen_rows(W, K, n0, n1, k0, kc, wb, ldb);
          // the next block: the next K block of these rows, or the next task's first (the
          // thread's first task where the next chunk of x starts)
          const bool next_k = k0 + KC < K;
          const int64_t pn = next_k ? n0 : n1 < r1 || mc1 >= M ? n1 : r0, pk0 = next_k ? k0 + KC : 0;
          LinePrefetch pf(reinterpret_cast<const char*>(W), K, pn, next_k ? n1 : std::min(r1, pn + kA2TaskRows), pk0,
                          std::min(K, pk0 + KC));
          int64_t tiles = 0;
          s16_row_tiles(n1 - n0, [&](auto, int64_t) { ++tiles; });
          pf.spread(tiles * nmb, kc2);
          for (int64_t mb = 0; mb < nmb; ++mb) {
            const int64_t m0 = mc0 + mb * 16, w = std::min<int64_t>(16, Mp - m0);
            const int32_t* a = ap + m0 * K2 + (k0 / 2) * w;
            if (w == 16)
              s16_rows<2>(a, wb, ldb, n1 - n0, kc2, ct + (m0 - mc0), ldct, k0 > 0, pf);
            else
              s16_rows<1>(a, wb, ldb, n1 - n0, kc2, ct + (m0 - mc0), ldct, k0 > 0, pf);
          }
          if (tail && mc0 == 0) s16_tail_block(*tail, k0, wb, ldb, n1 - n0, round_up(kc, 16), tpart, k0 == 0);
        }
        finish_s16(ct, ldct, mc1 - mc0, N, n0, n1, oc);
        if (tail && mc0 == 0) s16_tail_finish(*tail, tpart, N, n0, n1);
      }
    }
    if (os.stream) _mm_sfence();  // the non-temporal stores before the threads join
  });
}

// ------------------------------------------------------------------ AVX-VNNI GEMM (avx2vnni path)
//
// The AVX-512 VNNI GEMM's scheme (matmul_vnni: x + 128 packed by pack_x_vnni, weight bytes
// broadcast as they are, 128 * sum_k w[n][k] subtracted) on 256-bit vectors with the VEX
// vpdpbusd of AVX-VNNI (Intel client cores from Alder Lake, AMD Zen 5), for CPUs that have
// it without AVX-512. One vpdpbusd does 32 exact byte products where the AVX2 GEMM's int16
// mix (vpmaddwd + vpaddd) does 16 in two instructions. Tiles of 6 weight rows x 16 rows of
// x (12 accumulators, 2 x vectors and a broadcast in the 16 ymm registers), over the
// 16-row slices of pack_x_vnni's 64-row blocks (12 x 8 where a last slice holds at most 8
// rows: M = 17..24 computes 24 rows, not 32); each thread's rows in tasks as matmul_vnni
// (the task's weight row sums first, the next task prefetched into L2 while it computes),
// the int32 results transposed out by finish_s16. The products are exact, so the output is
// bitwise the AVX2 path's (and the reference's).
FASTKERN_AVXVNNI inline __m256i dpbusd256_inplace(__m256i acc, __m256i a, __m256i b) {
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
  return acc;
}

// sum_k w[n][k] of rows [n0, n1) -> out[n - n0]
FASTKERN_AVXVNNI void row_sums_vnni256(const int8_t* W, int64_t K, int64_t n0, int64_t n1, int32_t* out) {
  const __m256i ones = _mm256_set1_epi8(1);
  const int64_t K128 = K & ~int64_t(127);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t k = 0; k < K128; k += 128)
      for (int u = 0; u < 4; ++u)
        s[u] = dpbusd256_inplace(s[u], ones, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32 * u)));
    int32_t t = hsum8_i32_avx2(_mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3])));
    for (int64_t k = K128; k < K; ++k) t += w[k];
    out[n - n0] = t;
  }
}

// CT[j][0..8V) (+)= 8V rows of packed x (from Ap, `step` bytes per group of 4 k) . weight row
// j, for NR rows, k4 in [k40, k41). init: the first K block, which starts from -init[j]
// (the weight rows' 128 * sum); otherwise CT is accumulated. Prefetches as gemm_vnni_tile.
template <int NR, int V>
FASTKERN_AVXVNNI void gemm_vnni256_tile(const int8_t* Ap, int64_t step, const int8_t* W, int64_t K, int64_t k40,
                                        int64_t k41, int32_t* CT, int64_t ldct, const int32_t* init, const char* pf,
                                        const char* pf_end, int64_t pf_mask) {
  __m256i c[NR][V];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < V; ++v)
      c[j][v] = init ? _mm256_set1_epi32(-init[j]) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(CT + j * ldct + 8 * v));
  auto step4 = [&](int64_t k4, bool tail) FASTKERN_AVXVNNI {
    __m256i a[V];
    for (int v = 0; v < V; ++v) a[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Ap + k4 * step + 32 * v));
    for (int j = 0; j < NR; ++j) {
      int32_t wv = 0;  // the last K % 4 bytes: never read past a weight row
      std::memcpy(&wv, W + j * K + 4 * k4, tail ? K - 4 * k4 : 4);
      const __m256i wb = _mm256_set1_epi32(wv);
      for (int v = 0; v < V; ++v) c[j][v] = dpbusd256_inplace(c[j][v], a[v], wb);
    }
  };
  const int64_t kfull = std::min(k41, K / 4);
  int64_t k4 = k40;
  for (; k4 < kfull; ++k4) {
    if (((k4 - k40) & pf_mask) == 0 && pf < pf_end) {
      _mm_prefetch(pf, _MM_HINT_T1);
      pf += 64;
    }
    step4(k4, false);
  }
  if (k4 < k41) step4(k4, true);
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < V; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(CT + j * ldct + 8 * v), c[j][v]);
}

// Weight rows [n0, n1) (CT and init indexed from n0) in tiles of NR (6 for 16 rows of x, 12 for
// 8), then single rows; the bytes [pf, pf_end) prefetched over them as in gemm_vnni_rows.
template <int V>
void gemm_vnni256_rows(const int8_t* Ap, int64_t step, const int8_t* W, int64_t K, int64_t k40, int64_t k41,
                       int32_t* CT, int64_t ldct, int64_t n0, int64_t n1, const int32_t* init, const char* pf,
                       const char* pf_end) {
  constexpr int NR = V == 2 ? 6 : 12;  // NR x V accumulators, V x vectors and a broadcast in 16 ymm
  const int64_t tiles = std::max<int64_t>(1, (n1 - n0) / NR + (n1 - n0) % NR);
  const int64_t lines = std::max<int64_t>(1, ((pf_end - pf) / 64 + tiles - 1) / tiles);
  int64_t st = 1;
  while (st * 2 * lines <= k41 - k40) st *= 2;
  const int64_t share = lines * 64;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR, pf += share)
    gemm_vnni256_tile<NR, V>(Ap, step, W + n * K, K, k40, k41, CT + (n - n0) * ldct, ldct, init ? init + (n - n0) : nullptr,
                          pf, std::min(pf_end, pf + share), st - 1);
  for (; n < n1; ++n, pf += share)
    gemm_vnni256_tile<1, V>(Ap, step, W + n * K, K, k40, k41, CT + (n - n0) * ldct, ldct, init ? init + (n - n0) : nullptr,
                         pf, std::min(pf_end, pf + share), st - 1);
}

// The GEMV on AVX-VNNI (avx2vnni, where int8_gemv_takes()): one weight row at a time (each
// thread's rows one stream, as the AVX-512 GEMV: several interleaved rows read DRAM
// slower) against MR rows of x, passes of at most kVnni256GemvRows rows over each row block
// of weight (parallel_row_blocks); the weight bytes flipped to w + 128 in registers (one
// vpxor per 32 bytes), x int8 (rows zero-padded to a multiple of 32 columns), 128 * sum_k
// x[m][k] subtracted. U accumulators per row of x (k steps of U x 32 bytes) keep 4
// vpdpbusd chains in flight at MR = 1; 8 rows cost 8 vpdpbusd per 32 weight bytes, under the
// bandwidth of a core.
constexpr int64_t kVnni256GemvRows = 8;

template <int MR>
FASTKERN_AVXVNNI void gemv_vnni256_row(const int8_t* A, int64_t lda, const int32_t* asum, const int8_t* W, int64_t K,
                                       int64_t n0, int64_t n1, const VnniOut& o, int64_t ldc) {
  constexpr int U = MR == 1 ? 4 : MR <= 3 ? 2 : 1;
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  const int64_t KU = K & ~int64_t(32 * U - 1), K32 = K & ~int64_t(31);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m256i s[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) s[i][u] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k < KU; k += 32 * U) {
      if (U > 1 || k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kVnniAhead), _MM_HINT_T0);
      if (U > 2) _mm_prefetch(reinterpret_cast<const char*>(w + k + 64 + kVnniAhead), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32 * u)), flip);
        for (int i = 0; i < MR; ++i)
          s[i][u] = dpbusd256_inplace(s[i][u], wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k + 32 * u)));
      }
    }
    for (; k < K; k += 32) {
      __m256i wv;
      if (k < K32) {
        wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      } else {  // the last K % 32 bytes, copied (never read past the tensor); the zero bytes
        // after them flip to 128 and meet x's zero padding
        alignas(32) int8_t tail[32] = {};
        std::memcpy(tail, w + k, K - k);
        wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
      }
      wv = _mm256_xor_si256(wv, flip);
      for (int i = 0; i < MR; ++i)
        s[i][0] = dpbusd256_inplace(s[i][0], wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k)));
    }
    for (int i = 0; i < MR; ++i) {
      __m256i t = s[i][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_epi32(t, s[i][u]);
      const int32_t c = int32_t(uint32_t(hsum8_i32_avx2(t)) - 128u * uint32_t(asum[i]));
      o.put(i, n, ldc, c);
    }
  }
}

// A [M, lda] (int8, rows zero-padded to lda >= round_up(K, 32)) x W [N, K]^T -> o.
void gemv_vnni256(const int8_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o) {
  std::vector<int32_t> asum(M, 0);
  int8_row_sums(A, lda, M, K, asum.data());
  parallel_row_blocks(N, 16, 8, K, (M + kVnni256GemvRows - 1) / kVnni256GemvRows, [&](int64_t n0, int64_t n1) {
    for_each_pass(M, kVnni256GemvRows, [&](int64_t m0, int64_t mr) {
      const int8_t* Am = A + m0 * lda;
      const int32_t* as = asum.data() + m0;
      const VnniOut om = o.from_row(m0, N);
      switch (mr) {
        case 1: gemv_vnni256_row<1>(Am, lda, as, W, K, n0, n1, om, N); break;
        case 2: gemv_vnni256_row<2>(Am, lda, as, W, K, n0, n1, om, N); break;
        case 3: gemv_vnni256_row<3>(Am, lda, as, W, K, n0, n1, om, N); break;
        case 4: gemv_vnni256_row<4>(Am, lda, as, W, K, n0, n1, om, N); break;
        case 5: gemv_vnni256_row<5>(Am, lda, as, W, K, n0, n1, om, N); break;
        case 6: gemv_vnni256_row<6>(Am, lda, as, W, K, n0, n1, om, N); break;
        case 7: gemv_vnni256_row<7>(Am, lda, as, W, K, n0, n1, om, N); break;
        default: gemv_vnni256_row<8>(Am, lda, as, W, K, n0, n1, om, N); break;
      }
    });
  });
}

void gemm_vnni256_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o);

// A [M, K] (int8 rows, stride lda) x W [N, K]^T -> o.
void matmul_vnni256(const int8_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o) {
  Scratch apt(ScratchSlot::XPack, size_t(round_up(M, 16) * ((K + 3) / 4)) * 4);
  int32_t* ap = apt.as<int32_t>();
  pack_x_vnni(A, lda, M, K, ap);
  gemm_vnni256_packed(ap, M, W, N, K, o);
}

// x packed by pack_x_vnni (or quantize_pack_vnni256) x W [N, K]^T -> o: matmul_vnni256's GEMM.
void gemm_vnni256_packed(const int32_t* ap, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o) {
  const int64_t K4 = (K + 3) / 4, nmb = (M + 63) / 64, Mp = round_up(M, 16);
  VnniOut os = o;
  os.stream = stream_out(o, M, N);
  const int64_t nb = vnni_task_rows(K);
  const int64_t nkb = (K4 + kVnniKC / 4 - 1) / (kVnniKC / 4);
  parallel_rows(N, 12, 1, [&](int64_t r0, int64_t r1) {
    Scratch cts(ScratchSlot::Worker0, size_t(nb * Mp) * 4), corrs(ScratchSlot::Worker1, size_t(nb) * 4);
    int32_t* ct = cts.as<int32_t>();
    int32_t* corr = corrs.as<int32_t>();
    for (int64_t n0 = r0; n0 < r1; n0 += nb) {
      const int64_t n1 = std::min(r1, n0 + nb);
      const char* pf = reinterpret_cast<const char*>(W + n1 * K);
      const char* pf_end = reinterpret_cast<const char*>(W + std::min(r1, n1 + nb) * K);
      const int64_t calls = nkb * (Mp / 16);  // the tile-row calls of this task
      const int64_t share = ((pf_end - pf) + calls - 1) / calls;
      row_sums_vnni256(W, K, n0, n1, corr);
      for (int64_t n = 0; n < n1 - n0; ++n) corr[n] = int32_t(128u * uint32_t(corr[n]));
      for (int64_t k40 = 0; k40 < K4; k40 += kVnniKC / 4) {
        const int64_t k41 = std::min(K4, k40 + kVnniKC / 4);
        for (int64_t mb = 0; mb < nmb; ++mb) {
          const int64_t m0 = mb * 64, w = std::min<int64_t>(64, Mp - m0);
          for (int64_t r = 0; r < w; r += 16) {
            const int8_t* a = reinterpret_cast<const int8_t*>(ap + m0 * K4 + r);
            const char* pe = std::min(pf_end, pf + share);
            // a last slice of at most 8 real rows takes the 8-row tiles
            if (M - (m0 + r) <= 8)
              gemm_vnni256_rows<1>(a, 4 * w, W, K, k40, k41, ct + m0 + r, Mp, n0, n1,
                                   k40 == 0 ? corr : nullptr, pf, pe);
            else
              gemm_vnni256_rows<2>(a, 4 * w, W, K, k40, k41, ct + m0 + r, Mp, n0, n1,
                                   k40 == 0 ? corr : nullptr, pf, pe);
            pf = pe;
          }
        }
      }
      finish_s16(ct, Mp, M, N, n0, n1, os);
    }
    if (os.stream) _mm_sfence();  // the non-temporal stores before the threads join
  });
}

// The legacy AVX2 path (int16 panels), kept selectable for A/B timing:
// FASTKERN_INT8_AVX2=panel (read on every call).
bool int8_avx2_legacy() {
  const char* e = std::getenv("FASTKERN_INT8_AVX2");
  return e && std::string(e) == "panel";
}

bool use_s16_avx2() { return use_avx2() && !use_vnni512() && !int8_avx2_legacy(); }

// The AVX2 GEMV serves M < kS16GemmMinM, and M = 23, 24 on large weights, where the GEMM would
// compute a one-vector block (int8_gemv_takes), where the small-layer kernels do not (use_wv), in
// passes of at most kS16GemvRows rows of x over the weight, the rows spread evenly over the
// passes (M = 5: 3 + 2). Measured against the GEMM tiles (AVX2, 2 threads, one process,
// alternating, FBGEMM alongside as the yardstick; 4096 x 4096 unless said): M = 4 0.66 vs
// 1.69 ms, M = 6 1.12 vs 1.99, M = 8 1.29 vs 1.88 and 1.10 vs 1.38, 11008 x 4096 M = 4 1.46
// vs 3.92. Passes of 4 rows beat 5, 6 and 8 (4096^2 M = 8: 1.10 / 1.37 / 1.33 / 1.64 ms).
// With the passes in row blocks (parallel_row_blocks) and the accumulators pinned (add_inplace:
// GCC had reassociated the sums, spilled two accumulators and copied four per step; 4096^2
// M = 8 1.89 -> 1.47 ms, one thread) it also wins up to M = 24 (11008 x 4096 / 4096^2: M = 16
// 4.33 / 1.93 ms vs 4.40 / 2.18, M = 24 6.34 / 2.36 vs 7.06 / 2.66) and loses from 32 (8.92 /
// 3.30 vs 8.43 / 3.18) (those on another host, against the GEMM of that time; see
// int8_gemv_takes for the measurements behind today's split). FASTKERN_INT8_GEMV_MAX_M overrides
// the limit, read on every call (A/B timing, tests).
constexpr int64_t kS16GemvRows = 4;
constexpr int64_t kS16GemvMaxM = 24;

// With AVX-VNNI (avx2vnni) the GEMV is gemv_vnni256 (memory-bound to M = 8 at K = 4096) and
// the GEMM matmul_vnni256, which takes over from M = 9, or from M = 8 where K > 4096 (x's
// rows no longer stay in L1). Measured (2 threads, weights beyond L3, one process,
// alternating, linear_w8a8; ms, GEMV / GEMM / the AVX2 int16 GEMV / FBGEMM): 4096 x 4096
// M = 5: 0.42 / 0.70 / 0.56 / 0.47, M = 8: 0.45 / 0.70 / 0.78 / 0.65, M = 12: 0.69 / 0.72 /
// 1.14 / 0.92, M = 16: 0.82 / 0.74 / 1.53 / 1.21; 4096 x 11008 M = 5: 1.71 / 2.01 / 2.19 /
// 1.18, M = 8: 2.25 / 1.88 / 2.89 / 1.63; M = 1, 2: the same as the AVX2 GEMV (memory-bound).
constexpr int64_t kVnni256GemvMaxM = 8;
constexpr int64_t kVnni256GemvMaxMLongK = 7;
constexpr int64_t kVnni256LongK = 4096;  // K above which kVnni256GemvMaxMLongK applies

// Rows past the last whole 16-row block of x that the AVX2 int16 GEMM leaves to the GEMV: the
// GEMM computes x in blocks of 16 rows (two 8-row vectors per tile; a last block of up to 8
// rows in one-vector tiles, which cost more than half as much), so M = 16 j + r with r <=
// kS16GemvRows (one GEMV pass, which reads the weight once more) costs it a whole block for r
// rows. Measured (Zen 4, AVX2, W8A8, 2 threads, weights beyond L3, one process, alternating;
// GEMM alone against GEMM + GEMV, ms): 4096 x 4096 M = 33 / 35 / 36 4.79 / 4.76 / 4.89 against
// 4.12 / 4.21 / 4.59, M = 65 / 67 / 68 8.03 / 7.94 / 8.00 against 7.43 / 7.53 / 7.76, M = 130
// 14.49 against 14.02; 11008 x 4096 M = 33 / 36 / 65 12.1 / 12.1 / 20.3 against 10.6 / 11.3 /
// 18.8; 1536 x 384 M = 33 / 36 / 65 0.206 / 0.213 / 0.342 against 0.184 / 0.199 / 0.311. With
// 8-row vectors as the unit instead (M = 24 + r), 1536 x 384 M = 27 / 28 ran 1.04 / 1.09x slower
// (the GEMM's rows then end in a one-vector block anyway). The r rows now run within the GEMM
// (S16Tail: against each widened weight block after its tiles, from L2, at about the tiles'
// cost per row) instead of a GEMV call that read the weight from memory again; measured (same
// method, W8A8, 9 rounds; ms, within / a call of their own / the 16 j rows alone): 4096 x 4096
// M = 33 5.65 / 5.95 / 5.33, 36 4.12 / 4.35 / 3.63, 65 7.04 / 7.43 / 6.82; 11008 x 4096 M = 33
// 14.98 / 15.82 / 13.57; 1536 x 384 M = 33 0.155 / 0.173 / 0.139, 36 0.163 / 0.182 / 0.139
// (this host's speed moved between runs; each line is one run). Within the GEMM the tail also
// pays up to 7 rows, where the GEMM alone ran them as a one-vector block (ms, the GEMM alone /
// with the tail): 1536 x 384 M = 21 0.116 / 0.105, 22 0.129 / 0.113, 23 0.173 / 0.157, 37
// 0.176 / 0.165, 39 0.300 / 0.274; 4096 x 4096 M = 38 4.55 / 4.35, 39 4.58 / 4.49; even at 8
// rows (1536 x 384 M = 24 0.117 / 0.118, 40 0.177 / 0.178). FASTKERN_S16_GEMV_TAIL (rows up to
// kS16TailCap, 0: off; read on every call: A/B, tests) sets the rows.
int64_t s16_gemv_tail(int64_t M) {
  const int64_t r = M % 16, rows = std::min(kS16TailCap, env_knob("FASTKERN_S16_GEMV_TAIL", kS16TailRows));
  if (r == 0 || r > rows || M < 16) return 0;
  return r;
}

// With the GEMV tail above, the int16 GEMM takes over from M = kS16GemmMinM (Zen 4, AVX2, W8A8,
// 2 threads, weights beyond L3, one process, alternating; GEMV against GEMM, ms): M = 16 / 24
// 384 x 384 0.041 / 0.070 against 0.040 / 0.056, 1536 x 384 0.126 / 0.173 against 0.103 /
// 0.157, 1024 x 1024 0.178 / 0.249 against 0.162 / 0.229, 4096 x 4096 2.15 / 3.07 against 2.02
// / 2.97, 11008 x 4096 5.71 / 8.07 against 5.46 / 7.97, 4096 x 14336 7.38 / 10.31 against 7.12
// / 10.13. Between those, where the GEMM leaves a GEMV pass that reads the weight once more (M
// = 17..20) or pads x to 24 rows (21..23), the GEMV alone stays from kS16TailGemvBytes of
// weight: 11008 x 4096 / 4096 x 14336 M = 17 / 20 6.03 / 6.92 and 7.81 / 8.69 against 6.24 /
// 7.19 and 8.77 / 9.28, M = 21 11008 x 4096 / 4096 x 4096 7.20 / 2.78 against 8.04 / 3.06
// (4096 x 4096 M = 17 / 20 even: 2.27 / 2.61 against 2.24 / 2.59); on small weights the GEMM
// wins there too (1536 x 384 M = 17 / 20 / 21 0.137 / 0.154 / 0.156 against 0.122 / 0.138 /
// 0.145). Below M = 16 the GEMV wins (4096 x 4096 M = 12 / 13 1.66 / 1.78 against 2.03 / 2.03).
// With the tail inside the GEMM (S16Tail, up to kS16TailRows) the GEMM + tail beat the GEMV
// alone on those weights at M = 17..22 (same method, ms, GEMV / GEMM + tail): 11008 x 4096 M =
// 19 6.42 / 6.03, 21 7.25 / 6.76, 22 7.61 / 7.39; 4096 x 4096 M = 19 2.45 / 2.40, 21 2.87 / 2.59,
// 22 2.99 / 2.89; not from M = 23 (11008 x 4096 M = 23 8.08 / 8.42, 24 9.05 / 9.30; 4096 x 4096
// 23 2.91 / 2.92, 24 3.09 / 3.18): the GEMV keeps M % 16 >= kS16TailGemvMinR there.
constexpr int64_t kS16GemmMinM = 16;
constexpr int64_t kS16TailGemvBytes = int64_t(16) << 20;
constexpr int64_t kS16TailGemvMinR = 7;

// Whether the GEMVs take M rows of x against the weight [N, K] (rather than a GEMM):
// FASTKERN_INT8_GEMV_MAX_M sets the largest M they take (read on every call: A/B timing, tests).
bool int8_gemv_takes(int64_t M, int64_t N, int64_t K) {
  const char* e = std::getenv("FASTKERN_INT8_GEMV_MAX_M");
  if (e && *e) return M <= std::max<int64_t>(kGemvMaxM, std::atoll(e));
  if (use_vnni256()) return M <= (K <= kVnni256LongK ? kVnni256GemvMaxM : kVnni256GemvMaxMLongK);
  if (M < kS16GemmMinM) return true;
  return M <= kS16GemvMaxM && M % 16 >= kS16TailGemvMinR && N * K >= kS16TailGemvBytes;
}

// C or o = A (int16 holding int8 values, zero-padded to lda >= round_up(K, 16)) x W^T: one
// pass over the weight per kS16GemvRows rows of x, each thread's rows in row blocks
// (parallel_row_blocks), so that only the first pass over a block reads it from DRAM.
//
// Three weight rows per step (gemv_s16_rows_avx2<MR, 3>) where a pass's rows of x outgrow the
// L1d or from M = kS16Rows3MinM: with one weight row per step x came from L2 for every product
// (a register-only loop at K = 11008, one core: 83 against 52 GMAC/s). Measured (AVX2, 2
// threads, weights beyond L3, one process, alternating; W8A8 ms, three rows against one):
// 4096 x 11008 M = 3 / 4 / 8 / 16 / 24: 2.43 / 2.40 / 4.02 / 7.36 / 8.96 against 2.95 / 3.87 /
// 5.87 / 10.7 / 13.8; 4096 x 14336 M = 3 / 16: 2.26 / 7.57 against 3.20 / 11.5; 4096 x 4096 and
// 11008 x 4096 M = 16 / 24 0.89-0.94x; but at K = 4096 and M = 3 / 4 (x in L1, the GEMV near
// the memory stream's rate, which one row at a time keeps best) 1.14-1.39x, M = 8 a tie.
// FASTKERN_S16_GEMV_NR=1 / 3 forces one or three (read on every call: A/B, tests).
constexpr int64_t kS16Rows3MinM = 12;
void gemv_s16(const int16_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o) {
  const int64_t nr = env_knob("FASTKERN_S16_GEMV_NR", 0);
  parallel_row_blocks(N, 16, 8, K, (M + kS16GemvRows - 1) / kS16GemvRows, [&](int64_t n0, int64_t n1) {
    for_each_pass(M, kS16GemvRows, [&](int64_t m0, int64_t mr) {
      const VnniOut om = o.from_row(m0, N);
      const int16_t* Am = A + m0 * lda;
      const bool rows3 = nr ? nr == 3 : M >= kS16Rows3MinM || mr * K * 2 > features().l1d_bytes();
      switch (mr) {
        case 1: gemv_s16_avx2<1>(Am, lda, W, K, n0, n1, om, N); break;
        case 2: gemv_s16_avx2<2>(Am, lda, W, K, n0, n1, om, N); break;
        case 3: gemv_s16_avx2<3>(Am, lda, W, K, n0, n1, om, N, rows3); break;
        default: gemv_s16_avx2<4>(Am, lda, W, K, n0, n1, om, N, rows3); break;
      }
    });
  });
}

// gemv_s16 on int8 x by the sign trick (gemv_i8s_row_avx2): A [M, lda] int8 in -127..127,
// zero-padded to lda >= round_up(K, 32); one pass over the weight per kS16GemvRows rows of x.
void gemv_i8s(const int8_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o) {
  const bool pf_l1 = gemv_prefetch_l1();
  parallel_row_blocks(N, 16, 8, K, (M + kS16GemvRows - 1) / kS16GemvRows, [&](int64_t n0, int64_t n1) {
    for_each_pass(M, kS16GemvRows, [&](int64_t m0, int64_t mr) {
      const VnniOut om = o.from_row(m0, N);
      const int8_t* Am = A + m0 * lda;
      for (int64_t n = n0; n < n1; ++n) switch (mr) {
          case 1: gemv_i8s_row_avx2<1>(Am, lda, W, K, n, om, N, pf_l1); break;
          case 2: gemv_i8s_row_avx2<2>(Am, lda, W, K, n, om, N, pf_l1); break;
          case 3: gemv_i8s_row_avx2<3>(Am, lda, W, K, n, om, N, pf_l1); break;
          default: gemv_i8s_row_avx2<4>(Am, lda, W, K, n, om, N, pf_l1); break;
        }
    });
  });
}

// The AVX2 GEMVs on int8 x (A [M, lda], rows zero-padded to lda >= round_up(K, 32)): VEX
// vpdpbusd on avx2vnni, else the sign trick (x in -127..127)
void gemv_int8_x(const int8_t* A, int64_t lda, int64_t M, const int8_t* W, int64_t N, int64_t K, const VnniOut& o) {
  if (use_vnni256())
    gemv_vnni256(A, lda, M, W, N, K, o);
  else
    gemv_i8s(A, lda, M, W, N, K, o);
}

// Whether a (int8, 2-D) holds -128 anywhere, which the sign trick cannot take
bool holds_int8_min(const at::Tensor& a) {
  const at::Tensor c = a.contiguous();
  const void* p = c.data_ptr<int8_t>();
  return std::memchr(p, 0x80, size_t(c.numel())) != nullptr;
}

// Whether the AVX2 GEMV of M rows runs on int8 x (gemv_i8s) rather than int16 (gemv_s16):
// at M = 1, and up to kI8sGemvMaxM where a pass's int16 rows of x outgrow the L1d. At M >= 2
// each row of x pays its own vpsignb per weight vector, against the int16 GEMV's one widening
// per weight vector for all rows. Measured (Zen 4, 32 KiB L1d, 2 threads, weights beyond L3,
// one process, alternating; W8A8 ms, int8 x against int16 x): M = 1 4096 x 14336 1.06 / 0.95
// vs 1.66 / 1.74 (FBGEMM 1.36 / 1.21), 4096 x 4096 and 11008 x 4096 0.96-1.02x; M = 2 4096 x
// 14336 1.50 vs 2.59, 4096 x 4096 and 11008 x 4096 1.06-1.08x slower; M = 4 / 8 at K = 14336
// 0.94 / 0.97x (against 3 weight rows per step), at K = 4096 0.97-0.98x; M = 16 1.03-1.09x
// slower. FASTKERN_I8S_GEMV_MAX_M (read on every call: A/B, tests) sets the M up to which it
// runs (0: never).
constexpr int64_t kI8sGemvMaxM = 8;
bool use_i8s_gemv(int64_t M, int64_t K) {
  const int64_t knob = env_knob("FASTKERN_I8S_GEMV_MAX_M", -1);
  if (knob >= 0) return M <= knob;
  return M == 1 || (M <= kI8sGemvMaxM && std::min(M, kS16GemvRows) * K * 2 > features().l1d_bytes());
}

// ------------------------------------------------------------------ small M: weight vectors (both ISAs)
//
// At small M (a BERT/MiniLM layer at batch 1: M ~ 8..64, N, K ~ 384..1536) the transposed
// tiles above lose on two counts: their x vectors hold 16 (VNNI) or 8 (AVX2) rows, so M = 17
// runs 32 (24) rows of products, and the VNNI GEMM also needs the weight row sums, a packed
// copy of x, a transposed output and three parallel regions per call. Here the weight is the
// vector operand instead: each thread packs a block of up to kWvRows of its weight rows x a
// K block into [k group][row] order (a 16 x 16 (VNNI) or 8 x 8 (AVX2) transpose in registers
// per group of rows, in L1), and every row of x is broadcast 4 (2) bytes at a time against
// it: M x N x K products exactly, an output row of 16 (8) columns per accumulator stored
// straight into y, one parallel region. The packing costs a few shuffles per weight vector,
// paid once per M rows of x; on larger weights the tiles above win again (use_wv(): measured,
// not modelled). While a block computes, the next block's weight rows are prefetched into
// L2, spread over its k steps.
constexpr int64_t kWvRows = 64;      // weight rows per packed block
constexpr int64_t kWvKC = 512;       // K bytes per VNNI block (64 x 512 B = 32 KB, in L1)
constexpr int64_t kWvKC2 = 256;      // K columns per AVX2 block (64 x 256 x 2 B = 32 KB)
constexpr int kWvMR = 6;             // rows of x per register tile (at most)

// Whether an M x [N, K] product runs the weight-vector kernels: M up to 64 (xc[] below holds
// 64 rows; FASTKERN_INT8_WV_MAX_M lowers it, read on every call for A/B timing in one process,
// 0 turns them off; on AVX2 without VNNI they run only where it is set) and weights up to 1 MiB
// with VNNI, 4 MiB with AVX2. Measured in one
// process against the tiles above (2 threads, M = 16 / 64, weights beyond L3): with VNNI
// 1536 x 384, 384 x 1536 and 384 x 384 ran 1.0-1.5x faster (hot or cold), but 3072 x 768 M =
// 16 took 179 against 106 us, 4096 x 4096 757 against 597 us. With AVX2 (no VNNI) the small
// layers had run 1.1-1.7x faster than the int16 GEMM of that time; against its 6-row tiles
// (4c60c29) and the int16 / sign-trick GEMVs of now they lose everywhere measured, so on AVX2
// they run only where FASTKERN_INT8_WV_MAX_M is set (A/B, tests). Measured on 2 Zen 4 cores
// (W8A8, AVX2 forced, one process, alternating, wv / the others, ms): weights beyond L3, 2
// threads, 384 x 384 M = 4 / 8 / 32 / 64 0.031 / 0.039 / 0.086 / 0.140 against 0.025 / 0.036 /
// 0.063 / 0.097; 1536 x 384 0.074 / 0.102 / 0.226 / 0.356 against 0.043 / 0.079 / 0.166 /
// 0.291; 768 x 3072 0.226 / 0.284 / 0.824 / 1.640 against 0.111 / 0.190 / 0.619 / 1.323; 2048 x
// 2048 M = 8 / 32 / 64 0.448 / 1.177 / 1.926 against 0.289 / 0.911 / 1.714; one thread the same
// (0.55-0.93x the time at M = 4..64 on 384 x 384, 1536 x 384, 384 x 1536, 3072 x 768); weights
// in L3 0.74-1.00x, except 1536 x 384 M = 16 / 24 (1.02 / 1.05x). With VNNI (native, same
// host) they still win on most small layers (384 x 384 and 1536 x 384 M = 5..64: the others
// 1.06-1.53x the time).
bool use_wv(bool vnni, int64_t M, int64_t N, int64_t K) {
  const char* e = std::getenv("FASTKERN_INT8_WV_MAX_M");
  if (!vnni && !e) return false;
  int64_t max_m = std::min<int64_t>(64, e ? std::max<int64_t>(0, std::atoll(e)) : 64);
  // with AVX-VNNI (avx2vnni) the VNNI GEMV and GEMM win on every small layer measured (384 x
  // 384, 1536 x 384, 384 x 1536, 3072 x 768, 768 x 3072: M = 4..7 the GEMV 1.6-2.7x, M >= 8
  // the GEMM 1.4-2.4x)
  if (!vnni && use_vnni256()) return false;
  // on the amx path the AMX GEMM wins from M = 9 on every small layer measured (2 threads, W8A8,
  // us, weight-vector kernels / AMX GEMM): 384 x 384 M = 16 / 32 / 64 18 / 15, 25 / 19, 38 /
  // 27; 1536 x 384 34 / 24, 59 / 32, 87 / 50; 768 x 768 39 / 24, 32 / 32, 53 / 53; 384 x 1536
  // 40 / 28, 43 / 42, 58 / 58; at M = 8 they win on three of four (384 x 384 14 against 17)
  if (vnni && active_isa() >= Isa::Amx && M > kAmxRowMaxM) return false;
  const int64_t min_m = vnni ? kVnniGemvMaxM + 1 : kGemvMaxM + 1;
  // VNNI with K in several blocks (384 x 1536): from M = 32 the tiles above were as fast with 2
  // threads and 1.2-1.4x faster with one (weights in L3 or DRAM; in L2 these kernels won)
  if (vnni && K > kWvKC && M > 24) return false;
  return M >= min_m && M <= max_m && N * K <= (vnni ? (int64_t(1) << 20) : (int64_t(1) << 22));
}

// Where the small-M kernels write: int32 c [M, N], or f [M, N] = float((double(c) * sx[m]) * ws[n])
// (ws as float: converting it to double is exact, the same value the reference multiplies by).
struct WvOut {
  int32_t* c = nullptr;
  float* f = nullptr;
  const float* sx = nullptr;
  const float* ws = nullptr;
};

// Rows of x in register tiles of at most kWvMR, as even as possible (M = 8: 4 + 4, 17: 6 + 6 + 5).
template <class F>
inline void wv_row_chunks(int64_t M, const F& f) {
  const int64_t chunks = (M + kWvMR - 1) / kWvMR;
  int64_t m0 = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t mr = (M - m0) / (chunks - c) + ((M - m0) % (chunks - c) ? 1 : 0);
    f(m0, mr);
    m0 += mr;
  }
}

// The weight rows a thread computes next (its next block of kWvRows whole rows, one contiguous
// run of memory), prefetched into L2 while the current block's tiles run: each tile takes the
// next share of lines, n of them every mask + 1 k steps (n > 1 where a block has more lines
// than its tiles have k steps: one row of x per tile at K = 1536, where one line per step
// left half the block unrequested and M = 5 ran at 0.5-0.6x the tiles above).
struct WvPrefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t mask = 0;
  int64_t n = 1;
};

// The first block of a thread has no block before it to prefetch it: its lines are requested
// in address order before it is packed (the pack reads 16 rows side by side, which the
// hardware prefetchers follow poorly: 384 x 1536 from DRAM, one thread, M = 8 took 72 us
// against 46 on the tiles above, which read rows front to back). Tested with
// FASTKERN_INT8_WV_FIRST=0 (read per call) for A/B timing.
inline void wv_prefetch_first(const int8_t* W, int64_t K, int64_t n0, int64_t n1) {
  const char* p = reinterpret_cast<const char*>(W + n0 * K);
  const char* e = reinterpret_cast<const char*>(W + n1 * K);
  for (; p < e; p += 64) _mm_prefetch(p, _MM_HINT_T1);
}

inline bool wv_first_on() {
  const char* e = std::getenv("FASTKERN_INT8_WV_FIRST");
  return !(e && e[0] == '0');
}

struct WvPrefetchPlan {
  const char* p;
  const char* end;
  int64_t share;  // bytes per tile
  int64_t mask;
  int64_t n;  // lines per issue
  // the rows [n1, n2) of W spread over `tiles` tiles of `steps` k steps each
  WvPrefetchPlan(const int8_t* W, int64_t K, int64_t n1, int64_t n2, int64_t tiles, int64_t steps) {
    p = reinterpret_cast<const char*>(W + n1 * K);
    end = reinterpret_cast<const char*>(W + std::max(n1, n2) * K);
    steps = std::max<int64_t>(1, steps);
    const int64_t lines = ((end - p) / 64 + tiles - 1) / std::max<int64_t>(1, tiles);
    n = std::max<int64_t>(1, (lines + steps - 1) / steps);
    const int64_t per = (lines + n - 1) / n;  // issues per tile, <= steps
    int64_t step = 1;
    while (per > 0 && step * 2 * per <= steps) step *= 2;
    mask = step - 1;
    share = per * n * 64;
  }
  WvPrefetch next() {
    WvPrefetch t;
    t.p = p;
    t.end = std::min(end, p + share);
    t.mask = mask;
    t.n = n;
    p = t.end;
    return t;
  }
};

FASTKERN_AVX2 inline __m256 wv_scale8(__m256i c, __m256d sx, const float* ws) {
  const __m256d lo = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(c)), sx),
                                   _mm256_cvtps_pd(_mm_loadu_ps(ws)));
  const __m256d hi = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(c, 1)), sx),
                                   _mm256_cvtps_pd(_mm_loadu_ps(ws + 4)));
  return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

// -------- AVX-512 VNNI: P [k4][16 nv rows] dwords of w + 128 (unsigned), x broadcast signed;
// sum (w + 128) x = sum w x + 128 sum x, so 128 * xsum[m] comes off at the end.

// rows [n0, n0 + 16 nv) (those >= N zero) x bytes [k0, k0 + kc) -> P; zero bytes past K.
FASTKERN_VNNI512 void wv_pack_vnni(const int8_t* W, int64_t N, int64_t K, int64_t n0, int nv, int64_t k0,
                                   int64_t kc, int32_t* P) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int64_t kc4 = (kc + 3) / 4;
  for (int g = 0; g < nv; ++g) {
    for (int64_t c = 0; c < kc; c += 64) {
      const int64_t nb = std::min<int64_t>(64, kc - c);
      const __mmask64 mk = nb == 64 ? ~__mmask64(0) : (__mmask64(1) << nb) - 1;
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + 16 * g + i;
        r[i] = n < N ? _mm512_maskz_loadu_epi8(mk, W + n * K + k0 + c) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      const int64_t t1 = std::min<int64_t>(16, kc4 - c / 4);
      for (int64_t t = 0; t < t1; ++t)
        _mm512_storeu_si512(P + ((c / 4 + t) * nv + g) * 16, _mm512_xor_si512(r[t], flip));
    }
  }
}

// rows [m0, m0 + MR) of x (bytes [k0, k0 + 4 kc4)) x the packed block (NV vectors of 16 rows):
// Cb [MR][64] int32 (+)= the products (first: start at 0). The accumulators go through
// memory once per K block.
template <int MR, int NV>
FASTKERN_VNNI512 void wv_tile_vnni(const int8_t* X, int64_t ldx, const int32_t* P, int64_t kc4, int32_t* Cb,
                                   bool first, WvPrefetch pf) {
  __m512i acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int g = 0; g < NV; ++g) acc[i][g] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(Cb + i * 64 + 16 * g);
  for (int64_t k4 = 0; k4 < kc4; ++k4) {
    if ((k4 & pf.mask) == 0 && pf.p < pf.end) {
      for (int64_t q = 0; q < pf.n; ++q) _mm_prefetch(pf.p + 64 * q, _MM_HINT_T1);
      pf.p += 64 * pf.n;
    }
    __m512i w[NV];
    for (int g = 0; g < NV; ++g) w[g] = _mm512_loadu_si512(P + (k4 * NV + g) * 16);
    // x broadcast into a register (a load): an asm memory operand ({1to16}) would make GCC keep
    // a memory copy of every accumulator up to date, as the asm might read it
    for (int i = 0; i < MR; ++i) {
      int32_t xv;
      std::memcpy(&xv, X + i * ldx + 4 * k4, 4);
      const __m512i b = _mm512_set1_epi32(xv);
      for (int g = 0; g < NV; ++g) acc[i][g] = dpbusd_inplace(acc[i][g], w[g], b);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int g = 0; g < NV; ++g) _mm512_storeu_si512(Cb + i * 64 + 16 * g, acc[i][g]);
}

// Cb [mr][64] (columns n0 .. n0 + 16 nv) minus 128 xc[m] -> o
FASTKERN_VNNI512 void wv_finish_vnni(const int32_t* Cb, int64_t m0, int64_t mr, int nv, const int32_t* xc, int64_t N,
                                     int64_t n0, const WvOut& o) {
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    const __m512i corr = _mm512_set1_epi32(int32_t(128u * uint32_t(xc[m])));
    for (int g = 0; g < nv; ++g) {
      const int64_t n = n0 + 16 * g;
      if (n >= N) break;
      const __mmask16 mk = N - n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n)) - 1u);
      const __m512i c = _mm512_sub_epi32(_mm512_loadu_si512(Cb + i * 64 + 16 * g), corr);
      if (o.f) {
        const __m512d sx = _mm512_set1_pd(double(o.sx[m]));
        const __m512d lo = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(c)), sx),
                                         _mm512_cvtps_pd(_mm256_maskz_loadu_ps(static_cast<__mmask8>(mk), o.ws + n)));
        const __m512d hi = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(c, 1)), sx),
                                         _mm512_cvtps_pd(_mm256_maskz_loadu_ps(static_cast<__mmask8>(mk >> 8), o.ws + n + 8)));
        const __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
        _mm512_mask_storeu_ps(o.f + m * N + n, mk, f);
      } else {
        _mm512_mask_storeu_epi32(o.c + m * N + n, mk, c);
      }
    }
  }
}

template <int NV>
void wv_rows_vnni(const int8_t* X, int64_t ldx, int64_t M, int64_t k0, const int32_t* P, int64_t kc4, int32_t* Cb,
                  bool first, bool last, const int32_t* xc, int64_t N, int64_t n0, const WvOut& o,
                  WvPrefetchPlan& pf) {
  wv_row_chunks(M, [&](int64_t m0, int64_t mr) {
    int32_t* cb = Cb + m0 * 64;
    const int8_t* x = X + m0 * ldx + k0;
#define FASTKERN_WV_TILE(R) wv_tile_vnni<R, NV>(x, ldx, P, kc4, cb, first, pf.next())
    switch (mr) {
      case 1: FASTKERN_WV_TILE(1); break;
      case 2: FASTKERN_WV_TILE(2); break;
      case 3: FASTKERN_WV_TILE(3); break;
      case 4: FASTKERN_WV_TILE(4); break;
      case 5: FASTKERN_WV_TILE(5); break;
      default: FASTKERN_WV_TILE(6); break;
    }
#undef FASTKERN_WV_TILE
    if (last) wv_finish_vnni(cb, m0, mr, NV, xc, N, n0, o);
  });
}

// X [M, K] int8 (row stride ldx >= round_up(K, 4), zero past K), xc[m] = sum_k X[m][k] -> o.
void wv_gemm_vnni(const int8_t* X, int64_t ldx, int64_t M, const int32_t* xc, const int8_t* W, int64_t N, int64_t K,
                  const WvOut& o) {
  const bool first_pf = wv_first_on();
  parallel_rows(N, 16, 1, [&](int64_t r0, int64_t r1) {
    if (first_pf) wv_prefetch_first(W, K, r0, std::min(r1, r0 + kWvRows));
    std::vector<int32_t> buf(kWvRows * kWvKC / 4 + M * 64 + 16);
    int32_t* P = buf.data();
    int32_t* Cb = P + kWvRows * kWvKC / 4;
    const int64_t chunks = (M + kWvMR - 1) / kWvMR, nkb = (K + kWvKC - 1) / kWvKC;
    for (int64_t n0 = r0; n0 < r1; n0 += kWvRows) {
      const int64_t n1 = std::min(r1, n0 + kWvRows);
      const int nv = int((n1 - n0 + 15) / 16);
      WvPrefetchPlan pf(W, K, n1, std::min(r1, n1 + kWvRows), nkb * chunks, std::min(kWvKC, K) / 4);
      for (int64_t k0 = 0; k0 < K; k0 += kWvKC) {
        const int64_t kc = std::min(kWvKC, K - k0), kc4 = (kc + 3) / 4;
        wv_pack_vnni(W, N, K, n0, nv, k0, kc, P);
        const bool first = k0 == 0, last = k0 + kWvKC >= K;
        switch (nv) {
          case 1: wv_rows_vnni<1>(X, ldx, M, k0, P, kc4, Cb, first, last, xc, N, n0, o, pf); break;
          case 2: wv_rows_vnni<2>(X, ldx, M, k0, P, kc4, Cb, first, last, xc, N, n0, o, pf); break;
          case 3: wv_rows_vnni<3>(X, ldx, M, k0, P, kc4, Cb, first, last, xc, N, n0, o, pf); break;
          default: wv_rows_vnni<4>(X, ldx, M, k0, P, kc4, Cb, first, last, xc, N, n0, o, pf); break;
        }
      }
    }
  });
}

// -------- AVX2: vpmaddwd (exact, no correction) on int16 pairs. The weight block is packed
// per group of 4 columns as two vectors of 8 rows: E holds the pairs (w[4j], w[4j + 2]),
// O the pairs (w[4j + 1], w[4j + 3]): a dword transpose of the int8 rows (4 bytes per lane)
// and two shifts, a quarter of the shuffles that widening first and then transposing int16
// pairs takes (at 1536 x 384 that packing cost as much as 6 rows of x). x is reordered to
// match, each group of 4 as (x[4j], x[4j + 2], x[4j + 1], x[4j + 3]), so step 2j of the
// tile broadcasts the pair for E and step 2j + 1 the pair for O.

// rows [n0, n0 + 8 nv) (those >= N zero) x columns [k0, k0 + kc) -> P [2 ceil(kc / 4)][nv][8];
// zero past K.
FASTKERN_AVX2 void wv_pack_avx2(const int8_t* W, int64_t N, int64_t K, int64_t n0, int nv, int64_t k0, int64_t kc,
                                int32_t* P) {
  const int64_t kc4 = (kc + 3) / 4;
  for (int g = 0; g < nv; ++g) {
    for (int64_t c = 0; c < kc; c += 32) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t n = n0 + 8 * g + i;
        if (n >= N) {
          r[i] = _mm256_setzero_si256();
        } else if (kc - c >= 32) {
          r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + n * K + k0 + c));
        } else {
          alignas(32) int8_t tail[32] = {};
          std::memcpy(tail, W + n * K + k0 + c, kc - c);
          r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        }
      }
      __m256i t[8];
      transpose8x8_epi32(r, t);
      const int64_t t1 = std::min<int64_t>(8, kc4 - c / 4);
      for (int64_t j = 0; j < t1; ++j) {
        const int64_t q = 2 * (c / 4 + j);
        // bytes (b0, b1, b2, b3) of a lane -> words (b0, b2) and (b1, b3), sign-extended
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + (q * nv + g) * 8),
                            _mm256_srai_epi16(_mm256_slli_epi16(t[j], 8), 8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + ((q + 1) * nv + g) * 8), _mm256_srai_epi16(t[j], 8));
      }
    }
  }
}

// x [M, K] (int8, or int16 holding int8 values) -> int16 rows [M][ldq] in the order the
// packed weight wants: each group of 4 columns as (x0, x2, x1, x3); zero past K (ldq a
// multiple of 16 >= K).
template <class T>
FASTKERN_AVX2 void wv_x_avx2(const T* X, int64_t ldx, int64_t M, int64_t K, int16_t* Q, int64_t ldq) {
  const __m256i perm = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
                                        0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
  for (int64_t m = 0; m < M; ++m) {
    const T* x = X + m * ldx;
    int16_t* q = Q + m * ldq;
    for (int64_t k = 0; k < ldq; k += 16) {
      __m256i v;
      if (K - k >= 16) {
        if (sizeof(T) == 1)
          v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k)));
        else
          v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      } else {
        alignas(32) int16_t t[16] = {};
        for (int64_t j = 0; j < K - k; ++j) t[j] = int16_t(x[k + j]);
        v = _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_shuffle_epi8(v, perm));
    }
  }
}

// rows [m0, m0 + MR) of x (int16, columns [k0, k0 + 2 kc2)) x NV vectors of 8 rows of the
// packed block starting at vector g0 (of nv): Cb [MR][64] (+)= the products, as in wv_tile_vnni.
template <int MR, int NV>
FASTKERN_AVX2 void wv_tile_avx2(const int16_t* X, int64_t ldx, const int32_t* P, int nv, int g0, int64_t kc2,
                                int32_t* Cb, bool first, WvPrefetch pf) {
  __m256i acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int g = 0; g < NV; ++g)
      acc[i][g] = first ? _mm256_setzero_si256()
                        : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Cb + i * 64 + 8 * (g0 + g)));
  const int32_t* p = P + g0 * 8;
  for (int64_t k2 = 0; k2 < kc2; ++k2) {
    if ((k2 & pf.mask) == 0 && pf.p < pf.end) {
      for (int64_t q = 0; q < pf.n; ++q) _mm_prefetch(pf.p + 64 * q, _MM_HINT_T1);
      pf.p += 64 * pf.n;
    }
    __m256i w[NV];
    for (int g = 0; g < NV; ++g) w[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (k2 * nv + g) * 8));
    for (int i = 0; i < MR; ++i) {
      int32_t xv;
      std::memcpy(&xv, X + i * ldx + 2 * k2, 4);
      const __m256i b = _mm256_set1_epi32(xv);
      for (int g = 0; g < NV; ++g) acc[i][g] = add_inplace(acc[i][g], _mm256_madd_epi16(w[g], b));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int g = 0; g < NV; ++g) _mm256_storeu_si256(reinterpret_cast<__m256i*>(Cb + i * 64 + 8 * (g0 + g)), acc[i][g]);
}

// Cb [mr][64] (columns n0 .. n0 + 8 nv) -> o
FASTKERN_AVX2 void wv_finish_avx2(const int32_t* Cb, int64_t m0, int64_t mr, int nv, int64_t N, int64_t n0,
                                  const WvOut& o) {
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    for (int g = 0; g < nv; ++g) {
      const int64_t n = n0 + 8 * g;
      if (n >= N) break;
      const int64_t nn = std::min<int64_t>(8, N - n);
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Cb + i * 64 + 8 * g));
      if (o.f) {
        const __m256d sx = _mm256_set1_pd(double(o.sx[m]));
        if (nn == 8) {
          _mm256_storeu_ps(o.f + m * N + n, wv_scale8(c, sx, o.ws + n));
        } else {
          alignas(32) float wsb[8] = {}, fb[8];
          std::memcpy(wsb, o.ws + n, nn * sizeof(float));
          _mm256_store_ps(fb, wv_scale8(c, sx, wsb));
          std::memcpy(o.f + m * N + n, fb, nn * sizeof(float));
        }
      } else {
        std::memcpy(o.c + m * N + n, Cb + i * 64 + 8 * g, nn * sizeof(int32_t));
      }
    }
  }
}

template <int NV>
void wv_rows_avx2(const int16_t* X, int64_t ldx, int64_t M, int64_t k0, const int32_t* P, int nv, int g0,
                  int64_t kc2, int32_t* Cb, bool first, WvPrefetchPlan& pf) {
  wv_row_chunks(M, [&](int64_t m0, int64_t mr) {
    int32_t* cb = Cb + m0 * 64;
    const int16_t* x = X + m0 * ldx + k0;
#define FASTKERN_WV_TILE(R) wv_tile_avx2<R, NV>(x, ldx, P, nv, g0, kc2, cb, first, pf.next())
    switch (mr) {
      case 1: FASTKERN_WV_TILE(1); break;
      case 2: FASTKERN_WV_TILE(2); break;
      case 3: FASTKERN_WV_TILE(3); break;
      case 4: FASTKERN_WV_TILE(4); break;
      case 5: FASTKERN_WV_TILE(5); break;
      default: FASTKERN_WV_TILE(6); break;
    }
#undef FASTKERN_WV_TILE
  });
}

// X [M, K]: int16 rows from wv_x_avx2 (row stride ldx) -> o.
void wv_gemm_avx2(const int16_t* X, int64_t ldx, int64_t M, const int8_t* W, int64_t N, int64_t K, const WvOut& o) {
  const bool first_pf = wv_first_on();
  parallel_rows(N, 16, 1, [&](int64_t r0, int64_t r1) {
    if (first_pf) wv_prefetch_first(W, K, r0, std::min(r1, r0 + kWvRows));
    std::vector<int32_t> buf(kWvRows * kWvKC2 / 2 + M * 64 + 8);
    int32_t* P = buf.data();
    int32_t* Cb = P + kWvRows * kWvKC2 / 2;
    const int64_t chunks = (M + kWvMR - 1) / kWvMR, nkb = (K + kWvKC2 - 1) / kWvKC2;
    for (int64_t n0 = r0; n0 < r1; n0 += kWvRows) {
      const int64_t n1 = std::min(r1, n0 + kWvRows);
      const int nv = int((n1 - n0 + 7) / 8);
      WvPrefetchPlan pf(W, K, n1, std::min(r1, n1 + kWvRows), nkb * chunks * ((nv + 1) / 2),
                        2 * ((std::min(kWvKC2, K) + 3) / 4));
      for (int64_t k0 = 0; k0 < K; k0 += kWvKC2) {
        const int64_t kc = std::min(kWvKC2, K - k0), kc2 = 2 * ((kc + 3) / 4);
        wv_pack_avx2(W, N, K, n0, nv, k0, kc, P);
        const bool first = k0 == 0, last = k0 + kWvKC2 >= K;
        int g0 = 0;
        for (; g0 + 2 <= nv; g0 += 2) wv_rows_avx2<2>(X, ldx, M, k0, P, nv, g0, kc2, Cb, first, pf);
        if (g0 < nv) wv_rows_avx2<1>(X, ldx, M, k0, P, nv, g0, kc2, Cb, first, pf);
        if (last) wv_finish_avx2(Cb, 0, M, nv, N, n0, o);
      }
    }
  });
}

// sum_k x[m][k] of int8 rows
FASTKERN_AVX2 void int8_row_sums(const int8_t* X, int64_t ldx, int64_t M, int64_t K, int32_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* x = X + m * ldx;
    __m256i s = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k))),
                                                _mm256_set1_epi16(1)));
    int32_t t = hsum8_i32_avx2(s);
    for (; k < K; ++k) t += x[k];
    out[m] = t;
  }
}
#endif

// ------------------------------------------------------------------ ops

at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "int8_gemm";
  check_dtype(op, "a", a, at::kChar);
  check_dtype(op, "b", b, at::kChar);
  check_2d(op, "b", b);
  const int64_t N = b.size(0), K = b.size(1);
  check_x(op, "a", a, K);
  TORCH_CHECK(K <= kInt8GemmMaxK, "fastkern_C::", op, ": ", describe("b", b), " has K=", K,
              "; the int32 result holds every sum exactly only for K <= ", kInt8GemmMaxK);
  at::Tensor bc = b.contiguous();
  at::Tensor a2 = a.reshape({rows_of(a), K});
  const int64_t M = a2.size(0), Kp = round_up(K, 16);
#if FASTKERN_X86
  if (use_vnni512() && use_wv(true, M, N, K) && N > 0 && K > 0) {
    at::Tensor C = at::empty({M, N}, a.options().dtype(at::kInt));
    at::Tensor A8 = a2;
    if (K % 4 != 0 || !a2.is_contiguous()) {  // the kernel reads whole 4-byte groups of x
      A8 = at::zeros({M, round_up(K, 4)}, a.options());
      A8.narrow(1, 0, K).copy_(a2);
    }
    int32_t xc[64];
    int8_row_sums(A8.data_ptr<int8_t>(), A8.size(1), M, K, xc);
    WvOut o;
    o.c = C.data_ptr<int32_t>();
    wv_gemm_vnni(A8.data_ptr<int8_t>(), A8.size(1), M, xc, bc.data_ptr<int8_t>(), N, K, o);
    return C.reshape(out_shape(a, N));
  }
  if (use_vnni512() && M > 0 && N > 0 && K > 0) {
    at::Tensor C = at::empty({M, N}, a.options().dtype(at::kInt));
    VnniOut o;
    o.c = C.data_ptr<int32_t>();
    at::Tensor A8;
    int64_t lda = K;
    const bool gemv = vnni_gemv(M, N, K);
    if (gemv) {  // the GEMVs read whole 64-byte vectors of x: zero-pad
      lda = round_up(K, 64);
      A8 = at::zeros({M, lda}, a.options());
      A8.narrow(1, 0, K).copy_(a2);
    } else {
      A8 = a2.contiguous();
    }
    // the GEMM's last r rows (vnni_tail_rows) by the GEMV, within the GEMM
    matmul_vnni(A8.data_ptr<int8_t>(), lda, M, bc.data_ptr<int8_t>(), N, K, o, gemv ? 0 : vnni_tail_rows(M, N, K));
    return C.reshape(out_shape(a, N));
  }
  if (use_s16_avx2() && M > 0 && N > 0 && K > 0) {
    at::Tensor C = at::empty({M, N}, a.options().dtype(at::kInt));
    VnniOut o;
    o.c = C.data_ptr<int32_t>();
    const bool wv = use_wv(false, M, N, K);  // never for M <= kGemvMaxM
    const bool gemv = !wv && int8_gemv_takes(M, N, K);
    // the GEMVs on rows [m0, m0 + rows) of a, into C from row m0
    auto gemv_rows = [&](int64_t m0, int64_t rows) {
      const at::Tensor ar = a2.narrow(0, m0, rows);
      if (use_vnni256() || (use_i8s_gemv(rows, K) && !holds_int8_min(ar))) {
        at::Tensor A8 = at::zeros({rows, round_up(K, 32)}, a.options());
        A8.narrow(1, 0, K).copy_(ar);
        gemv_int8_x(A8.data_ptr<int8_t>(), A8.size(1), rows, bc.data_ptr<int8_t>(), N, K, o.from_row(m0, N));
      } else {
        at::Tensor A = at::zeros({rows, Kp}, a.options().dtype(at::kShort));
        A.narrow(1, 0, K).copy_(ar);
        gemv_s16(A.data_ptr<int16_t>(), Kp, rows, bc.data_ptr<int8_t>(), N, K, o.from_row(m0, N));
      }
    };
    if (gemv) {
      gemv_rows(0, M);
    } else if (wv) {
      at::Tensor A8 = a2.contiguous();
      at::Tensor A = at::empty({M, Kp}, a.options().dtype(at::kShort));
      wv_x_avx2(A8.data_ptr<int8_t>(), K, M, K, A.data_ptr<int16_t>(), Kp);
      WvOut wo;
      wo.c = o.c;
      wv_gemm_avx2(A.data_ptr<int16_t>(), A.size(1), M, bc.data_ptr<int8_t>(), N, K, wo);
    } else if (use_vnni256()) {
      at::Tensor A8 = a2.contiguous();
      matmul_vnni256(A8.data_ptr<int8_t>(), K, M, bc.data_ptr<int8_t>(), N, K, o);
    } else {
      // the int16 GEMM, its last M % 16 rows by the GEMV within it where s16_gemv_tail() says
      at::Tensor A8 = a2.contiguous();
      gemm_s16_avx2(A8.data_ptr<int8_t>(), K, M, bc.data_ptr<int8_t>(), N, K, o, s16_gemv_tail(M));
    }
    return C.reshape(out_shape(a, N));
  }
#endif
  at::Tensor A = at::zeros({M, Kp}, a.options().dtype(at::kShort));
  if (M > 0 && K > 0) A.narrow(1, 0, K).copy_(a2);
  at::Tensor C = at::empty({M, N}, a.options().dtype(at::kInt));
  int_matmul(A.data_ptr<int16_t>(), Kp, M, bc.data_ptr<int8_t>(), N, K, C.data_ptr<int32_t>());
  return C.reshape(out_shape(a, N));
}

void check_w8(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
              const c10::optional<at::Tensor>& bias) {
  check_float(op, "x", x);
  check_dtype(op, "w", w, at::kChar);
  check_2d(op, "w", w);
  check_x(op, "x", x, w.size(1));
  check_float(op, "w_scale", w_scale);
  check_vec(op, "w_scale", w_scale, w.size(0));
  check_bias(op, bias, w.size(0));
}

// ------------------------------------------------------------------ W8A16 GEMM, AVX2 (fp32 FMA)
//
// Above the GEMV's rows (kW8a16GemvMaxMAvx2), without AVX-512: the fp32 GEMM drivers
// (skinny_gemm up to its M, blocked_gemm above) around the AVX2 6 x 16 micro-kernel, their
// B slivers filled straight from the int8 rows: float(w) * s per element, the reference's
// dequantization, converted and scaled 8 rows x 8 k at a time and transposed in registers
// into the packed layout (no dequantized panel in memory). FASTKERN_W8A16_AVX2=panel (read
// on every call) runs the previous dequantized-panel dot tiles instead.

bool w8a16_avx2_panel() {
  const char* e = std::getenv("FASTKERN_W8A16_AVX2");
  return e && std::string(e) == "panel";
}

// the largest M the W8A16 GEMV takes on the AVX2 path (avx2: use_avx2(), not the panel path)
int64_t w8a16_gemv_max_m(bool avx2) {
  if (!avx2) return kW8a16GemvMaxM;
  const char* e = std::getenv("FASTKERN_W8A16_GEMV_MAX_M");
  return e && *e ? std::max<int64_t>(kGemvMaxM, std::atoll(e)) : kW8a16GemvMaxMAvx2;
}

#if FASTKERN_X86
// dst[k * width + r] = float(W[row0 + r][k0 + k]) * s[row0 + r] for k < kc (0 for rows <= r < width).
FASTKERN_AVX2 void w8_pack_sliver_avx2(const int8_t* W, int64_t K, const float* s, int64_t row0, int rows,
                                       int64_t k0, int64_t kc, int width, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    const int8_t* wb = W + row0 * K + k0 + k;
    gemm::pack_k8_avx2(rows, width, dst + k * width, [&](int r) FASTKERN_AVX2 {
      int64_t b;
      std::memcpy(&b, wb + r * K, 8);
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(b))),
                           _mm256_broadcast_ss(s + row0 + r));
    });
  }
  for (; k < kc; ++k)
    for (int r = 0; r < width; ++r)
      dst[k * width + r] = r < rows ? float(W[(row0 + r) * K + k0 + k]) * s[row0 + r] : 0.f;
}

struct W8Packer {
  const int8_t* w;
  const float* s;
  int64_t K;
  void operator()(int64_t row0, int rows, int64_t k0, int64_t kc, int width, float* dst) const {
    w8_pack_sliver_avx2(w, K, s, row0, rows, k0, kc, width, dst);
  }
  // the bytes of rows [row0, row0 + rows), k in [k0, k0 + kc) (skinny_gemm)
  void prefetch(int64_t row0, int rows, int64_t k0, int64_t kc) const {
    gemm::prefetch_rows(w + row0 * K, K, rows, k0, kc);
  }
};

// FASTKERN_W8A16_STREAM=0: the AVX2 W8A16 GEMV at M <= kW8fStreamMaxM runs the 4-row tiles
// instead of gemv_w8f_stream_avx2 (A/B timing, tests; read on every call)
bool w8f_stream_enabled() {
  const char* e = std::getenv("FASTKERN_W8A16_STREAM");
  return !(e && e[0] == '0');
}

// The largest M the AVX-512 GEMV tiles serve (gemv_w8f_tile_avx512), above it the GEMMs.
// Measured (2 threads, 11008 x 4096, weights beyond L3, one process, alternating; ms, tiles
// vs before): fp32 x M = 4 / 6 / 8 / 12 / 16 / 24: 1.65 / 1.83 / 2.17 / 2.81 / 4.12 / 6.13
// against 1.93 / 2.65 / 3.03 / 4.10 / 5.33 / 7.55 (the 3-row GEMV to 12, the fp32 GEMM from
// 13), M = 32: 8.2 against the GEMM's 7.6; bf16 x, where AVX512-BF16 runs the vdpbf16ps GEMM
// from M = 9: M = 8 / 9 / 12 2.7 / 3.3 / 4.0 against 3.8 / 4.8 / 5.0, M = 16 6.0 against 5.2.
// On 2 Zen 4 cores (32 KiB L1d) the tiles beat the fp32 GEMM up to M = 32 (4096 x 4096 / 11008 x
// 4096, one process, 5 alternating rounds, median ms, GEMM / tiles: M = 25 6.02 / 4.55, 17.05 /
// 11.46; M = 28 6.27 / 4.85, 16.74 / 13.93; M = 32 6.37 / 5.71, 16.20 / 15.06), so there, under a
// 48 KiB L1d, they serve fp32 x to kW8fTileMaxMSmallL1.
// FASTKERN_W8A16_TILE_MAX_M overrides both (0: off), read on every call (A/B timing, tests).
constexpr int64_t kW8fTileMaxM = 24;
constexpr int64_t kW8fTileMaxMSmallL1 = 32;
constexpr int64_t kW8fTileMaxMBf16 = 12;
int64_t w8f_tile_max_m(bool bf16_gemm) {
  const char* e = std::getenv("FASTKERN_W8A16_TILE_MAX_M");
  if (e && *e) return std::atoll(e);
  if (bf16_gemm) return kW8fTileMaxMBf16;
  return small_l1d() ? kW8fTileMaxMSmallL1 : kW8fTileMaxM;
}

// Above the tiles, M = 16 j + r: the GEMMs (16-row vectors) take the first 16 j rows and a call
// of their own (the tiles or the GEMV) the last r, r <= kW8fTailRows (fp32 GEMM) /
// kW8bTailRows (bf16 GEMM), from 1M weight elements. Measured (2 threads, weights beyond L3,
// one process, 5 alternating rounds, median ms, one call / split): fp32 x 4096 x 4096 M = 33
// 8.56 / 6.29, 36 8.72 / 6.91, 41 9.33 / 7.80, 43 9.00 / 7.66, 45 7.97 / 7.85, 47 9.45 / 8.22,
// 49 11.73 / 9.69, 56 12.06 / 10.97; 11008 x 4096 M = 33 21.65 / 17.27, 43 21.98 / 20.84, 45
// 21.45 / 22.36, 47 22.04 / 22.73, 49 28.11 / 23.04; bf16 x 4096 x 4096 M = 17 3.33 / 2.62, 18
// 3.32 / 2.83, 20 3.32 / 3.10, 33 4.58 / 3.84; 11008 x 4096 M = 17 8.57 / 7.01, 20 8.73 / 8.70,
// 33 11.68 / 9.95; a second run (4096 x 4096, 11008 x 4096, 4096 x 11008): M = 18 1.00-1.06x
// faster, M = 20 0.92-1.04x, so bf16 to 2 rows (where the bf16 GEMM cannot take them within
// itself: w8a16_bf16_tail_rows). FASTKERN_W8A16_GEMV_TAIL (rows, 0: off; read per call) sets
// the rows for any size.
constexpr int64_t kW8fTailRows = 11;
constexpr int64_t kW8bTailRows = 2;
constexpr int64_t kW8TailMinElems = int64_t(1) << 20;
int64_t w8a16_tail_rows(int64_t M, int64_t N, int64_t K, bool bf16_gemm) {
  return tiles::gemv_tail_rows(M, "FASTKERN_W8A16_GEMV_TAIL", bf16_gemm ? kW8bTailRows : kW8fTailRows,
                               N * K >= kW8TailMinElems);
}

// The bf16 GEMM runs the last r rows within itself (tiles::bf16_tail_block) where K is a
// multiple of 32: r <= kW8bFusedRows (kW8bFusedRowsSmallK below K = 4096), any size;
// FASTKERN_W8A16_BF16_TAIL (rows up to tiles::kBf16TailCap, 0: off, read per call)
// overrides. Elsewhere w8a16_tail_rows splits. Measured (Zen 4, 2 threads, one process, 7
// alternating rounds, median ms, within / split (r <= 2 a call of its own) / the GEMM on all
// rows): 4096 x 4096 M = 17 2.42 / 2.72 / 3.27, 20 2.61 / 3.25 / 3.25, 24 2.94 / 3.23 / 3.24,
// 26 3.06 / 3.20 / 3.19, 27 3.13 / 3.18 / 3.19, 28 3.36 / 3.22 / 3.23, 33 3.35 / 3.57 / 4.34;
// 11008 x 4096 M = 20 6.89 / 8.51 / 8.48, 26 8.10 / 8.34 / 8.39, 28 8.78 / 8.56 / 8.49; 4096 x
// 11008 M = 20 6.64 / 8.37 / 8.35, 26 7.94 / 8.44 / 8.37; small K, 4096 x 512 M = 24 0.399 /
// 0.424, 26 0.431 / 0.425; 1536 x 384 M = 24 0.136 / 0.140, 26 0.147 / 0.140; 2048 x 2048 M = 26
// 0.830 / 0.820.
constexpr int64_t kW8bFusedRows = 10;
constexpr int64_t kW8bFusedRowsSmallK = 8;
int64_t w8a16_bf16_tail_rows(int64_t M, int64_t K) {
  return tiles::bf16_tail_rows(M, K, "FASTKERN_W8A16_BF16_TAIL", K >= 4096 ? kW8bFusedRows : kW8bFusedRowsSmallK);
}

// Y [M, N] = X [M, K] (fp32, row stride ldx) x (float(W) * s)^T, plus bias (fp32 [N] or null)
// where it returns true (the blocked GEMM adds it)
bool w8a16_gemm_avx2(const float* X, int64_t ldx, int64_t M, const int8_t* W, const float* s, int64_t N, int64_t K,
                     float* Y, const float* bias) {
  const Isa isa = active_isa();
  const gemm::StridedRows<float> pa{X, ldx, 1, isa};
  const W8Packer pb{W, s, K};
  if (M <= gemm::skinny_max_m()) {
    gemm::skinny_gemm(M, N, K, gemm::micro_kernel(isa), pa, pb, Y, N);
    return false;
  }
  gemm::blocked_gemm(M, N, K, gemm::micro_kernel(isa), pa, pb, Y, N, bias);
  return true;
}
#endif

at::Tensor linear_w8a16_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                            const c10::optional<at::Tensor>& bias) {
  check_w8("linear_w8a16", x, w, w_scale, bias);
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor wc = w.contiguous();
  at::Tensor ws = w_scale.to(at::kFloat).contiguous();
  const bool avx2 = use_avx2();
  // |x| > kW8MaxX (or NaN / inf): the paths that dequantize the weight first (the GEMMs'
  // fp32 panels and slivers); the GEMVs, tiles and the bf16 GEMM scale finished sums
  const bool huge = holds_beyond(x, kW8MaxX);
  bool tiles = false;  // the AVX-512 GEMV tiles (before either GEMM)
  (void)tiles;
#if FASTKERN_X86
  {
    const int64_t M = rows_of(x);
    tiles = !huge && active_isa() >= Isa::Avx512 && M >= kW8fTileMinM &&
            M <= w8f_tile_max_m(x.scalar_type() == at::kBFloat16 && features().avx512bf16);
    if (!tiles && !huge && M >= w8a16_gemm_min_m(true) && N > 0 && K > 0 && x.scalar_type() == at::kBFloat16 &&
        active_isa() >= Isa::Avx512 && features().avx512bf16) {
      at::Tensor xb = x.reshape({M, K}).contiguous();
      // the bf16 result written by the GEMM, bias included (no fp32 copy to convert)
      at::Tensor Y = at::empty({M, N}, x.options());
      const at::Tensor bf = bias_f32(bias);
      const int64_t within = w8a16_bf16_tail_rows(M, K);
      const int64_t r = within > 0 ? 0 : w8a16_tail_rows(M, N, K, true);
      w8a16_gemm_bf16(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), K, M - r, wc.data_ptr<int8_t>(),
                      ws.data_ptr<float>(), data_or_null(bf), N, K,
                      reinterpret_cast<uint16_t*>(Y.data_ptr<at::BFloat16>()), within);
      if (r > 0) Y.narrow(0, M - r, r).copy_(linear_w8a16_cpu(xb.narrow(0, M - r, r), w, w_scale, bias));
      return Y.reshape(out_shape(x, N));
    }
  }
#endif
  at::Tensor X = x_f32_padded(x, K, round_up(K, 8));
  const int64_t Mx = X.size(0), ldx = X.size(1);
  at::Tensor Y = at::zeros({Mx, N}, X.options());
  const float* xp = X.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = ws.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  // y = s * (x . w): the GEMVs scale each finished dot product
  const auto scale_rows = [&](int64_t n0, int64_t n1) {
    for (int64_t i = 0; i < Mx; ++i)
      for (int64_t n = n0; n < n1; ++n) yp[i * N + n] *= sp[n];
  };
  if (Mx > 0 && N > 0 && K > 0) {
#if FASTKERN_X86
    const bool avx512 = active_isa() >= Isa::Avx512;
    // M <= kW8LimbMaxM (AVX-512) / kW8LimbMaxMAvx2: the int16 limbs of x (gemv_w8l: W8lAvx2, or
    // W8lVnni512 with AVX512-VNNI), where every block of every row allows them
    at::Tensor lb;
    W8Limbs limbs{};
    const W8Limbs* lp = nullptr;  // &limbs where they hold
    if (!huge && Mx <= (avx512 ? kW8LimbMaxM : kW8LimbMaxMAvx2) && w8_limbs_enabled() &&
        (avx512 ? use_vnni512() : avx2 && w8f_stream_enabled())) {
      // per row a1, a2, then the rows' block scales, in one buffer (2 K16 int16 per row keep
      // the scales 4-byte aligned)
      const int64_t K16 = round_up(K, 16), nb = gemm::div_up(K, kW8LimbBlock);
      lb = at::empty({Mx * (2 * K16 + 2 * nb)}, X.options().dtype(at::kShort));
      int16_t* a = lb.data_ptr<int16_t>();
      float* sb = reinterpret_cast<float*>(a + Mx * 2 * K16);
      limbs = W8Limbs{a, a + K16, sb, 2 * K16, nb};
      bool hold = true;
      for (int64_t i = 0; i < Mx && hold; ++i)
        hold = w8_limbs_avx2(xp + i * ldx, K, a + i * 2 * K16, a + i * 2 * K16 + K16, sb + i * nb);
      if (hold) lp = &limbs;
    }
    if (lp) {
      parallel_row_blocks(N, avx512 ? 16 : kGemvRows, avx512 ? 8 : 16, K, 1, [&](int64_t n0, int64_t n1) {
        if (!avx512)
          (Mx == 1 ? gemv_w8l<W8lAvx2, 1> : gemv_w8l<W8lAvx2, 2>)(*lp, wp, K, yp, N, n0, n1);
        else
          (Mx == 1   ? gemv_w8l<W8lVnni512, 1>
           : Mx == 2 ? gemv_w8l<W8lVnni512, 2>
                     : gemv_w8l<W8lVnni512, 3>)(*lp, wp, K, yp, N, n0, n1);
        scale_rows(n0, n1);
      });
      return finish(Y, bias, x, N);
    }
    if (tiles) {
      parallel_row_blocks(N, 16, 8, K, (Mx + kW8fTileRows - 1) / kW8fTileRows, [&](int64_t n0, int64_t n1) {
        for_each_pass(Mx, kW8fTileRows, [&](int64_t m0, int64_t mr) {
          gemv_w8f_pass_avx512(mr, xp + m0 * ldx, ldx, wp, K, yp + m0 * N, N, n0, n1);
        });
        scale_rows(n0, n1);
      });
      return finish(Y, bias, x, N);
    }
    if (Mx >= w8a16_gemm_min_m(false) && active_isa() >= Isa::Avx512) {
      const int64_t r = w8a16_tail_rows(Mx, N, K, false);
      w8a16_gemm_avx512(xp, ldx, Mx - r, wp, sp, N, K, yp);
      at::Tensor out = finish(Y, bias, x, N);
      // the last r rows as a call of their own (their rows of Y stayed zero: overwritten)
      if (r > 0)
        out.view({Mx, N}).narrow(0, Mx - r, r).copy_(
            linear_w8a16_cpu(x.reshape({Mx, K}).narrow(0, Mx - r, r), w, w_scale, bias));
      return out;
    }
#endif
    const bool avx2_fma = avx2 && !w8a16_avx2_panel();
    const int64_t gemv_max_m = huge ? 0 : w8a16_gemv_max_m(avx2_fma);
#if FASTKERN_X86
    if (Mx > gemv_max_m && avx2_fma) {
      const at::Tensor bf = bias_f32(bias);
      const bool added = w8a16_gemm_avx2(xp, ldx, Mx, wp, sp, N, K, yp, data_or_null(bf));
      return finish(Y, added ? c10::nullopt : bias, x, N);
    }
#endif
    if (Mx <= gemv_max_m) {
      // Beyond kGemvMaxM rows the GEMV passes over the weight once per group of kGemvMaxM
      // rows of x (up to 4 on AVX2, below), in row blocks (parallel_row_blocks): measured at 4096x4096 (2 threads),
      // M=4..16 took 1.6-2.9x longer on the dequantized-panel path, which converts every
      // weight to fp32 in memory.
      const int64_t passes = (Mx + kGemvMaxM - 1) / kGemvMaxM;
#if FASTKERN_X86
      if (avx512) {
        parallel_row_blocks(N, 16, 8, K, passes, [&](int64_t n0, int64_t n1) {
          for (int64_t m0 = 0; m0 < Mx; m0 += kGemvMaxM) {
            const float* xm = xp + m0 * ldx;
            float* ym = yp + m0 * N;
            if (K > kW8fBlockK) {
              switch (std::min(kGemvMaxM, Mx - m0)) {
                case 1: gemv_w8f_avx512_kblocked<1>(xm, ldx, wp, K, ym, N, n0, n1); break;
                case 2: gemv_w8f_avx512_kblocked<2>(xm, ldx, wp, K, ym, N, n0, n1); break;
                default: gemv_w8f_avx512_kblocked<3>(xm, ldx, wp, K, ym, N, n0, n1); break;
              }
              continue;
            }
            switch (std::min(kGemvMaxM, Mx - m0)) {
              case 1: gemv_w8f_avx512<1>(xm, ldx, wp, K, ym, N, n0, n1); break;
              case 2: gemv_w8f_avx512<2>(xm, ldx, wp, K, ym, N, n0, n1); break;
              default: gemv_w8f_avx512<3>(xm, ldx, wp, K, ym, N, n0, n1); break;
            }
          }
          scale_rows(n0, n1);
        });
        return finish(Y, bias, x, N);
      }
#endif
      // AVX2: passes of up to 4 rows of x, spread evenly (4 x 3 tiles: 0.87-0.97x the time of
      // 3-row passes of 3 x 4 tiles at M = 4..32, Zen 4; a register-only loop 1.76 against 1.59
      // FMAs per cycle, and M = 16 takes 4 passes instead of 6)
      parallel_row_blocks(N, kGemvRows, 16, K, avx2 ? (Mx + 3) / 4 : passes, [&](int64_t n0, int64_t n1) {
        // rows [m0, m0 + mr) of x (mr <= 4 on AVX2, <= kGemvMaxM otherwise) against [n0, n1)
        auto pass = [&](int64_t m0, int64_t mr) {
          const float* xm = xp + m0 * ldx;
          float* ym = yp + m0 * N;
          switch (mr) {
            case 1: gemv_w8f_rows<1>(avx2, xm, ldx, wp, K, ym, N, n0, n1); break;
            case 2: gemv_w8f_rows<2>(avx2, xm, ldx, wp, K, ym, N, n0, n1); break;
            case 3: gemv_w8f_rows<3>(avx2, xm, ldx, wp, K, ym, N, n0, n1); break;
            default: gemv_w8f_rows<4>(avx2, xm, ldx, wp, K, ym, N, n0, n1); break;
          }
        };
#if FASTKERN_X86
        if (avx2 && Mx <= kW8fStreamMaxM && w8f_stream_enabled()) {
          if (Mx == 1)
            gemv_w8f_stream_avx2<1>(xp, ldx, wp, K, yp, N, n0, n1);
          else
            gemv_w8f_stream_avx2<2>(xp, ldx, wp, K, yp, N, n0, n1);
        } else if (avx2) {
          for_each_pass(Mx, 4, pass);
        } else
#endif
          for (int64_t m0 = 0; m0 < Mx; m0 += kGemvMaxM) pass(m0, std::min(kGemvMaxM, Mx - m0));
        scale_rows(n0, n1);
      });
    } else {
      // Panels dequantized exactly as the reference does (float(w) * s), then fp32 dot tiles.
      parallel_rows(N, kPanelRows, 1, [&](int64_t nb0, int64_t nb1) {
        std::vector<float> panel(kPanelRows * kPanelKF32);
        for (int64_t n0 = nb0; n0 < nb1; n0 += kPanelRows) {
          const int64_t nb = std::min(kPanelRows, nb1 - n0);
          for (int64_t k0 = 0; k0 < K; k0 += kPanelKF32) {
            const int64_t kk = std::min(kPanelKF32, K - k0);
            const int64_t kkp = round_up(kk, 8);
            for (int64_t r = 0; r < nb; ++r) {
              const int8_t* src = wp + (n0 + r) * K + k0;
              const float s = sp[n0 + r];
              float* dst = panel.data() + r * kkp;
              for (int64_t k = 0; k < kk; ++k) dst[k] = float(src[k]) * s;
              for (int64_t k = kk; k < kkp; ++k) dst[k] = 0.f;
            }
            if (avx2)
              dot_block_f32<true>(xp + k0, ldx, Mx, panel.data(), kkp, nb, yp + n0, N, kkp, k0 > 0);
            else
              dot_block_f32<false>(xp + k0, ldx, Mx, panel.data(), kkp, nb, yp + n0, N, kkp, k0 > 0);
          }
        }
      });
    }
  }
  return finish(Y, bias, x, N);
}

// Per-token symmetric int8 quantization, bit-identical to
// fastkern.formats.quantize_per_token: s = absmax / 127 (fp32),
// q = round_half_even(x / s) clamped to +-127; zero rows give s = 0, q = 0; rows
// holding NaN/inf give q = 0, s = NaN. q is written as int16 (zero-padded).
void quantize_rows_generic(const float* X, int64_t ldx, int64_t M, int64_t K, int16_t* Q, int64_t ldq, float* S) {
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      float a = std::fabs(x[k]);
      if (!(a <= std::numeric_limits<float>::max())) finite = false;
      amax = a > amax ? a : amax;
    }
    int16_t* q = Q + m * ldq;
    if (!finite) {
      S[m] = std::numeric_limits<float>::quiet_NaN();
      std::fill(q, q + K, int16_t(0));
      continue;
    }
    const float s = amax / 127.0f;
    S[m] = s;
    const float safe = s > 0.f ? s : 1.f;
    for (int64_t k = 0; k < K; ++k) {
      float v = std::nearbyint(x[k] / safe);
      v = std::min(127.f, std::max(-127.f, v));
      q[k] = int16_t(v);
    }
  }
}

#if FASTKERN_X86
// Q is int16_t (rows zero-padded to a multiple of 16 by the caller) or int8_t (written up
// to ldq: zeros after K).
template <class Q_t>
FASTKERN_AVX2 void quantize_rows_avx2(const float* X, int64_t ldx, int64_t M, int64_t K, Q_t* Q, int64_t ldq,
                                      float* S) {
  // X is zero-padded to a multiple of 8 columns (ldx).
  const int64_t K8 = round_up(K, 8);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    float a;
    const bool bad = !row_absmax_avx2(x, K8, &a);
    Q_t* q = Q + m * ldq;
    if (sizeof(Q_t) == 1) std::fill(q + K8, q + ldq, Q_t(0));
    if (bad) {
      S[m] = std::numeric_limits<float>::quiet_NaN();
      std::fill(q, q + K8, Q_t(0));
      continue;
    }
    const float s = a / 127.0f;
    S[m] = s;
    const __m256 vs = _mm256_set1_ps(s > 0.f ? s : 1.f);
    for (int64_t k = 0; k < K8; k += 8) {
      __m256i i32 = quantize8_avx2(_mm256_loadu_ps(x + k), vs);
      __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      if (sizeof(Q_t) == 1)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
      else
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), i16);
    }
  }
}

// linear_w8a8's quantization (quantize_rows_avx2's operations: the same values and scales)
// written straight into a GEMM's packed layout, with no int8 rows between them: 8 rows at a
// time (their absmax first), 8 packed words of KW k each per row quantized into one vector,
// the 8 vectors transposed in registers into 8 k-word stores of the row block (BW rows wide;
// rows up to round_up(M, MR)). `words` turns a row's KW vectors of 8 quantized int32 into
// its 8 words; rows past M and rows holding NaN / inf get `dead`. X rows hold ldx floats (a
// multiple of 16, zero past K).
template <int KW, int BW, int MR, class Words>
FASTKERN_AVX2 void quantize_pack8_avx2(const float* X, int64_t ldx, int64_t M, int64_t K, int32_t* ap, float* S,
                                       __m256i dead, const Words& words) {
  const int64_t KQ = (K + KW - 1) / KW, Mp = round_up(M, MR);
  TORCH_INTERNAL_ASSERT(ldx % 16 == 0 && ldx >= KW * KQ, "quantize_pack8_avx2: row stride ", ldx, " for K=", K);
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
  at::parallel_for(0, Mp / 8, grain, [&](int64_t g0, int64_t g1) FASTKERN_AVX2 {
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t m0 = gi * 8, blk = m0 / BW * BW, w = std::min<int64_t>(BW, Mp - blk);
      int32_t* dst = ap + blk * KQ + (m0 - blk);
      float safe[8];
      bool live[8];
      row_scales_avx2(X, ldx, M, m0, 8, S, safe, live);
      for (int64_t c0 = 0; c0 < KQ; c0 += 8) {
        __m256i q[8], t[8];
        for (int r = 0; r < 8; ++r) {
          if (!live[r]) {
            q[r] = dead;
            continue;
          }
          const float* x = X + (m0 + r) * ldx + KW * c0;
          const __m256 vs = _mm256_set1_ps(safe[r]);
          __m256i v[KW];
          for (int j = 0; j < KW; ++j)  // columns past ldx (a last block's) are zero
            v[j] = KW * c0 + 8 * j < ldx ? quantize8_avx2(_mm256_loadu_ps(x + 8 * j), vs) : _mm256_setzero_si256();
          q[r] = words(v);
        }
        transpose8x8_epi32(q, t);
        const int64_t n = std::min<int64_t>(8, KQ - c0);
        for (int64_t j = 0; j < n; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c0 + j) * w), t[j]);
      }
    }
  });
}

// Into pack_x_s16's layout (int16 pairs, 16-row blocks) for gemm_s16_packed.
FASTKERN_AVX2 void quantize_pack_s16(const float* X, int64_t ldx, int64_t M, int64_t K, int32_t* ap, float* S) {
  quantize_pack8_avx2<2, 16, 8>(X, ldx, M, K, ap, S, _mm256_setzero_si256(), [](const __m256i* v) FASTKERN_AVX2 {
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xD8);  // 16 int16 in k order
  });
}

// Into pack_x_vnni's layout (x + 128 bytes, 64-row blocks) for gemm_vnni256_packed (avx2vnni).
FASTKERN_AVX2 void quantize_pack_vnni256(const float* X, int64_t ldx, int64_t M, int64_t K, int32_t* ap, float* S) {
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  quantize_pack8_avx2<4, 64, 16>(X, ldx, M, K, ap, S, flip, [flip](const __m256i* v) FASTKERN_AVX2 {
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    return _mm256_xor_si256(_mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), flip);
  });
}
#endif

at::Tensor linear_w8a8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& bias) {
  const char* op = "linear_w8a8";
  check_w8(op, x, w, w_scale, bias);
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K <= kW8A8MaxK, "fastkern_C::", op, ": ", describe("w", w), " has K=", K,
              " input features; the exact int32 accumulation supports K <= ", kW8A8MaxK);
  at::Tensor wc = w.contiguous();
  const int64_t Kp = round_up(K, 16);
  at::Tensor X = x_f32_padded(x, K, Kp);
  const int64_t M = X.size(0);
#if FASTKERN_X86
  if (use_vnni512() && M > 0 && N > 0 && K > 0) {
    Scratch ss(ScratchSlot::Scale, size_t(M) * 4);
    float* sx = ss.as<float>();
    at::Tensor out = at::empty({M, N}, X.options());
    if (!use_wv(true, M, N, K) && !vnni_gemv(M, N, K)) {
      // the GEMM: x quantized straight into its packed layout; the epilogue applies the scales
      // and adds the bias (a separate pass over a large output cost up to ~14%: 4096 x 1536 x
      // 384, 2 threads)
      // the last r rows (vnni_tail_rows) by the GEMV within the GEMM, quantized as the GEMV
      // paths quantize
      const int64_t r = vnni_tail_rows(M, N, K), mh = M - r;
      Scratch aps(ScratchSlot::XPack, size_t(round_up(mh, 16) * ((K + 3) / 4)) * 4);
      quantize_pack_vnni(X.data_ptr<float>(), Kp, mh, K, aps.as<int32_t>(), sx);
      const at::Tensor wsd = w_scale.to(at::kDouble).contiguous();
      VnniOut o = VnniOut::scaled(out, sx, wsd);
      const at::Tensor bf = o.take_bias(bias);
      VnniTail t;
      const int64_t Kq = round_up(K, 64);
      Scratch q8s(ScratchSlot::XQuant, size_t(r * Kq));
      Scratch xts(ScratchSlot::Out, size_t(r * Kq));
      if (r > 0) {
        quantize_rows_avx2<int8_t>(X.data_ptr<float>() + mh * Kp, Kp, r, K, q8s.as<int8_t>(), Kq, sx + mh);
        pack_vnni_tail(q8s.as<int8_t>(), Kq, r, K, xts.as<int8_t>(), o.from_row(mh, N), t);
      }
      gemm_vnni_packed(aps.as<int32_t>(), mh, wc.data_ptr<int8_t>(), N, K, o, r > 0 ? &t : nullptr);
      return finish(out, c10::nullopt, x, N);
    }
    // the GEMVs and the small-layer kernels: int8 rows (zero-padded to 64 columns), the scales
    // applied as they write the output, the bias by finish()
    const int64_t Kq = round_up(K, 64);
    Scratch q8s(ScratchSlot::XQuant, size_t(M * Kq));
    int8_t* q8 = q8s.as<int8_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
      quantize_rows_avx2<int8_t>(X.data_ptr<float>() + m0 * Kp, Kp, m1 - m0, K, q8 + m0 * Kq, Kq, sx + m0);
    });
    if (use_wv(true, M, N, K)) {
      at::Tensor wsf = w_scale.to(at::kFloat).contiguous();
      int32_t xc[64];
      int8_row_sums(q8, Kq, M, K, xc);
      WvOut wo;
      wo.f = out.data_ptr<float>();
      wo.sx = sx;
      wo.ws = wsf.data_ptr<float>();
      wv_gemm_vnni(q8, Kq, M, xc, wc.data_ptr<int8_t>(), N, K, wo);
      return finish(out, bias, x, N);
    }
    const at::Tensor wsd = w_scale.to(at::kDouble).contiguous();
    matmul_vnni(q8, Kq, M, wc.data_ptr<int8_t>(), N, K, VnniOut::scaled(out, sx, wsd));
    return finish(out, bias, x, N);
  }
  if (use_s16_avx2() && M > 0 && N > 0 && K > 0) {
    // the AVX2 kernels apply the scales as they write the output
    at::Tensor S = at::empty({M}, X.options());
    at::Tensor out = at::empty({M, N}, X.options());
    const at::Tensor wsd = w_scale.to(at::kDouble).contiguous();
    VnniOut o = VnniOut::scaled(out, S.data_ptr<float>(), wsd);
    const bool wv = use_wv(false, M, N, K);  // never for M <= kGemvMaxM
    const bool gemv = !wv && int8_gemv_takes(M, N, K);
    // the GEMVs on rows [m0, m0 + rows) of x, into out from row m0 (the bias left to the op)
    auto gemv_rows = [&](int64_t m0, int64_t rows) {
      const VnniOut om = o.from_row(m0, N);
      const float* xr = X.data_ptr<float>() + m0 * Kp;
      float* sr = S.data_ptr<float>() + m0;
      if (use_vnni256() || use_i8s_gemv(rows, K)) {
        const int64_t Kq = round_up(K, 32);
        at::Tensor Q8 = at::zeros({rows, Kq}, X.options().dtype(at::kChar));
        quantize_rows_avx2<int8_t>(xr, Kp, rows, K, Q8.data_ptr<int8_t>(), Kq, sr);
        gemv_int8_x(Q8.data_ptr<int8_t>(), Kq, rows, wc.data_ptr<int8_t>(), N, K, om);
      } else {
        at::Tensor Q = at::zeros({rows, Kp}, X.options().dtype(at::kShort));
        quantize_rows_avx2<int16_t>(xr, Kp, rows, K, Q.data_ptr<int16_t>(), Kp, sr);
        gemv_s16(Q.data_ptr<int16_t>(), Kp, rows, wc.data_ptr<int8_t>(), N, K, om);
      }
    };
    if (gemv) {
      gemv_rows(0, M);
    } else if (wv) {
      at::Tensor Q = at::zeros({M, Kp}, X.options().dtype(at::kShort));
      quantize_rows_avx2<int16_t>(X.data_ptr<float>(), Kp, M, K, Q.data_ptr<int16_t>(), Kp, S.data_ptr<float>());
      wv_x_avx2(Q.data_ptr<int16_t>(), Kp, M, Kp, Q.data_ptr<int16_t>(), Kp);  // in place: 16 columns at a time
      at::Tensor wsf = w_scale.to(at::kFloat).contiguous();
      WvOut wo;
      wo.f = o.f;
      wo.sx = o.sx;
      wo.ws = wsf.data_ptr<float>();
      wv_gemm_avx2(Q.data_ptr<int16_t>(), Kp, M, wc.data_ptr<int8_t>(), N, K, wo);
    } else if (use_vnni256()) {
      // x quantized straight into the VNNI GEMM's packed layout; the bias in its epilogue
      Scratch aps(ScratchSlot::XPack, size_t(round_up(M, 16) * ((K + 3) / 4)) * 4);
      quantize_pack_vnni256(X.data_ptr<float>(), Kp, M, K, aps.as<int32_t>(), S.data_ptr<float>());
      const at::Tensor bf = o.take_bias(bias);
      gemm_vnni256_packed(aps.as<int32_t>(), M, wc.data_ptr<int8_t>(), N, K, o);
      return finish(out, c10::nullopt, x, N);
    } else {
      // x quantized straight into the int16 GEMM's packed layout; the GEMM adds the bias in
      // its epilogue, as the AVX-512 one does; the last M % 16 rows by the GEMV within the GEMM
      // where s16_gemv_tail() says, quantized as the GEMV paths quantize
      const int64_t tail = s16_gemv_tail(M), Mg = M - tail;
      Scratch aps(ScratchSlot::XPack, size_t(round_up(Mg, 8) * ((K + 1) / 2)) * 4);
      quantize_pack_s16(X.data_ptr<float>(), Kp, Mg, K, aps.as<int32_t>(), S.data_ptr<float>());
      VnniOut og = o;
      const at::Tensor bf = og.take_bias(bias);
      S16Tail t;
      at::Tensor Q;
      if (tail) {
        Q = at::zeros({tail, Kp}, X.options().dtype(at::kShort));
        quantize_rows_avx2<int16_t>(X.data_ptr<float>() + Mg * Kp, Kp, tail, K, Q.data_ptr<int16_t>(), Kp,
                                    S.data_ptr<float>() + Mg);
        t.x = Q.data_ptr<int16_t>(), t.ldx = Kp, t.r = tail, t.o = og.from_row(Mg, N);
      }
      gemm_s16_packed(aps.as<int32_t>(), Mg, wc.data_ptr<int8_t>(), N, K, og, tail ? &t : nullptr);
      return finish(out, c10::nullopt, x, N);
    }
    return finish(out, bias, x, N);
  }
#endif
  at::Tensor Q = at::zeros({M, Kp}, X.options().dtype(at::kShort));
  at::Tensor S = at::empty({M, 1}, X.options());
  if (M > 0) {
    int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
#if FASTKERN_X86
      if (use_avx2()) {
        quantize_rows_avx2<int16_t>(X.data_ptr<float>() + m0 * Kp, Kp, m1 - m0, K, Q.data_ptr<int16_t>() + m0 * Kp, Kp,
                           S.data_ptr<float>() + m0);
        return;
      }
#endif
      quantize_rows_generic(X.data_ptr<float>() + m0 * Kp, Kp, m1 - m0, K, Q.data_ptr<int16_t>() + m0 * Kp, Kp,
                            S.data_ptr<float>() + m0);
    });
  }
  at::Tensor C = at::empty({M, N}, X.options().dtype(at::kInt));
  int_matmul(Q.data_ptr<int16_t>(), Kp, M, wc.data_ptr<int8_t>(), N, K, C.data_ptr<int32_t>());
  // Same double-precision scaling as the reference ((c * s_x) * s_w, each rounded to
  // double, then to float), so the fp32 result is bit-identical; one pass over C.
  at::Tensor out = at::empty({M, N}, X.options());
  at::Tensor wsd = w_scale.to(at::kDouble).contiguous();
  {
    const int32_t* cp = C.data_ptr<int32_t>();
    const float* sp = S.data_ptr<float>();
    const double* wp = wsd.data_ptr<double>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1)), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        const double sx = double(sp[m]);
        for (int64_t n = 0; n < N; ++n) op[m * N + n] = float((double(cp[m * N + n]) * sx) * wp[n]);
      }
    });
  }
  return finish(out, bias, x, N);
}

}  // namespace
}  // namespace quant
}  // namespace cpu
}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern_C, CPU, m) {
  m.impl("int8_gemm", &fastkern::cpu::quant::int8_gemm_cpu);
  m.impl("linear_w8a16", &fastkern::cpu::quant::linear_w8a16_cpu);
  m.impl("linear_w8a8", &fastkern::cpu::quant::linear_w8a8_cpu);
}
