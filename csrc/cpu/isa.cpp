#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include <c10/util/Exception.h>

namespace fastkern {
namespace cpu {

namespace {

Features detect() {
  Features f;
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
    default:
      return false;
  }
}

Isa best() {
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

Isa parse_isa(const std::string& name) {
  if (name == "auto") return Isa::Auto;
  if (name == "generic") return Isa::Generic;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx2vnni") return Isa::Avx2Vnni;
  if (name == "avx512") return Isa::Avx512;
  TORCH_CHECK(false, "fastkern: unknown CPU path '", name, "'; expected auto, generic, avx2, avx2vnni or avx512");
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
    default:
      return "auto";
  }
}

}  // namespace cpu
}  // namespace fastkern
