"""Every fastkern op on every available backend, next to PyTorch's peers (pytest-benchmark).

Inputs, peers, weight rotation and shapes all come from ``fastkern.bench``, the library
behind ``fastkern-bench``, so the two cannot drift. See bench/conftest.py for the knobs.
"""
import pytest
import torch

from fastkern import ops
from fastkern.bench.ceilings import llc_bytes
from fastkern.bench.impls import fastkern_impl, fastkern_pool
from fastkern.bench.inputs import make_weight, tensor_bytes
from fastkern.bench.peers import PeerUnavailable
from fastkern.bench.timing import Rotator, copies_needed, warmup


_current = {"key": None, "w": None, "pools": {}}


def _weight_and_pools(n, k, device):
    """The float weight and its formats' copy pools, kept while consecutive tests use that weight."""
    if _current["key"] != (n, k, device):
        _current.update(key=None, w=None, pools={})  # free the previous weight first
        _current.update(key=(n, k, device), w=make_weight(n, k, 0, device))
    return _current["w"], _current["pools"]


def test_op(benchmark, device, case, impl_spec):
    kind, what = impl_spec
    w, pools = _weight_and_pools(case.n, case.k, device)
    if kind == "fastkern":
        reason = ops.backend_status(case.op, what, torch.device(device))
        if reason is not None:
            pytest.skip(reason)
        key = ("fastkern", case.op, case.dtype, case.params)
        if key not in pools:
            pools[key] = fastkern_pool(case, w)  # built lazily, on first use
        impl = fastkern_impl(case, what, w, device, pool=pools[key])
    else:
        key = ("peer", what.name)
        if key not in pools:
            pools[key] = what.pool(w)
        try:
            impl = what.impl(w, case.m, device, pool=pools[key])
        except PeerUnavailable as e:
            pytest.skip(str(e))
    first = impl.pool.get(0)
    copy_bytes = impl.weight_bytes(first)
    # --benchmark-disable runs each once, as a smoke test: no cache-defeating copies needed then
    ncopies = 1 if benchmark.disabled else copies_needed(copy_bytes, llc_bytes(device))
    copies = [impl.pool.get(i) for i in range(ncopies)]
    rot = Rotator(impl.call, impl.x, copies)

    benchmark.group = case.group
    benchmark.extra_info.update(op=case.op, impl=impl.name, act=impl.dtype, n=case.n, k=case.k, m=case.m,
                                flops=impl.flops, copies=len(copies))
    with impl.context():
        out = rot()
        benchmark.extra_info["bytes"] = copy_bytes + tensor_bytes(impl.x, out)
        if not benchmark.disabled:
            warmup(rot, device)
        if device == "cuda":
            benchmark(lambda: (rot(), torch.cuda.synchronize()))
        else:
            benchmark(rot)
