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

    # one panel per (op, fastkern backend, activation dtype): colour = peer, line style = weight shape
    panels_rows = []
    for op, rows in sections(result):
        fk = [r for r in rows if r["kind"] == "fastkern" and r["status"] == "ok"]
        for variant in sorted({(r["name"], r["dtype"]) for r in fk}):
            panels_rows.append((op, variant, [r for r in fk if (r["name"], r["dtype"]) == variant]))
    panels = len(panels_rows) + 1
    cols = min(3, panels)
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    flat = [a for row in axes for a in row]
    styles = ["-", "--", ":", "-."]
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax, (op, (impl, dt), fk) in zip(flat, panels_rows):
        shapes = sorted({(r["n"], r["k"]) for r in fk})
        lines = {}
        for r in fk:
            for peer, sp in r.get("speedup", {}).items():
                lines.setdefault((peer, (r["n"], r["k"])), []).append((r["m"], sp))
        colors = {}
        for (peer, shape), pts in sorted(lines.items()):
            pts.sort()
            c = colors.setdefault(peer, "C%d" % (len(colors) % 10))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[shapes.index(shape) % len(styles)],
                    marker="o", color=c)
        ax.axhline(1.0, color="grey", lw=0.8)
        ms = sorted({r["m"] for r in fk})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms)
        ax.set_xticklabels([str(m) for m in ms])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "%gx" % v))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: "%gx" % v if str(v)[0] in "25" else ""))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speedup (peer ms / fastkern ms)")
        ax.set_title("%s  %s  %s activations" % (op, impl, dt), fontsize=9)
        handles = [Line2D([], [], color=c, marker="o", label="vs " + peer) for peer, c in colors.items()]
        if len(shapes) > 1:
            handles += [Line2D([], [], color="k", ls=styles[i % len(styles)], label="%dx%d" % sh)
                        for i, sh in enumerate(shapes)]
        if handles:
            ax.legend(handles=handles, fontsize=6)
        else:
            ax.text(0.5, 0.5, "no peer timed", ha="center", transform=ax.transAxes)
    secs = panels_rows

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
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "%g" % v))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "%g" % v))
    if bw:
        ax.text(lo, lo * bw, " %.1f GB/s" % bw, fontsize=6, rotation=30, va="bottom")
    ax.set_xlabel("arithmetic intensity (flop / byte moved)")
    ax.set_ylabel("GFLOP/s")
    ax.legend(fontsize=6)
