// Sparse float linear layers on the CPU (formats: DESIGN.md §3, fastkern/formats/sparse.py).
//
// linear_sparse24(x [..., K], values [N, K/2], meta uint8 [N, K/4], bias?)
//   Small M (<= 4 generic, <= 8 AVX2/AVX-512) is bound by reading the weights:
//   values and meta stream once (2.25 bytes per dense fp32 weight instead of 4)
//   and x is gathered in registers. Larger M on AVX2/AVX-512 multiplies only the
//   kept weights: each is broadcast against a row of x^T picked by its meta
//   (s24_mvec, half the FMAs of the dense product). bf16 x (and values) with
//   AVX512-BF16 takes s24b_gemm from M = 6: each kept pair meets its two activations in
//   one vdpbf16ps lane, x expanded into the six position pairs of every group. The
//   generic path expands 2:4 into the packed B panels of the dense blocked GEMM.
// linear_blocksparse(x, blocks [nnzb, bn, bk], row_ptr [ceil(N/bn)+1], col_idx [nnzb], N, bias?)
//   Empty blocks cost nothing: every kernel walks the CSR lists only. M <= 4 (12 on the
//   AVX2 paths, 6 on AVX-512 with blocks of 16 columns or more: bs_small_max_m): dot
//   products along k over whole blocks; larger M: register tiles of weight
//   rows x columns of M over x transposed into panels of the tile's columns,
//   weights broadcast straight from the blocks, the next block's x slice prefetched.
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/gemm_blocked.h"
#include "cpu/scratch.h"

namespace fastkern {
namespace cpu {
namespace sparse {
namespace {

using gemm::describe;
using gemm::div_up;
using gemm::round_up;
using gemm::to_f32;

constexpr int64_t kSmallM = 4;
constexpr int64_t kS24StreamMaxM = 8;

// The references multiply x by the dense weight, where a pruned weight is a 0
// and 0 * inf = 0 * nan = nan. Kernels that skip pruned weights never see
// those products, so rows of x holding inf/nan are fixed up here: y[m, n]
// becomes nan when a non-finite x[m, k] meets a weight (n, k) that is not stored.
// Checking x costs O(M*K), nothing next to the product.
// Whether x holds an inf or nan: a branch-free scan of the exponent bits for
// contiguous fp32 (the common case, a small fraction of the product's time),
// ATen's isfinite otherwise.
inline bool any_nonfinite(const at::Tensor& x2) {
  if (x2.scalar_type() != at::kFloat || !x2.is_contiguous()) return at::logical_not(at::isfinite(x2)).any().item<bool>();
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x2.data_ptr<float>());
  const int64_t n = x2.numel();
  std::atomic<bool> found{false};
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t b, int64_t e) {
    uint32_t bad = 0;
    for (int64_t i = b; i < e; ++i) bad |= static_cast<uint32_t>((p[i] & 0x7f800000u) == 0x7f800000u);
    if (bad) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

template <class Pruned>
void propagate_nonfinite(const at::Tensor& x2, at::Tensor& out32, const Pruned& pruned) {
  if (x2.numel() == 0 || !any_nonfinite(x2)) return;
  const at::Tensor bad = at::logical_not(at::isfinite(x2));
  const at::Tensor bad_rows = bad.any(1);
  if (!bad_rows.any().item<bool>()) return;
  const int64_t N = out32.size(1);
  float* y = out32.data_ptr<float>();
  const at::Tensor rows = at::nonzero(bad_rows).view(-1);
  for (int64_t i = 0; i < rows.numel(); ++i) {
    const int64_t m = rows[i].item<int64_t>();
    const at::Tensor cols = at::nonzero(bad[m]).view(-1).contiguous();
    const int64_t* k = cols.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < cols.numel(); ++j)
        if (pruned(n, k[j])) {
          y[m * N + n] = std::numeric_limits<float>::quiet_NaN();
          break;
        }
  }
}

// =================================================================== 2:4

// --- small M, portable: four partial sums per row keep the adds independent.
template <class T, int MT>
void s24_rows_generic(const float* x, int64_t K, const T* vals, int64_t ldv, const uint8_t* meta, int64_t ldm,
                      int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t G = K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const T* v = vals + n * ldv;
    const uint8_t* mt = meta + n * ldm;
    float acc[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int l = 0; l < 4; ++l) acc[m][l] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int i0 = mt[g] & 3, i1 = (mt[g] >> 2) & 3;
      const float v0 = to_f32(v[2 * g]), v1 = to_f32(v[2 * g + 1]);
      for (int m = 0; m < MT; ++m) {
        const float* xg = x + m * K + 4 * g;
        acc[m][g & 3] += v0 * xg[i0] + v1 * xg[i1];
      }
    }
    for (int m = 0; m < MT; ++m) y[m * ldy + n] = (acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3]);
  }
}

#if FASTKERN_X86
// x laid out for the in-lane permute: each chunk of 4 groups (16 floats,
// g0 g1 g2 g3) is stored as [g0 | g2] [g1 | g3], so one vpermilps per half picks
// the kept positions of two groups at once; the 2-bit indices come straight
// from meta (vpermilps reads only the low 2 bits, so no meta byte can index out
// of its group). Groups past the last whole chunk stay in natural order.
FASTKERN_AVX2 void s24_reorder_x_avx2(const float* x, int64_t K, float* out) {
  const int64_t chunks = K / 16;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* s = x + c * 16;
    float* d = out + c * 16;
    _mm_storeu_ps(d + 0, _mm_loadu_ps(s + 0));
    _mm_storeu_ps(d + 4, _mm_loadu_ps(s + 8));
    _mm_storeu_ps(d + 8, _mm_loadu_ps(s + 4));
    _mm_storeu_ps(d + 12, _mm_loadu_ps(s + 12));
  }
  std::memcpy(out + chunks * 16, x + chunks * 16, (K - chunks * 16) * sizeof(float));
}

#endif

#if FASTKERN_X86
// Software prefetch distance of the streaming kernels. With K >= 8192 the x
// row no longer fits L1 and the hardware prefetcher alone falls behind on the
// weights (measured for 2:4 at N=4096, K=14336, one core: 17 GB/s without,
// 30+ GB/s with 8 KB).
constexpr int64_t kS24PrefetchBytes = 8192;
#endif

#if FASTKERN_X86
// acc += chunks [c0, c1) (16 columns each; c0 even) of one weight row against MT rows of the
// reordered x. With pf, one line of pf (the next rows' values) per 64 bytes of values read
// and one of pfm (their meta) per 16 chunks are prefetched into L2 (both advance); else the
// row's own streams kS24PrefetchBytes ahead.
template <class T, int MT>
FASTKERN_AVX2 inline void s24_span_avx2(__m256 (&acc)[MT][2], const float* xr, int64_t K, const T* v,
                                        const uint8_t* mt, int64_t c0, int64_t c1, const char*& pf,
                                        const char*& pfm) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 8, 10, 16, 18, 24, 26);
#define FK_S24_CHUNK(c, a)                                                                              \
  {                                                                                                     \
    int32_t mb;                                                                                         \
    std::memcpy(&mb, mt + 4 * (c), 4);                                                                  \
    const __m256i ctrl = _mm256_srlv_epi32(_mm256_set1_epi32(mb), shifts);                              \
    if (!pf) _mm_prefetch(reinterpret_cast<const char*>(v + 8 * (c)) + kS24PrefetchBytes, _MM_HINT_T0); \
    const __m256 w = gemm::load8(v + 8 * (c));                                                          \
    _Pragma("GCC unroll 4") for (int m = 0; m < MT; ++m) {                                              \
      const __m256 P = _mm256_loadu_ps(xr + m * K + 16 * (c)), Q = _mm256_loadu_ps(xr + m * K + 16 * (c) + 8); \
      const __m256 xs = _mm256_blend_ps(_mm256_permutevar_ps(P, ctrl), _mm256_permutevar_ps(Q, ctrl), 0xCC); \
      acc[m][a] = _mm256_fmadd_ps(w, xs, acc[m][a]);                                                    \
    }                                                                                                   \
  }
  int64_t c = c0;
  for (; c + 2 <= c1; c += 2) {
    if (pf) {
      _mm_prefetch(pf, _MM_HINT_T1);
      pf += 16 * sizeof(T);
      if ((c & 15) == 0) {
        _mm_prefetch(pfm, _MM_HINT_T1);
        pfm += 64;
      }
    } else if ((c & 15) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(mt + 4 * c) + kS24PrefetchBytes / (2 * sizeof(T)), _MM_HINT_T0);
    }
    FK_S24_CHUNK(c, 0)
    FK_S24_CHUNK(c + 1, 1)
  }
  if (c < c1) FK_S24_CHUNK(c, 0)
#undef FK_S24_CHUNK
}

// y[m * ldy] = the row's sums: both accumulators, then the groups past the last whole chunk
template <class T, int MT>
FASTKERN_AVX2 inline void s24_finish_avx2(const __m256 (&acc)[MT][2], const float* xr, int64_t K, const T* v,
                                          const uint8_t* mt, float* y, int64_t ldy) {
  const int64_t G = K / 4, chunks = K / 16;
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
    float s = gemm::hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
    for (int64_t g = chunks * 4; g < G; ++g) {
      const int i0 = mt[g] & 3, i1 = (mt[g] >> 2) & 3;
      const float* xg = xr + m * K + 4 * g;
      s += to_f32(v[2 * g]) * xg[i0] + to_f32(v[2 * g + 1]) * xg[i1];
    }
    y[m * ldy] = s;
  }
}

// One weight row against MT (<= 4) rows of the reordered x, two accumulators
// per x row. Whole rows are done one after another, so each thread reads its
// values and its meta as two sequential streams (rows are contiguous), what
// the hardware prefetchers follow best, plus the software prefetch 8 KB ahead.
// This kernel also serves AVX-512 machines: a zmm version (8 groups per step,
// one two-source permute) measured no faster at K=4096 and 15-20% slower at
// K >= 11008 on the development machine.
template <class T, int MT>
FASTKERN_AVX2 void s24_row_avx2(const float* xr, int64_t K, const T* v, const uint8_t* mt, float* y, int64_t ldy) {
  __m256 acc[MT][2];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const char* pf = nullptr;
  const char* pfm = nullptr;
  s24_span_avx2<T, MT>(acc, xr, K, v, mt, 0, K / 16, pf, pfm);
  s24_finish_avx2<T, MT>(acc, xr, K, v, mt, y, ldy);
}

// With kblocks the weight rows [n0, n1) go in chunks of kS24KbRows through K blocks of up to
// kS24KbCols columns (the block's rows of x in half the L1d), the accumulators parked between
// blocks (the same terms in the same lanes in the same order: bitwise the one-pass result),
// the next chunk's values and meta prefetched into L2 while a chunk computes. Measured (Zen 4,
// 32 KiB L1d, 2 threads, weights beyond L3, one process, alternating; fp32, blocked against
// whole rows): M = 1 4096 x 4096 / 11008 x 4096 / 4096 x 11008 / 4096 x 14336 0.64-0.82x the
// time (at K = 4096 too, where x fits the L1d: the row streams' own prefetch 8 KB ahead kept
// fewer lines in flight), M = 2 0.63-0.84x, M = 3 / 4 0.72-0.96x, M = 5..8 (passes of 4 rows
// of x over 256 KB row chunks) 0.80-0.87x at K = 4096, 0.92-0.99x at K = 14336. Prefetching past
// n1 (another thread's rows, at K = 14336 the whole next 8-row chunk of 256 KB) had made
// M = 8 there 1.26x slower. FASTKERN_S24_KBLOCK=0 turns it off (read on every call: A/B,
// tests).
constexpr int64_t kS24KbCols = 2048;  // at most
constexpr int64_t kS24KbRows = 8;

template <class T, int MT>
FASTKERN_AVX2 void s24_rows_avx2(const float* xr, int64_t K, const T* vals, int64_t ldv, const uint8_t* meta,
                                 int64_t ldm, int64_t n0, int64_t n1, float* y, int64_t ldy, bool kblocks) {
  if (!kblocks) {
    for (int64_t n = n0; n < n1; ++n) s24_row_avx2<T, MT>(xr, K, vals + n * ldv, meta + n * ldm, y + n, ldy);
    return;
  }
  const int64_t chunks = K / 16;
  // the block's MT rows of x in half the L1d, a multiple of 32 columns (the chunk pairs keep
  // their lanes)
  const int64_t cols = std::min<int64_t>(kS24KbCols, std::max<int64_t>(256, (features().l1d_bytes() / 2) / (MT * 4) & ~int64_t(31)));
  __m256 acc[kS24KbRows][MT][2];
  for (int64_t r0 = n0; r0 < n1; r0 += kS24KbRows) {
    const int64_t r1 = std::min(n1, r0 + kS24KbRows);
    // the next chunk of this call's rows (the last chunk prefetches its own lines: the rows
    // after n1 may be another thread's)
    const int64_t rp = r1 < n1 ? r1 : r0;
    const char* pf = reinterpret_cast<const char*>(vals + rp * ldv);
    const char* pfm = reinterpret_cast<const char*>(meta + rp * ldm);
    for (int64_t n = r0; n < r1; ++n)
      for (int m = 0; m < MT; ++m) acc[n - r0][m][0] = acc[n - r0][m][1] = _mm256_setzero_ps();
    for (int64_t c0 = 0; c0 < chunks; c0 += cols / 16) {
      const int64_t c1 = std::min(chunks, c0 + cols / 16);
      for (int64_t n = r0; n < r1; ++n)
        s24_span_avx2<T, MT>(acc[n - r0], xr, K, vals + n * ldv, meta + n * ldm, c0, c1, pf, pfm);
    }
    for (int64_t n = r0; n < r1; ++n)
      s24_finish_avx2<T, MT>(acc[n - r0], xr, K, vals + n * ldv, meta + n * ldm, y + n, ldy);
  }
}
#endif

template <class T, int MT>
void s24_rows(Isa isa, const float* x, int64_t K, const T* vals, int64_t ldv, const uint8_t* meta, int64_t ldm,
              int64_t n0, int64_t n1, float* y, int64_t ldy) {
  (void)isa;
  s24_rows_generic<T, MT>(x, K, vals, ldv, meta, ldm, n0, n1, y, ldy);
}

template <class T>
void s24_small_m(Isa isa, const at::Tensor& x2, const at::Tensor& values, const at::Tensor& meta, float* y) {
  const int64_t M = x2.size(0), K = x2.size(1), N = values.size(0);
  at::Tensor x32 = x2.to(at::kFloat).contiguous();
#if FASTKERN_X86
  if (M == 0) return;
  if (isa >= Isa::Avx2) {
    at::Tensor xr = at::empty({M, K}, x32.options());
    for (int64_t m = 0; m < M; ++m) s24_reorder_x_avx2(x32.data_ptr<float>() + m * K, K, xr.data_ptr<float>() + m * K);
    const float* x = xr.data_ptr<float>();
    const T* v = values.data_ptr<T>();
    const uint8_t* mt = meta.data_ptr<uint8_t>();
    const int64_t ldv = values.stride(0), ldm = meta.stride(0);
    // More than 4 rows of x: groups of 4 over a chunk of weight rows small
    // enough (<= 256 KB) to stay in L2 while every group passes over it, so the
    // weights still come from memory once.
    const int64_t row_bytes = (K / 2) * static_cast<int64_t>(sizeof(T)) + K / 4;
    // Up to 4 rows of x the weights are read once: chunks of >= 1 MB keep each
    // thread on one long sequential stream (short chunks alternating between
    // threads restart the prefetch streams every few rows: 2x slower measured).
    int64_t grain = M > 4 ? (int64_t(256) << 10) / std::max<int64_t>(1, row_bytes)
                          : std::max(gemm::grain_for(N, 2 * M * K), (int64_t(1) << 20) / std::max<int64_t>(1, row_bytes));
    grain = std::max<int64_t>(1, grain);
    const bool kb = env_knob("FASTKERN_S24_KBLOCK", 1) != 0;
    gemm::parallel_for_dynamic(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: s24_rows_avx2<T, 1>(xm, K, v, ldv, mt, ldm, n0, n1, ym, N, kb); break;
          case 2: s24_rows_avx2<T, 2>(xm, K, v, ldv, mt, ldm, n0, n1, ym, N, kb); break;
          case 3: s24_rows_avx2<T, 3>(xm, K, v, ldv, mt, ldm, n0, n1, ym, N, kb); break;
          default: s24_rows_avx2<T, 4>(xm, K, v, ldv, mt, ldm, n0, n1, ym, N, kb); break;
        }
      }
    });
    return;
  }
#endif
  const float* x = x32.data_ptr<float>();
  const T* v = values.data_ptr<T>();
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  const int64_t ldv = values.stride(0), ldm = meta.stride(0);
  gemm::parallel_for_dynamic(0, div_up(N, 4), gemm::grain_for(div_up(N, 4), 2 * M * K), [&](int64_t b, int64_t e) {
    const int64_t n0 = b * 4, n1 = std::min(N, e * 4);
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) s24_rows<T, 2>(isa, x + m * K, K, v, ldv, mt, ldm, n0, n1, y + m * N, N);
    for (; m < M; ++m) s24_rows<T, 1>(isa, x + m * K, K, v, ldv, mt, ldm, n0, n1, y + m * N, N);
  });
}

// --- larger M: 2:4 rows expanded into packed B slivers of the blocked GEMM.
template <class T>
struct Sparse24Rows {
  const T* vals;
  int64_t ldv;
  const uint8_t* meta;
  int64_t ldm;
  // k0 and kc are multiples of 4 (K is, and so is the GEMM's KC).
  void operator()(int64_t row0, int rows, int64_t k0, int64_t kc, int width, float* dst) const {
    std::fill(dst, dst + kc * width, 0.f);
    const int64_t g0 = k0 / 4, g1 = (k0 + kc) / 4;
    for (int r = 0; r < rows; ++r) {
      const T* v = vals + (row0 + r) * ldv;
      const uint8_t* mt = meta + (row0 + r) * ldm;
      float* d = dst + r;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t base = 4 * (g - g0);
        // added, not stored: a malformed group with both positions the same gets the sum of
        // its values, as in every other path and the reference
        d[(base + (mt[g] & 3)) * width] += to_f32(v[2 * g]);
        d[(base + ((mt[g] >> 2) & 3)) * width] += to_f32(v[2 * g + 1]);
      }
    }
  }
};

// y[i][r] = c[r][i] for i < mm, r < rows (c's rows ldc apart, y's ldy): a chunk's or a
// tile's sums, kept transposed while they accumulate, to the output. AVX2: 8 x 8 squares
// transposed in registers, rows of x outer, so both sides move whole vectors and each row of
// y takes the chunk's columns in one run (scalar copies down c's columns took 14% of a
// 90%-sparse 4096 x 4096 M = 256 block-sparse call and a fifth of a 1536 x 384 M = 1024 2:4
// call).
inline void put_transposed(Isa isa, const float* c, int64_t ldc, int64_t mm, int64_t rows, float* y, int64_t ldy) {
  int64_t r8 = 0, i8 = 0;
#if FASTKERN_X86
  if (isa >= Isa::Avx2) {
    r8 = rows / 8 * 8;
    i8 = mm / 8 * 8;
    [&]() FASTKERN_AVX2 {
      for (int64_t i = 0; i < i8; i += 8)
        for (int64_t r = 0; r < r8; r += 8) {
          __m256 v[8];
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) v[j] = _mm256_loadu_ps(c + (r + j) * ldc + i);
          gemm::transpose8x8(v);
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(y + (i + j) * ldy + r, v[j]);
        }
    }();
  }
#endif
  (void)isa;
  for (int64_t i = 0; i < mm; ++i)
    for (int64_t r = i < i8 ? r8 : 0; r < rows; ++r) y[i * ldy + r] = c[r * ldc + i];
}

#if FASTKERN_X86
// --- mid/large M on AVX2/AVX-512: only the kept weights are multiplied (half the
// FMAs of a dense product). x is transposed once to fp32 tiles xt [K][W] (W = 16..64
// columns of M with zmm, 8..16 with ymm, zero-padded), so one kept weight w[n, k]
// broadcast against row k of a tile updates W outputs y[m0 .. m0+W, n] in W/16
// (W/8) FMAs whose x operand is a load at an address decoded from meta
// (4g + position): no dense weight is built, no FMA multiplies a pruned zero.
// The weights go in K blocks of kc columns (kS24KC), and every row of a chunk of weight rows
// passes over a tile's kc x W slice of xt (16 KB with 16 columns of M, in L1). Per K block
// the chunk's values (as fp32) and meta are repacked group-major
// for tiles of kS24Rows rows (one pointer walks all the rows of a tile, and
// consecutive FMAs belong to different rows, so independent accumulator chains
// sit next to each other in the instruction stream); the chunk's outputs
// accumulate, transposed, in a per-thread buffer ct [rows][Mp] (L2) across the
// K blocks and are written to y at the end.
//
// Each output's sum runs over the K blocks in order and within a block over the
// kept weights in order, in its own accumulators: the order depends on M and the
// ISA only, so results are identical for any thread count or chunking.

constexpr int kS24Rows = 4;
// K columns per block. It was the widest M tile's xt slice within 32 KB (zmm) / 16 KB (ymm):
// 512 columns for one zmm vector of M (M = 9..16 with AVX-512), which ran 1.2-1.25x slower
// than 256 on Zen 4 (32 KiB L1d; 2 threads, one process, alternating, median ms, 512 / 256 /
// 384 columns: 4096 x 4096 M = 16 4.10 / 3.36 / 3.89, 4096 x 11008 M = 16 11.42 / 8.65 /
// 10.65); wider tiles (128 / 64 columns before) ran 0.95-1.0x the time at 256 and within 3%
// across 256..512 (4096 x 4096 / 11008 x 4096 / 4096 x 11008, M = 48..256: 128 / 256 columns
// 6.73 / 6.43, 22.47 / 21.47, 44.67 / 41.61 ms at M = 48, 64, 128). The ymm tiles had 256 for
// 16 columns of M already. The ymm tiles of 24 and 32 columns (AVX2: M > 16) take 128 columns
// (16 KB of xt at 32), which ran 0.90-0.97x the time of 256 (Zen 4, 2 threads, one process,
// alternating: 4096 x 4096 / 11008 x 4096 / 4096 x 11008 M = 24..256, 1536 x 384 / 384 x 1536
// M = 128..2048). FASTKERN_S24_KC (columns; read per call) overrides both.
constexpr int64_t kS24KC = 256;
constexpr int64_t kS24KCYmmWide = 128;

// One register tile: kS24Rows weight rows x MV vectors of M columns. pv: [ng][rows][2]
// fp32 values, pm: [ng][rows] meta bytes.
// pf: npf cache lines to prefetch (the next K block of the tile's rows), two per group
// step, so the requests spread over the call instead of stalling in a burst.
using S24TileFn = void (*)(int64_t ng, const float* xs, const float* pv, const uint8_t* pm, float* ct, int64_t ldct,
                           int rows_valid, bool accumulate, const char* const* pf, int64_t npf);

#if FASTKERN_X86
// The tiles' prefetch at group step g: lines 2 g and 2 g + 1 of pf's npf.
inline void s24_tile_prefetch(const char* const* pf, int64_t npf, int64_t g) {
  if (2 * g < npf) {
    _mm_prefetch(pf[2 * g], _MM_HINT_T0);
    if (2 * g + 1 < npf) _mm_prefetch(pf[2 * g + 1], _MM_HINT_T0);
  }
}

// The end of a zmm register tile of R weight rows x MV vectors of 16 rows of x: ct[r][16 v +
// lane] (+)= the sums (acc[0] + acc[1] where the tile keeps A = 2 accumulators per output) for
// r < rows_valid.
template <int A, int R, int MV>
FASTKERN_AVX512 inline __attribute__((always_inline)) void s24_store_tile_avx512(const __m512 (&acc)[A][R][MV],
                                                                               float* ct, int64_t ldct,
                                                                               int rows_valid, bool accumulate) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (r >= rows_valid) break;
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) {
      const __m512 s = A == 2 ? _mm512_add_ps(acc[0][r][v], acc[A - 1][r][v]) : acc[0][r][v];
      float* c = ct + r * ldct + 16 * v;
      _mm512_storeu_ps(c, accumulate ? _mm512_add_ps(_mm512_loadu_ps(c), s) : s);
    }
  }
}

// Two accumulators per (row, vector) when a tile has few of them (MV <= 2: the w0
// and w1 products chain separately), so at least 8 chains cover the FMA latency.
template <int MV>
FASTKERN_AVX512 void s24t_tile_avx512(int64_t ng, const float* xs, const float* pv, const uint8_t* pm, float* ct,
                                      int64_t ldct, int rows_valid, bool accumulate, const char* const* pf, int64_t npf) {
  constexpr int R = kS24Rows, W = 16 * MV, A = MV <= 2 ? 2 : 1;
  __m512 acc[A][R][MV];
#pragma GCC unroll 2
  for (int a = 0; a < A; ++a)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < MV; ++u) acc[a][r][u] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    s24_tile_prefetch(pf, npf, g);
    uint32_t q;
    std::memcpy(&q, pm + g * R, 4);
    const float* xg = xs + 4 * g * W;
    const float* v = pv + g * 2 * R;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // The positions are the low two 2-bit fields of the meta byte (higher bits
      // are ignored, so no byte reads outside its group's 4 rows of xs).
      const uint32_t b = q >> (8 * r);
      const float* x0 = xg + (b & 3) * W;
      const float* x1 = xg + ((b >> 2) & 3) * W;
      const __m512 w0 = _mm512_set1_ps(v[2 * r]), w1 = _mm512_set1_ps(v[2 * r + 1]);
#pragma GCC unroll 4
      for (int u = 0; u < MV; ++u) {
        acc[0][r][u] = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16 * u), acc[0][r][u]);
        acc[A - 1][r][u] = _mm512_fmadd_ps(w1, _mm512_load_ps(x1 + 16 * u), acc[A - 1][r][u]);
      }
    }
  }
  s24_store_tile_avx512(acc, ct, ldct, rows_valid, accumulate);
}

// ymm (16 registers): the tile's kS24Rows rows go in passes of RH rows over the same xs slice
// (from L1), RH x MV accumulators per pass. Every kept weight costs a broadcast for the
// tile's MV FMAs, and each FMA loads its own x vector, so wider passes load less per FMA:
// with 4 rows x 16 columns of M (MV = 2) a core ran 8-10 multiply-adds per cycle, with 2
// rows x 32 columns (MV = 4) 11.5 (Zen 4, xs in L1; a 4 x 24 pass, MV = 3, 10.9).
template <int MV, int RH = (MV >= 4 ? 2 : kS24Rows)>
FASTKERN_AVX2 void s24t_tile_avx2(int64_t ng, const float* xs, const float* pv, const uint8_t* pm, float* ct,
                                  int64_t ldct, int rows_valid, bool accumulate, const char* const* pf, int64_t npf) {
  constexpr int R = kS24Rows, W = 8 * MV, A = MV == 1 ? 2 : 1;
  static_assert(R % RH == 0, "passes of whole rows");
#pragma GCC unroll 1
  for (int h = 0; h < R && h < rows_valid; h += RH) {
    __m256 acc[A][RH][MV];
#pragma GCC unroll 2
    for (int a = 0; a < A; ++a)
#pragma GCC unroll 8
      for (int r = 0; r < RH; ++r)
#pragma GCC unroll 4
        for (int u = 0; u < MV; ++u) acc[a][r][u] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      if (h == 0) s24_tile_prefetch(pf, npf, g);
      uint32_t q;
      std::memcpy(&q, pm + g * R, 4);
      const float* xg = xs + 4 * g * W;
      const float* v = pv + g * 2 * R;
#pragma GCC unroll 8
      for (int r = 0; r < RH; ++r) {
        const uint32_t b = q >> (8 * (h + r));
        const float* x0 = xg + (b & 3) * W;
        const float* x1 = xg + ((b >> 2) & 3) * W;
        const __m256 w0 = _mm256_broadcast_ss(v + 2 * (h + r)), w1 = _mm256_broadcast_ss(v + 2 * (h + r) + 1);
#pragma GCC unroll 4
        for (int u = 0; u < MV; ++u) {
          acc[0][r][u] = _mm256_fmadd_ps(w0, _mm256_load_ps(x0 + 8 * u), acc[0][r][u]);
          acc[A - 1][r][u] = _mm256_fmadd_ps(w1, _mm256_load_ps(x1 + 8 * u), acc[A - 1][r][u]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RH; ++r) {
      if (h + r >= rows_valid) break;
#pragma GCC unroll 4
      for (int u = 0; u < MV; ++u) {
        __m256 s = A == 2 ? _mm256_add_ps(acc[0][r][u], acc[A - 1][r][u]) : acc[0][r][u];
        float* c = ct + (h + r) * ldct + 8 * u;
        _mm256_storeu_ps(c, accumulate ? _mm256_add_ps(_mm256_loadu_ps(c), s) : s);
      }
    }
  }
}
#endif

// The tiles of one ISA: fn[MV] for MV in 1..mv_max.
struct S24TileSet {
  int lanes;         // floats per vector
  int mv_max;        // widest tile, in vectors
  S24TileFn fn[5];
};

// zmm: 4 rows x 16..64 columns of M (8..16 accumulators of 32 registers); ymm (16
// registers): 4 rows x 8 or 16 columns (8 accumulators, 16 with the two chains of MV = 1),
// 24 columns (12), 32 columns in two passes of 2 rows (8 each).
S24TileSet s24_tiles(Isa isa) {
  S24TileSet t{};
#if FASTKERN_X86
  if (isa >= Isa::Avx512) {
    t.lanes = 16, t.mv_max = 4;
    t.fn[1] = &s24t_tile_avx512<1>, t.fn[2] = &s24t_tile_avx512<2>;
    t.fn[3] = &s24t_tile_avx512<3>, t.fn[4] = &s24t_tile_avx512<4>;
    return t;
  }
  if (isa >= Isa::Avx2) {
    // FASTKERN_S24_AVX2_MV (2..4, read per call): the widest tile, for A/B timing
    t.lanes = 8, t.mv_max = int(std::max<int64_t>(2, std::min<int64_t>(4, env_knob("FASTKERN_S24_AVX2_MV", 4))));
    t.fn[1] = &s24t_tile_avx2<1>, t.fn[2] = &s24t_tile_avx2<2>;
    t.fn[3] = &s24t_tile_avx2<3>, t.fn[4] = &s24t_tile_avx2<4>;
    return t;
  }
#endif
  (void)isa;
  return t;
}

// Packs one tile of kS24Rows (4) weight rows (row r at vals + r * ldv, mt + r * ldm)
// for groups [g0 + gb, g0 + ge) of the K block starting at group g0: dv [g][r][2] fp32
// values, dm [g][r] meta bytes; rows >= rows_valid become zero weights at position 0.
template <class T>
void s24_pack_scalar(const T* vals, int64_t ldv, const uint8_t* mt, int64_t ldm, int rows_valid, int64_t gb,
                     int64_t ge, int64_t g0, float* dv, uint8_t* dm) {
  constexpr int R = kS24Rows;
  for (int r = 0; r < R; ++r) {
    if (r >= rows_valid) {
      for (int64_t g = gb; g < ge; ++g) dv[g * 2 * R + 2 * r] = dv[g * 2 * R + 2 * r + 1] = 0.f, dm[g * R + r] = 0;
      continue;
    }
    const T* sv = vals + r * ldv + 2 * g0;
    const uint8_t* sm = mt + r * ldm + g0;
    for (int64_t g = gb; g < ge; ++g) {
      dv[g * 2 * R + 2 * r] = to_f32(sv[2 * g]);
      dv[g * 2 * R + 2 * r + 1] = to_f32(sv[2 * g + 1]);
      dm[g * R + r] = sm[g];
    }
  }
}

#if FASTKERN_X86
// Meta of 4 whole rows, 16 groups per step: a 4 x 16 byte transpose (SSE2, baseline
// x86-64). Returns the groups done.
inline int64_t s24_pack_meta_sse2(const uint8_t* mt, int64_t ldm, int64_t ng, int64_t g0, uint8_t* dm) {
  int64_t h = 0;
  for (; h + 16 <= ng; h += 16) {
    const __m128i m0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mt + g0 + h));
    const __m128i m1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mt + ldm + g0 + h));
    const __m128i m2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mt + 2 * ldm + g0 + h));
    const __m128i m3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mt + 3 * ldm + g0 + h));
    const __m128i a0 = _mm_unpacklo_epi8(m0, m1), a1 = _mm_unpackhi_epi8(m0, m1);
    const __m128i b0 = _mm_unpacklo_epi8(m2, m3), b1 = _mm_unpackhi_epi8(m2, m3);
    __m128i* d = reinterpret_cast<__m128i*>(dm + h * kS24Rows);
    _mm_storeu_si128(d + 0, _mm_unpacklo_epi16(a0, b0));
    _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(a0, b0));
    _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(a1, b1));
    _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(a1, b1));
  }
  return h;
}

// Values of 4 whole rows, 8 groups per step: the (v0, v1) pairs are 64-bit
// elements, so [r][g] -> [g][r] is a 4 x 8 qword transpose (unpacks and 128-bit
// lane shuffles), a fraction of an instruction per weight.
template <class T>
FASTKERN_AVX512 void s24_pack_avx512(const T* vals, int64_t ldv, const uint8_t* mt, int64_t ldm, int rows_valid,
                                     int64_t ng, int64_t g0, float* dv, uint8_t* dm) {
  constexpr int R = kS24Rows;
  static_assert(R == 4, "the transposes are written for 4 rows");
  int64_t g = 0;
  if (rows_valid == R) {
    for (; g + 8 <= ng; g += 8) {
      __m512i v[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) v[r] = _mm512_castps_si512(gemm::load16(vals + r * ldv + 2 * (g0 + g)));
      // t0: groups (0, 2, 4, 6) x rows 0,1 by 128-bit lane; t1: groups (1, 3, 5, 7); t2, t3: rows 2,3.
      const __m512i t0 = _mm512_unpacklo_epi64(v[0], v[1]), t1 = _mm512_unpackhi_epi64(v[0], v[1]);
      const __m512i t2 = _mm512_unpacklo_epi64(v[2], v[3]), t3 = _mm512_unpackhi_epi64(v[2], v[3]);
      // u0: g0 r01, g4 r01, g0 r23, g4 r23; u1: g1, g5; u2: g2, g6; u3: g3, g7.
      const __m512i u0 = _mm512_shuffle_i64x2(t0, t2, 0x88), u1 = _mm512_shuffle_i64x2(t1, t3, 0x88);
      const __m512i u2 = _mm512_shuffle_i64x2(t0, t2, 0xDD), u3 = _mm512_shuffle_i64x2(t1, t3, 0xDD);
      float* d = dv + g * 2 * R;
      _mm512_storeu_si512(d + 0, _mm512_shuffle_i64x2(u0, u1, 0x88));   // g0 g1
      _mm512_storeu_si512(d + 16, _mm512_shuffle_i64x2(u2, u3, 0x88));  // g2 g3
      _mm512_storeu_si512(d + 32, _mm512_shuffle_i64x2(u0, u1, 0xDD));  // g4 g5
      _mm512_storeu_si512(d + 48, _mm512_shuffle_i64x2(u2, u3, 0xDD));  // g6 g7
    }
    int64_t h = s24_pack_meta_sse2(mt, ldm, g, g0, dm);
    for (; h < g; ++h)
      for (int r = 0; r < R; ++r) dm[h * R + r] = mt[r * ldm + g0 + h];
  }
  s24_pack_scalar<T>(vals, ldv, mt, ldm, rows_valid, g, ng, g0, dv, dm);
}

// AVX2: 4 groups per step, a 4 x 4 qword transpose.
template <class T>
FASTKERN_AVX2 void s24_pack_avx2(const T* vals, int64_t ldv, const uint8_t* mt, int64_t ldm, int rows_valid,
                                 int64_t ng, int64_t g0, float* dv, uint8_t* dm) {
  constexpr int R = kS24Rows;
  static_assert(R == 4, "the transposes are written for 4 rows");
  int64_t g = 0;
  if (rows_valid == R) {
    for (; g + 4 <= ng; g += 4) {
      __m256d v[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) v[r] = _mm256_castps_pd(gemm::load8(vals + r * ldv + 2 * (g0 + g)));
      const __m256d t0 = _mm256_unpacklo_pd(v[0], v[1]), t1 = _mm256_unpackhi_pd(v[0], v[1]);
      const __m256d t2 = _mm256_unpacklo_pd(v[2], v[3]), t3 = _mm256_unpackhi_pd(v[2], v[3]);
      double* d = reinterpret_cast<double*>(dv + g * 2 * R);
      _mm256_storeu_pd(d + 0, _mm256_permute2f128_pd(t0, t2, 0x20));
      _mm256_storeu_pd(d + 4, _mm256_permute2f128_pd(t1, t3, 0x20));
      _mm256_storeu_pd(d + 8, _mm256_permute2f128_pd(t0, t2, 0x31));
      _mm256_storeu_pd(d + 12, _mm256_permute2f128_pd(t1, t3, 0x31));
    }
    int64_t h = s24_pack_meta_sse2(mt, ldm, g, g0, dm);
    for (; h < g; ++h)
      for (int r = 0; r < R; ++r) dm[h * R + r] = mt[r * ldm + g0 + h];
  }
  s24_pack_scalar<T>(vals, ldv, mt, ldm, rows_valid, g, ng, g0, dv, dm);
}
#endif

template <class T>
void s24_pack(Isa isa, const T* vals, int64_t ldv, const uint8_t* mt, int64_t ldm, int rows_valid, int64_t ng,
              int64_t g0, float* dv, uint8_t* dm) {
#if FASTKERN_X86
  if (isa >= Isa::Avx512) return s24_pack_avx512<T>(vals, ldv, mt, ldm, rows_valid, ng, g0, dv, dm);
  if (isa >= Isa::Avx2) return s24_pack_avx2<T>(vals, ldv, mt, ldm, rows_valid, ng, g0, dv, dm);
#endif
  (void)isa;
  s24_pack_scalar<T>(vals, ldv, mt, ldm, rows_valid, 0, ng, g0, dv, dm);
}

// Rows of weights per parallel chunk (a multiple of kS24Rows): their packed K block
// (tens to a few hundred KB) sits in L2 while every M tile passes over it, and each
// chunk reads all of xt once, so a chunk is long enough for that read to be small
// next to its FMAs.
constexpr int64_t kS24ChunkRows = 192;
// ... and with x transposed (xt) beyond this many bytes, one chunk per thread: the 4 per thread
// that balance the threads' work made each of N = 384 rows' 48-row chunks read all of xt
// (Zen 4, AVX2, 2 threads, one process, alternating: 384 x 1536 M = 512 / 1024 / 4096, xt 3 /
// 6 / 25 MB, one chunk per thread 0.97 / 0.90 / 0.84x the time; where N / 8 >= 192 rows the
// chunks are the same either way)
constexpr int64_t kS24XtBytes = int64_t(4) << 20;

// x rows [m0, m0 + W) (rows >= M as zeros) transposed to dst [K][W] fp32, 8 rows x
// 8 columns per step through registers; one thread, no ATen call: this runs before
// the parallel region, and on a shared machine each extra parallel region (fill,
// copy, transpose) can cost a scheduler tick. Returns whether x holds an inf or nan
// (exponent bits all ones), so the NaN fix-up scans x only when needed.
template <class T>
FASTKERN_AVX2 bool s24_transpose_x_avx2(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t m0, int64_t W,
                                        float* dst) {
  const __m256i expo = _mm256_set1_epi32(0x7f800000);
  __m256i bad = _mm256_setzero_si256();
  for (int64_t mb = m0; mb < m0 + W; mb += 8) {
    const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, M - mb)));
    for (int64_t k = 0; k < K; k += 8) {
      const int64_t kl = std::min<int64_t>(8, K - k);
      __m256 v[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        if (i >= rows) {
          v[i] = _mm256_setzero_ps();
        } else {
          v[i] = kl == 8 ? gemm::load8(x + (mb + i) * ldx + k) : gemm::load_partial8(x + (mb + i) * ldx + k, kl);
          const __m256i e = _mm256_and_si256(_mm256_castps_si256(v[i]), expo);
          bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, expo));
        }
      }
      gemm::transpose8x8(v);
      for (int64_t j = 0; j < kl; ++j) _mm256_storeu_ps(dst + (k + j) * W + (mb - m0), v[j]);
    }
  }
  return !_mm256_testz_si256(bad, bad);
}

// M tiles of Mp rows (a multiple of lanes), widest first: at most mv_max vectors of `lanes`
// rows each (Mp = 80, 16 lanes, 4 vectors: 64 + 16); tile t starts at row off[t], mv[t] wide.
inline void m_tiles(int64_t Mp, int64_t lanes, int64_t mv_max, std::vector<int64_t>& off, std::vector<int64_t>& mv) {
  for (int64_t m0 = 0; m0 < Mp;) {
    const int64_t v = std::min<int64_t>(mv_max, (Mp - m0) / lanes);
    off.push_back(m0), mv.push_back(v);
    m0 += v * lanes;
  }
}

// Returns whether x holds an inf or nan.
template <class T>
bool s24_mvec(Isa isa, const at::Tensor& x2_in, const at::Tensor& values, const at::Tensor& meta, float* y) {
  const at::Tensor x2 = x2_in.stride(1) == 1 ? x2_in : x2_in.contiguous();
  constexpr int R = kS24Rows;
  const S24TileSet ts = s24_tiles(isa);
  const int64_t M = x2.size(0), K = x2.size(1), N = values.size(0);
  const int64_t L = ts.lanes, Mp = round_up(M, L);
  // M tiles: widest first, the last one narrower (Mp = 80 -> 64 + 16).
  std::vector<int64_t> t_off, t_mv;
  m_tiles(Mp, L, ts.mv_max, t_off, t_mv);
  // K block: kS24KC columns (a multiple of 32); kS24KCYmmWide where ymm tiles are 24 or 32
  // columns of M wide
  const int64_t kc_def = L == 8 && t_mv[0] >= 3 ? kS24KCYmmWide : kS24KC;
  const int64_t kc = std::min(K, std::max<int64_t>(32, env_knob("FASTKERN_S24_KC", kc_def) / 32 * 32));
  // xt: tile t is [K][W_t] at xt + K * off_t; its rows are 64-byte aligned (W_t is a
  // multiple of 16 floats with zmm, of 8 with ymm; ATen's allocator aligns to 64).
  at::Tensor xt = at::empty({Mp * K + 16}, x2.options().dtype(at::kFloat));
  float* xtp = xt.data_ptr<float>();
  bool nonfinite = false;
  for (size_t t = 0; t < t_off.size(); ++t)
    nonfinite |= s24_transpose_x_avx2<T>(x2.data_ptr<T>(), x2.stride(0), M, K, t_off[t], t_mv[t] * L, xtp + K * t_off[t]);

  const T* vals = values.data_ptr<T>();
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  const int64_t ldv = values.stride(0), ldm = meta.stride(0);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // At least 4 chunks per thread when N allows (dynamic scheduling evens out a thread that
  // another process delays), but one where xt outgrows kS24XtBytes: every chunk reads all of
  // it. FASTKERN_S24_CHUNKS_PER_THREAD sets the count (read per call: A/B, tests).
  const int64_t per_thr = env_knob("FASTKERN_S24_CHUNKS_PER_THREAD", Mp * K * 4 > kS24XtBytes ? 1 : 4);
  const int64_t chunk_rows =
      std::max<int64_t>(R, std::min(kS24ChunkRows, round_up(div_up(N, std::max<int64_t>(1, per_thr) * nthreads), R)));
  const int64_t gmax = kc / 4;
  const int64_t ct_len = chunk_rows * Mp;
  const int64_t pv_len = chunk_rows * gmax * 2;
  const int64_t pm_len = div_up(chunk_rows * gmax + 8, 4);  // in floats
  const int64_t per_thread = ct_len + pv_len + pm_len + 16;
  at::Tensor bufs = at::empty({nthreads * per_thread}, xt.options());
  gemm::parallel_for_dynamic(0, div_up(N, chunk_rows), 1, [&](int64_t cb, int64_t ce) {
    float* ct = bufs.data_ptr<float>() + at::get_thread_num() * per_thread;
    float* pv = ct + ct_len;
    uint8_t* pm = reinterpret_cast<uint8_t*>(pv + pv_len);
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t n0 = c * chunk_rows, rows = std::min(chunk_rows, N - n0), ntiles = div_up(rows, R);
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kl = std::min(kc, K - k0), ng = kl / 4, g0 = k0 / 4;
        // Pack: tile i holds pv[i * ng * 2R ...] as [g][r][2] and pm[i * ng * R ...] as [g][r].
        for (int64_t i = 0; i < ntiles; ++i) {
          const int64_t n = n0 + i * R;
          const int rv = static_cast<int>(std::min<int64_t>(R, n0 + rows - n));
          s24_pack<T>(isa, vals + n * ldv, ldv, mt + n * ldm, ldm, rv, ng, g0, pv + i * ng * 2 * R, pm + i * ng * R);
        }
        for (size_t t = 0; t < t_off.size(); ++t) {
          const int64_t w = t_mv[t] * L;
          const float* xs = xtp + K * t_off[t] + k0 * w;
          const S24TileFn fn = ts.fn[t_mv[t]];
          for (int64_t i = 0; i < ntiles; ++i) {
            // The next K block of this tile's rows (values, then meta), requested
            // during the first M tile's pass.
            constexpr int64_t kMaxPf = 4 * 48;
            const char* pf[kMaxPf];
            int64_t npf = 0;
            auto lines = [&](const void* p, int64_t bytes) {
              const uintptr_t a = reinterpret_cast<uintptr_t>(p), e = a + static_cast<uintptr_t>(bytes);
              for (uintptr_t l = a & ~uintptr_t(63); l < e && npf < kMaxPf; l += 64) pf[npf++] = reinterpret_cast<const char*>(l);
            };
            if (t == 0 && k0 + kc < K) {
              const int64_t kn = std::min(kc, K - k0 - kc);
              for (int64_t r = i * R; r < std::min(rows, i * R + R); ++r) {
                lines(vals + (n0 + r) * ldv + (k0 + kc) / 2, (kn / 2) * static_cast<int64_t>(sizeof(T)));
                lines(mt + (n0 + r) * ldm + (k0 + kc) / 4, kn / 4);
              }
            }
            fn(ng, xs, pv + i * ng * 2 * R, pm + i * ng * R, ct + i * R * Mp + t_off[t], Mp,
               static_cast<int>(std::min<int64_t>(R, rows - i * R)), k0 > 0, pf, npf);
          }
        }
      }
      put_transposed(isa, ct, Mp, M, rows, y + n0, N);
    }
  });
  return nonfinite;
}

// --- bf16 x and values on CPUs with AVX512-BF16, from M = 6: the two kept weights of a
// group meet their two activations in one vdpbf16ps lane (one instruction per kept pair
// and 16 rows of x, where the fp32 kernel above, which bf16 x took before, runs two FMAs).
// The x pair a weight row needs depends on its meta, so x is expanded into all six
// position pairs of each group (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): xe [G][6][W] bf16 pairs
// per M tile of W = 16 MV rows (3x the bytes of x in bf16), and a kept pair reads its x
// vectors at the offset of its combination. The weights are repacked as one 64-bit record
// per (row, group): the bf16 pair ordered by position (first position in the low half)
// and the byte offset of its combination. A group whose two positions are the same (only
// a malformed meta has them; the kernels that skip pruned weights add both values) is
// stored as the bf16 sum of its values paired with a zero weight at the neighbouring
// position. vdpbf16ps products are exact in fp32; it flushes denormal inputs and outputs
// to zero (inside the 1e-2 contract of bf16 outputs). Each output's sum runs over the
// groups in order, in an order that depends on M only (1 and 2 threads agree). s24b_gemm
// has the loops; the tile loop is bound by its loads (two a cycle here, narrow ones
// included: a record and MV x vectors per row and group), not by vdpbf16ps.
constexpr int kS24bRows = 6;
constexpr int64_t kS24bChunkRows = 96;  // a multiple of kS24bRows
constexpr int64_t kS24bL1Bytes = 32 << 10;
// xe of a K super-block: stays in the L3 while every chunk of weight rows streams it
constexpr int64_t kS24bXeBytes = int64_t(6) << 20;
// rows of x per pass (bounds ct, [N][Mp] fp32)
constexpr int64_t kS24bPassRows = 256;

// Smallest M that takes it, below the streaming path's limit: measured (2 threads, one
// process, alternating; ms, this / the streaming kernel) 4096x4096 M = 5 1.71 / 1.62, M = 6
// 1.74 / 1.84, M = 8 1.61 / 2.23; 11008x4096 M = 6 4.45 / 5.13, M = 8 4.91 / 6.34; 4096x11008
// M = 5 4.59 / 4.56, M = 6 5.46 / 5.62. FASTKERN_S24_BF16_MIN_M overrides it (0: off); read
// per call (A/B timing, tests).
constexpr int64_t kS24bMinM = 6;
inline bool s24b_enabled(int64_t M) {
  const int64_t lo = env_knob("FASTKERN_S24_BF16_MIN_M", kS24bMinM);
  return lo > 0 && M >= lo && active_isa() >= Isa::Avx512 && features().avx512bf16;
}

// The combination of positions (a = meta & 3, b = meta >> 2 & 3), indexed a | b << 2, either
// order; a == b (a malformed group) takes the pair of a and its neighbour a ^ 1.
constexpr int kS24bCombo[16] = {0, 0, 1, 2, 0, 0, 3, 4, 1, 3, 5, 5, 2, 4, 5, 5};
constexpr int kS24bFirst[6] = {0, 0, 0, 1, 1, 2};
constexpr int kS24bSecond[6] = {1, 2, 3, 2, 3, 3};

// 8 x 8 transpose of 64-bit elements: r[i] lane j -> r[j] lane i
FASTKERN_AVX512BF16 inline void transpose8x8_epi64(__m512i r[8]) {
  __m512i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]);      // r_i[2l] r_i+1[2l] per 128-bit lane l
    t[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]);  // r_i[2l+1] r_i+1[2l+1]
  }
  const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + j] = _mm512_permutex2var_epi64(t[i + j], lo, t[i + 2 + j]);      // columns j, j + 4 of 4 rows
      u[i + 2 + j] = _mm512_permutex2var_epi64(t[i + j], hi, t[i + 2 + j]);  // columns j + 2, j + 6
    }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_i64x2(u[j], u[4 + j], 0x44);
    r[j + 4] = _mm512_shuffle_i64x2(u[j], u[4 + j], 0xEE);
  }
}

// Rows [m0, m0 + W) of x (bf16 bits, rows >= M as zeros) expanded to dst [G][6][W] bf16
// pairs: 16 rows x 8 groups per step, transposed in registers, one two-source word permute
// per combination. Returns whether x holds an inf or nan.
FASTKERN_AVX512BF16 bool s24b_expand_x(const uint16_t* X, int64_t ldx, int64_t M, int64_t G, int64_t m0, int64_t W,
                                       uint32_t* dst) {
  // X: the block's first group; G: its groups
  __m512i idx[6];
  for (int c = 0; c < 6; ++c) {
    alignas(64) uint16_t w[32];
    for (int i = 0; i < 16; ++i) {
      const int base = (i < 8 ? 0 : 32) + 4 * (i % 8);
      w[2 * i] = static_cast<uint16_t>(base + kS24bFirst[c]);
      w[2 * i + 1] = static_cast<uint16_t>(base + kS24bSecond[c]);
    }
    idx[c] = _mm512_load_si512(w);
  }
  const __m512i expo = _mm512_set1_epi16(0x7f80);
  __mmask32 bad = 0;
  for (int64_t rb = 0; rb < W; rb += 16) {
    const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, M - (m0 + rb))));
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      const int ng = static_cast<int>(std::min<int64_t>(8, G - g0));
      const __mmask8 mk = static_cast<__mmask8>((1u << ng) - 1);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if (i < rows) {
          r[i] = _mm512_maskz_loadu_epi64(mk, X + (m0 + rb + i) * ldx + 4 * g0);
          bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(r[i], expo), expo);
        } else {
          r[i] = _mm512_setzero_si512();
        }
      }
      transpose8x8_epi64(r);
      transpose8x8_epi64(r + 8);
      for (int j = 0; j < ng; ++j) {
        uint32_t* d = dst + (g0 + j) * 6 * W + rb;
#pragma GCC unroll 6
        for (int c = 0; c < 6; ++c) _mm512_storeu_si512(d + c * W, _mm512_permutex2var_epi16(r[j], idx[c], r[8 + j]));
      }
    }
  }
  return bad != 0;
}

// Records of weight rows [n, n + rows) (rows <= kS24bRows; the others zero weights) for
// groups [g0, g0 + ng): rec[r][g] = bf16 pair (first position low) | combination offset
// (bytes at W = 16) << 32; 16 groups per step.
FASTKERN_AVX512BF16 void s24b_pack(const uint32_t* vals, int64_t ldv, const uint8_t* mt, int64_t ldm, int rows,
                                   int64_t g0, int64_t ng, uint64_t* rec) {
  alignas(64) int32_t tab[16];
  for (int i = 0; i < 16; ++i) tab[i] = kS24bCombo[i] * 64;
  const __m512i table = _mm512_load_si512(tab);
  const __m512i three = _mm512_set1_epi32(3), hi16 = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int r = 0; r < kS24bRows; ++r) {
    uint64_t* d = rec + r * ng;
    if (r >= rows) {
      std::memset(d, 0, size_t(ng) * 8);  // a zero pair at combination 0
      continue;
    }
    const uint32_t* v = vals + r * ldv + g0;
    const uint8_t* m = mt + r * ldm + g0;
    for (int64_t g = 0; g < ng; g += 16) {
      const int cnt = static_cast<int>(std::min<int64_t>(16, ng - g));
      const __mmask16 mk = static_cast<__mmask16>((1u << cnt) - 1);
      // the same groups of the next tile's rows, which the next call packs (2.9 -> 1.6 ms
      // at 4096 x 4096, M = 16: the hardware prefetchers alone stop at every 4 KB page)
      _mm_prefetch(reinterpret_cast<const char*>(v + g + kS24bRows * ldv), _MM_HINT_T1);
      if (g % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(m + g + kS24bRows * ldm), _MM_HINT_T1);
      __m512i p = _mm512_maskz_loadu_epi32(mk, v + g);
      const __m512i mb = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, m + g));
      const __m512i a = _mm512_and_si512(mb, three), b = _mm512_and_si512(_mm512_srli_epi32(mb, 2), three);
      const __m512i off = _mm512_permutexvar_epi32(_mm512_or_si512(a, _mm512_slli_epi32(b, 2)), table);
      p = _mm512_mask_ror_epi32(p, _mm512_cmpgt_epi32_mask(a, b), p, 16);  // the first position low
      const __mmask16 dup = _mm512_cmpeq_epi32_mask(a, b);
      if (dup) {
        const __m512 s = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p, 16)),
                                       _mm512_castsi512_ps(_mm512_and_si512(p, hi16)));
        __m512i sb = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s));
        // a odd: a is the pair's second position (a ^ 1 < a), so the sum goes high
        sb = _mm512_mask_slli_epi32(sb, _mm512_test_epi32_mask(a, _mm512_set1_epi32(1)), sb, 16);
        p = _mm512_mask_mov_epi32(p, dup, sb);
      }
      const __m512i lo8 = _mm512_permutex2var_epi32(p, ilo, off), hi8 = _mm512_permutex2var_epi32(p, ihi, off);
      _mm512_mask_storeu_epi64(d + g, static_cast<__mmask8>(cnt >= 8 ? 0xFF : (1u << cnt) - 1), lo8);
      if (cnt > 8) _mm512_mask_storeu_epi64(d + g + 8, static_cast<__mmask8>((1u << (cnt - 8)) - 1), hi8);
    }
  }
}

// One register tile: kS24bRows weight rows x MV vectors of 16 rows of x over ng groups.
// xs: the tile's xe at the K block ([ng][6][16 MV] pairs); rec [rows][ldr] records.
// Two accumulators per output (alternate groups) where MV <= 2, so at least 12
// independent vdpbf16ps chains cover its latency.
template <int MV>
FASTKERN_AVX512BF16 void s24b_tile(int64_t ng, const uint32_t* xs, const uint64_t* rec, int64_t ldr, float* ct,
                                   int64_t ldct, int rows_valid, bool accumulate) {
  constexpr int R = kS24bRows, A = MV <= 2 ? 2 : 1;
  constexpr int64_t GS = 6 * 16 * MV * 4;  // bytes of a group's xe
  __m512 acc[A][R][MV] = {};
  const char* xg = reinterpret_cast<const char*>(xs);
  auto step = [&](int a, int64_t g) FASTKERN_AVX512BF16 {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      // one 64-bit load per record, the pair broadcast from the general register (a
      // broadcast from memory would be one more load)
      const uint64_t q = rec[r * ldr + g];
      const char* xp = xg + g * GS + static_cast<int64_t>(q >> 32) * MV;
      const __m512i w = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(q)));
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v)
        acc[a][r][v] = dpbf16_inplace(acc[a][r][v], _mm512_loadu_si512(xp + 64 * v), w);
    }
  };
  int64_t g = 0;
  if (A == 2)
    for (; g + 2 <= ng; g += 2) step(0, g), step(A - 1, g + 1);
  for (; g < ng; ++g) step(0, g);
  s24_store_tile_avx512(acc, ct, ldct, rows_valid, accumulate);
}

using S24bTileFn = void (*)(int64_t, const uint32_t*, const uint64_t*, int64_t, float*, int64_t, int, bool);
constexpr S24bTileFn kS24bTiles[5] = {nullptr, &s24b_tile<1>, &s24b_tile<2>, &s24b_tile<3>, &s24b_tile<4>};

// y [M, N] (fp32) = x (bf16 [M, K], unit stride along K) times the 2:4 weight. Returns
// whether x holds an inf or nan.
//
// Loops: M in passes of up to kS24bPassRows rows; K in super-blocks whose xe (all M tiles)
// stays in the L3 (kS24bXeBytes), expanded at the start of each; within one, the weight rows
// in chunks (the parallel items): a chunk's records for the super-block are packed (each row
// read as one run), then for each L1 K block and M tile every row tile of the chunk passes
// over the slice. Each chunk streams the super-block's xe once from the L3 (384 / chunk
// rows bytes per pair product). Products accumulate in ct [N][Mp] (shared, each chunk its
// rows) across the super-blocks; the last one writes y.
bool s24b_gemm(const at::Tensor& x2, const at::Tensor& values_in, const at::Tensor& meta, float* y) {
  constexpr int R = kS24bRows;
  // rows read as 32-bit pairs: an odd row stride would split pairs
  const at::Tensor values = values_in.stride(0) % 2 == 0 ? values_in : values_in.contiguous();
  const int64_t M = x2.size(0), K = x2.size(1), N = values.size(0), G = K / 4;
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x2.data_ptr<c10::BFloat16>());
  const uint32_t* vals = reinterpret_cast<const uint32_t*>(values.data_ptr<c10::BFloat16>());
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  const int64_t ldx = x2.stride(0), ldv = values.stride(0) / 2, ldm = meta.stride(0);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk_rows = std::max<int64_t>(R, std::min(kS24bChunkRows, round_up(div_up(N, 4 * nthreads), R)));
  const int64_t nchunks = div_up(N, chunk_rows), ntile_max = chunk_rows / R;
  bool nonfinite = false;
  for (int64_t p0 = 0; p0 < M; p0 += kS24bPassRows) {
    const int64_t Mq = std::min(kS24bPassRows, M - p0), Mp = round_up(Mq, 16);
    std::vector<int64_t> t_off, t_mv;
    m_tiles(Mp, 16, 4, t_off, t_mv);
    // L1 K block: the widest tile's slice of xe within kS24bL1Bytes; super-block: whole
    // L1 blocks whose xe (24 Mp bytes per group) stays within kS24bXeBytes
    const int64_t gb = std::max<int64_t>(1, std::min(G, kS24bL1Bytes / (6 * 16 * t_mv[0] * 4)));
    const int64_t gs_max = std::max<int64_t>(1, kS24bXeBytes / (24 * Mp * gb)) * gb;
    const int64_t gs = std::min(G, round_up(div_up(G, div_up(G, gs_max)), gb));  // equal super-blocks
    Scratch xes(ScratchSlot::XPack, size_t(6 * Mp * gs) * 4);
    Scratch cts(ScratchSlot::Out, size_t(N * Mp) * 4);
    uint32_t* xe = xes.as<uint32_t>();
    float* ct = cts.as<float>();
    for (int64_t s0 = 0; s0 < G; s0 += gs) {
      const int64_t ns = std::min(gs, G - s0);
      const bool last = s0 + ns == G;
      // xe of tile t: [ns][6][16 MV] pairs at xe + 6 ns t_off
      for (size_t t = 0; t < t_off.size(); ++t)
        nonfinite |= s24b_expand_x(X + p0 * ldx + 4 * s0, ldx, Mq, ns, t_off[t], 16 * t_mv[t], xe + 6 * ns * t_off[t]);
      gemm::parallel_for_dynamic(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
        Scratch recs(ScratchSlot::Worker1, size_t(ntile_max * R * ns) * 8);
        uint64_t* rec = recs.as<uint64_t>();
        for (int64_t c = cb; c < ce; ++c) {
          const int64_t n0 = c * chunk_rows, rows = std::min(chunk_rows, N - n0), ntiles = div_up(rows, int64_t(R));
          for (int64_t i = 0; i < ntiles; ++i) {
            const int64_t n = n0 + i * R;
            s24b_pack(vals + n * ldv, ldv, mt + n * ldm, ldm, static_cast<int>(std::min<int64_t>(R, n0 + rows - n)), s0,
                      ns, rec + i * R * ns);
          }
          float* cc = ct + n0 * Mp;
          for (int64_t g0 = 0; g0 < ns; g0 += gb) {
            const int64_t ng = std::min(gb, ns - g0);
            for (size_t t = 0; t < t_off.size(); ++t) {
              const uint32_t* xs = xe + 6 * ns * t_off[t] + g0 * 6 * 16 * t_mv[t];
              for (int64_t i = 0; i < ntiles; ++i)
                kS24bTiles[t_mv[t]](ng, xs, rec + i * R * ns + g0, ns, cc + i * R * Mp + t_off[t], Mp,
                                    static_cast<int>(std::min<int64_t>(R, rows - i * R)), s0 + g0 > 0);
            }
          }
          if (last) put_transposed(Isa::Avx512, cc, Mp, Mq, rows, y + p0 * N + n0, N);
        }
      });
    }
  }
  return nonfinite;
}
#endif  // FASTKERN_X86

template <class T>
void s24_typed(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& meta, at::Tensor& out32) {
  const Isa isa = active_isa();
  const int64_t M = x2.size(0), K = x2.size(1), N = values.size(0);
  float* y = out32.data_ptr<float>();
  // AVX2/AVX-512: the streaming kernel up to M = 8, s24_mvec above (measured on
  // one core at 4096x4096: M = 8 4.4 vs 4.7 ms, M = 12 6.5 vs 4.6, M = 16 8.5 vs 4.5;
  // the streaming kernel's cost grows with M, s24_mvec's is flat up to its 16-column tile).
  const int64_t stream_max_m = isa >= Isa::Avx2 ? kS24StreamMaxM : kSmallM;
  bool pair_gemm = false;  // bf16 x on AVX512-BF16: s24b_gemm from its own M bound
#if FASTKERN_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) pair_gemm = K > 0 && s24b_enabled(M);
#endif
  if (M <= stream_max_m && K > 0 && !pair_gemm) {
    s24_small_m<T>(isa, x2, values, meta, y);
    const uint8_t* mt = meta.data_ptr<uint8_t>();
    const int64_t ldm = meta.stride(0);
    propagate_nonfinite(x2, out32, [&](int64_t n, int64_t k) {
      const int mb = mt[n * ldm + k / 4], p = static_cast<int>(k % 4);
      return p != (mb & 3) && p != ((mb >> 2) & 3);
    });
    return;
  }
#if FASTKERN_X86
  if (isa >= Isa::Avx2 && K > 0) {
    const bool nonfinite = pair_gemm ? s24b_gemm(x2.stride(1) == 1 ? x2 : x2.contiguous(), values, meta, y)
                                     : s24_mvec<T>(isa, x2, values, meta, y);
    if (!nonfinite) return;
    const uint8_t* mt = meta.data_ptr<uint8_t>();
    const int64_t ldm = meta.stride(0);
    propagate_nonfinite(x2, out32, [&](int64_t n, int64_t k) {
      const int mb = mt[n * ldm + k / 4], p = static_cast<int>(k % 4);
      return p != (mb & 3) && p != ((mb >> 2) & 3);
    });
    return;
  }
#endif
  gemm::StridedRows<T> pa{x2.data_ptr<T>(), x2.stride(0), x2.stride(1), isa};
  Sparse24Rows<T> pb{values.data_ptr<T>(), values.stride(0), meta.data_ptr<uint8_t>(), meta.stride(0)};
  gemm::blocked_gemm(M, N, K, gemm::micro_kernel(isa), pa, pb, y, N);
}

at::Tensor linear_sparse24_cpu(const at::Tensor& x, const at::Tensor& values_in, const at::Tensor& meta_in,
                               const c10::optional<at::Tensor>& bias) {
  const char* op = "linear_sparse24";
  gemm::check_cpu_float(op, "x", x);
  gemm::check_cpu_float(op, "values", values_in);
  TORCH_CHECK(values_in.dim() == 2, "fastkern_C::linear_sparse24: ", describe("values", values_in),
              " must be 2-D [N, K/2]");
  TORCH_CHECK(values_in.scalar_type() == x.scalar_type(), "fastkern_C::linear_sparse24: ",
              describe("values", values_in), " must have the dtype of ", describe("x", x));
  const int64_t N = values_in.size(0), K = 2 * values_in.size(1);
  TORCH_CHECK(K % 4 == 0, "fastkern_C::linear_sparse24: 2:4 sparsity needs K divisible by 4, got K=", K,
              " from ", describe("values", values_in));
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "fastkern_C::linear_sparse24: ", describe("x", x),
              " must be [..., K] with K=", K, " from ", describe("values", values_in));
  TORCH_CHECK(meta_in.device().is_cpu() && meta_in.scalar_type() == at::kByte && meta_in.dim() == 2 &&
                  meta_in.size(0) == N && meta_in.size(1) == K / 4,
              "fastkern_C::linear_sparse24: ", describe("meta", meta_in), " must be a uint8 CPU tensor of shape [",
              N, ", ", K / 4, "]");
  gemm::check_bias(op, bias, N);
  // The kernels read rows with unit stride along K.
  at::Tensor values = values_in.stride(1) == 1 ? values_in : values_in.contiguous();
  at::Tensor meta = meta_in.stride(1) == 1 ? meta_in : meta_in.contiguous();
  const int64_t M = gemm::rows_of(x);
  at::Tensor x2 = x.reshape({M, K});
  at::Tensor out32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  switch (x.scalar_type()) {
    case at::kFloat: s24_typed<float>(x2, values, meta, out32); break;
    case at::kHalf: s24_typed<c10::Half>(x2, values, meta, out32); break;
    default: s24_typed<c10::BFloat16>(x2, values, meta, out32); break;
  }
  return gemm::finish(out32, bias, x, N);
}

// =================================================================== block-sparse
//
// Columns k >= K of the last block column hold padding (zeros in the format);
// every kernel stops at K, so x is never read past its end and padding never
// touches the result, whatever it holds.

struct BlockLayout {
  int64_t bn, bk, K, N, nbr;
  const int64_t* row_ptr;
  const int64_t* col_idx;
  int64_t valid_rows(int64_t nb) const { return std::min(bn, N - nb * bn); }
  int64_t k_len(int64_t blk) const { return std::min(bk, K - col_idx[blk] * bk); }
};

// --- small M: dot products along k, R rows of a block row at a time.
template <class T, int MT, int R>
void bs_dot_tile_generic(const float* x, int64_t K, const T* blocks, const BlockLayout& L, int64_t nb, int64_t r0,
                         float* y, int64_t ldy) {
  float acc[MT][R][8];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 8; ++l) acc[m][r][l] = 0.f;
  for (int64_t blk = L.row_ptr[nb]; blk < L.row_ptr[nb + 1]; ++blk) {
    const int64_t c0 = L.col_idx[blk] * L.bk, len = L.k_len(blk);
    const T* w = blocks + blk * L.bn * L.bk + r0 * L.bk;
    for (int64_t kk = 0; kk < len; kk += 8) {
      const int64_t cnt = std::min<int64_t>(8, len - kk);
      float wv[R][8], xv[MT][8];
      for (int l = 0; l < 8; ++l) {
        for (int r = 0; r < R; ++r) wv[r][l] = l < cnt ? to_f32(w[r * L.bk + kk + l]) : 0.f;
        for (int m = 0; m < MT; ++m) xv[m][l] = l < cnt ? x[m * K + c0 + kk + l] : 0.f;
      }
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; ++r)
          for (int l = 0; l < 8; ++l) acc[m][r][l] += xv[m][l] * wv[r][l];
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float t = 0.f;
      for (int l = 0; l < 8; ++l) t += acc[m][r][l];
      y[m * ldy + nb * L.bn + r0 + r] = t;
    }
}

#if FASTKERN_X86
// The first pass over a block row prefetches whole blocks ahead of it: with one row of x 8 KB
// ahead into L1, with 2-4 rows 16 KB ahead into L2. Measured (Zen 4, 32 KiB L1d, 2 threads,
// 16 x 16 blocks at 90% sparsity, weights beyond L3, one process, alternating; L2 16 KB against
// L1 8 KB): M = 2 / 3 / 4 0.83-0.96x / 0.72-0.94x / 0.76-0.94x the time on 4096 x 4096,
// 11008 x 4096 and 4096 x 14336, but M = 1 0.94-0.96x at K = 4096 and 1.09-1.10x at K = 14336.
constexpr int64_t kBsAheadL2 = 16384;

template <class T, int MT, int R>
FASTKERN_AVX2 void bs_dot_tile_avx2(const float* x, int64_t K, const T* blocks, const BlockLayout& L, int64_t nb,
                                    int64_t r0, float* y, int64_t ldy) {
  __m256 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t bk = L.bk;
  const int64_t block_bytes = L.bn * bk * static_cast<int64_t>(sizeof(T));
  for (int64_t blk = L.row_ptr[nb]; blk < L.row_ptr[nb + 1]; ++blk) {
    const int64_t c0 = L.col_idx[blk] * bk, len = L.k_len(blk);
    const T* w = blocks + blk * L.bn * bk + r0 * bk;
    if (r0 == 0) {  // the first pass over a block row pulls in whole blocks ahead
      const char* ahead = reinterpret_cast<const char*>(blocks + blk * L.bn * bk) + (MT > 1 ? kBsAheadL2 : kS24PrefetchBytes);
      if (MT > 1)
        for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T1);
      else
        for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    }
    int64_t kk = 0;
    for (; kk + 8 <= len; kk += 8) {
      __m256 wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = gemm::load8(w + r * bk + kk);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + c0 + kk);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    if (kk < len) {
      __m256 wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = gemm::load_partial8(w + r * bk + kk, len - kk);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const __m256 xv = gemm::load_partial8(x + m * K + c0 + kk, len - kk);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) y[m * ldy + nb * L.bn + r0 + r] = gemm::hsum8(acc[m][r]);
}
#endif

#if FASTKERN_X86
// One row of x against R rows of a block row: a zmm accumulator per weight row,
// lanes along k. The blocks of a block row lie one after another in memory and
// are read front to back, so the weights stream in address order (what the
// hardware prefetcher follows best); the last, cut block column uses lane masks.
template <class T, int R>
FASTKERN_AVX512 void bs_dot_rows_avx512(const float* x, const T* blocks, const BlockLayout& L, int64_t nb,
                                        int64_t r0, float* y) {
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t bk = L.bk;
  for (int64_t blk = L.row_ptr[nb]; blk < L.row_ptr[nb + 1]; ++blk) {
    const int64_t c0 = L.col_idx[blk] * bk, len = L.k_len(blk);
    const T* w = blocks + blk * L.bn * bk + r0 * bk;
    // Blocks follow one another in memory (and block rows too): pull in the
    // lines 8 KB ahead, as the 2:4 kernel does, so the stream never waits on DRAM.
    const char* ahead = reinterpret_cast<const char*>(w) + kS24PrefetchBytes;
    for (int64_t off = 0; off < R * bk * static_cast<int64_t>(sizeof(T)); off += 64)
      _mm_prefetch(ahead + off, _MM_HINT_T0);
    int64_t kk = 0;
    for (; kk + 16 <= len; kk += 16) {
      const __m512 xv = _mm512_loadu_ps(x + c0 + kk);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(gemm::load16(w + r * bk + kk), xv, acc[r]);
    }
    if (kk < len) {
      const __mmask16 mk = gemm::first_lanes16(len - kk);
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + c0 + kk);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(gemm::maskz_load16(mk, w + r * bk + kk), xv, acc[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) y[r0 + r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

template <class T, int MT>
void bs_dot_block_row(Isa isa, const float* x, int64_t K, const T* blocks, const BlockLayout& L, int64_t nb,
                      float* y, int64_t ldy) {
  const int64_t rows = L.valid_rows(nb);
  int64_t r = 0;
#if FASTKERN_X86
  if (isa >= Isa::Avx512) {
    // Rows of x one at a time: the block row (tens of KB) comes from memory for
    // the first and from L1/L2 for the others.
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + m * K;
      float* ym = y + m * ldy + nb * L.bn;
      int64_t rr = 0;
      for (; rr + 16 <= rows; rr += 16) bs_dot_rows_avx512<T, 16>(xm, blocks, L, nb, rr, ym);
      if (rr + 8 <= rows) bs_dot_rows_avx512<T, 8>(xm, blocks, L, nb, rr, ym), rr += 8;
      if (rr + 4 <= rows) bs_dot_rows_avx512<T, 4>(xm, blocks, L, nb, rr, ym), rr += 4;
      if (rr + 2 <= rows) bs_dot_rows_avx512<T, 2>(xm, blocks, L, nb, rr, ym), rr += 2;
      if (rr < rows) bs_dot_rows_avx512<T, 1>(xm, blocks, L, nb, rr, ym);
    }
    return;
  }
  if (isa >= Isa::Avx2) {
    for (; r + 4 <= rows; r += 4) bs_dot_tile_avx2<T, MT, 4>(x, K, blocks, L, nb, r, y, ldy);
    for (; r < rows; ++r) bs_dot_tile_avx2<T, MT, 1>(x, K, blocks, L, nb, r, y, ldy);
    return;
  }
#endif
  (void)isa;
  for (; r + 4 <= rows; r += 4) bs_dot_tile_generic<T, MT, 4>(x, K, blocks, L, nb, r, y, ldy);
  for (; r < rows; ++r) bs_dot_tile_generic<T, MT, 1>(x, K, blocks, L, nb, r, y, ldy);
}

// The dot-product path up to this M (the tiles of x^T panels above). Measured (Zen 4, 2
// threads, 90% sparse 16 x 16 blocks, 4096 x 4096, weights beyond L3, one process,
// alternating, median ms, panels / dot products): AVX2 M = 6 0.70 / 0.43, 8 0.69 / 0.51, 10
// 0.69 / 0.59, 12 0.69 / 0.68, 16 0.72 / 0.90; AVX-512 M = 5 0.47 / 0.41, 6 0.47 / 0.44, 8 0.49
// / 0.54. In the harness (peers timed between) the dot products stayed ahead at M = 12 (0.66-0.79
// against 1.13 ms). With weights in the L3, 8 x 8 blocks lost with AVX-512 from M = 5 (0.44 /
// 0.47) and 32 x 32 blocks with AVX2 from M = 10 (0.44 / 0.55). (Before the panels' block
// prefetch (row_tiles) the AVX2 panels cost as much for 5..16 rows as for 16, 1.2-1.5 ms here.)
// FASTKERN_BS_SMALL_MAX_M (read per call) overrides.
constexpr int64_t kBsSmallMaxMAvx2 = 12, kBsSmallMaxMWide = 6;
int64_t bs_small_max_m(Isa isa, int64_t bk) {
  const int64_t m = isa >= Isa::Avx512 ? (bk >= 16 ? kBsSmallMaxMWide : kSmallM)
                    : isa >= Isa::Avx2 ? kBsSmallMaxMAvx2
                                       : kSmallM;
  return env_knob("FASTKERN_BS_SMALL_MAX_M", m);
}

template <class T>
void bs_small_m(Isa isa, const at::Tensor& x2, const T* blocks, const BlockLayout& L, float* y) {
  const int64_t M = x2.size(0), K = x2.size(1), N = L.N;
  at::Tensor x32 = x2.to(at::kFloat).contiguous();
  const float* x = x32.data_ptr<float>();
  const int64_t macs_per_row = div_up(L.row_ptr[L.nbr], std::max<int64_t>(1, L.nbr)) * L.bn * L.bk * M;
  gemm::parallel_for_dynamic(0, L.nbr, gemm::grain_for(L.nbr, macs_per_row), [&](int64_t b, int64_t e) {
    for (int64_t nb = b; nb < e; ++nb) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) bs_dot_block_row<T, 2>(isa, x + m * K, K, blocks, L, nb, y + m * N, N);
      for (; m < M; ++m) bs_dot_block_row<T, 1>(isa, x + m * K, K, blocks, L, nb, y + m * N, N);
    }
  });
}

// --- larger M: x transposed once into panels of PW rows of x, xt [Mp / PW][K][PW] (PW: the
// narrow tile's columns of M, Mp = M rounded up to it), so the columns of M that a register
// tile needs at one k sit together and a block's bk steps read one contiguous run. (With x^T
// as one [K][Mp] matrix those lines lay Mp * 4 bytes apart: at Mp = 256 every line of x a
// tile touched fell into the same 4 of the L1's 64 sets.) For each block row a register
// tile of R weight rows x MT columns of M runs one broadcast weight times a vector of x per
// k, so weights are used straight from the block (no packing), and prefetches the next
// block's x slice on the way (the slices of consecutive blocks lie anywhere in x).
// A tile function gets xp, its panel at k = 0, and ldp, the distance between panels (a
// tile two panels wide reads the second at xp + ldp).

// Bytes of weights and x slice per group of blocks (bs_large_m): about half the L1.
constexpr int64_t kBsGroupBytes = 24 << 10;
// Rows of x per pass of M tiles and bytes of x per K chunk (bs_large_m): a chunk of x stays
// in L2 while every block row passes over it.
constexpr int64_t kBsPassRows = 256;
constexpr int64_t kBsChunkBytes = 1024 << 10;

template <int R>
void bs_outer_tile_generic(const float* xp, int64_t ldp, const float* wrow, const BlockLayout& L, int64_t b0,
                           int64_t b1, int64_t r0, float* tile /* [R][8] */, bool add) {
  (void)ldp;
  float acc[R][8];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < 8; ++l) acc[r][l] = add ? tile[r * 8 + l] : 0.f;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t c0 = L.col_idx[blk] * L.bk, len = L.k_len(blk);
    const float* w = wrow + (blk - b0) * L.bn * L.bk + r0 * L.bk;
    const float* xb = xp + c0 * 8;
    for (int64_t kk = 0; kk < len; ++kk) {
      const float* xk = xb + kk * 8;
      for (int r = 0; r < R; ++r) {
        const float wv = w[r * L.bk + kk];
        for (int l = 0; l < 8; ++l) acc[r][l] += wv * xk[l];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < 8; ++l) tile[r * 8 + l] = acc[r][l];
}

#if FASTKERN_X86
// ymm: R weight rows x 16 columns of M (panels of 16)
template <int R>
FASTKERN_AVX2 void bs_outer_tile_avx2(const float* xp, int64_t ldp, const float* wrow, const BlockLayout& L,
                                      int64_t b0, int64_t b1, int64_t r0, float* tile /* [R][16] */, bool add) {
  (void)ldp;
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) acc[r][v] = add ? _mm256_loadu_ps(tile + r * 16 + 8 * v) : _mm256_setzero_ps();
  const int64_t bk = L.bk;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t c0 = L.col_idx[blk] * bk, len = L.k_len(blk);
    const float* w = wrow + (blk - b0) * L.bn * bk + r0 * bk;
    const float* xb = xp + c0 * 16;
    const float* xn = xp + L.col_idx[std::min(blk + 1, b1 - 1)] * bk * 16;  // the next block's slice
    for (int64_t kk = 0; kk < len; ++kk) {
      _mm_prefetch(reinterpret_cast<const char*>(xn + kk * 16), _MM_HINT_T0);
      const __m256 x0 = _mm256_loadu_ps(xb + kk * 16), x1 = _mm256_loadu_ps(xb + kk * 16 + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 wv = _mm256_broadcast_ss(w + r * bk + kk);
        acc[r][0] = _mm256_fmadd_ps(wv, x0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(wv, x1, acc[r][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(tile + r * 16, acc[r][0]);
    _mm256_storeu_ps(tile + r * 16 + 8, acc[r][1]);
  }
}
#endif

#if FASTKERN_X86
// R weight rows x 16*MV columns of M with zmm. Each weight is broadcast
// straight from its block (a load-port op that this class of core issues
// alongside two FMAs per cycle), each x^T vector serves R rows: 16x16 (MV 1, for
// M <= 16) and 8x32 (MV 2) run at 200+ GFLOP/s per core on L2-resident x^T.
template <int R, int MV>
FASTKERN_AVX512 void bs_outer_tile_avx512(const float* xp, int64_t ldp, const float* wrow, const BlockLayout& L,
                                          int64_t b0, int64_t b1, int64_t r0, float* tile, bool add) {
  __m512 acc[R][MV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) acc[r][v] = add ? _mm512_loadu_ps(tile + r * 16 * MV + 16 * v) : _mm512_setzero_ps();
  const int64_t bk = L.bk;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t c0 = L.col_idx[blk] * bk, len = L.k_len(blk);
    const float* w = wrow + (blk - b0) * L.bn * bk + r0 * bk;
    const float* xb = xp + c0 * 16;
    const float* xn = xp + L.col_idx[std::min(blk + 1, b1 - 1)] * bk * 16;  // the next block's slice
    for (int64_t kk = 0; kk < len; ++kk) {
      __m512 xv[MV];
#pragma GCC unroll 2
      for (int v = 0; v < MV; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(xn + kk * 16 + v * ldp), _MM_HINT_T0);
        xv[v] = _mm512_loadu_ps(xb + kk * 16 + v * ldp);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 wv = _mm512_set1_ps(w[r * bk + kk]);
#pragma GCC unroll 2
        for (int v = 0; v < MV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(tile + r * 16 * MV + 16 * v, acc[r][v]);
}
#endif

#if FASTKERN_X86
// bf16 x and blocks with AVX512-BF16 and an even bk: the same tiles on bf16 pairs. x is
// packed as panels of pairs [Mp / 16][K/2][16] (x[m][2j], x[m][2j + 1]) and each (w[k], w[k + 1]) pair is
// broadcast straight from its block against it: one vdpbf16ps forms two exact products per
// lane, where the fp32 tile above converts each block row to fp32 first and runs one FMA per
// product. The tile-function type is shared with the fp32 tiles, so xt and wrow arrive as
// float pointers to that u32 and bf16 data. An odd last block (K odd, the block cut at K)
// ends in a half pair: its weight's second half, padding, is left out.
template <int R, int MV>
FASTKERN_AVX512BF16 void bs_outer_tile_bf16(const float* xp_, int64_t ldp, const float* wrow_, const BlockLayout& L,
                                            int64_t b0, int64_t b1, int64_t r0, float* tile, bool add) {
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xp_);
  const uint16_t* wrow = reinterpret_cast<const uint16_t*>(wrow_);
  __m512 acc[R][MV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) acc[r][v] = add ? _mm512_loadu_ps(tile + r * 16 * MV + 16 * v) : _mm512_setzero_ps();
  const int64_t bk = L.bk;
  auto step = [&](const uint32_t* xk, const uint32_t* xpf, auto pair) FASTKERN_AVX512BF16 {
    __m512i xv[MV];
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) {
      _mm_prefetch(reinterpret_cast<const char*>(xpf + v * ldp), _MM_HINT_T0);
      xv[v] = _mm512_loadu_si512(xk + v * ldp);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_set1_epi32(static_cast<int32_t>(pair(r)));
#pragma GCC unroll 2
      for (int v = 0; v < MV; ++v) acc[r][v] = dpbf16_inplace(acc[r][v], xv[v], wv);
    }
  };
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t c0 = L.col_idx[blk] * bk, len = L.k_len(blk), np = len / 2;
    const uint16_t* w = wrow + (blk - b0) * L.bn * bk + r0 * bk;
    const uint32_t* xb = xp + (c0 / 2) * 16;
    const uint32_t* xn = xp + (L.col_idx[std::min(blk + 1, b1 - 1)] * bk / 2) * 16;  // the next block's slice
    for (int64_t kp = 0; kp < np; ++kp)
      step(xb + kp * 16, xn + kp * 16, [&](int r) {
        uint32_t u;
        std::memcpy(&u, w + r * bk + 2 * kp, sizeof(u));
        return u;
      });
    if (len & 1) step(xb + np * 16, xn + np * 16, [&](int r) { return uint32_t(w[r * bk + len - 1]); });
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(tile + r * 16 * MV + 16 * v, acc[r][v]);
}
#endif

using OuterTileFn = void (*)(const float*, int64_t, const float*, const BlockLayout&, int64_t, int64_t, int64_t,
                             float*, bool);

// Register tiles over x^T: `wide` while more than narrow.mt columns of M remain,
// `narrow` for the rest (so M = 16 does not pay for 32 columns).
struct OuterTiles {
  int mt;              // columns of M per tile
  int rmax;            // weight rows per tile
  OuterTileFn fn[17];  // fn[R] for R in 1..rmax
};
struct OuterKernel {
  OuterTiles wide, narrow;
};

template <template <int> class F, int... Rs>
OuterTiles make_tiles(int mt) {
  OuterTiles t{mt, static_cast<int>(sizeof...(Rs)), {nullptr}};
  OuterTileFn fns[] = {F<Rs>::fn...};
  for (int i = 0; i < static_cast<int>(sizeof...(Rs)); ++i) t.fn[i + 1] = fns[i];
  return t;
}
template <int R>
struct GenericTile {
  static constexpr OuterTileFn fn = &bs_outer_tile_generic<R>;
};
#if FASTKERN_X86
template <int R>
struct Avx2Tile {
  static constexpr OuterTileFn fn = &bs_outer_tile_avx2<R>;
};
template <int R>
struct Avx512Tile1 {
  static constexpr OuterTileFn fn = &bs_outer_tile_avx512<R, 1>;
};
template <int R>
struct Avx512Tile2 {
  static constexpr OuterTileFn fn = &bs_outer_tile_avx512<R, 2>;
};
template <int R>
struct Bf16Tile1 {
  static constexpr OuterTileFn fn = &bs_outer_tile_bf16<R, 1>;
};
template <int R>
struct Bf16Tile2 {
  static constexpr OuterTileFn fn = &bs_outer_tile_bf16<R, 2>;
};
#endif

// bf16: the pair tiles (bs_outer_tile_bf16) where this CPU and the block width allow them
OuterKernel outer_kernel(Isa isa, bool bf16_pairs) {
#if FASTKERN_X86
  if (bf16_pairs)
    return {make_tiles<Bf16Tile2, 1, 2, 3, 4, 5, 6, 7, 8>(32),
            make_tiles<Bf16Tile1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>(16)};
  if (isa >= Isa::Avx512)
    return {make_tiles<Avx512Tile2, 1, 2, 3, 4, 5, 6, 7, 8>(32),
            make_tiles<Avx512Tile1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>(16)};
  if (isa >= Isa::Avx2) {
    // 6 x 16 (4 x 24, fewer loads per FMA, measured 0-15% slower at 90% sparsity, M = 256)
    const OuterTiles t = make_tiles<Avx2Tile, 1, 2, 3, 4, 5, 6>(16);
    return {t, t};
  }
#endif
  (void)isa;
  (void)bf16_pairs;
  const OuterTiles t = make_tiles<GenericTile, 1, 2, 3, 4>(8);
  return {t, t};
}

// FASTKERN_BLOCKSPARSE_BF16 (read on every call): 0 keeps bf16 on the fp32 tiles
bool use_bf16_pairs(Isa isa, const BlockLayout& L) {
  return isa >= Isa::Avx512 && features().avx512bf16 && L.bk % 2 == 0 && env_knob("FASTKERN_BLOCKSPARSE_BF16", 1) != 0;
}

// Returns whether x holds an inf or nan.
template <class T>
bool bs_large_m(Isa isa, const at::Tensor& x2, const T* blocks, const BlockLayout& L, float* y) {
  const bool pairs = std::is_same<T, c10::BFloat16>::value && use_bf16_pairs(isa, L);
  const OuterKernel ok = outer_kernel(isa, pairs);
  const int64_t M = x2.size(0), K = x2.size(1), N = L.N, bn = L.bn, bk = L.bk;
  // Whole narrow tiles; a wide tile starts only where more than a narrow one is left,
  // which (wide.mt = 2 * narrow.mt or equal) keeps it inside Mp.
  const int64_t pw = ok.narrow.mt, Mp = round_up(M, pw);
  // x (rows past M as zeros) in the panels [Mp / pw][Kx][pw] of 4-byte elements: fp32, or
  // bf16 pairs (an odd K padded with a zero)
  const int64_t Kx = pairs ? (K + 1) / 2 : K, ldp = Kx * pw;
  std::optional<Scratch> xs;  // the panels (AVX2 and AVX-512 fp32)
  at::Tensor xt;              // the panels (otherwise)
  const float* xtp;
  bool nonfinite;
#if FASTKERN_X86
  if (!pairs && isa >= Isa::Avx2) {
    // panels transposed in parallel, inf / nan noted on the way
    const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
    xs.emplace(ScratchSlot::XPack, size_t(Mp * Kx) * 4);
    float* dst = xs->as<float>();
    xtp = dst;
    std::atomic<bool> bad{false};
    at::parallel_for(0, Mp / pw, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        if (s24_transpose_x_avx2<T>(xc.data_ptr<T>(), xc.stride(0), M, K, p * pw, pw, dst + p * ldp))
          bad.store(true, std::memory_order_relaxed);
    });
    nonfinite = bad.load();
  } else
#endif
  {
    at::Tensor xpad;
    if (pairs) {
      at::Tensor xe = at::zeros({Mp, 2 * Kx}, x2.options());
      xe.narrow(0, 0, M).narrow(1, 0, K).copy_(x2);
      xpad = xe.view(at::kInt);
    } else {
      xpad = at::zeros({Mp, K}, x2.options().dtype(at::kFloat));
      xpad.narrow(0, 0, M).copy_(x2);
    }
    xt = xpad.view({Mp / pw, pw, Kx}).transpose(1, 2).contiguous();
    xtp = static_cast<const float*>(xt.data_ptr());
    nonfinite = any_nonfinite(x2);
  }
  const int64_t macs_per_row = div_up(L.row_ptr[L.nbr], std::max<int64_t>(1, L.nbr)) * L.bn * L.bk * Mp;
  // An M tile takes a block row's blocks in groups whose weights and x slice together fill
  // about half the L1, so every weight-row tile after the first finds both there (2-6%
  // measured at 90% sparsity, M = 256, K >= 11008, where a block row's slice outgrew the L1).
  const int64_t wbytes = pairs ? 2 : 4, slice_cols = std::max(ok.wide.mt, ok.narrow.mt);
  const int64_t group = std::max<int64_t>(1, kBsGroupBytes / (bk * (bn * wbytes + slice_cols * 4)));
  // The tiles of M, widest first while more than a narrow one is left
  std::vector<int64_t> t_m0;
  std::vector<const OuterTiles*> t_kind;
  for (int64_t m0 = 0; m0 < M;) {
    const OuterTiles* t = M - m0 > ok.narrow.mt ? &ok.wide : &ok.narrow;
    t_m0.push_back(m0);
    t_kind.push_back(t);
    m0 += t->mt;
  }
  // The blocks [b0, b1) of block row nb against the M tiles [ti0, ti1): tile ti's sums, [rows][mt],
  // at acc + (t_m0[ti] - t_m0[ti0]) * bn, carried from group to group (each output's sum runs
  // over the blocks in order) and added to what is there when `add`.
  const bool panel_pf = env_knob("FASTKERN_BS_PANEL_PF", 1) != 0;
  const int64_t nnzb_all = L.row_ptr[L.nbr];
  auto row_tiles = [&](at::Tensor& conv, int64_t nb, int64_t b0, int64_t b1, size_t ti0, size_t ti1, bool add,
                       float* acc) {
    const int64_t rows = L.valid_rows(nb);
    const float* wrow;
    if (std::is_same<T, float>::value) {
      wrow = reinterpret_cast<const float*>(blocks) + b0 * bn * bk;
    } else if (pairs) {  // the pair tiles read the bf16 blocks as they are
      wrow = reinterpret_cast<const float*>(blocks + b0 * bn * bk);
    } else {  // fp32 copy of the blocks when they are half precision
      const int64_t cnt = (b1 - b0) * bn * bk;
      if (!conv.defined() || conv.numel() < cnt) conv = at::empty({cnt}, at::kFloat);
      float* d = conv.data_ptr<float>();
      const T* s = blocks + b0 * bn * bk;
      for (int64_t i = 0; i < cnt; ++i) d[i] = to_f32(s[i]);
      wrow = d;
    }
    for (size_t ti = ti0; ti < ti1; ++ti) {
      const OuterTiles& t = *t_kind[ti];
      const float* xp = xtp + (t_m0[ti] / pw) * ldp;
      float* a = acc + (t_m0[ti] - t_m0[ti0]) * bn;
      for (int64_t g0 = b0; g0 < b1; g0 += group) {
        const int64_t g1 = std::min(b1, g0 + group);
        // the group's first block (the pair tiles address bf16 through a float pointer)
        const float* wg = pairs ? reinterpret_cast<const float*>(reinterpret_cast<const uint16_t*>(wrow) +
                                                                 (g0 - b0) * bn * bk)
                                : wrow + (g0 - b0) * bn * bk;
        // the first M tile brings the blocks in from memory: where its row tiles split the
        // block row, the next group's lines into L2, spread over the row tiles (each tile reads
        // a few rows of every block, a pattern the hardware prefetchers do not follow; a tile
        // of all the rows reads the blocks front to back, and there a prefetch cost 7-15% at
        // M = 16 with AVX-512). Measured (Zen 4, 2 threads, 4096 x 4096, 90% sparse 16 x 16
        // blocks, one process, alternating, ms, with / without): AVX2 M = 17 0.81 / 1.40, 32
        // 0.79 / 1.45, 64 1.50 / 2.26, 128 4.13 / 4.15; AVX-512 M = 17 0.68 / 0.79, 64 1.28 /
        // 1.47, 128 2.83 / 2.87. FASTKERN_BS_PANEL_PF=0 turns it off.
        const char* pf = nullptr;
        int64_t pf_lines = 0, pf_per = 0;
        if (panel_pf && ti == ti0 && t.rmax < rows && std::is_same<T, float>::value) {
          // the blocks after this group (those of the next block row too)
          const int64_t n1 = std::min(nnzb_all, b1 + group) - g1;
          if (n1 > 0) {
            pf = reinterpret_cast<const char*>(reinterpret_cast<const float*>(blocks) + g1 * bn * bk);
            pf_lines = std::min(n1, group) * bn * bk * 4 / 64;
            pf_per = div_up(pf_lines, div_up(rows, t.rmax));
          }
        }
        for (int64_t r0 = 0; r0 < rows; r0 += t.rmax) {
          const int R = static_cast<int>(std::min<int64_t>(t.rmax, rows - r0));
          for (int64_t i = 0; i < pf_per && pf_lines > 0; ++i, --pf_lines, pf += 64) __builtin_prefetch(pf, 0, 2);
          t.fn[R](xp, ldp, wg, L, g0, g1, r0, a + r0 * t.mt, add || g0 > b0);
        }
      }
    }
  };

  // K in chunks when a chunk of x (all the rows of a pass of M tiles) would not stay in L2:
  // every block row takes its blocks of one chunk against the chunk's x before the next
  // chunk, so x is read from L3 once per thread and chunk instead of once per block row
  // (at 90% sparsity and M = 256 a block row read a tenth of x: more than its work could
  // hide), and each block row's sums wait in yT between chunks. Needs each block row's
  // blocks in column order (the format's own order; other orders take all of K as one chunk).
  // Measured (2 threads, 90% sparse, 16 x 16 blocks, one pass against 1 MB chunks, in one
  // process): AVX-512 M = 256 4096 x 14336 20.6 -> 17.2 ms, 4096 x 11008 15.0 -> 12.9,
  // 4096 x 4096 unchanged; M = 1024 11008 x 4096 87.6 -> 68.5; AVX2 M = 256 4096 x 14336
  // 30.5 -> 24.7 (768 KB chunks). FASTKERN_BS_CHUNK_KB (read per call) sets the chunk bytes.
  const int64_t kbn = div_up(K, bk);
  int64_t pass_rows = 0;  // the widest pass of M tiles, rounded to whole tiles
  std::vector<size_t> passes{0};
  for (size_t ti = 0; ti < t_m0.size(); ++ti)
    if (t_m0[ti] + t_kind[ti]->mt - t_m0[passes.back()] >= kBsPassRows || ti + 1 == t_m0.size()) {
      pass_rows = std::max(pass_rows, t_m0[ti] + t_kind[ti]->mt - t_m0[passes.back()]);
      passes.push_back(ti + 1);
    }
  const int64_t chunk_cols =
      std::max<int64_t>(1, (env_knob("FASTKERN_BS_CHUNK_KB", kBsChunkBytes >> 10) << 10) / (pass_rows * bk * 4));
  bool in_order = chunk_cols < kbn;
  for (int64_t nb = 0; in_order && nb < L.nbr; ++nb)
    for (int64_t blk = L.row_ptr[nb] + 1; blk < L.row_ptr[nb + 1]; ++blk)
      if (L.col_idx[blk] < L.col_idx[blk - 1]) {
        in_order = false;
        break;
      }
  // One chunk (all of K) otherwise: the sums of a block row then gather in a per-thread buffer.
  const int64_t nchunks = in_order ? div_up(kbn, chunk_cols) : 1, cols = in_order ? chunk_cols : kbn;
  const int64_t row_stride = pass_rows * bn;  // a block row's sums of a pass
  // yT: block row nb's sums at nb * row_stride, kept from chunk to chunk
  std::optional<Scratch> yts;
  if (nchunks > 1) yts.emplace(ScratchSlot::Out, size_t(L.nbr * row_stride) * 4);
  // block row nb's sums of the M tiles [ti0, ti1) to y (an empty row gives zeros)
  auto put_row = [&](int64_t nb, size_t ti0, size_t ti1, const float* acc) {
    for (size_t ti = ti0; ti < ti1; ++ti) {
      const int64_t m0 = t_m0[ti], mt = t_kind[ti]->mt, mm = std::min(mt, M - m0);
      if (L.row_ptr[nb] == L.row_ptr[nb + 1])
        for (int64_t m = m0; m < m0 + mm; ++m) std::fill_n(y + m * N + nb * bn, L.valid_rows(nb), 0.f);
      else
        put_transposed(isa, acc + (m0 - t_m0[ti0]) * bn, mt, mm, L.valid_rows(nb), y + m0 * N + nb * bn, N);
    }
  };
  std::vector<int64_t> pos(static_cast<size_t>(L.nbr));
  for (size_t ps = 0; ps + 1 < passes.size(); ++ps) {
    const size_t ti0 = passes[ps], ti1 = passes[ps + 1];
    std::copy(L.row_ptr, L.row_ptr + L.nbr, pos.begin());
    for (int64_t c = 0; c < nchunks; ++c) {
      gemm::parallel_for_dynamic(0, L.nbr, gemm::grain_for(L.nbr, macs_per_row / nchunks), [&](int64_t b, int64_t e) {
        at::Tensor conv;
        std::vector<float> ct(static_cast<size_t>(nchunks > 1 ? 0 : row_stride));
        for (int64_t nb = b; nb < e; ++nb) {
          float* acc = nchunks > 1 ? yts->as<float>() + nb * row_stride : ct.data();
          const int64_t b0 = pos[nb];
          int64_t b1 = b0;
          while (b1 < L.row_ptr[nb + 1] && L.col_idx[b1] < (c + 1) * cols) ++b1;
          pos[nb] = b1;
          if (b1 > b0) row_tiles(conv, nb, b0, b1, ti0, ti1, b0 > L.row_ptr[nb], acc);
          if (nchunks == 1) put_row(nb, ti0, ti1, acc);
        }
      });
    }
    // after the chunks, in a pass of its own: the output's lines written while a chunk of x
    // is in use would push it out of L2 (4096 x 4096 M = 256: 5% slower measured)
    if (nchunks > 1)
      at::parallel_for(0, L.nbr, 16, [&](int64_t b, int64_t e) {
        for (int64_t nb = b; nb < e; ++nb) put_row(nb, ti0, ti1, yts->as<float>() + nb * row_stride);
      });
  }
  return nonfinite;
}

void check_layout(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t nbr, int64_t nnzb, int64_t kb,
                  int64_t K, int64_t bk) {
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* ci = col_idx.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[nbr] == nnzb, "fastkern_C::linear_blocksparse: row_ptr must start at 0 and end at ",
              "nnz_blocks=", nnzb, ", got row_ptr[0]=", rp[0], " and row_ptr[", nbr, "]=", rp[nbr]);
  for (int64_t i = 0; i < nbr; ++i)
    TORCH_CHECK(rp[i] <= rp[i + 1], "fastkern_C::linear_blocksparse: row_ptr must be non-decreasing, got row_ptr[",
                i, "]=", rp[i], " > row_ptr[", i + 1, "]=", rp[i + 1]);
  for (int64_t i = 0; i < nnzb; ++i)
    TORCH_CHECK(ci[i] >= 0 && ci[i] < kb, "fastkern_C::linear_blocksparse: col_idx[", i, "]=", ci[i],
                " is out of range: x has K=", K, " columns, ", kb, " block columns of width ", bk);
}

at::Tensor linear_blocksparse_cpu(const at::Tensor& x, const at::Tensor& blocks_in, const at::Tensor& row_ptr_in,
                                  const at::Tensor& col_idx_in, int64_t out_features,
                                  const c10::optional<at::Tensor>& bias) {
  const char* op = "linear_blocksparse";
  gemm::check_cpu_float(op, "x", x);
  gemm::check_cpu_float(op, "blocks", blocks_in);
  TORCH_CHECK(x.dim() >= 1, "fastkern_C::linear_blocksparse: ", describe("x", x), " must be [..., K]");
  TORCH_CHECK(blocks_in.dim() == 3 && blocks_in.size(1) > 0 && blocks_in.size(2) > 0,
              "fastkern_C::linear_blocksparse: ", describe("blocks", blocks_in),
              " must be 3-D [nnz_blocks, bn, bk] with a positive block size");
  TORCH_CHECK(blocks_in.scalar_type() == x.scalar_type(), "fastkern_C::linear_blocksparse: ",
              describe("blocks", blocks_in), " must have the dtype of ", describe("x", x));
  TORCH_CHECK(out_features >= 0, "fastkern_C::linear_blocksparse: out_features must be >= 0, got ", out_features);
  const int64_t nnzb = blocks_in.size(0), bn = blocks_in.size(1), bk = blocks_in.size(2);
  const int64_t N = out_features, K = x.size(-1), nbr = div_up(N, bn), kb = div_up(K, bk);
  TORCH_CHECK(row_ptr_in.device().is_cpu() && row_ptr_in.scalar_type() == at::kLong && row_ptr_in.dim() == 1 &&
                  row_ptr_in.size(0) == nbr + 1,
              "fastkern_C::linear_blocksparse: ", describe("row_ptr", row_ptr_in),
              " must be an int64 CPU tensor of shape [", nbr + 1, "] (ceil(out_features / bn) + 1)");
  TORCH_CHECK(col_idx_in.device().is_cpu() && col_idx_in.scalar_type() == at::kLong && col_idx_in.dim() == 1 &&
                  col_idx_in.size(0) == nnzb,
              "fastkern_C::linear_blocksparse: ", describe("col_idx", col_idx_in),
              " must be an int64 CPU tensor of shape [", nnzb, "] (one per block)");
  gemm::check_bias(op, bias, N);
  at::Tensor row_ptr = row_ptr_in.contiguous(), col_idx = col_idx_in.contiguous();
  check_layout(row_ptr, col_idx, nbr, nnzb, kb, K, bk);
  at::Tensor blocks = blocks_in.contiguous();

  const int64_t M = gemm::rows_of(x);
  at::Tensor x2 = x.reshape({M, K});
  at::Tensor out32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0) {
    const BlockLayout L{bn, bk, K, N, nbr, row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int64_t>()};
    const Isa isa = active_isa();
    float* y = out32.data_ptr<float>();
    // returns whether x may hold an inf or nan (the large-M path knows; propagate_nonfinite
    // scans x otherwise)
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const T* bp = blocks.data_ptr<T>();
      if (M > bs_small_max_m(isa, bk)) return bs_large_m<T>(isa, x2, bp, L, y);
      bs_small_m<T>(isa, x2, bp, L, y);
      return true;
    };
    // A missing block is a block of zeros to the reference.
    auto pruned = [&](int64_t n, int64_t k) {
      const int64_t nb = n / bn, kb_ = k / bk;
      for (int64_t blk = L.row_ptr[nb]; blk < L.row_ptr[nb + 1]; ++blk)
        if (L.col_idx[blk] == kb_) return false;
      return true;
    };
    bool maybe_nonfinite;
    switch (x.scalar_type()) {
      case at::kFloat: maybe_nonfinite = run(float()); break;
      case at::kHalf: maybe_nonfinite = run(c10::Half()); break;
      default: maybe_nonfinite = run(c10::BFloat16()); break;
    }
    if (maybe_nonfinite) propagate_nonfinite(x2, out32, pruned);
  }
  return gemm::finish(out32, bias, x, N);
}

}  // namespace
}  // namespace sparse
}  // namespace cpu
}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern_C, CPU, m) {
  m.impl("linear_sparse24", &fastkern::cpu::sparse::linear_sparse24_cpu);
  m.impl("linear_blocksparse", &fastkern::cpu::sparse::linear_blocksparse_cpu);
}
