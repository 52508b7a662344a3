"""DESIGN.md §6 targets, checked against the entries of one run (never across runs).

Each target names an op, which entries it covers (backend, M, shape, activation
dtype) and one metric: a percentage of a ceiling measured in the same run, or a
speedup over a peer timed in the same run. ``evaluate`` returns one row per entry
covered, with the measured value and whether it meets the target.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional


@dataclass(frozen=True)
class Target:
    device: str
    op: str
    what: str  # human description, as DESIGN §6 words it
    metric: str  # "pct_bw", "pct_fma" or "speedup"
    threshold: float
    peer: Optional[str] = None  # peer name for speedup targets
    backends: tuple = ("cpu",)
    select: Callable[[dict], bool] = lambda e: True


def _m(*ms):
    return lambda e: e["m"] in ms


CPU_TARGETS = [
    Target("cpu", "linear_w4a16", "W4A16 M=1: >= 85% of read bandwidth", "pct_bw", 85, select=_m(1)),
    Target("cpu", "linear_w4a16", "W4A16 M=1: >= 6x F.linear fp32", "speedup", 6, "F.linear fp32", select=_m(1)),
    Target("cpu", "linear_w4a16", "W4A16 M=1: >= 1.5x FBGEMM dynamic int8", "speedup", 1.5, "FBGEMM dynamic int8",
           select=_m(1)),
    Target("cpu", "linear_w4a16", "W4A16 M=1: >= 2.5x torch int4 (bf16)", "speedup", 2.5, "torch int4pack (bf16)",
           select=_m(1)),
    Target("cpu", "linear_w8a8", "W8A8 M=1: >= 1.2x FBGEMM", "speedup", 1.2, "FBGEMM dynamic int8", select=_m(1)),
    Target("cpu", "linear_w8a8", "W8A8 M>=64: >= 1.0x FBGEMM", "speedup", 1.0, "FBGEMM dynamic int8",
           select=lambda e: e["m"] >= 64),
    Target("cpu", "gemm", "dense fp32 GEMM 2048^3: >= 80% of fp32 FMA peak (measured)", "pct_fma", 80,
           select=lambda e: e["dtype"] == "fp32" and e["m"] >= 2048),
    Target("cpu", "gemm", "dense fp32 GEMM 2048^3: >= 1.5x torch", "speedup", 1.5, "F.linear fp32",
           select=lambda e: e["dtype"] == "fp32" and e["m"] >= 2048),
    Target("cpu", "linear_sparse24", "2:4 fp32 M=1: >= 1.6x dense fp32", "speedup", 1.6, "F.linear fp32",
           select=lambda e: e["m"] == 1 and e["dtype"] == "fp32"),
    Target("cpu", "linear_blocksparse", "block-sparse 90%: >= 5x dense fp32", "speedup", 5, "F.linear fp32",
           select=lambda e: e["dtype"] == "fp32" and abs(float(e.get("params", {}).get("sparsity", 0.9)) - 0.9) < 1e-9),
]

_GPU = ("cuda", "triton")
GPU_TARGETS = [
    Target("cuda", "linear_w4a16", "W4A16 M=1 8192x8192 fp16: >= 80% of HBM bandwidth", "pct_bw", 80, backends=_GPU,
           select=lambda e: e["m"] == 1 and e["n"] == e["k"] == 8192 and e["dtype"] == "fp16"),
    Target("cuda", "linear_w4a16", "W4A16 M=1 8192x8192 fp16: >= 3x cuBLAS fp16", "speedup", 3, "cuBLAS fp16",
           backends=_GPU, select=lambda e: e["m"] == 1 and e["n"] == e["k"] == 8192 and e["dtype"] == "fp16"),
    Target("cuda", "linear_w4a16", "W4A16 M=1 8192x8192: >= 1.2x torch int4", "speedup", 1.2, "torch int4pack (bf16)",
           backends=_GPU, select=lambda e: e["m"] == 1 and e["n"] == e["k"] == 8192),
    Target("cuda", "linear_w4a16", "W4A16 M=16..64: >= 2.5x cuBLAS fp16", "speedup", 2.5, "cuBLAS fp16",
           backends=_GPU, select=lambda e: 16 <= e["m"] <= 64 and e["dtype"] == "fp16"),
    Target("cuda", "linear_w8a8", "W8A8 M=4096 N=K=8192: >= 1.0x torch._int_mm", "speedup", 1.0, "torch._int_mm",
           backends=_GPU, select=lambda e: e["m"] == 4096 and e["n"] == e["k"] == 8192),
    Target("cuda", "linear_w8a8", "W8A8 M=4096 N=K=8192: >= 1.5x cuBLAS bf16", "speedup", 1.5, "cuBLAS bf16",
           backends=_GPU, select=lambda e: e["m"] == 4096 and e["n"] == e["k"] == 8192),
    Target("cuda", "linear_sparse24", "2:4 fp16 large shapes: >= 1.0x cuSPARSELt", "speedup", 1.0,
           "2:4 semi-structured fp16", backends=_GPU, select=lambda e: e["m"] >= 1024 and e["dtype"] == "fp16"),
    Target("cuda", "linear_sparse24", "2:4 fp16 large shapes: >= 1.2x cuBLAS dense", "speedup", 1.2, "cuBLAS fp16",
           backends=_GPU, select=lambda e: e["m"] >= 1024 and e["dtype"] == "fp16"),
    Target("cuda", "gemm", "Triton dense fp16 GEMM: >= 0.9x cuBLAS", "speedup", 0.9, "cuBLAS fp16",
           backends=("triton",), select=lambda e: e["dtype"] == "fp16"),
]


def evaluate(result: dict) -> List[dict]:
    """Rows {target, op, backend, n, k, m, dtype, value, threshold, met} for every covered entry."""
    device = result["metadata"].get("bench_device", "cpu")
    targets = GPU_TARGETS if device == "cuda" else CPU_TARGETS
    rows = []
    for t in targets:
        for e in result["results"]:
            if e["kind"] != "fastkern" or e["op"] != t.op or e.get("backend") not in t.backends:
                continue
            if e["status"] != "ok" or not t.select(e):
                continue
            if t.metric == "speedup":
                value = e.get("speedup", {}).get(t.peer)
            else:
                value = e.get(t.metric)
            rows.append({"target": t.what, "op": t.op, "backend": e["backend"], "n": e["n"], "k": e["k"],
                         "m": e["m"], "dtype": e["dtype"], "metric": t.metric, "peer": t.peer,
                         "value": value, "threshold": t.threshold,
                         "met": None if value is None else bool(value >= t.threshold)})
    return rows


def render_text(rows: List[dict]) -> str:
    if not rows:
        return "DESIGN §6 targets: no fastkern entry of this run is covered by a target\n"
    lines = ["DESIGN §6 targets (this run only):"]
    for r in rows:
        unit = "x" if r["metric"] == "speedup" else "%"
        val = "n/a (peer not timed)" if r["value"] is None else ("%.2f%s" % (r["value"], unit))
        mark = "-" if r["met"] is None else ("ok" if r["met"] else "MISS")
        lines.append("  %-4s %-62s %-9s %dx%d M=%d %s: %s" % (mark, r["target"], "[%s]" % r["backend"], r["n"], r["k"],
                                                              r["m"], r["dtype"], val))
    return "\n".join(lines) + "\n"
