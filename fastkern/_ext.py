"""Loads the native extension fastkern._C, or explains why it is missing."""
import warnings

import torch

_C = None
LOAD_ERROR = None

try:
    from fastkern import _C  # noqa: F811  (registers torch.ops.fastkern_C.*)
except ImportError as e:  # not built: fastkern still works on the reference backend
    LOAD_ERROR = str(e)
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
        raise ImportError(
            "fastkern._C was built against torch %s, but torch %s is installed. Rebuild "
            "fastkern for this torch: `pip install --no-build-isolation --force-reinstall "
            "--no-deps fastkern` (or `pip install --no-build-isolation -e .` from source)."
            % (_built, torch.__version__)
        )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastkern._C registered a kernel for ``fastkern_C::op`` under ``dispatch_key``."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastkern_C::" + op, dispatch_key)
