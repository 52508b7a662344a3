// int4 group-wise CPU kernel: fastkern_C::linear_w4a16 (canonical format of
// DESIGN §3: w uint8 [N, K/2] low nibble first, scales [N, K/g], zeros uint8
// [N, K/g], w = (q - zero) * scale).
//
// Small M (AVX2): the weight streams once from memory, 4 bits per value, which
// is the whole cost at M = 1. Activations stay fp32 (the 1e-5 contract rules
// out int8 activations), so the work per weight is nibble -> fp32 -> FMA; the
// scale multiplies each group's partial sum once. Each 16-byte load holds 32
// nibbles; widened to 8 x 32-bit lanes, lane j holds the nibbles of k = 4j..4j+3,
// so one uniform shift + mask gives 8 values for k = 4j + t. The activations
// are permuted once per call to that order (and zero-padded per group), which
// keeps the canonical weight layout usable as is, with no repacked copy.
//
// Larger M and the generic path dequantize a cache-sized panel exactly as the
// reference does ((q - z) * s in fp32) and run fp32 dot tiles over all rows.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/quant_common.h"

namespace fastkern {
namespace cpu {
namespace quant {
namespace {

constexpr int64_t kGemvMaxM = 3;
constexpr int64_t kGemvRows = 4;
constexpr int64_t kPanelRows = 64;
constexpr int64_t kPanelK = 512;

struct W4 {
  const uint8_t* w;  // [N, ldw]
  int64_t ldw;       // K / 2
  const float* s;    // [N, G]
  const uint8_t* z;  // [N, G]
  int64_t G;
  int64_t g;  // group size (even, divides K)
};

// ------------------------------------------------------------------ panel dequantization

// dst[r * ldb + (k - k0)] = (q - z) * s for rows n0 + r (r < nb) and k in [k0, k0 + kk);
// columns kk..ldb are zeroed. k0 and kk are even.
void w4_dequant_generic(const W4& p, int64_t n0, int64_t nb, int64_t k0, int64_t kk, float* dst, int64_t ldb) {
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t n = n0 + r;
    float* d = dst + r * ldb - k0;
    for (int64_t k = k0; k < k0 + kk;) {
      const int64_t gi = k / p.g;
      const int64_t ge = std::min((gi + 1) * p.g, k0 + kk);
      const float s = p.s[n * p.G + gi];
      const float zf = float(p.z[n * p.G + gi]);
      const uint8_t* b = p.w + n * p.ldw + k / 2;
      for (int64_t i = 0; i < (ge - k) / 2; ++i) {
        d[k + 2 * i] = (float(b[i] & 15) - zf) * s;
        d[k + 2 * i + 1] = (float(b[i] >> 4) - zf) * s;
      }
      k = ge;
    }
    for (int64_t k = kk; k < ldb; ++k) dst[r * ldb + k] = 0.f;
  }
}

#if FASTKERN_X86
FASTKERN_AVX2 void w4_dequant_avx2(const W4& p, int64_t n0, int64_t nb, int64_t k0, int64_t kk, float* dst,
                                   int64_t ldb) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t n = n0 + r;
    float* d = dst + r * ldb - k0;
    for (int64_t k = k0; k < k0 + kk;) {
      const int64_t gi = k / p.g;
      const int64_t ge = std::min((gi + 1) * p.g, k0 + kk);
      const float s = p.s[n * p.G + gi];
      const float zf = float(p.z[n * p.G + gi]);
      const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(zf);
      const uint8_t* b = p.w + n * p.ldw + k / 2;
      int64_t i = 0;
      for (; k + 2 * i + 32 <= ge; i += 16) {
        __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
        __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        __m128i e0 = _mm_unpacklo_epi8(lo, hi), e1 = _mm_unpackhi_epi8(lo, hi);
        float* o = d + k + 2 * i;
        __m128i parts[4] = {e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)};
        for (int c = 0; c < 4; ++c) {
          __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[c]));
          _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(_mm256_sub_ps(f, vz), vs));
        }
      }
      for (; k + 2 * i < ge; ++i) {
        d[k + 2 * i] = (float(b[i] & 15) - zf) * s;
        d[k + 2 * i + 1] = (float(b[i] >> 4) - zf) * s;
      }
      k = ge;
    }
    for (int64_t k = kk; k < ldb; ++k) dst[r * ldb + k] = 0.f;
  }
}
#endif

void w4_panel_gemm(const W4& p, int64_t N, int64_t K, const float* X, int64_t ldx, int64_t M, float* Y,
                   bool avx2) {
  parallel_rows(N, kPanelRows, 1, [&](int64_t nb0, int64_t nb1) {
    std::vector<float> panel(kPanelRows * kPanelK);
    for (int64_t n0 = nb0; n0 < nb1; n0 += kPanelRows) {
      const int64_t nb = std::min(kPanelRows, nb1 - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
        const int64_t kk = std::min(kPanelK, K - k0);
        const int64_t kkp = round_up(kk, 8);
#if FASTKERN_X86
        if (avx2) {
          w4_dequant_avx2(p, n0, nb, k0, kk, panel.data(), kkp);
          dot_block_f32<true>(X + k0, ldx, M, panel.data(), kkp, nb, Y + n0, N, kkp, k0 > 0);
          continue;
        }
#endif
        w4_dequant_generic(p, n0, nb, k0, kk, panel.data(), kkp);
        dot_block_f32<false>(X + k0, ldx, M, panel.data(), kkp, nb, Y + n0, N, kkp, k0 > 0);
      }
    }
  });
}

// ------------------------------------------------------------------ GEMV (AVX2)

#if FASTKERN_X86
// One 32-weight block of NR rows against MR rows of permuted activations x
// (x[i * ldx + 8 t + j] is the activation of k = 4 j + t). q - z is exact in
// fp32, so the sum is as accurate as the reference's; folding z out of the loop
// (sum q x - z sum x) saves the subtraction but cancels badly for long groups.
template <int MR, int NR>
FASTKERN_AVX2 inline void w4_block(__m256 (&acc)[MR][NR], const __m256 (&vz)[NR], const uint8_t* const* wp,
                                   const float* x, int64_t ldx) {
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  for (int j = 0; j < NR; ++j) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp[j])));
    __m256 q0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m4)), vz[j]);
    __m256 q1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4), m4)), vz[j]);
    __m256 q2 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8), m4)), vz[j]);
    __m256 q3 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 12)), vz[j]);
    for (int i = 0; i < MR; ++i) {
      const float* xi = x + i * ldx;
      acc[i][j] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xi), acc[i][j]);
      acc[i][j] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xi + 8), acc[i][j]);
      acc[i][j] = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xi + 16), acc[i][j]);
      acc[i][j] = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xi + 24), acc[i][j]);
    }
  }
}

// Rows n .. n + NR of the weight against MR rows of x. XP: permuted activations,
// row stride ldxp, G * nbg blocks of 32.
template <int MR, int NR>
FASTKERN_AVX2 void w4_gemv_avx2(const W4& p, int64_t n, const float* XP, int64_t ldxp, float* Y, int64_t ldy) {
  const int64_t g = p.g, nfull = g / 32, rem = g % 32, nbg = nfull + (rem > 0);
  __m256 tot[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) tot[i][j] = _mm256_setzero_ps();
  alignas(16) uint8_t tail[NR][16];
  for (int j = 0; j < NR; ++j) std::memset(tail[j], 0, 16);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m256 acc[MR][NR], vz[NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int j = 0; j < NR; ++j) vz[j] = _mm256_set1_ps(float(p.z[(n + j) * p.G + gi]));
    const float* xg = XP + gi * nbg * 32;
    const uint8_t* wp[NR];
    for (int j = 0; j < NR; ++j) wp[j] = p.w + (n + j) * p.ldw + gi * (g / 2);
    for (int64_t b = 0; b < nfull; ++b) {
      w4_block<MR, NR>(acc, vz, wp, xg + b * 32, ldxp);
      for (int j = 0; j < NR; ++j) wp[j] += 16;
    }
    if (rem) {
      // The padding nibbles are 0 and meet zero activations: (0 - z) * 0 adds nothing.
      const uint8_t* tp[NR];
      for (int j = 0; j < NR; ++j) {
        std::memcpy(tail[j], wp[j], rem / 2);
        tp[j] = tail[j];
      }
      w4_block<MR, NR>(acc, vz, tp, xg + nfull * 32, ldxp);
    }
    for (int j = 0; j < NR; ++j) {
      const __m256 vs = _mm256_set1_ps(p.s[(n + j) * p.G + gi]);
      for (int i = 0; i < MR; ++i) tot[i][j] = _mm256_fmadd_ps(vs, acc[i][j], tot[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[i * ldy + n + j] = hsum8_avx2(tot[i][j]);
}

template <int MR, int NR>
void w4_gemv_rows(const W4& p, const float* XP, int64_t ldxp, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) w4_gemv_avx2<MR, NR>(p, n, XP, ldxp, Y, ldy);
  for (; n < n1; ++n) w4_gemv_avx2<MR, 1>(p, n, XP, ldxp, Y, ldy);
}
#endif

// Activations for the GEMV kernel: per group, blocks of 32 in the order the
// widened weight words produce (k = 4 j + t at position 8 t + j), zero-padded.
void w4_prepare_x(const float* X, int64_t ldx, int64_t M, int64_t K, int64_t g, float* XP, int64_t ldxp) {
  const int64_t G = K / g, nbg = (g + 31) / 32;
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    float* xp = XP + m * ldxp;
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t b = 0; b < nbg; ++b) {
        float* blk = xp + (gi * nbg + b) * 32;
        for (int t = 0; t < 4; ++t)
          for (int j = 0; j < 8; ++j) {
            const int64_t kin = b * 32 + 4 * j + t;
            blk[8 * t + j] = kin < g ? x[gi * g + kin] : 0.f;
          }
      }
  }
}

// ------------------------------------------------------------------ op

at::Tensor linear_w4a16_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const char* op = "linear_w4a16";
  check_float(op, "x", x);
  check_dtype(op, "w", w, at::kByte);
  check_2d(op, "w", w);
  const int64_t N = w.size(0), K = 2 * w.size(1);
  check_x(op, "x", x, K);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "fastkern_C::", op,
              ": group_size=", group_size, " must be a positive even number dividing K=", K, " (", describe("w", w),
              ")");
  const int64_t G = K / group_size;
  check_float(op, "scales", scales);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, "fastkern_C::", op, ": ",
              describe("scales", scales), " must have shape [", N, ", ", G, "]");
  check_dtype(op, "zeros", zeros, at::kByte);
  TORCH_CHECK(zeros.dim() == 2 && zeros.size(0) == N && zeros.size(1) == G, "fastkern_C::", op, ": ",
              describe("zeros", zeros), " must have shape [", N, ", ", G, "]");
  check_bias(op, bias, N);

  at::Tensor wc = w.contiguous();
  at::Tensor sc = scales.to(at::kFloat).contiguous();
  at::Tensor zc = zeros.contiguous();
  W4 p{wc.data_ptr<uint8_t>(), K / 2, sc.data_ptr<float>(), zc.data_ptr<uint8_t>(), G, group_size};
  const bool avx2 = use_avx2();
  at::Tensor X = x_f32_padded(x, K, round_up(K, 8));
  const int64_t M = X.size(0), ldx = X.size(1);
  at::Tensor Y = at::zeros({M, N}, X.options());
  if (M == 0 || N == 0 || K == 0) return finish(Y, bias, x, N);

  bool done = false;
#if FASTKERN_X86
  if (avx2 && M <= kGemvMaxM) {
    const int64_t ldxp = G * ((group_size + 31) / 32) * 32;
    at::Tensor XP = at::empty({M, ldxp}, X.options());
    w4_prepare_x(X.data_ptr<float>(), ldx, M, K, group_size, XP.data_ptr<float>(), ldxp);
    const float* xp = XP.data_ptr<float>();
    float* yp = Y.data_ptr<float>();
    parallel_rows(N, kGemvRows, 16, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: w4_gemv_rows<1, 4>(p, xp, ldxp, yp, N, n0, n1); break;
        case 2: w4_gemv_rows<2, 2>(p, xp, ldxp, yp, N, n0, n1); break;
        default: w4_gemv_rows<3, 1>(p, xp, ldxp, yp, N, n0, n1); break;
      }
    });
    done = true;
  }
#endif
  if (!done) w4_panel_gemm(p, N, K, X.data_ptr<float>(), ldx, M, Y.data_ptr<float>(), avx2);
  return finish(Y, bias, x, N);
}

}  // namespace
}  // namespace quant
}  // namespace cpu
}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern_C, CPU, m) { m.impl("linear_w4a16", &fastkern::cpu::quant::linear_w4a16_cpu); }
