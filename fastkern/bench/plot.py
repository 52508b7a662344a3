"""--plot: speedup over each peer vs M (one panel per op) and a roofline chart, in one PNG."""
import math

from fastkern.bench.report import sections


def plot(result: dict, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install 'fastkern[bench]'): %s" % e) from None

    secs = [(op, rows) for op, rows in sections(result)
            if any(r["kind"] == "fastkern" and r["status"] == "ok" for r in rows)]
    panels = len(secs) + 1
    cols = min(3, panels)
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    flat = [a for row in axes for a in row]
    styles = ["-", "--", ":", "-."]

    for ax, (op, rows) in zip(flat, secs):
        fk = [r for r in rows if r["kind"] == "fastkern" and r["status"] == "ok"]
        shapes = sorted({(r["n"], r["k"]) for r in fk})
        lines = {}
        for r in fk:
            for peer, sp in r.get("speedup", {}).items():
                lines.setdefault((r["name"], r["dtype"], peer, (r["n"], r["k"])), []).append((r["m"], sp))
        colors = {}
        # colour = peer; line style = which fastkern variant (shape, backend, activation dtype)
        variants = sorted({(k[3], k[0], k[1]) for k in lines})
        for (impl, dt, peer, shape), pts in sorted(lines.items()):
            pts.sort()
            c = colors.setdefault(peer, "C%d" % (len(colors) % 10))
            ls = styles[variants.index((shape, impl, dt)) % len(styles)]
            label = "vs %s" % peer + ("" if len(shapes) == 1 else " %dx%d" % shape)
            if len({(k[0], k[1]) for k in lines}) > 1:
                label += " (%s %s)" % (impl, dt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", color=c, label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speedup (peer ms / fastkern ms)")
        ax.set_title(op)
        if lines:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no peer timed", ha="center", transform=ax.transAxes)

    ax = flat[len(secs)]
    _roofline(ax, result)
    for a in flat[len(secs) + 1:]:
        a.axis("off")
    m = result["metadata"]
    fig.suptitle("fastkern-bench %s - %s (torch %s)" % (m.get("date"), m.get("device_name"), m.get("torch")), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roofline(ax, result):
    c = result["ceilings"]
    bw = c.get("read_bw_gbs")
    peaks = c.get("matmul_gflops", {})
    ok = [r for r in result["results"] if r["status"] == "ok" and r.get("arith_intensity")]
    ax.set_title("roofline")
    if not ok:
        ax.text(0.5, 0.5, "nothing timed", ha="center", transform=ax.transAxes)
        return
    ais = [r["arith_intensity"] for r in ok]
    lo, hi = min(ais) / 2, max(ais) * 2
    if bw:
        for name, peak in peaks.items():
            xs = [lo * (hi / lo) ** (i / 60) for i in range(61)]
            ax.plot(xs, [min(peak, x * bw) for x in xs], color="k", lw=1)
            ax.text(hi, peak, " %s %.0f" % (name, peak), fontsize=6, va="bottom", ha="right")
    ops = sorted({r.get("op") or "peer" for r in ok})
    markers = "os^vD<>p*h"
    for i, op in enumerate(ops):
        pts = [r for r in ok if (r.get("op") or "peer") == op]
        ax.scatter([r["arith_intensity"] for r in pts], [r["gflops"] for r in pts], s=14,
                   marker=markers[i % len(markers)], label=op,
                   color="lightgrey" if op == "peer" else "C%d" % (i % 10), edgecolors="k", linewidths=0.3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / byte moved)")
    ax.set_ylabel("GFLOP/s")
    ax.legend(fontsize=6)
