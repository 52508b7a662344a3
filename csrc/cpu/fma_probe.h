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
