"""Per-call cost (us) of fastkern's public ops and modules at tiny shapes, where the
Python around the kernel is most of the time. One torch thread; median of repeats.

    PYTHONPATH=<tree> flock -x /tmp/fk-cpu.lock python bench/op_overhead.py [--reps 7]
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import fastkern as fk


def per_call_us(fn, n=2000, reps=7):
    for _ in range(200):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        times.append((time.perf_counter_ns() - t0) / n / 1e3)
    return statistics.median(times)


def cases():
    g = torch.Generator().manual_seed(0)
    out = {}
    lin = nn.Linear(64, 64)
    x = torch.randn(1, 64, generator=g)
    q8 = fk.QLinear.from_linear(lin, weight_dtype="int8", act_dtype="int8")
    args = (x, q8.weight, q8.weight_scale, q8.bias)
    out["F.linear 64x64 M=1"] = lambda: F.linear(x, lin.weight, lin.bias)
    if fk._ext._C is not None:
        native = torch.ops.fastkern_C.linear_w8a8.default
        out["fastkern_C.linear_w8a8 (native) 64x64 M=1"] = lambda: native(*args)
    public = torch.ops.fastkern.linear_w8a8
    out["fastkern.linear_w8a8 (public op) 64x64 M=1"] = lambda: public(*args)
    out["QLinear w8a8 64x64 M=1"] = lambda: q8(x)
    q816 = fk.QLinear.from_linear(lin, weight_dtype="int8")
    out["QLinear w8a16 64x64 M=1"] = lambda: q816(x)
    q4 = fk.QLinear.from_linear(lin, weight_dtype="int4", group_size=32)
    out["QLinear w4a16 64x64 M=1"] = lambda: q4(x)
    s24 = fk.SparseLinear.from_linear(lin, pattern="2:4")
    out["SparseLinear 2:4 64x64 M=1"] = lambda: s24(x)
    sb = fk.SparseLinear.from_linear(lin, pattern="block", block_size=(16, 16), sparsity=0.5)
    out["SparseLinear block 64x64 M=1"] = lambda: sb(x)
    # MiniLM-sized layers at M=17 (batch 1, one short sentence)
    for n, k in ((384, 384), (1536, 384)):
        l2 = nn.Linear(k, n)
        x2 = torch.randn(17, k, generator=g)
        qm = fk.QLinear.from_linear(l2, weight_dtype="int8", act_dtype="int8")
        out["QLinear w8a8 %dx%d M=17" % (n, k)] = lambda qm=qm, x2=x2: qm(x2)
        dq = torch.ao.nn.quantized.dynamic.Linear(k, n)
        dq.set_weight_bias(torch.quantize_per_channel(l2.weight.detach(), q8.weight_scale.new_ones(n) * 0.01,
                                                      torch.zeros(n, dtype=torch.long), 0, torch.qint8), l2.bias.detach())
        out["torch dynamic int8 Linear %dx%d M=17" % (n, k)] = lambda dq=dq, x2=x2: dq(x2)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    res = {}
    with torch.no_grad():
        for name, fn in cases().items():
            res[name] = per_call_us(fn, a.n, a.reps)
            print("%-48s %8.2f us" % (name, res[name]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
