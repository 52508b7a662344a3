// The transposed-tile GEMMs of the CPU kernels (int8_gemm.cpp's W8A16 and VNNI GEMMs, gemm.cpp's
// bf16 GEMM): x is packed per block of 64 rows so that one 64-byte load holds one k (or one k
// pair) of 16 rows; a weight panel (nb rows x a K block, in L2) is broadcast one element (or
// pair) at a time against it, NR weight rows x VM vectors of x per register tile, and the sums
// land in CT [N, Mp] (weight row major), transposed into Y [M, N] at the end. Every output is
// one chain over k in order, whatever the tile shape and the thread split.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "cpu/quant_common.h"
#include "cpu/scratch.h"

namespace fastkern {
namespace cpu {
namespace tiles {

using quant::round_up;

// The tile GEMMs compute whole vectors of 16 rows of x, so M = 16 j + r (r > 0) costs as much
// as 16 (j + 1). Callers that hand the last r rows to a GEMV instead ask here: r when
// 1 <= r <= max_rows and the problem is in the caller's measured size range (`sized`), else 0.
// The environment knob `knob` (rows; 0: off; read on every call) overrides both, for any size.
inline int64_t gemv_tail_rows(int64_t M, const char* knob, int64_t max_rows, bool sized) {
  const int64_t forced = env_knob(knob, -1), r = M % 16;
  return M > 16 && r > 0 && (forced >= 0 ? r <= forced : r <= max_rows && sized) ? r : 0;
}

#if FASTKERN_X86
// 16 x 16 int32 transpose in registers: r[i] lane j -> r[j] lane i.
FASTKERN_AVX512 inline void transpose16x16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // b[4g + c] lane L: column 4L + c of rows 4g .. 4g + 3
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i u0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i u2 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE), u3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(u0, u1, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(u0, u1, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(u2, u3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(u2, u3, 0xDD);
  }
}

// Rows [0, nn) (nn <= 16) of the sums ct (row stride ldct), 16 columns each, times s[j] (if s)
// plus b[j] (if b), transposed in registers: r[i] lane j = ct[j][i] s[j] + b[j], zero for j >= nn
FASTKERN_AVX512 inline void transpose_block(const float* ct, int64_t ldct, int64_t nn, const float* s, const float* b,
                                            __m512i r[16]) {
  for (int64_t j = 0; j < 16; ++j) {
    if (j >= nn) {
      r[j] = _mm512_setzero_si512();
      continue;
    }
    __m512 v = _mm512_loadu_ps(ct + j * ldct);
    // one rounding where both apply (an explicit FMA: the same result whatever the compiler contracts)
    if (s && b)
      v = _mm512_fmadd_ps(v, _mm512_set1_ps(s[j]), _mm512_set1_ps(b[j]));
    else if (s)
      v = _mm512_mul_ps(v, _mm512_set1_ps(s[j]));
    else if (b)
      v = _mm512_add_ps(v, _mm512_set1_ps(b[j]));
    r[j] = _mm512_castps_si512(v);
  }
  transpose16x16(r);
}

// Y[i][j] (row stride ldy) = ct[j][i] s[j] + b[j] for i < mm, j < nn (both <= 16): a block of
// the tile GEMMs' sums (one row per output column) out as rows of the result
FASTKERN_AVX512 inline void transpose_out(const float* ct, int64_t ldct, int64_t nn, int64_t mm, float* Y, int64_t ldy,
                                          const float* s = nullptr, const float* b = nullptr) {
  __m512i r[16];
  transpose_block(ct, ldct, nn, s, b, r);
  const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1u);
  for (int64_t i = 0; i < mm; ++i) _mm512_mask_storeu_ps(Y + i * ldy, mask, _mm512_castsi512_ps(r[i]));
}

// The same block rounded to bf16 (to nearest even, as torch converts) into a bf16 Y
FASTKERN_AVX512BF16 inline void transpose_out(const float* ct, int64_t ldct, int64_t nn, int64_t mm, uint16_t* Y,
                                              int64_t ldy, const float* s = nullptr, const float* b = nullptr) {
  __m512i r[16];
  transpose_block(ct, ldct, nn, s, b, r);
  const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1u);
  for (int64_t i = 0; i < mm; ++i)
    _mm256_mask_storeu_epi16(Y + i * ldy, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[i])));
}

// Y[m][j] (row stride ldy) = ct[j][m] s[j] + b[j] for m < M, j < n: n rows of the sums (one row
// per output column, M <= ldct columns of which are real, ldct a multiple of 16) out as n
// columns of the result, in 16 x 16 blocks
template <class Y_t>
void transpose_strip(const float* ct, int64_t ldct, int64_t M, int64_t n, Y_t* Y, int64_t ldy, const float* s,
                     const float* b) {
  for (int64_t j = 0; j < n; j += 16)
    for (int64_t m0 = 0; m0 < M; m0 += 16)
      transpose_out(ct + j * ldct + m0, ldct, std::min<int64_t>(16, n - j), std::min<int64_t>(16, M - m0),
                    Y + m0 * ldy + j, ldy, s ? s + j : nullptr, b ? b + j : nullptr);
}

// Y [M, N] (row stride N) from the sums CT [N, ldct], in parallel strips of 16 columns
template <class Y_t>
void transpose_all(const float* CT, int64_t ldct, int64_t M, int64_t N, Y_t* Y, const float* s, const float* b) {
  at::parallel_for(0, (N + 15) / 16, 16, [&](int64_t j0, int64_t j1) {
    const int64_t n0 = 16 * j0;
    transpose_strip(CT + n0 * ldct, ldct, M, std::min(N, 16 * j1) - n0, Y + n0, N, s ? s + n0 : nullptr,
                    b ? b + n0 : nullptr);
  });
}
#endif

// K columns per fp32 panel (96 rows x 512 x 4 B = 192 KB) and weight rows per task of the
// transposed-tile GEMMs; the bf16 GEMM takes twice the columns (the same bytes)
constexpr int64_t kF32KC = 512;     // K columns per panel (96 rows x 512 x 4 B = 192 KB)
constexpr int64_t kF32TaskRows = 96;

// Register tiles of 6 weight rows instead of 12 (one or two vectors of x) where 12 rows
// `row_bytes` apart alias in the L1 (rows_alias_in_l1: a stride of a multiple of 4 KiB on an
// 8-way L1d puts every row's line in one set, and each step reads all 12). Measured on 2 Zen 4
// cores (32 KiB 8-way L1d; alternating in one process, weights beyond L3): the bf16 GEMM
// reading 4096 x 4096 / 11008 x 4096 bf16 rows in place (8 KiB apart), 6 against 12 rows, M =
// 16 0.70x the time, M = 32 0.91-0.92x; the VNNI GEMM in int8_gemm.cpp 0.66-0.83x.
// On an L1d under 48 KiB (small_l1d) six rows also where the rows do not alias: the same
// cores, same method, 2026-12-05, 6 against 12 rows, N = 4096 unless said: W8A8 (VNNI) M = 16 /
// 32 at K = 1024 / 2112 / 3072 / 6000 / 11008 / 14336 0.97 / 0.99, 0.95 / 0.96, 0.92 / 0.94,
// 0.96 / 0.96, 0.94 / 0.95, 0.97 / 0.96x the time, 3072 x 768, 768 x 3072, 1536 x 1536,
// 2048 x 2048 M = 16 / 32 0.94-0.98x; bf16 x (W8A16's vdpbf16ps GEMM / gemm) M = 16 at K =
// 2112 / 3072 / 6000 / 11008 0.90 / 0.92 / 0.93 / 0.92x and 0.99 / 0.91 / 0.93 / 0.93x (11008
// x 4160: 0.91 / 0.96x), M = 32 0.98-1.03x. (An earlier reading on these cores had 12 rows
// ahead by 5-10% at K = 1024 / 2112 / 6000; it did not come back.) FASTKERN_TILE_ROWS (6 or
// 12; read per call) forces one.
inline bool six_row_tiles(int64_t row_bytes) {
  const int64_t knob = env_knob("FASTKERN_TILE_ROWS", 0);
  return knob == 6 || (knob != 12 && (quant::small_l1d() || rows_alias_in_l1(row_bytes, 12)));
}
// f(integral_constant<int, NR>): NR = 6 for VM >= 3 vectors of x or six_row_tiles, else 12
template <int VM, class F>
void with_tile_rows(int64_t row_bytes, const F& f) {
  if constexpr (VM >= 3) {
    f(std::integral_constant<int, 6>{});
  } else {
    if (six_row_tiles(row_bytes))
      f(std::integral_constant<int, 6>{});
    else
      f(std::integral_constant<int, 12>{});
  }
}

// The rows of a panel in register tiles of NR weight rows (6 when VM >= 3 or six_row_tiles,
// else 12), then one by one, with the prefetch lines [pf, pf + npf) of the next task spread
// evenly over the tiles (one every step k steps): tile(integral_constant<int, rows of the
// tile>, first row, its prefetch lines, how many, step - 1). row_bytes: the row stride of what
// the tiles read.
template <int VM, int NR, class Tile>
void panel_rows_nr(int64_t rows, int64_t ksteps, const char* const* pf, int64_t npf, const Tile& tile) {
  const int64_t tiles = std::max<int64_t>(1, rows / NR + rows % NR);
  const int64_t lines = std::max<int64_t>(1, (npf + tiles - 1) / tiles);
  int64_t step = 1;
  while (step * 2 * lines <= ksteps) step *= 2;
  int64_t r = 0;
  auto run = [&](auto nr) {
    const int64_t np = std::max<int64_t>(0, std::min(lines, npf));
    tile(nr, r, pf, np, step - 1);
    pf += np;
    npf -= np;
  };
  for (; r + NR <= rows; r += NR) run(std::integral_constant<int, NR>{});
  for (; r < rows; ++r) run(std::integral_constant<int, 1>{});
}
template <int VM, class Tile>
void panel_rows(int64_t rows, int64_t ksteps, int64_t row_bytes, const char* const* pf, int64_t npf,
                const Tile& tile) {
  with_tile_rows<VM>(row_bytes, [&](auto nr) { panel_rows_nr<VM, decltype(nr)::value>(rows, ksteps, pf, npf, tile); });
}

// pfl = the cache lines of the weight W (row stride ldw) that a task of the transposed-tile
// GEMMs reads after rows [n0, n1) x K block [k0, k0 + KC): its next K block, or the first one
// of the thread's next task (rows up to r1, nb per task), for the tiles to prefetch while
// they compute.
template <class T>
void next_panel_lines(const T* W, int64_t ldw, int64_t K, int64_t KC, int64_t nb, int64_t r1, int64_t n0,
                      int64_t n1, int64_t k0, std::vector<const char*>& pfl) {
  int64_t pn0 = n0, pn1 = n1, pk0 = k0 + KC;
  if (pk0 >= K) pn0 = n1, pn1 = std::min(r1, n1 + nb), pk0 = 0;
  const int64_t pkc = std::min(KC, K - pk0);
  pfl.clear();
  for (int64_t n = pn0; n < pn1; ++n) {
    const char* row = reinterpret_cast<const char*>(W + n * ldw + pk0);
    for (int64_t b = 0; b < pkc * int64_t(sizeof(T)); b += 64) pfl.push_back(row + b);
  }
}

#if FASTKERN_X86
// ------------------------------------------------------------------ bf16 x, AVX512-BF16
//
// bf16 x against a weight given as bf16 (int8_gemm.cpp's W8A16: the int8 weight converted,
// which is exact; gemm.cpp: a bf16 weight as it is): vdpbf16ps forms the products exactly,
// two k per fp32 lane, at twice the multiply-adds per instruction of the fp32 FMA. x is
// packed as [K/2][16 VM][2 bf16] and one (w[k], w[k+1]) pair is broadcast per step. Like every
// vdpbf16ps path, it treats bf16 subnormals (|v| < 1.2e-38) as zero and flushes subnormal
// sums to zero.

template <int NR, int VM>
FASTKERN_AVX512BF16 void bf16_tile(const uint32_t* Xp, const uint32_t* P, int64_t ldp, int64_t kc2, float* CT,
                                   int64_t ldct, bool acc, const char* const* pf, int64_t npf, int64_t pf_mask) {
  __m512 c[NR][VM];
#pragma GCC unroll 12
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < VM; ++v) c[j][v] = acc ? _mm512_loadu_ps(CT + j * ldct + 16 * v) : _mm512_setzero_ps();
  int64_t ipf = 0;
  for (int64_t k = 0; k < kc2; ++k) {
    if ((k & pf_mask) == 0 && ipf < npf) _mm_prefetch(pf[ipf++], _MM_HINT_T1);
    __m512bh a[VM];
#pragma GCC unroll 4
    for (int v = 0; v < VM; ++v) a[v] = (__m512bh)_mm512_loadu_si512(Xp + k * 16 * VM + 16 * v);
#pragma GCC unroll 12
    for (int j = 0; j < NR; ++j) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(int32_t(P[j * ldp + k]));
#pragma GCC unroll 4
      for (int v = 0; v < VM; ++v) c[j][v] = _mm512_dpbf16_ps(c[j][v], a[v], b);
    }
  }
#pragma GCC unroll 12
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < VM; ++v) _mm512_storeu_ps(CT + j * ldct + 16 * v, c[j][v]);
}

template <int VM>
void bf16_rows(const uint32_t* Xp, const uint32_t* P, int64_t ldp, int64_t rows, int64_t kc2, float* CT,
               int64_t ldct, bool acc, const char* const* pf, int64_t npf) {
  panel_rows<VM>(rows, kc2, ldp * 4, pf, npf, [&](auto nr, int64_t r, const char* const* p, int64_t np, int64_t mask) {
    bf16_tile<decltype(nr)::value, VM>(Xp, P + r * ldp, ldp, kc2, CT + r * ldct, ldct, acc, p, np, mask);
  });
}

// x [M, K] bf16 (row stride ldx elements) -> per block of 64 rows [K2][w] pairs (zero rows
// past M, zero past K); block mb starts at xp + 64 mb K2.
// Eight rows at a time by quant::pack_rows8.
inline void pack_x_bf16(const uint16_t* X, int64_t ldx, int64_t M, int64_t K, uint32_t* xp) {
  const int64_t Mp = round_up(M, 16), nmb = (M + 63) / 64, K2 = (K + 1) / 2;
  constexpr int64_t kChunk = 256;
  const int64_t nkc = (K2 + kChunk - 1) / kChunk;
  at::parallel_for(0, nmb * nkc, 1, [&](int64_t b, int64_t e) FASTKERN_AVX2 {
    for (int64_t t = b; t < e; ++t) {
      const int64_t mb = t / nkc, k0 = (t % nkc) * kChunk, k1 = std::min(K2, k0 + kChunk);
      const int64_t m0 = mb * 64, w = std::min<int64_t>(64, Mp - m0), rows = std::min<int64_t>(w, M - m0);
      uint32_t* dst = xp + m0 * K2;
      for (int64_t r0 = 0; r0 < w; r0 += 8) {
        auto row = [&](int64_t i) { return r0 + i < rows ? X + (m0 + r0 + i) * ldx : nullptr; };
        quant::pack_rows8(
            dst, w, r0, k0, k1, K / 2,  // 8 whole pairs within K
            [&](int i, int64_t k) FASTKERN_AVX2 {
              const uint16_t* src = row(i);
              return src ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * k)) : _mm256_setzero_si256();
            },
            [&](int i, int64_t k) {
              const uint16_t* src = row(i);
              if (!src) return 0u;
              const uint32_t lo = src[2 * k], hi = 2 * k + 1 < K ? src[2 * k + 1] : 0;
              return lo | (hi << 16);
            });
      }
    }
  });
}

// ---- the last r rows of x within the GEMM (M = 16 j + r)
//
// The tiles compute whole vectors of 16 rows of x, so M = 16 j + r would cost 16 (j + 1).
// Instead the last r rows (r <= kBf16TailCap) run against each weight panel right after its
// tiles, while the panel is in L2: one 16-pair weight vector per row of the panel against the
// r rows' pairs, packed [pair / 16][r][16 pairs] (read in place, rows K elements apart alias
// in the L1), vdpbf16ps into lane sums per (weight row, x row) kept over the K blocks of a
// task, and summed across the lanes into the task's CT columns past the tiles' at its end:
// scales, bias and the rounding to bf16 are the tiles' (transpose_all). K must be a multiple
// of 32 (whole 16-pair vectors in every K block).
constexpr int64_t kBf16TailCap = 12;  // rows (bf16_tail_block's cases)

// The rows the bf16 GEMM takes within itself at this M (gemv_tail_rows's rule with
// max_rows, knob up to kBf16TailCap), 0 where K is not a multiple of 32
inline int64_t bf16_tail_rows(int64_t M, int64_t K, const char* knob, int64_t max_rows) {
  if (K % 32 != 0) return 0;
  const int64_t r = gemv_tail_rows(M, knob, max_rows, true);
  return r <= kBf16TailCap ? r : 0;
}

struct Bf16Tail {
  const uint32_t* xt = nullptr;  // the r rows' pairs, [K2 / 16][r][16]
  int64_t r = 0;
};

// x rows [0, r) (bf16, row stride ldx elements, K a multiple of 32) into xt as [K2 / 16][r][16]
// pairs (a pair: x[2k] in the low half; memcpy, as rows may start on any 2-byte boundary)
inline void pack_tail_bf16(const uint16_t* X, int64_t ldx, int64_t r, int64_t K, uint32_t* xt) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t v = 0; v < K / 32; ++v) std::memcpy(xt + (v * r + i) * 16, X + i * ldx + 32 * v, 64);
}

// Lane sums tot[(j R + i) 16 ..] (+)= weight rows j < NR of the panel (row stride ldp) against
// the R tail rows xt (this K block's, [kc2 / 16][R][16]) over kc2 pairs (a multiple of 16)
template <int R, int NR>
FASTKERN_AVX512BF16 void bf16_tail_tile(const uint32_t* xt, const uint32_t* P, int64_t ldp, int64_t kc2, float* tot,
                                        bool first) {
  __m512 t[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) t[j][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(tot + (j * R + i) * 16);
  for (int64_t kp = 0; kp < kc2; kp += 16) {
    __m512i w[NR];
    for (int j = 0; j < NR; ++j) w[j] = _mm512_loadu_si512(P + j * ldp + kp);
    for (int i = 0; i < R; ++i) {
      const __m512i xv = _mm512_loadu_si512(xt + (kp / 16 * R + i) * 16);
      for (int j = 0; j < NR; ++j) t[j][i] = dpbf16_inplace(t[j][i], xv, w[j]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) _mm512_storeu_ps(tot + (j * R + i) * 16, t[j][i]);
}
template <int R>
void bf16_tail_block_r(const uint32_t* xt, const uint32_t* P, int64_t ldp, int64_t rows, int64_t kc2, float* tot,
                       bool first) {
  constexpr int NR = R <= 6 ? 3 : 2;
  int64_t j = 0;
  for (; j + NR <= rows; j += NR) bf16_tail_tile<R, NR>(xt, P + j * ldp, ldp, kc2, tot + j * R * 16, first);
  for (; j < rows; ++j) bf16_tail_tile<R, 1>(xt, P + j * ldp, ldp, kc2, tot + j * R * 16, first);
}
// The panel's rows against the tail's rows over K block pairs [kp0, kp0 + kc2)
inline void bf16_tail_block(const Bf16Tail& t, int64_t kp0, const uint32_t* P, int64_t ldp, int64_t rows,
                            int64_t kc2, float* tot, bool first) {
  quant::with_rows<kBf16TailCap>(t.r, [&](auto R) {
    bf16_tail_block_r<decltype(R)::value>(t.xt + kp0 * t.r, P, ldp, rows, kc2, tot, first);
  });
}
// ct[j][i] (row stride ldct) = the sum of the lanes tot[(j r + i) 16 ..], j < rows, i < r
FASTKERN_AVX512BF16 inline void bf16_tail_sums(const float* tot, int64_t r, int64_t rows, float* ct, int64_t ldct) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i = 0; i < r; ++i) ct[j * ldct + i] = _mm512_reduce_add_ps(_mm512_loadu_ps(tot + (j * r + i) * 16));
}

// Y[j][i] (row stride ldy) = bf16(CT[j][i]) for i < M, j in [j0, j1): the sums as they lie,
// for a caller that asked for the transposed result
FASTKERN_AVX512BF16 inline void rows_out_bf16(const float* ct, int64_t ldct, int64_t M, int64_t j0, int64_t j1,
                                              uint16_t* Y, int64_t ldy) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t i = 0; i < M; i += 16) {
      const __mmask16 mk = M - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (M - i)) - 1u);
      _mm256_mask_storeu_epi16(Y + j * ldy + i, mk,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, ct + j * ldct + i)));
    }
}

// Y [M, N] (bf16) = s[n] * (X [M, K] (bf16, row stride ldx) x B^T) + bias[n] (no s: unscaled; no
// bias: none; rounded to bf16 once, from the fp32 sum), B [N, K] the weight
// as bf16 pairs: fill(n0, n1, k0, kc, panel, ldp) returns where rows [n0, n1) of K block
// [k0, k0 + kc) are and their row stride, {P, ldp'} with P[(n - n0) ldp' + k / 2] =
// (B[n][k0 + k], B[n][k0 + k + 1]) for k < kc and zero past kc: either the panel it was given
// (ldp u32 per row), filled, or the weight's own rows. W: the weight as stored (row stride
// ldw elements of T), whose next K block's lines are prefetched.
// ldyt > 0: Y is the result's transpose, [N][M] with row stride ldyt (no scales or bias).
// tail > 0: the `tail` rows of X after its M (and of Y after its M) by bf16_tail_block (M a
// multiple of 16 then, K of 32; no transposed result).
template <class T, class Fill>
void bf16_tile_gemm_pass(const uint16_t* X, int64_t ldx, int64_t M, const T* W, int64_t ldw, int64_t N, int64_t K,
                         uint16_t* Y, const float* s, const float* bias, const Fill& fill, int64_t ldyt = 0,
                         int64_t tail = 0) {
  TORCH_INTERNAL_ASSERT(ldyt == 0 || (s == nullptr && bias == nullptr),
                        "bf16_tile_gemm: a transposed result takes no scales or bias");
  TORCH_INTERNAL_ASSERT(tail == 0 || (tail <= kBf16TailCap && M % 16 == 0 && K % 32 == 0 && ldyt == 0),
                        "bf16_tile_gemm: tail ", tail, " with M ", M, ", K ", K);
  const int64_t Mp = round_up(M, 16), nmb = (M + 63) / 64, K2 = (K + 1) / 2;
  const int64_t ldct = Mp + (tail > 0 ? 16 : 0);  // the tail's sums in the columns past the tiles'
  Scratch xps(ScratchSlot::XPack, Mp * K2 * sizeof(uint32_t));
  Scratch cts(ScratchSlot::Out, N * ldct * sizeof(float));
  Scratch xts(ScratchSlot::XQuant, tail * K2 * sizeof(uint32_t));
  uint32_t* xp = xps.as<uint32_t>();
  float* ct = cts.as<float>();
  const Bf16Tail bt{xts.as<uint32_t>(), tail};
  if (tail > 0) pack_tail_bf16(X + M * ldx, ldx, tail, K, xts.as<uint32_t>());
  pack_x_bf16(X, ldx, M, K, xp);
  // K columns per panel: twice the fp32 panel's, the same bytes
  constexpr int64_t KC = 2 * kF32KC;
  const int64_t nb = kF32TaskRows, kc2max = (std::min(KC, K) + 1) / 2;
  quant::parallel_rows(N, 12, 1, [&](int64_t r0, int64_t r1) {
    Scratch panel(ScratchSlot::Worker0, nb * kc2max * sizeof(uint32_t));
    Scratch tts(ScratchSlot::Small, nb * tail * 16 * sizeof(float));
    std::vector<const char*> pfl;
    pfl.reserve(nb * (KC * sizeof(T) / 64 + 1));
    for (int64_t n0 = r0; n0 < r1; n0 += nb) {
      const int64_t n1 = std::min(r1, n0 + nb);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0), kc2 = (kc + 1) / 2;
        const std::pair<const uint32_t*, int64_t> pv = fill(n0, n1, k0, kc, panel.as<uint32_t>(), kc2max);
        const uint32_t* P = pv.first;
        const int64_t ldp = pv.second;
        next_panel_lines(W, ldw, K, KC, nb, r1, n0, n1, k0, pfl);
        const int64_t per_mb = (int64_t(pfl.size()) + nmb - 1) / nmb;
        for (int64_t mb = 0; mb < nmb; ++mb) {
          const int64_t m0 = mb * 64, vm = std::min<int64_t>(64, Mp - m0) / 16;
          const uint32_t* xb = xp + m0 * K2 + (k0 / 2) * 16 * vm;
          float* c = ct + n0 * ldct + m0;
          const int64_t p0 = std::min<int64_t>(pfl.size(), mb * per_mb);
          const int64_t np = std::min<int64_t>(pfl.size() - p0, per_mb);
          const char* const* pp = pfl.data() + p0;
          switch (vm) {
            case 1: bf16_rows<1>(xb, P, ldp, n1 - n0, kc2, c, ldct, k0 > 0, pp, np); break;
            case 2: bf16_rows<2>(xb, P, ldp, n1 - n0, kc2, c, ldct, k0 > 0, pp, np); break;
            case 3: bf16_rows<3>(xb, P, ldp, n1 - n0, kc2, c, ldct, k0 > 0, pp, np); break;
            default: bf16_rows<4>(xb, P, ldp, n1 - n0, kc2, c, ldct, k0 > 0, pp, np); break;
          }
        }
        if (tail > 0) bf16_tail_block(bt, k0 / 2, P, ldp, n1 - n0, kc2, tts.as<float>(), k0 == 0);
      }
      if (tail > 0) bf16_tail_sums(tts.as<float>(), tail, n1 - n0, ct + n0 * ldct + Mp, ldct);
    }
  });
  if (ldyt > 0)
    at::parallel_for(0, N, 16, [&](int64_t j0, int64_t j1) { rows_out_bf16(ct, ldct, M, j0, j1, Y, ldyt); });
  else
    transpose_all(ct, ldct, M + tail, N, Y, s, bias);
}

// M in passes whose sums CT [N, pass] stay within a kept scratch buffer (kScratchKeepBytes):
// a fresh buffer of tens of MB is mapped one page at a time on every call, while the weight is
// read once more per pass. 11008 x 4096 at M = 2048 (bf16 gemm, 2 threads): 265 against 319 ms
// in one process (perf had put 10% of the time in page faults).
// transposed: Y is the result's transpose, [N][M] (no scales or bias).
// tail: the last rows of X by bf16_tail_block within the last pass (M - tail a multiple of 16,
// K of 32, not transposed).
template <class T, class Fill>
void bf16_tile_gemm(const uint16_t* X, int64_t ldx, int64_t M, const T* W, int64_t ldw, int64_t N, int64_t K,
                    uint16_t* Y, const float* s, const float* bias, const Fill& fill, bool transposed = false,
                    int64_t tail = 0) {
  const int64_t pass = std::max<int64_t>(64, int64_t(kScratchKeepBytes) / (std::max<int64_t>(N, 1) * 4) / 64 * 64);
  const int64_t Mh = M - tail;
  for (int64_t m0 = 0; m0 < Mh; m0 += pass) {
    const int64_t rows = std::min(pass, Mh - m0);
    bf16_tile_gemm_pass(X + m0 * ldx, ldx, rows, W, ldw, N, K, transposed ? Y + m0 : Y + m0 * N, s, bias, fill,
                        transposed ? M : 0, m0 + rows == Mh ? tail : 0);
  }
}
#endif

}  // namespace tiles
}  // namespace cpu
}  // namespace fastkern
