// CUDA-core (fp32 FMA) tiled GEMM: the fp32 path of every float op, where
// tensor cores would round operands (tf32 keeps 10 mantissa bits, far outside
// the 1e-5 contract of fp32 outputs). The weight format enters through a
// loader functor `float operator()(n, k)` that dequantizes one element; tiles
// are staged in shared memory as fp32.
#pragma once

#include "device_utils.cuh"

namespace fastkern {
namespace cuda {

constexpr int kSimtBM = 64, kSimtBK = 16, kSimtThreads = 256;

// 16 x 16 threads; thread (ty, tx) owns rows ty + 16i (i < 4) and columns
// tx + 16j (j < TN) of a 64 x 16*TN tile: reads of a k-slice are broadcasts (A)
// or 16 consecutive words (B), free of bank conflicts.
template <int TN>
struct SimtTile {
  static constexpr int BN = 16 * TN;
  float acc[4][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void mac(const float (*As)[kSimtBM + 1], const float (*Bs)[16 * TN + 1], int ty,
                                      int tx) {
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float a[4], b[TN];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  template <typename TO>
  __device__ __forceinline__ void store(TO* out, int64_t m0, int64_t n0, int64_t M, int64_t N, int64_t n_lim,
                                        const Epilogue& epi, int ty, int tx) const {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t m = m0 + ty + 16 * i, nl = tx + 16 * j, n = n0 + nl;
        if (m < M && nl < n_lim && n < N) out[m * N + n] = from_float<TO>(epi.apply(acc[i][j], m, n));
      }
  }
};

template <int TN, typename TA, class BLoad, typename TO>
__global__ void __launch_bounds__(kSimtThreads)
    simt_gemm_kernel(const TA* __restrict__ a, int64_t M, int64_t N, int64_t K, BLoad bload, Epilogue epi,
                     TO* __restrict__ out, int64_t m_tile_base) {
  constexpr int BN = 16 * TN;
  __shared__ float As[kSimtBK][kSimtBM + 1];
  __shared__ float Bs[kSimtBK][BN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = (m_tile_base + blockIdx.y) * kSimtBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  SimtTile<TN> tile;
  tile.zero();
  for (int64_t k0 = 0; k0 < K; k0 += kSimtBK) {
    // consecutive threads take consecutive k: coalesced along the rows
    for (int e = threadIdx.x; e < kSimtBM * kSimtBK; e += kSimtThreads) {
      const int r = e / kSimtBK, kk = e % kSimtBK;
      const int64_t m = m0 + r, k = k0 + kk;
      As[kk][r] = (m < M && k < K) ? to_float(a[m * K + k]) : 0.f;
    }
    for (int e = threadIdx.x; e < BN * kSimtBK; e += kSimtThreads) {
      const int r = e / kSimtBK, kk = e % kSimtBK;
      const int64_t n = n0 + r, k = k0 + kk;
      Bs[kk][r] = (n < N && k < K) ? bload(n, k) : 0.f;
    }
    __syncthreads();
    tile.mac(As, Bs, ty, tx);
    __syncthreads();
  }
  tile.store(out, m0, n0, M, N, BN, epi, ty, tx);
}

template <typename TA, class BLoad, typename TO>
cudaError_t launch_simt(const TA* a, int64_t M, int64_t N, int64_t K, BLoad bload, Epilogue epi, TO* out,
                        cudaStream_t stream) {
  constexpr int TN = 4;
  const int64_t mt = ceil_div(M, kSimtBM), nt = ceil_div(N, 16 * TN);
  for (int64_t base = 0; base < mt; base += kMaxGridY) {
    dim3 grid(static_cast<unsigned>(nt), static_cast<unsigned>(std::min<int64_t>(kMaxGridY, mt - base)));
    simt_gemm_kernel<TN><<<grid, kSimtThreads, 0, stream>>>(a, M, N, K, bload, epi, out, base);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// ----------------------------------------------------------------- element loaders

template <typename T>
struct DenseLoad {
  const T* b;
  int64_t K;
  __device__ __forceinline__ float operator()(int64_t n, int64_t k) const { return to_float(b[n * K + k]); }
};

// int8 weights: the integer; the scale is applied in the epilogue (col_scale).
struct Int8Load {
  const int8_t* b;
  int64_t K;
  __device__ __forceinline__ float operator()(int64_t n, int64_t k) const {
    return static_cast<float>(b[n * K + k]);
  }
};

struct Int4Load {
  const uint8_t* b;
  const float* scales;
  const uint8_t* zeros;
  int64_t K, group_size, groups;
  __device__ __forceinline__ float operator()(int64_t n, int64_t k) const {
    const uint8_t byte = b[n * (K / 2) + k / 2];
    const int q = (k & 1) ? (byte >> 4) : (byte & 0xF);
    const int64_t gi = n * groups + k / group_size;
    // same operation order as formats.dequantize_int4: (q - zero) * scale in fp32
    return (static_cast<float>(q) - static_cast<float>(zeros[gi])) * scales[gi];
  }
};

template <typename T>
struct Sparse24Load {
  const T* values;
  const uint8_t* meta;
  int64_t K;
  __device__ __forceinline__ float operator()(int64_t n, int64_t k) const {
    const int64_t grp = k / 4;
    const int p = static_cast<int>(k % 4);
    const uint8_t m = meta[n * (K / 4) + grp];
    const T* v = values + n * (K / 2) + 2 * grp;
    if ((m & 3) == p) return to_float(v[0]);
    if (((m >> 2) & 3) == p) return to_float(v[1]);
    return 0.f;
  }
};

}  // namespace cuda
}  // namespace fastkern
