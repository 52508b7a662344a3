// Autograd for the public ops (torch.ops.fastkern.*, defined in fastkern/ops.py).
//
// One boxed kernel on the Autograd key of every public op. A call with grad mode off, or with
// no tensor argument that requires grad (inference, and every call under torch.no_grad), goes
// straight below autograd here in C++: the inference path pays no Python frame for it. A call
// that does need gradients goes to the Python hook that fastkern/ops.py installs
// (set_autograd_hook), which runs the op inside a torch.autograd.Function whose backward
// rebuilds the dense weight from the op's own format. Without this kernel PyTorch's fallback
// left every input gradient None, with only a deprecation warning.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include "autograd.h"
#include "py_hook.h"

namespace fastkern {
namespace {

// Leaked on purpose: the kernel may still be registered while the interpreter shuts down.
pybind11::object* g_hook = nullptr;

bool wants_grad(const torch::jit::Stack& stack, size_t first) {
  if (!at::GradMode::is_enabled()) return false;
  for (size_t i = first; i < stack.size(); ++i)
    if (stack[i].isTensor() && stack[i].toTensor().requires_grad()) return true;
  return false;
}

void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size(), first = stack->size() - n;
  if (!wants_grad(*stack, first)) {
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  TORCH_CHECK(g_hook != nullptr, "fastkern autograd: ", schema.name(),
              " needs gradients, but fastkern.ops has not installed its autograd hook (import fastkern)");
  call_python_hook(*g_hook, schema, stack, first, n);
}

}  // namespace

void call_python_hook(const pybind11::object& hook, const c10::FunctionSchema& schema, torch::jit::Stack* stack,
                      size_t first, size_t n) {
  pybind11::gil_scoped_acquire gil;
  pybind11::tuple args(n);
  for (size_t i = 0; i < n; ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensor())
      args[i] = pybind11::cast(v.toTensor());
    else if (v.isNone())
      args[i] = pybind11::none();
    else if (v.isInt())
      args[i] = pybind11::int_(v.toInt());
    else
      TORCH_CHECK(false, "fastkern: ", schema.name(), " argument ", schema.arguments()[i].name(),
                  " has a type the Python hook is not passed (", v.tagKind(), ")");
  }
  pybind11::object out = hook(short_name(schema), args);
  at::Tensor y = out.cast<at::Tensor>();
  torch::jit::drop(*stack, n);
  stack->emplace_back(std::move(y));
}

void set_autograd_hook(pybind11::object fn) {
  if (g_hook == nullptr) g_hook = new pybind11::object();
  *g_hook = std::move(fn);
}

}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern, Autograd, m) {
  for (const char* name : {"gemm", "int8_gemm", "linear_w8a16", "linear_w8a8", "linear_w4a16", "linear_w4a8",
                           "linear_sparse24", "linear_blocksparse"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fastkern::autograd_kernel>());
}
