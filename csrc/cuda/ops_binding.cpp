// CUDA implementations of the fastkern_C ops (schemas in csrc/registration.cpp).
// This file owns everything torch: input checks at the op boundary (once; the
// kernels check nothing), contiguous views, the output and workspace
// allocations, the current stream, and kernel errors turned into messages.
// The kernels themselves are in the *.cu files behind kernels.h.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace fk = fastkern::cuda;

namespace {

std::string describe(const char* name, const at::Tensor& t) {
  std::ostringstream os;
  os << name << " (shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device() << ")";
  return os.str();
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "fastkern_C::", op, ": ", describe(name, t), " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "fastkern_C::", op, ": all tensors must be on one device, but ",
              describe(name, t), " is not on ", ref.device());
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "fastkern_C::", op, ": ", describe(name, t), " must have dtype ", want);
}

fk::DType float_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fk::kF32;
    case at::kHalf:
      return fk::kF16;
    case at::kBFloat16:
      return fk::kBF16;
    default:
      TORCH_CHECK(false, "fastkern_C::", op, ": ", describe(name, t), " must be float32, float16 or bfloat16");
  }
  return fk::kF32;
}

void check_shape(const char* op, const char* name, const at::Tensor& t, std::vector<int64_t> shape) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "fastkern_C::", op, ": ", describe(name, t),
              " must have shape ", at::IntArrayRef(shape));
}

// x [..., K] as a contiguous [M, K] matrix, and the shape of the result [..., N].
std::pair<at::Tensor, std::vector<int64_t>> flatten_x(const char* op, const at::Tensor& x, int64_t K, int64_t N) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "fastkern_C::", op, ": ", describe("x", x),
              " must have K=", K, " features in its last dimension");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t d : out_shape) M *= d;  // not reshape(-1, K): with K = 0 the -1 is ambiguous
  out_shape.push_back(N);
  return {x.reshape({M, K}).contiguous(), out_shape};
}

std::optional<at::Tensor> bias_f32(const char* op, const std::optional<at::Tensor>& bias, int64_t N,
                                   const at::Tensor& ref) {
  if (!bias.has_value()) return std::nullopt;
  check_cuda(op, "bias", *bias, ref);
  float_dtype(op, "bias", *bias);
  check_shape(op, "bias", *bias, {N});
  return bias->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_launch(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, "fastkern_C::", op, ": CUDA kernel failed: ", cudaGetErrorString(e));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// Split-K workspace for float-output tensor-core paths (fp32 inputs run on the
// CUDA-core path, which does not split).
struct Splits {
  int n = 1;
  at::Tensor ws;
  float* ptr() { return n > 1 ? ws.data_ptr<float>() : nullptr; }
};
Splits make_splits(int64_t M, int64_t N, int64_t K, int bits, bool tensor_cores, const at::Tensor& ref) {
  Splits s;
  if (tensor_cores) s.n = fk::linear_splits(M, N, K, bits);
  if (s.n > 1) s.ws = at::empty({s.n, M, N}, ref.options().dtype(at::kFloat));
  return s;
}

// K = 0: every output is the bias (or zero); no kernel has anything to do.
at::Tensor empty_k_result(at::Tensor out, const std::optional<at::Tensor>& bias) {
  out.zero_();
  if (bias.has_value()) out.add_(*bias);
  return out;
}

// ------------------------------------------------------------------ ops

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "gemm";
  check_cuda(op, "a", a, a);
  check_cuda(op, "b", b, a);
  const fk::DType dt = float_dtype(op, "a", a);
  check_dtype(op, "b", b, a.scalar_type());
  TORCH_CHECK(b.dim() == 2, "fastkern_C::gemm: ", describe("b", b), " must be 2-D [N, K]");
  const int64_t N = b.size(0), K = b.size(1);
  c10::cuda::CUDAGuard guard(a.device());
  auto [a2, out_shape] = flatten_x(op, a, K, N);
  const int64_t M = a2.size(0);
  at::Tensor out = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return out.zero_().view(out_shape);
  const at::Tensor bc = b.contiguous();
  Splits sp = make_splits(M, N, K, 16, dt != fk::kF32, a);
  check_launch(op, fk::gemm(a2.data_ptr(), bc.data_ptr(), out.data_ptr(), M, N, K, dt, sp.ptr(), sp.n,
                            stream_of(a)));
  return out.view(out_shape);
}

at::Tensor int8_gemm(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "int8_gemm";
  check_cuda(op, "a", a, a);
  check_cuda(op, "b", b, a);
  check_dtype(op, "a", a, at::kChar);
  check_dtype(op, "b", b, at::kChar);
  TORCH_CHECK(b.dim() == 2, "fastkern_C::int8_gemm: ", describe("b", b), " must be 2-D [N, K]");
  const int64_t N = b.size(0), K = b.size(1);
  c10::cuda::CUDAGuard guard(a.device());
  auto [a2, out_shape] = flatten_x(op, a, K, N);
  const int64_t M = a2.size(0);
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return out.zero_().view(out_shape);
  const at::Tensor bc = b.contiguous();
  check_launch(op, fk::int8_gemm(a2.data_ptr<int8_t>(), bc.data_ptr<int8_t>(), out.data_ptr<int32_t>(), M, N, K,
                                 stream_of(a)));
  return out.view(out_shape);
}

// Shared checks of the two int8-weight linears; returns N, K.
std::pair<int64_t, int64_t> check_w8(const char* op, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& w_scale) {
  check_cuda(op, "x", x, x);
  check_cuda(op, "w", w, x);
  check_cuda(op, "w_scale", w_scale, x);
  float_dtype(op, "x", x);
  check_dtype(op, "w", w, at::kChar);
  TORCH_CHECK(w.dim() == 2, "fastkern_C::", op, ": ", describe("w", w), " must be 2-D [N, K]");
  float_dtype(op, "w_scale", w_scale);
  check_shape(op, "w_scale", w_scale, {w.size(0)});
  return {w.size(0), w.size(1)};
}

at::Tensor linear_w8a16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                        const std::optional<at::Tensor>& bias) {
  const char* op = "linear_w8a16";
  auto [N, K] = check_w8(op, x, w, w_scale);
  const fk::DType dt = float_dtype(op, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  auto b = bias_f32(op, bias, N, x);
  auto [x2, out_shape] = flatten_x(op, x, K, N);
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return empty_k_result(out, bias).view(out_shape);
  const at::Tensor wc = w.contiguous();
  const at::Tensor sc = w_scale.to(at::kFloat).contiguous();
  Splits sp = make_splits(M, N, K, 8, dt != fk::kF32, x);
  check_launch(op, fk::linear_w8a16(x2.data_ptr(), dt, wc.data_ptr<int8_t>(), sc.data_ptr<float>(), ptr_or_null(b),
                                    out.data_ptr(), M, N, K, sp.ptr(), sp.n, stream_of(x)));
  return out.view(out_shape);
}

at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& bias) {
  const char* op = "linear_w8a8";
  auto [N, K] = check_w8(op, x, w, w_scale);
  const fk::DType dt = float_dtype(op, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  auto b = bias_f32(op, bias, N, x);
  auto [x2, out_shape] = flatten_x(op, x, K, N);
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return empty_k_result(out, bias).view(out_shape);
  const at::Tensor wc = w.contiguous();
  const at::Tensor sc = w_scale.to(at::kFloat).contiguous();
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
  cudaStream_t stream = stream_of(x);
  check_launch(op, fk::quantize_per_token(x2.data_ptr(), dt, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), M, K,
                                          stream));
  Splits sp = make_splits(M, N, K, 8, true, x);
  check_launch(op, fk::linear_w8a8(xq.data_ptr<int8_t>(), xs.data_ptr<float>(), wc.data_ptr<int8_t>(),
                                   sc.data_ptr<float>(), ptr_or_null(b), out.data_ptr(), dt, M, N, K, sp.ptr(), sp.n,
                                   stream));
  return out.view(out_shape);
}

// Shared checks of the two int4-weight linears; returns N, K.
std::pair<int64_t, int64_t> check_w4(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                     const at::Tensor& zeros, int64_t group_size) {
  check_cuda(op, "x", x, x);
  check_cuda(op, "w", w, x);
  check_cuda(op, "scales", scales, x);
  check_cuda(op, "zeros", zeros, x);
  float_dtype(op, "x", x);
  check_dtype(op, "w", w, at::kByte);
  TORCH_CHECK(w.dim() == 2, "fastkern_C::", op, ": ", describe("w", w), " must be 2-D [N, K/2]");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "fastkern_C::", op, ": group_size=",
              group_size, " must be a positive even number dividing K=", K, " (", describe("w", w), ")");
  float_dtype(op, "scales", scales);
  check_shape(op, "scales", scales, {N, K / group_size});
  check_dtype(op, "zeros", zeros, at::kByte);
  check_shape(op, "zeros", zeros, {N, K / group_size});
  return {N, K};
}

at::Tensor linear_w4a16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                        int64_t group_size, const std::optional<at::Tensor>& bias) {
  const char* op = "linear_w4a16";
  auto [N, K] = check_w4(op, x, w, scales, zeros, group_size);
  const fk::DType dt = float_dtype(op, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  auto b = bias_f32(op, bias, N, x);
  auto [x2, out_shape] = flatten_x(op, x, K, N);
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return empty_k_result(out, bias).view(out_shape);
  const at::Tensor wc = w.contiguous();
  const at::Tensor sc = scales.to(at::kFloat).contiguous();
  const at::Tensor zc = zeros.contiguous();
  Splits sp = make_splits(M, N, K, 4, dt != fk::kF32, x);
  check_launch(op, fk::linear_w4a16(x2.data_ptr(), dt, wc.data_ptr<uint8_t>(), sc.data_ptr<float>(),
                                    zc.data_ptr<uint8_t>(), group_size, ptr_or_null(b), out.data_ptr(), M, N, K,
                                    sp.ptr(), sp.n, stream_of(x)));
  return out.view(out_shape);
}

// int4 weights, dynamic per-token int8 activations: x quantized by the kernel linear_w8a8 uses
// (bit for bit fastkern.formats.quantize_per_token), the int8 values as fp32 integers through
// the fp32 path of the W4A16 kernel (exact products, fp32 sums), then each row times its token
// scale and the bias, in fp32, as the reference orders them. Correct, not yet fast: an int8
// tensor-core kernel over the nibbles is the next step. Not yet run on a GPU.
at::Tensor linear_w4a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group_size, const std::optional<at::Tensor>& bias) {
  const char* op = "linear_w4a8";
  auto [N, K] = check_w4(op, x, w, scales, zeros, group_size);
  const fk::DType dt = float_dtype(op, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  auto b = bias_f32(op, bias, N, x);
  auto [x2, out_shape] = flatten_x(op, x, K, N);
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return empty_k_result(out, bias).view(out_shape);
  const at::Tensor wc = w.contiguous();
  const at::Tensor sc = scales.to(at::kFloat).contiguous();
  const at::Tensor zc = zeros.contiguous();
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
  cudaStream_t stream = stream_of(x);
  check_launch(op, fk::quantize_per_token(x2.data_ptr(), dt, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), M, K,
                                          stream));
  const at::Tensor qf = xq.to(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  Splits sp = make_splits(M, N, K, 4, false, x);
  check_launch(op, fk::linear_w4a16(qf.data_ptr(), fk::kF32, wc.data_ptr<uint8_t>(), sc.data_ptr<float>(),
                                    zc.data_ptr<uint8_t>(), group_size, nullptr, y.data_ptr(), M, N, K, sp.ptr(), sp.n,
                                    stream));
  y.mul_(xs.unsqueeze(1));
  if (b.has_value()) y.add_(*b);
  return y.to(x.scalar_type()).view(out_shape);
}

at::Tensor linear_sparse24(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "linear_sparse24";
  check_cuda(op, "x", x, x);
  check_cuda(op, "values", values, x);
  check_cuda(op, "meta", meta, x);
  const fk::DType dt = float_dtype(op, "x", x);
  check_dtype(op, "values", values, x.scalar_type());
  TORCH_CHECK(values.dim() == 2, "fastkern_C::linear_sparse24: ", describe("values", values), " must be 2-D [N, K/2]");
  const int64_t N = values.size(0), K = 2 * values.size(1);
  TORCH_CHECK(K % 4 == 0, "fastkern_C::linear_sparse24: 2:4 sparsity needs K divisible by 4, got K=", K, " from ",
              describe("values", values));
  check_dtype(op, "meta", meta, at::kByte);
  check_shape(op, "meta", meta, {N, K / 4});
  c10::cuda::CUDAGuard guard(x.device());
  auto b = bias_f32(op, bias, N, x);
  auto [x2, out_shape] = flatten_x(op, x, K, N);
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return empty_k_result(out, bias).view(out_shape);
  const at::Tensor vc = values.contiguous();
  const at::Tensor mc = meta.contiguous();
  Splits sp = make_splits(M, N, K, 8, dt != fk::kF32, x);
  check_launch(op, fk::linear_sparse24(x2.data_ptr(), dt, vc.data_ptr(), mc.data_ptr<uint8_t>(), ptr_or_null(b),
                                       out.data_ptr(), M, N, K, sp.ptr(), sp.n, stream_of(x)));
  return out.view(out_shape);
}

at::Tensor linear_blocksparse(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, int64_t out_features, const std::optional<at::Tensor>& bias) {
  const char* op = "linear_blocksparse";
  check_cuda(op, "x", x, x);
  check_cuda(op, "blocks", blocks, x);
  check_cuda(op, "row_ptr", row_ptr, x);
  check_cuda(op, "col_idx", col_idx, x);
  const fk::DType dt = float_dtype(op, "x", x);
  check_dtype(op, "blocks", blocks, x.scalar_type());
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) > 0 && blocks.size(2) > 0, "fastkern_C::linear_blocksparse: ",
              describe("blocks", blocks), " must be 3-D [nnz_blocks, bn, bk] with a positive block size");
  TORCH_CHECK(out_features >= 0, "fastkern_C::linear_blocksparse: out_features must be >= 0, got ", out_features);
  const int64_t nnzb = blocks.size(0), bn = blocks.size(1), bk = blocks.size(2), N = out_features;
  check_dtype(op, "row_ptr", row_ptr, at::kLong);
  check_dtype(op, "col_idx", col_idx, at::kLong);
  check_shape(op, "row_ptr", row_ptr, {(N + bn - 1) / bn + 1});
  check_shape(op, "col_idx", col_idx, {nnzb});
  TORCH_CHECK(x.dim() >= 1, "fastkern_C::linear_blocksparse: ", describe("x", x),
              " must have at least one dimension [..., K]");
  const int64_t K = x.size(-1);
  c10::cuda::CUDAGuard guard(x.device());
  auto b = bias_f32(op, bias, N, x);
  auto [x2, out_shape] = flatten_x(op, x, K, N);
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  if (K == 0) return empty_k_result(out, bias).view(out_shape);
  const at::Tensor bc = blocks.contiguous();
  const at::Tensor rc = row_ptr.contiguous();
  const at::Tensor cc = col_idx.contiguous();
  check_launch(op, fk::linear_blocksparse(x2.data_ptr(), dt, bc.data_ptr(), rc.data_ptr<int64_t>(),
                                          cc.data_ptr<int64_t>(), nnzb, bn, bk, ptr_or_null(b), out.data_ptr(), M, N,
                                          K, stream_of(x)));
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkern_C, CUDA, m) {
  m.impl("gemm", &gemm);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("linear_w8a16", &linear_w8a16);
  m.impl("linear_w8a8", &linear_w8a8);
  m.impl("linear_w4a16", &linear_w4a16);
  m.impl("linear_w4a8", &linear_w4a8);
  m.impl("linear_sparse24", &linear_sparse24);
  m.impl("linear_blocksparse", &linear_blocksparse);
}
