// The Python hooks of the public ops' autograd kernel (csrc/autograd.cpp) and CPU kernel
// (csrc/cpu_entry.cpp).
#pragma once
#include <torch/extension.h>

namespace fastkern {
// fn(op_name, args_tuple) -> Tensor: called for a call of torch.ops.fastkern.<op_name> that
// needs gradients; set by fastkern/ops.py at import
void set_autograd_hook(pybind11::object fn);
// fn(op_name, args_tuple) -> Tensor: runs a call of torch.ops.fastkern.<op_name> on CPU tensors
// that the C++ entry does not take straight to the native kernel (csrc/cpu_entry.cpp);
// requested_backend: fastkern._backend.requested_backend. Set by fastkern/ops.py at import.
void set_cpu_hook(pybind11::object fn, pybind11::object requested_backend);
}  // namespace fastkern
