"""Weight-only quantized linear layers (int8 per channel, int4 per group), float activations.

Weights stay quantized in memory and are dequantized in registers inside the K loop,
which is the point: at small M the layer is bound by reading the weight, and int4
moves a quarter of fp16's bytes. Two kernels:

* ``_gemv_splitk_kernel`` for M <= GEMV_MAX_M (16): each program owns a strip of BLOCK_N outputs
  and one slice of K (split-K), so a single token still spreads over every SM; the
  partial sums go to an fp32 workspace reduced by ``splitk_reduce`` (deterministic,
  unlike atomics). With one split the program writes the output itself. M == 1 uses
  an FMA reduction (no tensor-core padding to 16 rows); more rows use tl.dot.
* ``_gemm_kernel`` above that: output tiles in grouped order, tl.dot per K step.

int8 weights are converted exactly to the activation dtype and their per-channel
scale is applied once in the epilogue; int4 weights are unpacked (low nibble first),
``(q - zero) * scale`` in fp32 exactly as the reference computes it, then fed to the
dot in the activation dtype.
"""
import os

import torch
import triton
import triton.language as tl

from fastkern.triton import _common as C
from fastkern.triton._common import dot_acc
from fastkern.triton.autotune import Tuner, bucket_m, launch_options

# Up to this many rows the split-K kernel runs (weight bound); above it, the tiled GEMM.
# 16 by default; a GPU may prefer it up to 64 (tune with FASTKERN_TRITON_GEMV_MAX_M).
GEMV_MAX_M = int(os.environ.get("FASTKERN_TRITON_GEMV_MAX_M", "16"))


@triton.jit
def _int4_tile(w_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K,
               stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
               GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized fp32 weights [BLOCK_N, BLOCK_K] at columns k0 .. k0 + BLOCK_K (k0 even)."""
    offs_kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(
        w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_kp[None, :] * stride_wk,
        mask=mask_n[:, None] & (offs_kp < K // 2)[None, :], other=0,
    )
    q = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)
    if GROUP % BLOCK_K == 0:
        # the tile lies inside one group: one scale and zero per row
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)[:, None]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        g = offs_k // GROUP
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=mask, other=0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg, mask=mask, other=0).to(tl.float32)
    return (q - z) * s


@triton.jit
def _int8_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, stride_wk, BLOCK_K: tl.constexpr):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(
        w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
        mask=mask_n[:, None] & (offs_k < K)[None, :], other=0,
    )


@triton.jit
def _to_dot_dtype(w, x):
    # int8 goes through fp32 (exact either way): the interpreter casts int8 straight
    # to bfloat16 by reinterpreting the integer as raw bits
    return w.to(tl.float32).to(x.dtype)


@triton.jit
def _gemv_splitk_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, part_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K_PER_SPLIT is a multiple of BLOCK_K, so a tile never straddles two splits
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k < k_end)[None, :], other=0,
        )
        if BITS == 4:
            w = _int4_tile(w_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K,
                           stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, GROUP, BLOCK_K)
        else:
            w = _int8_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, stride_wk, BLOCK_K)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:
            acc = dot_acc(x, tl.trans(_to_dot_dtype(w, x)), acc, DOT_PRECISION, DOT_UPCAST)
    if BITS == 8:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = C.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k < K)[None, :], other=0,
        )
        if BITS == 4:
            w = _int4_tile(w_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K,
                           stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, GROUP, BLOCK_K)
        else:
            w = _int8_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, stride_wk, BLOCK_K)
        acc = dot_acc(x, tl.trans(_to_dot_dtype(w, x)), acc, DOT_PRECISION, DOT_UPCAST)
    if BITS == 8:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------ configs


def _gemv_candidates(key):
    _, n, k, bits, group, _ = key
    out = []
    for bn in (32, 64, 128):
        for bk in (64, 128, 256):
            if bk > max(64, triton.next_power_of_2(k)):
                continue
            # split K only as far as it takes to give every SM a few programs (about 1-16 waves on 132 SMs)
            splits = [s for s in (1, 2, 4, 8, 16) if s == 1 or triton.cdiv(k, s) >= bk]
            fit = [s for s in splits if 128 <= triton.cdiv(n, bn) * s <= 2048]
            for split in fit or splits[-1:]:
                for warps in ((2, 4) if bn * bk <= 8192 else (4, 8)):
                    out.append(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3))
    return out


def _gemv_default(key):
    _, n, k, _, _, _ = key
    split = 1 if n >= 8192 else (2 if n >= 2048 else 4)
    return dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=3)


def _gemv_interpret(key):
    return dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)


def _gemm_candidates(key):
    m_bucket = key[0]
    out = []
    for bm, bn, bk, gm, w, s in [
        (16, 64, 64, 8, 4, 4), (32, 64, 64, 8, 4, 4), (32, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4), (64, 128, 32, 8, 4, 4), (128, 128, 32, 8, 4, 4), (128, 128, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 256, 64, 8, 8, 3),
    ]:
        if bm > 2 * max(16, m_bucket):
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s))
    return out


def _gemm_default(key):
    bm = 32 if key[0] <= 32 else (64 if key[0] <= 128 else 128)
    # 128x128 with 4 warps spills on sm_80 (aot_check)
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if bm == 128 else 4, num_stages=3)


def _gemm_interpret(key):
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


GEMV_TUNER = Tuner("weightonly_gemv", _gemv_candidates, _gemv_default, _gemv_interpret)
GEMM_TUNER = Tuner("weightonly_gemm", _gemm_candidates, _gemm_default, _gemm_interpret)


def weightonly_linear(x, w, scales, zeros, group_size, bias, bits):
    """x [..., K] @ dequant(w).T + bias; w int8 [N, K] (bits=8) or packed uint8 [N, K/2] (bits=4)."""
    n = w.shape[0]
    k = x.shape[-1]
    x2 = C.rows(x)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(C.out_shape(x, n))
    if bits == 8:
        # scale per channel; zeros unused (any tensor will do as the pointer)
        z = scales
        stride_s = (scales.stride(0), 0)
        stride_z = (0, 0)
        group = 1
    else:
        z = zeros
        stride_s = (scales.stride(0), scales.stride(1))
        stride_z = (zeros.stride(0), zeros.stride(1))
        group = group_size
    kind = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[x.dtype]
    key = (bucket_m(m), n, k, bits, group, kind)
    common = (stride_s[0], stride_s[1], stride_z[0], stride_z[1])
    bias_arg = bias if bias is not None else out

    if m <= GEMV_MAX_M:
        block_m = 1 if m == 1 else C.pow2_at_least(m, 16)

        def launch(cfg):
            meta, opts = launch_options(cfg)
            split = meta.pop("SPLIT_K")
            bk = meta["BLOCK_K"]
            k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
            split = max(1, triton.cdiv(k, k_per_split))
            direct = split == 1
            part = out if direct else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
            grid = (triton.cdiv(n, meta["BLOCK_N"]), split)
            _gemv_splitk_kernel[grid](
                x2, w, scales, z, bias_arg, part, out,
                m, n, k, k_per_split,
                x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), *common,
                out.stride(0), out.stride(1),
                BITS=bits, GROUP=group, DIRECT=direct, HAS_BIAS=bias is not None,
                **C.dot_args(x.dtype), BLOCK_M=block_m, **meta, **opts,
            )
            if not direct:
                C.splitk_reduce(part, bias, out)

        tuner = GEMV_TUNER
    else:

        def launch(cfg):
            meta, opts = launch_options(cfg)
            grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            _gemm_kernel[grid](
                x2, w, scales, z, bias_arg, out,
                m, n, k,
                x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), *common,
                out.stride(0), out.stride(1),
                BITS=bits, GROUP=group, HAS_BIAS=bias is not None,
                **C.dot_args(x.dtype), **meta, **opts,
            )

        tuner = GEMM_TUNER
    with C.device_ctx(x):
        launch(tuner.config(key, x.device, launch))
    return out.reshape(C.out_shape(x, n))
