"""Dense tiled GEMM ``a @ b.T`` (fp32 / fp16 / bf16 in, fp32 accumulate).

The kernel body ``_tiled_kernel`` is shared with the int8 family: the same tiling
with an int32 accumulator (int8_gemm) and an epilogue applying per-row and
per-column scales and the bias in fp32 (linear_w8a8); what differs is chosen by
constexpr flags, so each use compiles to its own specialised kernel.
"""
import torch
import triton
import triton.language as tl

from fastkern.ops import register_kernel
from fastkern.triton import _common as C
from fastkern.triton._common import dot_acc
from fastkern.triton.autotune import Tuner, bucket_m, launch_options


@triton.jit
def _tiled_kernel(
    a_ptr, b_ptr, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    ACC_INT: tl.constexpr, ROW_SCALE: tl.constexpr, COL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = C.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # 64-bit row offsets: M * K passes 2**31 at LLM sizes
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk

    if ACC_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        if ACC_INT:
            # out_dtype named: Triton 3.6 asserts acc's dtype against it (default float32)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = dot_acc(a, b, acc, DOT_PRECISION, DOT_UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ACC_INT and not ROW_SCALE and not COL_SCALE:
        tl.store(c_ptrs, acc, mask=mask_c)
    else:
        out = acc.to(tl.float32)
        if ROW_SCALE:
            out = out * tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0).to(tl.float32)[:, None]
        if COL_SCALE:
            out = out * tl.load(col_scale_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_c)


def _candidates(key):
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), after the matmul tutorial's list
    m_bucket, _, _, kind, _ = key
    shapes = [
        (128, 256, 64, 8, 8, 3), (64, 256, 32, 8, 4, 4), (128, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4), (128, 32, 32, 8, 4, 4), (64, 32, 32, 8, 2, 5), (32, 64, 32, 8, 2, 5),
        (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (256, 64, 128, 8, 4, 4), (64, 256, 128, 8, 4, 4),
        (128, 128, 128, 8, 4, 4), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
        (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 4), (32, 128, 128, 4, 4, 4),
    ]
    out = []
    for bm, bn, bk, gm, w, s in shapes:
        if bm > 2 * max(16, m_bucket):  # tiles much taller than M only burn registers
            continue
        if kind == "int8" and bk < 32:  # int8 MMA consumes K in 32s
            continue
        if kind == "fp32" and bk > 32:  # the fp32 (non tensor core) dot needs more registers per K
            continue
        elem = {"int8": 1, "fp32": 4}.get(kind, 2)
        if s * (bm + bn) * bk * elem > 200 * 1024:  # pipeline buffers past sm_90's 227 KiB of shared memory
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s))
    return out


def _default(key):
    m_bucket, _, _, kind, _ = key
    bm = 64 if m_bucket <= 64 else 128
    bk = 32 if kind == "fp32" else 64
    # 4 warps spill a 128x128 fp32 / int32 accumulator on sm_80 (aot_check); sm_90's wgmma does not
    warps = 8 if kind in ("fp32", "int8") and bm == 128 else 4
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=3)


def _interpret(key):
    # smaller than the test shapes in N and K, so masking and several K steps run
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


TUNER = Tuner("tiled", _candidates, _default, _interpret)


def _kind(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.dtype == torch.int8:
        return "int8"
    return "fp32" if a.dtype == torch.float32 else "half"


def tiled_matmul(a2, b, out, row_scale=None, col_scale=None, bias=None, tuner=TUNER, tag=""):
    """out[M, N] = epilogue(a2[M, K] @ b[N, K].T); a2 and b may be strided."""
    m, k = a2.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return out
    acc_int = a2.dtype == torch.int8
    kind = _kind(a2, b)
    key = (bucket_m(m), n, k, kind, tag)
    dummy = out

    def launch(cfg):
        meta, opts = launch_options(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _tiled_kernel[grid](
            a2, b, out,
            row_scale if row_scale is not None else dummy,
            col_scale if col_scale is not None else dummy,
            bias if bias is not None else dummy,
            m, n, k,
            a2.stride(0), a2.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            ACC_INT=acc_int, ROW_SCALE=row_scale is not None,
            COL_SCALE=col_scale is not None, HAS_BIAS=bias is not None,
            **C.dot_args(a2.dtype),
            **meta, **opts,
        )

    with C.device_ctx(a2):
        launch(tuner.config(key, a2.device, launch))
    return out


@register_kernel("gemm", "triton")
def gemm(a, b):
    n = b.shape[0]
    a2 = C.rows(a)
    out = torch.empty((a2.shape[0], n), dtype=a.dtype, device=a.device)
    tiled_matmul(a2, b, out)
    return out.reshape(C.out_shape(a, n))
