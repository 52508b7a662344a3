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
    """Rows {target, op, backend, n, k, m, dtype, value, threshold, met, ceiling, ceiling_bound} for every
    covered entry (the ceiling: row_ceiling)."""
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
            row = {"target": t.what, "op": t.op, "backend": e["backend"], "n": e["n"], "k": e["k"],
                   "m": e["m"], "dtype": e["dtype"], "metric": t.metric, "peer": t.peer,
                   "value": value, "threshold": t.threshold,
                   "met": None if value is None else bool(value >= t.threshold)}
            row.update(row_ceiling(result, t, e))
            rows.append(row)
    return rows


def _w4a16_compute(result: dict, dtype: str) -> float:
    """fastkern's W4A16 M=1 compute rate (GB/s) for an activation dtype: the LLC probe for that
    dtype (the fp32 probe for half dtypes when a run has no probe of its own for them: their
    GEMV does less work per weight), and at least the best rate the kernel reached on weights
    from memory in the run (a shared host's last-level cache is shared too)."""
    c = result.get("ceilings") or {}
    probe = c.get("w4a16_compute_gbs_" + dtype) if dtype != "fp32" else None
    probe = probe or c.get("w4a16_compute_gbs") or 0.0
    seen = [e["gbs"] for e in result.get("results", []) if e.get("kind") == "fastkern"
            and e.get("op") == "linear_w4a16" and e.get("m") == 1 and e.get("status") == "ok"
            and e.get("backend", "cpu") == "cpu" and e.get("dtype") == dtype and e.get("gbs")]
    return max([probe] + seen)


def row_ceiling(result: dict, t: Target, e: dict) -> dict:
    """The most a CPU target allows on one entry, from this run's own measurements: the entry's
    floor time is the larger of its bytes at the read bandwidth of its own time window and its
    work at the compute rate the run measured for that kind of kernel (W4A16 M=1: the kernel's
    compute rate in GB/s; int8 products: the exact int16 mix's GMAC/s on the AVX2 path,
    vpdpbusd's on the AVX-512 VNNI and avx2vnni paths, AMX tdpbsud's on the amx path's GEMMs; fp32
    GEMM: the FMA peak). A speedup target allows the peer's time over that floor, a %BW target
    the bandwidth's share of it. {"ceiling", "ceiling_bound"}: ceiling None where the run has
    no measurement for it (GPU runs, or an int8 product on a path no probe covers)."""
    c = result.get("ceilings") or {}
    none = {"ceiling": None, "ceiling_bound": None}
    if c.get("device", "cpu") != "cpu" or t.device != "cpu" or e.get("status") != "ok" or not e.get("ms"):
        return none
    bw = e.get("read_bw_window_gbs") or c.get("read_bw_gbs")
    if not bw or not e.get("bytes"):
        return none
    floors = {"memory": e["bytes"] / (bw * 1e6)}  # ms
    if t.op == "linear_w4a16" and e["m"] == 1:
        comp = _w4a16_compute(result, e["dtype"])
        if comp:
            floors["compute"] = e["bytes"] / (comp * 1e6)
    elif t.op in ("linear_w8a8", "int8_gemm"):
        i8 = c.get("int8_peak") or {}
        if c.get("cpu_isa") == "avx2" and i8.get("exact_gmacs"):
            floors["compute"] = e["flops"] / 2 / (i8["exact_gmacs"] * 1e6)
        elif c.get("cpu_isa") == "amx" and i8.get("amx_gmacs") and e["m"] > 1:
            floors["compute"] = e["flops"] / 2 / (i8["amx_gmacs"] * 1e6)
        elif c.get("cpu_isa") != "avx2" and i8.get("vnni_gmacs"):
            floors["compute"] = e["flops"] / 2 / (i8["vnni_gmacs"] * 1e6)
        elif e["m"] > 1:
            return none  # a path whose int8 products no probe covers
    elif t.op == "gemm" and c.get("fma_peak_gflops"):
        floors["compute"] = e["flops"] / (c["fma_peak_gflops"] * 1e6)
    bound = max(floors, key=floors.get)
    floor = floors[bound]
    if t.metric == "speedup":
        sp = (e.get("speedup") or {}).get(t.peer)
        if not sp:
            return none
        return {"ceiling": sp * e["ms"] / floor, "ceiling_bound": bound}
    if t.metric == "pct_bw":
        return {"ceiling": 100.0 * floors["memory"] / floor, "ceiling_bound": bound}
    if t.metric == "pct_fma" and "compute" in floors:
        return {"ceiling": 100.0, "ceiling_bound": "compute"}
    return none


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
    probe = c.get("w4a16_compute_gbs") or 0.0
    comp = _w4a16_compute(result, "fp32")
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
    # the AVX2 kernels' mix; with VNNI (AVX-512 or AVX-VNNI) fastkern multiplies int8 with vpdpbusd instead
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
    lines = ["DESIGN §6 targets (this run only; a miss shows the most its entry allows here, see row_ceiling):"]
    misses = out_of_reach = 0
    for r in rows:
        unit = "x" if r["metric"] == "speedup" else "%"
        val = "n/a (peer not timed)" if r["value"] is None else ("%.2f%s" % (r["value"], unit))
        mark = "-" if r["met"] is None else ("ok" if r["met"] else "MISS")
        if r["met"] is False:
            misses += 1
            ceil = r.get("ceiling")
            if ceil is not None:
                below = ceil < r["threshold"]
                out_of_reach += below
                val += "   ceiling %s (%s-bound)%s" % (("%.2fx" if unit == "x" else "%.0f%%") % ceil,
                                                     r["ceiling_bound"], ": out of reach" if below else "")
        lines.append("  %-4s %-62s %-9s %dx%d M=%d %s: %s" % (mark, r["target"], "[%s]" % r["backend"], r["n"], r["k"],
                                                              r["m"], r["dtype"], val))
    if misses:
        lines.append("  %d miss(es); %d with a ceiling below the target (out of reach on this machine), %d below "
                     "what their ceiling allows or without one" % (misses, out_of_reach, misses - out_of_reach))
    return "\n".join(lines) + "\n"
