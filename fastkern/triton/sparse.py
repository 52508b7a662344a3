"""Sparse family: linear_sparse24 (2:4 along K) and linear_blocksparse (CSR over blocks).

2:4: each K tile of the weight is rebuilt in registers from its compressed form
(values [N, K/2], meta [N, K/4] holding ``idx0 | idx1 << 2``) and fed to tl.dot,
so the kernel reads half the weight bytes of a dense GEMM plus 1/8 for metadata.
Triton exposes no sparse tensor-core MMA, so the arithmetic stays dense: the gain
is memory traffic, which is what matters at small M.

Block-sparse: one program per (block row sub-tile, M tile) walks only that block
row's non-empty blocks (row_ptr / col_idx), so work scales with the kept blocks.
A first small kernel marks, per row of x, the block columns holding NaN or inf, so
that skipped (zero) blocks still turn those rows' outputs into NaN as the dense
reference does.
"""
import torch
import triton
import triton.language as tl

from fastkern.ops import register_kernel
from fastkern.triton import _common as C
from fastkern.triton._common import dot_acc
from fastkern.triton.autotune import Tuner, bucket_m, launch_options


@triton.jit
def _sparse24_kernel(
    x_ptr, v_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_mg, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = C.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    slot = tl.arange(0, 4)[None, None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k < K)[None, :], other=0,
        )
        offs_g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        meta = tl.load(
            meta_ptr + offs_n[:, None].to(tl.int64) * stride_mn + offs_g[None, :] * stride_mg,
            mask=mask_n[:, None] & (offs_g < K // 4)[None, :], other=0,
        ).to(tl.int32)
        vals = tl.load(
            v_ptr + offs_n[:, None].to(tl.int64) * stride_vn + offs_v[None, :] * stride_vk,
            mask=mask_n[:, None] & (offs_v < K // 2)[None, :], other=0,
        )
        # [BN, BK/2] -> the two kept values of each group of 4, then scattered to their slots; a
        # malformed group with both positions the same holds their sum there, as in the reference
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
        vsum = (v0.to(tl.float32) + v1.to(tl.float32)).to(vals.dtype)
        v0 = tl.where((meta & 3) == ((meta >> 2) & 3), vsum, v0)
        idx0 = (meta & 3)[:, :, None]
        idx1 = ((meta >> 2) & 3)[:, :, None]
        zero = tl.zeros((BLOCK_N, BLOCK_K // 4, 4), dtype=vals.dtype)
        w = tl.where(slot == idx0, v0[:, :, None], tl.where(slot == idx1, v1[:, :, None], zero))
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        acc = dot_acc(x, tl.trans(w), acc, DOT_PRECISION, DOT_UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _nonfinite_blocks_kernel(x_ptr, bad_ptr, count_ptr, K, BK, KB, stride_xm, stride_xk,
                             BLOCK_C: tl.constexpr, BK_P: tl.constexpr):
    """bad[m, c] = 1 where x[m, c*BK : (c+1)*BK] holds NaN or inf; count[m] = sum_c bad[m, c]."""
    m = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, BK_P)
    total = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, KB, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        offs_k = offs_c[:, None] * BK + offs_j[None, :]
        mask = (offs_c < KB)[:, None] & (offs_j < BK)[None, :] & (offs_k < K)
        v = tl.abs(tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=mask, other=0).to(tl.float32))
        bad = tl.max((mask & ~(v < float("inf"))).to(tl.int32), axis=1)
        tl.store(bad_ptr + m * KB + offs_c, bad.to(tl.int8), mask=offs_c < KB)
        total += bad
    tl.store(count_ptr + m, tl.sum(total, axis=0))


@triton.jit
def _blocksparse_kernel(
    x_ptr, blk_ptr, row_ptr_ptr, col_idx_ptr, bias_ptr, out_ptr, bad_ptr, count_ptr,
    M, N, K, BN, BK, N_SUB, KB,
    stride_xm, stride_xk, stride_b0, stride_b1, stride_b2, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
):
    # block rows (and sub-tiles of tall blocks) on axis 0, whose limit is 2**31 - 1
    pid = tl.program_id(0)
    brow = pid // N_SUB
    sub = pid % N_SUB
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = sub * TILE_N + tl.arange(0, TILE_N)
    offs_n = brow * BN + offs_i
    mask_m = offs_m < M
    mask_i = (offs_i < BN) & (offs_n < N)
    start = tl.load(row_ptr_ptr + brow)
    end = tl.load(row_ptr_ptr + brow + 1)
    acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    seen_bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for j in range(start, end):
        col = tl.load(col_idx_ptr + j)
        flag = tl.load(bad_ptr + offs_m.to(tl.int64) * KB + tl.minimum(col, KB - 1), mask=mask_m, other=0)
        seen_bad += tl.where(col < KB, flag.to(tl.int32), 0)
        for kk in range(0, BK, TILE_K):
            offs_j = kk + tl.arange(0, TILE_K)
            offs_k = col * BK + offs_j
            # columns past K are the zero padding of the last block column
            mask_j = (offs_j < BK) & (offs_k < K)
            x = tl.load(
                x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_j[None, :], other=0,
            )
            b = tl.load(
                blk_ptr + j * stride_b0 + offs_i[:, None] * stride_b1 + offs_j[None, :] * stride_b2,
                mask=mask_i[:, None] & mask_j[None, :], other=0,
            )
            acc = dot_acc(x, tl.trans(b), acc, DOT_PRECISION, DOT_UPCAST)
    # To the reference a missing block is a block of zeros, and 0 * inf = 0 * nan = nan:
    # a row whose non-finite inputs are not all covered by this block row's stored
    # blocks meets a skipped zero, so its outputs here are NaN.
    all_bad = tl.load(count_ptr + offs_m, mask=mask_m, other=0)
    acc = tl.where((seen_bad < all_bad)[:, None], float("nan"), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_i, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_i[None, :])


# ------------------------------------------------------------------------ configs


def _s24_candidates(key):
    out = []
    for bm, bn, bk, gm, w, s in [
        (16, 64, 64, 8, 4, 4), (32, 64, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3),
        (256, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3), (16, 128, 128, 1, 4, 4), (32, 128, 128, 4, 4, 4),
    ]:
        if bm > 2 * max(16, key[0]):
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s))
    return out


def _s24_default(key):
    bm = 32 if key[0] <= 32 else (64 if key[0] <= 128 else 128)
    # 128x128 with 4 warps spills on sm_80 (aot_check)
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if bm == 128 else 4, num_stages=3)


def _s24_interpret(key):
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def _bs_candidates(key):
    out = []
    for bm in (16, 32, 64, 128):
        if bm > 2 * max(16, key[0]):
            continue
        for w in (2, 4, 8):
            for s in (2, 3, 4):
                out.append(dict(BLOCK_M=bm, num_warps=w, num_stages=s))
    return out


def _bs_default(key):
    return dict(BLOCK_M=16 if key[0] <= 16 else 64, num_warps=4, num_stages=3)


def _bs_interpret(key):
    return dict(BLOCK_M=16)


S24_TUNER = Tuner("sparse24", _s24_candidates, _s24_default, _s24_interpret)
BS_TUNER = Tuner("blocksparse", _bs_candidates, _bs_default, _bs_interpret)


@register_kernel("linear_sparse24", "triton")
def linear_sparse24(x, values, meta, bias):
    n, k = values.shape[0], 2 * values.shape[1]
    x2 = C.rows(x)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(C.out_shape(x, n))
    key = (bucket_m(m), n, k, str(x.dtype))

    def launch(cfg):
        meta_p, opts = launch_options(cfg)
        grid = (triton.cdiv(m, meta_p["BLOCK_M"]) * triton.cdiv(n, meta_p["BLOCK_N"]),)
        _sparse24_kernel[grid](
            x2, values, meta, bias if bias is not None else out, out,
            m, n, k,
            x2.stride(0), x2.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, **C.dot_args(x.dtype), **meta_p, **opts,
        )

    with C.device_ctx(x):
        launch(S24_TUNER.config(key, x.device, launch))
    return out.reshape(C.out_shape(x, n))


@register_kernel("linear_blocksparse", "triton")
def linear_blocksparse(x, blocks, row_ptr, col_idx, out_features, bias):
    n = out_features
    _, bn, bk = blocks.shape
    x2 = C.rows(x)
    m, k = x2.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(C.out_shape(x, n))
    # tl.dot wants every tile dimension >= 16; tall or wide blocks are walked in tiles
    tile_n = min(C.pow2_at_least(bn, 16), 64)
    tile_k = min(C.pow2_at_least(bk, 16), 64)
    n_sub = triton.cdiv(bn, tile_n)
    n_brows = row_ptr.shape[0] - 1
    key = (bucket_m(m), n, k, bn, bk, str(x.dtype))
    # block columns past ceil(K / bk) cover only padding, which is finite
    kb = triton.cdiv(k, bk)
    bad = torch.empty((m, max(kb, 1)), dtype=torch.int8, device=x.device)
    count = torch.empty((m,), dtype=torch.int32, device=x.device)

    def launch(cfg):
        meta_p, opts = launch_options(cfg)
        grid = (n_brows * n_sub, triton.cdiv(m, meta_p["BLOCK_M"]))
        _blocksparse_kernel[grid](
            x2, blocks, row_ptr, col_idx, bias if bias is not None else out, out, bad, count,
            m, n, k, bn, bk, n_sub, kb,
            x2.stride(0), x2.stride(1), blocks.stride(0), blocks.stride(1), blocks.stride(2),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, **C.dot_args(x.dtype),
            TILE_N=tile_n, TILE_K=tile_k, **meta_p, **opts,
        )

    with C.device_ctx(x):
        bk_p = C.pow2_at_least(bk, 1)
        _nonfinite_blocks_kernel[(m,)](
            x2, bad, count, k, bk, kb, x2.stride(0), x2.stride(1),
            BLOCK_C=max(1, min(64, 4096 // bk_p)) if not C.interpreting() else max(1, 64 // bk_p), BK_P=bk_p,
        )
        launch(BS_TUNER.config(key, x.device, launch))
    return out.reshape(C.out_shape(x, n))
