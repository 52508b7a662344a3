// The machine's fp32 FMA throughput, measured: independent FMA chains held in
// registers (no memory traffic), one per vector register the path has to spare,
// on every torch thread at once. The harness reports dense kernels as a
// percentage of this figure; a clock-times-width estimate is wrong whenever the
// reported clock is not the real one (turbo, hypervisors, throttling).
#include "cpu/fma_probe.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "cpu/isa.h"

#if FASTKERN_X86
#include <immintrin.h>
#endif

namespace fastkern {
namespace cpu {
namespace {

// Enough independent chains to cover FMA latency (4 cycles) x 2 ports, with
// registers left for the constants.
constexpr int kChains = 12;

// Each loop returns a value that depends on every chain, so no work is dead.
#if FASTKERN_X86
FASTKERN_AVX512 float fma_chains_avx512(int64_t iters) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c) * 1e-3f);
  const __m512 mul = _mm512_set1_ps(0.9999999f), add = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], mul, add);
  }
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}

FASTKERN_AVX2 float fma_chains_avx2(int64_t iters) {
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c) * 1e-3f);
  const __m256 mul = _mm256_set1_ps(0.9999999f), add = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], mul, add);
  }
  __m256 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, acc[c]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  float r = 0.f;
  for (float v : out) r += v;
  return r;
}
#endif

// The portable path: what the compiler makes of plain multiply-adds.
float fma_chains_generic(int64_t iters) {
  float acc[kChains * 4];
  for (int c = 0; c < kChains * 4; ++c) acc[c] = static_cast<float>(c) * 1e-3f;
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kChains * 4; ++c) acc[c] = acc[c] * 0.9999999f + 1e-7f;
  float r = 0.f;
  for (float v : acc) r += v;
  return r;
}

struct Path {
  float (*fn)(int64_t);
  int64_t flops_per_iter;
};

Path path_for(Isa isa) {
#if FASTKERN_X86
  if (isa >= Isa::Avx512) return {fma_chains_avx512, int64_t{kChains} * 16 * 2};
  if (isa >= Isa::Avx2) return {fma_chains_avx2, int64_t{kChains} * 8 * 2};
#endif
  return {fma_chains_generic, int64_t{kChains} * 4 * 2};
}

// Work per second of fn(iters) run on every thread at once (sink[t] += its result, so no
// loop is dead): the iteration count calibrated to ~seconds / 5 per run from a first run of
// `iters`, then the best of 5 runs. work_per_iter: the work of one iteration on one thread.
template <class T>
double best_rate(T (*fn)(int64_t), int64_t iters, int64_t work_per_iter, double seconds, int threads,
                 std::vector<T>& sink) {
  auto once = [&](int64_t n) {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) sink[t] += fn(n);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return static_cast<double>(threads) * n * work_per_iter / s;
  };
  const double rate = once(iters);
  iters = std::max<int64_t>(iters, static_cast<int64_t>(rate * std::max(seconds, 0.01) / 5 /
                                                        (static_cast<double>(threads) * work_per_iter)));
  double best = 0;
  for (int r = 0; r < 5; ++r) best = std::max(best, once(iters));
  return best;
}

}  // namespace

FmaPeak measure_fma_peak(double seconds) {
  const Isa isa = active_isa();
  const Path p = path_for(isa);
  const int threads = std::max(1, at::get_num_threads());
  std::vector<float> sink(threads, 0.f);
  const double best = best_rate(p.fn, int64_t{1} << 16, p.flops_per_iter, seconds, threads, sink);
  float keep = 0;
  for (float v : sink) keep += v;
  return {best * 1e-9, isa_name(isa), threads, keep};
}

namespace {

#if FASTKERN_X86
// 12 accumulators (ymm0-11), like the AVX2 int8 GEMM's 6 x 2 tile, in asm so that the
// compiler neither merges the identical products nor spills the accumulators.
#define FASTKERN_I8_REGS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
                         "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define FASTKERN_I8_EXACT(r) "vpmaddwd %%ymm13, %%ymm12, %%ymm14\n\tvpaddd %%ymm14, %%" r ", %%" r "\n\t"
#define FASTKERN_I8_U8S8(r)                                 \
  "vpmaddubsw %%ymm13, %%ymm12, %%ymm14\n\t"               \
  "vpmaddwd %%ymm15, %%ymm14, %%ymm14\n\t"                 \
  "vpaddd %%ymm14, %%" r ", %%" r "\n\t"
#define FASTKERN_I8_TWELVE(M) \
  M("ymm0") M("ymm1") M("ymm2") M("ymm3") M("ymm4") M("ymm5") M("ymm6") M("ymm7") M("ymm8") M("ymm9") M("ymm10") M("ymm11")
#define FASTKERN_I8_PROLOGUE                                                                              \
  "vpxor %%xmm0, %%xmm0, %%xmm0\n\tvmovdqa %%ymm0, %%ymm1\n\tvmovdqa %%ymm0, %%ymm2\n\t"                  \
  "vmovdqa %%ymm0, %%ymm3\n\tvmovdqa %%ymm0, %%ymm4\n\tvmovdqa %%ymm0, %%ymm5\n\tvmovdqa %%ymm0, %%ymm6\n\t" \
  "vmovdqa %%ymm0, %%ymm7\n\tvmovdqa %%ymm0, %%ymm8\n\tvmovdqa %%ymm0, %%ymm9\n\tvmovdqa %%ymm0, %%ymm10\n\t" \
  "vmovdqa %%ymm0, %%ymm11\n\t"                                                                          \
  "vpcmpeqd %%ymm12, %%ymm12, %%ymm12\n\tvpsrlw $9, %%ymm12, %%ymm13\n\tvpsrlw $15, %%ymm12, %%ymm15\n\t"
#define FASTKERN_I8_EPILOGUE                                                                        \
  "vpaddd %%ymm1, %%ymm0, %%ymm0\n\tvpaddd %%ymm3, %%ymm2, %%ymm2\n\tvpaddd %%ymm5, %%ymm4, %%ymm4\n\t" \
  "vpaddd %%ymm7, %%ymm6, %%ymm6\n\tvpaddd %%ymm9, %%ymm8, %%ymm8\n\tvpaddd %%ymm11, %%ymm10, %%ymm10\n\t" \
  "vpaddd %%ymm2, %%ymm0, %%ymm0\n\tvpaddd %%ymm6, %%ymm4, %%ymm4\n\tvpaddd %%ymm10, %%ymm8, %%ymm8\n\t" \
  "vpaddd %%ymm4, %%ymm0, %%ymm0\n\tvpaddd %%ymm8, %%ymm0, %%ymm0\n\tvmovd %%xmm0, %1\n\tvzeroupper\n\t"

// The loop of STEP (12 of them, one per accumulator) `iters` times; returns a sum of the
// accumulators so that none is dead.
#define FASTKERN_I8_PROBE(name, STEP)                                                                      \
  FASTKERN_AVX2 int name(int64_t iters) {                                                                 \
    int out = 0;                                                                                          \
    if (iters <= 0) return 0;                                                                             \
    asm volatile(FASTKERN_I8_PROLOGUE "1:\n\t" FASTKERN_I8_TWELVE(STEP) "dec %0\n\tjnz 1b\n\t" FASTKERN_I8_EPILOGUE \
                 : "+r"(iters), "=r"(out)                                                                 \
                 :                                                                                        \
                 : FASTKERN_I8_REGS, "cc");                                                               \
    return out;                                                                                           \
  }
FASTKERN_I8_PROBE(int8_exact_avx2, FASTKERN_I8_EXACT)
FASTKERN_I8_PROBE(int8_u8s8_avx2, FASTKERN_I8_U8S8)
// AVX-VNNI: the VEX vpdpbusd on ymm (32 products each), what the avx2vnni int8 GEMM runs
#define FASTKERN_I8_VNNI256(r) "%{vex%} vpdpbusd %%ymm13, %%ymm12, %%" r "\n\t"
FASTKERN_I8_PROBE(int8_vnni_avx2, FASTKERN_I8_VNNI256)

// AVX-512 VNNI: 12 vpdpbusd chains (zmm0-11, 64 products each), the instruction every
// int8 product of fastkern's VNNI kernels runs on.
#define FASTKERN_I8_VNNI(r) "vpdpbusd %%zmm13, %%zmm12, %%zmm" r "\n\t"
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) int int8_vnni_avx512(int64_t iters) {
  int out = 0;
  if (iters <= 0) return 0;
  asm volatile(
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvmovdqa64 %%zmm0, %%zmm1\n\tvmovdqa64 %%zmm0, %%zmm2\n\t"
      "vmovdqa64 %%zmm0, %%zmm3\n\tvmovdqa64 %%zmm0, %%zmm4\n\tvmovdqa64 %%zmm0, %%zmm5\n\t"
      "vmovdqa64 %%zmm0, %%zmm6\n\tvmovdqa64 %%zmm0, %%zmm7\n\tvmovdqa64 %%zmm0, %%zmm8\n\t"
      "vmovdqa64 %%zmm0, %%zmm9\n\tvmovdqa64 %%zmm0, %%zmm10\n\tvmovdqa64 %%zmm0, %%zmm11\n\t"
      "vpternlogd $0xff, %%zmm12, %%zmm12, %%zmm12\n\tvpsrlw $9, %%zmm12, %%zmm13\n\t"
      "1:\n\t" FASTKERN_I8_VNNI("0") FASTKERN_I8_VNNI("1") FASTKERN_I8_VNNI("2") FASTKERN_I8_VNNI("3")
      FASTKERN_I8_VNNI("4") FASTKERN_I8_VNNI("5") FASTKERN_I8_VNNI("6") FASTKERN_I8_VNNI("7") FASTKERN_I8_VNNI("8")
      FASTKERN_I8_VNNI("9") FASTKERN_I8_VNNI("10") FASTKERN_I8_VNNI("11") "dec %0\n\tjnz 1b\n\t"
      "vpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm3, %%zmm2, %%zmm2\n\tvpaddd %%zmm5, %%zmm4, %%zmm4\n\t"
      "vpaddd %%zmm7, %%zmm6, %%zmm6\n\tvpaddd %%zmm9, %%zmm8, %%zmm8\n\tvpaddd %%zmm11, %%zmm10, %%zmm10\n\t"
      "vpaddd %%zmm2, %%zmm0, %%zmm0\n\tvpaddd %%zmm6, %%zmm4, %%zmm4\n\tvpaddd %%zmm10, %%zmm8, %%zmm8\n\t"
      "vpaddd %%zmm4, %%zmm0, %%zmm0\n\tvpaddd %%zmm8, %%zmm0, %%zmm0\n\tvmovd %%xmm0, %1\n\tvzeroupper\n\t"
      : "+r"(iters), "=r"(out)
      :
      : FASTKERN_I8_REGS, "cc");
  return out;
}

#endif

#if FASTKERN_HAVE_AMX
// AMX: tdpbsud on tiles in registers, the 2 x 2 block of the amx path's int8 GEMM (four 16 x 16
// int32 accumulators, two signed and two unsigned 16 x 64-byte operands): 4 x 16384 products
// per iteration.
FASTKERN_AMX int int8_amx(int64_t iters) {
  alignas(64) static const int8_t zeros[16 * 64] = {};
  alignas(64) int32_t out[16 * 16];
  amx_begin();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(1, 4, 7);
    _tile_dpbsud(2, 5, 6);
    _tile_dpbsud(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  amx_end();
  return out[0];
}
#endif

}  // namespace

Int8Peak measure_int8_peak(double seconds) {
  const int threads = std::max(1, at::get_num_threads());
  Int8Peak r{0.0, 0.0, 0.0, 0.0, threads, 0};
#if FASTKERN_X86
  if (!features().avx2 || !features().fma) return r;
  std::vector<int> sink(threads, 0);
  r.exact_gmacs = best_rate(int8_exact_avx2, int64_t{1} << 14, int64_t{kChains} * 16, seconds / 2, threads, sink) * 1e-9;
  r.u8s8_gmacs = best_rate(int8_u8s8_avx2, int64_t{1} << 14, int64_t{kChains} * 32, seconds / 2, threads, sink) * 1e-9;
  if (active_isa() >= Isa::Avx512 && features().avx512vnni)
    r.vnni_gmacs = best_rate(int8_vnni_avx512, int64_t{1} << 14, int64_t{kChains} * 64, seconds / 2, threads, sink) * 1e-9;
  else if (active_isa() == Isa::Avx2Vnni)
    r.vnni_gmacs = best_rate(int8_vnni_avx2, int64_t{1} << 14, int64_t{kChains} * 32, seconds / 2, threads, sink) * 1e-9;
#if FASTKERN_HAVE_AMX
  if (active_isa() >= Isa::Amx)
    r.amx_gmacs = best_rate(int8_amx, int64_t{1} << 12, int64_t{4} * 16384, seconds / 2, threads, sink) * 1e-9;
#endif
  for (int v : sink) r.checksum += v;
#else
  (void)seconds;
#endif
  return r;
}

namespace {

// XOR of every 64-bit word in [p, p + n), n a multiple of 256: the result depends on
// every byte, so no load is dead.
#if FASTKERN_X86
FASTKERN_AVX512 uint64_t read_avx512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  const __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
  alignas(64) uint64_t w[8];
  _mm512_store_si512(w, a);
  uint64_t r = 0;
  for (uint64_t v : w) r ^= v;
  return r;
}

FASTKERN_AVX2 uint64_t read_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 128) {
    a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) uint64_t w[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), a);
  return w[0] ^ w[1] ^ w[2] ^ w[3];
}
#endif

volatile uint64_t g_read_sink = 0;

uint64_t read_generic(const uint8_t* p, int64_t n) {
  uint64_t a[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; i += 32)
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      a[j] ^= v;
    }
  return a[0] ^ a[1] ^ a[2] ^ a[3];
}

}  // namespace

double measure_read_bw(int64_t nbytes, int reps) {
  const Isa isa = active_isa();
  uint64_t (*fn)(const uint8_t*, int64_t) = read_generic;
#if FASTKERN_X86
  if (isa >= Isa::Avx512) fn = read_avx512;
  else if (isa >= Isa::Avx2) fn = read_avx2;
#endif
  constexpr int64_t kUnit = 1 << 16;  // a thread's share is whole 64 KiB units
  const int64_t units = std::max<int64_t>(1, nbytes / kUnit);
  std::vector<uint8_t> buf(static_cast<size_t>(units * kUnit + 4096), 1);  // + slack for the prefetches
  const int threads = std::max(1, at::get_num_threads());
  std::vector<uint64_t> sink(threads, 0);
  double best = 0;
  for (int r = 0; r < std::max(1, reps); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t u0 = units * t / threads, u1 = units * (t + 1) / threads;
        sink[t] ^= fn(buf.data() + u0 * kUnit, (u1 - u0) * kUnit);
      }
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(units * kUnit) / s * 1e-9);
  }
  uint64_t keep = 0;
  for (uint64_t v : sink) keep ^= v;
  g_read_sink = keep;  // the loads stay live
  return best;
}

int parallel_width(int64_t n) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    // long enough that one thread cannot take every chunk before the others start
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int>(ids.size());
}

}  // namespace cpu
}  // namespace fastkern
