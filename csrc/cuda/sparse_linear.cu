// Sparse linears: 2:4 (fp16/bf16 on sparse tensor cores, mma.sp; fp32 and K
// not a multiple of 16 with compressed values + meta expanded in registers into
// dense tensor-core fragments or CUDA-core tiles) and block-sparse (CSR over block rows, empty
// blocks never read).
#include <cstdlib>
#include <cstring>

#include "simt_gemm.cuh"
#include "sp_gemm.cuh"
#include "tc_ops.cuh"

namespace fastkern {
namespace cuda {

// The parameters both 2:4 kernels share: x, the canonical values and meta rows, the epilogue.
template <typename P>
static P sparse24_params(const void* x, const void* values, const uint8_t* meta, const float* bias, void* out,
                         int64_t M, int64_t N, int64_t K, float* workspace, int splits) {
  P p;
  p.c = make_common(x, 2, M, N, K, out, Epilogue{nullptr, nullptr, bias}, workspace, splits);
  p.v = static_cast<const uint8_t*>(values);
  p.v_row_bytes = K;  // K/2 values of 2 bytes
  p.v_aligned = aligned16(values, p.v_row_bytes);
  p.meta = meta;
  p.m_row_bytes = K / 4;
  p.m_aligned = aligned16(meta, p.m_row_bytes);
  return p;
}

template <typename T>
static cudaError_t sparse24_tc(const void* x, const void* values, const uint8_t* meta, const float* bias, void* out,
                               int64_t M, int64_t N, int64_t K, float* workspace, int splits, cudaStream_t stream) {
  using Op = Sparse24Op<T>;
  return launch_by_m<Op>(
      sparse24_params<typename Op::Params>(x, values, meta, bias, out, M, N, K, workspace, splits), stream);
}

// Sparse tensor cores (sp_gemm.cuh): the math is halved as well as the weight bytes.
template <typename T>
static cudaError_t sparse24_mma_sp(const void* x, const void* values, const uint8_t* meta, const float* bias,
                                   void* out, int64_t M, int64_t N, int64_t K, float* workspace, int splits,
                                   cudaStream_t stream) {
  return launch_sp24_by_m<T>(sparse24_params<Sp24Params>(x, values, meta, bias, out, M, N, K, workspace, splits),
                             stream);
}

// mma.sp for fp16/bf16 when K % 16 == 0 (x and values rows are then whole
// 16-byte chunks); FASTKERN_SPARSE24_MMA_SP=0 forces the dense-expansion path
// (read on every call, so tests can compare the two in one process).
static bool use_mma_sp(int64_t K) {
  if (K % 16) return false;
  const char* env = std::getenv("FASTKERN_SPARSE24_MMA_SP");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

cudaError_t linear_sparse24(const void* x, DType dtype, const void* values, const uint8_t* meta,
                            const float* bias, void* out, int64_t M, int64_t N, int64_t K, float* workspace,
                            int splits, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 4) return cudaErrorInvalidValue;
  const bool sp = dtype != kF32 && use_mma_sp(K);
  switch (dtype) {
    case kF16:
      if (sp) return sparse24_mma_sp<__half>(x, values, meta, bias, out, M, N, K, workspace, splits, stream);
      return sparse24_tc<__half>(x, values, meta, bias, out, M, N, K, workspace, splits, stream);
    case kBF16:
      if (sp) return sparse24_mma_sp<__nv_bfloat16>(x, values, meta, bias, out, M, N, K, workspace, splits, stream);
      return sparse24_tc<__nv_bfloat16>(x, values, meta, bias, out, M, N, K, workspace, splits, stream);
    case kF32:
      return launch_simt(static_cast<const float*>(x), M, N, K,
                         Sparse24Load<float>{static_cast<const float*>(values), meta, K},
                         Epilogue{nullptr, nullptr, bias}, static_cast<float*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

// ----------------------------------------------------------------- block-sparse

// CTA = 64 rows of x times (up to) 16*TN output columns of one block row; it
// walks only that block row's non-empty blocks. TN follows bn so that small
// blocks (16) do not leave most threads idle. row_ptr / col_idx come from the
// caller unchecked (checking them on the host would need a device sync), so
// they are clamped here: no malformed layout reads out of bounds.
template <int TN, typename T>
__global__ void __launch_bounds__(kSimtThreads)
    blocksparse_kernel(const T* __restrict__ x, const T* __restrict__ blocks, const int64_t* __restrict__ row_ptr,
                       const int64_t* __restrict__ col_idx, int64_t nnzb, int64_t bn, int64_t bk, int64_t chunks,
                       int64_t M, int64_t N, int64_t K, Epilogue epi, T* __restrict__ out, int64_t m_tile_base) {
  constexpr int BN = 16 * TN;
  __shared__ float As[kSimtBK][kSimtBM + 1];
  __shared__ float Bs[kSimtBK][BN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t rb = blockIdx.x / chunks;
  const int64_t c0 = (blockIdx.x % chunks) * BN;  // first column of this CTA within the block row
  const int64_t n0 = rb * bn + c0;
  const int64_t m0 = (m_tile_base + blockIdx.y) * kSimtBM;
  const int64_t k_blocks = (K + bk - 1) / bk;
  const int64_t j0 = min(max(row_ptr[rb], static_cast<int64_t>(0)), nnzb);
  const int64_t j1 = min(max(row_ptr[rb + 1], j0), nnzb);
  SimtTile<TN> tile;
  tile.zero();
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t col = col_idx[j];
    if (col < 0 || col >= k_blocks) continue;  // uniform across the CTA
    const int64_t kb = col * bk;
    const T* blk = blocks + j * bn * bk;
    for (int64_t k0 = 0; k0 < bk; k0 += kSimtBK) {
      for (int e = threadIdx.x; e < kSimtBM * kSimtBK; e += kSimtThreads) {
        const int r = e / kSimtBK, kk = e % kSimtBK;
        const int64_t m = m0 + r, kin = k0 + kk, k = kb + kin;
        As[kk][r] = (m < M && kin < bk && k < K) ? to_float(x[m * K + k]) : 0.f;
      }
      for (int e = threadIdx.x; e < BN * kSimtBK; e += kSimtThreads) {
        const int r = e / kSimtBK, kk = e % kSimtBK;
        const int64_t c = c0 + r, kin = k0 + kk;
        Bs[kk][r] = (c < bn && kin < bk) ? to_float(blk[c * bk + kin]) : 0.f;
      }
      __syncthreads();
      tile.mac(As, Bs, ty, tx);
      __syncthreads();
    }
  }
  tile.store(out, m0, n0, M, N, bn - c0, epi, ty, tx);
}

template <int TN, typename T>
static cudaError_t blocksparse_launch(const T* x, const T* blocks, const int64_t* row_ptr, const int64_t* col_idx,
                                      int64_t nnzb, int64_t bn, int64_t bk, const float* bias, T* out, int64_t M,
                                      int64_t N, int64_t K, cudaStream_t stream) {
  const int64_t chunks = ceil_div(bn, 16 * TN);
  const int64_t nblk = ceil_div(N, bn) * chunks;
  if (nblk > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t mt = ceil_div(M, kSimtBM);
  for (int64_t base = 0; base < mt; base += kMaxGridY) {
    dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(std::min<int64_t>(kMaxGridY, mt - base)));
    blocksparse_kernel<TN, T><<<grid, kSimtThreads, 0, stream>>>(x, blocks, row_ptr, col_idx, nnzb, bn, bk, chunks,
                                                                 M, N, K, Epilogue{nullptr, nullptr, bias}, out,
                                                                 base);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
static cudaError_t blocksparse_typed(const void* x, const void* blocks, const int64_t* row_ptr,
                                     const int64_t* col_idx, int64_t nnzb, int64_t bn, int64_t bk, const float* bias,
                                     void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(blocks);
  T* ot = static_cast<T*>(out);
  if (bn <= 16) return blocksparse_launch<1>(xt, bt, row_ptr, col_idx, nnzb, bn, bk, bias, ot, M, N, K, stream);
  if (bn <= 32) return blocksparse_launch<2>(xt, bt, row_ptr, col_idx, nnzb, bn, bk, bias, ot, M, N, K, stream);
  return blocksparse_launch<4>(xt, bt, row_ptr, col_idx, nnzb, bn, bk, bias, ot, M, N, K, stream);
}

cudaError_t linear_blocksparse(const void* x, DType dtype, const void* blocks, const int64_t* row_ptr,
                               const int64_t* col_idx, int64_t nnzb, int64_t bn, int64_t bk, const float* bias,
                               void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (bn <= 0 || bk <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case kF32:
      return blocksparse_typed<float>(x, blocks, row_ptr, col_idx, nnzb, bn, bk, bias, out, M, N, K, stream);
    case kF16:
      return blocksparse_typed<__half>(x, blocks, row_ptr, col_idx, nnzb, bn, bk, bias, out, M, N, K, stream);
    case kBF16:
      return blocksparse_typed<__nv_bfloat16>(x, blocks, row_ptr, col_idx, nnzb, bn, bk, bias, out, M, N, K,
                                              stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastkern
