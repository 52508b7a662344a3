// W4A16: int4 group-wise weights in the canonical layout (DESIGN §3), read as
// stored (no repacked copy to keep in sync) and dequantized in registers with
// the magic-exponent trick of tc_ops.cuh (one PRMT + one LOP3 + sub + mul per
// pair of weights) straight into mma.sync fragments.
#include "simt_gemm.cuh"
#include "tc_ops.cuh"

namespace fastkern {
namespace cuda {

template <typename T, bool kG16>
static cudaError_t w4a16_tc(const void* x, const uint8_t* w, const float* scales, const uint8_t* zeros,
                            int64_t group_size, const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                            float* workspace, int splits, cudaStream_t stream) {
  using Op = W4Op<T, kG16>;
  typename Op::Params p;
  p.c = make_common(x, 2, M, N, K, out, Epilogue{nullptr, nullptr, bias}, workspace, splits);
  p.b = w;
  p.b_row_bytes = K / 2;
  p.b_aligned = aligned16(w, K / 2);
  p.scales = scales;
  p.zeros = zeros;
  p.group_size = group_size;
  p.groups = K / group_size;
  if constexpr (kG16) {
    return launch_by_m<Op>(p, stream);
  } else {
    // odd group sizes are rare: one (mid-size) tile config keeps the build small
    return launch_tc<CfgMid, Op>(p, stream);
  }
}

template <typename T>
static cudaError_t w4a16_dispatch(const void* x, const uint8_t* w, const float* scales, const uint8_t* zeros,
                                  int64_t group_size, const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                                  float* workspace, int splits, cudaStream_t stream) {
  if (group_size % 16 == 0)
    return w4a16_tc<T, true>(x, w, scales, zeros, group_size, bias, out, M, N, K, workspace, splits, stream);
  return w4a16_tc<T, false>(x, w, scales, zeros, group_size, bias, out, M, N, K, workspace, splits, stream);
}

cudaError_t linear_w4a16(const void* x, DType dtype, const uint8_t* w, const float* scales, const uint8_t* zeros,
                         int64_t group_size, const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                         float* workspace, int splits, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (group_size <= 0 || group_size % 2 || (K > 0 && K % group_size)) return cudaErrorInvalidValue;
  switch (dtype) {
    case kF16:
      return w4a16_dispatch<__half>(x, w, scales, zeros, group_size, bias, out, M, N, K, workspace, splits, stream);
    case kBF16:
      return w4a16_dispatch<__nv_bfloat16>(x, w, scales, zeros, group_size, bias, out, M, N, K, workspace, splits,
                                           stream);
    case kF32:
      return launch_simt(static_cast<const float*>(x), M, N, K, Int4Load{w, scales, zeros, K, group_size, K / group_size},
                         Epilogue{nullptr, nullptr, bias}, static_cast<float*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastkern
