// The public ops' CPU kernel (torch.ops.fastkern.*, defined in fastkern/ops.py).
//
// A call with CPU tensors runs fastkern_C's kernel straight from here when nothing asks for
// another backend (no use_backend() naming one, FASTKERN_BACKEND unset or "cpu") and the
// arguments pass the same well-formedness test as the op's Python check (ops.py, _check_*):
// the common call then skips the Python check, the backend choice and a second trip through
// the dispatcher (64 x 64 W8A8 at M = 1: 10.5 us a call through Python, 6.3 us here, 6.0 us
// calling the native op itself). Every other call
// goes to the Python hook (set_cpu_hook), which checks the arguments with the messages that
// name the tensor, picks the backend and runs it, as before. The test here is written to
// accept exactly what the Python one's fast expression accepts, so an input the Python check
// would refuse still reaches it.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <iterator>
#include <string>

#include "py_hook.h"

namespace fastkern {
namespace {

// Leaked on purpose, as the autograd hook: the kernel may run while the interpreter shuts down.
pybind11::object* g_cpu_hook = nullptr;
PyObject* g_requested = nullptr;  // fastkern._backend.requested_backend

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}
bool on(const at::Tensor& t, const at::Device& dev) { return t.device() == dev; }
bool shape1(const at::Tensor& t, int64_t n) { return t.dim() == 1 && t.size(0) == n; }
bool shape2(const at::Tensor& t, int64_t a, int64_t b) { return t.dim() == 2 && t.size(0) == a && t.size(1) == b; }
// The optional bias: None, or float [n] on dev.
bool bias_ok(const c10::IValue& b, int64_t n, const at::Device& dev) {
  if (b.isNone()) return true;
  const at::Tensor& t = b.toTensor();
  return is_float(t) && shape1(t, n) && on(t, dev);
}

// ops.py's K limits of the exact int32 sums (INT8_GEMM_MAX_K, W8A8_MAX_K)
constexpr int64_t kInt8GemmMaxK = 131071;
constexpr int64_t kW8A8MaxK = 132104;

bool w8_ok(const c10::IValue* a, bool w8a8) {
  const at::Tensor &x = a[0].toTensor(), &w = a[1].toTensor(), &s = a[2].toTensor();
  if (!(is_float(x) && w.scalar_type() == at::kChar && w.dim() == 2 && x.dim() >= 1)) return false;
  const int64_t n = w.size(0), k = w.size(1);
  const at::Device dev = x.device();
  return x.size(-1) == k && is_float(s) && shape1(s, n) && on(w, dev) && on(s, dev) && bias_ok(a[3], n, dev) &&
         (!w8a8 || k <= kW8A8MaxK);
}

// The public ops, in the order of their kernels' registration below.
enum class Op { Gemm, Int8Gemm, W8A16, W8A8, W4A16, W4A8, Sparse24, BlockSparse };
constexpr const char* kOpNames[] = {"gemm",        "int8_gemm",       "linear_w8a16", "linear_w8a8",
                                    "linear_w4a16", "linear_w4a8", "linear_sparse24", "linear_blocksparse"};

// Whether the arguments of `op` pass ops.py's fast check (a[0..n): the op's arguments).
bool well_formed(Op op, const c10::IValue* a) {
  if (!a[0].isTensor()) return false;
  const at::Tensor& x = a[0].toTensor();
  const at::Device dev = x.device();
  if (op == Op::Gemm) {
    const at::Tensor& b = a[1].toTensor();
    return is_float(x) && b.scalar_type() == x.scalar_type() && b.dim() == 2 && x.dim() >= 1 &&
           x.size(-1) == b.size(1) && on(b, dev);
  }
  if (op == Op::Int8Gemm) {
    const at::Tensor& b = a[1].toTensor();
    return x.scalar_type() == at::kChar && b.scalar_type() == at::kChar && b.dim() == 2 && x.dim() >= 1 &&
           x.size(-1) == b.size(1) && on(b, dev) && b.size(1) <= kInt8GemmMaxK;
  }
  if (op == Op::W8A16) return w8_ok(a, false);
  if (op == Op::W8A8) return w8_ok(a, true);
  if (op == Op::W4A16 || op == Op::W4A8) {  // one argument list and one check
    const at::Tensor &w = a[1].toTensor(), &sc = a[2].toTensor(), &z = a[3].toTensor();
    const int64_t g = a[4].toInt();
    if (!(is_float(x) && w.scalar_type() == at::kByte && w.dim() == 2 && x.dim() >= 1 && g > 0)) return false;
    const int64_t n = w.size(0), k = 2 * w.size(1);
    return x.size(-1) == k && g % 2 == 0 && k % g == 0 && is_float(sc) && shape2(sc, n, k / g) &&
           z.scalar_type() == at::kByte && shape2(z, n, k / g) && on(w, dev) && on(sc, dev) && on(z, dev) &&
           bias_ok(a[5], n, dev);
  }
  if (op == Op::Sparse24) {
    const at::Tensor &v = a[1].toTensor(), &m = a[2].toTensor();
    if (!(is_float(x) && v.scalar_type() == x.scalar_type() && v.dim() == 2 && x.dim() >= 1)) return false;
    const int64_t n = v.size(0), k = 2 * v.size(1);
    return x.size(-1) == k && k % 4 == 0 && m.scalar_type() == at::kByte && shape2(m, n, k / 4) && on(v, dev) &&
           on(m, dev) && bias_ok(a[3], n, dev);
  }
  if (op == Op::BlockSparse) {
    const at::Tensor &blocks = a[1].toTensor(), &row_ptr = a[2].toTensor(), &col_idx = a[3].toTensor();
    const int64_t out_features = a[4].toInt();
    if (!(is_float(x) && blocks.scalar_type() == x.scalar_type() && blocks.dim() == 3 && x.dim() >= 1 &&
          out_features >= 0 && row_ptr.scalar_type() == at::kLong && col_idx.scalar_type() == at::kLong))
      return false;
    const int64_t nnz = blocks.size(0), bn = blocks.size(1), bk = blocks.size(2);
    return bn > 0 && bk > 0 && shape1(row_ptr, (out_features + bn - 1) / bn + 1) && shape1(col_idx, nnz) &&
           on(blocks, dev) && on(row_ptr, dev) && on(col_idx, dev) && bias_ok(a[5], out_features, dev);
  }
  return false;
}

// Whether the backend a call would take now is the default, "cpu": fastkern's
// requested_backend() (use_backend()'s ContextVar, then FASTKERN_BACKEND as os.environ holds
// it) returns None or "cpu". One call into Python (~0.3 us), so that every way of asking for a
// backend is honoured exactly as the Python path honours it.
bool default_backend() {
  if (g_requested == nullptr) return false;
  pybind11::gil_scoped_acquire gil;
  PyObject* v = PyObject_CallNoArgs(g_requested);
  if (v == nullptr) {  // an invalid FASTKERN_BACKEND: the Python path raises it
    PyErr_Clear();
    return false;
  }
  const bool ok = v == Py_None || (PyUnicode_Check(v) && PyUnicode_CompareWithASCIIString(v, "cpu") == 0);
  Py_DECREF(v);
  return ok;
}

// fastkern_C's op of the same name, if it has a CPU kernel (looked up once: _C registers all
// its kernels when it loads, before any call)
const c10::OperatorHandle* native_cpu(Op op) {
  static const auto handles = [] {
    std::array<c10::optional<c10::OperatorHandle>, std::size(kOpNames)> h;
    for (size_t i = 0; i < h.size(); ++i) {
      auto found = c10::Dispatcher::singleton().findOp(c10::OperatorName(std::string("fastkern_C::") + kOpNames[i], ""));
      if (found.has_value() && found->hasKernelForDispatchKey(c10::DispatchKey::CPU)) h[i] = found;
    }
    return h;
  }();
  const auto& h = handles[static_cast<size_t>(op)];
  return h.has_value() ? &*h : nullptr;
}

template <Op OP>
void cpu_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size(), first = stack->size() - n;
  const c10::OperatorHandle* native = native_cpu(OP);
  if (native != nullptr && default_backend() && well_formed(OP, stack->data() + first)) {
    native->redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
    return;
  }
  TORCH_CHECK(g_cpu_hook != nullptr, "fastkern: ", schema.name(),
              " has no CPU entry: fastkern.ops has not installed its hook (import fastkern)");
  call_python_hook(*g_cpu_hook, schema, stack, first, n);
}

}  // namespace

void set_cpu_hook(pybind11::object fn, pybind11::object requested_backend) {
  pybind11::gil_scoped_acquire gil;
  if (g_cpu_hook == nullptr) g_cpu_hook = new pybind11::object();
  *g_cpu_hook = std::move(fn);
  Py_XDECREF(g_requested);
  g_requested = requested_backend.release().ptr();
}

}  // namespace fastkern

TORCH_LIBRARY_IMPL(fastkern, CPU, m) {
  using fastkern::Op;
  using fastkern::cpu_kernel;
  using torch::CppFunction;
  m.impl("gemm", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::Gemm>>());
  m.impl("int8_gemm", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::Int8Gemm>>());
  m.impl("linear_w8a16", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::W8A16>>());
  m.impl("linear_w8a8", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::W8A8>>());
  m.impl("linear_w4a16", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::W4A16>>());
  m.impl("linear_w4a8", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::W4A8>>());
  m.impl("linear_sparse24", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::Sparse24>>());
  m.impl("linear_blocksparse", CppFunction::makeFromBoxedFunction<&cpu_kernel<Op::BlockSparse>>());
}
