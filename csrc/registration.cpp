// The schemas of fastkern's native kernels and the pybind11 module fastkern._C.
//
// The public ops live in the `fastkern` namespace and are defined in Python
// (fastkern/ops.py), which routes each call to a backend. The native kernels
// are registered here under `fastkern_C` with the same schemas; each family's
// file adds its CPU (csrc/cpu) or CUDA (csrc/cuda) implementation with
// TORCH_LIBRARY_IMPL. Argument conventions and formats: DESIGN.md §2-§3.
#include <torch/extension.h>
#include <torch/library.h>

#include "autograd.h"
#include "cpu/isa.h"
#include "cpu/fma_probe.h"

TORCH_LIBRARY(fastkern_C, m) {
  m.def("gemm(Tensor a, Tensor b) -> Tensor");
  m.def("int8_gemm(Tensor a, Tensor b) -> Tensor");
  m.def("linear_w8a16(Tensor x, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor");
  m.def("linear_w8a8(Tensor x, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor");
  m.def(
      "linear_w4a16(Tensor x, Tensor w, Tensor scales, Tensor zeros, int group_size, "
      "Tensor? bias) -> Tensor");
  m.def(
      "linear_w4a8(Tensor x, Tensor w, Tensor scales, Tensor zeros, int group_size, "
      "Tensor? bias) -> Tensor");
  m.def("linear_sparse24(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
  m.def(
      "linear_blocksparse(Tensor x, Tensor blocks, Tensor row_ptr, Tensor col_idx, "
      "int out_features, Tensor? bias) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = FASTKERN_VERSION;
  d["torch_version"] = FASTKERN_TORCH_VERSION;
  d["with_cuda"] = static_cast<bool>(FASTKERN_WITH_CUDA);
  d["cuda_archs"] = FASTKERN_CUDA_ARCHS;
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  return d;
}

pybind11::dict cpu_features() {
  const auto& f = fastkern::cpu::features();
  pybind11::dict d;
  d["avx"] = f.avx;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512vnni"] = f.avx512vnni;
  d["avx512bf16"] = f.avx512bf16;
  d["avxvnni"] = f.avxvnni;
  d["amx_int8"] = f.amx_int8;
  return d;
}

pybind11::dict cpu_l1d() {
  const auto& f = fastkern::cpu::features();
  pybind11::dict d;
  d["ways"] = f.l1d_ways;
  d["sets"] = f.l1d_sets;
  d["line"] = f.l1d_line;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastkern native kernels (ops are registered under torch.ops.fastkern_C)";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("cpu_features", &cpu_features, "CPU features detected at run time");
  m.def("cpu_l1d", &cpu_l1d, "The L1 data cache's geometry the kernels plan for (ways, sets, line bytes)");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) { fastkern::cpu::set_isa(fastkern::cpu::parse_isa(name)); },
      "Force the CPU kernel path: 'auto', 'generic', 'avx2' or 'avx512'");
  m.def(
      "fma_peak",
      [](double seconds) {
        const auto r = fastkern::cpu::measure_fma_peak(seconds);
        pybind11::dict d;
        d["gflops"] = r.gflops;
        d["isa"] = std::string(r.isa);
        d["threads"] = r.threads;
        return d;
      },
      pybind11::arg("seconds") = 0.25,
      "Measured fp32 FMA throughput (GFLOP/s) of register-only loops on every torch thread, "
      "on the active CPU kernel path");
  m.def(
      "int8_peak",
      [](double seconds) {
        const auto r = fastkern::cpu::measure_int8_peak(seconds);
        pybind11::dict d;
        d["exact_gmacs"] = r.exact_gmacs;
        d["u8s8_gmacs"] = r.u8s8_gmacs;
        d["vnni_gmacs"] = r.vnni_gmacs;
        d["amx_gmacs"] = r.amx_gmacs;
        d["threads"] = r.threads;
        d["isa"] = std::string(fastkern::cpu::isa_name(fastkern::cpu::active_isa()));
        return d;
      },
      pybind11::arg("seconds") = 0.25,
      "Measured int8 multiply-accumulate throughput (GMAC/s, every torch thread) of register-only AVX2 "
      "loops: the exact int16 mix (vpmaddwd + vpaddd) and the u8 x s8 mix (vpmaddubsw + vpmaddwd + vpaddd); "
      "0 without AVX2; and of vpdpbusd (vnni_gmacs) where the active path has it (zmm on AVX-512 with VNNI, ymm on "
      "avx2vnni), else 0; and of AMX tdpbsud on tiles (amx_gmacs) on the amx path, else 0");
  m.def(
      "read_bw",
      [](int64_t nbytes, int reps) {
        const auto isa = std::string(fastkern::cpu::isa_name(fastkern::cpu::active_isa()));
        pybind11::dict d;
        d["gbs"] = fastkern::cpu::measure_read_bw(nbytes, reps);
        d["isa"] = isa;
        d["threads"] = at::get_num_threads();
        return d;
      },
      pybind11::arg("nbytes"), pybind11::arg("reps") = 5,
      "Streaming read bandwidth (GB/s) of vector loads on every torch thread over an nbytes buffer");
  m.def("parallel_width", &fastkern::cpu::parallel_width, pybind11::arg("n"),
        "Distinct threads at::parallel_for(0, n, 1) uses inside this extension");
  m.def(
      "cpu_isa", []() { return std::string(fastkern::cpu::isa_name(fastkern::cpu::active_isa())); },
      "The CPU kernel path in use");
  m.def("set_autograd_hook", &fastkern::set_autograd_hook, pybind11::arg("fn"),
        "fn(op_name, args) runs a call of torch.ops.fastkern.<op_name> that needs gradients");
  m.def("set_cpu_hook", &fastkern::set_cpu_hook, pybind11::arg("fn"), pybind11::arg("requested_backend"),
        "fn(op_name, args) runs a call of torch.ops.fastkern.<op_name> on CPU tensors that the C++ entry "
        "does not run itself");
}
