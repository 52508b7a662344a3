"""Pruning and sparse weight formats.

2:4: in each group of 4 consecutive weights along K keep the 2 of largest
magnitude. Compressed as values [N, K/2] (the kept weights in order) and meta
uint8 [N, K/4], one byte per group holding the two kept positions
``idx0 | idx1 << 2`` with idx0 < idx1.

Block-sparse: the weight [N, K] is cut into (bn, bk) blocks (N and K padded with
zeros up to block multiples); the non-empty blocks are kept in CSR order:
blocks [nnzb, bn, bk], row_ptr int64 [ceil(N/bn) + 1], col_idx int64 [nnzb].
"""
import math

import torch


def _check_2d_float(w, fn):
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError("%s: weight must be a 2-D float tensor [N, K], got shape %s dtype %s" % (fn, tuple(w.shape), w.dtype))


def prune_magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured magnitude pruning: bool mask keeping the (1 - sparsity) largest |w|."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError("prune_magnitude: sparsity must be in [0, 1), got %r" % (sparsity,))
    keep = int(round(w.numel() * (1.0 - sparsity)))
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if keep > 0:
        idx = w.detach().abs().flatten().topk(keep, sorted=False).indices
        mask[idx] = True
    return mask.view_as(w)


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """bool mask [N, K] keeping the 2 largest-magnitude weights of every 4 along K.

    Ties keep the earlier position. K must be a multiple of 4.
    """
    _check_2d_float(w, "prune_2_4")
    n, k = w.shape
    if k % 4:
        raise ValueError("2:4 sparsity needs K divisible by 4, got weight of shape [%d, %d] (K=%d)" % (n, k, k))
    g = w.detach().float().abs().reshape(n, k // 4, 4)
    # stable descending sort: equal magnitudes keep the lower index first
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(n, k)


def compress_2_4(w: torch.Tensor, mask: torch.Tensor = None):
    """(values [N, K/2] in w's dtype, meta uint8 [N, K/4]) from a weight and its 2:4 mask.

    Without a mask, prune_2_4(w) chooses the kept weights. A given mask must keep
    exactly 2 of every 4 (as masks from prune_2_4 do).
    """
    _check_2d_float(w, "compress_2_4")
    if mask is None:
        mask = prune_2_4(w)
    n, k = w.shape
    if mask.shape != w.shape:
        raise ValueError("compress_2_4: mask of shape %s does not match weight %s" % (tuple(mask.shape), tuple(w.shape)))
    m = mask.reshape(n, k // 4, 4)
    if not bool((m.sum(-1) == 2).all()):
        raise ValueError("compress_2_4: mask must keep exactly 2 of every 4 consecutive weights along K")
    pos = torch.arange(4, device=w.device).expand_as(m)
    # kept positions in ascending order: sort keys put kept ones first, in index order
    key = torch.where(m, pos, pos + 4)
    kept = torch.sort(key, dim=-1).values[..., :2]
    values = torch.gather(w.detach().reshape(n, k // 4, 4), -1, kept).reshape(n, k // 2)
    meta = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)
    return values.contiguous(), meta.contiguous()


def decompress_2_4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense [N, K] (values' dtype) from the compressed 2:4 format. A group whose two positions
    are the same (a malformed meta) holds the sum of its two values there, as the kernels do."""
    n, groups = meta.shape
    m = meta.to(torch.int64)
    idx = torch.stack((m & 3, (m >> 2) & 3), dim=-1)  # [N, G, 2]
    dense = torch.zeros(n, groups, 4, dtype=values.dtype, device=values.device)
    dense.scatter_add_(-1, idx, values.reshape(n, groups, 2))
    return dense.reshape(n, groups * 4)


def _check_block(block_size):
    if len(block_size) != 2 or min(block_size) <= 0:
        raise ValueError("block_size must be two positive integers (bn, bk), got %r" % (block_size,))
    return int(block_size[0]), int(block_size[1])


def _pad_to_blocks(w, bn, bk):
    n, k = w.shape
    np_, kp = math.ceil(n / bn) * bn, math.ceil(k / bk) * bk
    if (np_, kp) != (n, k):
        w = torch.nn.functional.pad(w, (0, kp - k, 0, np_ - n))
    return w


def prune_blocks(w: torch.Tensor, block_size=(16, 16), sparsity: float = 0.9) -> torch.Tensor:
    """bool mask [N, K] that zeroes the fraction ``sparsity`` of (bn, bk) blocks with the smallest L2 norm."""
    _check_2d_float(w, "prune_blocks")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError("prune_blocks: sparsity must be in [0, 1), got %r" % (sparsity,))
    bn, bk = _check_block(block_size)
    n, k = w.shape
    wp = _pad_to_blocks(w.detach().float(), bn, bk)
    nb, kb = wp.shape[0] // bn, wp.shape[1] // bk
    norms = wp.reshape(nb, bn, kb, bk).pow(2).sum(dim=(1, 3))
    keep = max(1, int(round(nb * kb * (1.0 - sparsity))))
    block_mask = torch.zeros(nb * kb, dtype=torch.bool, device=w.device)
    block_mask[norms.flatten().topk(keep, sorted=False).indices] = True
    block_mask = block_mask.reshape(nb, kb)
    mask = block_mask[:, None, :, None].expand(nb, bn, kb, bk).reshape(nb * bn, kb * bk)
    return mask[:n, :k].contiguous()


def dense_to_blocksparse(w: torch.Tensor, block_size=(16, 16), mask: torch.Tensor = None):
    """(blocks [nnzb, bn, bk], row_ptr int64 [N/bn + 1], col_idx int64 [nnzb]).

    A block is kept when it has any nonzero weight (after applying ``mask`` if given).
    """
    _check_2d_float(w, "dense_to_blocksparse")
    bn, bk = _check_block(block_size)
    w = w.detach()
    if mask is not None:
        w = w * mask.to(w.dtype)
    wp = _pad_to_blocks(w, bn, bk)
    nb, kb = wp.shape[0] // bn, wp.shape[1] // bk
    tiles = wp.reshape(nb, bn, kb, bk).permute(0, 2, 1, 3)  # [nb, kb, bn, bk]
    nonempty = (tiles != 0).flatten(2).any(-1)  # [nb, kb]
    rows, cols = nonempty.nonzero(as_tuple=True)
    blocks = tiles[rows, cols].contiguous()
    counts = nonempty.sum(dim=1)
    row_ptr = torch.zeros(nb + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return blocks, row_ptr, cols.to(torch.int64).contiguous()


def blocksparse_to_dense(blocks, row_ptr, col_idx, shape) -> torch.Tensor:
    """Dense [N, K] (blocks' dtype) from the block-sparse format; ``shape`` is (N, K). A block
    listed twice in a block row (a malformed col_idx) counts twice, as in the kernels; a block
    whose column lies past K is outside the matrix and dropped. No shape depends on the index
    values, so AOT autograd traces it (the ops' backward)."""
    n, k = shape
    nnz, bn, bk = blocks.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    # one spare block column takes the blocks past K; the slice below drops it
    tiles = torch.zeros(nb, kb + 1, bn, bk, dtype=blocks.dtype, device=blocks.device)
    counts = row_ptr[1:] - row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(nb, device=blocks.device), counts, output_size=nnz)
    tiles.index_put_((rows, col_idx.to(torch.int64).clamp(max=kb)), blocks, accumulate=True)
    return tiles.permute(0, 2, 1, 3).reshape(nb * bn, (kb + 1) * bk)[:n, :k]
