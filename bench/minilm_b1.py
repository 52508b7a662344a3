"""all-MiniLM-L6-v2 batch-1 latency (one 17-token sentence) per variant, at 1 and 2 torch
threads: the model-level view of per-call overhead (36 linears per forward). Prints
median and min ms of torch.utils.benchmark blocks; ratios vs torch's dynamic int8 Linear
timed in the same process.

    PYTHONPATH=<tree> flock -x /tmp/fk-cpu.lock python bench/minilm_b1.py [--json out.json]
"""
import argparse
import copy
import json
import warnings

import torch
from torch import nn
from torch.utils import benchmark

import fastkern as fk
from fastkern.models import minilm


def variants():
    def dyn(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8, inplace=True)

    return {
        "torch-int8-dyn": dyn,
        "w8a8": lambda m: fk.quantize_(m, weight_dtype="int8", act_dtype="int8"),
        "w8a16": lambda m: fk.quantize_(m, weight_dtype="int8"),
        "2:4": lambda m: fk.sparsify_(m, pattern="2:4", filter_fn=lambda mod, fqn: mod.in_features % 4 == 0),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--min-run-time", type=float, default=0.4)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model, tok = minilm.load_minilm()
    model.eval()
    sent = "The quick brown fox jumps over the lazy dog near the quiet river bank."
    one = minilm.tokenize(tok, [sent], 128)
    out = {"tokens": int(one["input_ids"].shape[1])}
    models = {"fp32": model}
    for name, conv in variants().items():
        models[name] = conv(copy.deepcopy(model)).eval()
    with torch.no_grad():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, m in models.items():
                fn = lambda m=m: m(**one)  # noqa: E731
                fn()
                t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
                    min_run_time=a.min_run_time)
                key = "%s t%d" % (name, threads)
                out[key] = {"median_ms": t.median * 1e3, "min_ms": min(t.raw_times) / t.number_per_run * 1e3}
                print("%-20s median %.3f ms  min %.3f ms" % (key, out[key]["median_ms"], out[key]["min_ms"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
