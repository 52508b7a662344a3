// Run-time choice of the CPU instruction set.
//
// The extension is compiled for baseline x86-64; kernels that use AVX2/FMA or
// AVX-512 are compiled with function-level target attributes (FASTKERN_AVX2,
// FASTKERN_AVX512) and selected with active_isa(), so one binary runs on any
// x86-64 CPU. FASTKERN_CPU_ISA=generic|avx2|avx2vnni|avx512|amx (or fastkern._C.set_cpu_isa)
// forces a path, which is how tests cover every path this machine can run.
// amx: the AVX-512 path plus AMX tiles (Intel Xeon from Sapphire Rapids) where a kernel has a
// use for them: the int8 GEMM multiplies on tdpbsud.
// avx2vnni: the AVX2 path plus AVX-VNNI (VEX vpdpbusd on ymm; Intel client cores from Alder
// Lake, AMD Zen 5) where a kernel has a use for it; avx2 is plain AVX2 + FMA (the machine
// kind of DESIGN's CPU targets, which `fastkern-bench --isa avx2` emulates).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

// FASTKERN_PORTABLE_ONLY: compile as for a CPU without x86 paths (tests/test_portable_build.py)
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FASTKERN_PORTABLE_ONLY)
#define FASTKERN_X86 1
#define FASTKERN_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTKERN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FASTKERN_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
// AVX-512 with AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16): check features().avx512bf16 too
#define FASTKERN_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11  // GCC 11: AMX intrinsics
#define FASTKERN_HAVE_AMX 1
#define FASTKERN_AMX \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#else
#define FASTKERN_HAVE_AMX 0
#endif
#include <immintrin.h>
#else
#define FASTKERN_X86 0
#define FASTKERN_AVX2
#define FASTKERN_AVX512
#define FASTKERN_AVXVNNI
#define FASTKERN_AVX512BF16
#define FASTKERN_HAVE_AMX 0
#endif

namespace fastkern {
namespace cpu {

struct Features {
  bool avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avxvnni = false;
  // AMX-TILE + AMX-INT8 on the CPU, enabled by the OS (XCR0) and granted to this process
  // (arch_prctl ARCH_REQ_XCOMP_PERM, asked for once at detection)
  bool amx_int8 = false;
  // The L1 data cache's geometry (Linux sysfs, cpu0); where it cannot be read, the smallest
  // of the x86 cores in use (8 ways, 64 sets of 64-byte lines: 32 KiB).
  int l1d_ways = 8, l1d_sets = 64, l1d_line = 64;
  int64_t l1d_bytes() const { return int64_t(l1d_ways) * l1d_sets * l1d_line; }
};

// ordered: a path includes what the ones below it use (isa >= Isa::Avx2 holds for avx2vnni)
enum class Isa { Auto = -1, Generic = 0, Avx2 = 1, Avx2Vnni = 2, Avx512 = 3, Amx = 4 };

const Features& features();
// The best path this CPU supports, or the forced one.
Isa active_isa();
// Force a path; asking for one the CPU lacks throws. Isa::Auto restores the default.
void set_isa(Isa isa);
Isa parse_isa(const std::string& name);
const char* isa_name(Isa isa);

// An integer knob from the environment, read on every call (A/B timing in one process,
// tests); `fallback` when unset or empty.
inline int64_t env_knob(const char* name, int64_t fallback) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoll(e) : fallback;
}

// The most of `rows` streams, `stride` bytes apart, whose lines at one position fall into
// one L1d set (features().l1d_*): where it exceeds the L1d's ways, a kernel that reads all of
// them at every step keeps evicting its own lines (a stride of a multiple of 4 KiB puts them
// all in one set on the x86 cores in use).
inline int rows_per_l1_set(int64_t stride, int rows) {
  const Features& f = features();
  const int64_t line_of_row = stride / f.l1d_line;
  int most = 0;
  for (int i = 0; i < rows; ++i) {
    int same = 0;
    for (int j = 0; j < rows; ++j) same += (i - j) * line_of_row % f.l1d_sets == 0;
    most = same > most ? same : most;
  }
  return most;
}
inline bool rows_alias_in_l1(int64_t stride, int rows) { return rows_per_l1_set(stride, rows) > features().l1d_ways; }

#if FASTKERN_HAVE_AMX
// Loads the tile configuration the AMX kernels use: all eight tiles 16 rows x 64 bytes. The
// configuration and the tile state are per thread: a thread loads it before its first tile
// instruction and releases the state (amx_end) when done.
FASTKERN_AMX void amx_begin();
FASTKERN_AMX void amx_end();
#endif

#if FASTKERN_X86
// acc += pairwise bf16 products of a and b (fp32 lanes), in place: GCC otherwise copies an
// accumulator array once per step where the intrinsic's result is assigned back
FASTKERN_AVX512BF16 inline __m512 dpbf16_inplace(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
#endif

}  // namespace cpu
}  // namespace fastkern
