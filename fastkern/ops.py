"""The op catalogue (DESIGN.md §2).

Every op is a ``torch.ops.fastkern.<name>`` custom op with one schema, one input
check, one reference implementation (plain torch, upcast math: the specification),
one fake kernel (so torch.compile / torch.export trace through it) and a table of
backend kernels. Calling the op checks the inputs once, picks a backend
(``use_backend`` > ``FASTKERN_BACKEND`` > the best one built for the tensors'
device) and runs that backend's kernel.

With the native extension, a call on CPU tensors enters C++ first (csrc/cpu_entry.cpp): when
no other backend is asked for and the arguments pass the same fast check as below, it runs
the cpu backend's kernel there and then; every other call comes back here.

Backends:
  cpu        C++ kernels in fastkern._C, registered as torch.ops.fastkern_C.* (CPU key)
  cuda       CUDA C++ kernels in fastkern._C, same ops (CUDA key)
  triton     fastkern/triton (GPU; on CPU tensors only under TRITON_INTERPRET=1)
  reference  the references below, on any device
"""
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastkern import _ext, formats
from fastkern._backend import BACKENDS, BackendUnavailableError, requested_backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------- checks
#
# Each op's check is one expression that accepts well-formed inputs at the cost of a few
# attribute reads; only when it fails does the op's _explain_* run the checks step by step,
# and the first of those that fails raises the error that names the tensor. The expression
# may reject good inputs (_explain_* then passes them), never accept bad ones; the tests
# hold the two to the same verdict.


def describe(name: str, t: torch.Tensor) -> str:
    return "%s (shape %s, dtype %s, device %s)" % (name, list(t.shape), str(t.dtype).replace("torch.", ""), t.device)


def _fail(msg: str):
    raise ValueError("fastkern: " + msg)


def _check_float(name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError("fastkern: %s must be float32, float16 or bfloat16, got %s" % (name, describe(name, t)))


def _check_dtype(name, t, dtype):
    if t.dtype != dtype:
        raise TypeError("fastkern: %s must be %s, got %s" % (name, str(dtype).replace("torch.", ""), describe(name, t)))


def _check_shape(name, t, shape):
    if list(t.shape) != list(shape):
        _fail("%s must have shape %s, got %s" % (name, list(shape), describe(name, t)))


def _check_x(name, x, k):
    if x.dim() < 1:
        _fail("%s must have at least one dimension [..., K], got %s" % (name, describe(name, x)))
    if x.shape[-1] != k:
        _fail("%s must have K=%d features in its last dimension, got %s" % (name, k, describe(name, x)))


def _check_devices(named):
    dev = named[0][1].device
    for name, t in named[1:]:
        if t is not None and t.device != dev:
            _fail(
                "all tensors must be on one device: %s is on %s but %s"
                % (named[0][0], dev, describe(name, t))
            )


def _check_2d(name, t):
    if t.dim() != 2:
        _fail("%s must be 2-D [N, K], got %s" % (name, describe(name, t)))


def _check_bias(bias, n):
    if bias is None:
        return
    _check_float("bias", bias)
    _check_shape("bias", bias, [n])


def _check_gemm(a, b):
    dt = a.dtype
    if (dt in FLOAT_DTYPES and b.dtype == dt and b.dim() == 2 and a.dim() >= 1 and a.shape[-1] == b.shape[1]
            and b.device == a.device):
        return
    _explain_gemm(a, b)


def _explain_gemm(a, b):
    _check_float("a", a)
    _check_float("b", b)
    _check_2d("b", b)
    _check_x("a", a, b.shape[1])
    if a.dtype != b.dtype:
        raise TypeError("fastkern: gemm needs a and b of one dtype, got %s and %s" % (describe("a", a), describe("b", b)))
    _check_devices([("a", a), ("b", b)])


# The longest K whose int32 sums are exact for every int8 input: int8_gemm's operands may both
# hold -128 (K * 128 * 128 < 2^31); linear_w8a8 quantizes x to +-127 (K * 127 * 128 < 2^31).
INT8_GEMM_MAX_K = 131071
W8A8_MAX_K = 132104


def _check_k_limit(op, name, t, k, limit):
    if k > limit:
        _fail("%s: %s has K=%d; its int32 sums are exact only for K <= %d" % (op, describe(name, t), k, limit))


def _check_int8_gemm(a, b):
    if (a.dtype == torch.int8 and b.dtype == torch.int8 and b.dim() == 2 and a.dim() >= 1
            and a.shape[-1] == b.shape[1] and b.device == a.device and b.shape[1] <= INT8_GEMM_MAX_K):
        return
    _explain_int8_gemm(a, b)


def _explain_int8_gemm(a, b):
    _check_dtype("a", a, torch.int8)
    _check_dtype("b", b, torch.int8)
    _check_2d("b", b)
    _check_x("a", a, b.shape[1])
    _check_devices([("a", a), ("b", b)])
    _check_k_limit("int8_gemm", "b", b, b.shape[1], INT8_GEMM_MAX_K)


def _check_w8(x, w, w_scale, bias):
    if x.dtype in FLOAT_DTYPES and w.dtype == torch.int8 and w.dim() == 2 and x.dim() >= 1:
        n, k = w.shape
        dev = x.device
        if (x.shape[-1] == k and w_scale.dtype in FLOAT_DTYPES and w_scale.shape == (n,)
                and w.device == dev and w_scale.device == dev
                and (bias is None or (bias.dtype in FLOAT_DTYPES and bias.shape == (n,) and bias.device == dev))):
            return
    _explain_w8(x, w, w_scale, bias)


def _explain_w8(x, w, w_scale, bias):
    _check_float("x", x)
    _check_dtype("w", w, torch.int8)
    _check_2d("w", w)
    n, k = w.shape
    _check_x("x", x, k)
    _check_float("w_scale", w_scale)
    _check_shape("w_scale", w_scale, [n])
    _check_bias(bias, n)
    _check_devices([("x", x), ("w", w), ("w_scale", w_scale), ("bias", bias)])


def _check_w8a8(x, w, w_scale, bias):
    _check_w8(x, w, w_scale, bias)
    if w.shape[1] > W8A8_MAX_K:
        _explain_w8a8(x, w, w_scale, bias)


def _explain_w8a8(x, w, w_scale, bias):
    _explain_w8(x, w, w_scale, bias)
    _check_k_limit("linear_w8a8", "w", w, w.shape[1], W8A8_MAX_K)


def _check_w4a16(x, w, scales, zeros, group_size, bias):
    if x.dtype in FLOAT_DTYPES and w.dtype == torch.uint8 and w.dim() == 2 and x.dim() >= 1 and group_size > 0:
        n, k = w.shape[0], 2 * w.shape[1]
        dev = x.device
        if (x.shape[-1] == k and group_size % 2 == 0 and k % group_size == 0
                and scales.dtype in FLOAT_DTYPES and scales.shape == (n, k // group_size)
                and zeros.dtype == torch.uint8 and zeros.shape == (n, k // group_size)
                and w.device == dev and scales.device == dev and zeros.device == dev
                and (bias is None or (bias.dtype in FLOAT_DTYPES and bias.shape == (n,) and bias.device == dev))):
            return
    _explain_w4a16(x, w, scales, zeros, group_size, bias)


def _explain_w4a16(x, w, scales, zeros, group_size, bias):
    _check_float("x", x)
    _check_dtype("w", w, torch.uint8)
    _check_2d("w", w)
    n, k = w.shape[0], 2 * w.shape[1]
    _check_x("x", x, k)
    if group_size <= 0 or group_size % 2 or k % group_size:
        _fail("group_size=%d must be a positive even number dividing K=%d (w is %s)" % (group_size, k, describe("w", w)))
    _check_float("scales", scales)
    _check_shape("scales", scales, [n, k // group_size])
    _check_dtype("zeros", zeros, torch.uint8)
    _check_shape("zeros", zeros, [n, k // group_size])
    _check_bias(bias, n)
    _check_devices([("x", x), ("w", w), ("scales", scales), ("zeros", zeros), ("bias", bias)])


def _check_sparse24(x, values, meta, bias):
    dt = x.dtype
    if dt in FLOAT_DTYPES and values.dtype == dt and values.dim() == 2 and x.dim() >= 1:
        n, k = values.shape[0], 2 * values.shape[1]
        dev = x.device
        if (x.shape[-1] == k and k % 4 == 0 and meta.dtype == torch.uint8 and meta.shape == (n, k // 4)
                and values.device == dev and meta.device == dev
                and (bias is None or (bias.dtype in FLOAT_DTYPES and bias.shape == (n,) and bias.device == dev))):
            return
    _explain_sparse24(x, values, meta, bias)


def _explain_sparse24(x, values, meta, bias):
    _check_float("x", x)
    _check_float("values", values)
    _check_2d("values", values)
    n, k = values.shape[0], 2 * values.shape[1]
    _check_x("x", x, k)
    if k % 4:
        _fail("2:4 sparsity needs K divisible by 4, got K=%d from %s" % (k, describe("values", values)))
    if values.dtype != x.dtype:
        raise TypeError("fastkern: values must have x's dtype %s, got %s" % (x.dtype, describe("values", values)))
    _check_dtype("meta", meta, torch.uint8)
    _check_shape("meta", meta, [n, k // 4])
    _check_bias(bias, n)
    _check_devices([("x", x), ("values", values), ("meta", meta), ("bias", bias)])


def _check_blocksparse(x, blocks, row_ptr, col_idx, out_features, bias):
    dt = x.dtype
    if (dt in FLOAT_DTYPES and blocks.dtype == dt and blocks.dim() == 3 and x.dim() >= 1 and out_features >= 0
            and row_ptr.dtype == torch.int64 and col_idx.dtype == torch.int64):
        nnz, bn, bk = blocks.shape
        dev = x.device
        if (bn > 0 and bk > 0 and row_ptr.shape == (-(-out_features // bn) + 1,) and col_idx.shape == (nnz,)
                and blocks.device == dev and row_ptr.device == dev and col_idx.device == dev
                and (bias is None or (bias.dtype in FLOAT_DTYPES and bias.shape == (out_features,)
                                      and bias.device == dev))):
            return
    _explain_blocksparse(x, blocks, row_ptr, col_idx, out_features, bias)


def _explain_blocksparse(x, blocks, row_ptr, col_idx, out_features, bias):
    _check_float("x", x)
    _check_float("blocks", blocks)
    if blocks.dim() != 3:
        _fail("blocks must be 3-D [nnz_blocks, bn, bk], got %s" % describe("blocks", blocks))
    if blocks.dtype != x.dtype:
        raise TypeError("fastkern: blocks must have x's dtype %s, got %s" % (x.dtype, describe("blocks", blocks)))
    _, bn, bk = blocks.shape
    if bn <= 0 or bk <= 0:
        _fail("blocks must have a positive block size, got %s" % describe("blocks", blocks))
    if out_features < 0:
        _fail("out_features must be >= 0, got %d" % out_features)
    _check_dtype("row_ptr", row_ptr, torch.int64)
    _check_dtype("col_idx", col_idx, torch.int64)
    _check_shape("row_ptr", row_ptr, [-(-out_features // bn) + 1])
    _check_shape("col_idx", col_idx, [blocks.shape[0]])
    if x.dim() < 1:
        _fail("x must have at least one dimension [..., K], got %s" % describe("x", x))
    _check_bias(bias, out_features)
    _check_devices([("x", x), ("blocks", blocks), ("row_ptr", row_ptr), ("col_idx", col_idx), ("bias", bias)])


# ----------------------------------------------------------------------- references


def _finish(out_f32, bias, dtype):
    if bias is not None:
        out_f32 = out_f32 + bias.float()
    return out_f32.to(dtype)


def gemm_ref(a, b):
    return (a.float() @ b.float().T).to(a.dtype)


def int8_gemm_ref(a, b):
    # float64 holds every int8 dot product exactly for K < 2**38
    return (a.double() @ b.double().T).to(torch.int32)


def linear_w8a16_ref(x, w, w_scale, bias):
    return _finish(x.float() @ formats.dequantize_int8(w, w_scale).T, bias, x.dtype)


def linear_w8a8_ref(x, w, w_scale, bias):
    q, s = formats.quantize_per_token(x)
    acc = q.double() @ w.double().T  # exact integer dot products
    out = (acc * s.double() * w_scale.double()).float()
    return _finish(out, bias, x.dtype)


def linear_w4a16_ref(x, w, scales, zeros, group_size, bias):
    return _finish(x.float() @ formats.dequantize_int4(w, scales, zeros, group_size).T, bias, x.dtype)


def linear_w4a8_ref(x, w, scales, zeros, group_size, bias):
    # x quantized per token as linear_w8a8 does; float64 holds every product of an int8
    # activation and a dequantized weight ((q - z) * s, an fp32 number times an integer <= 15)
    # exactly, and their sums within 2^-52 of the exact value
    q, s = formats.quantize_per_token(x)
    acc = q.double() @ formats.dequantize_int4(w, scales, zeros, group_size).double().T
    return _finish((acc * s.double()).float(), bias, x.dtype)


def linear_sparse24_ref(x, values, meta, bias):
    return _finish(x.float() @ formats.decompress_2_4(values, meta).float().T, bias, x.dtype)


def linear_blocksparse_ref(x, blocks, row_ptr, col_idx, out_features, bias):
    # blocks past K (a malformed col_idx) meet no column of x: blocksparse_to_dense drops them
    dense = formats.blocksparse_to_dense(blocks, row_ptr, col_idx, (out_features, x.shape[-1]))
    return _finish(x.float() @ dense.float().T, bias, x.dtype)


# ---------------------------------------------------------------------- the catalogue


@dataclass
class OpSpec:
    name: str
    schema: str
    check: Callable
    reference: Callable
    out: Callable  # (*args) -> (shape, dtype) of the result, for the fake kernel


def _out_linear(x, w_rows):
    return list(x.shape[:-1]) + [w_rows]


OPS = {
    spec.name: spec
    for spec in [
        OpSpec("gemm", "(Tensor a, Tensor b) -> Tensor", _check_gemm, gemm_ref,
               lambda a, b: (_out_linear(a, b.shape[0]), a.dtype)),
        OpSpec("int8_gemm", "(Tensor a, Tensor b) -> Tensor", _check_int8_gemm, int8_gemm_ref,
               lambda a, b: (_out_linear(a, b.shape[0]), torch.int32)),
        OpSpec("linear_w8a16", "(Tensor x, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor", _check_w8,
               linear_w8a16_ref, lambda x, w, *_: (_out_linear(x, w.shape[0]), x.dtype)),
        OpSpec("linear_w8a8", "(Tensor x, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor", _check_w8a8,
               linear_w8a8_ref, lambda x, w, *_: (_out_linear(x, w.shape[0]), x.dtype)),
        OpSpec("linear_w4a16",
               "(Tensor x, Tensor w, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor",
               _check_w4a16, linear_w4a16_ref, lambda x, w, *_: (_out_linear(x, w.shape[0]), x.dtype)),
        OpSpec("linear_w4a8",
               "(Tensor x, Tensor w, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor",
               _check_w4a16, linear_w4a8_ref, lambda x, w, *_: (_out_linear(x, w.shape[0]), x.dtype)),
        OpSpec("linear_sparse24", "(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor",
               _check_sparse24, linear_sparse24_ref,
               lambda x, values, *_: (_out_linear(x, values.shape[0]), x.dtype)),
        OpSpec("linear_blocksparse",
               "(Tensor x, Tensor blocks, Tensor row_ptr, Tensor col_idx, int out_features, Tensor? bias) -> Tensor",
               _check_blocksparse, linear_blocksparse_ref,
               lambda x, blocks, row_ptr, col_idx, out_features, bias: (_out_linear(x, out_features), x.dtype)),
    ]
}

# (op, backend) -> kernel taking the op's arguments
_KERNELS = {}
# backends whose kernels are registered by importing a module, on first use
_LAZY_BACKENDS = {"triton": "fastkern.triton"}
_lazy_loaded = {}


def register_kernel(op: str, backend: str):
    """Decorator: ``fn`` implements ``op`` for ``backend`` (used by fastkern/triton)."""
    if op not in OPS:
        raise KeyError("fastkern: unknown op %r" % op)
    if backend not in BACKENDS:
        raise KeyError("fastkern: unknown backend %r" % backend)

    def deco(fn):
        _KERNELS[(op, backend)] = fn
        _DEFAULT.clear()  # a new kernel can change the default choice (a GPU without cuda kernels)
        return fn

    return deco


def _native(op):
    # the overload's C++ entry point: OpOverload.__call__ is one Python frame around it
    # (calling the packet would also resolve the overload again on every call)
    overload = getattr(torch.ops.fastkern_C, op).default
    return getattr(overload, "_op", overload)


def _load_lazy(backend):
    if backend not in _lazy_loaded:
        try:
            importlib.import_module(_LAZY_BACKENDS[backend])
            _lazy_loaded[backend] = None
        except ImportError as e:
            _lazy_loaded[backend] = str(e)
    return _lazy_loaded[backend]


@functools.lru_cache(maxsize=None)
def _with_cuda() -> bool:
    return bool(_ext._C.build_info()["with_cuda"])


def backend_status(op: str, backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    dev = device.type
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if backend != dev:
            return "the %s backend runs %s tensors, these are on %s" % (backend, backend, device)
        if _ext._C is None:
            return "fastkern._C is not built (%s)" % _ext.LOAD_ERROR
        if backend == "cuda" and not _with_cuda():
            return "fastkern._C was built without CUDA kernels (rebuild with FASTKERN_CUDA=1)"
        if not _ext.has_kernel(op, "CPU" if backend == "cpu" else "CUDA"):
            return "fastkern._C has no %s kernel for %s" % (backend, op)
        return None
    if backend == "triton":
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the triton backend runs CPU tensors only under TRITON_INTERPRET=1"
        if dev not in ("cpu", "cuda"):
            return "the triton backend does not run on %s" % device
        err = _load_lazy("triton")
        if err is not None:
            return "triton is not available (%s)" % err
        if (op, "triton") not in _KERNELS:
            return "fastkern.triton has no kernel for %s" % op
        return None
    return "unknown backend %r" % backend


_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


# Every op call selects a backend, so what cannot change between calls is remembered:
# _DEFAULT: (op, device type) -> (backend, kernel) of the default choice. It depends only on
#   what was built (fastkern._C and its kernels, fixed once loaded) and on the registered
#   kernels (register_kernel clears it), never on the environment or the context:
#   use_backend and FASTKERN_BACKEND are read on every call, before it is consulted.
# _RUNNABLE: (op, backend, device type) that a requested backend was found able to run, for
#   the backends whose status is fixed by the build (triton on CPU depends on
#   TRITON_INTERPRET, so it is asked every time). Only successes are kept: a refusal is
#   worked out again and names the actual device.
# _CALLABLES: (op, backend) -> kernel for the native and reference backends.
_DEFAULT = {}
_RUNNABLE = set()
_STATIC_BACKENDS = ("cpu", "cuda", "reference")
_CALLABLES = {}


def _default(op: str, device: torch.device):
    key = (op, device.type)
    hit = _DEFAULT.get(key)
    if hit is None:
        name = "reference"
        for cand in _DEFAULT_ORDER.get(device.type, ("reference",)):
            if backend_status(op, cand, device) is None:
                name = cand
                break
        hit = _DEFAULT[key] = (name, kernel(op, name))
    return hit


def _require(op: str, backend: str, device: torch.device):
    """Raise BackendUnavailableError unless ``backend`` can run ``op`` on ``device``."""
    key = (op, backend, device.type)
    if key in _RUNNABLE:
        return
    reason = backend_status(op, backend, device)
    if reason is not None:
        raise BackendUnavailableError("fastkern: backend %r cannot run %s: %s" % (backend, op, reason))
    if backend in _STATIC_BACKENDS:
        _RUNNABLE.add(key)


def _resolve(op: str, device: torch.device):
    """(backend, kernel) that a call of ``op`` on ``device`` runs on now."""
    want = requested_backend()
    if want is None:
        return _default(op, device)
    _require(op, want, device)
    return want, kernel(op, want)


def select_backend(op: str, device: torch.device) -> str:
    """The backend a call of ``op`` on ``device`` runs on now."""
    return _resolve(op, device)[0]


def kernel(op: str, backend: str) -> Callable:
    """The callable that runs ``op`` on ``backend`` (arguments as the op's)."""
    fn = _CALLABLES.get((op, backend))
    if fn is not None:
        return fn
    if backend in ("cpu", "cuda"):
        fn = _CALLABLES[(op, backend)] = _native(op)
        return fn
    if backend == "reference":
        fn = _CALLABLES[(op, backend)] = OPS[op].reference
        return fn
    if backend in _LAZY_BACKENDS:
        _load_lazy(backend)
    return _KERNELS[(op, backend)]


# ------------------------------------------------------------------- registration

_lib = torch.library.Library("fastkern", "DEF")
# fakes of the native ops go through a library of their own namespace: register_fake
# with a library of another namespace files the kernel under that library's name
_lib_C = torch.library.Library("fastkern_C", "FRAGMENT") if _ext._C is not None else None


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    raise AssertionError("no tensor argument")


def _make_impl(spec):
    name, check = spec.name, spec.check
    assert spec.schema.startswith("(Tensor "), spec.schema  # args[0] is a tensor

    def impl(*args):
        check(*args)
        return _resolve(name, args[0].device)[1](*args)

    impl.__name__ = spec.name
    return impl


def _make_fake(spec):
    def fake(*args):
        spec.check(*args)
        shape, dtype = spec.out(*args)
        return _first_tensor(args).new_empty(shape, dtype=dtype)

    return fake


# op name -> the Python implementation (check, backend choice, kernel) of each op
_IMPLS = {name: _make_impl(spec) for name, spec in OPS.items()}

for _spec in OPS.values():
    _lib.define(_spec.name + _spec.schema)
    # With the native extension its own CPU kernel (csrc/cpu_entry.cpp) takes the ops' CPU
    # calls: straight to fastkern_C when the default backend applies and the arguments pass
    # the fast check, through _IMPLS otherwise.
    for _key in ("CPU", "CUDA") if _ext._C is None else ("CUDA",):
        _lib.impl(_spec.name, _IMPLS[_spec.name], _key)
    torch.library.register_fake("fastkern::" + _spec.name, _make_fake(_spec), lib=_lib)
    if _ext._C is not None:
        # the native kernels share the public schemas; their fakes are the same
        torch.library.register_fake("fastkern_C::" + _spec.name, _make_fake(_spec), lib=_lib_C)


# ---------------------------------------------------------------------- autograd
#
# Every op is differentiable in its floating-point inputs: x (a and b of gemm), the bias, and
# the weight-side floats (weight scales, 2:4 values, blocks). The weight's own integers and
# indices are not. The gradients are those of the reference: grad_x = grad_y @ W and grad_W =
# grad_y^T @ x in fp32 with W the op's dense fp32 weight, carried back to the scales / values
# through the format's dequantization; each cast back to its input's dtype. linear_w8a8 and
# linear_w4a8 pass grad_x straight through their per-token rounding of x (whose own derivative is zero almost
# everywhere): grad_x = grad_y @ (w * w_scale), as quantization-aware training does.
# int8_gemm has no float inputs.
#
# The ops' Autograd kernel (csrc/autograd.cpp) sends a call here only when grad mode is on and
# a tensor argument requires grad; every other call goes below autograd in C++. Without the
# native extension a Python kernel does the same. Second derivatives are not provided.


def _dense_weight(name, args):
    """The op's weight as the dense fp32 [N, K] matrix the reference multiplies by."""
    if name in ("linear_w8a16", "linear_w8a8"):
        return formats.dequantize_int8(args[1], args[2])
    if name in ("linear_w4a16", "linear_w4a8"):
        return formats.dequantize_int4(args[1], args[2], args[3], args[4])
    if name == "linear_sparse24":
        return formats.decompress_2_4(args[1], args[2]).float()
    if name == "linear_blocksparse":
        return formats.blocksparse_to_dense(args[1], args[2], args[3], (args[4], args[0].shape[-1])).float()
    assert name == "gemm", name
    return args[1].float()


# grad_x alone builds the dense weight this many fp32 elements (32 MB) at a time, so that a
# large layer's backward does not hold all of W in fp32 (4096 x 14336: 235 MB). The weight-side
# gradients need the whole W, and the block-sparse weight is sliced only by data-dependent
# offsets (which AOT autograd cannot trace): those build it at once.
_GRAD_CHUNK_ELEMS = 1 << 23


def _weight_rows(name, args, n0, n1):
    """args with the weight cut to its rows [n0, n1) (not for linear_blocksparse)."""
    cut = list(args)
    last = 2 if name == "gemm" else 4 if name in ("linear_w4a16", "linear_w4a8") else 3
    for i in range(1, last):
        cut[i] = args[i][n0:n1]
    return cut


def _grad_x(name, args, gy):
    x = args[0]
    k = x.shape[-1]
    rows = max(1, _GRAD_CHUNK_ELEMS // max(k, 1))
    n = gy.shape[1]
    if name == "linear_blocksparse" or n <= rows:
        return gy @ _dense_weight(name, args)
    gx = gy.new_zeros(gy.shape[0], k)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        gx.addmm_(gy[:, n0:n1], _dense_weight(name, _weight_rows(name, args, n0, n1)))
    return gx


def _backward(name, args, need, grad_y):
    grads = [None] * len(args)
    if not any(need):
        return grads
    x = args[0]
    bias_i = None if name == "gemm" else len(args) - 1
    gy = grad_y.reshape(-1, grad_y.shape[-1]).float()
    weight_side = [i for i in range(1, len(args)) if i != bias_i and need[i]]
    if weight_side:
        with torch.enable_grad():
            leaves = {i: args[i].detach().requires_grad_() for i in weight_side}
            W = _dense_weight(name, [leaves.get(i, a) for i, a in enumerate(args)])
    if need[0]:
        gx = gy @ W.detach() if weight_side else _grad_x(name, args, gy)
        grads[0] = gx.reshape(x.shape).to(x.dtype)
    if weight_side:
        grad_w = gy.T @ x.reshape(-1, x.shape[-1]).float()
        got = torch.autograd.grad(W, [leaves[i] for i in weight_side], grad_w, allow_unused=True)
        for i, g in zip(weight_side, got):
            grads[i] = torch.zeros_like(args[i]) if g is None else g.to(args[i].dtype)
    if bias_i is not None and need[bias_i]:
        grads[bias_i] = gy.sum(0).to(args[bias_i].dtype)
    return grads


class _OpWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, *args):
        ctx.name = name
        ctx.tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_at])
        return getattr(torch.ops.fastkern, name).default(*args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            args[i] = t
        return (None, *_backward(ctx.name, args, ctx.needs_input_grad[1:], grad_y))


def _call_with_grad(name, args):
    return _OpWithGrad.apply(name, *args)


def _python_autograd_kernel(name):
    op = getattr(torch.ops.fastkern, name).default

    def kernel(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return _call_with_grad(name, args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return kernel


if _ext._C is not None:
    _ext._C.set_autograd_hook(_call_with_grad)
    _ext._C.set_cpu_hook(lambda name, args: _IMPLS[name](*args), requested_backend)
else:
    for _spec in OPS.values():
        _lib.impl(_spec.name, _python_autograd_kernel(_spec.name), "Autograd")


def _public(name):
    return getattr(torch.ops.fastkern, name)


gemm = _public("gemm")
int8_gemm = _public("int8_gemm")
linear_w8a16 = _public("linear_w8a16")
linear_w8a8 = _public("linear_w8a8")
linear_w4a16 = _public("linear_w4a16")
linear_w4a8 = _public("linear_w4a8")
linear_sparse24 = _public("linear_sparse24")
linear_blocksparse = _public("linear_blocksparse")
