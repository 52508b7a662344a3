"""Loads the native extension fastkern._C, or explains why it is missing."""
import functools
import warnings

import torch

from fastkern._elf import cxx_runtime_problem

_C = None
LOAD_ERROR = None


def _pinned_torch():
    """The torch version this installed fastkern was built against (its metadata pin), or None."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        for req in requires("fastkern") or ():
            name, _, version = req.partition("==")
            if name.strip() == "torch" and version and ";" not in version:
                return version.strip()
    except PackageNotFoundError:  # a source tree that was never installed
        pass
    return None


def _mismatch_message(built, why=""):
    return (
        "fastkern._C was built against torch %s, but torch %s is installed%s. Install the "
        "fastkern built for this torch, or rebuild it against this torch: `pip install "
        "--no-build-isolation --force-reinstall --no-deps fastkern` (or `pip install "
        "--no-build-isolation -e .` from source)." % (built, torch.__version__, why)
    )


try:
    from fastkern import _C  # noqa: F811  (registers torch.ops.fastkern_C.*)
except ImportError as e:
    LOAD_ERROR = str(e)
    _pin = _pinned_torch()
    if _pin is not None and _pin != torch.__version__.split("+")[0]:
        # a binary for another torch: its loader error (a missing libc10_cuda.so, an
        # undefined symbol) would not say so
        raise ImportError(_mismatch_message(_pin, " (loading it failed: %s)" % e)) from e
    if torch.version.cuda is None and ("libc10_cuda" in LOAD_ERROR or "libtorch_cuda" in LOAD_ERROR):
        raise ImportError(_mismatch_message(
            "a CUDA build of torch", ": a CPU build (loading it failed: %s)" % e)) from e
    # not built: fastkern still works on the reference backend
    warnings.warn(
        "fastkern: the native extension fastkern._C is not available (%s); only the "
        "'reference' (and 'triton') backends will run. Build it with "
        "`pip install --no-build-isolation -e .` in the source tree." % e,
        RuntimeWarning,
        stacklevel=2,
    )

if _C is not None:
    _built = _C.build_info()["torch_version"]
    if _built != torch.__version__:
        # The C++ ABI of torch changes between releases: a mismatch crashes in odd places.
        _C = None
        LOAD_ERROR = "built against torch %s but running torch %s" % (_built, torch.__version__)
        raise ImportError(_mismatch_message(_built))

# A private copy of the C++ runtime inside _C (see fastkern/_elf.py): the kernels compute
# correctly, but their error messages can crash the process, so say so once, at import.
CXX_RUNTIME_PROBLEM = None
if _C is not None:
    try:
        CXX_RUNTIME_PROBLEM = cxx_runtime_problem(_C.__file__)
    except OSError:
        pass
    if CXX_RUNTIME_PROBLEM:
        warnings.warn("fastkern: " + CXX_RUNTIME_PROBLEM, RuntimeWarning, stacklevel=2)


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastkern._C registered a kernel for ``fastkern_C::op`` under ``dispatch_key``.

    Cached: _C registers all its kernels when it loads, and every op call asks."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastkern_C::" + op, dispatch_key)
