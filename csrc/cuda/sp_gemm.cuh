// 2:4 sparse tensor cores (mma.sp, m16n8k32, fp16/bf16, fp32 accumulate):
//   out[M, N] = x[M, K] @ decompress_2_4(values, meta)^T + bias
// mma.sp takes the sparse operand as A (the m16 side), so the roles of the
// dense tensor-core kernel (tc_gemm.cuh) are swapped: the weight rows n are the
// instruction's M dimension and the activation rows m its N dimension; the
// kernel computes out^T tile by tile and stores it transposed.
//
// Fragment facts used below (PTX ISA "Matrix fragments for sparse mma.m16n8k32
// with .f16/.bf16" and "Sparse matrix storage"), with g = lane / 4, t = lane % 4:
// - A (the compressed 16 x 16 tile of `values`, i.e. 16 weight rows x 32 dense
//   k) has the layout of a dense m16n8k16 A fragment over the compressed
//   columns: reg 0 = row g, compressed cols 2t, 2t+1 (= the two kept values of
//   dense group t), reg 1 = row g + 8, same cols, reg 2 / 3 = the same at
//   compressed cols + 8 (dense groups 4 + t). The canonical `values` row is
//   exactly that compressed row, so one ldmatrix.x4 of a 16 x 16 values tile
//   gives the fragment, as for dense A.
// - B (32 k x 8 n, here x rows as columns): reg r = column g, k = 8r + 2t, 2t+1
//   (lower k in the lower half). x rows are k-contiguous, so a plain ldmatrix of
//   8 x rows gives it, one 16-byte chunk per register.
// - D: regs 0, 1 = row g (weight row), cols 2t, 2t+1 (x rows); regs 2, 3 = row g + 8.
// - Metadata (sparsity selector 0): in each quad, lanes t = 0 and 1 supply it.
//   Lane t (0 or 1) holds dense k 16t .. 16t + 15 of the k32 step: bits 0-15 for
//   row g, bits 16-31 for row g + 8; within each 16 bits, the 4 groups of 4
//   dense k in order, 4 bits each, and within a group's nibble, bits 0-1 the
//   position of the first kept value (compressed col even), bits 2-3 the second.
//   The canonical meta byte of a group is idx0 | idx1 << 2, i.e. that nibble, so
//   the instruction's word is the canonical bytes of 4 consecutive groups with
//   their nibbles packed: it is derived in registers from the canonical layout
//   on every use (4 bytes of meta per row and k16 cross memory instead of 2;
//   no cached copy of the weight is needed).
// - ::ordered_metadata (PTX 8.5, CUDA 12.5+) requires idx0 < idx1 in each
//   nibble, which the canonical format guarantees (formats.compress_2_4);
//   0b0000, 0b0101, 0b1010, 0b1111 are invalid for any variant. Zero-filled
//   meta (tile tails past K or N) is replaced by 0b0100 (positions 0 and 1),
//   whose values are zero-filled too.
//
// Non-finite x: the instruction never reads x at pruned positions, while the
// reference multiplies them by an explicit zero (0 * inf = NaN, as F.linear on
// the dense weight does). A follow-up kernel recomputes, densely, every output
// row whose x row holds a NaN or inf (each CTA scans one x row; rows that are
// all finite cost one read of x).
#pragma once

#include "tc_gemm.cuh"

namespace fastkern {
namespace cuda {

// BW weight rows x BX activation rows per CTA, WW x WX per warp.
template <int BW_, int BX_, int WW_, int WX_, int STAGES_>
struct SpCfg {
  static constexpr int BW = BW_, BX = BX_, WW = WW_, WX = WX_, STAGES = STAGES_;
  static constexpr int WARPS_W = BW / WW, WARPS_X = BX / WX;
  static constexpr int THREADS = 32 * WARPS_W * WARPS_X;
  static constexpr int MI = WW / 16, NI = WX / 8;
  static_assert(WW % 16 == 0 && WX % 8 == 0, "warp tile must be whole m16 x n8 tiles");
  static_assert(STAGES >= 2, "the ring needs at least two stages");
};

// M <= 16 (decode): 64 weight rows per CTA, one x row block; many CTAs stream the weight.
using SpCfgSmall = SpCfg<64, 16, 16, 16, 4>;
// 16 < M <= 64.
using SpCfgMid = SpCfg<128, 64, 32, 32, 4>;
// M > 64.
using SpCfgLarge = SpCfg<128, 128, 64, 32, 3>;

// Per k-tile (64 dense k): x 128 bytes per row (swizzled, as A in tc_gemm),
// values 64 bytes per weight row (swizzled for 64-byte rows), meta 16 bytes per
// weight row (plain: the lanes that read it hit 8 different rows, 16 bytes apart).
constexpr int kSpValBytes = 64;
constexpr int kSpMetaBytes = 16;

struct Sp24Params {
  CommonParams c;  // a = x [M, K]; k_tiles counts 64-wide dense k-tiles
  const uint8_t* v;
  int64_t v_row_bytes;
  bool v_aligned;
  const uint8_t* meta;
  int64_t m_row_bytes;
  bool m_aligned;
};

template <typename T>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e);

#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define FASTKERN_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define FASTKERN_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif

template <>
__device__ __forceinline__ void mma_sp_16832<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                     uint32_t e) {
  asm volatile(FASTKERN_MMA_SP
               "f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[4], uint32_t e) {
  asm volatile(FASTKERN_MMA_SP
               "bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

// 4 canonical meta bytes (groups q = 0..3 in bytes 0..3) -> 16 bits, group q in
// bits 4q..4q+3. A zero byte (tile padding) becomes 0b0100.
__device__ __forceinline__ uint32_t sp_meta_nibbles(uint32_t w) {
  w |= __vcmpeq4(w, 0u) & 0x04040404u;
  return (w & 0xFu) | ((w >> 4) & 0xF0u) | ((w >> 8) & 0xF00u) | ((w >> 12) & 0xF000u);
}

template <class Cfg, typename T>
__global__ void __launch_bounds__(Cfg::THREADS) sp24_mma_kernel(const Sp24Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr int kXStage = Cfg::BX * kTileBytes;
  constexpr int kVStage = Cfg::BW * kSpValBytes;
  constexpr int kStage = kXStage + kVStage + Cfg::BW * kSpMetaBytes;

  const CommonParams& c = p.c;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ww = warp / Cfg::WARPS_X, wx = warp % Cfg::WARPS_X;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::BW;     // weight rows
  const int64_t m0 = (c.m_tile_base + blockIdx.y) * Cfg::BX;         // x rows

  const int64_t per_split = (c.k_tiles + c.splits - 1) / c.splits;
  const int64_t kt_begin = min(c.k_tiles, blockIdx.z * per_split);
  const int n_iter = static_cast<int>(min(c.k_tiles, kt_begin + per_split) - kt_begin);

  const uint8_t* x_rows = c.a + m0 * c.a_row_bytes;
  const uint8_t* v_rows = p.v + n0 * p.v_row_bytes;
  const uint8_t* m_rows = p.meta + n0 * p.m_row_bytes;

  auto load_stage = [&](int stage, int64_t kt) {
    uint8_t* s = smem + stage * kStage;
    load_tile<Cfg::BX, 8, Cfg::THREADS, true>(s, x_rows, c.M - m0, c.a_row_bytes, kt * kTileBytes, c.a_aligned);
    load_tile<Cfg::BW, 4, Cfg::THREADS, true>(s + kXStage, v_rows, c.N - n0, p.v_row_bytes, kt * kSpValBytes,
                                              p.v_aligned);
    load_tile<Cfg::BW, 1, Cfg::THREADS, false>(s + kXStage + kVStage, m_rows, c.N - n0, p.m_row_bytes,
                                               kt * kSpMetaBytes, p.m_aligned);
  };

#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < n_iter) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  float acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
  for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  const int g = lane >> 2, t = lane & 3;
  const int meta_half = t & 1;  // lanes 2, 3 compute the same word as 0, 1; the selector ignores them
  int stage = 0, next_stage = Cfg::STAGES - 1;
  for (int it = 0; it < n_iter; ++it) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    const int nt = it + Cfg::STAGES - 1;
    if (nt < n_iter) load_stage(next_stage, kt_begin + nt);
    cp_async_commit();

    const uint8_t* x_st = smem + stage * kStage;
    const uint8_t* v_st = x_st + kXStage;
    const uint8_t* m_st = v_st + kVStage;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {  // two k32 steps per 64-wide k-tile
      uint32_t af[Cfg::MI][4];
      uint32_t ef[Cfg::MI];
#pragma unroll
      for (int i = 0; i < Cfg::MI; ++i) {
        // values: 16 rows x 16 compressed elements = chunks 2ks, 2ks + 1 of the 64-byte rows
        const int row = ww * Cfg::WW + 16 * i + (lane & 15);
        const int chunk = swizzle_chunk<4>(row, 2 * ks + (lane >> 4));
        ldmatrix_x4(af[i], v_st + row * kSpValBytes + chunk * 16);
        // meta: groups 8ks + 4 * meta_half .. + 3 of rows g and g + 8
        const int r0 = ww * Cfg::WW + 16 * i + g;
        const int off = 8 * ks + 4 * meta_half;
        const uint32_t lo = *reinterpret_cast<const uint32_t*>(m_st + r0 * kSpMetaBytes + off);
        const uint32_t hi = *reinterpret_cast<const uint32_t*>(m_st + (r0 + 8) * kSpMetaBytes + off);
        ef[i] = sp_meta_nibbles(lo) | (sp_meta_nibbles(hi) << 16);
      }
#pragma unroll
      for (int j = 0; j < Cfg::NI; ++j) {
        // x: 8 rows x chunks 4ks .. 4ks + 3 (one register each)
        uint32_t bf[4];
        const int row = wx * Cfg::WX + 8 * j + (lane & 7);
        const int chunk = swizzle_chunk<8>(row, 4 * ks + (lane >> 3));
        ldmatrix_x4(bf, x_st + row * kTileBytes + chunk * 16);
#pragma unroll
        for (int i = 0; i < Cfg::MI; ++i) mma_sp_16832<T>(acc[i][j], af[i], bf, ef[i]);
      }
    }
    stage = stage + 1 == Cfg::STAGES ? 0 : stage + 1;
    next_stage = next_stage + 1 == Cfg::STAGES ? 0 : next_stage + 1;
  }
  cp_async_wait<0>();

  // D row = weight row n, D col = x row m
#pragma unroll
  for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t n = n0 + ww * Cfg::WW + 16 * i + g + 8 * (r >> 1);
        const int64_t m = m0 + wx * Cfg::WX + 8 * j + 2 * t + (r & 1);
        if (m >= c.M || n >= c.N) continue;
        if (c.splits > 1) {
          c.workspace[(static_cast<int64_t>(blockIdx.z) * c.M + m) * c.N + n] = acc[i][j][r];
        } else {
          static_cast<T*>(c.out)[m * c.N + n] = from_float<T>(c.epi.apply(acc[i][j][r], m, n));
        }
      }
}

// One CTA per x row: if the row holds a NaN or inf, recompute its whole output
// row with the dense (decompressed) weight in fp32, so that pruned positions
// give 0 * x as the reference does; otherwise return after the scan.
template <typename T>
__global__ void sp24_nonfinite_rows_kernel(const T* __restrict__ x, const T* __restrict__ values,
                                           const uint8_t* __restrict__ meta, int64_t N, int64_t K, Epilogue epi,
                                           T* __restrict__ out) {
  const int64_t m = blockIdx.x;
  const T* xr = x + m * K;
  int bad = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) bad |= !isfinite(to_float(xr[k]));
  if (!__syncthreads_or(bad)) return;
  const int64_t groups = K / 4;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const T* vr = values + n * (K / 2);
    const uint8_t* mr = meta + n * groups;
    float s = 0.f;
    for (int64_t q = 0; q < groups; ++q) {
      const uint32_t b = mr[q];
      const uint32_t i0 = b & 3u, i1 = (b >> 2) & 3u;
      const float v0 = to_float(vr[2 * q]), v1 = to_float(vr[2 * q + 1]);
#pragma unroll
      for (uint32_t e = 0; e < 4; ++e) {
        const float w = i0 == e ? v0 : (i1 == e ? v1 : 0.f);
        s += w * to_float(xr[4 * q + e]);
      }
    }
    out[m * N + n] = from_float<T>(epi.apply(s, m, n));
  }
}

template <class Cfg, typename T>
cudaError_t launch_sp24(Sp24Params p, cudaStream_t stream) {
  constexpr int kSmem = Cfg::STAGES * (Cfg::BX * kTileBytes + Cfg::BW * (kSpValBytes + kSpMetaBytes));
  auto kern = sp24_mma_kernel<Cfg, T>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (e != cudaSuccess) return e;
  CommonParams& c = p.c;
  const int64_t mt = ceil_div(c.M, Cfg::BX), ntl = ceil_div(c.N, Cfg::BW);
  if (ntl > 0x7fffffff || c.M > 0x7fffffff) return cudaErrorInvalidValue;
  for (int64_t base = 0; base < mt; base += kMaxGridY) {
    c.m_tile_base = base;
    dim3 grid(static_cast<unsigned>(ntl), static_cast<unsigned>(std::min<int64_t>(kMaxGridY, mt - base)),
              static_cast<unsigned>(c.splits));
    kern<<<grid, Cfg::THREADS, kSmem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  if (c.splits > 1) {
    const int64_t total = c.M * c.N;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(total, threads), 65535 * 8);
    splitk_reduce_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(c.workspace, c.splits, c.M, c.N,
                                                                                  c.epi, static_cast<T*>(c.out));
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  sp24_nonfinite_rows_kernel<T><<<static_cast<unsigned>(c.M), 256, 0, stream>>>(
      reinterpret_cast<const T*>(c.a), reinterpret_cast<const T*>(p.v), p.meta, c.N, c.K, c.epi,
      static_cast<T*>(c.out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sp24_by_m(const Sp24Params& p, cudaStream_t stream) {
  if (p.c.M <= SpCfgSmall::BX) return launch_sp24<SpCfgSmall, T>(p, stream);
  if (p.c.M <= SpCfgMid::BX) return launch_sp24<SpCfgMid, T>(p, stream);
  return launch_sp24<SpCfgLarge, T>(p, stream);
}

}  // namespace cuda
}  // namespace fastkern
