"""What gets timed: an ``Impl`` is one callable (a fastkern op on one backend, or a peer)
with its activation, a way to make weight copies, and the work it does.

The fastkern side calls ``torch.ops.fastkern.<op>`` under ``fastkern.use_backend`` -
the same call a user (or ``QLinear``) makes, input checks and backend routing included.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional

import torch

import fastkern
from fastkern.bench.inputs import clone_args, make_x, op_flops, op_weight_args, tensor_bytes
from fastkern.bench.shapes import Case


class CopyPool:
    """Copies of one weight in one format, built on first need and kept while that weight is
    in use, so every M and every backend timed on it reuses them (packing can take seconds)."""

    def __init__(self, build: Callable[[], tuple], clone: Optional[Callable[[tuple], tuple]] = clone_args):
        self.build, self.clone = build, clone
        self.copies: List[tuple] = []

    def get(self, i: int) -> tuple:
        while len(self.copies) <= i:
            if not self.copies:
                self.copies.append(self.build())
            elif self.clone is not None:
                self.copies.append(self.clone(self.copies[0]))
            else:  # opaque packed formats cannot be cloned: pack again
                self.copies.append(self.build())
        return self.copies[i]


@dataclass
class Impl:
    name: str  # row label: "fastkern[cpu]", "F.linear fp32", ...
    short: str  # column label in speedup lists
    kind: str  # "fastkern" or "peer"
    dtype: str  # activation dtype name
    x: torch.Tensor
    pool: CopyPool  # weight copies: pool.get(i)
    call: Callable[[torch.Tensor, tuple], torch.Tensor]
    flops: int
    weight_bytes: Callable[[tuple], int] = tensor_bytes
    context: Callable[[], ContextManager] = contextlib.nullcontext
    backend: Optional[str] = None
    extra: dict = field(default_factory=dict)


def fastkern_pool(case: Case, w: torch.Tensor) -> CopyPool:
    return CopyPool(lambda: op_weight_args(case, w), clone_args)


def fastkern_impl(case: Case, backend: str, w: torch.Tensor, device="cpu", seed: int = 1,
                  pool: Optional[CopyPool] = None) -> Impl:
    """``torch.ops.fastkern.<op>`` on ``backend``, inputs built from ``w`` by fastkern.formats
    (``pool``: copies already built for this case's op, dtype and weight)."""
    op = getattr(torch.ops.fastkern, case.op)
    pool = pool or fastkern_pool(case, w)

    def call(x, args):
        return op(x, *args)

    return Impl(
        name="fastkern[%s]" % backend,
        short="fastkern[%s]" % backend,
        kind="fastkern",
        dtype=case.dtype,
        x=make_x(case, device, seed),
        pool=pool,
        call=call,
        flops=op_flops(case, pool.get(0)),
        context=lambda: fastkern.use_backend(backend),
        backend=backend,
    )
