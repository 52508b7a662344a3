"""pytest-benchmark suite over the harness's own shape sets and input builders.

    pytest bench/ --benchmark-only                       # reduced set (fastkern-bench --quick's cases)
    FASTKERN_BENCH_FULL=1 pytest bench/ --benchmark-only # DESIGN §5's full set
    FASTKERN_BENCH_OPS=w4a16,gemm                        # only these ops
    FASTKERN_BENCH_DEVICE=cuda                           # GPU cases and peers
    FASTKERN_BENCH_BACKENDS=cpu,reference                # fastkern backends to time
    FASTKERN_BENCH_PEERS=fp32,int4pack                   # peers to time ("none": fastkern only)

Benchmarks are grouped by op and shape (``benchmark.group``), so each group shows the
fastkern backends next to the PyTorch peers timed on the same weight.
"""
import os

import pytest
import torch

from fastkern.bench import shapes
from fastkern.bench.peers import peers_for
from fastkern.bench.runner import default_backends


def _csv(name):
    v = os.environ.get(name, "")
    return [s.strip() for s in v.split(",") if s.strip()] or None


def bench_device() -> str:
    return os.environ.get("FASTKERN_BENCH_DEVICE", "cpu")


def bench_cases():
    device = bench_device()
    make = shapes.full_cases if os.environ.get("FASTKERN_BENCH_FULL") == "1" else shapes.quick_cases
    return make(_csv("FASTKERN_BENCH_OPS"), device)


def bench_params():
    """(case, ("fastkern", backend) | ("peer", PeerSpec)) for every case, with readable ids."""
    device = bench_device()
    backends = _csv("FASTKERN_BENCH_BACKENDS") or default_backends(device)
    peer_names = _csv("FASTKERN_BENCH_PEERS")
    params = []
    for case in bench_cases():
        cid = "%s-%dx%d-M%d-%s" % (case.op, case.n, case.k, case.m, case.dtype)
        for be in backends:
            params.append(pytest.param(case, ("fastkern", be), id="%s-fastkern[%s]" % (cid, be)))
        if peer_names != ["none"]:
            for p in peers_for(case.op, device, peer_names):
                params.append(pytest.param(case, ("peer", p), id="%s-%s" % (cid, p.short)))
    return params


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and "impl_spec" in metafunc.fixturenames:
        metafunc.parametrize(("case", "impl_spec"), bench_params())


@pytest.fixture(scope="session")
def device():
    return bench_device()


def pytest_collection_modifyitems(config, items):
    if bench_device() == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="FASTKERN_BENCH_DEVICE=cuda but no GPU is visible")
        for item in items:
            item.add_marker(skip)
