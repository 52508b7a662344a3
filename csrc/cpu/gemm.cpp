// Dense float GEMM on the CPU: fastkern_C::gemm(a [..., K], b [N, K]) = a @ b.T.
//
// Small M (<= kGemvMaxM rows) is a matrix-vector product bound by reading b
// once: b streams through in its own dtype and is converted in registers.
// Larger M runs the cache-blocked packed GEMM of gemm_blocked.h.
#include <torch/library.h>

#include "cpu/gemm_blocked.h"

namespace fastkern {
namespace cpu {
namespace gemm {
namespace {

constexpr int64_t kGemvMaxM = 4;

// ------------------------------------------------------------------ GEMV
//
// y[m, n] = sum_k x[m, k] * w[n, k] for rows n in [n0, n1); x is fp32 [M, K]
// contiguous, w rows contiguous with stride ldw. Up to 2 rows of x and 4 rows of
// w at a time: 8 accumulator chains cover the FMA latency while w streams.

template <class T, int MT, int R>
void gemv_tile_generic(const float* x, int64_t K, const T* w, int64_t ldw, int64_t n, float* y, int64_t ldy) {
  float acc[MT][R][8];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 8; ++l) acc[m][r][l] = 0.f;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    float wv[R][8];
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 8; ++l) wv[r][l] = to_f32(w[(n + r) * ldw + k + l]);
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < 8; ++l) acc[m][r][l] += x[m * K + k + l] * wv[r][l];
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * to_f32(w[(n + r) * ldw + kk]);
      float t = 0.f;
      for (int l = 0; l < 8; ++l) t += acc[m][r][l];
      y[m * ldy + n + r] = t + s;
    }
}

#if FASTKERN_X86
template <class T, int MT, int R>
FASTKERN_AVX2 void gemv_tile_avx2(const float* x, int64_t K, const T* w, int64_t ldw, int64_t n, float* y,
                                  int64_t ldy) {
  __m256 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const T* wr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * ldw;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load8(wr[r] + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load_partial8(wr[r] + k, K - k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m256 xv = load_partial8(x + m * K + k, K - k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) y[m * ldy + n + r] = hsum8(acc[m][r]);
}
#endif

template <class T, int MT>
void gemv_rows(Isa isa, const float* x, int64_t K, const T* w, int64_t ldw, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  int64_t n = n0;
#if FASTKERN_X86
  if (isa >= Isa::Avx2) {
    for (; n + 4 <= n1; n += 4) gemv_tile_avx2<T, MT, 4>(x, K, w, ldw, n, y, ldy);
    for (; n < n1; ++n) gemv_tile_avx2<T, MT, 1>(x, K, w, ldw, n, y, ldy);
    return;
  }
#endif
  for (; n + 4 <= n1; n += 4) gemv_tile_generic<T, MT, 4>(x, K, w, ldw, n, y, ldy);
  for (; n < n1; ++n) gemv_tile_generic<T, MT, 1>(x, K, w, ldw, n, y, ldy);
}

template <class T>
void gemv(Isa isa, const at::Tensor& x32, const at::Tensor& w, float* y) {
  const int64_t M = x32.size(0), K = x32.size(1), N = w.size(0);
  const float* x = x32.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  const int64_t ldw = w.stride(0);
  // Chunks of whole 4-row tiles so every row is computed by the same tile shape
  // whatever the thread count.
  parallel_for_dynamic(0, div_up(N, 4), grain_for(div_up(N, 4), 4 * M * K), [&](int64_t b, int64_t e) {
    const int64_t n0 = b * 4, n1 = std::min(N, e * 4);
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) gemv_rows<T, 2>(isa, x + m * K, K, wp, ldw, n0, n1, y + m * N, N);
    for (; m < M; ++m) gemv_rows<T, 1>(isa, x + m * K, K, wp, ldw, n0, n1, y + m * N, N);
  });
}

// ------------------------------------------------------------------ entry

template <class T>
void gemm_typed(const at::Tensor& a2, const at::Tensor& b, at::Tensor& out32) {
  const Isa isa = active_isa();
  const int64_t M = a2.size(0), K = a2.size(1), N = b.size(0);
  float* C = out32.data_ptr<float>();
  if (M <= kGemvMaxM && K > 0) {
    at::Tensor x32 = a2.to(at::kFloat).contiguous();
    at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
    gemv<T>(isa, x32, bc, C);
    return;
  }
  StridedRows<T> pa{a2.data_ptr<T>(), a2.stride(0), a2.stride(1), isa};
  StridedRows<T> pb{b.data_ptr<T>(), b.stride(0), b.stride(1), isa};
  blocked_gemm(M, N, K, micro_kernel(isa), pa, pb, C, N);
}

at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_cpu_float("gemm", "a", a);
  check_cpu_float("gemm", "b", b);
  TORCH_CHECK(b.dim() == 2, "fastkern_C::gemm: ", describe("b", b), " must be 2-D [N, K]");
  TORCH_CHECK(a.dim() >= 1 && a.size(-1) == b.size(1), "fastkern_C::gemm: ", describe("a", a),
              " must be [..., K] with K=", b.size(1), " from ", describe("b", b));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastkern_C::gemm: a and b must have one dtype, got ",
              describe("a", a), " and ", describe("b", b));
  const int64_t K = b.size(1), N = b.size(0), M = rows_of(a);
  at::Tensor a2 = a.reshape({M, K});
  at::Tensor out32 = at::empty({M, N}, a.options().dtype(at::kFloat));
  switch (a.scalar_type()) {
    case at::kFloat: gemm_typed<float>(a2, b, out32); break;
    case at::kHalf: gemm_typed<c10::Half>(a2, b, out32); break;
    default: gemm_typed<c10::BFloat16>(a2, b, out32); break;
  }
  return finish(out32, c10::nullopt, a, N);
}

}  // namespace
}  // namespace gemm
}  // namespace cpu
}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern_C, CPU, m) { m.impl("gemm", &fastkern::cpu::gemm::gemm_cpu); }
