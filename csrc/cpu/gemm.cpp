// Dense float GEMM on the CPU: fastkern_C::gemm(a [..., K], b [N, K]) = a @ b.T.
//
// Skinny M (<= gemv_max_m(isa) rows, 8 to 64 by ISA) runs as a matrix-vector
// product bound by reading b once: b streams through in its own dtype and is
// converted in registers, 4 rows of b at a time meeting every row of a from
// cache. Larger M, up to kSkinnyMaxM, runs skinny_gemm (gemm_skinny.h: each task packs
// its own B slivers right before using them); beyond, the cache-blocked packed GEMM
// of gemm_blocked.h.
#include <torch/library.h>

#include <type_traits>

#include "cpu/gemm_blocked.h"
#include "cpu/gemm_skinny.h"
#include "cpu/tile_gemm.h"

namespace fastkern {
namespace cpu {
namespace gemm {
namespace {

// Largest M that takes the GEMV path, per ISA, measured on 2 threads (AMD EPYC
// with AVX-512, fp32 and bf16, shapes 1024x1024 .. 14336x4096, ISA forced): the
// GEMV reads w from memory once, each 4-row tile of w meeting every row of x from
// cache, while the packed GEMM packs all of b on every call. AVX-512 (4 rows of x
// per pass, 16 zmm accumulators) still wins at M = 80..128 on the large shapes
// and ties the GEMM at M = 96 on 1024x1024; AVX2 (2 rows of x per pass) wins up
// to M = 80 on the large shapes but loses ~10% from M = 48 on 1024x1024; the
// generic path wins to M = 16. The thresholds stay at the skinny end.
constexpr int64_t kGemvMaxM = 16;
constexpr int64_t kGemvMaxMAvx2 = 64;
constexpr int64_t kGemvMaxMAvx512 = 64;

// The GEMV walks K in blocks of gemv_kb(M) columns so that the M x KB slice of x
// (about 256 KB) stays in L2 while a chunk of kGemvChunkTiles 4-row tiles of w
// streams past it (each element of w is still read once); the blocks' partial
// sums add up in y in block order. KB depends only on M, never on the thread split.
constexpr int64_t kGemvChunkTiles = 16;
inline int64_t gemv_kb(int64_t M) {
  return std::max<int64_t>(256, int64_t(65536) / std::max<int64_t>(1, M) / 256 * 256);
}

// bf16 a and b with AVX512-BF16: the vdpbf16ps tile GEMM from this M (see "bf16, AVX512-BF16").
constexpr int64_t kBf16GemmMinM = 16;
// and its GEMV (vdpbf16ps on both operands' rows) up to this one
constexpr int64_t kBf16GemvMaxM = 15;

inline int64_t gemv_max_m(Isa isa) {
#if FASTKERN_X86
  if (isa >= Isa::Avx512) return kGemvMaxMAvx512;
  if (isa >= Isa::Avx2) return kGemvMaxMAvx2;
#endif
  return kGemvMaxM;
}

// ------------------------------------------------------------------ GEMV
//
// y[m, n] = sum_k x[m, k] * w[n, k] for rows n in [n0, n1); x is fp32 [M, K]
// contiguous, w rows contiguous with stride ldw. Up to 2 rows of x (4 with
// AVX-512) and 4 rows of w at a time: 8 (16) accumulator chains cover the FMA
// latency while w streams.

template <class T, int MT, int R>
void gemv_tile_generic(const float* x, int64_t ldx, int64_t K, const T* w, int64_t ldw, int64_t n, float* y, int64_t ldy,
                       bool add) {
  float acc[MT][R][8];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 8; ++l) acc[m][r][l] = 0.f;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    float wv[R][8];
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 8; ++l) wv[r][l] = to_f32(w[(n + r) * ldw + k + l]);
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < 8; ++l) acc[m][r][l] += x[m * ldx + k + l] * wv[r][l];
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t kk = k; kk < K; ++kk) s += x[m * ldx + kk] * to_f32(w[(n + r) * ldw + kk]);
      float t = 0.f;
      for (int l = 0; l < 8; ++l) t += acc[m][r][l];
      y[m * ldy + n + r] = add ? y[m * ldy + n + r] + (t + s) : t + s;
    }
}

#if FASTKERN_X86
template <class T, int MT, int R>
FASTKERN_AVX2 void gemv_tile_avx2(const float* x, int64_t ldx, int64_t K, const T* w, int64_t ldw, int64_t n,
                                  float* y, int64_t ldy, bool add) {
  __m256 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const T* wr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * ldw;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load8(wr[r] + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load_partial8(wr[r] + k, K - k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m256 xv = load_partial8(x + m * ldx + k, K - k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        const float v = hsum8(acc[m][r]);
        y[m * ldy + n + r] = add ? y[m * ldy + n + r] + v : v;
      }
}
#endif

#if FASTKERN_X86
// AVX-512: up to 4 rows of x against 4 rows of w, 16 zmm accumulators; the K
// tail is a masked load (masked-off lanes read nothing and add zeros).
template <class T, int MT, int R>
FASTKERN_AVX512 void gemv_tile_avx512(const float* x, int64_t ldx, int64_t K, const T* w, int64_t ldw, int64_t n,
                                      float* y, int64_t ldy, bool add) {
  __m512 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const T* wr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * ldw;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load16(wr[r] + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mk = first_lanes16(K - k);
    __m512 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = maskz_load16(mk, wr[r] + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc[m][r]),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[m][r]), 1)));
      const float v = hsum8(h);
      y[m * ldy + n + r] = add ? y[m * ldy + n + r] + v : v;
    }
}
#endif

#if FASTKERN_X86
// bf16 x and w with AVX512-BF16: 32 k per vdpbf16ps (two per fp32 lane, each product exact),
// both operands straight from their rows, no conversion; the same 4 x 4 tiles and the same
// masked K tail as the fp32 tile above.
template <int MT, int R>
FASTKERN_AVX512BF16 void gemv_tile_bf16dot(const c10::BFloat16* x, int64_t ldx, int64_t K, const c10::BFloat16* w,
                                           int64_t ldw, int64_t n, float* y, int64_t ldy, bool add) {
  __m512 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const c10::BFloat16* wr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * ldw;
  auto step = [&](int64_t k, __mmask32 mk) FASTKERN_AVX512BF16 {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mk, wr[r] + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mk, x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = dpbf16_inplace(acc[m][r], xv, wv[r]);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step(k, ~__mmask32(0));
  if (k < K) step(k, (__mmask32(1) << (K - k)) - 1);
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float v = _mm512_reduce_add_ps(acc[m][r]);
      y[m * ldy + n + r] = add ? y[m * ldy + n + r] + v : v;
    }
}
#endif

// Rows [n0, n1) of y for MT rows of x (fp32, or bf16 against a bf16 w on the vdpbf16ps
// tiles): 4-row tiles, then single rows.
template <class T, int MT, class X>
void gemv_rows(Isa isa, const X* x, int64_t ldx, int64_t K, const T* w, int64_t ldw, int64_t n0, int64_t n1,
               float* y, int64_t ldy, bool add) {
  int64_t n = n0;
  if constexpr (!std::is_same<X, float>::value) {
#if FASTKERN_X86
    static_assert(std::is_same<X, c10::BFloat16>::value && std::is_same<T, c10::BFloat16>::value, "bf16 x and w");
    for (; n + 4 <= n1; n += 4) gemv_tile_bf16dot<MT, 4>(x, ldx, K, w, ldw, n, y, ldy, add);
    for (; n < n1; ++n) gemv_tile_bf16dot<MT, 1>(x, ldx, K, w, ldw, n, y, ldy, add);
#endif
  } else {
#if FASTKERN_X86
    if (isa >= Isa::Avx512) {
      for (; n + 4 <= n1; n += 4) gemv_tile_avx512<T, MT, 4>(x, ldx, K, w, ldw, n, y, ldy, add);
      for (; n < n1; ++n) gemv_tile_avx512<T, MT, 1>(x, ldx, K, w, ldw, n, y, ldy, add);
      return;
    }
    if (isa >= Isa::Avx2) {
      for (; n + 4 <= n1; n += 4) gemv_tile_avx2<T, MT, 4>(x, ldx, K, w, ldw, n, y, ldy, add);
      for (; n < n1; ++n) gemv_tile_avx2<T, MT, 1>(x, ldx, K, w, ldw, n, y, ldy, add);
      return;
    }
#endif
    for (; n + 4 <= n1; n += 4) gemv_tile_generic<T, MT, 4>(x, ldx, K, w, ldw, n, y, ldy, add);
    for (; n < n1; ++n) gemv_tile_generic<T, MT, 1>(x, ldx, K, w, ldw, n, y, ldy, add);
  }
}

// All M rows of x against weight rows [n0, n1). K goes in blocks of gemv_kb(M)
// columns; within a block each 4-row tile of w (L1-resident) meets every row of x
// (the block's slice of x stays in L2) before the next tile streams in, so w is
// read from memory once whatever M is. Rows of x go in groups of 4 (AVX-512) or
// 2 (AVX2, generic); the grouping depends only on M and the ISA, never on the
// thread split.
template <class T, class X>
void gemv_block(Isa isa, const X* x, int64_t M, int64_t K, const T* w, int64_t ldw, int64_t n0, int64_t n1,
                float* y, int64_t N) {
  constexpr int64_t kTileN = 4;
  const int64_t kbs = gemv_kb(M);
  for (int64_t kb = 0; kb < K; kb += kbs) {
    const int64_t kl = std::min(kbs, K - kb);
    const bool add = kb > 0;
    for (int64_t nb = n0; nb < n1; nb += kTileN) {
      const int64_t ne = std::min(n1, nb + kTileN);
      auto rows = [&](auto mt, int64_t m) {
        gemv_rows<T, decltype(mt)::value>(isa, x + m * K + kb, K, kl, w + kb, ldw, nb, ne, y + m * N, N, add);
      };
      int64_t m = 0;
#if FASTKERN_X86
      if (isa >= Isa::Avx512) {
        for (; m + 4 <= M; m += 4) rows(std::integral_constant<int, 4>(), m);
        if (M - m == 3) rows(std::integral_constant<int, 3>(), m);
        if (M - m == 2) rows(std::integral_constant<int, 2>(), m);
        if (M - m == 1) rows(std::integral_constant<int, 1>(), m);
        continue;
      }
#endif
      for (; m + 2 <= M; m += 2) rows(std::integral_constant<int, 2>(), m);
      if (m < M) rows(std::integral_constant<int, 1>(), m);
    }
  }
}

// x: fp32, or bf16 (contiguous rows either way)
template <class T, class X = float>
void gemv(Isa isa, const at::Tensor& xt, const at::Tensor& w, float* y) {
  const int64_t M = xt.size(0), K = xt.size(1), N = w.size(0);
  const X* x = xt.data_ptr<X>();
  const T* wp = w.data_ptr<T>();
  const int64_t ldw = w.stride(0);
  // Chunks of whole 4-row tiles so every row is computed by the same tile shape
  // whatever the thread count; up to kGemvChunkTiles tiles per chunk (so a K
  // block of x serves several tiles) while leaving at least 8 chunks to share.
  const int64_t tiles = div_up(N, 4);
  const int64_t grain = std::max(grain_for(tiles, 4 * M * K), std::min(kGemvChunkTiles, div_up(tiles, 8)));
  parallel_for_dynamic(0, tiles, grain, [&](int64_t b, int64_t e) {
    gemv_block(isa, x, M, K, wp, ldw, b * 4, std::min(N, e * 4), y, N);
  });
}

// ------------------------------------------------------------------ bf16, AVX512-BF16
//
// bf16 a and b on a CPU with AVX512-BF16 (Zen 4/5, Sapphire Rapids and later) run
// tile_gemm.h's vdpbf16ps GEMM from M = kBf16GemmMinM: the products of two bf16 are
// exact in fp32 and vdpbf16ps forms two per lane, where the fp32 paths convert both operands
// and run one FMA per product. The tiles broadcast the weight's pairs straight from its rows
// where K is even (copying them into L2 panels first, as W8A16 has to, ran 1.16-1.33x slower at
// M = 16 / 64 on the Llama shapes with the weight from DRAM, 1.01-1.07x at M = 256).

#if FASTKERN_X86
// panel[n - n0][k / 2] = (b[n][k0 + k], b[n][k0 + k + 1]) for k < kc, zero past kc
FASTKERN_AVX512BF16 void bf16_copy_panel(const uint16_t* B, int64_t ldb, int64_t n0, int64_t n1, int64_t k0,
                                         int64_t kc, uint32_t* panel, int64_t ldp) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* src = B + n * ldb + k0;
    uint16_t* dst = reinterpret_cast<uint16_t*>(panel + (n - n0) * ldp);
    for (int64_t k = 0; k < kc; k += 32) {
      const int64_t left = std::min<int64_t>(32, kc - k);
      const __mmask32 ld = left == 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      const __mmask32 st = left >= 31 ? ~__mmask32(0) : (__mmask32(1) << (left + (left & 1))) - 1;
      _mm512_mask_storeu_epi16(dst + k, st, _mm512_maskz_loadu_epi16(ld, src + k));
    }
  }
}

bool bf16_dot(int64_t N, int64_t K) {
  return N > 0 && K > 0 && active_isa() >= Isa::Avx512 && features().avx512bf16;
}
// The tile GEMM from this M (FASTKERN_GEMM_BF16_MIN_M, read on every call; 0 turns it off)
bool use_bf16_gemm(int64_t M, int64_t N, int64_t K) {
  const int64_t lo = env_knob("FASTKERN_GEMM_BF16_MIN_M", kBf16GemmMinM);
  return lo > 0 && M >= lo && bf16_dot(N, K);
}
// The vdpbf16ps GEMV tiles up to this M (FASTKERN_GEMM_BF16_GEMV_MAX_M, read on every call;
// 0 turns them off)
bool use_bf16_gemv(int64_t M, int64_t N, int64_t K) {
  return M <= env_knob("FASTKERN_GEMM_BF16_GEMV_MAX_M", kBf16GemvMaxM) && bf16_dot(N, K);
}

// Which operand the tile GEMM packs: it packs x (its M rows, [K/2][16] pairs per 16 rows, per
// call) and reads the weight's rows in place, so with a as x it packs the M x K operand. Where b
// is the smaller one (N < M) it runs on b as x and a as the weight, computing C^T = b a^T, and
// writes its sums [M][N] out as they lie (no transpose). Each output is the same chain of
// vdpbf16ps over k either way (the instruction is symmetric in its operands): bitwise the same
// result. Measured (Zen 4, AVX512-BF16, 2 threads, one process; M x N x K, ms, a as x against b as
// x, torch's bf16 matmul (oneDNN)): 3000 x 100 x 3000 8.57 / 5.09 (5.03), 3000 x 384 x 3000
// 20.3 / 16.4 (16.2), 4096 x 64 x 4096 12.4 / 5.41 (6.8), 4096 x 384 x 384 3.39 / 2.99 (2.79),
// 4096 x 1536 x 384 13.9 / 12.9 (11.4), 4096 x 768 x 3072 50.7 / 44.6 (44.5), 2048 x 1024 x
// 1024 11.5 / 10.5 (10.2); with N >= M it loses (100 x 3000 x 3000 4.86 / 10.0, 64 x 4096 x
// 4096 5.62 / 13.6, 17 x 384 x 384 0.035 / 0.059), 512^3 a tie. b needs kBf16GemmMinM rows for
// the tile GEMM. FASTKERN_GEMM_BF16_SWAP (read on every call: A/B, tests) = 0 never swaps, 1
// swaps wherever b has those rows.
bool bf16_swap(int64_t M, int64_t N, int64_t K) {
  const int64_t knob = env_knob("FASTKERN_GEMM_BF16_SWAP", -1);
  if (knob == 0 || !use_bf16_gemm(N, M, K)) return false;
  return knob == 1 || N < M;
}

// Rows past the last whole 16-row vector of a that the GEMV takes instead of the tile GEMM: the
// tile GEMM works on vectors of 16 rows of x, so M = 16 j + r computes a whole vector for r rows
// (M = 17 cost as much as 32), while the GEMV reads b once more and costs a parallel region of
// its own. Measured (Zen 4, AVX512-BF16, 2 threads, one process, alternating; us, tile GEMM on
// all rows against 16 j rows + the GEMV on r, torch's bf16 matmul): b rotated beyond the L3,
// 17 x 2048 x 2048 758 / 604 (667), 17 x 4096 x 2048 1435 / 1220 (1412), 17 x 768 x 3072 446 /
// 363 (414), 17 x 3072 x 768 444 / 409 (528), 17 x 1024 x 1024 221 / 214 (249); but 17 x 1536
// x 384 168 / 222 (217), 17 x 384 x 384 61 / 76 (62), 33 x 384 x 384 74 / 85 (the GEMV's own
// parallel region), and beyond the L3, where the GEMV reads b from memory again, a wash: 17 x
// 4096 x 4096 3116 / 2901, 18 x 4096 x 4096 3173 / 3468. (With b in cache: 17 x 384 x 1536 114
// / 83, 17 x 4096 x 4096 2780 / 2344.) So up to kBf16GemvTailRows rows where b holds 1M to 8M
// elements (up to 16 MB, which the GEMV finds in the L3 after the tile GEMM);
// FASTKERN_GEMM_BF16_GEMV_TAIL (read on every call) sets the rows (0: off) for any size.
constexpr int64_t kBf16GemvTailRows = 4;
constexpr int64_t kBf16GemvTailMinElems = int64_t(1) << 20, kBf16GemvTailMaxElems = int64_t(8) << 20;
int64_t bf16_gemv_tail(int64_t M, int64_t N, int64_t K) {
  return tiles::gemv_tail_rows(M, "FASTKERN_GEMM_BF16_GEMV_TAIL", kBf16GemvTailRows,
                               N * K >= kBf16GemvTailMinElems && N * K <= kBf16GemvTailMaxElems);
}

// Where K is a multiple of 32 the tile GEMM takes r <= kBf16TailWithinRows within itself
// instead (tiles::bf16_tail_block: against each weight panel after its tiles, from L2), any
// size; FASTKERN_GEMM_BF16_TAIL (rows up to tiles::kBf16TailCap, 0: off; read on every call)
// overrides. Measured (Zen 4, 2 threads, one process, 7 alternating rounds, median ms, within
// / the GEMV split above / the tile GEMM on all rows (torch's bf16 matmul), b rotated beyond
// the L3): 17 x 4096 x 4096 2.16 / 3.01 / 3.06 (2.70), 24 x 4096 x 4096 2.87 / 3.17 / 3.12
// (3.48), 26 x 4096 x 4096 3.04 / 3.10 / 3.08, 28 x 4096 x 4096 3.03 / 3.00 / 3.01; 17 x 11008 x
// 4096 5.15 / 7.58 / 7.65 (6.89), 33 x 11008 x 4096 8.29 / 10.70 / 10.82 (10.00); 17 x 384 x
// 1536 0.077 / 0.110 / 0.109 (0.083); 24 x 384 x 384 0.037 / 0.036 / 0.036; 40 x 1536 x 384
// 0.186 / 0.182 / 0.188.
constexpr int64_t kBf16TailWithinRows = 8;
int64_t bf16_tail_within(int64_t M, int64_t K) {
  return tiles::bf16_tail_rows(M, K, "FASTKERN_GEMM_BF16_TAIL", kBf16TailWithinRows);
}

// C [M, N] bf16, rounded once from the fp32 sums (transposed: C is [N, M], b a2^T); the last
// `tail` rows of a2 within the tile GEMM (bf16_tail_within)
void bf16_gemm(const at::Tensor& a2, const at::Tensor& b, uint16_t* C, bool transposed = false, int64_t tail = 0) {
  const int64_t M = a2.size(0), K = a2.size(1), N = b.size(0);
  at::Tensor ac = a2.stride(1) == 1 ? a2 : a2.contiguous();
  at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
  const uint16_t* A = reinterpret_cast<const uint16_t*>(ac.data_ptr<c10::BFloat16>());
  const uint16_t* B = reinterpret_cast<const uint16_t*>(bc.data_ptr<c10::BFloat16>());
  const int64_t ldb = bc.stride(0);
  // Even K, an even row stride and 4-byte alignment: the tiles read the pairs from b's own
  // rows; otherwise through panels (zero past K).
  const bool direct = K % 2 == 0 && ldb % 2 == 0 && reinterpret_cast<uintptr_t>(B) % 4 == 0;
  tiles::bf16_tile_gemm(A, ac.stride(0), M, B, ldb, N, K, C, nullptr, nullptr,
                        [&](int64_t n0, int64_t n1, int64_t k0, int64_t kc, uint32_t* panel, int64_t ldp) {
                          using Rows = std::pair<const uint32_t*, int64_t>;
                          if (direct) return Rows(reinterpret_cast<const uint32_t*>(B + n0 * ldb + k0), ldb / 2);
                          bf16_copy_panel(B, ldb, n0, n1, k0, kc, panel, ldp);
                          return Rows(panel, ldp);
                        },
                        transposed, tail);
}
#endif

// ------------------------------------------------------------------ entry

template <class T>
void gemm_typed(const at::Tensor& a2, const at::Tensor& b, at::Tensor& out32) {
  const Isa isa = active_isa();
  const int64_t M = a2.size(0), K = a2.size(1), N = b.size(0);
  float* C = out32.data_ptr<float>();
#if FASTKERN_X86
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (use_bf16_gemv(M, N, K)) {
      at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
      gemv<T, T>(isa, a2.contiguous(), bc, C);
      return;
    }
  }
#endif
  if (M <= gemv_max_m(isa) && K > 0) {
    at::Tensor x32 = a2.to(at::kFloat).contiguous();
    at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
    gemv<T>(isa, x32, bc, C);
    return;
  }
  StridedRows<T> pa{a2.data_ptr<T>(), a2.stride(0), a2.stride(1), isa};
  StridedRows<T> pb{b.data_ptr<T>(), b.stride(0), b.stride(1), isa};
  if (M > skinny_max_m())
    blocked_gemm(M, N, K, micro_kernel(isa), pa, pb, C, N);
  else if (b.stride(1) == 1)
    skinny_gemm(M, N, K, micro_kernel(isa), pa, PrefetchRows<T>{pb}, C, N);
  else
    skinny_gemm(M, N, K, micro_kernel(isa), pa, pb, C, N);
}

at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_cpu_float("gemm", "a", a);
  check_cpu_float("gemm", "b", b);
  TORCH_CHECK(b.dim() == 2, "fastkern_C::gemm: ", describe("b", b), " must be 2-D [N, K]");
  TORCH_CHECK(a.dim() >= 1 && a.size(-1) == b.size(1), "fastkern_C::gemm: ", describe("a", a),
              " must be [..., K] with K=", b.size(1), " from ", describe("b", b));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastkern_C::gemm: a and b must have one dtype, got ",
              describe("a", a), " and ", describe("b", b));
  const int64_t K = b.size(1), N = b.size(0), M = rows_of(a);
  at::Tensor a2 = a.reshape({M, K});
#if FASTKERN_X86
  // the bf16 tile GEMM writes the bf16 result itself, no fp32 copy to allocate and convert
  // (in one process against that: 1.00-1.15x at M = 64 .. 2048 on 2048^2 .. 11008 x 4096)
  if (a.scalar_type() == at::kBFloat16 && use_bf16_gemm(M, N, K)) {
    at::Tensor out = at::empty({M, N}, a.options());
    uint16_t* C = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
    if (bf16_swap(M, N, K)) {
      bf16_gemm(b, a2, C, true);
    } else if (const int64_t r = bf16_tail_within(M, K)) {
      bf16_gemm(a2, b, C, false, r);
    } else if (const int64_t r = bf16_gemv_tail(M, N, K)) {
      bf16_gemm(a2.narrow(0, 0, M - r), b, C);
      // the last r rows by the GEMV (fp32 sums, rounded to bf16 once as its own path does)
      at::Tensor tail32 = at::empty({r, N}, a.options().dtype(at::kFloat));
      gemv<c10::BFloat16, c10::BFloat16>(active_isa(), a2.narrow(0, M - r, r).contiguous(),
                                         b.stride(1) == 1 ? b : b.contiguous(), tail32.data_ptr<float>());
      out.narrow(0, M - r, r).copy_(tail32);
    } else {
      bf16_gemm(a2, b, C);
    }
    return out.reshape(out_shape(a, N));
  }
#endif
  at::Tensor out32 = at::empty({M, N}, a.options().dtype(at::kFloat));
  switch (a.scalar_type()) {
    case at::kFloat: gemm_typed<float>(a2, b, out32); break;
    case at::kHalf: gemm_typed<c10::Half>(a2, b, out32); break;
    default: gemm_typed<c10::BFloat16>(a2, b, out32); break;
  }
  return finish(out32, c10::nullopt, a, N);
}

}  // namespace
}  // namespace gemm
}  // namespace cpu
}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern_C, CPU, m) { m.impl("gemm", &fastkern::cpu::gemm::gemm_cpu); }
