// B-operand policies for tc_gemm.cuh: how each weight format reaches the
// tensor cores. Each policy provides
//   Params                  CommonParams c + its own pointers
//   stage_bytes<BN>()       shared memory per pipeline stage
//   load_b<BN, THREADS>     copy the weight k-tile (cp.async when 16-byte aligned)
//   prefetch_load/_store    side data staged through registers (group scales)
//   load_frags<BN, NI>      shared memory -> mma B fragments for one 32-byte k-step
//   mma, store              the instruction and the output write
//
// Fragment facts used below (PTX ISA, mma.m16n8k16 / m16n8k32): with g = lane/4
// and t = lane%4, B register 0 holds column n = g, k = 2t, 2t+1 (16-bit types) or
// k = 4t..4t+3 (int8), register 1 the same at k + 8 (k + 16 for int8); the lower
// 16 bits hold the lower k.
#pragma once

#include "tc_gemm.cuh"

namespace fastkern {
namespace cuda {

// ----------------------------------------------------------------- dense B

// B [N, K] in A's element type (fp16, bf16, or int8 with int32 accumulation).
template <typename TB, typename TOut>
struct DenseOp : NoPrefetch {
  static constexpr bool kInt8 = std::is_same<TB, int8_t>::value;
  using Acc = typename std::conditional<kInt8, int32_t, float>::type;
  using Out = TOut;
  struct Params {
    CommonParams c;
    const uint8_t* b;
    int64_t b_row_bytes;
    bool b_aligned;
  };

  template <int BN>
  static constexpr int stage_bytes() {
    return BN * kTileBytes;
  }

  template <int BN, int THREADS>
  __device__ static __forceinline__ void load_b(const Params& p, uint8_t* s, int64_t n0, int64_t kt) {
    load_tile<BN, 8, THREADS, true>(s, p.b + n0 * p.b_row_bytes, p.c.N - n0, p.b_row_bytes, kt * kTileBytes,
                                    p.b_aligned);
  }

  // B rows are n and its k is contiguous, i.e. the "col" operand of mma: a plain
  // (non-transposed) ldmatrix of rows n gives the fragment directly; one x4 load
  // covers two n8 tiles.
  template <int BN, int NI>
  __device__ static __forceinline__ void load_frags(const Params&, uint32_t (&bf)[NI][2], const uint8_t* s,
                                                    int wn0, int ks, int lane, int64_t, int64_t) {
    static_assert(NI % 2 == 0, "x4 loads take n8 tiles in pairs");
#pragma unroll
    for (int j = 0; j < NI; j += 2) {
      const int n = wn0 + 8 * j + (lane & 7) + ((lane >> 4) << 3);
      const int chunk = (2 * ks + ((lane >> 3) & 1)) ^ (n & 7);
      uint32_t r[4];
      ldmatrix_x4(r, s + n * kTileBytes + chunk * 16);
      bf[j][0] = r[0];
      bf[j][1] = r[1];
      bf[j + 1][0] = r[2];
      bf[j + 1][1] = r[3];
    }
  }

  __device__ static __forceinline__ void mma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (kInt8) {
      mma_16832_s8(d, a, b);
    } else {
      mma_16816<TB>(d, a, b);
    }
  }

  __device__ static __forceinline__ void store(const Params& p, int64_t m, int64_t n, bool two, Acc v0, Acc v1) {
    if constexpr (std::is_same<TOut, int32_t>::value) {
      int32_t* o = static_cast<int32_t*>(p.c.out) + m * p.c.N + n;
      o[0] = v0;
      if (two) o[1] = v1;
    } else {
      store_float_pair<TOut>(p.c, m, n, two, static_cast<float>(v0), static_cast<float>(v1));
    }
  }
};

// ----------------------------------------------------------------- int8 weights, fp16/bf16 activations

// w int8 [N, K]: integers go into the fragments exactly (|q| <= 127 is exact in
// fp16 and bf16); the per-channel scale is applied once, in the epilogue.
template <typename T>
struct W8Op : NoPrefetch {
  using Acc = float;
  using Out = T;
  struct Params {
    CommonParams c;
    const uint8_t* b;
    int64_t b_row_bytes;
    bool b_aligned;
  };

  template <int BN>
  static constexpr int stage_bytes() {
    return BN * 64;  // 64 k per tile, one byte each
  }

  template <int BN, int THREADS>
  __device__ static __forceinline__ void load_b(const Params& p, uint8_t* s, int64_t n0, int64_t kt) {
    load_tile<BN, 4, THREADS, false>(s, p.b + n0 * p.b_row_bytes, p.c.N - n0, p.b_row_bytes, kt * 64,
                                     p.b_aligned);
  }

  // One 16-byte read per row and k-step (the 4 lanes of a quad read the same
  // address: a broadcast), then each lane keeps its two byte pairs.
  template <int BN, int NI>
  __device__ static __forceinline__ void load_frags(const Params&, uint32_t (&bf)[NI][2], const uint8_t* s,
                                                    int wn0, int ks, int lane, int64_t, int64_t) {
    const int g = lane >> 2, t = lane & 3;
    const bool upper = (t & 2) != 0;
    const uint32_t pos = 2u * (t & 1);
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      const uint4 v = *reinterpret_cast<const uint4*>(s + (wn0 + 8 * j + g) * 64 + ks * 16);
      bf[j][0] = int8x2_to_pair<T>(upper ? v.y : v.x, pos);
      bf[j][1] = int8x2_to_pair<T>(upper ? v.w : v.z, pos);
    }
  }

  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_16816<T>(d, a, b);
  }

  __device__ static __forceinline__ void store(const Params& p, int64_t m, int64_t n, bool two, float v0, float v1) {
    store_float_pair<T>(p.c, m, n, two, v0, v1);
  }
};

// ----------------------------------------------------------------- int4 group-wise weights

// (q - z) * s for the two nibbles of byte t of w, as a pair of T.
// prmt puts byte t of w in bits 0-7 and byte t of (w >> 4) in bits 16-23, so the
// low nibble of each 16-bit half is q(2t) and q(2t+1); OR-ing them under the
// magic exponent gives magic + q exactly, and subtracting magic + z (exact, small
// integers) leaves q - z; the only rounding is the multiply by the scale.
template <typename T>
__device__ __forceinline__ uint32_t int4_pair(uint32_t w, uint32_t sel, uint32_t zz, uint32_t ss) {
  const uint32_t y = prmt(w, w >> 4, sel);
  const uint32_t v = and_or(y, 0x000F000Fu, Pair<T>::kMagic);
  return Pair<T>::mul(Pair<T>::sub(v, zz), ss);
}

// w uint8 [N, K/2] (two values per byte along K, low nibble first), scales fp32
// and zeros uint8 [N, K/group_size]. kG16: group_size % 16 == 0, so each 16-wide
// k-step of a row has one (scale, zero), staged per tile in shared memory as
// ready-made pairs; otherwise every fragment looks its groups up in global
// memory (correct for any even group size, slower).
template <typename T, bool kG16>
struct W4Op {
  using Acc = float;
  using Out = T;
  struct Params {
    CommonParams c;
    const uint8_t* b;
    int64_t b_row_bytes;
    bool b_aligned;
    const float* scales;
    const uint8_t* zeros;
    int64_t group_size;
    int64_t groups;
  };

  template <int BN>
  static constexpr int stage_bytes() {
    return BN * 32 + (kG16 ? BN * 4 * 8 : 0);  // 64 k per tile = 32 bytes; 4 k-steps x (scale, zero) pairs
  }

  template <int BN, int THREADS>
  __device__ static __forceinline__ void load_b(const Params& p, uint8_t* s, int64_t n0, int64_t kt) {
    load_tile<BN, 2, THREADS, false>(s, p.b + n0 * p.b_row_bytes, p.c.N - n0, p.b_row_bytes, kt * 32,
                                     p.b_aligned);
  }

  // Scales and zeros are too small and irregular for cp.async (zeros are single
  // bytes): they are loaded into registers before the tile's math and stored to
  // shared memory after it, so their latency overlaps the mma work.
  static constexpr int kPf = 4;
  struct Prefetch {
    float s[kPf];
    uint32_t z[kPf];
  };

  template <int BN, int THREADS>
  __device__ static __forceinline__ void prefetch_load(const Params& p, Prefetch& pf, int64_t n0, int64_t kt) {
    if constexpr (kG16) {
      static_assert(BN * 4 <= kPf * THREADS, "prefetch registers too few for this tile");
#pragma unroll
      for (int r = 0; r < kPf; ++r) {
        const int e = threadIdx.x + r * THREADS;
        pf.s[r] = 0.f;
        pf.z[r] = 0u;
        if (e < BN * 4) {
          const int64_t n = n0 + (e >> 2);
          const int64_t k = kt * 64 + 16 * (e & 3);
          if (n < p.c.N && k < p.c.K) {
            const int64_t gi = n * p.groups + k / p.group_size;
            pf.s[r] = __ldg(p.scales + gi);
            pf.z[r] = __ldg(p.zeros + gi);
          }
        }
      }
    }
  }

  template <int BN, int THREADS>
  __device__ static __forceinline__ void prefetch_store(const Prefetch& pf, uint8_t* s) {
    if constexpr (kG16) {
      uint2* dst = reinterpret_cast<uint2*>(s + BN * 32);
#pragma unroll
      for (int r = 0; r < kPf; ++r) {
        const int e = threadIdx.x + r * THREADS;
        if (e < BN * 4) {
          const float zf = Pair<T>::kMagicF + static_cast<float>(pf.z[r]);
          dst[e] = make_uint2(Pair<T>::pack(pf.s[r], pf.s[r]), Pair<T>::pack(zf, zf));
        }
      }
    }
  }

  __device__ static __forceinline__ void group_of(const Params& p, int64_t n, int64_t k, uint32_t& ss,
                                                  uint32_t& zz) {
    float s = 0.f, z = 0.f;
    if (n < p.c.N && k < p.c.K) {
      const int64_t gi = n * p.groups + k / p.group_size;
      s = __ldg(p.scales + gi);
      z = static_cast<float>(__ldg(p.zeros + gi));
    }
    ss = Pair<T>::pack(s, s);
    zz = Pair<T>::pack(Pair<T>::kMagicF + z, Pair<T>::kMagicF + z);
  }

  template <int BN, int NI>
  __device__ static __forceinline__ void load_frags(const Params& p, uint32_t (&bf)[NI][2], const uint8_t* s,
                                                    int wn0, int ks, int lane, int64_t n0, int64_t kt) {
    const int g = lane >> 2, t = lane & 3;
    const uint32_t sel = static_cast<uint32_t>(t) | (static_cast<uint32_t>(t + 4) << 8);
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      const int nl = wn0 + 8 * j + g;
      // the k-step's 8 bytes of row nl: bytes 0-3 hold k 0-7, bytes 4-7 k 8-15
      const uint2 v = *reinterpret_cast<const uint2*>(s + nl * 32 + ks * 8);
      uint32_t ss0, zz0, ss1, zz1;
      if constexpr (kG16) {
        const uint2 sz = reinterpret_cast<const uint2*>(s + BN * 32)[nl * 4 + ks];
        ss0 = ss1 = sz.x;
        zz0 = zz1 = sz.y;
      } else {
        const int64_t k = kt * 64 + 16 * ks + 2 * t;
        group_of(p, n0 + nl, k, ss0, zz0);
        group_of(p, n0 + nl, k + 8, ss1, zz1);
      }
      bf[j][0] = int4_pair<T>(v.x, sel, zz0, ss0);
      bf[j][1] = int4_pair<T>(v.y, sel, zz1, ss1);
    }
  }

  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_16816<T>(d, a, b);
  }

  __device__ static __forceinline__ void store(const Params& p, int64_t m, int64_t n, bool two, float v0, float v1) {
    store_float_pair<T>(p.c, m, n, two, v0, v1);
  }
};

// ----------------------------------------------------------------- 2:4 sparse weights

// Dense pair (positions p, p+1 of a group of 4) from the group's two kept values
// (16-bit each, in `vals`) and its meta byte idx0 | idx1 << 2.
__device__ __forceinline__ uint32_t sparse24_pair(uint32_t vals, uint32_t meta, uint32_t p) {
  const uint32_t i0 = meta & 3u, i1 = (meta >> 2) & 3u;
  const uint32_t v0 = vals & 0xFFFFu, v1 = vals >> 16;
  const uint32_t lo = i0 == p ? v0 : (i1 == p ? v1 : 0u);
  const uint32_t hi = i0 == p + 1 ? v0 : (i1 == p + 1 ? v1 : 0u);
  return lo | (hi << 16);
}

// values [N, K/2] (x's dtype) and meta uint8 [N, K/4]. The weight tile crosses
// memory compressed (half the value bytes plus 1/8 of them in meta) and is
// expanded to the dense fragment in registers; the math is a dense mma.
// (mma.sp would also halve the math; its metadata layout is the next step.)
template <typename T>
struct Sparse24Op : NoPrefetch {
  using Acc = float;
  using Out = T;
  struct Params {
    CommonParams c;
    const uint8_t* v;
    int64_t v_row_bytes;
    bool v_aligned;
    const uint8_t* meta;
    int64_t m_row_bytes;
    bool m_aligned;
  };

  template <int BN>
  static constexpr int stage_bytes() {
    return BN * 64 + BN * 16;  // 64 dense k = 32 values (64 bytes) + 16 meta bytes
  }

  template <int BN, int THREADS>
  __device__ static __forceinline__ void load_b(const Params& p, uint8_t* s, int64_t n0, int64_t kt) {
    load_tile<BN, 4, THREADS, false>(s, p.v + n0 * p.v_row_bytes, p.c.N - n0, p.v_row_bytes, kt * 64,
                                     p.v_aligned);
    load_tile<BN, 1, THREADS, false>(s + BN * 64, p.meta + n0 * p.m_row_bytes, p.c.N - n0, p.m_row_bytes,
                                     kt * 16, p.m_aligned);
  }

  template <int BN, int NI>
  __device__ static __forceinline__ void load_frags(const Params&, uint32_t (&bf)[NI][2], const uint8_t* s,
                                                    int wn0, int ks, int lane, int64_t, int64_t) {
    const int g = lane >> 2, t = lane & 3;
    const bool upper = (t & 2) != 0;
    const uint32_t pos = 2u * (t & 1);
    const uint32_t sh = 8u * (t >> 1);
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      const int nl = wn0 + 8 * j + g;
      // k-step = 4 groups: 8 values (16 bytes) and 4 meta bytes. Lane t needs
      // group t/2 (for k 2t, 2t+1) and group 2 + t/2 (for k 2t+8, 2t+9).
      const uint4 v = *reinterpret_cast<const uint4*>(s + nl * 64 + ks * 16);
      const uint32_t mw = *reinterpret_cast<const uint32_t*>(s + BN * 64 + nl * 16 + ks * 4);
      bf[j][0] = sparse24_pair(upper ? v.y : v.x, (mw >> sh) & 0xFFu, pos);
      bf[j][1] = sparse24_pair(upper ? v.w : v.z, (mw >> (sh + 16u)) & 0xFFu, pos);
    }
  }

  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_16816<T>(d, a, b);
  }

  __device__ static __forceinline__ void store(const Params& p, int64_t m, int64_t n, bool two, float v0, float v1) {
    store_float_pair<T>(p.c, m, n, two, v0, v1);
  }
};

}  // namespace cuda
}  // namespace fastkern
