#pragma once

#include <cstdint>

namespace fastkern {
namespace cpu {

struct FmaPeak {
  double gflops;     // fp32, all threads
  const char* isa;   // the kernel path measured (the active one)
  int threads;
  float checksum;    // keeps the loops' results alive
};

// Runs register-only FMA loops on every torch thread for about `seconds`.
FmaPeak measure_fma_peak(double seconds);

// int8 multiply-accumulate throughput of two AVX2 instruction mixes, register-only, on
// every torch thread (GMAC/s, all threads; 0 where the CPU has no AVX2):
// - exact: vpmaddwd + vpaddd on int16-widened operands (16 products per pair), what
//   fastkern's AVX2 int8 GEMM runs (exact for the whole int8 range);
// - u8s8: vpmaddubsw + vpmaddwd (ones) + vpaddd (32 products per triple), the mix of
//   FBGEMM's AVX2 kernels, which needs activations of at most 7 bits to never saturate;
// - vnni: vpdpbusd, what the VNNI int8 kernels run: on zmm (64 products each) where the
//   active kernel path is AVX-512 with VNNI, on ymm (AVX-VNNI, 32) on the avx2vnni path, 0
//   otherwise;
// - amx: tdpbsud on AMX tiles (16 x 16 x 64 products each), what the amx path's int8 GEMM
//   runs, where that path is active; 0 otherwise.
struct Int8Peak {
  double exact_gmacs;
  double u8s8_gmacs;
  double vnni_gmacs;
  double amx_gmacs;
  int threads;
  int checksum;
};
Int8Peak measure_int8_peak(double seconds);

// Streaming read bandwidth (GB/s) of this extension's own vector loads: every
// torch thread reads its contiguous share of an `nbytes` buffer (written once
// beforehand, so its pages are real) with independent accumulators and software
// prefetch, the way the memory-bound kernels stream weights; best of `reps`.
double measure_read_bw(int64_t nbytes, int reps);

// How many distinct threads at::parallel_for(0, n, 1) runs its chunks on, as
// compiled into this extension (1 if its parallel backend was compiled out).
int parallel_width(int64_t n);

}  // namespace cpu
}  // namespace fastkern
