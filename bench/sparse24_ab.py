"""2:4 linear layers with bf16 activations: fastkern's kernels against torch's dense bf16 F.linear,
in alternating rounds in one process.

Each variant is a set of environment knobs read per call by the kernels (default: the
current dispatch; "old" turns the bf16 pair kernel off, so bf16 x takes the fp32 kept-weights
kernel, or the streaming kernel at small M). Weights rotate among copies beyond the L3, as
fastkern-bench does. Prints the median ms per call and the ratios against dense bf16.

    python bench/sparse24_ab.py
    SHAPES=4096x14336 MS=16,256 ROUNDS=7 python bench/sparse24_ab.py
    VARIANTS="new=;old=FASTKERN_S24_BF16_MIN_M=0" python bench/sparse24_ab.py
"""
import os
import time

import torch

import fastkern  # noqa: F401  (registers the ops)
from fastkern import formats


def setenv(spec):
    for kv in filter(None, spec.split(":")):
        k, v = kv.split("=")
        os.environ[k] = v


def main():
    torch.set_num_threads(int(os.environ.get("TH", 2)))
    shapes = [tuple(map(int, s.split("x"))) for s in os.environ.get("SHAPES", "4096x4096,4096x11008,11008x4096").split(",")]
    ms = [int(m) for m in os.environ.get("MS", "6,16,64,256").split(",")]
    rounds = int(os.environ.get("ROUNDS", 5))
    variants = [v.split("=", 1) for v in os.environ.get("VARIANTS", "new=;old=FASTKERN_S24_BF16_MIN_M=0").split(";")]
    op = torch.ops.fastkern_C.linear_sparse24
    for n, k in shapes:
        copies = max(2, int(96e6 // (n * k * 2)) + 1)
        ws = []
        for _ in range(copies):
            v, mt = formats.compress_2_4(torch.randn(n, k))
            ws.append((v.bfloat16(), mt, torch.randn(n, k).bfloat16()))
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            reps = max(3, int(0.1 / (2 * m * n * k / 500e9 + 1e-5)))
            res = {name: [] for name, _ in variants + [("dense", "")]}
            for _ in range(rounds):
                for name, spec in variants + [("dense", "")]:
                    saved = dict(os.environ)
                    setenv(spec)
                    if name == "dense":
                        f = lambda i: torch.nn.functional.linear(x, ws[i % copies][2])  # noqa: E731
                    else:
                        f = lambda i: op(x, ws[i % copies][0], ws[i % copies][1], None)  # noqa: E731
                    f(0), f(1)
                    t0 = time.perf_counter()
                    for i in range(reps):
                        f(i)
                    res[name].append((time.perf_counter() - t0) / reps * 1e3)
                    os.environ.clear()
                    os.environ.update(saved)
            med = {name: sorted(v)[len(v) // 2] for name, v in res.items()}
            print(f"{n}x{k} M={m}: " + "  ".join(f"{name} {t:.3f}ms" for name, t in med.items()) + "  | "
                  + "  ".join(f"{name}/dense x{med['dense'] / med[name]:.2f}" for name in med if name != "dense"), flush=True)


if __name__ == "__main__":
    main()
