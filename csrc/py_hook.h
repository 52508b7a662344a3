// Calls from the public ops' boxed C++ kernels into Python (csrc/autograd.cpp, csrc/cpu_entry.cpp).
#pragma once
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace fastkern {

// The op's name without its namespace ("fastkern::gemm" -> "gemm").
inline std::string short_name(const c10::FunctionSchema& schema) {
  const std::string& full = schema.name();
  return full.substr(full.find("::") + 2);
}

// The op's n arguments on the stack (from `first`) run through hook(op_name, args), its result
// in their place. Arguments are tensors, None or ints (every public schema's kinds).
void call_python_hook(const pybind11::object& hook, const c10::FunctionSchema& schema, torch::jit::Stack* stack,
                      size_t first, size_t n);

}  // namespace fastkern
