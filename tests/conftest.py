import contextlib
import os

# The triton backend runs CPU tensors only in the interpreter; Triton reads this
# when kernels are decorated, so it is set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastkern  # noqa: E402
from fastkern import ops  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_SIZES = [0, 1, 3, 17, 128]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of out against ref (both upcast to float64)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def tol(dtype: torch.dtype) -> float:
    """DESIGN §4: 1e-5 with fp32 out, 1e-2 with half-precision out."""
    return 1e-5 if dtype == torch.float32 else 1e-2


def assert_close_rel(out, ref, dtype, factor=1.0):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    err = rel_err(out, ref)
    assert err <= tol(dtype) * factor, "relative error %.3g > %.3g" % (err, tol(dtype) * factor)


def backends_for(op: str, device="cpu"):
    """pytest params for every backend of op on device; unavailable ones skip with their reason."""
    params = []
    for be in ("cpu", "cuda", "triton", "reference"):
        reason = ops.backend_status(op, be, torch.device(device))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(be, marks=marks, id=be))
    return params


@pytest.fixture
def gen():
    """A seeded generator: fresh random data per test, reproducible on failure."""
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none is visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------ CPU kernel paths and threads


def isa_skip_reason(name):
    """None if the extension can run the CPU path `name` here, else why not."""
    from fastkern import _ext

    if _ext._C is None:
        return "fastkern._C is not built"
    try:
        _ext._C.set_cpu_isa(name)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        _ext._C.set_cpu_isa("auto")
    return None


def assert_nonfinite_as_reference(out, ref, dtype, where=None):
    """NaN and +-inf exactly where the reference has them, the finite outputs within the
    contract (relative Frobenius error in float64, where fp32 norms of huge values overflow)."""
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), where
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), where
    inf = torch.isinf(ref)
    assert torch.equal(out[inf], ref[inf]), where
    fin = ~inf & ~torch.isnan(ref)
    o, r = out[fin].double(), ref[fin].double()
    assert (o - r).norm() <= tol(dtype) * r.norm(), where


def has_bf16_dot():
    """Whether this CPU has AVX512-BF16 (vdpbf16ps), which the bf16 dot-product kernels need."""
    from fastkern import _ext

    return _ext._C is not None and bool(_ext._C.cpu_features().get("avx512bf16", False))


def cpu_isas(avx2vnni=False, amx=False):
    """The CPU paths as params (those this CPU cannot run are skipped with the reason).
    avx2vnni (AVX2 + AVX-VNNI) differs from avx2, and amx (AVX-512 + AMX tiles) from avx512,
    only in the int8 GEMM: the int8 tests ask for them."""
    params = []
    for name in ("generic", "avx2") + (("avx2vnni",) if avx2vnni else ()) + ("avx512",) + (("amx",) if amx else ()):
        why = isa_skip_reason(name)
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


@contextlib.contextmanager
def cpu_isa(name):
    """Force the CPU kernel path `name` inside the block."""
    from fastkern import _ext

    _ext._C.set_cpu_isa(name)
    try:
        yield
    finally:
        _ext._C.set_cpu_isa("auto")


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def on_1_and_2_threads(fn, *args):
    """fn(*args) with one torch thread, then with two (for bitwise-identity checks)."""
    outs = []
    for t in (1, 2):
        with num_threads(t):
            outs.append(fn(*args))
    return outs


@pytest.fixture
def one_thread():
    # tiny ops on a shared 2-core machine: thread hand-offs cost more than the math
    with num_threads(1):
        yield
