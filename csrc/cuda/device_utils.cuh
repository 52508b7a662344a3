// Device helpers shared by fastkern's CUDA kernels: element types, PTX wrappers
// for cp.async / ldmatrix / mma.sync (sm_80 instructions, also valid on sm_90),
// and the fp32 epilogue. CUDA headers only (see kernels.h for why).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"

namespace fastkern {
namespace cuda {

// ------------------------------------------------------------------ types

template <typename T>
struct TypeOf;
template <>
struct TypeOf<float> {
  static constexpr DType value = kF32;
};
template <>
struct TypeOf<__half> {
  static constexpr DType value = kF16;
};
template <>
struct TypeOf<__nv_bfloat16> {
  static constexpr DType value = kBF16;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(int8_t v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two adjacent outputs packed for one 32-bit store.
__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store2(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// ------------------------------------------------------------------ epilogue

// out = acc * row_scale[m] * col_scale[n] + bias[n], in fp32 (the order of the
// references in fastkern/ops.py). Null pointers mean "absent".
struct Epilogue {
  const float* row_scale;
  const float* col_scale;
  const float* bias;

  __device__ __forceinline__ float apply(float acc, int64_t m, int64_t n) const {
    float v = acc;
    if (row_scale) v *= row_scale[m];
    if (col_scale) v *= col_scale[n];
    if (bias) v += bias[n];
    return v;
  }
};

// ------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (.cg: streamed weights are read
// once per CTA, keeping L1 for the activations); src_bytes = 0 writes zeros,
// which is how tile tails past M, N or K are padded.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// D += A * B for one m16n8k16 tile; fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D += A * B for one m16n8k32 int8 tile; exact int32 accumulators.
__device__ __forceinline__ void mma_16832_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// (a & b) | c in one LOP3.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// ------------------------------------------------------------------ 16-bit pair math

// Packed pair of T (half2 / bfloat162) as raw bits, and the two ops the weight
// decoders need. Both are exact where used: a - b of two integers below 2048
// (fp16) / 256 (bf16) is exact, and the one rounding is in the multiply.
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  // fp16 with exponent 2^10: mantissa bit i adds 2^i, so OR-ing a 4-bit value v
  // into the low bits gives exactly 1024 + v.
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kMagicF = 1024.0f;
  __device__ static __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 r = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
};
template <>
struct Pair<__nv_bfloat16> {
  // bf16 with exponent 2^7 (7 mantissa bits): OR-ing v < 16 gives exactly 128 + v.
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kMagicF = 128.0f;
  __device__ static __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r =
        __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __nv_bfloat162 r =
        __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

// Two int8 (bytes `pos` and `pos + 1` of w) as a pair of T, exactly.
template <typename T>
__device__ __forceinline__ uint32_t int8x2_to_pair(uint32_t w, uint32_t pos);

template <>
__device__ __forceinline__ uint32_t int8x2_to_pair<__half>(uint32_t w, uint32_t pos) {
  // byte b -> low byte of each 16-bit half; selector 4 takes a zero byte from the
  // second operand. Flipping the sign bit maps int8 v to v + 128 in 0..255, and
  // 1024 + (v + 128) is exact in fp16; subtracting 1152 leaves v.
  uint32_t y = prmt(w, 0u, pos | (4u << 4) | ((pos + 1u) << 8) | (4u << 12));
  y = (y ^ 0x00800080u) | 0x64006400u;
  return Pair<__half>::sub(y, 0x64806480u);  // 0x6480 = 1152.0
}

template <>
__device__ __forceinline__ uint32_t int8x2_to_pair<__nv_bfloat16>(uint32_t w, uint32_t pos) {
  // bf16 has too few mantissa bits for the 16-bit trick over 0..255; the fp32
  // version (2^23 + u, exact) then one packed conversion, exact for |v| <= 128.
  uint32_t b0 = ((w >> (8u * pos)) & 0xFFu) ^ 0x80u;
  uint32_t b1 = ((w >> (8u * (pos + 1u))) & 0xFFu) ^ 0x80u;
  float f0 = __uint_as_float(0x4B000000u | b0) - 8388736.0f;  // 2^23 + 128
  float f1 = __uint_as_float(0x4B000000u | b1) - 8388736.0f;
  return Pair<__nv_bfloat16>::pack(f0, f1);
}

// ------------------------------------------------------------------ host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p, int64_t row_bytes) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (row_bytes % 16 == 0);
}

// Grids put N tiles on x (no limit) and M tiles on y (at most 65535): launchers
// walk M in chunks of this many tiles.
constexpr int64_t kMaxGridY = 65535;

}  // namespace cuda
}  // namespace fastkern
