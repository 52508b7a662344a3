// Plain interface between the torch bindings (csrc/cuda/*_binding.cpp) and the
// CUDA kernels (csrc/cuda/*.cu). Only pointers, sizes and streams cross it, so
// the .cu files never include torch headers: host compilation of a .cu that
// includes torch costs about a minute per arch, these take seconds.
//
// Every pointer is a device pointer to a contiguous row-major array. Float
// side arrays (scales, bias) are float32. Functions return the launch status;
// they never synchronize.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace fastkern {
namespace cuda {

// Element type of activations / outputs.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// How many K-splits a float-output linear of this shape runs with on the
// current device (1 = no split); the caller provides a float32 workspace of
// splits * M * N elements when it is more than 1.
int linear_splits(int64_t M, int64_t N, int64_t K, int b_bits);  // b_bits: weight bits (reserved)

// out[M, N] = a[M, K] @ b[N, K]^T, a/b/out of one float dtype.
cudaError_t gemm(const void* a, const void* b, void* out, int64_t M, int64_t N, int64_t K, DType dtype,
                 float* workspace, int splits, cudaStream_t stream);

// out[M, N] int32 = a[M, K] int8 @ b[N, K]^T int8 (exact, int32 accumulation).
cudaError_t int8_gemm(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K,
                      cudaStream_t stream);

// Dynamic symmetric per-row int8 quantization, bit-identical to
// fastkern.formats.quantize_per_token: s = absmax / 127 (fp32), q = rint(x / s)
// clamped to +-127; an all-zero row gives s = 0, q = 0; a row with NaN/inf gives
// q = 0 and s = NaN.
cudaError_t quantize_per_token(const void* x, DType dtype, int8_t* q, float* s, int64_t M, int64_t K,
                               cudaStream_t stream);

// out = (xq @ w^T) * xs[m] * w_scale[n] + bias[n], out in out_dtype.
cudaError_t linear_w8a8(const int8_t* xq, const float* xs, const int8_t* w, const float* w_scale,
                        const float* bias, void* out, DType out_dtype, int64_t M, int64_t N, int64_t K,
                        float* workspace, int splits, cudaStream_t stream);

// out = (x @ w^T) * w_scale[n] + bias[n]; w int8 [N, K].
cudaError_t linear_w8a16(const void* x, DType dtype, const int8_t* w, const float* w_scale, const float* bias,
                         void* out, int64_t M, int64_t N, int64_t K, float* workspace, int splits,
                         cudaStream_t stream);

// out = x @ ((q - zero) * scale)^T + bias; w uint8 [N, K/2] (low nibble first),
// scales float32 [N, K/group_size], zeros uint8 [N, K/group_size].
cudaError_t linear_w4a16(const void* x, DType dtype, const uint8_t* w, const float* scales, const uint8_t* zeros,
                         int64_t group_size, const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                         float* workspace, int splits, cudaStream_t stream);

// out = x @ decompress_2_4(values, meta)^T + bias; values [N, K/2] in x's dtype,
// meta uint8 [N, K/4] (idx0 | idx1 << 2 per group of 4).
cudaError_t linear_sparse24(const void* x, DType dtype, const void* values, const uint8_t* meta,
                            const float* bias, void* out, int64_t M, int64_t N, int64_t K, float* workspace,
                            int splits, cudaStream_t stream);

// out[M, N] = x @ dense(blocks)^T + bias, blocks [nnzb, bn, bk] in x's dtype,
// CSR over block rows: row_ptr int64 [ceil(N/bn)+1], col_idx int64 [nnzb].
// Malformed row_ptr/col_idx entries are clamped/skipped on the device, never read
// out of bounds.
cudaError_t linear_blocksparse(const void* x, DType dtype, const void* blocks, const int64_t* row_ptr,
                               const int64_t* col_idx, int64_t nnzb, int64_t bn, int64_t bk, const float* bias,
                               void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkern
