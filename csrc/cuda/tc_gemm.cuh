// One tensor-core GEMM mainloop for every fp16/bf16/int8 op:
//   out[M, N] = epilogue(A[M, K] @ B[N, K]^T)
// A is a contiguous activation matrix (fp16/bf16, or int8 for W8A8); the B
// operand is described by a policy ("Op") that knows how a k-tile of the weight
// format is copied to shared memory and decoded into mma.sync fragments.
//
// Structure (sm_80 instructions, valid on sm_90 too):
// - a k-tile is 128 bytes of every A row (64 fp16/bf16 or 128 int8 elements),
//   so all A fragments are loaded the same way, by ldmatrix from an XOR-swizzled
//   tile (128-byte rows, chunk ^ (row & 7): the 8 rows an ldmatrix phase reads
//   land in 8 different bank groups);
// - a STAGES-deep cp.async ring hides global latency; tails past M/N/K are
//   zero-filled by the copy itself (src-size 0), so no branch in the inner loop;
// - operands whose rows are not 16-byte aligned are copied byte by byte
//   instead (a slow path for odd K, chosen at run time);
// - optional split-K over gridDim.z writes fp32 partials that a second kernel
//   sums in a fixed order (deterministic) and finishes with the epilogue.
#pragma once

#include "device_utils.cuh"

namespace fastkern {
namespace cuda {

constexpr int kTileBytes = 128;  // bytes of an A row per k-tile

template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be whole m16 x (2 x n8) tiles");
  static_assert(STAGES >= 2, "the ring needs at least two stages");
};

// M <= 16 (decode / GEMV): one m16 row block, narrow N tiles so that many CTAs
// stream the weight; split-K adds more when N alone gives too few.
using CfgSmall = TileCfg<16, 64, 16, 16, 4>;
// 16 < M <= 64.
using CfgMid = TileCfg<64, 128, 32, 64, 4>;
// M > 64: 128x128 CTA tile, 8 warps of 64x32.
using CfgLarge = TileCfg<128, 128, 64, 32, 3>;

// Fields every policy's Params starts with.
struct CommonParams {
  const uint8_t* a;   // A [M, K] as bytes
  int64_t a_row_bytes;
  bool a_aligned;
  int64_t M, N, K;    // K in A elements
  int64_t k_tiles;    // ceil(K / elements per k-tile)
  void* out;          // [M, N]
  Epilogue epi;
  float* workspace;   // [splits, M, N] when splits > 1
  int splits;
  int64_t m_tile_base;  // first M tile of this launch (grids are chunked along M)
};

// Copies rows [0, ROWS) x 16-byte chunks [0, CHUNKS) of a k-tile into shared memory.
// g points at row 0 of the tile; byte0 is the tile's first byte within a row.
// SWIZZLE: 128-byte rows store chunk c at c ^ (row & 7); 64-byte rows (two per
// 128-byte bank line) at c ^ ((row >> 1) & 3). Either way the 8 rows one
// ldmatrix phase reads at one logical chunk land in 8 different bank groups.
template <int CHUNKS>
__device__ __forceinline__ int swizzle_chunk(int row, int chunk) {
  static_assert(CHUNKS == 8 || CHUNKS == 4, "the swizzle is for 128- or 64-byte rows");
  return CHUNKS == 8 ? (chunk ^ (row & 7)) : (chunk ^ ((row >> 1) & 3));
}

template <int ROWS, int CHUNKS, int THREADS, bool SWIZZLE>
__device__ __forceinline__ void load_tile(uint8_t* smem, const uint8_t* g, int64_t rows_valid, int64_t row_bytes,
                                          int64_t byte0, bool aligned) {
  static_assert(!SWIZZLE || CHUNKS == 8 || CHUNKS == 4, "the swizzle is for 128- or 64-byte rows");
#pragma unroll
  for (int e = threadIdx.x; e < ROWS * CHUNKS; e += THREADS) {
    const int r = e / CHUNKS, c = e % CHUNKS;
    const int sc = SWIZZLE ? swizzle_chunk<(SWIZZLE ? CHUNKS : 8)>(r, c) : c;
    uint8_t* dst = smem + r * (CHUNKS * 16) + sc * 16;
    const int64_t off = byte0 + c * 16;
    if (aligned) {
      // row_bytes % 16 == 0 here, so a chunk is wholly inside a row or wholly past it
      const bool ok = r < rows_valid && off < row_bytes;
      cp_async16(dst, ok ? g + r * row_bytes + off : g, ok ? 16 : 0);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (r < rows_valid) {
        const uint8_t* src = g + r * row_bytes;
#pragma unroll
        for (int i = 0; i < 16; ++i)
          if (off + i < row_bytes) w[i / 4] |= static_cast<uint32_t>(__ldg(src + off + i)) << (8 * (i % 4));
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// ---------------------------------------------------------------- the kernel

template <class Cfg, class Op>
__global__ void __launch_bounds__(Cfg::THREADS) tc_gemm_kernel(const typename Op::Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr int kAStage = Cfg::BM * kTileBytes;
  constexpr int kBStage = Op::template stage_bytes<Cfg::BN>();
  uint8_t* sA = smem;
  uint8_t* sB = smem + Cfg::STAGES * kAStage;

  const CommonParams& c = p.c;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int64_t m0 = (c.m_tile_base + blockIdx.y) * Cfg::BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::BN;

  // this split's k-tiles
  const int64_t per_split = (c.k_tiles + c.splits - 1) / c.splits;
  const int64_t kt_begin = min(c.k_tiles, blockIdx.z * per_split);
  const int n_iter = static_cast<int>(min(c.k_tiles, kt_begin + per_split) - kt_begin);

  const uint8_t* a_rows = c.a + m0 * c.a_row_bytes;
  const int64_t m_valid = c.M - m0;
  typename Op::Prefetch pf;

  auto load_stage = [&](int stage, int64_t kt) {
    load_tile<Cfg::BM, 8, Cfg::THREADS, true>(sA + stage * kAStage, a_rows, m_valid, c.a_row_bytes,
                                              kt * kTileBytes, c.a_aligned);
    Op::template load_b<Cfg::BN, Cfg::THREADS>(p, sB + stage * kBStage, n0, kt);
  };

  // prologue: STAGES-1 tiles in flight (side data such as group scales is
  // stored synchronously here, through the register prefetch afterwards)
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < n_iter) {
      load_stage(s, kt_begin + s);
      Op::template prefetch_load<Cfg::BN, Cfg::THREADS>(p, pf, n0, kt_begin + s);
      Op::template prefetch_store<Cfg::BN, Cfg::THREADS>(pf, sB + s * kBStage);
    }
    cp_async_commit();
  }

  typename Op::Acc acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
  for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  int stage = 0, next_stage = Cfg::STAGES - 1;  // ring positions of tiles it and it + STAGES - 1
  for (int it = 0; it < n_iter; ++it) {
    cp_async_wait<Cfg::STAGES - 2>();
    // tile `it` has landed for every thread, and every thread is done with
    // tile it-1, whose stage the next prefetch overwrites
    __syncthreads();
    const int nt = it + Cfg::STAGES - 1;
    const bool has_next = nt < n_iter;
    if (has_next) {
      load_stage(next_stage, kt_begin + nt);
      Op::template prefetch_load<Cfg::BN, Cfg::THREADS>(p, pf, n0, kt_begin + nt);
    }
    cp_async_commit();

    const uint8_t* a_st = sA + stage * kAStage;
    const uint8_t* b_st = sB + stage * kBStage;
#pragma unroll
    for (int ks = 0; ks < kTileBytes / 32; ++ks) {
      uint32_t af[Cfg::MI][4];
#pragma unroll
      for (int i = 0; i < Cfg::MI; ++i) {
        const int row = wm * Cfg::WM + 16 * i + (lane & 15);
        const int chunk = (2 * ks + (lane >> 4)) ^ (row & 7);
        ldmatrix_x4(af[i], a_st + row * kTileBytes + chunk * 16);
      }
      uint32_t bf[Cfg::NI][2];
      Op::template load_frags<Cfg::BN, Cfg::NI>(p, bf, b_st, wn * Cfg::WN, ks, lane, n0, kt_begin + it);
#pragma unroll
      for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::NI; ++j) Op::mma(acc[i][j], af[i], bf[j]);
    }
    if (has_next) Op::template prefetch_store<Cfg::BN, Cfg::THREADS>(pf, sB + next_stage * kBStage);
    stage = stage + 1 == Cfg::STAGES ? 0 : stage + 1;
    next_stage = next_stage + 1 == Cfg::STAGES ? 0 : next_stage + 1;
  }
  cp_async_wait<0>();

  // epilogue: thread holds rows g, g+8 and columns 2t, 2t+1 of each m16n8 tile
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm * Cfg::WM + 16 * i + g + 8 * h;
        const int64_t n = n0 + wn * Cfg::WN + 8 * j + 2 * t;
        if (m >= c.M || n >= c.N) continue;
        const bool two = n + 1 < c.N;
        if (c.splits > 1) {
          float* w = c.workspace + (static_cast<int64_t>(blockIdx.z) * c.M + m) * c.N + n;
          w[0] = static_cast<float>(acc[i][j][2 * h]);
          if (two) w[1] = static_cast<float>(acc[i][j][2 * h + 1]);
        } else {
          Op::store(p, m, n, two, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        }
      }
}

// Sums the split-K partials in split order and applies the epilogue.
template <typename TO>
__global__ void splitk_reduce_kernel(const float* ws, int splits, int64_t M, int64_t N, Epilogue epi, TO* out) {
  const int64_t total = M * N;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += ws[z * total + e];
    out[e] = from_float<TO>(epi.apply(s, e / N, e % N));
  }
}

// Float outputs: epilogue in fp32, paired stores when the pair is in range and
// 4-byte aligned (n is even; m * N + n is even when N is).
template <typename TO>
__device__ __forceinline__ void store_float_pair(const CommonParams& c, int64_t m, int64_t n, bool two, float v0,
                                                 float v1) {
  TO* o = static_cast<TO*>(c.out) + m * c.N + n;
  const float r0 = c.epi.apply(v0, m, n);
  if (two && (c.N % 2 == 0)) {
    store2(o, r0, c.epi.apply(v1, m, n + 1));
  } else {
    o[0] = from_float<TO>(r0);
    if (two) o[1] = from_float<TO>(c.epi.apply(v1, m, n + 1));
  }
}

// ---------------------------------------------------------------- launcher

int device_sm_count();

template <class Cfg, class Op>
cudaError_t launch_tc(typename Op::Params p, cudaStream_t stream) {
  constexpr int kSmem = Cfg::STAGES * (Cfg::BM * kTileBytes + Op::template stage_bytes<Cfg::BN>());
  auto kern = tc_gemm_kernel<Cfg, Op>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (e != cudaSuccess) return e;
  CommonParams& c = p.c;
  const int64_t mt = ceil_div(c.M, Cfg::BM), ntl = ceil_div(c.N, Cfg::BN);
  for (int64_t base = 0; base < mt; base += kMaxGridY) {
    c.m_tile_base = base;
    dim3 grid(static_cast<unsigned>(ntl), static_cast<unsigned>(std::min<int64_t>(kMaxGridY, mt - base)),
              static_cast<unsigned>(c.splits));
    kern<<<grid, Cfg::THREADS, kSmem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  if constexpr (std::is_floating_point<typename Op::Out>::value || !std::is_integral<typename Op::Out>::value) {
    if (c.splits <= 1) return e;
    const int64_t total = c.M * c.N;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(total, threads), 65535 * 8);
    splitk_reduce_kernel<typename Op::Out><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        c.workspace, c.splits, c.M, c.N, c.epi, static_cast<typename Op::Out*>(c.out));
    e = cudaGetLastError();
  }
  return e;
}

// Picks the tile config by M (as linear_splits assumes) and launches.
template <class Op>
cudaError_t launch_by_m(const typename Op::Params& p, cudaStream_t stream) {
  if (p.c.M <= CfgSmall::BM) return launch_tc<CfgSmall, Op>(p, stream);
  if (p.c.M <= CfgMid::BM) return launch_tc<CfgMid, Op>(p, stream);
  return launch_tc<CfgLarge, Op>(p, stream);
}

// Fills the common fields for a contiguous A [M, K] of `a_elem` bytes per element.
inline CommonParams make_common(const void* a, int a_elem, int64_t M, int64_t N, int64_t K, void* out,
                                Epilogue epi, float* workspace, int splits) {
  CommonParams c;
  c.a = static_cast<const uint8_t*>(a);
  c.a_row_bytes = K * a_elem;
  c.a_aligned = aligned16(a, c.a_row_bytes);
  c.M = M;
  c.N = N;
  c.K = K;
  c.k_tiles = ceil_div(K * a_elem, kTileBytes);
  c.out = out;
  c.epi = epi;
  c.workspace = workspace;
  c.splits = splits > 1 && workspace != nullptr ? splits : 1;
  c.m_tile_base = 0;
  return c;
}

// A policy with no side data to prefetch.
struct NoPrefetch {
  struct Prefetch {};
  template <int BN, int THREADS, class P>
  __device__ static __forceinline__ void prefetch_load(const P&, Prefetch&, int64_t, int64_t) {}
  template <int BN, int THREADS>
  __device__ static __forceinline__ void prefetch_store(const Prefetch&, uint8_t*) {}
};

}  // namespace cuda
}  // namespace fastkern
