#!/usr/bin/env python3
"""Table of ggml's MUL_MAT (bench/peers/ggml_mulmat.c) beside fastkern-bench, from one run window.

    python3 bench/peers/ggml_vs_fastkern.py OUTDIR

reads OUTDIR/ggml-<isa>-<round>.json and OUTDIR/fk-<isa>-<round>.json written by
bench/peers/ggml_vs_fastkern.sh (ggml and fastkern runs alternated, round by round) and prints
Markdown: per ISA, one row per (shape, M) with ggml's and fastkern's milliseconds (the best
round's median) and the speedups of fastkern over ggml (ggml ms / fastkern ms), each computed
within one round (a ggml run and the fastkern run right after it) and listed round by round; then
the DESIGN.md section 6 ggml goals. Only the standard library is used.
"""
import glob
import json
import os
import re
import statistics
import sys

GOALS = [  # (fastkern op, ggml type, ggml layout, shape, M, goal)
    ("linear_w4a16", "q4_0", "plain", (4096, 14336), 1, 1.25),
    ("linear_w4a16", "q4_0", "repack", (4096, 14336), 1, 1.25),
    ("linear_w4a16", "q4_K", "plain", (4096, 14336), 1, 1.05),
    ("linear_w4a16", "q4_K", "repack", (4096, 14336), 1, 1.05),
    # the same goals for W4A8, whose arithmetic is ggml's own (int8 activations x int4 weights)
    ("linear_w4a8", "q4_0", "plain", (4096, 14336), 1, 1.25),
    ("linear_w4a8", "q4_0", "repack", (4096, 14336), 1, 1.25),
    ("linear_w4a8", "q4_K", "plain", (4096, 14336), 1, 1.05),
    ("linear_w4a8", "q4_K", "repack", (4096, 14336), 1, 1.05),
]
GG_COLS = [("q4_0", "plain"), ("q4_0", "repack"), ("q4_K", "plain"), ("q4_K", "repack"), ("q8_0", "plain")]
FK_COLS = ["linear_w4a16", "linear_w4a8", "linear_w8a8", "linear_w8a16"]
RATIOS = [  # (fastkern op, ggml type, ggml layout, column title)
    ("linear_w4a16", "q4_0", "plain", "w4a16 / Q4_0"),
    ("linear_w4a16", "q4_0", "repack", "w4a16 / Q4_0 rp"),
    ("linear_w4a16", "q4_K", "plain", "w4a16 / Q4_K"),
    ("linear_w4a16", "q4_K", "repack", "w4a16 / Q4_K rp"),
    ("linear_w4a8", "q4_0", "repack", "w4a8 / Q4_0 rp"),
    ("linear_w4a8", "q4_K", "repack", "w4a8 / Q4_K rp"),
    ("linear_w8a8", "q8_0", "plain", "w8a8 / Q8_0"),
    ("linear_w8a16", "q8_0", "plain", "w8a16 / Q8_0"),
]


def load(outdir):
    runs = {}  # isa -> round -> {"ggml": json, "fk": json}
    for path in sorted(glob.glob(os.path.join(outdir, "*.json"))):
        m = re.match(r"(ggml|fk)-(\w+)-(\d+)\.json$", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            runs.setdefault(m.group(2), {}).setdefault(int(m.group(3)), {})[m.group(1)] = json.load(f)
    return runs


def ggml_ms(run, typ, layout, n, k, m):
    for r in run["results"]:
        if (r["type"], r["layout"], r["n"], r["k"], r["m"]) == (typ, layout, n, k, m):
            return r["ms"], r.get("read_bw_gbs")
    return None, None


def ggml_disturbed(run, typ, layout, n, k, m):
    """True when the call times of this entry spread beyond 2x (p90 > 2 p10): something else ran."""
    for r in run["results"]:
        if (r["type"], r["layout"], r["n"], r["k"], r["m"]) == (typ, layout, n, k, m):
            return r.get("p90_ms", 0) > 2 * r.get("p10_ms", 1e9)
    return False


def fk_ms(run, op, n, k, m, dtype="fp32"):
    for r in run["results"]:
        if r.get("kind") == "fastkern" and (r.get("op"), r["n"], r["k"], r["m"], r.get("dtype")) == (op, n, k, m, dtype) \
                and r.get("status") == "ok":
            return r["ms"]
    return None


def fk_peer_ms(run, short, n, k, m):
    for r in run["results"]:
        if r.get("kind") == "peer" and r.get("short") == short and (r["n"], r["k"], r["m"]) == (n, k, m) \
                and r.get("status") == "ok":
            return r["ms"]
    return None


def regimes_differ(ggml_run, fk_run, typ, layout, n, k, m):
    """True when the read bandwidth beside this ggml entry lies more than 15% outside the range that
    the fastkern run measured at its start and end: this host switches memory-bandwidth regimes
    (about 45 vs 80 GB/s) within minutes, and a ratio across regimes says little."""
    g = ggml_ms(ggml_run, typ, layout, n, k, m)[1]
    c = fk_run.get("ceilings", {})
    f = [v for v in (c.get("read_bw_gbs"), c.get("read_bw_gbs_end")) if v]
    if not g or not f:
        return False
    return g < min(f) / 1.15 or g > max(f) * 1.15


def mark(ggml_run, fk_run, typ, layout, n, k, m):
    return ("!" if ggml_disturbed(ggml_run, typ, layout, n, k, m) else "") + \
        ("~" if regimes_differ(ggml_run, fk_run, typ, layout, n, k, m) else "")


def fmt(v, spec="%.3f"):
    return "-" if v is None else spec % v


def best(vals):
    vals = [v for v in vals if v is not None]
    return min(vals) if vals else None


def main(outdir):
    runs = load(outdir)
    if not runs:
        sys.exit("ggml_vs_fastkern.py: no ggml-*/fk-* JSON files in %s" % outdir)
    out = []
    for isa in sorted(runs):
        rounds = [runs[isa][r] for r in sorted(runs[isa]) if "ggml" in runs[isa][r] and "fk" in runs[isa][r]]
        if not rounds:
            continue
        g0, f0 = rounds[0]["ggml"], rounds[0]["fk"]
        cpu = g0.get("cpu", {})
        out.append("### %s: ggml build with AVX2 %d, AVX-512 %d, AVX512-VNNI %d; fastkern cpu_isa %s; %d round(s)" % (
            isa, cpu.get("avx2", 0), cpu.get("avx512", 0), cpu.get("avx512_vnni", 0),
            f0["metadata"].get("cpu_isa"), len(rounds)))
        out.append("")
        for i, rd in enumerate(rounds, 1):
            g, f = rd["ggml"], rd["fk"]
            c = f["ceilings"]
            out.append("- round %d: ggml read BW %.1f -> %.1f GB/s (timing %.0f s); fastkern %s, read BW %.1f -> %s GB/s, load %s" % (
                i, g["read_bw_gbs"], g["read_bw_gbs_end"], g.get("timing_s", 0), f["metadata"].get("date", "?"),
                c.get("read_bw_gbs", 0), fmt(c.get("read_bw_gbs_end"), "%.1f"),
                " ".join("%.2f" % x for x in f["metadata"].get("loadavg_start", []))))
        out.append("")
        shapes = sorted({(r["n"], r["k"], r["m"]) for r in g0["results"]}, key=lambda t: (t[2], t[1] * t[0], t[0]))
        head = ["N x K", "M"] + ["ggml %s%s ms" % (t.replace("q", "Q"), " rp" if l == "repack" else "") for t, l in GG_COLS] \
            + ["fk %s ms" % op.replace("linear_", "") for op in FK_COLS] + ["fbgemm ms"] \
            + [title for *_, title in RATIOS] + ["read BW in ggml run, GB/s"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for (n, k, m) in shapes:
            row = ["%dx%d" % (n, k), str(m)]
            for t, l in GG_COLS:
                v = fmt(best([ggml_ms(rd["ggml"], t, l, n, k, m)[0] for rd in rounds]))
                if any(ggml_disturbed(rd["ggml"], t, l, n, k, m) for rd in rounds):
                    v += "!"
                row.append(v)
            for op in FK_COLS:
                row.append(fmt(best([fk_ms(rd["fk"], op, n, k, m) for rd in rounds])))
            row.append(fmt(best([fk_peer_ms(rd["fk"], "fbgemm", n, k, m) for rd in rounds])))
            for op, t, l, _ in RATIOS:
                per = []
                for rd in rounds:
                    a, b = ggml_ms(rd["ggml"], t, l, n, k, m)[0], fk_ms(rd["fk"], op, n, k, m)
                    per.append(None if a is None or b is None else a / b)
                txt = "/".join(fmt(p, "%.2f") + mark(rd["ggml"], rd["fk"], t, l, n, k, m)
                               for p, rd in zip(per, rounds))
                row.append("-" if all(p is None for p in per) else txt)
            bws = [ggml_ms(rd["ggml"], "q4_0", "plain", n, k, m)[1] for rd in rounds]
            row.append("/".join(fmt(b, "%.0f") for b in bws))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        out.append("ms: the best round's median; speedups: ggml ms / fastkern ms within each round, round by round; "
                   "'!': that ggml entry's call times spread beyond 2x (p90 > 2 p10) in a round - something else ran; "
                   "'~': the read bandwidth beside that ggml entry and the fastkern run's differ by more than 15% "
                   "(the host changed memory-bandwidth regime between them).")
        out.append("")
        out.append("DESIGN §6 ggml goals (fp32 activations; speedup = ggml ms / fastkern ms, per round):")
        for op, t, l, (n, k), m, goal in GOALS:
            per, shown = [], []
            for rd in rounds:
                a, b = ggml_ms(rd["ggml"], t, l, n, k, m)[0], fk_ms(rd["fk"], op, n, k, m)
                if a is not None and b is not None:
                    bad = ggml_disturbed(rd["ggml"], t, l, n, k, m)
                    other = regimes_differ(rd["ggml"], rd["fk"], t, l, n, k, m)
                    shown.append("%.2fx%s" % (a / b, " (disturbed)" if bad else " (other BW regime)" if other else ""))
                    bad = bad or other
                    if not bad:
                        per.append(a / b)
            if not shown:
                continue
            verdict = "?" if not per else ("MET" if min(per) >= goal else ("MISSED" if max(per) < goal else "MIXED"))
            a = best([ggml_ms(rd["ggml"], t, l, n, k, m)[0] for rd in rounds])
            b = best([fk_ms(rd["fk"], op, n, k, m) for rd in rounds])
            verdict += "; best round against best round %.3f / %.3f ms = %.2fx" % (a, b, a / b)
            out.append("- %s %s, %s vs ggml %s (%s weights): %s (goal >= %.2fx) %s" % (
                "%dx%d" % (n, k), "M=%d" % m, op.replace("linear_", ""), t.replace("q", "Q"),
                "llama.cpp's default repacked" if l == "repack" else "plain, as test-backend-ops",
                ", ".join(shown), goal, verdict))
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
