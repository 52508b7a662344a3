"""Triton kernels for every fastkern op, registered as the ``triton`` backend.

fastkern.ops imports this package the first time the triton backend is asked for.
On a GPU the kernels run CUDA tensors; on a CPU machine they run CPU tensors only
under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CI tests them.
Importing fails with ImportError when triton is missing, which ops.backend_status
reports as the reason the backend is unavailable.
"""
import triton  # noqa: F401  (the ImportError, if any, names what is missing)

from fastkern.triton import gemm, int4, int8, sparse  # noqa: F401  (each registers its ops)
from fastkern.triton.int8 import quantize_per_token

__all__ = ["quantize_per_token"]
