"""int8 ops on small (BERT/MiniLM-sized) layers against FBGEMM dynamic int8, side by side.

Times the native kernels (torch.ops.fastkern_C.linear_w8a8 / int8_gemm, no op layer), the
public op (torch.ops.fastkern.linear_w8a8, op layer included) and FBGEMM's dynamic Linear,
interleaved in rounds, on weights that are either rotated beyond L3 (cold, as
fastkern-bench does) or one copy re-read (hot). Median us per call; ratio = FBGEMM / fastkern.

    PYTHONPATH=<tree> flock -x /tmp/fk-cpu.lock python bench/int8_small.py --threads 1,2
    (AVX2 cap: FASTKERN_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2
     ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/int8_small.py ...)
"""
import argparse
import statistics
import time
import warnings

import torch

import fastkern  # noqa: F401  (loads the extension and registers the ops)
from fastkern import formats

L3_BYTES = 32 << 20


def fbgemm_linear(q, s):
    n, k = q.shape
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized.dynamic as nnqd

        qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(n, dtype=torch.long), 0)
        lin = nnqd.Linear(k, n, bias_=False, dtype=torch.qint8)
        lin.set_weight_bias(qw, None)
    return lin


def per_call_us(fn, budget_s):
    fn()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < budget_s / 4:
        fn()
        n += 1
    n = max(1, n)
    t0 = time.perf_counter_ns()
    for _ in range(n * 4):
        fn()
    return (time.perf_counter_ns() - t0) / (n * 4) / 1e3


def rotating(fn, copies, x):
    state = {"i": 0}

    def call():
        c = copies[state["i"]]
        state["i"] = (state["i"] + 1) % len(copies)
        return fn(x, c)

    return call


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ops", default="w8a8,int8_gemm")
    p.add_argument("--shapes", default="1536x384,384x1536,384x384")
    p.add_argument("--m", default="1,8,17,32,64")
    p.add_argument("--threads", default="2")
    p.add_argument("--cache", default="cold,hot")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.02, help="seconds per timed sample")
    p.add_argument("--public", action="store_true", help="also time the public op (op layer)")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    native = {"w8a8": torch.ops.fastkern_C.linear_w8a8.default, "int8_gemm": torch.ops.fastkern_C.int8_gemm.default}
    print("fastkern isa", fastkern._ext._C.cpu_isa(), "| torch cpu capability", torch.backends.cpu.get_cpu_capability(),
          "| load", open("/proc/loadavg").read().split()[:3])
    print("%-9s %-3s %-4s %9s %4s %9s %9s %9s %7s" % ("op", "thr", "cache", "NxK", "M", "fk us", "pub us", "fbgemm us",
                                                        "fb/fk"))
    for th in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(th)
        for shape in a.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            w = torch.randn(n, k, generator=g)
            q, s = formats.quantize_int8(w)
            ncopy = max(2, min(64, -(-4 * L3_BYTES // (n * k))))
            qs = [q.clone() for _ in range(ncopy)]
            fbs = [fbgemm_linear(c, s) for c in qs]
            for cache in a.cache.split(","):
                cq = qs if cache == "cold" else qs[:1]
                cf = fbs if cache == "cold" else fbs[:1]
                for m in [int(v) for v in a.m.split(",")]:
                    x = torch.randn(m, k, generator=g)
                    x8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
                    for op in a.ops.split(","):
                        impls = {}
                        if op == "w8a8":
                            impls["fk"] = rotating(lambda x, c: native["w8a8"](x, c, s, None), cq, x)
                            if a.public:
                                impls["pub"] = rotating(lambda x, c: torch.ops.fastkern.linear_w8a8(x, c, s, None), cq, x)
                        else:
                            impls["fk"] = rotating(lambda x, c: native["int8_gemm"](x, c), cq, x8)
                        impls["fb"] = rotating(lambda x, c: c(x), cf, x)
                        res = {key: [] for key in impls}
                        for _ in range(a.rounds):
                            for key, fn in impls.items():
                                res[key].append(per_call_us(fn, a.budget))
                        med = {key: statistics.median(v) for key, v in res.items()}
                        print("%-9s %-3d %-4s %9s %4d %9.1f %9s %9.1f %7.2f" % (
                            op, th, cache, shape, m, med["fk"], "%.1f" % med["pub"] if "pub" in med else "-", med["fb"],
                            med["fb"] / med["fk"]), flush=True)


if __name__ == "__main__":
    main()
