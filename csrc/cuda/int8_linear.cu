// int8 weight linears: W8A8 (dynamic per-token int8 activations, int8 tensor
// cores, both scales and the bias applied in an fp32 epilogue) and W8A16 (int8
// weights expanded exactly into fp16/bf16 fragments).
#include "simt_gemm.cuh"
#include "tc_ops.cuh"

namespace fastkern {
namespace cuda {

constexpr int kQuantWarps = 8;

// One warp per row. Mirrors fastkern.formats.quantize_per_token operation by
// operation so the int8 values are bit-identical: fp32 absmax, s = absmax / 127
// (IEEE division: this file must not be built with fast-math), q = rint(x / s)
// (round half to even, as torch.round), clamp to +-127. fmaxf would drop NaNs,
// so non-finite values are tracked separately and turn the row into q = 0,
// s = NaN.
template <typename T>
__global__ void __launch_bounds__(32 * kQuantWarps)
    quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ s, int64_t M,
                              int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  if (row >= M) return;
  const T* xr = x + row * K;
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = lane; k < K; k += 32) {
    const float v = to_float(xr[k]);
    finite = finite && isfinite(v);
    amax = fmaxf(amax, fabsf(v));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    finite = __shfl_xor_sync(0xffffffffu, static_cast<int>(finite), o) && finite;
  }
  const float scale = amax / 127.0f;
  const float safe = (finite && scale > 0.f) ? scale : 1.0f;
  int8_t* qr = q + row * K;
  for (int64_t k = lane; k < K; k += 32) {
    float r = rintf(to_float(xr[k]) / safe);
    r = fminf(fmaxf(r, -127.f), 127.f);
    qr[k] = finite ? static_cast<int8_t>(r) : static_cast<int8_t>(0);
  }
  if (lane == 0) s[row] = finite ? scale : __int_as_float(0x7fc00000);
}

cudaError_t quantize_per_token(const void* x, DType dtype, int8_t* q, float* s, int64_t M, int64_t K,
                               cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(M, kQuantWarps);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (dtype) {
    case kF32:
      quantize_per_token_kernel<<<grid, 32 * kQuantWarps, 0, stream>>>(static_cast<const float*>(x), q, s, M, K);
      break;
    case kF16:
      quantize_per_token_kernel<<<grid, 32 * kQuantWarps, 0, stream>>>(static_cast<const __half*>(x), q, s, M, K);
      break;
    case kBF16:
      quantize_per_token_kernel<<<grid, 32 * kQuantWarps, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), q, s,
                                                                        M, K);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename TO>
static cudaError_t w8a8_typed(const int8_t* xq, const float* xs, const int8_t* w, const float* w_scale,
                              const float* bias, void* out, int64_t M, int64_t N, int64_t K, float* workspace,
                              int splits, cudaStream_t stream) {
  using Op = DenseOp<int8_t, TO>;
  typename Op::Params p;
  p.c = make_common(xq, 1, M, N, K, out, Epilogue{xs, w_scale, bias}, workspace, splits);
  p.b = reinterpret_cast<const uint8_t*>(w);
  p.b_row_bytes = K;
  p.b_aligned = aligned16(w, K);
  return launch_by_m<Op>(p, stream);
}

cudaError_t linear_w8a8(const int8_t* xq, const float* xs, const int8_t* w, const float* w_scale,
                        const float* bias, void* out, DType out_dtype, int64_t M, int64_t N, int64_t K,
                        float* workspace, int splits, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (out_dtype) {
    case kF32:
      return w8a8_typed<float>(xq, xs, w, w_scale, bias, out, M, N, K, workspace, splits, stream);
    case kF16:
      return w8a8_typed<__half>(xq, xs, w, w_scale, bias, out, M, N, K, workspace, splits, stream);
    case kBF16:
      return w8a8_typed<__nv_bfloat16>(xq, xs, w, w_scale, bias, out, M, N, K, workspace, splits, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
static cudaError_t w8a16_tc(const void* x, const int8_t* w, const float* w_scale, const float* bias, void* out,
                            int64_t M, int64_t N, int64_t K, float* workspace, int splits, cudaStream_t stream) {
  using Op = W8Op<T>;
  typename Op::Params p;
  p.c = make_common(x, 2, M, N, K, out, Epilogue{nullptr, w_scale, bias}, workspace, splits);
  p.b = reinterpret_cast<const uint8_t*>(w);
  p.b_row_bytes = K;
  p.b_aligned = aligned16(w, K);
  return launch_by_m<Op>(p, stream);
}

cudaError_t linear_w8a16(const void* x, DType dtype, const int8_t* w, const float* w_scale, const float* bias,
                         void* out, int64_t M, int64_t N, int64_t K, float* workspace, int splits,
                         cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case kF16:
      return w8a16_tc<__half>(x, w, w_scale, bias, out, M, N, K, workspace, splits, stream);
    case kBF16:
      return w8a16_tc<__nv_bfloat16>(x, w, w_scale, bias, out, M, N, K, workspace, splits, stream);
    case kF32:
      return launch_simt(static_cast<const float*>(x), M, N, K, Int8Load{w, K}, Epilogue{nullptr, w_scale, bias},
                         static_cast<float*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastkern
