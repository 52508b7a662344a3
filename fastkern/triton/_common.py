"""Pieces every fastkern Triton wrapper shares: shape plumbing and the split-K reduction."""
import contextlib

import torch
import triton
import triton.language as tl

from fastkern.triton.autotune import interpreting

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def rows(x: torch.Tensor):
    """x [..., K] as a 2-D [M, K] view (a copy only when the strides forbid a view)."""
    return x.reshape(-1, x.shape[-1])


def out_shape(x: torch.Tensor, n: int):
    return tuple(x.shape[:-1]) + (n,)


def dot_args(dtype: torch.dtype) -> dict:
    """Constexpr arguments of every kernel that calls ``dot_acc``."""
    # fp32 promises 1e-5 (DESIGN §4): tf32 tensor cores would give about 1e-3.
    # The interpreter multiplies with numpy, which has no bfloat16 (it would multiply
    # the raw bits): there bf16 tiles go up to fp32 first, which is exactly what the
    # GPU's bf16 MMA computes (exact products, fp32 sums).
    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOT_UPCAST=dtype == torch.bfloat16 and interpreting(),
    )


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row tiles walk the column tiles
    together, so the weight tiles they share are still in L2 when the next row tile asks."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def pow2_at_least(v: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(v), 1)))


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLIT_K, stride_om, stride_on,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # part is [SPLIT_K, M, N] fp32, contiguous; summing it here (not with atomics)
    # keeps the result deterministic run to run
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    m = offs // N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(part: torch.Tensor, bias, out: torch.Tensor):
    split_k, m, n = part.shape
    block = 1024 if part.is_cuda else 256
    grid = (triton.cdiv(m * n, block),)
    _splitk_reduce_kernel[grid](
        part, bias if bias is not None else part, out, m, n, split_k, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK=block,
    )
