"""W4A8: group-wise int4 weights times per-token int8 activations, int32 dot products.

Checked so far only in Triton's interpreter and by compiling to sm_80 / sm_90 without
a GPU; it has never run on one.

x is quantized first (``quantize_per_token``, bit-exact with the reference), so the
K loop multiplies int8 by int8: the unpacked weight ``q - zero`` lies in -15..15 and
``tl.dot(..., out_dtype=tl.int32)`` gives exact integer sums on the int8 tensor-core
path. Each group's sum is converted to fp32 once and multiplied by that group's weight
scale (one per output channel); the fp32 accumulator then gets the token scale and the
bias in the epilogue. A row holding NaN or inf has q = 0 and a NaN token scale, so all
its outputs are NaN, as in the reference.

The K tile (BLOCK_K) and the group relate in one of two ways, fixed at compile time:

* BLOCK_K divides the group (groups that are multiples of 32, i.e. every common size):
  the int32 sum is carried across the group's tiles and scaled when the group ends.
* otherwise the tile is cut into slices of SUB columns, SUB the largest power of two
  dividing the group: group boundaries fall on multiples of SUB, so each slice lies
  in one group. Each slice is one dot of the x tile masked to it against the whole
  weight tile (exact int32 again), scaled by its group's scale. This costs BLOCK_K /
  SUB dots per tile (2 for groups of 16 or 48, 4 for 24), but stays exact for every
  even group size.

BLOCK_K is at least 32: an int8 tl.dot needs K >= 32 on NVIDIA GPUs.
"""
import math

import torch
import triton
import triton.language as tl

from fastkern.triton import _common as C
from fastkern.triton.autotune import Tuner, bucket_m, launch_options
from fastkern.triton.int8 import quantize_per_token


@triton.jit
def _w4a8_kernel(
    q_ptr, tok_scale_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_qm, stride_qk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    GROUP: tl.constexpr, SUB: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = C.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    q_rows = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    isum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(q_rows + offs_k[None, :] * stride_qk, mask=mask_m[:, None] & mask_k[None, :], other=0)
        offs_kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_rows + offs_kp[None, :] * stride_wk,
                         mask=mask_n[:, None] & (offs_kp < K // 2)[None, :], other=0)
        nib = tl.interleave(packed & 0xF, packed >> 4).to(tl.int8)  # low nibble first
        if SUB == BLOCK_K:
            g = k0 // GROUP
            z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0)
            wq = nib - z.to(tl.int8)[:, None]  # -15..15: no int8 overflow
            if GROUP == BLOCK_K:
                s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0).to(tl.float32)
                acc += tl.dot(x, tl.trans(wq), out_dtype=tl.int32).to(tl.float32) * s[None, :]
            else:
                isum = tl.dot(x, tl.trans(wq), isum, out_dtype=tl.int32)
                # BLOCK_K divides GROUP, so a group's last tile is the one whose end is a
                # multiple of GROUP
                if (k0 + BLOCK_K) % GROUP == 0:
                    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0).to(tl.float32)
                    acc += isum.to(tl.float32) * s[None, :]
                    isum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            g_col = offs_k // GROUP
            z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g_col[None, :] * stride_zg,
                        mask=mask_n[:, None] & mask_k[None, :], other=0)
            wt = tl.trans(nib - z.to(tl.int8))
            slice_of = tl.arange(0, BLOCK_K) // SUB
            for h in tl.static_range(BLOCK_K // SUB):
                part = tl.dot(tl.where(slice_of[None, :] == h, x, tl.zeros_like(x)), wt, out_dtype=tl.int32)
                kh = k0 + h * SUB + tl.zeros_like(offs_n)  # a slice past K (a K tail) reads no scale
                s = tl.load(s_ptr + offs_n * stride_sn + (kh // GROUP) * stride_sg,
                            mask=mask_n & (kh < K), other=0).to(tl.float32)
                acc += part.to(tl.float32) * s[None, :]
    tok = tl.load(tok_scale_ptr + offs_m, mask=mask_m, other=0)
    acc = acc * tok[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------ configs


def _pow2_part(group: int) -> int:
    return group & -group


def _block_ks(group: int):
    """K tiles that divide the group (one scale per tile), or 32 when none does."""
    fit = [bk for bk in (32, 64, 128) if bk <= _pow2_part(group)]
    return fit or [32]


def _candidates(key):
    m_bucket, _, _, group, _ = key
    out = []
    # (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages). No 128 x 256 tiles: an fp32
    # accumulator next to the int32 dot result spills registers there on sm_80 and sm_90
    # (seen compiling without a GPU), and so do 128 x 128 tiles cut into slices.
    for bm, bn, gm, w, s in [
        (16, 64, 1, 4, 4), (16, 128, 1, 4, 4), (32, 64, 4, 4, 4), (32, 128, 4, 4, 4), (64, 64, 8, 4, 4),
        (64, 128, 8, 4, 4), (128, 128, 8, 8, 3),
    ]:
        if bm > 2 * max(16, m_bucket):  # tiles much taller than M only burn registers
            continue
        for bk in _block_ks(group):
            if bk > _pow2_part(group) and bm * bn > 64 * 128:
                continue
            if s * (bm + bn // 2) * bk > 200 * 1024:  # pipeline buffers past sm_90's shared memory
                continue
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s))
    return out


def _default(key):
    m_bucket, _, _, group, _ = key
    bk = _block_ks(group)[-1]
    sliced = bk > _pow2_part(group)
    bm = 16 if m_bucket <= 16 else 32 if m_bucket <= 32 else 64 if m_bucket <= 128 or sliced else 128
    if bm == 128 and bk > 64:  # 128 x 128 x 128 spilled (24 bytes of stack on sm_90, compiled without a GPU)
        bk = 64
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8 if bm == 128 else 4, num_stages=3)


def _interpret(key):
    # BLOCK_K = 32 for every group: groups of 64 and up carry int32 sums over tiles,
    # groups of 32 take one tile each, smaller or odd ones are sliced
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


TUNER = Tuner("w4a8", _candidates, _default, _interpret)


def w4a8_linear(x, w, scales, zeros, group_size, bias):
    """quantize_per_token(x) -> int8 @ (q - zero).T per group, scaled; [..., N] in x.dtype."""
    n = w.shape[0]
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(C.out_shape(x, n))
    if k == 0:  # nothing to quantize (x [M, 0] has no row view): the outputs are the bias
        q2 = torch.empty((m, 0), dtype=torch.int8, device=x.device)
        tok_scale = torch.zeros((m,), dtype=torch.float32, device=x.device)
    else:
        q, tok_scale = quantize_per_token(x)
        q2 = q.reshape(m, k)
        tok_scale = tok_scale.reshape(m)
    key = (bucket_m(m), n, k, group_size, str(x.dtype).replace("torch.", ""))
    bias_arg = bias if bias is not None else out

    def launch(cfg):
        meta, opts = launch_options(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _w4a8_kernel[grid](
            q2, tok_scale, w, scales, zeros, bias_arg, out,
            m, n, k,
            q2.stride(0), q2.stride(1), w.stride(0), w.stride(1), scales.stride(0), scales.stride(1),
            zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1),
            GROUP=group_size, SUB=min(_pow2_part(group_size), meta["BLOCK_K"]), HAS_BIAS=bias is not None,
            **meta, **opts,
        )

    with C.device_ctx(x):
        launch(TUNER.config(key, x.device, launch))
    return out.reshape(C.out_shape(x, n))
