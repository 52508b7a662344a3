"""fastkern: quantized and sparse linear layers on native kernels for PyTorch."""
from fastkern.version import __version__
from fastkern import _ext  # loads fastkern._C (or warns and runs on the reference backend)
from fastkern import ops
from fastkern._backend import BackendUnavailableError, use_backend
from fastkern._info import info
from fastkern.nn import QLinear, SparseLinear
from fastkern.convert import quantize_, sparsify_

__all__ = [
    "__version__",
    "QLinear",
    "SparseLinear",
    "quantize_",
    "sparsify_",
    "use_backend",
    "info",
    "ops",
    "BackendUnavailableError",
]

_LAZY_SUBMODULES = ("finetune", "calibrate", "quality", "models", "bench", "triton")


def __getattr__(name):
    # heavier, optional parts load on first use: fastkern.finetune, fastkern.calibrate, ...
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module("fastkern." + name)
    raise AttributeError("module 'fastkern' has no attribute %r" % name)
