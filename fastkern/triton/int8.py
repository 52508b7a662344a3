"""int8 family: int8_gemm, linear_w8a8 (dynamic per-token activations), linear_w8a16."""
import torch
import triton
import triton.language as tl

from fastkern.ops import register_kernel
from fastkern.triton import _common as C
from fastkern.triton._weightonly import weightonly_linear
from fastkern.triton.autotune import interpreting
from fastkern.triton.gemm import tiled_matmul


@triton.jit
def _round_half_even(v):
    # torch.round rounds half to even; tl has no portable rint (libdevice is not
    # available in the interpreter), and floor(v + 0.5) is wrong both for ties and
    # for v just below 0.5, where v + 0.5 rounds up to 1 in fp32. v - floor(v) is exact.
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, stride_qm,
                          ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS rows per program: s = absmax / 127, q = round_half_even(x / s) clamped to +-127.

    Bit-exact with fastkern.formats.quantize_per_token: both divisions are IEEE
    round-to-nearest (div_rn; Triton's '/' on fp32 may be approximate on GPUs).
    A row holding NaN or inf gets q = 0 and s = NaN, so all its outputs are NaN.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = rows < M
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_qm
    amax = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    bad = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs < K)[None, :]
        v = tl.abs(tl.load(x_rows + offs[None, :] * stride_xk, mask=mask, other=0).to(tl.float32))
        bad += (mask & ~(v < float("inf"))).to(tl.int32)  # catches NaN and inf
        amax = tl.maximum(amax, v)
    absmax = tl.max(amax, axis=1)
    nonfinite = tl.sum(bad, axis=1) > 0
    s = tl.div_rn(absmax, tl.full((ROWS,), 127.0, tl.float32))
    safe = tl.where(s > 0.0, s, 1.0)[:, None]
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs < K)[None, :]
        v = tl.load(x_rows + offs[None, :] * stride_xk, mask=mask, other=0).to(tl.float32)
        r = _round_half_even(tl.div_rn(v, tl.zeros_like(v) + safe))
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        r = tl.where(nonfinite[:, None], 0.0, r)
        tl.store(q_rows + offs[None, :], r.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, tl.where(nonfinite, float("nan"), s), mask=mask_r)


def quantize_per_token(x: torch.Tensor):
    """Triton twin of fastkern.formats.quantize_per_token: (q int8 [..., K], s float32 [..., 1])."""
    k = x.shape[-1]
    x2 = C.rows(x)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m > 0:
        if interpreting():
            rows, block_k = 16, 32  # several rows per program: the interpreter pays per program
        else:
            # about 4K elements in flight per program; long rows get a program each
            block_k = min(4096, C.pow2_at_least(k, 128))
            rows = max(1, min(16, 4096 // block_k))
        with C.device_ctx(x):
            _quantize_rows_kernel[(triton.cdiv(m, rows),)](
                x2, q, s, m, k, x2.stride(0), x2.stride(1), q.stride(0), ROWS=rows, BLOCK_K=block_k,
            )
    return q.reshape(x.shape), s.reshape(tuple(x.shape[:-1]) + (1,))


@register_kernel("int8_gemm", "triton")
def int8_gemm(a, b):
    n = b.shape[0]
    a2 = C.rows(a)
    out = torch.empty((a2.shape[0], n), dtype=torch.int32, device=a.device)
    tiled_matmul(a2, b, out)
    return out.reshape(C.out_shape(a, n))


@register_kernel("linear_w8a8", "triton")
def linear_w8a8(x, w, w_scale, bias):
    n = w.shape[0]
    q, s = quantize_per_token(x)
    q2 = C.rows(q)
    out = torch.empty((q2.shape[0], n), dtype=x.dtype, device=x.device)
    # int32 accumulate, then both scales and the bias in fp32 in the epilogue
    tiled_matmul(q2, w, out, row_scale=s.reshape(-1), col_scale=w_scale, bias=bias, tag="w8a8")
    return out.reshape(C.out_shape(x, n))


@register_kernel("linear_w8a16", "triton")
def linear_w8a16(x, w, w_scale, bias):
    return weightonly_linear(x, w, w_scale, None, 0, bias, bits=8)
