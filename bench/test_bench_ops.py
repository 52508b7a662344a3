"""Every fastkern op on every available backend, next to PyTorch's peers (pytest-benchmark).

Inputs, peers, weight rotation and shapes all come from ``fastkern.bench``, the library
behind ``fastkern-bench``, so the two cannot drift. See bench/conftest.py for the knobs.
"""
import functools

import pytest
import torch

from fastkern import ops
from fastkern.bench.ceilings import llc_bytes
from fastkern.bench.impls import fastkern_impl
from fastkern.bench.inputs import make_weight, tensor_bytes
from fastkern.bench.peers import PeerUnavailable
from fastkern.bench.timing import Rotator, copies_needed, warmup


@functools.lru_cache(maxsize=2)
def _weight(n, k, device):
    return make_weight(n, k, 0, device)


def test_op(benchmark, device, case, impl_spec):
    kind, what = impl_spec
    w = _weight(case.n, case.k, device)
    if kind == "fastkern":
        reason = ops.backend_status(case.op, what, torch.device(device))
        if reason is not None:
            pytest.skip(reason)
        impl = fastkern_impl(case, what, w, device)
    else:
        try:
            impl = what.impl(w, case.m, device)
        except PeerUnavailable as e:
            pytest.skip(str(e))
    first = impl.make_copy()
    copy_bytes = impl.weight_bytes(first)
    copies = [first] + [impl.make_copy() for _ in range(copies_needed(copy_bytes, llc_bytes(device)) - 1)]
    rot = Rotator(impl.call, impl.x, copies)

    benchmark.group = case.group
    benchmark.extra_info.update(op=case.op, impl=impl.name, act=impl.dtype, n=case.n, k=case.k, m=case.m,
                                flops=impl.flops, copies=len(copies))
    with impl.context():
        out = rot()
        benchmark.extra_info["bytes"] = copy_bytes + tensor_bytes(impl.x, out)
        warmup(rot, device)
        if device == "cuda":
            benchmark(lambda: (rot(), torch.cuda.synchronize()))
        else:
            benchmark(rot)
