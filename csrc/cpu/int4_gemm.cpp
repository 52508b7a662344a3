// int4 group-wise CPU kernel: fastkern_C::linear_w4a16 (canonical format of
// DESIGN §3: w uint8 [N, K/2] low nibble first, scales [N, K/g], zeros uint8
// [N, K/g], w = (q - zero) * scale).
//
// M <= 32 (fp32 x) / 40 (fp16, bf16 x) with AVX-512 VNNI (8 for groups under 64), 16 on
// AVX2, where streaming
// the weight once is the whole cost at M = 1: a GEMV over the canonical layout as is
// (no repacked copy), the activations quantized per call to int8 "limbs" per group
// (three for fp32, which
// keeps the 1e-5 fp32 contract; two for fp16/bf16) and multiplied with the
// unpacked nibbles by byte dot products, the zero point folded out. Details at
// "GEMV: int8 limbs x nibbles". On AVX2 (no VNNI) groups of a multiple of 64 sum the
// byte products in int16 over spans of up to 4 chunks (w4l_rows16_avx2), and g = 32
// takes two groups per 64-weight chunk (w4l_rows16p_avx2). With AVX512-BF16 (AVX-512 path) a second GEMV for
// bf16/fp16 activations meets the nibbles converted to bf16 in vdpbf16ps dot products
// (exact products): "GEMV: bf16 dot products" (slower than the limbs now; kept behind
// FASTKERN_W4A16_BF16_GEMV=1 and tested).
//
// At M = 1 with AVX-512 VNNI and g <= 128, one call per thread and K block for all its
// rows (w4l_rows1_avx512), two groups per step.
//
// bf16 x from M = 16 with AVX512-BF16 (AVX-512 path), groups of at least 32: a GEMM of
// vdpbf16ps over the weights as exact bf16 integers q - z, the groups' fp32 sums scaled by
// their weight scales ("GEMM: bf16 dot products"; NaN / inf and |x| > 1e30 take the fp32
// paths below); its last 1..10 rows past a multiple of 16 by a GEMV within it (kW4BfTailRows).
//
// With AVX-512, fp32 x at 6 <= M <= 64 and fp16 x (bf16 x without AVX512-BF16) above the limbs
// up to 64 (groups of a multiple of 16): fp32 FMA tiles over weights
// dequantized in registers by a 16-entry table per row and group ("GEMV tiles: fp32 FMA"; NaN
// and inf in x propagate through the FMAs as in the reference). On AVX2, fp32 x at 3 <= M <= 32
// and bf16 / fp16 x above the limbs up to 32 (groups of a multiple of 16): the same tiles, each
// weight converted in registers.
//
// Larger M, the generic path, and inputs holding NaN, inf or |x| > 1e30 on the limb and bf16
// paths: the fp32 GEMM of
// gemm_skinny.h (M <= 256) or gemm_blocked.h with B slivers dequantized exactly as
// the reference does ((q - z) * s in fp32).
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/gemm_blocked.h"
#include "cpu/gemm_skinny.h"
#include "cpu/quant_common.h"
#include "cpu/scratch.h"
#include "cpu/tile_gemm.h"

namespace fastkern {
namespace cpu {
namespace quant {
namespace {

// The limb GEMV serves M <= kLimbMaxM (fp32 x, three limbs) / kLimbMaxMHalf (fp16/bf16
// x, two limbs); larger M takes the fp32 GEMM over dequantized slivers (skinny_gemm up
// to gemm::kSkinnyMaxM, blocked_gemm beyond). The limbs' cost grows with M (L products
// per weight and row) while the GEMM dequantizes each weight once per call. Measured
// (2 threads, 4096x4096 g128, weights beyond L3, alternating rounds), limbs vs
// skinny_gemm: AVX-512 VNNI fp32 m = 16 / 32 / 48: 2.5 / 5.5 / 7.0 ms against 4.2 / 5.2
// / 6.0; bf16 m = 32 / 48: 4.7 / 6.0 against 5.6 / 5.8. AVX2 fp32 m = 16 / 32 / 48 /
// 64: 5.4 / 13 / 20 / 25 against 5.4 / 8.9 / 11.4 / 14.4; bf16 m = 16 / 24: 3.4 / 9.6
// against 5.0 / 7.8. kGemvMaxM: the small-M regime (the bf16-dot GEMV's limit,
// L1-sized K blocks, 4-row passes).
constexpr int64_t kGemvMaxM = 16;
constexpr int64_t kLimbMaxM = 32;
constexpr int64_t kLimbMaxMHalf = 40;
// VNNI, groups under 64 (more per-group work per weight): g = 32 at 4096x4096, limbs vs
// skinny_gemm m = 4 / 8 / 16: 2.4 / 3.2 / 9.1 ms against 4.5 / 3.9 / 5.8.
constexpr int64_t kLimbMaxMSmallGroup = 8;
constexpr int64_t kLimbMaxMAvx2 = 16;
constexpr int64_t kLimbMaxMHalfAvx2 = 16;
constexpr int64_t kGemvRows = 4;
// groups beyond this take the panels (a bound on the per-group limb blocks; the int32
// sums stay exact for any group, which is summed in spans of at most kSpan chunks)
constexpr int64_t kGemvMaxGroup = int64_t(1) << 20;

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

#if FASTKERN_X86
// One B sliver straight from the nibbles: dst[k * width + r] = (q - z) * s of row row0 + r
// at k0 + k (zero for rows <= r < width), the same fp32 operations as the reference.
// 8 rows x 8 k at a time: each row's 4 bytes are spread to 8 lanes (variable shifts),
// converted and scaled, and the 8 x 8 block is transposed in registers into 8 stores,
// with no dequantized copy in between. Needs g % 8 == 0 (8 consecutive k share a group)
// and k0, kc multiples of 8 (K is a multiple of g).
FASTKERN_AVX2 void w4_pack_sliver_avx2(const W4& p, int64_t row0, int rows, int64_t k0, int64_t kc, int width,
                                       float* dst) {
  const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), m4 = _mm256_set1_epi32(15);
  float sv[32], zv[32];  // the group's scale and zero point per row (width <= 32)
  int64_t k = 0;
  while (k < kc) {
    const int64_t gi = (k0 + k) / p.g, ge = std::min(kc, (gi + 1) * p.g - k0);
    for (int r = 0; r < rows; ++r) {
      sv[r] = p.s[(row0 + r) * p.G + gi];
      zv[r] = float(p.z[(row0 + r) * p.G + gi]);
    }
    for (; k < ge; k += 8) {
      const uint8_t* wb = p.w + row0 * p.ldw + (k0 + k) / 2;
      gemm::pack_k8_avx2(rows, width, dst + k * width, [&](int r) FASTKERN_AVX2 {
        int32_t b;
        std::memcpy(&b, wb + r * p.ldw, 4);
        const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(b), sh), m4);
        return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(zv + r)),
                             _mm256_broadcast_ss(sv + r));
      });
    }
  }
}
#endif

// Larger M: the fp32 GEMM (packed A and B slivers around the register-blocked
// micro-kernel of each ISA), its B slivers filled by dequantizing the nibbles exactly
// as the reference does ((q - z) * s in fp32): a weight element is dequantized once per
// call in skinny_gemm (M <= 256), once per M block (kMC rows of x) in blocked_gemm.
struct W4Packer {
  const W4* p;
  Isa isa;
  bool fused;  // w4_pack_sliver_avx2 where it applies (FASTKERN_W4A16_FUSED_PACK=0: dequantize, then pack)
  void operator()(int64_t row0, int rows, int64_t k0, int64_t kc, int width, float* dst) const {
    // kc <= gemm::kKC and rows <= NR (<= 32): one dequantized [rows, kc] tile on the stack
    alignas(64) float tmp[32 * gemm::kKC];
    const int64_t kk = kc & ~int64_t(1), ld = gemm::kKC;
#if FASTKERN_X86
    if (fused && isa >= Isa::Avx2 && p->g % 8 == 0 && k0 % 8 == 0 && kc % 8 == 0 && width % 8 == 0 && width <= 32) {
      w4_pack_sliver_avx2(*p, row0, rows, k0, kc, width, dst);
      return;
    }
    if (isa >= Isa::Avx2) {
      w4_dequant_avx2(*p, row0, rows, k0, kk, tmp, ld);
      if (kk < kc) dequant_last(row0, rows, k0 + kk, tmp + kk, ld);
      gemm::pack_rows_avx2(static_cast<const float*>(tmp), ld, rows, kc, width, dst);
      return;
    }
#endif
    w4_dequant_generic(*p, row0, rows, k0, kk, tmp, ld);
    if (kk < kc) dequant_last(row0, rows, k0 + kk, tmp + kk, ld);
    gemm::StridedRows<float>{tmp, ld, 1, Isa::Generic}(0, rows, 0, kc, width, dst);
  }
  // the nibbles of rows [row0, row0 + rows), k in [k0, k0 + kc) (skinny_gemm)
  void prefetch(int64_t row0, int rows, int64_t k0, int64_t kc) const {
    gemm::prefetch_rows(p->w + row0 * p->ldw, p->ldw, rows, k0 / 2, (kc + 1) / 2);
  }
  // kc is even except at K's end when K is odd: never (K = 2 * bytes per row); kept for safety
  void dequant_last(int64_t row0, int rows, int64_t k, float* d, int64_t ld) const {
    for (int r = 0; r < rows; ++r) {
      const int64_t n = row0 + r, gi = k / p->g;
      const uint8_t b = p->w[n * p->ldw + k / 2];
      const int q = (k & 1) ? b >> 4 : b & 15;
      d[r * ld] = (float(q) - float(p->z[n * p->G + gi])) * p->s[n * p->G + gi];
    }
  }
};

// Y = X W^T, plus bias (fp32 [N] or null) where it returns true (the blocked GEMM adds it).
bool w4_blocked_gemm(const W4& p, int64_t N, int64_t K, const float* X, int64_t ldx, int64_t M, float* Y,
                     const float* bias) {
  const Isa isa = active_isa();
  gemm::StridedRows<float> pa{X, ldx, 1, isa};
  const char* e = std::getenv("FASTKERN_W4A16_FUSED_PACK");
  W4Packer pb{&p, isa, !(e && e[0] == '0')};
  if (M <= gemm::skinny_max_m()) {
    gemm::skinny_gemm(M, N, K, gemm::micro_kernel(isa), pa, pb, Y, N);
    return false;
  }
  gemm::blocked_gemm(M, N, K, gemm::micro_kernel(isa), pa, pb, Y, N, bias);
  return true;
}

// ------------------------------------------------------------------ GEMV: int8 limbs x nibbles
//
// Small M streams the canonical weight once (no repacked copy): a 32-byte
// (AVX2) or 64-byte (AVX-512) load holds 64 / 128 nibbles; one AND gives the
// even-k weights, a shift and an AND the odd-k ones, as unsigned bytes 0..15.
// The activations are quantized on the fly, per group, to L signed int8
// "limbs": x ~ s (a1 + a2 / 128 + a3 / 128^2), s = absmax / 127, each limb the
// rounded remainder of the previous one (|a2|, |a3| <= 64). Three limbs resolve
// 127 * 128^2 ~ 2^21 steps of the group's absmax (an error ~1e-7 of it), so fp32
// activations keep the 1e-5 fp32 contract with a wide margin; fp16/bf16 activations
// (1e-2 contract) take two. Base 128 lets the limbs' products combine exactly in one
// int32 by shifts (Horner), see "Per group and row" below.
// Products are u8 x s8 byte dot products: vpdpbusd (AVX-512 VNNI), or
// vpmaddubsw + vpmaddwd on AVX2 (|pair| <= 2 * 15 * 127, no int16 saturation).
// Per group and limb the int32 sum of q * a is exact; the zero point folds out
// as z * sum(x) (the sum of the reconstructed activations, computed at
// quantization), so the inner loop never touches z.
//
// Activation layout per row: for each group, for each chunk of CW weights
// (CW = 64 AVX2, 128 AVX-512), L limbs of CW bytes [CW/2 even k | CW/2 odd k],
// zero past the group's end: weight bytes read past a group's end (another
// group's, or a masked / copied tail) meet zero activations and add nothing.

constexpr float kLimb = 128.f;
// The paths that sum x against the integers q - z (or q) before the scales (limbs, bf16 GEMV
// and GEMM) take |x| up to this; NaN, inf and anything larger go to the fp32 paths, which
// dequantize the weight as the reference does. 15 |x| summed over any K stays finite in fp32
// here, while x = 3e38 against a weight scale of 0.3 overflowed those sums where the
// reference's x * ((q - z) * s) did not (inf, and NaN from the zero point's share).
constexpr float kW4MaxX = 1e30f;
// And from below, for the limbs: a group's finest limb weight |x|max / 127 / 128^(L - 1), times
// the weight scale, must stay a normal fp32 number, or the products lose bits (and under
// |x|max = 3.7e-37, 127 / |x|max overflows: x ~ 1e-37 gave outputs 100x off). A group whose
// largest |x| is not zero but under kW4MinX goes to the fp32 paths too. Over it each group's
// integer sum D times that limb weight is a normal fp32 number (>= 4.8e-27 for D != 0), and the
// kernels multiply by the weight scale after that product, never by (limb weight x scale),
// which left the normal range wherever |x|max s < 2.5e-32 (x ~ 1e-10 against scales of 1e-28:
// 0.3 relative error). The limbs' products are then as normal as the reference's own.
constexpr float kW4MinX = 1e-20f;
inline bool limbs_hold(float amax) { return amax == 0.f || amax >= kW4MinX; }
// Software prefetch distance along each weight row, in bytes. NR rows are read as
// NR interleaved streams that cross a 4 KiB page every few dozen lines; the
// hardware prefetchers stop at page ends and one core then reads DRAM at a third
// of its bandwidth (measured: 6 vs 15 GB/s on one thread at 4096x14336).
// Software prefetches along the weight rows. The GEMV reads each thread's rows one
// after another (runs of one K block each); the hardware prefetchers alone lose time
// at every run and 4 KiB page start. Far prefetch: into L2, the same bytes enough rows
// ahead to be ~kPrefetchL2 bytes ahead in the thread's stream (more lines in flight
// than the L1 miss buffers allow). Near prefetch: into L1, kPrefetch bytes ahead
// within the run. Measured (one thread, 4096x4096 / 4096x14336, weights beyond L3):
// 4 KiB ahead beats 2 KiB by 5-25%, 8 KiB ties; the near distance matters little.
constexpr int64_t kPrefetch = 512;
constexpr int64_t kPrefetchL2 = 4096;

struct Limbs {
  const int8_t* a;   // [M, lda]
  int64_t lda;
  const float* sx;   // [M, G, 4] per group: the limb weights s, s / 128, s / 128^2 (s = absmax / 127), 0
  const float* sum;  // [M, G] sum of the group's reconstructed activations
  int64_t nc;        // chunks per group
};

inline void set_limb_weights(float s, float* sx) {
  sx[0] = s;
  sx[1] = s / kLimb;
  sx[2] = s / (kLimb * kLimb);
  sx[3] = 0.f;
}

// One group of one row: limbs into blk (nc * L * CW bytes), its scale and the sum of its
// reconstructed activations. Returns false if the group holds NaN, inf or |x| > kW4MaxX, or
// its largest |x| is under kW4MinX but not zero.
//
// tok_s >= 0 (linear_w4a8, L = 1): the row's per-token scale s = absmax / 127 (the row checked
// by w4a8_token_scales) instead of the group's, and the one limb round_half_even(x / s)
// clamped to +-127: the bytes and scale of fastkern.formats.quantize_per_token.
bool w4_limbs_group_generic(const float* x, int64_t g, int64_t CW, int L, int8_t* blk, float* sx, float* sum,
                            float tok_s = -1.f) {
  const int64_t nc = (g + CW - 1) / CW;
  if (tok_s >= 0.f) {
    const float safe = tok_s > 0.f ? tok_s : 1.f;
    std::memset(blk, 0, nc * CW);
    int64_t isum = 0;
    for (int64_t k = 0; k < g; ++k) {
      const int64_t r = k % CW;
      const float a = std::min(127.f, std::max(-127.f, std::nearbyint(x[k] / safe)));
      blk[(k / CW) * CW + ((r & 1) ? CW / 2 + r / 2 : r / 2)] = int8_t(a);
      isum += int64_t(a);
    }
    set_limb_weights(tok_s, sx);
    *sum = float(double(tok_s) * double(isum));
    return true;
  }
  float amax = 0.f;
  for (int64_t k = 0; k < g; ++k) {
    const float v = std::fabs(x[k]);
    if (!(v <= kW4MaxX)) return false;
    amax = std::max(amax, v);
  }
  if (!limbs_hold(amax)) return false;
  const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  std::memset(blk, 0, nc * L * CW);
  int64_t isum[3] = {0, 0, 0};
  for (int64_t k = 0; k < g; ++k) {
    const int64_t r = k % CW;
    int8_t* d = blk + (k / CW) * L * CW + ((r & 1) ? CW / 2 + r / 2 : r / 2);
    // |t| <= 127 (+ rounding) and every remainder is within +-0.5, so each limb fits +-127
    float t = x[k] * inv;
    for (int l = 0; l < L; ++l) {
      const float a = std::nearbyint(t);
      d[l * CW] = int8_t(a);
      isum[l] += int64_t(a);
      t = (t - a) * kLimb;
    }
  }
  set_limb_weights(s, sx);
  *sum = float(double(s) * (double(isum[0]) + double(isum[1]) / kLimb + double(isum[2]) / (double(kLimb) * kLimb)));
  return true;
}

#if FASTKERN_X86
// The same limbs, 32 activations per step (g a multiple of 32): even and odd k are
// split in fp32 (shuffle_ps), each limb is rounded in 8-lane vectors and packed to
// 16 even-k then 16 odd-k bytes. Bit-identical to the generic version (same fp32
// operations, same round-to-nearest-even).
//
// r0 >= 0 (pair layout, g = 32): the group is the half r0 / 32 of a 64-weight chunk shared
// with its neighbour group, which writes the other half (no zeroing).
// tok_s >= 0: linear_w4a8's per-token limb (L = 1), as in w4_limbs_group_generic.
FASTKERN_AVX2 bool w4_limbs_group_avx2(const float* x, int64_t g, int64_t CW, int L, int8_t* blk, float* sx,
                                       float* sum, int64_t r0 = -1, float tok_s = -1.f) {
  const int64_t nc = (g + CW - 1) / CW;
  const bool tok = tok_s >= 0.f;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  const __m256 big = _mm256_set1_ps(kW4MaxX);
  for (int64_t k = 0; k < g; k += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + k), absmask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, big, _CMP_NLE_UQ));  // NaN, inf or beyond kW4MaxX
    vmax = _mm256_max_ps(vmax, v);
  }
  if (_mm256_movemask_ps(bad)) return false;
  const float amax = hmax8_avx2(vmax);
  if (!tok && !limbs_hold(amax)) return false;
  const float s = tok ? tok_s : amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  if (g % CW && r0 < 0) std::memset(blk, 0, nc * L * CW);
  const int64_t ro = r0 < 0 ? 0 : r0;
  const __m256 vinv = _mm256_set1_ps(inv), vl = _mm256_set1_ps(kLimb);
  const __m256 vsafe = _mm256_set1_ps(tok_s > 0.f ? tok_s : 1.f);
  const __m256 lo127 = _mm256_set1_ps(-127.f), hi127 = _mm256_set1_ps(127.f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i isum[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t k = 0; k < g; k += 32) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    const __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
    // [x0 x2 x8 x10 | x4 x6 x12 x14] -> permute 64-bit lanes (0,2,1,3) -> evens in order
    __m256 t[4];
    t[0] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x0, x1, 0x88)), 0xD8));
    t[1] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x2, x3, 0x88)), 0xD8));
    t[2] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x0, x1, 0xDD)), 0xD8));
    t[3] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x2, x3, 0xDD)), 0xD8));
    for (int i = 0; i < 4; ++i) t[i] = tok ? _mm256_div_ps(t[i], vsafe) : _mm256_mul_ps(t[i], vinv);
    const int64_t r = (k + ro) % CW;
    int8_t* d = blk + ((k + ro) / CW) * L * CW + r / 2;
    for (int l = 0; l < L; ++l) {
      __m256i q[4];
      for (int i = 0; i < 4; ++i) {
        __m256 a = _mm256_round_ps(t[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (tok) a = _mm256_min_ps(hi127, _mm256_max_ps(lo127, a));
        q[i] = _mm256_cvtps_epi32(a);
        isum[l] = _mm256_add_epi32(isum[l], q[i]);
        t[i] = _mm256_mul_ps(_mm256_sub_ps(t[i], a), vl);
      }
      // packs: [e0_0..3 e1_0..3 o0_0..3 o1_0..3 | e0_4..7 e1_4..7 o0_4..7 o1_4..7] -> dwords (0,4,1,5,2,6,3,7)
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      const __m256i o = _mm256_permutevar8x32_epi32(b, perm);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + l * CW), _mm256_castsi256_si128(o));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + l * CW + CW / 2), _mm256_extracti128_si256(o, 1));
    }
  }
  double tot = 0.0, unit = 1.0;
  for (int l = 0; l < L; ++l) {
    tot += double(hsum8_i32_avx2(isum[l])) * unit;
    unit /= kLimb;
  }
  set_limb_weights(s, sx);
  *sum = float(double(s) * tot);
  return true;
}
#endif

// f(i, row m, group gi) for every group of every row (i = m * G + gi), in parallel: one
// task per (row, group), threads only above a size where they pay for their start.
// Returns false if any call did (x holds NaN, inf or |x| > kW4MaxX there, or, for the limbs, a
// group whose largest |x| is under kW4MinX but not zero).
template <class F>
bool w4_for_each_group(int64_t M, int64_t G, int64_t g, const F& f) {
  std::atomic<bool> ok{true};
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / g);
  at::parallel_for(0, M * G, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (!f(i, i / G, i % G)) ok = false;
  });
  return ok;
}

// Limbs of every group of every row (layout above). Returns false if x holds NaN, inf or
// |x| > kW4MaxX, or a group too small for the limbs (kW4MinX; the caller then takes the fp32
// panel path).
// pair (AVX2, g = 32, K % 64 == 0): groups 2j and 2j + 1 share the 64-weight chunk j.
// tok (linear_w4a8, L = 1): the rows' per-token scales (w4a8_token_scales).
bool w4_prepare_limbs(const float* X, int64_t ldx, int64_t M, int64_t K, int64_t g, int64_t CW, int L, int8_t* A,
                      int64_t lda, float* SX, float* SUM, bool avx2, bool pair = false, const float* tok = nullptr) {
  const int64_t nc = (g + CW - 1) / CW;
  return w4_for_each_group(M, K / g, g, [&](int64_t i, int64_t m, int64_t gi) {
    const float* x = X + m * ldx + gi * g;
    const float ts = tok ? tok[m] : -1.f;
#if FASTKERN_X86
    if (pair)
      return w4_limbs_group_avx2(x, g, CW, L, A + m * lda + (gi / 2) * L * CW, SX + 4 * i, SUM + i, 32 * (gi % 2), ts);
#endif
    int8_t* blk = A + m * lda + gi * nc * L * CW;
#if FASTKERN_X86
    if (avx2 && g % 32 == 0) return w4_limbs_group_avx2(x, g, CW, L, blk, SX + 4 * i, SUM + i, -1, ts);
#else
    (void)avx2;
#endif
    return w4_limbs_group_generic(x, g, CW, L, blk, SX + 4 * i, SUM + i, ts);
  });
}

// linear_w4a8's per-token scales, as fastkern.formats.quantize_per_token sets them: S[m] =
// absmax / 127 of row m of X (ldx floats, zero past K; the fp32 division), NaN for a row holding
// NaN or inf. Returns whether every row is within the limb kernels' bounds: finite, no magnitude
// beyond kW4MaxX, and a largest |x| of zero or at least kW4MinX (see kW4MinX); where not, the
// caller takes the fp32 paths (w4a8_quantize_rows_f32, with these scales).
bool w4a8_token_scales(const float* X, int64_t ldx, int64_t M, float* S) {
  std::atomic<bool> ok{true};
#if FASTKERN_X86
  const bool avx2 = use_avx2() && ldx % 8 == 0;
#endif
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(ldx, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* x = X + m * ldx;
      float amax = 0.f;
      uint32_t big = 0, nonfinite = 0;
#if FASTKERN_X86
      if (avx2) {  // the scalar scan's compare-and-or chains took longer than the GEMM at M = 8 on 48 x 4096
        nonfinite = !row_absmax_avx2(x, ldx, &amax);
        big = nonfinite || !(amax <= kW4MaxX);
      } else
#endif
        for (int64_t k = 0; k < ldx; ++k) {
          const float v = std::fabs(x[k]);
          big |= uint32_t(!(v <= kW4MaxX));
          nonfinite |= uint32_t(!(v <= std::numeric_limits<float>::max()));
          amax = v > amax ? v : amax;
        }
      if (big || !limbs_hold(amax)) ok = false;
      S[m] = nonfinite ? std::numeric_limits<float>::quiet_NaN() : amax / 127.f;
    }
  });
  return ok;
}

#if FASTKERN_X86
#define FASTKERN_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

// acc += u8(a) . s8(b) per 4 bytes, in place: GCC keeps arrays of _mm512_dpbusd_epi32
// accumulators in registers only by copying each one every iteration (tens of extra
// moves per 16 products); the asm form pins each accumulator to one register.
FASTKERN_AVX512VNNI inline __m512i dpbusd_inplace(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// Per group and row, the limbs' dot products combine exactly in int32 by Horner's rule,
// D = (d_0 * 128 + d_1) * 128 + d_2 (the accumulator is shifted left by 7 bits before
// each further limb), so one accumulator per (x row, weight row) is converted to float
// per group, scaled by s_x / 128^(L-1) (shared by the tile's weight rows) and then by the
// weight scale, in that order (kW4MinX). |D| grows by at most 8 * 15 * (127 * 128^2 + 64 * 128 + 64) < 2^28 per chunk
// and lane, so a group is taken in spans of at most kSpan chunks (an int32 never
// overflows). The zero point's share, sum_g s_w z sum(x_g), is one vectorized dot
// product over the groups per output (zero_corr_*), outside the streaming loop.
constexpr int64_t kSpan = 8;

// sum_g ws[g] * z[g] * sm[g] in a fixed order (8 lanes, then hsum8_avx2)
FASTKERN_AVX2 inline float zero_corr_avx2(const float* ws, const uint8_t* z, const float* sm, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    int64_t zz;
    std::memcpy(&zz, z + g, 8);
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(zz)));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(ws + g), zf), _mm256_loadu_ps(sm + g), acc);
  }
  if (g < G) {
    alignas(32) float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = g; i < G; ++i) {
      a[i - g] = ws[i] * float(z[i]);
      b[i - g] = sm[i];
    }
    acc = _mm256_fmadd_ps(_mm256_load_ps(a), _mm256_load_ps(b), acc);
  }
  return hsum8_avx2(acc);
}

// The part of K a tile covers: groups [g0, g1) (the GEMV walks K in blocks so that the
// activations' limbs of a block stay in L1 while the weight rows stream past them).
// `first`: the block that stores y = sum - zero-point share; later blocks add to y.
struct KRange {
  int64_t g0, g1;
  bool first;
  const uint8_t* wend;  // end of the weight tensor
  int64_t pf_rows;      // the far (L2) prefetch reads the same bytes pf_rows rows ahead
};

// Prefetches for the weight bytes at wp (row offset `off` within the block's bytes
// [0, run)): into L2 the same bytes pf_rows rows ahead, which is where the stream of
// this thread (rows one after another, `run` bytes of each) will be pf_rows * run
// bytes later; into L1 the bytes kPrefetch ahead in this row while they are still in
// the block (beyond it they would be fetched long before their use and evicted).
inline void w4_prefetch(const uint8_t* wp, int64_t off, int64_t run, int64_t far) {
  _mm_prefetch(reinterpret_cast<const char*>(wp + far), _MM_HINT_T1);
  if (off + kPrefetch < run) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch), _MM_HINT_T0);
}

// MR activation rows x NR weight rows starting at (m0, n).
template <int MR, int NR, int L>
FASTKERN_AVX2 void w4l_tile_avx2(const W4& p, const Limbs& q, const KRange& kr, int64_t n, int64_t m0, float* Y,
                                 int64_t ldy) {
  constexpr int64_t CW = 64;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t hb = p.g / 2, run = (kr.g1 - kr.g0) * hb, far = kr.pf_rows * p.ldw;
  const uint8_t* wend = kr.wend;
  __m256 tot[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) tot[i][j] = _mm256_setzero_ps();
  alignas(32) uint8_t tail[32];
  auto load_w = [&](const uint8_t* wp) FASTKERN_AVX2 {
    if (wp + 32 <= wend) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
    std::memset(tail, 0, 32);  // the tensor's last bytes: never read past its end
    std::memcpy(tail, wp, wend - wp);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  };
  // one accumulator per limb (the nibbles of a chunk unpacked once for all limbs), the
  // limbs combined by Horner's rule in int32 at the end of each span
  for (int64_t gi = kr.g0; gi < kr.g1; ++gi) {
    const int8_t* ag = q.a + m0 * q.lda + gi * q.nc * L * CW;
    for (int64_t c0 = 0; c0 < q.nc; c0 += kSpan) {
      const int64_t ce = std::min(q.nc, c0 + kSpan);
      __m256i acc[MR][NR][L];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
          for (int l = 0; l < L; ++l) acc[i][j][l] = _mm256_setzero_si256();
      for (int64_t c = c0; c < ce; ++c) {
        __m256i lo[NR], hi[NR];
        for (int j = 0; j < NR; ++j) {
          const uint8_t* wp = p.w + (n + j) * p.ldw + gi * hb + c * 32;
          w4_prefetch(wp, (gi - kr.g0) * hb + c * 32, run, far);
          const __m256i v = load_w(wp);
          lo[j] = _mm256_and_si256(v, m4);
          hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        for (int i = 0; i < MR; ++i)
          for (int l = 0; l < L; ++l) {
            const int8_t* al = ag + i * q.lda + (c * L + l) * CW;
            const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(al));
            const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(al + 32));
            for (int j = 0; j < NR; ++j) {
              __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xe), _mm256_maddubs_epi16(hi[j], xo));
              acc[i][j][l] = _mm256_add_epi32(acc[i][j][l], _mm256_madd_epi16(t, ones));
            }
          }
      }
      for (int i = 0; i < MR; ++i) {
        const __m256 cx = _mm256_broadcast_ss(q.sx + ((m0 + i) * p.G + gi) * 4 + (L - 1));
        for (int j = 0; j < NR; ++j) {
          __m256i d = acc[i][j][0];
          for (int l = 1; l < L; ++l) d = _mm256_add_epi32(_mm256_slli_epi32(d, 7), acc[i][j][l]);
          tot[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), cx),
                                      _mm256_broadcast_ss(p.s + (n + j) * p.G + gi), tot[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float& y = Y[(m0 + i) * ldy + n + j];
      const float s = hsum8_avx2(tot[i][j]);
      y = kr.first ? s - zero_corr_avx2(p.s + (n + j) * p.G, p.z + (n + j) * p.G, q.sum + (m0 + i) * p.G, p.G)
                   : y + s;
    }
}

// AVX2 for groups of whole 64-weight chunks (g % 64 == 0, every common group size):
// the byte products of a span of up to kSpan16 chunks are summed in int16 lanes, one
// accumulator per limb, widened once per span. A vpmaddubsw lane is at most
// 2 * 15 * 127 = 3810 for the first limb (|a1| <= 127) and 2 * 15 * 64 = 1920 for the
// others (|a| <= 64); a span adds 2 * kSpan16 = 8 of them: |sum| <= 30480 < 2^15.
// The widening vpmaddwd multiplies limb l by 128^(L-1-l) (16384, 128, 1: Horner's rule
// and the widening in one instruction; |pair| <= 2 * 30480 * 16384 < 2^30, and the
// smaller limbs add < 2^23), so a span costs per output L vpmaddwd and L - 1 adds,
// against 2L vpmaddubsw + 2L adds per chunk. The int32 span sums are exact (the same
// integers as w4l_tile_avx2's; that one converts spans of up to 8 chunks to fp32, this
// one spans of up to 4, so outputs for g >= 512 may differ in the last bits).
//
// Measured (4096x4096 M = 1 fp32, 2 threads, weights beyond L3, AVX2 forced): 0.35 ms
// with w4l_tile_avx2, 0.196 ms here; bf16 0.30 -> 0.17 ms. Two changes: the int16
// sums (a g = 128 group costs ~37 vector instructions instead of ~70, which is what
// the 4 vector ALUs of a core bound: 10 cycles per 64 weight bytes), and one call per
// thread and K block for all its rows (a call per row cost ~30% at M = 1).
constexpr int64_t kSpan16 = 4;

// Weight row n's outputs for MR rows of x after K block kr: the block's sum less the zero
// points of this block's groups only (their scales are still in cache; the whole row's,
// taken in the first block, would be read again from memory: at g = 32, 4096x14336,
// 22 -> 36 GB/s); the first block stores, the others add.
template <int MR>
FASTKERN_AVX2 inline void w4l_store_block_avx2(const W4& p, const Limbs& q, const KRange& kr, int64_t n, int64_t m0,
                                               const __m256* tot, float* Y, int64_t ldy) {
  const int64_t G = p.G;
  for (int i = 0; i < MR; ++i) {
    float& y = Y[(m0 + i) * ldy + n];
    const float s = hsum8_avx2(tot[i]);
    const float zc = zero_corr_avx2(p.s + n * G + kr.g0, p.z + n * G + kr.g0, q.sum + (m0 + i) * G + kr.g0,
                                    kr.g1 - kr.g0);
    y = kr.first ? s - zc : y + (s - zc);
  }
}

// MR rows of x (from m0) against weight rows [n0, n1), R weight rows at a time (R streams
// per thread; the n % R rows at the end take R = 1); CS chunks per span (CS divides the
// group's chunk count nc, CS <= kSpan16). The far prefetch only (into L2, pf_rows steps
// ahead): the hardware prefetchers bring the lines of the current run into L1 (measured:
// the near prefetch costs 3-7% at 4096x4096). Each row's sums are the same integers and
// fp32 operations for any R.
// R = 2 at M = 1 where the limbs of a K block take kW4Rows2Avx2Bytes or more: each limb
// vector is then loaded once for two weight rows, where one row at a time reloads all of
// them per row and, past L1, from L2 (see w4l_rows4_avx512). This GEMV is bound by the
// vector ALUs (vpmaddubsw per row and limb either way), so the loads saved pay only where
// the limbs miss L1. Measured against R = 1 (2 threads, AVX2 forced, g = 128, weights
// beyond L3, alternating in one process, medians of 8 rounds): fp32 4096 x 14336 (43 KiB)
// 0.92-0.93x the time, 2048 x 28672 0.90-0.91x; bf16 2048 x 28672 (56 KiB) 0.90x; but fp32
// 4096 x 11008 (33 KiB) 1.05-1.10x, bf16 4096 x 14336 (28 KiB) 1.00x, 4096 x 4096 1.03x.
// Those were on a 48 KiB L1d (Xeon). On 2 Zen 4 cores (32 KiB L1d; four runs of 5-13 rounds)
// R = 2 cost instead: fp32 4096 x 14336 1.03-1.08x the time of R = 1, 2048 x 28672
// 1.01-1.13x, bf16 2048 x 28672 1.03x. That R = 2 loaded each limb vector twice, though
// (GCC folded the shared load into both rows' vpmaddubsw and spilled the reassociated
// sums); with one load per limb vector and the in-place adds below, fp32 (three limbs) on
// the same Zen 4 cores: 4096 x 11008 (33 KiB) and 4096 x 14336 / 2048 x 28672 0.95x the
// time of R = 1 (9 rounds), 2048 x 14336 with the weight in L3 (one thread) 0.87x;
// 4096 x 4096 (12 KiB) 1.05x; bf16 (two limbs) 0.95-1.05x, no gain. So R = 2 where the L1d
// holds 48 KiB or more at kW4Rows2Avx2Bytes, and on smaller L1ds for three limbs from 3/4
// of the L1d (FASTKERN_W4A16_MULTIROW_KB, when set, decides for any L1d and L).
constexpr int64_t kW4Rows2Avx2Bytes = 40 << 10;
inline int64_t w4_multirow_bytes(int64_t bound) {
  return env_knob("FASTKERN_W4A16_MULTIROW_KB", bound >> 10) << 10;
}
inline int64_t w4_rows2_avx2_bytes(int limbs) {
  const int64_t l1d = features().l1d_bytes();
  return w4_multirow_bytes(!small_l1d() ? kW4Rows2Avx2Bytes
                           : limbs == 3 && l1d > 0   ? l1d * 3 / 4
                                                     : int64_t(1) << 50);
}
// acc += t (int16 lanes) in place: written as intrinsics, GCC reassociates a chunk's adds
// into a tree that keeps every product live at once and spills them (0x1c0(%rsp)...) and
// folds the shared x loads into each vpmaddubsw; the asm form keeps one chain per accumulator.
FASTKERN_AVX2 inline __m256i add16_inplace(__m256i acc, __m256i t) {
  asm("vpaddw %1, %0, %0" : "+x"(acc) : "x"(t));
  return acc;
}

template <int MR, int L, int CS, int R = 1>
FASTKERN_AVX2 void w4l_rows16_avx2(const W4& p, const Limbs& q, const KRange& kr, int64_t n0, int64_t n1, int64_t m0,
                                   float* Y, int64_t ldy) {
  constexpr int64_t CW = 64;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int64_t hb = p.g / 2, nc = q.nc, spg = nc / CS, ldw = p.ldw, G = p.G, lda = q.lda;
  const int64_t far = R * kr.pf_rows * ldw;
  const int8_t* x0 = q.a + m0 * lda + kr.g0 * nc * L * CW;
  const float* sx0 = q.sx + (m0 * G + kr.g0) * 4 + (L - 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m256 tot[R][MR];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MR; ++i) tot[r][i] = _mm256_setzero_ps();
    const uint8_t* wp = p.w + n * ldw + kr.g0 * hb;
    const int8_t* xp = x0;
    const float* sw = p.s + n * G + kr.g0;
    const float* sx = sx0;
    for (int64_t gi = kr.g0; gi < kr.g1; ++gi, ++sw, sx += 4) {
      for (int64_t sp = 0; sp < spg; ++sp, wp += CS * 32, xp += CS * L * CW) {
        __m256i acc[R][MR][L];
        for (int c = 0; c < CS; ++c) {
          __m256i lo[R], hi[R];
          for (int r = 0; r < R; ++r) {
            // one prefetch per 64 bytes along the row
            if (c % 2 == 0)
              _mm_prefetch(reinterpret_cast<const char*>(wp + r * ldw + c * 32 + far), _MM_HINT_T1);
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + r * ldw + c * 32));
            lo[r] = _mm256_and_si256(v, m4);
            hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          }
          for (int i = 0; i < MR; ++i)
            for (int l = 0; l < L; ++l) {
              const int8_t* al = xp + i * lda + (c * L + l) * CW;
              __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(al));
              if (R > 1) asm("" : "+x"(xe));  // one load for the R rows (not one folded into each product)
              for (int r = 0; r < R; ++r) {
                const __m256i te = _mm256_maddubs_epi16(lo[r], xe);
                acc[r][i][l] = c == 0 ? te : add16_inplace(acc[r][i][l], te);
              }
              __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(al + 32));
              if (R > 1) asm("" : "+x"(xo));
              for (int r = 0; r < R; ++r) acc[r][i][l] = add16_inplace(acc[r][i][l], _mm256_maddubs_epi16(hi[r], xo));
            }
        }
        for (int r = 0; r < R; ++r) {
          const __m256 ws = _mm256_broadcast_ss(sw + r * G);
          for (int i = 0; i < MR; ++i) {
            __m256i d = _mm256_madd_epi16(acc[r][i][0], _mm256_set1_epi16(int16_t(1 << (7 * (L - 1)))));
            for (int l = 1; l < L; ++l)
              d = _mm256_add_epi32(d, _mm256_madd_epi16(acc[r][i][l], _mm256_set1_epi16(int16_t(1 << (7 * (L - 1 - l))))));
            tot[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(sx + i * G * 4)), ws, tot[r][i]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) w4l_store_block_avx2<MR>(p, q, kr, n + r, m0, tot[r], Y, ldy);
  }
  if (R > 1 && n < n1) w4l_rows16_avx2<MR, L, CS, 1>(p, q, kr, n, n1, m0, Y, ldy);
}

// chunks per span for nc chunks per group
inline int w4_span16(int64_t nc) {
  return nc <= kSpan16 ? int(nc) : nc % 4 == 0 ? 4 : nc % 3 == 0 ? 3 : nc % 2 == 0 ? 2 : 1;
}

using RowsFn = void (*)(const W4&, const Limbs&, const KRange&, int64_t, int64_t, int64_t, float*, int64_t);

template <int L, int R, int MR = 1>
RowsFn w4_rows16_fn(int cs) {
  switch (cs) {
    case 1: return &w4l_rows16_avx2<MR, L, 1, R>;
    case 2: return &w4l_rows16_avx2<MR, L, 2, R>;
    case 3: return &w4l_rows16_avx2<MR, L, 3, R>;
    default: return &w4l_rows16_avx2<MR, L, 4, R>;
  }
}

// g = 32 (K % 64 == 0): groups in pairs, one 64-weight chunk (32 bytes) per pair: the low
// 128-bit lane of every vector holds group 2j, the high lane group 2j + 1 (vpmaddubsw and
// vpmaddwd sum within a lane), so each lane takes its own group's scale. The limbs are in
// the pair layout (w4_prepare_limbs, pair). kr counts groups (g0, g1 even).
template <int MR, int L>
FASTKERN_AVX2 void w4l_rows16p_avx2(const W4& p, const Limbs& q, const KRange& kr, int64_t n0, int64_t n1, int64_t m0,
                                    float* Y, int64_t ldy) {
  constexpr int64_t CW = 64;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int64_t ldw = p.ldw, G = p.G, lda = q.lda;
  const int64_t far = kr.pf_rows * ldw;
  const int8_t* x0 = q.a + m0 * lda + (kr.g0 / 2) * L * CW;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 tot[MR];
    for (int i = 0; i < MR; ++i) tot[i] = _mm256_setzero_ps();
    const uint8_t* wp = p.w + n * ldw + kr.g0 * 16;
    const int8_t* xp = x0;
    for (int64_t gi = kr.g0; gi < kr.g1; gi += 2, wp += 32, xp += L * CW) {
      if (!(gi & 2)) _mm_prefetch(reinterpret_cast<const char*>(wp + far), _MM_HINT_T1);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      // the weight scales of the pair: lanes 0..3 group gi, 4..7 group gi + 1
      double sw2;
      std::memcpy(&sw2, p.s + n * G + gi, 8);
      const __m256 ws = _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_set1_pd(sw2)), lanes);
      for (int i = 0; i < MR; ++i) {
        __m256i d = _mm256_setzero_si256();
        for (int l = 0; l < L; ++l) {
          const int8_t* al = xp + i * lda + l * CW;
          const __m256i te = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(al)));
          const __m256i to = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(al + 32)));
          const __m256i t = _mm256_madd_epi16(_mm256_add_epi16(te, to), _mm256_set1_epi16(int16_t(1 << (7 * (L - 1 - l)))));
          d = l == 0 ? t : _mm256_add_epi32(d, t);
        }
        const float* sx = q.sx + ((m0 + i) * G + gi) * 4 + (L - 1);
        const __m256 xs = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(sx)), _mm_broadcast_ss(sx + 4), 1);
        tot[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), xs), ws, tot[i]);
      }
    }
    w4l_store_block_avx2<MR>(p, q, kr, n, m0, tot, Y, ldy);
  }
}

FASTKERN_AVX512VNNI inline float hsum16_avx512(__m512 v) {
  // fixed order: halves, then the AVX2 reduction
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// sum_g ws[g] * z[g] * sm[g] in a fixed order (16 lanes, then hsum16_avx512)
FASTKERN_AVX512VNNI inline float zero_corr_avx512(const float* ws, const uint8_t* z, const float* sm, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 mk = G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g)) - 1);
    const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, z + g)));
    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, ws + g), zf), _mm512_maskz_loadu_ps(mk, sm + g), acc);
  }
  return hsum16_avx512(acc);
}

template <int MR, int NR>
FASTKERN_AVX512VNNI inline void w4l_store_avx512(const W4& p, const Limbs& q, const KRange& kr, int64_t n, int64_t m0,
                                                 float* Y, int64_t ldy, const __m512 (&tot)[MR][NR]) {
  float out[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = hsum16_avx512(tot[i][j]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float& y = Y[(m0 + i) * ldy + n + j];
      y = kr.first ? out[i][j] - zero_corr_avx512(p.s + (n + j) * p.G, p.z + (n + j) * p.G, q.sum + (m0 + i) * p.G, p.G)
                   : y + out[i][j];
    }
}

// g <= 128: one (possibly partial) chunk per group, its nibbles unpacked once and
// reused by every limb; the loop the M = 1 decode spends its time in. The even-k and
// odd-k products go to separate accumulators (S = 2) where registers allow: the Horner
// chain of an output is then 3 instead of 6 dependent vpdpbusd per group.
template <int MR, int NR, int L>
FASTKERN_AVX512VNNI void w4l_tile1_avx512(const W4& p, const Limbs& q, const KRange& kr, int64_t n, int64_t m0,
                                          float* Y, int64_t ldy) {
  constexpr int64_t CW = 128;
  constexpr int S = MR * NR * 2 <= 8 ? 2 : 1;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int64_t hb = p.g / 2, ldw = p.ldw, G = p.G, run = (kr.g1 - kr.g0) * hb, far = kr.pf_rows * ldw;
  // masked loads: no read past the group (or the tensor)
  const __mmask64 mk = hb >= 64 ? ~__mmask64(0) : (__mmask64(1) << hb) - 1;
  __m512 tot[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_setzero_ps();
  const uint8_t* wc = p.w + n * ldw + kr.g0 * hb;
  const int8_t* ag = q.a + m0 * q.lda + kr.g0 * L * CW;
  const float* sw = p.s + n * G + kr.g0;
  const float* cx = q.sx + (m0 * G + kr.g0) * 4 + (L - 1);
  for (int64_t off = 0; off < run; off += hb, wc += hb, ag += L * CW, sw += 1, cx += 4) {
    __m512i lo[NR], hi[NR];
    for (int j = 0; j < NR; ++j) {
      const uint8_t* wp = wc + j * ldw;
      w4_prefetch(wp, off, run, far);
      const __m512i v = _mm512_maskz_loadu_epi8(mk, wp);
      lo[j] = _mm512_and_si512(v, m4);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
    __m512i acc[MR][NR][S];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        for (int t = 0; t < S; ++t) acc[i][j][t] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int l = 0; l < L; ++l) {
      if (l > 0)
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < NR; ++j)
            for (int t = 0; t < S; ++t) acc[i][j][t] = _mm512_slli_epi32(acc[i][j][t], 7);
      for (int i = 0; i < MR; ++i) {
        const int8_t* al = ag + i * q.lda + l * CW;
        const __m512i xe = _mm512_loadu_si512(al);
        const __m512i xo = _mm512_loadu_si512(al + 64);
        for (int j = 0; j < NR; ++j) {
          acc[i][j][0] = dpbusd_inplace(acc[i][j][0], lo[j], xe);
          acc[i][j][S - 1] = dpbusd_inplace(acc[i][j][S - 1], hi[j], xo);
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 c = _mm512_set1_ps(cx[i * G * 4]);
      for (int j = 0; j < NR; ++j) {
        const __m512i a = S == 2 ? _mm512_add_epi32(acc[i][j][0], acc[i][j][S - 1]) : acc[i][j][0];
        tot[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), c), _mm512_set1_ps(sw[j * G]), tot[i][j]);
      }
    }
  }
  w4l_store_avx512<MR, NR>(p, q, kr, n, m0, Y, ldy, tot);
}

// Any g: groups of several chunks, in spans of at most kSpan chunks; the nibbles of a
// chunk are unpacked again for every limb (reloaded from L1).
template <int MR, int NR, int L>
FASTKERN_AVX512VNNI void w4l_tile_avx512(const W4& p, const Limbs& q, const KRange& kr, int64_t n, int64_t m0,
                                         float* Y, int64_t ldy) {
  constexpr int64_t CW = 128;
  if (p.g <= CW) return w4l_tile1_avx512<MR, NR, L>(p, q, kr, n, m0, Y, ldy);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int64_t hb = p.g / 2, run = (kr.g1 - kr.g0) * hb, far = kr.pf_rows * p.ldw;
  __m512 tot[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_setzero_ps();
  const uint8_t* wrow = p.w + n * p.ldw;
  for (int64_t gi = kr.g0; gi < kr.g1; ++gi) {
    const int8_t* ag = q.a + m0 * q.lda + gi * q.nc * L * CW;
    for (int64_t c0 = 0; c0 < q.nc; c0 += kSpan) {
      const int64_t ce = std::min(q.nc, c0 + kSpan);
      __m512i acc[MR][NR];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
      for (int l = 0; l < L; ++l) {
        if (l > 0)
          for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_slli_epi32(acc[i][j], 7);
        for (int64_t c = c0; c < ce; ++c) {
          const int64_t nb = std::min<int64_t>(64, hb - c * 64);
          const __mmask64 mk = nb == 64 ? ~__mmask64(0) : (__mmask64(1) << nb) - 1;
          __m512i lo[NR], hi[NR];
          for (int j = 0; j < NR; ++j) {
            const uint8_t* wp = wrow + j * p.ldw + gi * hb + c * 64;
            if (l == 0) w4_prefetch(wp, (gi - kr.g0) * hb + c * 64, run, far);
            const __m512i v = _mm512_maskz_loadu_epi8(mk, wp);
            lo[j] = _mm512_and_si512(v, m4);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
          }
          for (int i = 0; i < MR; ++i) {
            const int8_t* al = ag + i * q.lda + (c * L + l) * CW;
            const __m512i xe = _mm512_loadu_si512(al);
            const __m512i xo = _mm512_loadu_si512(al + 64);
            for (int j = 0; j < NR; ++j) {
              acc[i][j] = dpbusd_inplace(acc[i][j], lo[j], xe);
              acc[i][j] = dpbusd_inplace(acc[i][j], hi[j], xo);
            }
          }
        }
      }
      for (int i = 0; i < MR; ++i) {
        const __m512 cx = _mm512_set1_ps(q.sx[((m0 + i) * p.G + gi) * 4 + (L - 1)]);
        for (int j = 0; j < NR; ++j) {
          tot[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][j]), cx),
                                      _mm512_set1_ps(p.s[(n + j) * p.G + gi]), tot[i][j]);
        }
      }
    }
  }
  w4l_store_avx512<MR, NR>(p, q, kr, n, m0, Y, ldy, tot);
}

// M = 1, g <= 128 (one chunk per group): a thread's rows of a K block in one call, one
// weight row (one stream) at a time. Two groups per step with the limbs' dot products
// taken apart (limb l's even-k and odd-k products in one chain of two vpdpbusd, the limbs
// combined by Horner's rule after), and two fp32 totals: the independent chains keep the
// VNNI ports busy where w4l_tile1_avx512's one Horner chain per group (three dependent
// vpdpbusd and shifts, then the convert and the total's FMA) left them idle. The int32
// group sums are the same integers as w4l_tile1_avx512's; the fp32 totals add the even and
// the odd groups apart, so outputs may differ from it in the last bits. Only the far
// prefetch (into L2, pf_rows rows ahead), one per line; an L1 prefetch kPrefetch ahead as
// well measured 0.94-1.08x (noise). Measured against the per-row tiles (2 threads,
// weights beyond L3, paired rounds in one process, three runs; the Llama-7B shapes,
// g = 128): 0.93-1.22x, most rows 1.03-1.12x.
template <int L>
FASTKERN_AVX512VNNI inline __m512i w4l_group1_avx512(__m512i v, const int8_t* a) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  __m512i t[L];
  for (int l = 0; l < L; ++l) {
    t[l] = _mm512_setzero_si512();
    t[l] = dpbusd_inplace(t[l], lo, _mm512_loadu_si512(a + l * 128));
    t[l] = dpbusd_inplace(t[l], hi, _mm512_loadu_si512(a + l * 128 + 64));
  }
  __m512i d = t[0];
  for (int l = 1; l < L; ++l) d = _mm512_add_epi32(_mm512_slli_epi32(d, 7), t[l]);
  return d;
}

template <int L>
FASTKERN_AVX512VNNI void w4l_rows1_avx512(const W4& p, const Limbs& q, const KRange& kr, int64_t n0, int64_t n1,
                                          float* Y) {
  constexpr int64_t CW = 128;
  const int64_t hb = p.g / 2, ldw = p.ldw, G = p.G, ng = kr.g1 - kr.g0, far = kr.pf_rows * ldw;
  // masked loads: no read past the group (or the tensor)
  const __mmask64 mk = hb >= 64 ? ~__mmask64(0) : (__mmask64(1) << hb) - 1;
  const int8_t* x0 = q.a + kr.g0 * L * CW;
  const float* sx = q.sx + kr.g0 * 4 + (L - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wp = p.w + n * ldw + kr.g0 * hb;
    const float* sw = p.s + n * G + kr.g0;
    __m512 tot0 = _mm512_setzero_ps(), tot1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= ng; k += 2) {
      // the far prefetch for every line of the two groups' bytes
      _mm_prefetch(reinterpret_cast<const char*>(wp + k * hb + far), _MM_HINT_T1);
      if (hb > 32) _mm_prefetch(reinterpret_cast<const char*>(wp + (k + 2) * hb - 1 + far), _MM_HINT_T1);
      const __m512i d0 = w4l_group1_avx512<L>(_mm512_maskz_loadu_epi8(mk, wp + k * hb), x0 + k * L * CW);
      const __m512i d1 = w4l_group1_avx512<L>(_mm512_maskz_loadu_epi8(mk, wp + (k + 1) * hb), x0 + (k + 1) * L * CW);
      tot0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(sx[k * 4])), _mm512_set1_ps(sw[k]), tot0);
      tot1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(sx[(k + 1) * 4])),
                             _mm512_set1_ps(sw[k + 1]), tot1);
    }
    if (k < ng) {
      _mm_prefetch(reinterpret_cast<const char*>(wp + k * hb + far), _MM_HINT_T1);
      const __m512i d0 = w4l_group1_avx512<L>(_mm512_maskz_loadu_epi8(mk, wp + k * hb), x0 + k * L * CW);
      tot0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(sx[k * 4])), _mm512_set1_ps(sw[k]), tot0);
    }
    float& y = Y[n];
    const float s = hsum16_avx512(_mm512_add_ps(tot0, tot1));
    const float zc = zero_corr_avx512(sw, p.z + n * G + kr.g0, q.sum + kr.g0, ng);
    y = kr.first ? s - zc : y + (s - zc);
  }
}

// M = 1, g <= 128, where the limbs of a K block take kW4Rows4Bytes or more: four weight
// rows per step, each limb vector loaded once for the four. One row at a time
// (w4l_rows1_avx512) reloads all of the block's limbs for every weight row, and past
// ~16 KiB the limbs and the streaming weight lines no longer both stay in L1: the limbs
// then come from L2 on every row. Each row keeps one fp32 total (group after group), so a
// row's result does not depend on which rows share its step; the n % 4 rows at the end of
// a thread's range take w4l_rows1_avx512. Four streams of weight rows at once cost more
// than the saved loads while the limbs fit: fp32 K = 4096 / 5120 (12 / 15 KiB of limbs)
// 1.02-1.05x slower, hence the bound. Measured against w4l_rows1_avx512 (2 threads, g = 128,
// weights beyond L3, alternating in one process, medians of 8-10 rounds): fp32 N x K
// 4096 x 14336 0.80-0.84x the time, 2048 x 28672 0.73-0.77x, 4096 x 11008 0.89x, 4096 x 8192
// 0.89x, 4096 x 6144 0.96x; bf16 (two limbs) 4096 x 14336 0.93x, 2048 x 28672 0.84x,
// 4096 x 11008 0.90x, 4096 x 8192 0.90x; g = 32 fp32 4096 x 4096 (48 KiB) 0.95x. Three
// rows per step measured within 3% of four.
// FASTKERN_W4A16_MULTIROW_KB overrides the bound here and kW4Rows2Avx2Bytes (0: always
// several rows), read per call.
constexpr int64_t kW4Rows4Bytes = 16 << 10;

template <int L>
FASTKERN_AVX512VNNI void w4l_rows4_avx512(const W4& p, const Limbs& q, const KRange& kr, int64_t n0, int64_t n1,
                                          float* Y) {
  constexpr int64_t CW = 128;
  constexpr int R = 4;
  const int64_t hb = p.g / 2, ldw = p.ldw, G = p.G, ng = kr.g1 - kr.g0, far = R * kr.pf_rows * ldw;
  // masked loads: no read past the group (or the tensor)
  const __mmask64 mk = hb >= 64 ? ~__mmask64(0) : (__mmask64(1) << hb) - 1;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int8_t* x0 = q.a + kr.g0 * L * CW;
  const float* sx = q.sx + kr.g0 * 4 + (L - 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const uint8_t* wp = p.w + n * ldw + kr.g0 * hb;
    const float* sw = p.s + n * G + kr.g0;
    __m512 tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < ng; ++k) {
      __m512i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        // the far prefetch: the same bytes of the rows pf_rows steps ahead
        _mm_prefetch(reinterpret_cast<const char*>(wp + r * ldw + k * hb + far), _MM_HINT_T1);
        const __m512i v = _mm512_maskz_loadu_epi8(mk, wp + r * ldw + k * hb);
        lo[r] = _mm512_and_si512(v, m4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
      const int8_t* a = x0 + k * L * CW;
      __m512i t[R][L];
      for (int l = 0; l < L; ++l) {
        const __m512i xe = _mm512_loadu_si512(a + l * CW), xo = _mm512_loadu_si512(a + l * CW + 64);
        for (int r = 0; r < R; ++r) t[r][l] = dpbusd_inplace(_mm512_setzero_si512(), lo[r], xe);
        for (int r = 0; r < R; ++r) t[r][l] = dpbusd_inplace(t[r][l], hi[r], xo);
      }
      const __m512 c = _mm512_set1_ps(sx[k * 4]);
      for (int r = 0; r < R; ++r) {
        __m512i d = t[r][0];
        for (int l = 1; l < L; ++l) d = _mm512_add_epi32(_mm512_slli_epi32(d, 7), t[r][l]);
        tot[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), c), _mm512_set1_ps(sw[r * G + k]), tot[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = hsum16_avx512(tot[r]);
      const float zc = zero_corr_avx512(sw + r * G, p.z + (n + r) * G + kr.g0, q.sum + kr.g0, ng);
      float& y = Y[n + r];
      y = kr.first ? s - zc : y + (s - zc);
    }
  }
  if (n < n1) w4l_rows1_avx512<L>(p, q, kr, n, n1, Y);
}

// FASTKERN_W4A16_ROWS512=0 sends M = 1 back to the per-row tiles (A/B timing, tests); read per call.
inline bool rows512_enabled() { return env_knob("FASTKERN_W4A16_ROWS512", 1) != 0; }

using TileFn = void (*)(const W4&, const Limbs&, const KRange&, int64_t, int64_t, float*, int64_t);


// Tile shapes per ISA and M remainder: MR rows of x against NR weight rows, MR * NR * L
// accumulators within the register file (16 ymm / 32 zmm).
template <bool V512, int L>
struct W4Tiles {
  template <int MR, int NR>
  static constexpr TileFn fn() {
    return V512 ? &w4l_tile_avx512<MR, NR, L> : &w4l_tile_avx2<MR, NR, L>;
  }
  // (MR, NR) for a block of mr activation rows; single-row tails use NR = 1.
  static void pick(int64_t mr, TileFn& wide, TileFn& one, int& nr, int& mrr) {
    if (V512) {
      // one weight row per tile at m = 1 and two from m = 2 on: every weight row of a
      // tile is a separate stream, and fewer streams read DRAM faster (one thread,
      // 4096x4096: m = 1 (1,1) 0.29 ms vs (1,4) 0.40; m = 2 (2,2) 0.48 vs (2,4) 0.61)
      // while the x limbs come from L1 either way
      switch (mr) {
        case 1: wide = fn<1, 1>(); one = fn<1, 1>(); nr = 1; mrr = 1; return;
        case 2: wide = fn<2, 2>(); one = fn<2, 1>(); nr = 2; mrr = 2; return;
        case 3: wide = fn<3, 2>(); one = fn<3, 1>(); nr = 2; mrr = 3; return;
        default: wide = fn<4, 2>(); one = fn<4, 1>(); nr = 2; mrr = 4; return;
      }
    }
    switch (mr) {
      case 1: wide = fn<1, 2>(); one = fn<1, 1>(); nr = 2; mrr = 1; return;  // (1,1): 10-15% slower
      case 2: wide = fn<2, 1>(); one = fn<2, 1>(); nr = 1; mrr = 2; return;
      default: wide = fn<3, 1>(); one = fn<3, 1>(); nr = 1; mrr = 3; return;
    }
  }
};

// Groups per K block. Small M (<= kGemvMaxM): the limbs of a block for all M rows of x
// within ~36 KiB (L1 holds them while the weights stream through; one thread, m = 1,
// 4096x11008 / 4096x14336: 36 KiB 5-8% faster than 24, 16 KiB 10-15% slower, 48 KiB
// 2x slower for fp32), but each row's run of a block at least 2 KiB (32 lines: long
// enough a stream for the prefetchers). Below the budget K is one block and each
// thread reads its rows as one contiguous stream.
// Larger M: the limbs of one 4-row x tile within ~12 KiB, so that tile and the runs of
// the rb weight rows it meets (~24 KiB, w4l_gemv) share L1, all of x's block in L2.
// Blocks of equal size.
// Whole K (both limb GEMVs, w4l_gemv16_avx2 and w4l_gemv): K is one block whenever
// the limbs of all M rows fit in it. The GEMV then reads each thread's rows as one stream;
// K blocks cut it into runs with gaps (the other blocks' bytes), which DRAM delivers far
// slower than the limbs come from L2. Measured (2 threads, AVX2 forced, weights beyond L3,
// alternating in one process): fp32 M = 1 4096x14336 0.85 against 1.10 ms, 2048x28672 0.76
// against 1.16 ms; bf16 M = 4 4096x14336 2.30 against 3.12 ms; M = 8 2048x28672 fp32 5.6
// against 6.1 ms; 4096x4096 unchanged. M = 16 at K = 28672 (1.4 MB of limbs, beyond L2) was
// faster with the blocks (12.3 against 14.6 ms), hence the bound. The AVX-512 VNNI GEMV
// (2 Sapphire Rapids class cores, same method, medians of 5-8 rounds): fp32 M = 1 4096x14336
// 0.93x the time (2048x28672 1.00x), M = 2 / 4 0.95x and 0.92x (both shapes), bf16 M = 1
// 1.00x / 0.96x, bf16 M = 4 0.96x / 0.94x; M = 8 / 16 and K <= 11008 at M = 1 within 1%
// (fp32 4096x4096 M = 16 0.95x).
constexpr int64_t kW4WholeKBytes = 768 << 10;
// w4l_gemv with several K blocks: each thread's rows in windows of about kW4WindowBytes of
// weight, every K block of a window before the next window, so the runs of a window's
// blocks fill each other's gaps while the window is still in L2 (the hardware
// prefetchers' overshoot past a run's end is used, not evicted). Measured (2 threads,
// AVX-512 VNNI, M = 1, paired rounds in one process): 4096x14336 fp32 1.04-1.06x,
// 2048x28672 fp32 / bf16 1.05-1.07x; one K block (4096x4096) is unchanged (no windows).
// FASTKERN_W4A16_WINDOW_KB (0: no windows) and FASTKERN_W4A16_WHOLE_K_KB (0: always K blocks)
// override the two sizes.
constexpr int64_t kW4WindowBytes = 768 << 10;
inline int64_t w4_whole_k_bytes() { return env_knob("FASTKERN_W4A16_WHOLE_K_KB", kW4WholeKBytes >> 10) << 10; }
inline int64_t w4_k_block_groups(int64_t G, int64_t M, int64_t group_bytes_row, int64_t run_bytes) {
  if (M * group_bytes_row * G <= w4_whole_k_bytes()) return G;
  const int64_t gbx = std::max<int64_t>(M * group_bytes_row, 1);
  int64_t gb = M <= kGemvMaxM ? std::max((int64_t(36) << 10) / gbx, (2048 + run_bytes - 1) / run_bytes)
                              : (int64_t(12) << 10) / (4 * group_bytes_row);
  gb = std::max<int64_t>(1, std::min(gb, G));
  const int64_t blocks = (G + gb - 1) / gb;
  return (G + blocks - 1) / blocks;
}

template <bool V512, int L>
void w4l_gemv(const W4& p, const Limbs& q, int64_t M, int64_t N, float* Y) {
  constexpr int64_t CW = V512 ? 128 : 64;
  const int64_t hb = p.g / 2;
  const int64_t gb = w4_k_block_groups(p.G, M, q.nc * L * CW, hb);
  // the far prefetch about kPrefetchL2 bytes ahead in this thread's stream of runs
  const int64_t pf_rows = std::max<int64_t>(1, (kPrefetchL2 + gb * hb - 1) / (gb * hb));
  // weight rows per pass over x: ~24 KiB of their runs (a multiple of kGemvRows, so tile
  // boundaries stay where they are for any thread split); 4 at small M, where x is in L1
  const int64_t rb = M <= kGemvMaxM ? kGemvRows
                                    : std::min<int64_t>(64, std::max<int64_t>(kGemvRows, (int64_t(24) << 10) / (gb * hb) / kGemvRows * kGemvRows));
  const int64_t win =
      gb < p.G ? rows_in_bytes(env_knob("FASTKERN_W4A16_WINDOW_KB", kW4WindowBytes >> 10) << 10, p.ldw, rb, N) : N;
  // kGemvRows is a multiple of every NR (and win of rb), so the tiling of a row never
  // depends on the thread split or the windows
  const bool rows1 = V512 && M == 1 && p.g <= CW && rows512_enabled();
  const bool rows4 = rows1 && gb * L * CW >= w4_multirow_bytes(kW4Rows4Bytes);
  parallel_rows(N, kGemvRows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n0 = r0; n0 < r1; n0 += win) {
      const int64_t n1 = std::min(r1, n0 + win);
      for (int64_t g0 = 0; g0 < p.G; g0 += gb) {
        const KRange kr{g0, std::min(p.G, g0 + gb), g0 == 0, p.w + N * p.ldw, pf_rows};
        if (rows1) {
          if (rows4) w4l_rows4_avx512<L>(p, q, kr, n0, n1, Y);
          else w4l_rows1_avx512<L>(p, q, kr, n0, n1, Y);
          continue;
        }
        // rb weight rows (their runs in L1) meet every row of x before the next rows stream
        // in, so each x tile's limbs come from L2 once per rb rows
        for (int64_t nb = n0; nb < n1; nb += rb) {
          const int64_t ne = std::min(n1, nb + rb);
          for (int64_t m0 = 0; m0 < M;) {
            TileFn wide, one;
            int nr, mr;
            W4Tiles<V512, L>::pick(M - m0, wide, one, nr, mr);
            int64_t n = nb;
            for (; n + nr <= ne; n += nr) wide(p, q, kr, n, m0, Y, N);
            for (; n < ne; ++n) one(p, q, kr, n, m0, Y, N);
            m0 += mr;
          }
        }
      }
    }
  });
}

// Rows of x per w4l_rows16_avx2 call with one limb (linear_w4a8): FASTKERN_W4A8_AVX2_ROWS (1..4,
// default 4; read per call). Measured (2 threads, AVX2, 11008 x 4096 g = 128, weights beyond L3,
// ms for 1 / 2 / 3 / 4 rows): M = 4 1.95 / 1.79 / 1.60 / 1.42, M = 16 6.8 / 6.6 / 5.5 / 5.2,
// M = 64 26.5 / 24.4 / 20.9 / 19.4; 4096 x 4096 likewise (M = 64 10.1 / 9.5 / 7.9 / 7.5).
inline int64_t w4a8_rows_avx2() { return std::max<int64_t>(1, std::min<int64_t>(4, env_knob("FASTKERN_W4A8_AVX2_ROWS", 4))); }

// The AVX2 GEMV for g % 64 == 0 (w4l_rows16_avx2): the K blocks, prefetch distance and
// row passes of w4l_gemv; at M = 1 each thread's rows go to one call (one stream, the
// per-call setup paid once per K block).
template <int L>
void w4l_gemv16_avx2(const W4& p, const Limbs& q, int64_t M, int64_t N, float* Y, bool pair = false) {
  constexpr int64_t CW = 64;
  // pair: K blocks of whole pairs (counted in 64-weight units, then in groups)
  const int64_t hb = pair ? 32 : p.g / 2;
  const int64_t gbu = w4_k_block_groups(pair ? p.G / 2 : p.G, M, q.nc * L * CW, hb);
  const int64_t gb = pair ? 2 * gbu : gbu;
  const int64_t pf_rows = std::max<int64_t>(1, (kPrefetchL2 + gbu * hb - 1) / (gbu * hb));
  const int64_t rb = M <= kGemvMaxM ? kGemvRows
                                    : std::min<int64_t>(64, std::max<int64_t>(kGemvRows, (int64_t(24) << 10) / (gbu * hb) / kGemvRows * kGemvRows));
  const int cs = w4_span16(q.nc);
  // Rows of x per call: up to 3 for the pairs; one for w4l_rows16_avx2, whose multi-row
  // tiles spill their accumulators (3 limbs x 3 rows + totals > 16 ymm) and gained nothing
  // from sharing the unpacked nibbles. Measured (2 threads, 4096x14336 g128, fp32, 3-row
  // tiles vs one row): m = 3 / 8: 6.8 / 16.6 ms against 5.4 / 13.3; 4096x4096 m = 4 / 12:
  // 1.45 / 4.6 against 0.99 / 3.6; bf16 m = 8: 8.2 against 7.3. Pairs (g = 32): m = 4 11 vs
  // 9.6, m = 12 16 vs 18 (kept at 3).
  // One limb (linear_w4a8): up to 4 rows of x per call, sharing each unpacked chunk (1 + 1
  // ymm per row: no spill).
  const RowsFn f1 = pair ? &w4l_rows16p_avx2<1, L> : w4_rows16_fn<L, 1>(cs);
  const bool rows2 = !pair && M == 1 && gbu * q.nc * L * CW >= w4_rows2_avx2_bytes(L);
  const RowsFn f1m = rows2 ? w4_rows16_fn<L, 2>(cs) : f1;
  const bool multi = !pair && L == 1 && w4a8_rows_avx2() > 1;
  const RowsFn f2 = pair ? &w4l_rows16p_avx2<2, L> : multi ? w4_rows16_fn<L, 1, 2>(cs) : nullptr;
  const RowsFn f3 = pair ? &w4l_rows16p_avx2<3, L> : multi ? w4_rows16_fn<L, 1, 3>(cs) : nullptr;
  const RowsFn f4 = multi ? w4_rows16_fn<L, 1, 4>(cs) : nullptr;
  const int64_t mr_max = pair ? 3 : multi ? w4a8_rows_avx2() : 1;
  parallel_rows(N, kGemvRows, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t g0 = 0; g0 < p.G; g0 += gb) {
      const KRange kr{g0, std::min(p.G, g0 + gb), g0 == 0, p.w + N * p.ldw, pf_rows};
      if (M == 1) {
        f1m(p, q, kr, n0, n1, 0, Y, N);
        continue;
      }
      for (int64_t nb = n0; nb < n1; nb += rb) {
        const int64_t ne = std::min(n1, nb + rb);
        for (int64_t m0 = 0; m0 < M;) {
          const int64_t mr = std::min<int64_t>(mr_max, M - m0);
          (mr == 1 ? f1 : mr == 2 ? f2 : mr == 3 ? f3 : f4)(p, q, kr, nb, ne, m0, Y, N);
          m0 += mr;
        }
      }
    }
  });
}

// FASTKERN_W4A16_AVX2_SPAN16=0 sends the AVX2 GEMV to w4l_tile_avx2 for every group size
// (A/B timing, tests); unset or 1: w4l_rows16_avx2 where g % 64 == 0, w4l_rows16p_avx2
// where g = 32 and K % 64 == 0. Read per call.
// Largest M the limb GEMV serves (above it the fp32 GEMM): kLimbMaxM /
// kLimbMaxMHalf with VNNI; on AVX2 without it (vpmaddubsw + vpmaddwd, at most 2 per
// cycle) the limbs cost more and the GEMM takes over earlier: kLimbMaxMAvx2 /
// kLimbMaxMHalfAvx2. FASTKERN_W4A16_LIMB_MAX_M overrides both (read per call: A/B).
inline int64_t limb_max_m(bool fp32_x, bool vnni, int64_t g) {
  const char* e = std::getenv("FASTKERN_W4A16_LIMB_MAX_M");
  if (e && *e) return std::atoll(e);
  if (vnni) return g < 64 ? kLimbMaxMSmallGroup : fp32_x ? kLimbMaxM : kLimbMaxMHalf;
  return fp32_x ? kLimbMaxMAvx2 : kLimbMaxMHalfAvx2;
}

inline bool span16_enabled() {
  const char* e = std::getenv("FASTKERN_W4A16_AVX2_SPAN16");
  return !(e && e[0] == '0');
}

// ------------------------------------------------------------------ GEMV tiles: fp32 FMA (AVX-512)
//
// From M = kW4TileMinM (AVX-512, groups of a multiple of 16) the weights meet MR rows of x in
// fp32 FMAs, NR weight rows at a time, dequantized in registers by a table: per weight row
// and group the 16 values (q - z) * s for q = 0..15 (the reference's fp32 operations, so each
// weight is bit-identical to its dequantized value) fill one zmm, and 16 weights are one
// 8-byte broadcast, a variable shift that brings nibble t of the low and of the high dword
// into lanes 2t and 2t + 1, and a vpermps (which reads the low 4 bits of each lane). x is
// permuted to match once per call (lane 2t: k = t, lane 2t + 1: k = 8 + t of each 16). The
// dequantization is paid once per MR rows of x, where the limbs pay L byte products per
// weight and row. One accumulator per output summed over k in order, so the result does not
// depend on the tile shape or thread split.
constexpr int64_t kW4TileMinM = 6;  // so that every pass has 3 or 4 rows
constexpr int64_t kW4TileRows = 4;  // rows of x per pass at most

// 16 weights (8 bytes at b, low nibble first) from the group's table, in x's permuted order
FASTKERN_AVX512 inline __m512 w4f_lookup16(const uint8_t* b, __m512i shifts, __m512 tbl) {
  int64_t v;
  std::memcpy(&v, b, 8);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(v), shifts), tbl);
}

// MR rows of x (fp32, permuted, row stride ldx) x weight rows [n, n + NR) -> Y[i * ldy + n + j]
template <int MR, int NR>
FASTKERN_AVX512 void w4f_tile_avx512(const W4& p, const float* X, int64_t ldx, int64_t n, float* Y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t g = p.g, hb = g / 2;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m512 tbl[NR];
    const uint8_t* wg[NR];
    for (int j = 0; j < NR; ++j) {
      tbl[j] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(float(p.z[(n + j) * p.G + gi]))),
                             _mm512_set1_ps(p.s[(n + j) * p.G + gi]));
      wg[j] = p.w + (n + j) * p.ldw + gi * hb;
    }
    const float* xg = X + gi * g;
    for (int64_t c = 0; c < g; c += 16) {
      if (c % 128 == 0)
        for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(wg[j] + c / 2 + kPrefetchL2), _MM_HINT_T0);
      __m512 wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = w4f_lookup16(wg[j] + c / 2, shifts, tbl[j]);
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_loadu_ps(xg + i * ldx + c);
        for (int j = 0; j < NR; ++j) acc[i][j] = fma_inplace(acc[i][j], xv, wv[j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[i * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// x [M, K] (row stride ldx, K a multiple of 16) -> xp: each 16 columns as (0, 8, 1, 9, .., 7, 15)
FASTKERN_AVX512 void w4f_permute_x(const float* X, int64_t ldx, int64_t M, int64_t K, float* xp) {
  const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 16)
      _mm512_storeu_ps(xp + m * K + k, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(X + m * ldx + k)));
}

template <int MR, int NR>
void w4f_tiles_avx512(const W4& p, const float* X, int64_t ldx, int64_t n0, int64_t n1, float* Y, int64_t ldy) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) w4f_tile_avx512<MR, NR>(p, X, ldx, n, Y, ldy);
  for (; n < n1; ++n) w4f_tile_avx512<MR, 1>(p, X, ldx, n, Y, ldy);
}

// mr (3 or 4: M >= kW4TileMinM rows spread evenly over passes of at most 4) rows of x: 4 x 4
// tiles (16 accumulators, 4 tables, 4 weight vectors). Tried: 8 x 2 (twice the x rows per
// weight vector, but 8 loads of x per 16 FMAs, from L2) ran at the limbs' rate; 4 x 5 no
// faster than 4 x 4.
void w4f_pass_avx512(int64_t mr, const W4& p, const float* X, int64_t ldx, int64_t n0, int64_t n1, float* Y,
                     int64_t ldy) {
  if (mr == 3)
    w4f_tiles_avx512<3, 4>(p, X, ldx, n0, n1, Y, ldy);
  else
    w4f_tiles_avx512<4, 4>(p, X, ldx, n0, n1, Y, ldy);
}

// Y [M, N] = X [M, K] (fp32, row stride ldx) x dequantized W^T, in passes of at most
// kW4TileRows rows of x over each thread's row blocks (parallel_row_blocks)
void w4f_gemv_avx512(const W4& p, const float* X, int64_t ldx, int64_t M, int64_t N, float* Y) {
  const int64_t K = 2 * p.ldw;
  std::vector<float> xpv(M * K);
  float* xp = xpv.data();
  w4f_permute_x(X, ldx, M, K, xp);
  parallel_row_blocks(N, 16, 8, p.ldw, (M + kW4TileRows - 1) / kW4TileRows, [&](int64_t n0, int64_t n1) {
    for_each_pass(M, kW4TileRows, [&](int64_t m0, int64_t mr) {
      w4f_pass_avx512(mr, p, xp + m0 * K, K, n0, n1, Y + m0 * N, N);
    });
  });
}

// The same tiles on AVX2 (groups of a multiple of 16): 16 weights of a row are one 8-byte
// zero-extending load to 8 dword lanes (byte t in lane t), the even-k nibbles an AND, the odd-k
// ones a shift, each converted to fp32 and made q - z by a subtract (exact), then either scaled
// per weight ((q - z) * s, the reference's own fp32 weight) or, by default, left unscaled with
// each group's sums scaled once (FOLD below). No 16-entry table: AVX2's vpermps holds 8. x is
// permuted to match once per call (per 16 columns: k = 0, 2, .., 14, then 1, 3, .., 15), its
// rows 64-byte aligned and a cache line beyond a multiple of 4 KiB apart. Each output is summed
// over k in a fixed order (per group with FOLD) whatever the tile shape or the thread split.
// q - z of 16 weights (8 bytes at b): lo the even k, hi the odd k
FASTKERN_AVX2 inline void w4f_deq16_avx2(const uint8_t* b, __m256 z, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
  lo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), z);
  hi = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), z);
}

// MR rows of x (fp32, permuted, row stride ldx) x weight rows [n, n + NR) -> Y[i * ldy + n + j].
// FOLD: the weights as (q - z) only, each group's sums in a second set of accumulators, scaled
// by s once per group (one multiply less per 8 weights; needs |x| <= kW4MaxX so that
// x (q - z) cannot overflow where x ((q - z) s) does not).
template <int MR, int NR, bool FOLD>
FASTKERN_AVX2 void w4f_tile_avx2(const W4& p, const float* X, int64_t ldx, int64_t n, float* Y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t g = p.g, hb = g / 2;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m256 zv[NR], sv[NR];
    const uint8_t* wg[NR];
    for (int j = 0; j < NR; ++j) {
      zv[j] = _mm256_set1_ps(float(p.z[(n + j) * p.G + gi]));
      sv[j] = _mm256_set1_ps(p.s[(n + j) * p.G + gi]);
      wg[j] = p.w + (n + j) * p.ldw + gi * hb;
    }
    __m256 ag[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) ag[i][j] = _mm256_setzero_ps();
    const float* xg = X + gi * g;
    for (int64_t c = 0; c < g; c += 16) {
      if (c % 128 == 0)
        for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(wg[j] + c / 2 + kPrefetchL2), _MM_HINT_T0);
      __m256 wl[NR], wh[NR];
      for (int j = 0; j < NR; ++j) {
        w4f_deq16_avx2(wg[j] + c / 2, zv[j], wl[j], wh[j]);
        if (!FOLD) wl[j] = _mm256_mul_ps(wl[j], sv[j]), wh[j] = _mm256_mul_ps(wh[j], sv[j]);
      }
      for (int i = 0; i < MR; ++i) {
        const __m256 xl = _mm256_load_ps(xg + i * ldx + c), xh = _mm256_load_ps(xg + i * ldx + c + 8);
        __m256(&a)[NR] = FOLD ? ag[i] : acc[i];
        for (int j = 0; j < NR; ++j) a[j] = _mm256_fmadd_ps(xl, wl[j], a[j]);
        for (int j = 0; j < NR; ++j) a[j] = _mm256_fmadd_ps(xh, wh[j], a[j]);
      }
    }
    if (FOLD)
      for (int j = 0; j < NR; ++j)
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(ag[i][j], sv[j], acc[i][j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[i * ldy + n + j] = gemm::hsum8(acc[i][j]);
}

// x [M, K] (row stride ldx, K a multiple of 16) -> xp (row stride lxp): each 16 columns as
// (0, 2, .., 14, 1, 3, .., 15). Returns whether every |x| <= kW4MaxX (NaN: false).
FASTKERN_AVX2 bool w4f_permute_x_avx2(const float* X, int64_t ldx, int64_t M, int64_t K, float* xp, int64_t lxp) {
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256 big = _mm256_set1_ps(kW4MaxX), sign = _mm256_set1_ps(-0.f);
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 u = _mm256_loadu_ps(X + m * ldx + k), v = _mm256_loadu_ps(X + m * ldx + k + 8);
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_andnot_ps(sign, u), big, _CMP_LE_OQ));
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_andnot_ps(sign, v), big, _CMP_LE_OQ));
      // a = (0, 2, 4, 6 | 1, 3, 5, 7), b = (8, 10, 12, 14 | 9, 11, 13, 15)
      const __m256 a = _mm256_permutevar8x32_ps(u, idx), b = _mm256_permutevar8x32_ps(v, idx);
      _mm256_storeu_ps(xp + m * lxp + k, _mm256_permute2f128_ps(a, b, 0x20));
      _mm256_storeu_ps(xp + m * lxp + k + 8, _mm256_permute2f128_ps(a, b, 0x31));
    }
  return _mm256_movemask_ps(ok) == 0xFF;
}

template <int MR, bool FOLD>
void w4f_tiles_avx2(const W4& p, const float* X, int64_t ldx, int64_t n0, int64_t n1, float* Y, int64_t ldy) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) w4f_tile_avx2<MR, 2, FOLD>(p, X, ldx, n, Y, ldy);
  if (n < n1) w4f_tile_avx2<MR, 1, FOLD>(p, X, ldx, n, Y, ldy);
}

template <bool FOLD>
void w4f_pass_avx2(int64_t mr, const W4& p, const float* x, int64_t lxp, int64_t n0, int64_t n1, float* y, int64_t N) {
  switch (mr) {
    case 1: w4f_tiles_avx2<1, FOLD>(p, x, lxp, n0, n1, y, N); break;
    case 2: w4f_tiles_avx2<2, FOLD>(p, x, lxp, n0, n1, y, N); break;
    case 3: w4f_tiles_avx2<3, FOLD>(p, x, lxp, n0, n1, y, N); break;
    default: w4f_tiles_avx2<4, FOLD>(p, x, lxp, n0, n1, y, N); break;
  }
}

// Y [M, N] = X [M, K] x dequantized W^T: passes of at most 4 rows of x (tiles of 4 x rows x 2
// weight rows, 16 x loads per 16 FMAs as memory operands) over each thread's row blocks. The
// group scale is applied once per group (FOLD) where every |x| <= kW4MaxX, else per weight
// (FASTKERN_W4A16_AVX2_TILE_FOLD=0: always per weight, for tests and A/B). Measured (fp32, 2
// threads, weights beyond L3, alternating): FOLD 0.82-0.94x the time of per-weight scaling
// at m = 4 / 8 / 16 on the four Llama shapes (one multiply less per 8 weights on the FMA
// pipes: a register-only loop runs 1.54 against 1.38 FMAs per cycle). Tried: 5 x 2 as fast as
// 4 x 2; 3 x 3 / 8 x 1 / 6 x 1 1.05-1.5x the time (one weight row per tile reads x from L2
// for every FMA); K blocks keeping the x rows in L1 (8-32 KiB) 1.0-1.25x.
void w4f_gemv_avx2(const W4& p, const float* X, int64_t ldx, int64_t M, int64_t N, float* Y) {
  const int64_t K = 2 * p.ldw, lxp = K + 16;
  at::Tensor xpt = at::empty({M * lxp}, at::kFloat);  // 64-byte aligned: no x load crosses a line
  float* xp = xpt.data_ptr<float>();
  const bool fold = w4f_permute_x_avx2(X, ldx, M, K, xp, lxp) && env_knob("FASTKERN_W4A16_AVX2_TILE_FOLD", 1);
  parallel_row_blocks(N, 16, 8, p.ldw, (M + 3) / 4, [&](int64_t n0, int64_t n1) {
    for_each_pass(M, 4, [&](int64_t m0, int64_t mr) {
      if (fold)
        w4f_pass_avx2<true>(mr, p, xp + m0 * lxp, lxp, n0, n1, Y + m0 * N, N);
      else
        w4f_pass_avx2<false>(mr, p, xp + m0 * lxp, lxp, n0, n1, Y + m0 * N, N);
    });
  });
}

// The M range of the tiles (AVX-512, groups of a multiple of 16): fp32 x from kW4TileMinM;
// bf16 / fp16 x above the limbs' range (two limbs cost less: bf16 11008 x 4096 M = 4 / 8 1.2
// / 2.4 ms against 1.7 / 2.7, M = 16..40 the same), where the tiles beat the fp32 GEMM: bf16
// 11008 x 4096 M = 41 / 48 / 64 / 80 14.5 / 16.0 / 20.9 / 26.3 ms against 19.8 / 17.7 / 26.7
// / 27.2, 4096 x 4096 M = 41 / 64 / 96 5.5 / 7.7 / 11.6 against 7.4 / 10.5 / 12.9. Measured (fp32 x, 2 threads, weights beyond L3, one process,
// alternating; ms, tiles vs the limbs to M = 32 and the fp32 GEMM above): 11008 x 4096 M =
// 4 / 8 / 16 / 24 / 32 / 48 / 64 / 96: 1.67 / 3.00 / 4.37 / 7.76 / 9.83 / 12.2 / 15.7 / 24.4
// against 1.78 / 3.36 / 5.01 / 10.8 / 15.1 / 15.2 / 19.7 / 25.1; 4096 x 11008 M = 4 / 8 / 16
// / 32 / 64: 1.46 / 2.64 / 4.24 / 8.24 / 17.0 against 1.55 / 3.24 / 5.28 / 10.3 / 19.3;
// 4096 x 4096 M = 4 / 8 / 16: 0.60 / 0.89 / 1.58 against 0.57 / 0.90 / 1.79.
// FASTKERN_W4A16_TILE_MAX_M overrides the top (0: off), read on every call (A/B, tests).
constexpr int64_t kW4TileMaxM = 64;
inline int64_t w4f_tile_max_m(int64_t fallback) { return env_knob("FASTKERN_W4A16_TILE_MAX_M", fallback); }
inline bool use_w4f_tiles(int64_t M, int64_t g, bool fp32_x) {
  const int64_t lo = fp32_x ? kW4TileMinM : std::max(kW4TileMinM, limb_max_m(false, features().avx512vnni, g) + 1);
  return active_isa() >= Isa::Avx512 && g % 16 == 0 && M >= lo && M <= w4f_tile_max_m(kW4TileMaxM);
}

// AVX2 (and AVX2 + AVX-VNNI, whose W4A16 runs the AVX2 code): fp32 x from 3 to 32 rows, where
// the three-limb GEMV (to 16) and the fp32 GEMM cost more. Measured (fp32 x, g = 128, 2
// threads, weights beyond L3, one process, alternating; ms): m = 3, the scale per group, 0.76-0.89x
// the limbs' time at 4096 x 4096, 4096 x 11008, 11008 x 4096 (m = 2 1.05-1.14x, so the limbs
// keep it); tiles with the scale per weight against the default before them: 4096 x 4096 m = 2 / 4 / 8 / 16: 0.75 / 1.04 / 2.07 / 4.0
// against 0.59 / 1.39 / 2.27 / 4.5; 4096 x 11008 m = 4 / 8 / 16: 3.35 / 6.9 / 10.6 against
// 4.34 / 7.75 / 13.5; 4096 x 14336 m = 4 / 12 / 16: 4.0 / 11.5 / 14.3 against 4.8 / 14.5 /
// 18.3; 11008 x 4096 m = 4 / 16: 2.97 / 11.1 against 3.34 / 12.3. With the scale per group,
// against the GEMM: 4096 x 4096 m = 20 / 24 / 32 / 40 / 48 / 64: 4.9 / 5.3 / 7.5 / 9.0 / 10.8 /
// 14.4 against 6.7 / 6.1 / 8.4 / 8.9 / 9.7 / 13.1; 4096 x 11008 m = 20 / 32 / 40 / 64: 12.3 /
// 20.5 / 23.7 / 37.7 against 16.3 / 23.9 / 23.5 / 33.7. bf16 / fp16 x keep their two limbs to
// m = 16 (the tiles 0.96-1.13x their time at m = 4 / 8 / 16) and take the tiles above (bf16
// 4096 x 4096 m = 20 / 32: 4.9 / 7.3 against the GEMM's 6.0 / 8.0 ms; 4096 x 11008: 12.9 / 20.1
// against 16.8 / 21.6). FASTKERN_W4A16_TILE_MAX_M moves the top here too.
constexpr int64_t kW4TileMinMAvx2 = 3;
constexpr int64_t kW4TileMaxMAvx2 = 32;
inline bool use_w4f_tiles_avx2(int64_t M, int64_t g, bool fp32_x) {
  const Isa isa = active_isa();
  const int64_t lo = fp32_x ? kW4TileMinMAvx2 : std::max(kW4TileMinMAvx2, limb_max_m(false, false, g) + 1);
  return isa >= Isa::Avx2 && isa < Isa::Avx512 && g % 16 == 0 && M >= lo && M <= w4f_tile_max_m(kW4TileMaxMAvx2);
}

// ------------------------------------------------------------------ GEMV: bf16 dot products (AVX512-BF16)
//
// bf16 (and fp16) activations on CPUs with AVX512-BF16: every nibble q (0..15) is exact
// in bf16, so the products need no activation limbs. A 64-byte load holds 128 nibbles,
// as 32 16-bit words of 4 nibbles each; word >> 4j indexes (vpermw, low 5 bits) a
// 32-entry table of bf16(i & 15), giving 32 weights k = 4w + j (w = 0..31) as bf16
// with one shift and one permute. vdpbf16ps multiplies them by the activations in
// bf16 (exact products) into fp32 lanes. Per group, the fp32 lanes are scaled by the
// weight scale with an FMA and the zero point folds out as z * s * sum(x_group).
// Activations are laid out per group in chunks of 128: 4 vectors of 32 bf16, vector j
// lane w = x[4w + j], zero past the group's end (the masked weight load reads zeros
// there too). bf16 x converts exactly; fp16 x (11-bit significand) splits exactly into
// two bf16 "limbs" hi = bf16(x), lo = x - hi (at most 3 significant bits), laid out
// one after the other per chunk and dotted into the same accumulators: exact products
// at twice the dot work (rounding fp16 x to one bf16 would cost ~1.6e-3 relative error,
// inside the 1e-2 contract but 20x the limb path's). Inputs holding NaN/inf take the
// panel path, which matches the reference.

constexpr int64_t kBfChunk = 128;

// Off by default: since the limb GEMV combines its limbs by Horner's rule (one int32
// accumulator per output) and streams fewer rows at once, the limbs (two for bf16 /
// fp16 x) are faster at every M <= 16 (one thread, 4096x4096: m = 1 0.32 vs 0.45 ms,
// m = 4 0.63 vs 0.97, m = 16 2.5 vs 3.1). FASTKERN_W4A16_BF16_GEMV=1 sends every
// M <= 16 here (how the tests keep covering it), =0 or unset keeps the limbs; read per
// call.
inline bool bf16_gemv_enabled(int64_t /*M*/) {
  const char* e = std::getenv("FASTKERN_W4A16_BF16_GEMV");
  return e && e[0] == '1';
}

struct Bf16X {
  const uint16_t* a;  // [M, lda], lda = G * nc * L * 128
  int64_t lda;
  const float* sum;   // [M, G] sum of the group's bf16 activations
  int64_t nc;         // chunks of 128 per group
};

inline uint16_t f32_to_bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // finite inputs only
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 -> bf16 bits (nearest even) of 32 floats: lanes 0..15 from lo, 16..31 from hi
FASTKERN_AVX512BF16 inline __m512i cvt_bf16x32(__m512 lo, __m512 hi) {
  __m512i r;
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(hi), "v"(lo));
  return r;
}

// One full chunk of 128 activations into L limb blocks of 128 bf16 (vector t lane w =
// x[4w + t]). Returns false on NaN/inf; adds the chunk's activations to vs.
template <int L>
FASTKERN_AVX512BF16 bool w4_bf16_chunk(const float* x, uint16_t* d, __m512& vs) {
  const __m512 big = _mm512_set1_ps(kW4MaxX);
  __mmask16 bad = 0;
  __m512 xv[8], lo[8];
  for (int a = 0; a < 8; ++a) {
    xv[a] = _mm512_loadu_ps(x + 16 * a);
    bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(xv[a]), big, _CMP_NLE_UQ);
    vs = _mm512_add_ps(vs, xv[a]);
    if (L > 1) {  // hi = bf16(x) in fp32, lo = x - hi (exact)
      const __m512i u = _mm512_castps_si512(xv[a]);
      const __m512i rnd = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                      _mm512_set1_epi32(1)));
      const __m512 h = _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, rnd), _mm512_set1_epi32(int(0xFFFF0000u))));
      lo[a] = _mm512_sub_ps(xv[a], h);
    }
  }
  if (bad) return false;
  // word index 4w + t within 64 words (w & 15), from two 32-word registers
  alignas(64) uint16_t ix[4][32];
  for (int t = 0; t < 4; ++t)
    for (int w = 0; w < 32; ++w) ix[t][w] = uint16_t((4 * w + t) & 63);
  for (int l = 0; l < L; ++l) {
    const __m512* v = l == 0 ? xv : lo;
    __m512i y[4];
    for (int b = 0; b < 4; ++b) y[b] = cvt_bf16x32(v[2 * b], v[2 * b + 1]);
    for (int t = 0; t < 4; ++t) {
      const __m512i idx = _mm512_load_si512(ix[t]);
      const __m512i A = _mm512_permutex2var_epi16(y[0], idx, y[1]);
      const __m512i B = _mm512_permutex2var_epi16(y[2], idx, y[3]);
      _mm512_storeu_si512(d + l * kBfChunk + 32 * t, _mm512_mask_blend_epi16(__mmask32(0xFFFF0000u), A, B));
    }
  }
  return true;
}

// Returns false if x holds NaN, inf or |x| > kW4MaxX.
template <int L>
FASTKERN_AVX512BF16 bool w4_bf16_group(const float* x, int64_t g, uint16_t* blk, float* sum) {
  const int64_t nc = (g + kBfChunk - 1) / kBfChunk, full = g / kBfChunk;
  if (g % kBfChunk) std::memset(blk, 0, nc * L * kBfChunk * sizeof(uint16_t));
  __m512 vs = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; ++c)
    if (!w4_bf16_chunk<L>(x + c * kBfChunk, blk + c * L * kBfChunk, vs)) return false;
  double s = double(_mm512_reduce_add_ps(vs));
  for (int64_t k = full * kBfChunk; k < g; ++k) {
    if (!(std::fabs(x[k]) <= kW4MaxX)) return false;
    const uint16_t h = f32_to_bf16_rne(x[k]);
    const int64_t r = k % kBfChunk;
    uint16_t* d = blk + (k / kBfChunk) * L * kBfChunk + (r & 3) * 32 + r / 4;
    d[0] = h;
    s += double(bf16_to_f32(h));
    if (L > 1) {  // the remainder: at most 3 significant bits for fp16 x, exact in bf16
      const uint16_t l = f32_to_bf16_rne(x[k] - bf16_to_f32(h));
      d[kBfChunk] = l;
      s += double(bf16_to_f32(l));
    }
  }
  *sum = float(s);
  return true;
}

bool w4_prepare_bf16(const float* X, int64_t ldx, int64_t M, int64_t K, int64_t g, int L, uint16_t* A,
                     int64_t lda, float* SUM) {
  const int64_t nc = (g + kBfChunk - 1) / kBfChunk;
  return w4_for_each_group(M, K / g, g, [&](int64_t i, int64_t m, int64_t gi) {
    const float* x = X + m * ldx + gi * g;
    uint16_t* blk = A + m * lda + gi * nc * L * kBfChunk;
    return L == 1 ? w4_bf16_group<1>(x, g, blk, SUM + i) : w4_bf16_group<2>(x, g, blk, SUM + i);
  });
}

template <int MR, int NR, int L>
FASTKERN_AVX512BF16 void w4b_tile_avx512(const W4& p, const Bf16X& q, int64_t n, int64_t m0, float* Y,
                                         int64_t ldy) {
  alignas(64) uint16_t tb[32];
  for (int i = 0; i < 32; ++i) tb[i] = f32_to_bf16_rne(float(i & 15));
  const __m512i tbl = _mm512_load_si512(tb);
  const int64_t hb = p.g / 2;
  __m512 tot[MR][NR];
  float corr[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      tot[i][j] = _mm512_setzero_ps();
      corr[i][j] = 0.f;
    }
  // NA accumulators per output: vdpbf16ps has a latency of several cycles, fewer than 8
  // independent chains would leave it waiting
  constexpr int NA = MR * NR >= 8 ? 1 : 2;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m512 acc[MR][NR][NA];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        for (int a = 0; a < NA; ++a) acc[i][j][a] = _mm512_setzero_ps();
    const uint16_t* ag = q.a + m0 * q.lda + gi * q.nc * L * kBfChunk;
    for (int64_t c = 0; c < q.nc; ++c) {
      const int64_t nb = std::min<int64_t>(64, hb - c * 64);
      // masked tail: no read past the group (or the tensor); zero bytes are q = 0
      const __mmask64 mk = nb == 64 ? ~__mmask64(0) : (__mmask64(1) << nb) - 1;
      __m512i wv[NR][4];
      for (int j = 0; j < NR; ++j) {
        const uint8_t* wp = p.w + (n + j) * p.ldw + gi * hb + c * 64;
        _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchL2), _MM_HINT_T1);
        const __m512i v = _mm512_maskz_loadu_epi8(mk, wp);
        wv[j][0] = _mm512_permutexvar_epi16(v, tbl);
        wv[j][1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tbl);
        wv[j][2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), tbl);
        wv[j][3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), tbl);
      }
      for (int i = 0; i < MR; ++i) {
        for (int l = 0; l < L; ++l) {
          const uint16_t* al = ag + i * q.lda + (c * L + l) * kBfChunk;
          for (int t = 0; t < 4; ++t) {
            const __m512i xv = _mm512_loadu_si512(al + 32 * t);
            for (int j = 0; j < NR; ++j) acc[i][j][t % NA] = dpbf16_inplace(acc[i][j][t % NA], wv[j][t], xv);
          }
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const float ws = p.s[(n + j) * p.G + gi], z = float(p.z[(n + j) * p.G + gi]);
      const __m512 vws = _mm512_set1_ps(ws);
      for (int i = 0; i < MR; ++i) {
        const __m512 a = NA > 1 ? _mm512_add_ps(acc[i][j][0], acc[i][j][NA - 1]) : acc[i][j][0];
        tot[i][j] = _mm512_fmadd_ps(a, vws, tot[i][j]);
        corr[i][j] += ws * z * q.sum[(m0 + i) * p.G + gi];
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) Y[(m0 + i) * ldy + n + j] = hsum16_avx512(tot[i][j]) - corr[i][j];
}

using BfTileFn = void (*)(const W4&, const Bf16X&, int64_t, int64_t, float*, int64_t);

template <int L>
void w4b_gemv(const W4& p, const Bf16X& q, int64_t M, int64_t N, float* Y) {
  // kGemvRows is a multiple of every NR, so the tiling of a row never depends on the thread split
  parallel_rows(N, kGemvRows, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t nb = n0; nb < n1; nb += kGemvRows) {
      const int64_t ne = std::min(n1, nb + kGemvRows);
      for (int64_t m0 = 0; m0 < M;) {
        BfTileFn wide, one;
        int nr, mr;
        switch (M - m0) {
          case 1: wide = &w4b_tile_avx512<1, 4, L>; one = &w4b_tile_avx512<1, 1, L>; nr = 4; mr = 1; break;
          case 2: wide = &w4b_tile_avx512<2, 2, L>; one = &w4b_tile_avx512<2, 1, L>; nr = 2; mr = 2; break;
          case 3: wide = &w4b_tile_avx512<3, 1, L>; one = wide; nr = 1; mr = 3; break;
          case 4: case 5: case 6: case 7: wide = &w4b_tile_avx512<4, 1, L>; one = wide; nr = 1; mr = 4; break;
          // 8 or more rows left: two weight rows per x load (x streams from L2 at these M;
          // measured 3.45 -> 2.95 ms at M = 16, 2.52 -> 2.28 at M = 12, 4096x4096, against
          // (8, 1); (4, 2) loses at M = 3, 4)
          default: wide = &w4b_tile_avx512<4, 2, L>; one = &w4b_tile_avx512<4, 1, L>; nr = 2; mr = 4; break;
        }
        int64_t n = nb;
        for (; n + nr <= ne; n += nr) wide(p, q, n, m0, Y, N);
        for (; n < ne; ++n) one(p, q, n, m0, Y, N);
        m0 += mr;
      }
    }
  });
}
// ------------------------------------------------------------------ GEMM: bf16 dot products (AVX512-BF16)
//
// bf16 activations from kW4BfGemmMinM rows on CPUs with AVX512-BF16: vdpbf16ps over the
// weights as exact bf16 integers q - z (-15..15), each group's fp32 dot products scaled by
// its weight scale (s * sum_k (q - z) x, the products exact, the sums fp32), so the output
// differs from the reference ((q - z) * s in fp32, then x @ W^T) only by fp32 summation
// order. One vdpbf16ps is 32 multiply-adds where an fp32 FMA is 16: the dequantizing fp32
// GEMM (the only path for this M before) ran at a third to a half of torch's dense bf16
// F.linear on the same CPU, while reading 4x the weight bytes.
//
// The transposed-tile scheme of the AVX2 int8 GEMM (gemm_s16_packed): x is packed once per
// call as bf16 pairs per block of 64 rows, [K/2][w] 32-bit words (x[m][2kp], x[m][2kp+1]),
// w = 64 (16, 32 or 48 for the last block; rows past M are zero); each thread's weight rows
// are widened a K block at a time to a row-major copy of 32-bit words (bf16(q0 - z),
// bf16(q1 - z)), one per weight byte, while the next block's bytes are prefetched into L2;
// and one word is broadcast per step against 16 rows of x per vector: NR weight rows x MV
// vectors of dot accumulators per group, folded with the group's scale into the fp32 totals
// CT [rows][Mp] (48 x Mp floats per thread, in L1 up to M = 64; kept over all K blocks),
// transposed into Y at the end of each task.
// Measured (2 threads, weights beyond L3, alternating in one process with the fp32 path and
// torch's dense bf16 F.linear): 4096x4096 / 11008x4096 / 4096x11008, M = 16: 1.07-1.19x the
// limbs; M = 32 / 64 / 256: 1.8-3.0x the fp32 GEMM, and 1.1-1.5x dense bf16 F.linear up to
// M = 64, 0.85-0.96x at M = 256. Below M = 16 the limbs are faster (M = 8: 1.0 against 1.6
// ms at 4096x4096: this GEMM pays about a third of its M = 16 time for the widening).
constexpr int64_t kW4BfGemmMinM = 16;  // FASTKERN_W4A16_BF16_GEMM_MIN_M (0: off), read per call
constexpr int64_t kW4BfKCP = 512;      // k pairs per K block (48 rows x 512 x 4 B = 96 KB widened, in L2)
constexpr int64_t kW4BfTaskRows = 48;  // weight rows per task
constexpr int64_t kW4BfBlockRows = 64;  // rows of x per packed block (4 vectors of 16)

// Groups from 32 weights (16 pairs): each group ends in a fold of NR x MV totals, which below
// that costs more than the products (4096x4096 M = 16 / 64, against the fp32 paths: g = 16
// 0.48 / 1.44x, g = 8 0.39 / 0.58x; g = 32 1.26 / 1.96x, g = 64 2.15 / 2.56x).
// FASTKERN_W4A16_BF16_GEMM_MIN_G moves the bound (A/B, tests), read per call.
constexpr int64_t kW4BfGemmMinG = 32;

inline bool use_w4_bf16_gemm(int64_t M, int64_t g) {
  const int64_t min_m = env_knob("FASTKERN_W4A16_BF16_GEMM_MIN_M", kW4BfGemmMinM);
  return min_m > 0 && M >= min_m && g >= env_knob("FASTKERN_W4A16_BF16_GEMM_MIN_G", kW4BfGemmMinG);
}

// At M = 16 j + r, r = 1..kW4BfTailRows, the GEMM's tiles take the first 16 j rows and a GEMV
// within it the last r (w4b_tail_block: against each widened weight block after its tiles, so
// the weight is read and widened once): the 16-row vectors computed M = 17 as 32 rows,
// widening included. First the r rows were a call of their own (the limbs, r <= 4, from 1M
// weight elements), which read the weight a second time. Measured (2 threads, weights beyond
// L3, bf16 x, g = 128, one process, 5-9 alternating rounds, median ms, within / a call of
// their own / the tiles on all rows): 4096 x 4096 M = 17 1.86 / 1.85 / 3.00, 20 2.14 / 2.29 /
// 3.02, 23 2.53 / 2.86 / 3.06, 24 2.61 / 2.89 / 3.03, 25 2.59 / 3.03 / 2.91, 26 2.71 / 3.15 /
// 2.91, 27 2.77 / 3.30 / 2.90, 28 2.94 / 3.43 / 2.92, 40 3.95 / 4.23 / 4.23, 44 4.27 / 4.69 /
// 4.15; 11008 x 4096 M = 17 4.83 / 5.11 / 7.78, 20 5.49 / 5.92 / 7.77, 23 6.42 / 7.09 / 7.80,
// 24 6.78 / 7.61 / 7.94, 25 6.92 / 7.96 / 7.65, 26 7.27 / 8.28 / 7.67, 27 7.53 / 8.63 / 7.71, 28
// 7.86 / 8.93 / 7.71. With the tail's rows of x read in place (8 KiB apart, aliasing in the
// L1) r = 8 had lost at 11008 x 4096 (9.18 against 8.84 for the tiles); packed, r <= 10 win.
// Small weights alike (that in-place form: 1024 x 1024 M = 17 / 20 0.143 / 0.160 against
// 0.202 / 0.202 for the tiles; 384 x 384 M = 17 / 20 / 23 0.032 / 0.035 / 0.042 against 0.041
// / 0.042 / 0.042; 1536 x 384 M = 23 0.183 against 0.203): any size. Groups of a multiple of
// 32 weights only (whole 16-pair vectors per group); others keep the tiles on all rows.
// FASTKERN_W4A16_BF16_GEMV_TAIL (rows up to kW4BfTailCap, 0: off; read per call) sets
// the rows.
constexpr int64_t kW4BfTailRows = 10;
constexpr int64_t kW4BfTailCap = 12;  // the most the knob may ask for (w4b_tail_block's cases)
int64_t w4_bf16_tail_rows(int64_t M, int64_t g) {
  const int64_t r = tiles::gemv_tail_rows(M, "FASTKERN_W4A16_BF16_GEMV_TAIL", kW4BfTailRows, true);
  return g % 32 == 0 && r <= kW4BfTailCap ? r : 0;
}

// Rows [m0, m0 + w) of x (bf16, row stride ldx elements; zero from row M on), k pairs [k0, k1)
// -> dst[kp * w + r] (dst: the block's [K/2][w] words). A pair of bf16 is the 32-bit word it
// occupies in x, so this is a transpose of words. Returns false if a value is NaN, inf or
// beyond kW4MaxX (bf16 magnitudes order as their bits: one unsigned compare).
// The lanes of v (32 bf16) that hold NaN, inf or a value beyond kW4MaxX (bf16 magnitudes order
// as their bits: one unsigned compare)
FASTKERN_AVX512BF16 inline __mmask32 w4_bf16_beyond(__m512i v) {
  return _mm512_cmpgt_epu16_mask(_mm512_and_si512(v, _mm512_set1_epi16(0x7FFF)),
                                 _mm512_set1_epi16(int16_t(f32_to_bf16_rne(kW4MaxX))));
}

FASTKERN_AVX512BF16 bool w4_pack_x_bf16_block(const uint16_t* X, int64_t ldx, int64_t M, int64_t m0, int64_t w,
                                              int64_t k0, int64_t k1, uint32_t* dst) {
  alignas(64) uint32_t t[kW4BfBlockRows][16];
  const int64_t rows = std::min<int64_t>(w, M - m0);
  __mmask32 bad = 0;
  for (int64_t kk = k0; kk < k1; kk += 16) {
    const int64_t n = std::min<int64_t>(16, k1 - kk);  // pairs in this step
    const __mmask32 mk = n == 16 ? ~__mmask32(0) : (__mmask32(1) << (2 * n)) - 1;
    for (int64_t r = 0; r < w; ++r) {
      __m512i v = _mm512_setzero_si512();
      if (r < rows) {
        v = _mm512_maskz_loadu_epi16(mk, X + (m0 + r) * ldx + 2 * kk);
        bad |= w4_bf16_beyond(v);
      }
      _mm512_store_si512(t[r], v);
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < w; ++r) dst[(kk + i) * w + r] = t[r][i];
  }
  return bad == 0;
}

// x -> bf16 pairs per block of 64 rows (above), in parallel. Returns false if x holds NaN,
// inf or a value beyond kW4MaxX.
bool w4_pack_x_bf16(const uint16_t* X, int64_t ldx, int64_t M, int64_t K, uint32_t* ap) {
  const int64_t KP = K / 2, Mp = round_up(M, 16), nmb = (Mp + kW4BfBlockRows - 1) / kW4BfBlockRows;
  constexpr int64_t kChunk = 256;  // k pairs per work item
  const int64_t nkc = (KP + kChunk - 1) / kChunk;
  std::atomic<bool> ok{true};
  at::parallel_for(0, nmb * nkc, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t mb = it / nkc, k0 = (it % nkc) * kChunk, k1 = std::min(KP, k0 + kChunk);
      const int64_t m0 = mb * kW4BfBlockRows, w = std::min<int64_t>(kW4BfBlockRows, Mp - m0);
      if (!w4_pack_x_bf16_block(X, ldx, M, m0, w, k0, k1, ap + m0 * KP)) ok = false;
    }
  });
  return ok;
}

// dst[r * ldd + (kp - kp0)] = (bf16(q_lo - z), bf16(q_hi - z)) of weight byte kp of row
// n0 + r, for kp in [kp0, kp1); and into L2 the next block's bytes: pf_rows rows of
// pf_bytes from pf (row stride ldw), one row per row widened
FASTKERN_AVX512BF16 void w4_widen_bf16(const W4& p, int64_t n0, int64_t n1, int64_t kp0, int64_t kp1, uint32_t* dst,
                                      int64_t ldd, const uint8_t* pf, int64_t pf_rows, int64_t pf_bytes) {
  const int64_t hb = p.g / 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = p.w + n * p.ldw;
    uint32_t* d = dst + (n - n0) * ldd - kp0;
    if (n - n0 < pf_rows)
      for (int64_t c = 0; c < pf_bytes; c += 64)
        _mm_prefetch(reinterpret_cast<const char*>(pf + (n - n0) * p.ldw + c), _MM_HINT_T1);
    int64_t kp = kp0;
    while (kp < kp1) {
      const int64_t gi = kp / hb, ge = std::min(kp1, (gi + 1) * hb);
      const float z = float(p.z[n * p.G + gi]);
      // words 0..15 and 16..31: bf16(i - z)
      const __m512 f = _mm512_sub_ps(iota, _mm512_set1_ps(z));
      const __m512i tbl = cvt_bf16x32(f, f);
      for (; kp + 16 <= ge; kp += 16) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kp)));
        // word 2i = byte & 15, word 2i + 1 = byte >> 4
        const __m512i idx = _mm512_and_si512(_mm512_or_si512(b, _mm512_slli_epi32(b, 12)), nib);
        _mm512_storeu_si512(d + kp, _mm512_permutexvar_epi16(idx, tbl));
      }
      for (; kp < ge; ++kp) {
        const uint8_t byte = src[kp];
        d[kp] = uint32_t(f32_to_bf16_rne(float(byte & 15) - z)) | (uint32_t(f32_to_bf16_rne(float(byte >> 4) - z)) << 16);
      }
    }
  }
}

// CT[j][16 v + lane] += the groups' scaled dot products of weight rows j < NR (widened, B,
// stride ldb, word 0 = pair kp0) with MV vectors of 16 rows of x (Ap: [kp][w] words) over k
// pairs [kp0, kp1); sw: the rows' scales (row stride G), hb pairs per group. The dot
// products of a group run in NR x MV registers (independent vdpbf16ps chains) and are
// folded into CT (in L1 at small M) with the group's scale at its end.
template <int NR, int MV>
FASTKERN_AVX512BF16 void w4b_gemm_tile(const uint32_t* Ap, int64_t w, const uint32_t* B, int64_t ldb, int64_t kp0,
                                       int64_t kp1, const float* sw, int64_t G, int64_t hb, float* CT, int64_t ldct) {
  // U accumulators per output over alternating k pairs for a single vector of x, where the
  // 6 x 1 tile's 6 chains would leave vdpbf16ps (latency ~6 cycles, two per cycle) waiting.
  // U depends on MV only (the rows of x, not the tile's weight rows, which depend on where a
  // thread's rows start), so each output's summation order is the same for any thread split.
  constexpr int U = MV == 1 ? 2 : 1;
  for (int64_t a = kp0; a < kp1;) {
    const int64_t gi = a / hb, e = std::min(kp1, (gi + 1) * hb);
    __m512 dot[U][NR][MV];
    for (int u = 0; u < U; ++u)
      for (int j = 0; j < NR; ++j)
        for (int v = 0; v < MV; ++v) dot[u][j][v] = _mm512_setzero_ps();
    const uint32_t* xp = Ap + a * w;
    const uint32_t* bp = B + (a - kp0);
    auto step = [&](int u) FASTKERN_AVX512BF16 {
      __m512i x[MV];
      for (int v = 0; v < MV; ++v) x[v] = _mm512_loadu_si512(xp + 16 * v);
      for (int j = 0; j < NR; ++j) {
        const __m512i b = _mm512_set1_epi32(int(bp[j * ldb]));
        for (int v = 0; v < MV; ++v) dot[u][j][v] = dpbf16_inplace(dot[u][j][v], x[v], b);
      }
      xp += w;
      ++bp;
    };
    int64_t kp = a;
    for (; kp + U <= e; kp += U)
      for (int u = 0; u < U; ++u) step(u);
    for (int u = 0; kp < e; ++kp, ++u) step(u);
    for (int j = 0; j < NR; ++j) {
      const __m512 s = _mm512_set1_ps(sw[j * G + gi]);
      for (int v = 0; v < MV; ++v) {
        __m512 d = dot[0][j][v];
        for (int u = 1; u < U; ++u) d = _mm512_add_ps(d, dot[u][j][v]);
        float* c = CT + j * ldct + 16 * v;
        _mm512_storeu_ps(c, _mm512_fmadd_ps(d, s, _mm512_loadu_ps(c)));
      }
    }
    a = e;
  }
}

// Weight rows: 6 at a time (24 accumulators at MV = 4), then 4, 2, 1.
template <int MV>
void w4b_gemm_rows(const uint32_t* Ap, int64_t w, const uint32_t* B, int64_t ldb, int64_t rows, int64_t kp0,
                   int64_t kp1, const float* sw, int64_t G, int64_t hb, float* CT, int64_t ldct) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6)
    w4b_gemm_tile<6, MV>(Ap, w, B + r * ldb, ldb, kp0, kp1, sw + r * G, G, hb, CT + r * ldct, ldct);
  if (r + 4 <= rows) {
    w4b_gemm_tile<4, MV>(Ap, w, B + r * ldb, ldb, kp0, kp1, sw + r * G, G, hb, CT + r * ldct, ldct);
    r += 4;
  }
  if (r + 2 <= rows) {
    w4b_gemm_tile<2, MV>(Ap, w, B + r * ldb, ldb, kp0, kp1, sw + r * G, G, hb, CT + r * ldct, ldct);
    r += 2;
  }
  if (r < rows) w4b_gemm_tile<1, MV>(Ap, w, B + r * ldb, ldb, kp0, kp1, sw + r * G, G, hb, CT + r * ldct, ldct);
}

// The GEMM's last rows of x (w4_bf16_tail_rows) by a GEMV within it: against each widened
// block of a task's rows after the block's tiles (in L2), r rows of x as they are (a row of
// bf16 is KP words of pairs), each output's per-group dot products (16 pairs a lane vector)
// folded with the group's scale into a lane vector tot[row][i] kept over the K blocks, summed
// across lanes at the task's end: the products exact as in the tiles, the fp32 sums in
// another order. Groups of a multiple of 32 weights (whole 16-pair vectors per group).
// R rows of x (X: packed as [pair / 16][R][16 words], from pair kp0, so that the rows never
// alias in the L1 as rows 8 KiB apart do) against NR widened rows (B, stride ldb, word 0 = pair
// kp0) over pairs [kp0, kp1): tot[(j * R + i) * 16 ..] += the groups' scaled dot products
// (stored where first).
template <int R, int NR>
FASTKERN_AVX512BF16 void w4b_tail_tile(const uint32_t* X, const uint32_t* B, int64_t ldb, int64_t kp0, int64_t kp1,
                                       const float* sw, int64_t G, int64_t hb, float* tot, bool first) {
  __m512 t[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) t[j][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(tot + (j * R + i) * 16);
  for (int64_t a = kp0; a < kp1;) {
    const int64_t gi = a / hb, e = std::min(kp1, (gi + 1) * hb);
    __m512 d[NR][R];
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < R; ++i) d[j][i] = _mm512_setzero_ps();
    for (int64_t kp = a; kp < e; kp += 16) {
      __m512i bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = _mm512_loadu_si512(B + j * ldb + (kp - kp0));
      for (int i = 0; i < R; ++i) {
        const __m512i xv = _mm512_loadu_si512(X + ((kp - kp0) / 16 * R + i) * 16);
        for (int j = 0; j < NR; ++j) d[j][i] = dpbf16_inplace(d[j][i], xv, bv[j]);
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m512 sv = _mm512_set1_ps(sw[j * G + gi]);
      for (int i = 0; i < R; ++i) t[j][i] = _mm512_fmadd_ps(d[j][i], sv, t[j][i]);
    }
    a = e;
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < R; ++i) _mm512_storeu_ps(tot + (j * R + i) * 16, t[j][i]);
}


template <int R>
void w4b_tail_block_r(const uint32_t* X, const uint32_t* B, int64_t ldb, int64_t rows, int64_t kp0, int64_t kp1,
                      const float* sw, int64_t G, int64_t hb, float* tot, bool first) {
  constexpr int NR = R <= 4 ? 2 : 1;
  int64_t j = 0;
  for (; j + NR <= rows; j += NR)
    w4b_tail_tile<R, NR>(X, B + j * ldb, ldb, kp0, kp1, sw + j * G, G, hb, tot + j * R * 16, first);
  for (; j < rows; ++j) w4b_tail_tile<R, 1>(X, B + j * ldb, ldb, kp0, kp1, sw + j * G, G, hb, tot + j * R * 16, first);
}
// X: all of the tail's packed rows (from pair 0)
void w4b_tail_block(int64_t r, const uint32_t* X, const uint32_t* B, int64_t ldb, int64_t rows, int64_t kp0,
                    int64_t kp1, const float* sw, int64_t G, int64_t hb, float* tot, bool first) {
  X += kp0 * r;
  with_rows<kW4BfTailCap>(r, [&](auto R) {
    w4b_tail_block_r<decltype(R)::value>(X, B, ldb, rows, kp0, kp1, sw, G, hb, tot, first);
  });
}

// Y[i][n0 + j] (row stride N) = bf16(sum of tot[(j * r + i) * 16 ..] + b[n0 + j]) for the r tail
// rows and weight rows j < rows, rounded as the tiles' outputs are (transpose_out)
FASTKERN_AVX512BF16 void w4b_tail_out(const float* tot, int64_t r, int64_t rows, int64_t n0, const float* b,
                                      uint16_t* Y, int64_t N) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j0 = 0; j0 < rows; j0 += 16) {
      const int64_t nn = std::min<int64_t>(16, rows - j0);
      alignas(64) float v[16] = {};
      for (int64_t j = 0; j < nn; ++j) v[j] = _mm512_reduce_add_ps(_mm512_loadu_ps(tot + ((j0 + j) * r + i) * 16));
      __m512 y = _mm512_load_ps(v);
      if (b) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << nn) - 1u), b + n0 + j0));
      _mm256_mask_storeu_epi16(Y + i * N + n0 + j0, static_cast<__mmask16>((1u << nn) - 1u),
                               (__m256i)_mm512_cvtneps_pbh(y));
    }
}

// Rows [0, r) of bf16 x (rows of KP words, KP a multiple of 16) into xt as [pair / 16][r][16
// words] (w4b_tail_tile); false if they hold NaN, inf or a value beyond kW4MaxX (as
// w4_pack_x_bf16)
FASTKERN_AVX512BF16 bool w4_pack_tail_bf16(const uint32_t* X, int64_t r, int64_t KP, uint32_t* xt) {
  __mmask32 bad = 0;
  for (int64_t i = 0; i < r; ++i)
    for (int64_t v = 0; v < KP / 16; ++v) {
      const __m512i x = _mm512_loadu_si512(X + i * KP + v * 16);
      bad |= w4_bf16_beyond(x);
      _mm512_storeu_si512(xt + (v * r + i) * 16, x);
    }
  return bad == 0;
}

// Y [M, N] (bf16) = x (bf16, contiguous rows of K) x ((q - z) * s)^T + b[n] (if b), rounded once;
// the last `tail` rows (w4_bf16_tail_rows) by the GEMV within it.
// Returns false (Y untouched) if x holds NaN, inf or values beyond kW4MaxX.
bool w4b_gemm_bf16(const W4& p, const uint16_t* X, int64_t M_all, int64_t N, const float* b, uint16_t* Y,
                   int64_t tail = 0) {
  const int64_t M = M_all - tail;
  const int64_t K = 2 * p.ldw, KP = p.ldw, Mp = round_up(M, 16), hb = p.g / 2;
  TORCH_INTERNAL_ASSERT(tail >= 0 && tail <= kW4BfTailCap && (tail == 0 || hb % 16 == 0), "w4b_gemm_bf16: tail ", tail);
  Scratch xts(ScratchSlot::XQuant, size_t(tail * KP) * 4);
  uint32_t* xt = xts.as<uint32_t>();
  if (tail > 0 && !w4_pack_tail_bf16(reinterpret_cast<const uint32_t*>(X + M * K), tail, KP, xt)) return false;
  // thread-kept scratch (scratch.h): no page faults per call
  Scratch apt(ScratchSlot::XPack, size_t(Mp * KP) * 4);
  uint32_t* ap = apt.as<uint32_t>();
  if (!w4_pack_x_bf16(X, K, M, K, ap)) return false;
  const int64_t KCP = std::min(kW4BfKCP, KP), ldb = KCP + 16;  // + 64 B: rows off 4 KiB strides
  parallel_rows(N, 16, 1, [&](int64_t r0, int64_t r1) {
    Scratch wbs(ScratchSlot::Worker1, size_t(kW4BfTaskRows * ldb) * 4);
    Scratch cts(ScratchSlot::Worker0, size_t(kW4BfTaskRows * Mp) * 4);
    Scratch tts(ScratchSlot::Small, size_t(kW4BfTaskRows * tail * 16) * 4);
    uint32_t* wb = wbs.as<uint32_t>();
    float* ct = cts.as<float>();
    float* tt = tts.as<float>();
    for (int64_t n0 = r0; n0 < r1; n0 += kW4BfTaskRows) {
      const int64_t n1 = std::min(r1, n0 + kW4BfTaskRows), rows = n1 - n0;
      std::fill(ct, ct + rows * Mp, 0.f);
      for (int64_t kp0 = 0; kp0 < KP; kp0 += KCP) {
        const int64_t kp1 = std::min(KP, kp0 + KCP);
        // the next block's bytes into L2 while this one is widened: the next K block of these
        // rows, or the next task's first
        if (kp1 < KP)
          w4_widen_bf16(p, n0, n1, kp0, kp1, wb, ldb, p.w + n0 * p.ldw + kp1, rows, std::min(KCP, KP - kp1));
        else
          w4_widen_bf16(p, n0, n1, kp0, kp1, wb, ldb, p.w + n1 * p.ldw, std::min(kW4BfTaskRows, r1 - n1), KCP);
        for (int64_t m0 = 0; m0 < Mp; m0 += kW4BfBlockRows) {
          const int64_t w = std::min<int64_t>(kW4BfBlockRows, Mp - m0);
          const uint32_t* a = ap + m0 * KP;
          const float* sw = p.s + n0 * p.G;
          switch (w / 16) {
            case 1: w4b_gemm_rows<1>(a, w, wb, ldb, rows, kp0, kp1, sw, p.G, hb, ct + m0, Mp); break;
            case 2: w4b_gemm_rows<2>(a, w, wb, ldb, rows, kp0, kp1, sw, p.G, hb, ct + m0, Mp); break;
            case 3: w4b_gemm_rows<3>(a, w, wb, ldb, rows, kp0, kp1, sw, p.G, hb, ct + m0, Mp); break;
            default: w4b_gemm_rows<4>(a, w, wb, ldb, rows, kp0, kp1, sw, p.G, hb, ct + m0, Mp); break;
          }
        }
        if (tail > 0) w4b_tail_block(tail, xt, wb, ldb, rows, kp0, kp1, p.s + n0 * p.G, p.G, hb, tt, kp0 == 0);
      }
      tiles::transpose_strip(ct, Mp, M, rows, Y + n0, N, nullptr, b ? b + n0 : nullptr);
      if (tail > 0) w4b_tail_out(tt, tail, rows, n0, b, Y + M * N, N);
    }
  });
  return true;
}
#endif

// ------------------------------------------------------------------ GEMM: int8 x nibbles (AVX-512 VNNI, linear_w4a8)
//
// linear_w4a8 from kW4QGemmMinM rows of x (kW4QNibGemmMinM with the nibble tiles below; AVX-512
// VNNI, or AVX2): a GEMM whose vector lanes run
// along x's rows (the layout of the bf16 GEMM above), so a group's weight scale and zero point
// are one broadcast per weight row, applied to 16 rows of x at once. The limb GEMV's lanes run
// along K instead, and at M >= 16 its per-group fold (one convert, multiply and FMA per output
// and group) cost as much as its products. Here x is quantized per token into int8 quads
// ([k / 4][16 rows] dwords per 16-row vector, ap), with each group's sum of the quantized
// values per row (xs); a register tile of NR weight rows x MV vectors of x takes
// vpdpbusd(u8 weight quad broadcast, s8 x quads) into int32 per group. With VNNI and groups of
// a multiple of 8 the tile masks each dword of canonical nibbles into two quads (w4q_tile_nib);
// otherwise, and on AVX2, the nibbles are unpacked to bytes per task of weight rows and K block
// (w4q_widen) first. At the group's end
// t = D - z * xs (exact in fp32 while both are under 2^24: groups up to 8806 weights) is
// folded as CT += t * s_w; the token scale multiplies the result rows afterwards. K blocks hold
// whole groups (a group's zero point is taken once). Groups of a multiple of 4 weights.
// Measured (2 threads, g = 128, weights beyond L3, one process, alternating; ms, GEMM against the
// one-limb GEMV): 11008 x 4096 M = 8 / 16 / 32 / 64 / 256: 3.7 / 3.6 / 5.5 / 9.6 / 34.4 against
// 2.3 / 4.3 / 8.3 / 16.8 / 73-80; 4096 x 14336 M = 8 / 16 / 64 / 256: 4.8 / 4.9 / 13.1 / 44.7
// against 3.0 / 5.7 / 22.6 / 90. AVX2 (6-row tiles below): 11008 x 4096 M = 16 / 64 / 256: 5.1 /
// 13.6 / 47.5 against 5.1-5.9 / 19.1 / 83; 4096 x 14336 6.2 / 17.3 / 62.6 against 7.0-8.3 / 35.7 /
// 146; M = 8 (2-row tiles) 5.3-5.9 against 2.7-3.3. With the prefetch below, M = 12 / 8 (VNNI,
// 11008 x 4096 and 4096 x 14336): 3.3-3.5 / 4.4 against 3.5-3.8 / 4.4-4.8, and 3.4-3.5 / 4.5
// against 2.8-3.6; AVX2 M = 12: 3.8-3.9 / 5.1 against 4.0-4.5 / 5.1-5.2. So from M = 12 on both
// (those figures predate the nibble tiles).
// The nibble tiles (w4q_tile_nib; M <= 8 on one 8-row vector) from M = 6: against the GEMV (one
// process, alternating, ms, 4096^2 / 11008 x 4096 / 4096 x 14336) M = 4 0.67 / 1.71 / 2.35 against
// 0.47 / 1.15 / 1.64, M = 6 0.67 / 1.73 / 2.40 against 0.72 / 1.82 / 2.43, M = 8 0.70 / 1.74 /
// 2.45 against 0.85 / 2.17 / 2.90.
constexpr int64_t kW4QGemmMinM = 12;     // FASTKERN_W4A8_GEMM_MIN_M (0: off), read per call
constexpr int64_t kW4QNibGemmMinM = 6;   // with the nibble tiles (the same knob)
constexpr int64_t kW4QKC = 1024;         // weights of K per block (48 rows x 1 KB unpacked, in L2)
constexpr int64_t kW4QTaskRows = 48;     // weight rows per task
constexpr int64_t kW4QBlockRows = 64;    // rows of x per packed block (4 vectors of 16)

// the nibble tiles: AVX-512 VNNI, groups of a multiple of 8 (FASTKERN_W4A8_GEMM_NIBBLES=0: the
// unpacked bytes, for tests and A/B timing)
inline bool w4q_nibbles(bool v512, int64_t g) {
  return v512 && g % 8 == 0 && env_knob("FASTKERN_W4A8_GEMM_NIBBLES", 1) != 0;
}

// nib: w4q_nibbles()
inline bool use_w4q_gemm(int64_t M, int64_t g, bool nib) {
  const int64_t min_m = env_knob("FASTKERN_W4A8_GEMM_MIN_M", nib ? kW4QNibGemmMinM : kW4QGemmMinM);
  return min_m > 0 && M >= min_m && g % 4 == 0 && g <= 8192;
}

#if FASTKERN_X86
// The nibble tile's vectors of x rows: 16 (zmm) or, for M <= 8, 8 (ymm: half the products of a
// zmm tile where half its lanes would be padding).
struct NibZ {
  using I = __m512i;
  using F = __m512;
  static constexpr int L = 16;
  FASTKERN_AVX512VNNI static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  FASTKERN_AVX512VNNI static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  FASTKERN_AVX512VNNI static I zero() { return _mm512_setzero_si512(); }
  FASTKERN_AVX512VNNI static I band(I a, I b) { return _mm512_and_si512(a, b); }
  FASTKERN_AVX512VNNI static I srl16(I a) { return _mm512_srli_epi16(a, 4); }
  FASTKERN_AVX512VNNI static I sra32(I a) { return _mm512_srai_epi32(a, 4); }
  FASTKERN_AVX512VNNI static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  FASTKERN_AVX512VNNI static I dp(I acc, I a, I b) { return dpbusd_inplace(acc, a, b); }
  FASTKERN_AVX512VNNI static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  FASTKERN_AVX512VNNI static F fset1(float v) { return _mm512_set1_ps(v); }
  FASTKERN_AVX512VNNI static F fload(const float* p) { return _mm512_loadu_ps(p); }
  FASTKERN_AVX512VNNI static void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
  FASTKERN_AVX512VNNI static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  FASTKERN_AVX512VNNI static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
};
struct NibY {
  using I = __m256i;
  using F = __m256;
  static constexpr int L = 8;
  FASTKERN_AVX512VNNI static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  FASTKERN_AVX512VNNI static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  FASTKERN_AVX512VNNI static I zero() { return _mm256_setzero_si256(); }
  FASTKERN_AVX512VNNI static I band(I a, I b) { return _mm256_and_si256(a, b); }
  FASTKERN_AVX512VNNI static I srl16(I a) { return _mm256_srli_epi16(a, 4); }
  FASTKERN_AVX512VNNI static I sra32(I a) { return _mm256_srai_epi32(a, 4); }
  FASTKERN_AVX512VNNI static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  FASTKERN_AVX512VNNI static I dp(I acc, I a, I b) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));  // as dpbusd_inplace
    return acc;
  }
  FASTKERN_AVX512VNNI static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  FASTKERN_AVX512VNNI static F fset1(float v) { return _mm256_set1_ps(v); }
  FASTKERN_AVX512VNNI static F fload(const float* p) { return _mm256_loadu_ps(p); }
  FASTKERN_AVX512VNNI static void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
  FASTKERN_AVX512VNNI static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  FASTKERN_AVX512VNNI static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
};

// A group's end in the VNNI tiles: CT[j][L v + lane] += (float(D) - z * xs) * s_w for weight
// rows j < NR and vectors v < MV of x rows (D: the group's exact int32 sums).
template <class V, int NR, int MV>
FASTKERN_AVX512VNNI inline void w4q_fold(const typename V::I (&d)[NR][MV], const float* sw, const uint8_t* zw,
                                         int64_t G, int64_t gi, const float* xs, int64_t Mp, float* CT,
                                         int64_t ldct) {
  for (int j = 0; j < NR; ++j) {
    const typename V::F s = V::fset1(sw[j * G + gi]), z = V::fset1(float(zw[j * G + gi]));
    for (int v = 0; v < MV; ++v) {
      const typename V::F t = V::fnmadd(z, V::fload(xs + gi * Mp + V::L * v), V::cvt(d[j][v]));
      float* c = CT + j * ldct + V::L * v;
      V::fstore(c, V::fmadd(t, s, V::fload(c)));
    }
  }
}

// CT[j][16 v + lane] += the groups' folded sums of weight rows j < NR (widened bytes B, row
// stride ldb bytes, byte 0 = quad kq0) with MV vectors of 16 rows of x (Ap: [kq][w] quads of
// the block, from quad 0) over quads [kq0, kq1), groups of gq quads; sw / zw the rows' scales
// and zero points (row stride G), xs the block's group sums (row stride Mp).
template <int NR, int MV>
FASTKERN_AVX512VNNI void w4q_tile(const int32_t* Ap, int64_t w, const uint8_t* B, int64_t ldb, int64_t kq0,
                                  int64_t kq1, const float* sw, const uint8_t* zw, int64_t G, int64_t gq,
                                  const float* xs, int64_t Mp, float* CT, int64_t ldct) {
  for (int64_t a = kq0; a < kq1;) {
    const int64_t gi = a / gq, e = std::min(kq1, (gi + 1) * gq);
    __m512i acc[NR][MV];
    for (int j = 0; j < NR; ++j)
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_setzero_si512();
    const int32_t* xp = Ap + a * w;
    const uint8_t* bp = B + 4 * (a - kq0);
    for (int64_t kq = a; kq < e; ++kq, xp += w, bp += 4) {
      __m512i x[MV];
      for (int v = 0; v < MV; ++v) x[v] = _mm512_loadu_si512(xp + 16 * v);
      for (int j = 0; j < NR; ++j) {
        int32_t wq;
        std::memcpy(&wq, bp + j * ldb, 4);
        const __m512i b = _mm512_set1_epi32(wq);
        for (int v = 0; v < MV; ++v) acc[j][v] = dpbusd_inplace(acc[j][v], b, x[v]);
      }
    }
    w4q_fold<NibZ, NR, MV>(acc, sw, zw, G, gi, xs, Mp, CT, ldct);
    a = e;
  }
}

// Weight rows: 6 at a time (24 accumulators at MV = 4), then 4, 2, 1.
template <int MV>
void w4q_rows(const int32_t* Ap, int64_t w, const uint8_t* B, int64_t ldb, int64_t rows, int64_t kq0, int64_t kq1,
              const float* sw, const uint8_t* zw, int64_t G, int64_t gq, const float* xs, int64_t Mp, float* CT,
              int64_t ldct) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6)
    w4q_tile<6, MV>(Ap, w, B + r * ldb, ldb, kq0, kq1, sw + r * G, zw + r * G, G, gq, xs, Mp, CT + r * ldct, ldct);
  if (r + 4 <= rows) {
    w4q_tile<4, MV>(Ap, w, B + r * ldb, ldb, kq0, kq1, sw + r * G, zw + r * G, G, gq, xs, Mp, CT + r * ldct, ldct);
    r += 4;
  }
  if (r + 2 <= rows) {
    w4q_tile<2, MV>(Ap, w, B + r * ldb, ldb, kq0, kq1, sw + r * G, zw + r * G, G, gq, xs, Mp, CT + r * ldct, ldct);
    r += 2;
  }
  if (r < rows)
    w4q_tile<1, MV>(Ap, w, B + r * ldb, ldb, kq0, kq1, sw + r * G, zw + r * G, G, gq, xs, Mp, CT + r * ldct, ldct);
}

// w4q_tile over the canonical nibbles themselves (no unpacking pass): B the weight rows' packed
// bytes from k = 0 (row stride ldb = K / 2), x packed split (w4q_pack_x). One dword holds 8
// weights: its low nibbles (& 0x0F) are the even k's quad, its high nibbles (>> 4, & 0x0F) the
// odd k's, each against its own quad of x; groups of a multiple of 8 weights. H16: the high
// nibbles taken in place (& 0xF0, one operation instead of two: 16 times their values) into
// accumulators of their own, shifted back exactly at the group's end (|16 D| < 2^31 for groups
// up to 8192). Against the unpacking pass and w4q_tile (one process, alternating, 2 threads, ms,
// weights beyond L3): 4096^2 M = 16 / 32 / 64 / 128 / 256 1.08 / 1.64 / 2.99 / 6.0 / 11.8 against
// 1.19 / 1.81 / 3.42 / 6.7 / 13.2; 11008 x 4096 M = 16 / 32 / 64 / 256 2.67 / 4.71 / 8.9 / 30.3
// against 2.96 / 5.39 / 10.4 / 34.0. The masks cost less than the pass's stores and second
// broadcast per weight quad. Tried, not kept, for M <= 16: lanes along 16 weight rows (the
// canonical rows transposed per task into [dword][16 rows] panels, two masks per 64-byte load
// serving every row of x, each x quad broadcast): 1.07-1.34x the time of these tiles at M = 4..16
// (4096^2, 11008 x 4096, 4096 x 14336): one broadcast per dot product cost more than the masks.
template <class V, int NR, int MV, bool H16>
FASTKERN_AVX512VNNI void w4q_tile_nib(const int32_t* Ap, int64_t w, const uint8_t* B, int64_t ldb, int64_t kq0,
                                      int64_t kq1, const float* sw, const uint8_t* zw, int64_t G, int64_t gq,
                                      const float* xs, int64_t Mp, float* CT, int64_t ldct, LinePrefetch& pf) {
  using I = typename V::I;
  constexpr int L = V::L;
  const I m4 = V::set1(0x0F0F0F0F), m4h = V::set1(int32_t(0xF0F0F0F0u));
  constexpr int NA = H16 ? 2 : 1;
  for (int64_t a = kq0; a < kq1;) {
    const int64_t gi = a / gq, e = std::min(kq1, (gi + 1) * gq);
    I acc[NA][NR][MV];
    for (int h = 0; h < NA; ++h)
      for (int j = 0; j < NR; ++j)
        for (int v = 0; v < MV; ++v) acc[h][j][v] = V::zero();
    const int32_t* xp = Ap + a * w;
    const uint8_t* bp = B + 2 * a;
    for (int64_t kq = a; kq < e; kq += 2, xp += 2 * w, bp += 4) {
      if (((kq - kq0) / 2 & pf.mask) == 0) pf.one();
      I xe[MV], xo[MV];
      for (int v = 0; v < MV; ++v) {
        xe[v] = V::load(xp + L * v);
        xo[v] = V::load(xp + w + L * v);
      }
      for (int j = 0; j < NR; ++j) {
        int32_t wq;
        std::memcpy(&wq, bp + j * ldb, 4);
        const I b = V::set1(wq);
        const I lo = V::band(b, m4);
        const I hi = H16 ? V::band(b, m4h) : V::band(V::srl16(b), m4);
        for (int v = 0; v < MV; ++v) {
          acc[0][j][v] = V::dp(acc[0][j][v], lo, xe[v]);
          acc[NA - 1][j][v] = V::dp(acc[NA - 1][j][v], hi, xo[v]);
        }
      }
    }
    if (H16)
      for (int j = 0; j < NR; ++j)
        for (int v = 0; v < MV; ++v) acc[0][j][v] = V::add(acc[0][j][v], V::sra32(acc[NA - 1][j][v]));
    w4q_fold<V, NR, MV>(acc[0], sw, zw, G, gi, xs, Mp, CT, ldct);
    a = e;
  }
}

// Weight rows per nibble tile, as measured (VNNI, 2 threads, one process, alternating, ms at
// 4096^2 / 11008 x 4096): MV = 1 8 rows with H16 1.09 / 2.70 against 1.20 / 3.09 without (and
// 1.11-1.13 / 2.70-2.81 with 4 or 6 rows, 1.20 / 3.01 with 12); MV = 2 6, 4 and 8 rows within 3%
// (H16 too); MV = 3 6 or 4 rows within the noise (5 up to 3% slower); MV = 4 4 or 5 rows, 3 and
// 6 8-15% slower. The accumulators (twice NR x MV with H16), the 2 MV vectors of x, the
// broadcast, its nibbles and the masks stay within the 32 zmm registers.
template <int MV>
constexpr int kW4QNibRows = MV == 1 ? 8 : MV == 4 ? 4 : 6;

// The tiles of `rows` weight rows, NR rows per tile and then 4, 2 and 1: f(nr, first row) for each.
template <int NR, class F>
inline void w4q_nib_row_tiles(int64_t rows, const F& f) {
  int64_t r = 0;
  for (; r + NR <= rows; r += NR) f(std::integral_constant<int, NR>(), r);
  if (NR > 4 && r + 4 <= rows) f(std::integral_constant<int, 4>(), r), r += 4;
  if (r + 2 <= rows) f(std::integral_constant<int, 2>(), r), r += 2;
  if (r < rows) f(std::integral_constant<int, 1>(), r);
}

// Weight rows kW4QNibRows at a time (H16 at MV = 1), then 4, 2 and 1; V: the vectors of x; pf:
// the next weight block's lines, spread over the tiles' k steps.
template <class V, int MV>
void w4q_rows_nib(const int32_t* Ap, int64_t w, const uint8_t* B, int64_t ldb, int64_t rows, int64_t kq0,
                  int64_t kq1, const float* sw, const uint8_t* zw, int64_t G, int64_t gq, const float* xs, int64_t Mp,
                  float* CT, int64_t ldct, LinePrefetch& pf) {
  w4q_nib_row_tiles<kW4QNibRows<MV>>(rows, [&](auto nr, int64_t r) {
    w4q_tile_nib<V, decltype(nr)::value, MV, MV == 1>(Ap, w, B + r * ldb, ldb, kq0, kq1, sw + r * G, zw + r * G, G, gq,
                                                  xs, Mp, CT + r * ldct, ldct, pf);
  });
}

// The sum of n int8 values (n a multiple of 4): 32 at a time as unsigned bytes (q + 128) summed
// by vpsadbw, less 128 n.
FASTKERN_AVX2 inline int32_t w4q_sum_i8(const int8_t* q, int64_t n) {
  const __m256i flip = _mm256_set1_epi8(int8_t(0x80));
  __m256i acc = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k)), flip);
    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(v, _mm256_setzero_si256()));
  }
  alignas(32) int64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
  int32_t s = int32_t(t[0] + t[1] + t[2] + t[3] - 128 * k);
  for (; k < n; ++k) s += q[k];
  return s;
}

// Rows of x quantized per token (S: the token scales of w4a8_token_scales) and packed, Mp rows
// (M rounded up to 16, or 8): for block m0 (w = min(64, Mp - m0) rows), ap[m0 * KQ + kq * w + r]
// = the quad k = 4 kq .. 4 kq + 3 of row m0 + r (zero past M); xs[gi * Mp + m] = the sum of row
// m's quantized values in group gi (zero past M). split (the nibble tiles, K % 8 == 0): each 8
// weights' quads hold the even k's, then the odd ones (k = 8c + 0, 2, 4, 6 and 8c + 1, 3, 5, 7),
// the order of a packed dword's low and high nibbles. quantize_per_token's operations:
// round_half_even(x / s) clamped to +-127. Rows of X hold ldx >= round_up(K, 8) floats, zero past
// K. Eight rows at a time, their quads transposed into the packed layout (pack_rows8). AVX2 forms
// of this and of the unpacking (w4q_widen) serve both ISAs: with them the VNNI GEMM at 11008 x
// 4096 took 2.84-2.90 / 33.6-33.8 ms at M = 16 / 256, against 3.24-3.33 / 33.5 with AVX-512
// forms a few minutes earlier (not in one process; these cores run 512-bit operations on 256-bit
// units).
FASTKERN_AVX2 void w4q_pack_x(const float* X, int64_t ldx, int64_t M, int64_t Mp, int64_t K, int64_t g,
                              const float* S, int32_t* ap, float* xs, bool split) {
  const int64_t KQ = K / 4, G = K / g, ldq = round_up(K, 32);
  at::parallel_for(0, Mp / 8, 1, [&](int64_t b, int64_t e) FASTKERN_AVX2 {
    std::vector<int8_t> qv(size_t(8 * ldq));
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    const __m256i perm = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,  //
                                          0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    for (int64_t o = b; o < e; ++o) {
      const int64_t r0 = 8 * o;
      for (int64_t r = 0; r < 8; ++r) {
        const int64_t m = r0 + r;
        int8_t* q = qv.data() + r * ldq;
        std::fill(q, q + ldq, int8_t(0));
        if (m < M) {
          const float* x = X + m * ldx;  // ldx >= round_up(K, 8), zero past K
          const __m256 safe = _mm256_set1_ps(S[m] > 0.f ? S[m] : 1.f);
          for (int64_t k = 0; k < K; k += 8) {
            __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), safe),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i i32 = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
            const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
          }
        }
        for (int64_t gi = 0; gi < G; ++gi) xs[gi * Mp + m] = float(w4q_sum_i8(q + gi * g, g));
        if (split)
          for (int64_t k = 0; k < ldq; k += 32) {
            __m256i* p = reinterpret_cast<__m256i*>(q + k);
            _mm256_storeu_si256(p, _mm256_shuffle_epi8(_mm256_loadu_si256(p), perm));
          }
      }
      const int64_t m0 = r0 / kW4QBlockRows * kW4QBlockRows, w = std::min<int64_t>(kW4QBlockRows, Mp - m0);
      pack_rows8(
          ap + m0 * KQ, w, r0 - m0, 0, KQ, KQ,
          [&](int i, int64_t kq) FASTKERN_AVX2 {
            return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv.data() + i * ldq + 4 * kq));
          },
          [&](int i, int64_t kq) {
            int32_t d;
            std::memcpy(&d, qv.data() + i * ldq + 4 * kq, 4);
            return d;
          });
    }
  });
}

// dst[r * ldb + (k - k0)] = the nibble of weight row n0 + r at k, as a byte, for k in [k0, k1)
// (k0 even; k1 - k0 a multiple of 4); and into L2 the next block's bytes: pf_rows rows of
// pf_bytes from pf (row stride p.ldw), one row per row widened
FASTKERN_AVX2 void w4q_widen(const W4& p, int64_t n0, int64_t n1, int64_t k0, int64_t k1, uint8_t* dst, int64_t ldb,
                             const uint8_t* pf, int64_t pf_rows, int64_t pf_bytes) {
  const __m256i lo = _mm256_set1_epi16(0x000F), hi = _mm256_set1_epi16(0x0F00);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = p.w + n * p.ldw + k0 / 2;
    uint8_t* d = dst + (n - n0) * ldb;
    if (n - n0 < pf_rows)
      for (int64_t c = 0; c < pf_bytes; c += 64)
        _mm_prefetch(reinterpret_cast<const char*>(pf + (n - n0) * p.ldw + c), _MM_HINT_T1);
    int64_t i = 0;
    for (; 2 * i + 32 <= k1 - k0; i += 16) {
      const __m256i t = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * i),
                          _mm256_or_si256(_mm256_and_si256(t, lo), _mm256_and_si256(_mm256_slli_epi16(t, 4), hi)));
    }
    for (; 2 * i < k1 - k0; ++i) {
      d[2 * i] = src[i] & 15;
      d[2 * i + 1] = src[i] >> 4;
    }
  }
}

// The AVX2 tile (no VNNI): NR weight rows x MV vectors of 8 rows of x. vpmaddubsw (u8 weight
// quad broadcast, s8 x quads) gives pairs of products (|pair| <= 2 * 15 * 127 = 3810), summed in
// int16 over up to 8 quads (|sum| <= 30480) and widened by vpmaddwd into the group's int32 sums;
// the fold as in w4q_tile.
template <int NR, int MV>
FASTKERN_AVX2 void w4q_tile_avx2(const int32_t* Ap, int64_t w, const uint8_t* B, int64_t ldb, int64_t kq0,
                                 int64_t kq1, const float* sw, const uint8_t* zw, int64_t G, int64_t gq,
                                 const float* xs, int64_t Mp, float* CT, int64_t ldct, LinePrefetch& pf) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t a = kq0; a < kq1;) {
    const int64_t gi = a / gq, e = std::min(kq1, (gi + 1) * gq);
    __m256i acc[NR][MV];
    for (int j = 0; j < NR; ++j)
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_setzero_si256();
    const int32_t* xp = Ap + a * w;
    const uint8_t* bp = B + 4 * (a - kq0);
    for (int64_t kq = a; kq < e;) {
      const int64_t se = std::min(e, kq + 8);
      __m256i s16[NR][MV];
      for (int j = 0; j < NR; ++j)
        for (int v = 0; v < MV; ++v) s16[j][v] = _mm256_setzero_si256();
      for (; kq < se; ++kq, xp += w, bp += 4) {
        if (((kq - kq0) & pf.mask) == 0) pf.one();
        __m256i x[MV];
        for (int v = 0; v < MV; ++v) x[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 8 * v));
        for (int j = 0; j < NR; ++j) {
          int32_t wq;
          std::memcpy(&wq, bp + j * ldb, 4);
          const __m256i b = _mm256_set1_epi32(wq);
          for (int v = 0; v < MV; ++v) s16[j][v] = add16_inplace(s16[j][v], _mm256_maddubs_epi16(b, x[v]));
        }
      }
      for (int j = 0; j < NR; ++j)
        for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_add_epi32(acc[j][v], _mm256_madd_epi16(s16[j][v], ones));
    }
    for (int j = 0; j < NR; ++j) {
      const __m256 s = _mm256_set1_ps(sw[j * G + gi]), z = _mm256_set1_ps(float(zw[j * G + gi]));
      for (int v = 0; v < MV; ++v) {
        const __m256 t = _mm256_fnmadd_ps(z, _mm256_loadu_ps(xs + gi * Mp + 8 * v), _mm256_cvtepi32_ps(acc[j][v]));
        float* c = CT + j * ldct + 8 * v;
        _mm256_storeu_ps(c, _mm256_fmadd_ps(t, s, _mm256_loadu_ps(c)));
      }
    }
    a = e;
  }
}

// The tiles of `rows` weight rows: f(nr, first row) six at a time, then 4, 2 and 1.
template <class F>
inline void w4q_avx2_row_tiles(int64_t rows, const F& f) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) f(std::integral_constant<int, 6>(), r);
  for (; r + 4 <= rows; r += 4) f(std::integral_constant<int, 4>(), r);
  for (; r + 2 <= rows; r += 2) f(std::integral_constant<int, 2>(), r);
  if (r < rows) f(std::integral_constant<int, 1>(), r);
}

// Weight rows six at a time (then 4, 2, 1), x in pairs of 8-row vectors (w is a multiple of 16).
// The 12 int16 sums stay in registers; the int32 ones, touched every 8 quads, may live on the
// stack. Measured against 2 / 4 / 8 rows (AVX2, M = 256, 11008 x 4096): 47.5 ms against 56.6 /
// 52.7 / 60.5 (8 rows spill the int16 sums).
void w4q_rows_avx2(const int32_t* Ap, int64_t w, const uint8_t* B, int64_t ldb, int64_t rows, int64_t kq0,
                   int64_t kq1, const float* sw, const uint8_t* zw, int64_t G, int64_t gq, const float* xs, int64_t Mp,
                   float* CT, int64_t ldct, LinePrefetch& pf) {
  for (int64_t v0 = 0; v0 < w; v0 += 16)
    w4q_avx2_row_tiles(rows, [&](auto nr, int64_t r) {
      w4q_tile_avx2<decltype(nr)::value, 2>(Ap + v0, w, B + r * ldb, ldb, kq0, kq1, sw + r * G, zw + r * G, G, gq,
                                            xs + v0, Mp, CT + r * ldct + v0, ldct, pf);
    });
}

// The tile calls of one K block of `rows` weight rows (w4q_gemm's m blocks of Mp rows of x): the
// nibble tiles' (nib) or the AVX2 ones'.
inline int64_t w4q_tiles(int64_t Mp, int64_t rows, bool nib) {
  int64_t tiles = 0;
  const auto count = [&](auto, int64_t) { ++tiles; };
  for (int64_t m0 = 0; m0 < Mp; m0 += kW4QBlockRows) {
    const int64_t w = std::min<int64_t>(kW4QBlockRows, Mp - m0);
    if (!nib)
      for (int64_t v0 = 0; v0 < w; v0 += 16) w4q_avx2_row_tiles(rows, count);
    else if (w <= 16)
      w4q_nib_row_tiles<kW4QNibRows<1>>(rows, count);
    else if (w <= 48)
      w4q_nib_row_tiles<kW4QNibRows<2>>(rows, count);  // kW4QNibRows<3> rows too
    else
      w4q_nib_row_tiles<kW4QNibRows<4>>(rows, count);
  }
  return tiles;
}

// Y [M, N] fp32 = the integer products of x's quantized rows with ((q - z) * s_w), before the
// token scales (rows of X: ldx floats; S: the token scales, all within the limbs' bounds).
// v512: the VNNI tiles, else the AVX2 ones; nib: w4q_nibbles(v512, g).
void w4q_gemm(const W4& p, const float* X, int64_t ldx, int64_t M, int64_t N, const float* S, float* Y, bool v512,
              bool nib) {
  const int64_t K = 2 * p.ldw, KQ = K / 4, G = p.G, g = p.g, gq = g / 4;
  // the nibble tiles on one 8-row vector of x where M <= 8
  const int64_t Mp = nib && M <= 8 ? 8 : round_up(M, 16);
  Scratch apt(ScratchSlot::XPack, size_t(Mp * KQ) * 4);
  Scratch xst(ScratchSlot::XQuant, size_t(G * Mp) * 4);
  int32_t* ap = apt.as<int32_t>();
  float* xs = xst.as<float>();
  w4q_pack_x(X, ldx, M, Mp, K, g, S, ap, xs, nib);
  // K blocks of whole groups, about kW4QKC weights
  const int64_t KC = std::min(K, g * std::max<int64_t>(1, kW4QKC / g)), ldb = KC + 64;  // + 64 B: off 4 KiB strides
  const bool prefetch = env_knob("FASTKERN_W4A8_GEMM_PREFETCH", 1) != 0;
  parallel_rows(N, 16, 1, [&](int64_t r0, int64_t r1) {
    Scratch wbs(ScratchSlot::Worker1, size_t(kW4QTaskRows * ldb));
    Scratch cts(ScratchSlot::Worker0, size_t(kW4QTaskRows * Mp) * 4);
    uint8_t* wb = wbs.as<uint8_t>();
    float* ct = cts.as<float>();
    for (int64_t n0 = r0; n0 < r1; n0 += kW4QTaskRows) {
      const int64_t n1 = std::min(r1, n0 + kW4QTaskRows), rows = n1 - n0;
      std::fill(ct, ct + rows * Mp, 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t k1 = std::min(K, k0 + KC);
        // the next block's bytes into L2 while this one is widened: the next K block of these
        // rows, or the next task's first (FASTKERN_W4A8_GEMM_PREFETCH=0: none, for A/B timing).
        // Measured against none (one process, alternating): M = 16 0.78-0.87x the time (VNNI),
        // 0.74-0.82x (AVX2); M = 64 0.92-1.03x / 0.88-0.99x; M = 256 0.97-1.03x.
        const int64_t pn = k1 < K ? n0 : n1, pk0 = k1 < K ? k1 / 2 : 0;  // its first row and byte
        const uint8_t* pf = p.w + pn * p.ldw + pk0;
        const int64_t pf_rows = !prefetch ? 0 : k1 < K ? rows : std::min(kW4QTaskRows, r1 - n1);
        const int64_t pf_bytes = (k1 < K ? std::min(KC, K - k1) : std::min(KC, K)) / 2;
        // On the nibble tiles and the AVX2 ones the lines are prefetched within the tiles
        // (LinePrefetch), one every few k steps, and not in one burst (the unpacking pass's, or
        // before the tiles). Measured against the burst (2 threads, one process, alternating,
        // weights beyond L3; 4096^2 / 4096 x 14336 / 11008 x 4096): VNNI M = 6..16 0.88-0.98x the
        // time (4096 x 14336 M = 6 / 8 / 12 / 16: 2.32 / 2.33 / 3.28 / 3.31 ms against 2.64 / 2.68 /
        // 3.68 / 3.70), M = 32 and 64 0.96-0.99x; AVX2 M = 12 / 16 0.91-0.95x, M = 32 0.93-1.03x, 64
        // 0.97-1.02x, 256 0.89-1.01x.
        const bool in_tiles = nib || !v512;
        LinePrefetch lp(reinterpret_cast<const char*>(p.w), p.ldw, pn, pn + (in_tiles ? pf_rows : 0), pk0,
                        pk0 + pf_bytes);
        if (in_tiles) lp.spread(w4q_tiles(Mp, rows, nib), (k1 - k0) / (nib ? 8 : 4));
        if (!nib) w4q_widen(p, n0, n1, k0, k1, wb, ldb, pf, in_tiles ? 0 : pf_rows, pf_bytes);
        for (int64_t m0 = 0; m0 < Mp; m0 += kW4QBlockRows) {
          const int64_t w = std::min<int64_t>(kW4QBlockRows, Mp - m0);
          const int32_t* a = ap + m0 * KQ;
          const float* sw = p.s + n0 * G;
          const uint8_t* zw = p.z + n0 * G;
          const float* xb = xs + m0;
          float* c = ct + m0;
          const int64_t q0 = k0 / 4, q1 = k1 / 4;
          if (!v512) {
            w4q_rows_avx2(a, w, wb, ldb, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp, lp);
            continue;
          }
          if (nib) {
            const uint8_t* bw = p.w + n0 * p.ldw;
            if (w == 8) {
              w4q_rows_nib<NibY, 1>(a, w, bw, p.ldw, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp, lp);
              continue;
            }
            switch (w / 16) {
              case 1: w4q_rows_nib<NibZ, 1>(a, w, bw, p.ldw, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp, lp); break;
              case 2: w4q_rows_nib<NibZ, 2>(a, w, bw, p.ldw, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp, lp); break;
              case 3: w4q_rows_nib<NibZ, 3>(a, w, bw, p.ldw, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp, lp); break;
              default: w4q_rows_nib<NibZ, 4>(a, w, bw, p.ldw, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp, lp); break;
            }
            continue;
          }
          switch (w / 16) {
            case 1: w4q_rows<1>(a, w, wb, ldb, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp); break;
            case 2: w4q_rows<2>(a, w, wb, ldb, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp); break;
            case 3: w4q_rows<3>(a, w, wb, ldb, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp); break;
            default: w4q_rows<4>(a, w, wb, ldb, rows, q0, q1, sw, zw, G, gq, xb, Mp, c, Mp); break;
          }
        }
      }
      if (v512 && Mp % 16 == 0) {
        tiles::transpose_strip(ct, Mp, M, rows, Y + n0, N, nullptr, nullptr);
      } else {
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < rows; ++j) Y[m * N + n0 + j] = ct[j * Mp + m];
      }
    }
  });
}
#endif

// ------------------------------------------------------------------ op

// The checks of linear_w4a16 and linear_w4a8 (one argument list); the canonical tensors as the
// kernels read them (kept alive by the caller) and their W4 view.
struct W4Args {
  at::Tensor wc, sc, zc;
  W4 p;
  int64_t N, K;
};
W4Args w4_args(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
               const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
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
  W4Args a{w.contiguous(), scales.to(at::kFloat).contiguous(), zeros.contiguous(), {}, N, K};
  a.p = W4{a.wc.data_ptr<uint8_t>(), K / 2, a.sc.data_ptr<float>(), a.zc.data_ptr<uint8_t>(), G, group_size};
  return a;
}

#if FASTKERN_X86
// The limb GEMV (w4l_gemv / w4l_gemv16_avx2, by ISA and group size) over prepared limbs.
template <int L>
void w4l_run(const W4& p, const Limbs& q, int64_t M, int64_t N, float* Y, bool v512, bool span16, bool pair) {
  if (v512)
    w4l_gemv<true, L>(p, q, M, N, Y);
  else if (span16 && (p.g % 64 == 0 || pair))
    w4l_gemv16_avx2<L>(p, q, M, N, Y, pair);
  else
    w4l_gemv<false, L>(p, q, M, N, Y);
}

// L limbs of the M rows of X into scratch and the limb GEMV over them (tok: linear_w4a8's
// per-token scales, L = 1). False (Y untouched) where the limbs do not apply to X.
bool w4_limb_gemv(const W4& p, const float* X, int64_t ldx, int64_t M, int64_t N, float* Y, int L, bool v512,
                  const float* tok = nullptr) {
  // AVX2, g = 32: groups in pairs per 64-weight chunk (w4l_rows16p_avx2)
  const int64_t K = 2 * p.ldw, G = p.G, g = p.g;
  const bool span16 = !v512 && span16_enabled();
  const bool pair = span16 && g == 32 && K % 64 == 0;
  const int64_t CW = v512 ? 128 : 64, nc = (g + CW - 1) / CW;
  const int64_t lda = pair ? (G / 2) * L * CW : G * nc * L * CW;
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor A = at::empty({M, lda}, f32.dtype(at::kChar));
  at::Tensor SX = at::empty({M, G, 4}, f32);
  at::Tensor SUM = at::empty({M, G}, f32);
  if (!w4_prepare_limbs(X, ldx, M, K, g, CW, L, A.data_ptr<int8_t>(), lda, SX.data_ptr<float>(), SUM.data_ptr<float>(),
                        true, pair, tok))
    return false;
  const Limbs q{A.data_ptr<int8_t>(), lda, SX.data_ptr<float>(), SUM.data_ptr<float>(), nc};
  switch (L) {
    case 1: w4l_run<1>(p, q, M, N, Y, v512, span16, pair); break;
    case 2: w4l_run<2>(p, q, M, N, Y, v512, span16, pair); break;
    default: w4l_run<3>(p, q, M, N, Y, v512, span16, pair); break;
  }
  return true;
}
#endif

// Y [M, N] fp32 = X (fp32 rows of ldx, zero past K; values of dtype xt) x ((q - z) * s)^T by
// the path for that M and dtype: the fp32 FMA tiles, the bf16-dot GEMV, the limb GEMV or the
// fp32 GEMM. Returns true if it added the bias b (the GEMM adds it itself).
bool w4_float_paths(const W4& p, const float* X, int64_t ldx, int64_t M, int64_t N, float* Y, at::ScalarType xt,
                    const float* b) {
  const int64_t K = 2 * p.ldw;
#if FASTKERN_X86
  const bool fp32_x = xt == at::kFloat, avx2 = use_avx2();
  const int64_t G = p.G, group_size = p.g;
  if (use_w4f_tiles(M, group_size, fp32_x)) {
    w4f_gemv_avx512(p, X, ldx, M, N, Y);
    return false;
  }
  if (use_w4f_tiles_avx2(M, group_size, fp32_x)) {
    w4f_gemv_avx2(p, X, ldx, M, N, Y);
    return false;
  }
  if (avx2 && M <= kGemvMaxM && !fp32_x && active_isa() >= Isa::Avx512 && features().avx512bf16 &&
      bf16_gemv_enabled(M)) {
    // bf16 x: one bf16 operand, exact; fp16 x: two (x = hi + lo exactly, both bf16)
    const int L = xt == at::kBFloat16 ? 1 : 2;
    // rows of x one cache line apart from a multiple of 4 KiB: the MR rows a tile reads
    // together never map to the same L1 sets
    const int64_t nc = (group_size + kBfChunk - 1) / kBfChunk, lda = G * nc * L * kBfChunk + 32;
    at::Tensor A = at::empty({M, lda}, at::TensorOptions().dtype(at::kShort));
    at::Tensor SUM = at::empty({M, G}, at::TensorOptions().dtype(at::kFloat));
    uint16_t* ap = reinterpret_cast<uint16_t*>(A.data_ptr<int16_t>());
    if (w4_prepare_bf16(X, ldx, M, K, group_size, L, ap, lda, SUM.data_ptr<float>())) {
      const Bf16X q{ap, lda, SUM.data_ptr<float>(), nc};
      if (L == 1) w4b_gemv<1>(p, q, M, N, Y); else w4b_gemv<2>(p, q, M, N, Y);
      return false;
    }
  }
  const bool v512 = avx2 && active_isa() >= Isa::Avx512 && features().avx512vnni;
  if (avx2 && M <= limb_max_m(fp32_x, v512, group_size) && group_size <= kGemvMaxGroup &&
      w4_limb_gemv(p, X, ldx, M, N, Y, fp32_x ? 3 : 2, v512))
    return false;
#else
  (void)xt;
#endif
  return w4_blocked_gemm(p, N, K, X, ldx, M, Y, b);
}

at::Tensor linear_w4a16_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const W4Args a = w4_args("linear_w4a16", x, w, scales, zeros, group_size, bias);
  const W4& p = a.p;
  const int64_t N = a.N, K = a.K;
#if FASTKERN_X86
  // bf16 x as it is (no fp32 copy): the bf16 GEMM
  if (x.scalar_type() == at::kBFloat16 && N > 0 && K > 0 && active_isa() >= Isa::Avx512 && features().avx512bf16 &&
      use_w4_bf16_gemm(rows_of(x), group_size)) {
    const int64_t M = rows_of(x);
    at::Tensor xb = x.reshape({M, K}).contiguous();
    // the bf16 result written by the GEMM, bias included (no fp32 copy to convert)
    at::Tensor Y = at::empty({M, N}, x.options());
    const at::Tensor bf = bias_f32(bias);
    if (w4b_gemm_bf16(p, reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), M, N, data_or_null(bf),
                      reinterpret_cast<uint16_t*>(Y.data_ptr<at::BFloat16>()), w4_bf16_tail_rows(M, group_size)))
      return Y.reshape(out_shape(x, N));
  }
#endif
  at::Tensor X = x_f32_padded(x, K, round_up(K, 8));
  const int64_t M = X.size(0), ldx = X.size(1);
  // every path stores each output (the GEMVs in their first K block, the GEMM in its first KC block)
  at::Tensor Y = at::empty({M, N}, X.options());
  if (M == 0 || N == 0 || K == 0) return finish(Y.zero_(), bias, x, N);
  const at::Tensor bf = bias_f32(bias);
  if (w4_float_paths(p, X.data_ptr<float>(), ldx, M, N, Y.data_ptr<float>(), x.scalar_type(), data_or_null(bf)))
    return finish(Y, c10::nullopt, x, N);
  return finish(Y, bias, x, N);
}

// ------------------------------------------------------------------ linear_w4a8
//
// int4 weights (linear_w4a16's format) and dynamic per-token int8 activations, quantized as
// linear_w8a8 quantizes them (fastkern.formats.quantize_per_token, bit for bit). The kernel
// is the limb GEMV above with a single limb per activation, the token's scale in place
// of the group's: the byte products q * a are exact in int32 per group, and the weight scales
// and zero points apply per group as for W4A16. One limb costs a third of the products of
// fp32 W4A16's three, so the GEMV stays memory-bound at M = 1 on AVX2 too.
// Where a row holds NaN / inf or magnitudes outside the limbs' bounds (and on the generic path)
// the quantized activations, integers in fp32, go through linear_w4a16's fp32 paths and each
// output row is scaled by its token's scale afterwards: the reference's order (the integer
// products first, then s_x), NaN rows NaN as there.
//
// From kW4QGemmMinM rows (kW4QNibGemmMinM with the nibble tiles) the int8 GEMM above takes the
// call; below it the GEMV. The GEMV serves any M where the GEMM does not apply (groups that are
// not a multiple of 4 or above 8192, FASTKERN_W4A8_GEMM_MIN_M=0): its byte products cost a third
// of W4A16's (fp32 x) and, on AVX2, up
// to 4 rows of x share each unpacked chunk of nibbles (w4l_gemv16_avx2), so it stays ahead of
// the fp32 GEMM over dequantized weights that W4A16 uses from M = 17. Measured (2 threads,
// g = 128, weights beyond L3, one process, ms, GEMV against the fp32 paths): AVX2 4096 x 4096
// M = 1 / 4 / 16 / 64 / 128 / 256 / 512: 0.34 / 0.71 / 2.6 / 9.8 / 16.2 / 33.6 / 62.4 against
// 0.43 / 1.01 / 3.7 / 12.8 / 26.4 / 49.1 / 88.9; AVX-512 VNNI M = 4 / 16 / 64 / 256: 0.46 /
// 1.7 / 6.2 / 26.9 against 0.82 / 3.0 / 11.1 / 45.7. FASTKERN_W4A8_GEMV_MAX_M (read per call)
// caps the GEMV's M (0: always the fp32 paths), for tests and A/B timing.
inline int64_t w4a8_gemv_max_m() { return env_knob("FASTKERN_W4A8_GEMV_MAX_M", std::numeric_limits<int64_t>::max()); }

// Q [M, ldx] = X's rows (ldx floats, zero past K) quantized to round_half_even(x / S[m]) clamped
// to +-127, as fp32 integers (S: w4a8_token_scales'); a row whose scale is NaN (it holds NaN or
// inf) gives zeros, as in quantize_per_token. X may be the caller's own tensor: never written.
void w4a8_quantize_rows_f32(const float* X, int64_t ldx, int64_t M, const float* S, float* Q) {
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(ldx, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* x = X + m * ldx;
      float* q = Q + m * ldx;
      if (std::isnan(S[m])) {
        std::fill(q, q + ldx, 0.f);
        continue;
      }
      const float safe = S[m] > 0.f ? S[m] : 1.f;
      for (int64_t k = 0; k < ldx; ++k) q[k] = std::min(127.f, std::max(-127.f, std::nearbyint(x[k] / safe)));
    }
  });
}

at::Tensor linear_w4a8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const W4Args a = w4_args("linear_w4a8", x, w, scales, zeros, group_size, bias);
  const W4& p = a.p;
  const int64_t N = a.N, K = a.K;
  at::Tensor X = x_f32_padded(x, K, round_up(K, 8));
  const int64_t M = X.size(0), ldx = X.size(1);
  at::Tensor Y = at::empty({M, N}, X.options());
  if (M == 0 || N == 0 || K == 0) return finish(Y.zero_(), bias, x, N);
  at::Tensor S = at::empty({M}, X.options());
  const float* xp = X.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  float* sp = S.data_ptr<float>();
  const bool in_bounds = w4a8_token_scales(xp, ldx, M, sp);
#if FASTKERN_X86
  const bool v512 = active_isa() >= Isa::Avx512 && features().avx512vnni;
  const bool nib = w4q_nibbles(v512, group_size);
  if (in_bounds && use_avx2() && use_w4q_gemm(M, group_size, nib)) {
    w4q_gemm(p, xp, ldx, M, N, sp, yp, v512, nib);
    Y.mul_(S.unsqueeze(1));
    return finish(Y, bias, x, N);
  }
  if (in_bounds && use_avx2() && M <= w4a8_gemv_max_m() && group_size <= kGemvMaxGroup &&
      w4_limb_gemv(p, xp, ldx, M, N, yp, 1, v512, sp))
    return finish(Y, bias, x, N);
#endif
  at::Tensor Q = at::empty_like(X);
  w4a8_quantize_rows_f32(xp, ldx, M, sp, Q.data_ptr<float>());
  w4_float_paths(p, Q.data_ptr<float>(), ldx, M, N, yp, at::kFloat, nullptr);
  Y.mul_(S.unsqueeze(1));
  return finish(Y, bias, x, N);
}

}  // namespace
}  // namespace quant
}  // namespace cpu
}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern_C, CPU, m) {
  m.impl("linear_w4a16", &fastkern::cpu::quant::linear_w4a16_cpu);
  m.impl("linear_w4a8", &fastkern::cpu::quant::linear_w4a8_cpu);
}
