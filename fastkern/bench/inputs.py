"""Input builders: one random float weight per (N, K), turned into each op's format.

Every fastkern op and every peer is built from the same ``make_weight`` tensor, with
the canonical converters in ``fastkern.formats``, so all of them compute (an
approximation of) the same product.
"""
import math
from typing import Tuple

import torch

from fastkern import formats
from fastkern.bench.shapes import Case


def make_weight(n: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """float32 [n, k], N(0, 1/k) like an initialised linear layer; seeded by (seed, n, k)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + k)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    return w.to(device)


def make_activation(m: int, k: int, dtype: torch.dtype, seed: int = 1, device="cpu") -> torch.Tensor:
    """x [m, k] of ``dtype`` (int8: per-token quantized Gaussian activations)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + m * 7919 + k)
    x = torch.randn(m, k, generator=gen)
    if dtype == torch.int8:
        x = formats.quantize_per_token(x)[0]
    else:
        x = x.to(dtype)
    return x.to(device)


def make_x(case: Case, device="cpu", seed: int = 1) -> torch.Tensor:
    return make_activation(case.m, case.k, case.torch_dtype, seed, device)


def op_weight_args(case: Case, w: torch.Tensor) -> tuple:
    """The op's arguments after x, built from the float weight ``w`` [N, K] (one copy)."""
    dt = case.torch_dtype
    op = case.op
    if op == "gemm":
        return (w.to(dt).contiguous(),)
    if op == "int8_gemm":
        return (formats.quantize_int8(w)[0],)
    if op in ("linear_w8a16", "linear_w8a8"):
        q, s = formats.quantize_int8(w)
        return (q, s, None)
    if op in ("linear_w4a16", "linear_w4a8"):
        gs = case.param("group_size")
        packed, scale, zero = formats.quantize_int4(w, gs)
        return (packed, scale, zero, gs, None)
    if op == "linear_sparse24":
        values, meta = formats.compress_2_4(w.to(dt))
        return (values, meta, None)
    if op == "linear_blocksparse":
        block = tuple(case.param("block_size"))
        mask = formats.prune_blocks(w, block, case.param("sparsity"))
        blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, block, mask)
        return (blocks.to(dt), row_ptr, col_idx, case.n, None)
    raise ValueError("no input builder for op %r" % op)


def clone_args(args: tuple) -> tuple:
    """A fresh copy of every tensor (so rotated copies live at different addresses)."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def op_flops(case: Case, wargs: tuple) -> int:
    """Useful multiply-adds x 2: the nonzero weights only, for the sparse formats."""
    if case.op == "linear_sparse24":
        return case.m * case.n * case.k  # half of 2*M*N*K
    if case.op == "linear_blocksparse":
        blocks = wargs[0]
        return 2 * case.m * blocks.numel()
    return 2 * case.m * case.n * case.k


def tensor_bytes(*objs) -> int:
    """Bytes held by the tensors among ``objs`` (nested tuples/lists are walked)."""
    total = 0
    for o in objs:
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, (tuple, list)):
            total += tensor_bytes(*o)
    return total


def op_inputs(case: Case, w: torch.Tensor, device="cpu", seed: int = 1) -> Tuple[torch.Tensor, tuple]:
    """(x, weight args) ready for ``getattr(torch.ops.fastkern, case.op)(x, *args)``."""
    return make_x(case, device, seed), op_weight_args(case, w)
