#pragma once

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

}  // namespace cpu
}  // namespace fastkern
