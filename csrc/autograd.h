// The Python hook of the public ops' autograd kernel (csrc/autograd.cpp).
#pragma once
#include <torch/extension.h>

namespace fastkern {
// fn(op_name, args_tuple) -> Tensor: called for a call of torch.ops.fastkern.<op_name> that
// needs gradients; set by fastkern/ops.py at import
void set_autograd_hook(pybind11::object fn);
}  // namespace fastkern
