#include "cpu/isa.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include <c10/util/Exception.h>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastkern {
namespace cpu {

namespace {

// AMX-TILE and AMX-INT8 (CPUID.7.0:EDX bits 24 and 25), tile state enabled in XCR0 (bits 17
// and 18), and this process allowed to use it: Linux hands out the tile data state only on
// request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, kernel 5.16+).
bool detect_amx_int8() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3u) != 3u) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// The first line of the sysfs file `name` of cpu0's cache `index` into buf; false where unreadable.
bool cache_file(int index, const char* name, char* buf, int size) {
  char path[128];
  std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/%s", index, name);
  FILE* fp = std::fopen(path, "r");
  if (fp == nullptr) return false;
  const bool ok = std::fgets(buf, size, fp) != nullptr;
  std::fclose(fp);
  return ok;
}

int cache_value(int index, const char* name) {
  char buf[32] = {};
  return cache_file(index, name, buf, sizeof(buf)) ? std::atoi(buf) : 0;
}

// The level-1 data cache among cpu0's caches; the defaults stay where sysfs lacks it.
void detect_l1d(Features& f) {
  for (int i = 0; i < 8; ++i) {
    char type[32] = {};
    if (cache_value(i, "level") != 1 || !cache_file(i, "type", type, sizeof(type))) continue;
    if (std::string(type).rfind("Data", 0) != 0) continue;
    const int ways = cache_value(i, "ways_of_associativity"), sets = cache_value(i, "number_of_sets"),
              line = cache_value(i, "coherency_line_size");
    if (ways > 0 && sets > 0 && line > 0) f.l1d_ways = ways, f.l1d_sets = sets, f.l1d_line = line;
    return;
  }
}

Features detect() {
  Features f;
  detect_l1d(f);
#if FASTKERN_X86
  __builtin_cpu_init();
  f.avx = __builtin_cpu_supports("avx");
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  f.avxvnni = __builtin_cpu_supports("avxvnni");
  f.amx_int8 = FASTKERN_HAVE_AMX && detect_amx_int8();  // no AMX kernels without the intrinsics
#endif
#endif
  return f;
}

bool supported(Isa isa) {
  const Features& f = features();
  switch (isa) {
    case Isa::Generic:
      return true;
    case Isa::Avx2:
      return f.avx2 && f.fma && f.f16c;
    case Isa::Avx2Vnni:
      return f.avx2 && f.fma && f.f16c && f.avxvnni;
    case Isa::Avx512:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
    case Isa::Amx:
      return supported(Isa::Avx512) && f.avx512vnni && f.amx_int8;
    default:
      return false;
  }
}

Isa best() {
  if (supported(Isa::Amx)) return Isa::Amx;
  if (supported(Isa::Avx512)) return Isa::Avx512;
  if (supported(Isa::Avx2Vnni)) return Isa::Avx2Vnni;
  if (supported(Isa::Avx2)) return Isa::Avx2;
  return Isa::Generic;
}

Isa initial() {
  const char* env = std::getenv("FASTKERN_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best();
  Isa want = parse_isa(env);
  if (want == Isa::Auto) return best();
  TORCH_CHECK(supported(want), "FASTKERN_CPU_ISA=", env, " asks for a path this CPU does not support");
  return want;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial())};
  return isa;
}

}  // namespace

const Features& features() {
  static const Features f = detect();
  return f;
}

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (isa == Isa::Auto) isa = best();
  TORCH_CHECK(supported(isa), "fastkern: the CPU path '", isa_name(isa),
              "' is not supported by this CPU (see fastkern.info())");
  current().store(static_cast<int>(isa));
}

#if FASTKERN_HAVE_AMX
namespace {
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
}  // namespace

FASTKERN_AMX void amx_begin() {
  static const AmxTileConfig cfg = [] {
    AmxTileConfig c;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
    return c;
  }();
  _tile_loadconfig(&cfg);
}

FASTKERN_AMX void amx_end() { _tile_release(); }
#endif

Isa parse_isa(const std::string& name) {
  if (name == "auto") return Isa::Auto;
  if (name == "generic") return Isa::Generic;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx2vnni") return Isa::Avx2Vnni;
  if (name == "avx512") return Isa::Avx512;
  if (name == "amx") return Isa::Amx;
  TORCH_CHECK(false, "fastkern: unknown CPU path '", name,
              "'; expected auto, generic, avx2, avx2vnni, avx512 or amx");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic:
      return "generic";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx2Vnni:
      return "avx2vnni";
    case Isa::Avx512:
      return "avx512";
    case Isa::Amx:
      return "amx";
    default:
      return "auto";
  }
}

}  // namespace cpu
}  // namespace fastkern
