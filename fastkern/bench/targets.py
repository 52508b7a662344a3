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


def ceiling_rows(result: dict) -> List[dict]:
    """What this run's own measurements allow for the CPU targets that depend on more than
    fastkern's kernels: rows {target, ceiling, unit, how}, from result["ceilings"] (the
    probes of ceilings.measure_ceilings) and the peers' entries.

    - W4A16 M=1 %BW: fastkern's W4A16 rate with its weight in the LLC (its compute rate; at
      least the best fp32 rate it reached in the run) against the read bandwidth: a kernel
      that computes slower than memory streams cannot reach more than that share of it.
    - W4A16 M=1 vs FBGEMM: FBGEMM reads an int8 weight, twice the int4 bytes, at best at the
      read bandwidth; fastkern at the smaller of the bandwidth and its compute rate.
    - W8A8 M=1 vs FBGEMM: both stream the same int8 weight, so 100 / (FBGEMM's %BW).
    - W8A8 M>=64 vs FBGEMM (AVX2 path): the exact int16 product mix against FBGEMM's u8 x s8
      mix, both register-only (the same share of their own peak gives this ratio).
    - gemm vs torch: the FMA peak over torch's own fp32 matmul rate.
    """
    c = result.get("ceilings") or {}
    if c.get("device", "cpu") != "cpu":
        return []
    rows = []
    what = {(t.op, t.metric, t.threshold): t.what for t in CPU_TARGETS}
    w4 = [e for e in result.get("results", []) if e.get("kind") == "fastkern" and e.get("op") == "linear_w4a16"
          and e.get("m") == 1 and e.get("status") == "ok" and e.get("backend", "cpu") == "cpu"]
    # the compute rate is at least what the kernel reached on weights from memory in this run
    # (a shared host's last-level cache is shared too, so the probe can come out low)
    probe = c.get("w4a16_compute_gbs") or 0.0
    comp = max([probe] + [e["gbs"] for e in w4 if e.get("dtype") == "fp32" and e.get("gbs")])
    # %BW is taken against the bandwidth of each problem's own time window
    bws = [e["read_bw_window_gbs"] for e in w4 if e.get("read_bw_window_gbs")] or [c.get("read_bw_gbs")]
    bws = [b for b in bws if b]
    if bws and comp:
        lo, hi = min(bws), max(bws)
        rows.append({"target": what["linear_w4a16", "pct_bw", 85], "ceiling": min(100.0, 100.0 * comp / lo),
                     "ceiling_lo": min(100.0, 100.0 * comp / hi), "unit": "%",
                     "how": "W4A16 with its weight in the LLC runs %.1f GB/s (%s)%s; read bandwidth %.1f-%.1f GB/s"
                            % (probe, c.get("w4a16_compute_note", ""),
                               "" if comp == probe else ", from memory in this run up to %.1f" % comp, lo, hi)})
        rows.append({"target": what["linear_w4a16", "speedup", 1.5], "ceiling": 2.0 * min(1.0, comp / lo),
                     "ceiling_lo": 2.0 * min(1.0, comp / hi), "unit": "x",
                     "how": "FBGEMM's int8 weight is 2x the int4 bytes, read at most at the bandwidth; W4A16 at the "
                            "smaller of the bandwidth and %.1f GB/s" % comp})
    fb = [e.get("pct_bw") for e in result.get("results", [])
          if e.get("kind") == "peer" and e.get("name") == "FBGEMM dynamic int8" and e.get("m") == 1
          and "linear_w8a8" in (e.get("ops") or []) and e.get("status") == "ok" and e.get("pct_bw")]
    if fb:
        rows.append({"target": what["linear_w8a8", "speedup", 1.2], "ceiling": 100.0 / max(fb), "unit": "x",
                     "how": "both stream the same int8 weight; FBGEMM at up to %.0f%% of the read bandwidth" % max(fb)})
    i8 = c.get("int8_peak")
    # the AVX2 kernels' mix; with AVX-512 VNNI fastkern multiplies int8 with vpdpbusd instead
    if i8 and i8.get("u8s8_gmacs") and c.get("cpu_isa") == "avx2":
        rows.append({"target": what["linear_w8a8", "speedup", 1.0], "ceiling": i8["exact_gmacs"] / i8["u8s8_gmacs"],
                     "unit": "x", "how": "exact int16 mix (vpmaddwd + vpaddd) %.0f GMAC/s against FBGEMM's u8 x s8 mix "
                                         "(vpmaddubsw + vpmaddwd + vpaddd) %.0f, register-only"
                                         % (i8["exact_gmacs"], i8["u8s8_gmacs"])})
    fma, mm = c.get("fma_peak_gflops"), (c.get("matmul_gflops") or {}).get("fp32")
    if fma and mm:
        rows.append({"target": what["gemm", "speedup", 1.5], "ceiling": fma / mm, "unit": "x",
                     "how": "torch's fp32 matmul (n=%s) runs %.0f GFLOP/s, %.0f%% of the measured FMA peak %.0f"
                            % (c.get("matmul_n"), mm, 100.0 * mm / fma, fma)})
    if result.get("targets") is not None:  # only the targets this run has entries for
        covered = {r["target"] for r in result["targets"]}
        rows = [r for r in rows if r["target"] in covered]
    return rows


def render_ceilings(rows: List[dict]) -> str:
    if not rows:
        return ""
    lines = ["Ceilings measured in this run (the most each target allows here):"]
    for r in rows:
        fmt = "%.0f%%" if r["unit"] == "%" else "%.2fx"
        val = fmt % r["ceiling"]
        if r.get("ceiling_lo") is not None and abs(r["ceiling_lo"] - r["ceiling"]) > 1e-9:
            val = (fmt % r["ceiling_lo"]) + " - " + val
        lines.append("  %-62s at most %s: %s" % (r["target"], val, r["how"]))
    return "\n".join(lines) + "\n"


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
