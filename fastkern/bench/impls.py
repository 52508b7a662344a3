"""What gets timed: an ``Impl`` is one callable (a fastkern op on one backend, or a peer)
with its activation, a way to make weight copies, and the work it does.

The fastkern side calls ``torch.ops.fastkern.<op>`` under ``fastkern.use_backend`` -
the same call a user (or ``QLinear``) makes, input checks and backend routing included.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch

import fastkern
from fastkern.bench.inputs import clone_args, make_x, op_flops, op_weight_args, tensor_bytes
from fastkern.bench.shapes import Case


@dataclass
class Impl:
    name: str  # row label: "fastkern[cpu]", "F.linear fp32", ...
    short: str  # column label in speedup lists
    kind: str  # "fastkern" or "peer"
    dtype: str  # activation dtype name
    x: torch.Tensor
    make_copy: Callable[[], tuple]  # a fresh weight copy (its first call may return the original)
    call: Callable[[torch.Tensor, tuple], torch.Tensor]
    flops: int
    weight_bytes: Callable[[tuple], int] = tensor_bytes
    context: Callable[[], ContextManager] = contextlib.nullcontext
    backend: Optional[str] = None
    extra: dict = field(default_factory=dict)


def _copies(build: Callable[[], tuple], clone: Optional[Callable[[tuple], tuple]]):
    """make_copy: the first call builds, later calls clone (or build again when cloning is impossible)."""
    state = {}

    def make_copy():
        if "base" not in state:
            state["base"] = build()
            return state["base"]
        return clone(state["base"]) if clone is not None else build()

    return make_copy


def fastkern_impl(case: Case, backend: str, w: torch.Tensor, device="cpu", seed: int = 1) -> Impl:
    """``torch.ops.fastkern.<op>`` on ``backend``, inputs built from ``w`` by fastkern.formats."""
    op = getattr(torch.ops.fastkern, case.op)
    base = op_weight_args(case, w)

    def call(x, args):
        return op(x, *args)

    return Impl(
        name="fastkern[%s]" % backend,
        short="fastkern[%s]" % backend,
        kind="fastkern",
        dtype=case.dtype,
        x=make_x(case, device, seed),
        make_copy=_copies(lambda: base, clone_args),
        call=call,
        flops=op_flops(case, base),
        context=lambda: fastkern.use_backend(backend),
        backend=backend,
    )
