// Dense GEMM (fp16/bf16 on tensor cores, fp32 on CUDA cores) and the exact
// int8 GEMM, plus the shape heuristics shared by every linear op.
#include "simt_gemm.cuh"
#include "tc_ops.cuh"

namespace fastkern {
namespace cuda {

int device_sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return n > 0 ? n : 1;
}

int linear_splits(int64_t M, int64_t N, int64_t K, int b_bits) {
  (void)b_bits;
  if (M <= 0 || N <= 0 || K <= 0) return 1;
  const int64_t bm = M <= CfgSmall::BM ? CfgSmall::BM : (M <= CfgMid::BM ? CfgMid::BM : CfgLarge::BM);
  const int64_t bn = M <= CfgSmall::BM ? CfgSmall::BN : (M <= CfgMid::BM ? CfgMid::BN : CfgLarge::BN);
  const int64_t tiles = ceil_div(M, bm) * ceil_div(N, bn);
  const int64_t sms = device_sm_count();
  if (tiles >= sms) return 1;
  // about two CTAs per SM, each split keeping at least 8 k-tiles of 64 so the
  // pipeline reaches steady state
  int64_t s = ceil_div(2 * sms, tiles);
  s = std::min<int64_t>(s, ceil_div(K, 64) / 8);
  s = std::min<int64_t>(s, 16);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

template <typename T>
static cudaError_t gemm_tc(const void* a, const void* b, void* out, int64_t M, int64_t N, int64_t K,
                           float* workspace, int splits, cudaStream_t stream) {
  using Op = DenseOp<T, T>;
  typename Op::Params p;
  p.c = make_common(a, 2, M, N, K, out, Epilogue{nullptr, nullptr, nullptr}, workspace, splits);
  p.b = static_cast<const uint8_t*>(b);
  p.b_row_bytes = K * 2;
  p.b_aligned = aligned16(b, p.b_row_bytes);
  return launch_by_m<Op>(p, stream);
}

cudaError_t gemm(const void* a, const void* b, void* out, int64_t M, int64_t N, int64_t K, DType dtype,
                 float* workspace, int splits, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case kF16:
      return gemm_tc<__half>(a, b, out, M, N, K, workspace, splits, stream);
    case kBF16:
      return gemm_tc<__nv_bfloat16>(a, b, out, M, N, K, workspace, splits, stream);
    case kF32:
      return launch_simt(static_cast<const float*>(a), M, N, K, DenseLoad<float>{static_cast<const float*>(b), K},
                         Epilogue{nullptr, nullptr, nullptr}, static_cast<float*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t int8_gemm(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K,
                      cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  using Op = DenseOp<int8_t, int32_t>;
  typename Op::Params p;
  // int32 outputs stay exact: no split-K (its partials are fp32)
  p.c = make_common(a, 1, M, N, K, out, Epilogue{nullptr, nullptr, nullptr}, nullptr, 1);
  p.b = reinterpret_cast<const uint8_t*>(b);
  p.b_row_bytes = K;
  p.b_aligned = aligned16(b, K);
  return launch_by_m<Op>(p, stream);
}

}  // namespace cuda
}  // namespace fastkern
