// int4 group-wise CPU kernel: fastkern_C::linear_w4a16 (canonical format of
// DESIGN §3: w uint8 [N, K/2] low nibble first, scales [N, K/g], zeros uint8
// [N, K/g], w = (q - zero) * scale).
//
// Small M (AVX2), where streaming the weight once is the whole cost at M = 1:
// a GEMV over the canonical layout as is (no repacked copy), with fp32
// activations (exact (q - z), FMA; the 1e-5 fp32 contract rules out integer
// activations) or, for fp16/bf16 activations, int16 activations and vpmaddwd.
// The activations are permuted once per call into the order the widened weight
// words produce, zero-padded per group. Details at each kernel.
//
// Larger M and the generic path dequantize a cache-sized panel exactly as the
// reference does ((q - z) * s in fp32) and run fp32 dot tiles over all rows.
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
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

// ------------------------------------------------------------------ GEMV, fp32 activations (AVX2)
//
// Each 16-byte load holds 32 nibbles; widened to 8 x 32-bit lanes, lane j holds
// the nibbles of k = 4j..4j+3. Instead of shift + mask + int->float convert per
// 8 values (the convert and the shifts share two of Zen's four vector pipes),
// the exponent of 2^23 is OR-ed into every lane once, and one AND per t keeps
// that exponent and nibble t in place: the lane reads as the float
// 2^23 + q * 16^t, and subtracting 2^23 + z * 16^t leaves (q - z) * 16^t
// exactly. The activations of slot t are pre-scaled by 16^-t (exact, a power of
// two), so the FMA adds (q - z) * x.

#if FASTKERN_X86
constexpr int kAcc1 = 4;  // accumulators per x row when MR = 1 (FMA latency x throughput)

template <int MR>
FASTKERN_AVX2 inline void w4f_block(__m256 (&acc)[MR][kAcc1], const __m256 (&c)[4], const uint8_t* wp,
                                    const float* x, int64_t ldx) {
  constexpr int A = MR == 1 ? kAcc1 : 1;
  const __m256i magic = _mm256_set1_epi32(0x4B000000);
  __m256i v = _mm256_or_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp))), magic);
  for (int t = 0; t < 4; ++t) {
    const __m256i mask = _mm256_set1_epi32(0x4B000000 | (0xF << (4 * t)));
    __m256 d = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(v, mask)), c[t]);
    for (int i = 0; i < MR; ++i) acc[i][t % A] = _mm256_fmadd_ps(d, _mm256_loadu_ps(x + i * ldx + 8 * t), acc[i][t % A]);
  }
}

// Weight row n against MR rows of permuted activations XP (row stride ldxp).
template <int MR>
FASTKERN_AVX2 void w4f_gemv_row(const W4& p, int64_t n, const float* XP, int64_t ldxp, float* Y, int64_t ldy) {
  constexpr int A = MR == 1 ? kAcc1 : 1;
  const int64_t g = p.g, nfull = g / 32, rem = g % 32, nbg = nfull + (rem > 0);
  __m256 tot[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm256_setzero_ps();
  alignas(16) uint8_t tail[16] = {0};
  const uint8_t* wrow = p.w + n * p.ldw;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m256 acc[MR][kAcc1];
    for (int i = 0; i < MR; ++i)
      for (int a = 0; a < A; ++a) acc[i][a] = _mm256_setzero_ps();
    const float z = float(p.z[n * p.G + gi]);
    __m256 c[4];
    for (int t = 0; t < 4; ++t) c[t] = _mm256_set1_ps(8388608.0f + z * float(1 << (4 * t)));
    const float* xg = XP + gi * nbg * 32;
    const uint8_t* wg = wrow + gi * (g / 2);
    for (int64_t b = 0; b < nfull; ++b) w4f_block<MR>(acc, c, wg + b * 16, xg + b * 32, ldxp);
    if (rem) {
      // padding nibbles meet zero activations and add nothing
      std::memcpy(tail, wg + nfull * 16, rem / 2);
      w4f_block<MR>(acc, c, tail, xg + nfull * 32, ldxp);
    }
    const __m256 vs = _mm256_set1_ps(p.s[n * p.G + gi]);
    for (int i = 0; i < MR; ++i) {
      __m256 sum = acc[i][0];
      if (A == 4) sum = _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]));
      tot[i] = _mm256_fmadd_ps(vs, sum, tot[i]);
    }
  }
  for (int i = 0; i < MR; ++i) Y[i * ldy + n] = hsum8_avx2(tot[i]);
}

template <int MR>
void w4f_gemv_rows(const W4& p, const float* XP, int64_t ldxp, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) w4f_gemv_row<MR>(p, n, XP, ldxp, Y, ldy);
}
#endif

// Activations for the fp32 GEMV: per group, blocks of 32 in the order the
// widened weight words produce (k = 4 j + t at position 8 t + j), pre-scaled by
// 16^-t, zero-padded.
void w4f_prepare_x(const float* X, int64_t ldx, int64_t M, int64_t K, int64_t g, float* XP, int64_t ldxp) {
  const int64_t G = K / g, nbg = (g + 31) / 32;
  const float scale[4] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096};
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    float* xp = XP + m * ldxp;
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t b = 0; b < nbg; ++b) {
        float* blk = xp + (gi * nbg + b) * 32;
        for (int t = 0; t < 4; ++t)
          for (int j = 0; j < 8; ++j) {
            const int64_t kin = b * 32 + 4 * j + t;
            blk[8 * t + j] = kin < g ? x[gi * g + kin] * scale[t] : 0.f;
          }
      }
  }
}

// ------------------------------------------------------------------ GEMV, int16 activations (AVX2)
//
// For half-precision activations (output tolerance 1e-2) the activations are
// requantized to int16 per chunk of at most kChunk weights (relative output
// error about 2e-5, far below the half-precision rounding of the output), and
// the inner loop becomes integer: vpmovzxbw widens 16 packed bytes to words, a
// mask and a shift give the even-k and odd-k nibbles, and two vpmaddwd
// multiply-add them into int32 lanes: no int->float work per weight. Per chunk,
// sum (q - z) a = sum q a - z sum a is exact in integers up to the float
// conversion; the chunk's int32 lanes are converted once and scaled by
// s * s_a. fp32 activations use this path only when FASTKERN_W4A16_INT16_ACT=1
// (a looser error than the 1e-5 fp32 contract).

constexpr int64_t kChunk = 1024;  // 1024 * 15 * 32767 < 2^31

struct I16Acts {
  const int16_t* a;  // per row: for each chunk, blocks of 32 as [16 even-k | 16 odd-k] int16
  int64_t lda;
  const float* sa;   // per row: the activation scale of each chunk
  const float* asum; // per row: sum of the chunk's int16 activations
  int64_t ldc;       // chunks per row
  int64_t nch;       // chunks per group
  int64_t chb;       // blocks per full chunk
};

#if FASTKERN_X86
template <int MR, int NR>
FASTKERN_AVX2 inline void w4i_block(__m256i (&acc)[MR][NR], const uint8_t* const* wp, const int16_t* a,
                                    int64_t lda) {
  const __m256i m4 = _mm256_set1_epi16(0x0F);
  for (int j = 0; j < NR; ++j) {
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp[j])));
    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_srli_epi16(v, 4);
    for (int i = 0; i < MR; ++i) {
      const int16_t* ai = a + i * lda;
      __m256i p0 = _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai)));
      __m256i p1 = _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + 16)));
      acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_add_epi32(p0, p1));
    }
  }
}

template <int MR, int NR>
FASTKERN_AVX2 void w4i_gemv(const W4& p, const I16Acts& q, int64_t n, float* Y, int64_t ldy) {
  const int64_t g = p.g, nbg = (g + 31) / 32;
  __m256 tot[MR][NR];
  float corr[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      tot[i][j] = _mm256_setzero_ps();
      corr[i][j] = 0.f;
    }
  alignas(16) uint8_t tail[NR][16];
  for (int j = 0; j < NR; ++j) std::memset(tail[j], 0, 16);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    float s[NR], z[NR];
    for (int j = 0; j < NR; ++j) {
      s[j] = p.s[(n + j) * p.G + gi];
      z[j] = float(p.z[(n + j) * p.G + gi]);
    }
    for (int64_t c = 0; c < q.nch; ++c) {
      const int64_t b0 = c * q.chb, b1 = std::min(nbg, b0 + q.chb);
      const int64_t ci = gi * q.nch + c;
      __m256i acc[MR][NR];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
      const uint8_t* wp[NR];
      for (int j = 0; j < NR; ++j) wp[j] = p.w + (n + j) * p.ldw + gi * (g / 2) + b0 * 16;
      const int16_t* ab = q.a + (gi * nbg + b0) * 32;
      for (int64_t b = b0; b < b1; ++b) {
        if ((b + 1) * 32 > g) {
          const int64_t nbytes = (g - b * 32) / 2;
          const uint8_t* tp[NR];
          for (int j = 0; j < NR; ++j) {
            std::memcpy(tail[j], wp[j], nbytes);
            tp[j] = tail[j];
          }
          w4i_block<MR, NR>(acc, tp, ab, q.lda);
        } else {
          w4i_block<MR, NR>(acc, wp, ab, q.lda);
        }
        for (int j = 0; j < NR; ++j) wp[j] += 16;
        ab += 32;
      }
      for (int i = 0; i < MR; ++i) {
        const float sa = q.sa[i * q.ldc + ci], as = q.asum[i * q.ldc + ci];
        for (int j = 0; j < NR; ++j) {
          const float f = s[j] * sa;
          tot[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(f), _mm256_cvtepi32_ps(acc[i][j]), tot[i][j]);
          corr[i][j] += f * z[j] * as;
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[i * ldy + n + j] = hsum8_avx2(tot[i][j]) - corr[i][j];
}

template <int MR, int NR>
void w4i_gemv_rows(const W4& p, const I16Acts& q, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) w4i_gemv<MR, NR>(p, q, n, Y, ldy);
  for (; n < n1; ++n) w4i_gemv<MR, 1>(p, q, n, Y, ldy);
}
#endif

// int16 activations per chunk: s_a = absmax / 32767, a = round(x / s_a).
// Returns false if x holds NaN or inf (the caller then takes an fp32 path).
bool w4i_prepare_x(const float* X, int64_t ldx, int64_t M, int64_t K, int64_t g, int16_t* A, int64_t lda, float* SA,
                   float* AS, int64_t ldc, int64_t nch, int64_t chb) {
  const int64_t G = K / g, nbg = (g + 31) / 32;
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t k0 = c * chb * 32, k1 = std::min(g, k0 + chb * 32);
        const float* xc = x + gi * g;
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) {
          const float v = std::fabs(xc[k]);
          if (!(v <= 3.4e38f)) return false;
          amax = std::max(amax, v);
        }
        const float sa = amax / 32767.f;
        const float inv = sa > 0.f ? 1.f / sa : 0.f;
        int64_t sum = 0;
        for (int64_t b = k0 / 32; b < (k1 + 31) / 32; ++b) {
          int16_t* blk = A + m * lda + (gi * nbg + b) * 32;
          for (int i = 0; i < 16; ++i)
            for (int h = 0; h < 2; ++h) {
              const int64_t k = b * 32 + 2 * i + h;
              int v = 0;
              if (k < k1) v = std::max(-32767, std::min(32767, int(std::nearbyint(xc[k] * inv))));
              blk[16 * h + i] = int16_t(v);
              sum += v;
            }
        }
        SA[m * ldc + gi * nch + c] = sa;
        AS[m * ldc + gi * nch + c] = float(sum);
      }
  }
  return true;
}

bool int16_acts_for_fp32() {
  static const bool on = [] {
    const char* e = std::getenv("FASTKERN_W4A16_INT16_ACT");
    return e != nullptr && e[0] == '1';
  }();
  return on;
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
    const int64_t nbg = (group_size + 31) / 32, ldxp = G * nbg * 32;
    float* yp = Y.data_ptr<float>();
    if (x.scalar_type() != at::kFloat || int16_acts_for_fp32()) {
      const int64_t chb = kChunk / 32, nch = (nbg + chb - 1) / chb, ldc = G * nch;
      at::Tensor A = at::empty({M, ldxp}, X.options().dtype(at::kShort));
      at::Tensor SA = at::empty({M, ldc}, X.options());
      at::Tensor AS = at::empty({M, ldc}, X.options());
      if (w4i_prepare_x(X.data_ptr<float>(), ldx, M, K, group_size, A.data_ptr<int16_t>(), ldxp,
                        SA.data_ptr<float>(), AS.data_ptr<float>(), ldc, nch, chb)) {
        I16Acts q{A.data_ptr<int16_t>(), ldxp, SA.data_ptr<float>(), AS.data_ptr<float>(), ldc, nch, chb};
        parallel_rows(N, kGemvRows, 16, [&](int64_t n0, int64_t n1) {
          switch (M) {
            case 1: w4i_gemv_rows<1, 4>(p, q, yp, N, n0, n1); break;
            case 2: w4i_gemv_rows<2, 2>(p, q, yp, N, n0, n1); break;
            default: w4i_gemv_rows<3, 1>(p, q, yp, N, n0, n1); break;
          }
        });
        done = true;
      }
    }
    if (!done) {
      at::Tensor XP = at::empty({M, ldxp}, X.options());
      w4f_prepare_x(X.data_ptr<float>(), ldx, M, K, group_size, XP.data_ptr<float>(), ldxp);
      const float* xp = XP.data_ptr<float>();
      parallel_rows(N, kGemvRows, 16, [&](int64_t n0, int64_t n1) {
        switch (M) {
          case 1: w4f_gemv_rows<1>(p, xp, ldxp, yp, N, n0, n1); break;
          case 2: w4f_gemv_rows<2>(p, xp, ldxp, yp, N, n0, n1); break;
          default: w4f_gemv_rows<3>(p, xp, ldxp, yp, N, n0, n1); break;
        }
      });
      done = true;
    }
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
