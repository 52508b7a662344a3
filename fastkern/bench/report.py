"""Results out: the terminal table (rich, or plain text), JSON, and comparison with an earlier run."""
import json
from typing import Dict, List, Optional, Tuple

from fastkern.bench.runner import SCHEMA

COLUMNS = ["shape", "M", "impl", "act", "ms", "GFLOP/s", "GB/s", "%BW", "%peak", "%roof", "err", "speedup vs peers"]

# ------------------------------------------------------------------ JSON


def write_json(result: dict, path: str):
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False, default=str)
        f.write("\n")


def load_json(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    problems = validate(d)
    if problems:
        raise ValueError("%s is not a fastkern-bench result: %s" % (path, "; ".join(problems[:5])))
    return d


def validate(d: dict) -> List[str]:
    """Problems with a result dict (empty when it is well formed)."""
    p = []
    if not isinstance(d, dict):
        return ["not a JSON object"]
    if d.get("schema") != SCHEMA:
        p.append("schema is %r, expected %r" % (d.get("schema"), SCHEMA))
    for key in ("metadata", "config", "ceilings", "results"):
        if key not in d:
            p.append("missing %r" % key)
    if p:
        return p
    for key in ("date", "torch", "fastkern", "cpu_model", "bench_device", "device_name"):
        if key not in d["metadata"]:
            p.append("metadata lacks %r" % key)
    for i, e in enumerate(d["results"]):
        for key in ("kind", "name", "n", "k", "m", "dtype", "status"):
            if key not in e:
                p.append("results[%d] lacks %r" % (i, key))
        if e.get("status") == "ok":
            for key in ("ms", "gflops", "gbs", "bytes", "flops"):
                v = e.get(key)
                if not isinstance(v, (int, float)) or not v > 0:
                    p.append("results[%d] (%s) has %s=%r, expected > 0" % (i, e.get("name"), key, v))
        elif e.get("status") in ("skipped", "error"):
            if not e.get("reason"):
                p.append("results[%d] (%s) is %s without a reason" % (i, e.get("name"), e.get("status")))
        else:
            p.append("results[%d] has status %r" % (i, e.get("status")))
    return p


# ------------------------------------------------------------------ formatting


def _f(v, fmt="%.3g", none="-"):
    return none if v is None else fmt % v


def _ms(v):
    if v is None:
        return "-"
    return "%.4f" % v if v < 0.1 else ("%.3f" % v if v < 10 else "%.1f" % v)


def _op_of(e):
    return e.get("op")


def sections(result: dict) -> List[Tuple[str, List[dict]]]:
    """(op, rows) in run order: each op's fastkern rows at a shape followed by the peers it is compared with."""
    res = result["results"]
    ops_order = []
    for e in res:
        if e["kind"] == "fastkern" and e["op"] not in ops_order:
            ops_order.append(e["op"])
    out = []
    for op in ops_order:
        rows, shapes = [], []
        for e in res:
            if e["kind"] == "fastkern" and e["op"] == op and (e["n"], e["k"], e["m"]) not in shapes:
                shapes.append((e["n"], e["k"], e["m"]))
        for key in shapes:
            rows += [e for e in res if e["kind"] == "fastkern" and e["op"] == op and (e["n"], e["k"], e["m"]) == key]
            rows += [e for e in res if e["kind"] == "peer" and op in e["ops"] and (e["n"], e["k"], e["m"]) == key]
        out.append((op, rows))
    return out


def row_cells(e: dict) -> List[str]:
    shape = "%dx%d" % (e["n"], e["k"])
    name = e["name"]
    if e["status"] != "ok":
        what = "skipped" if e["status"] == "skipped" else "ERROR"
        return [shape, str(e["m"]), name, e["dtype"], what, "", "", "", "", "", "", e.get("reason", "")]
    if e["kind"] == "fastkern":
        sp = " ".join("%s %.2fx" % (_short(k), v) for k, v in e.get("speedup", {}).items()) or "-"
    else:
        sp = ""
    return [shape, str(e["m"]), name, e["dtype"], _ms(e["ms"]), _f(e["gflops"], "%.1f"), _f(e["gbs"], "%.1f"),
            _f(e.get("pct_bw"), "%.0f%%"), _f(e.get("pct_compute"), "%.0f%%"), _roof(e),
            _f(e.get("rel_err_vs_fp32"), "%.1e"), sp]


def _roof(e):
    if e.get("pct_roofline") is None:
        return "-"
    return "%.0f%% %s" % (e["pct_roofline"], (e.get("bound") or "")[:3])


_SHORT = {}


def _short(name):
    return _SHORT.get(name, name)


def _register_shorts(result):
    for e in result["results"]:
        if e["kind"] == "peer":
            _SHORT[e["name"]] = e.get("short", e["name"])


def ceilings_line(result: dict) -> str:
    c = result["ceilings"]
    m = result["metadata"]
    parts = ["%s, %s threads" % (m.get("device_name"), m.get("threads"))]
    if m.get("isa_cap"):
        parts.append("fastkern and every peer capped to %s (%s)" % (
            m["isa_cap"], " ".join("%s=%s" % kv for kv in sorted(m.get("isa_cap_env", {}).items()))))
    if c.get("read_bw_gbs"):
        both = [c.get(k) for k in ("read_bw_gbs_sum", "read_bw_gbs_native")]
        if all(both):
            parts.append("read bandwidth %.1f GB/s (best of torch sum %.1f, vector loads %.1f)" % (
                c["read_bw_gbs"], both[0], both[1]))
        else:
            parts.append("read bandwidth %.1f GB/s" % c["read_bw_gbs"])
    for dt, v in c.get("matmul_gflops", {}).items():
        parts.append("%s matmul %.1f GFLOP/s (n=%s)" % (dt, v, c.get("matmul_n")))
    if c.get("fma_peak_gflops"):
        parts.append("fp32 FMA peak %.0f GFLOP/s (measured)" % c["fma_peak_gflops"])
    if c.get("fma_peak_gflops_est"):
        parts.append("clock estimate %.0f GFLOP/s" % c["fma_peak_gflops_est"])
    if c.get("read_bw_gbs_end"):
        parts.append("read bandwidth at the end (torch sum) %.1f GB/s%s%s" % (
            c["read_bw_gbs_end"], " - CHANGED DURING THE RUN" if c.get("read_bw_drift") else "",
            "" if not c.get("read_bw_probe_factor") else
            " (%BW: against the bandwidth measured within each problem's own time window)"))
    parts.append("LLC %.0f MiB" % (c.get("llc_bytes", 0) / 2**20))
    la = m.get("loadavg_start")
    if la:
        parts.append("load %.2f" % la[0])
    return "; ".join(parts)


def skipped_summary(result: dict) -> List[str]:
    """One line per distinct (implementation, op, reason) that did not run."""
    seen = {}
    for e in result["results"]:
        if e["status"] == "ok":
            continue
        what = "%s %s" % (e["name"], e.get("op") or "")
        key = (what.strip(), e["status"], e.get("reason"))
        seen.setdefault(key, []).append("M=%d %dx%d" % (e["m"], e["n"], e["k"]))
    lines = []
    for (what, status, reason), where in seen.items():
        lines.append("%s %s (%d case%s): %s" % (what, status, len(where), "" if len(where) == 1 else "s", reason))
    return lines


def render_text(result: dict) -> str:
    """The table as plain text (what is kept next to the JSON in bench/results/)."""
    _register_shorts(result)
    lines = ["fastkern-bench %s  (%s, torch %s, fastkern %s)" % (
        result["metadata"].get("date"), result["metadata"].get("bench_device"),
        result["metadata"].get("torch"), result["metadata"].get("fastkern")),
        "ceilings: " + ceilings_line(result),
        "%BW: GB/s on the bytes the op must move (weights as stored + x + out) / read bandwidth; "
        "%peak: GFLOP/s / matmul peak; %roof: GFLOP/s / min(peak, bandwidth x flop/byte), mem or com bound;",
        "err: rel. error vs x @ W.T in fp32 (quantization and pruning included); speedup = peer ms / fastkern ms",
        ""]
    for op, rows in sections(result):
        cells = [COLUMNS] + [row_cells(e) for e in rows]
        widths = [max(len(r[i]) for r in cells[:]) for i in range(len(COLUMNS) - 1)]
        lines.append("== %s" % op)
        for r in cells:
            lines.append("  ".join(c.rjust(w) if 4 <= i <= 10 else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r[:-1], widths))) + "  " + r[-1])
        lines.append("")
    sk = skipped_summary(result)
    if sk:
        lines.append("not timed:")
        lines += ["  " + s for s in sk]
    return "\n".join(lines) + "\n" + _targets_text(result)


def _targets_text(result):
    from fastkern.bench import targets

    rows = result.get("targets")
    if rows is None:
        rows = targets.evaluate(result)
    ceil = result.get("target_ceilings")
    if ceil is None:
        ceil = targets.ceiling_rows(result)
    text = "\n" + targets.render_text(rows)
    return text + ("\n" + targets.render_ceilings(ceil) if ceil else "")


def _console():
    """A console that does not squeeze the tables into 80 columns when the output is a file
    or a pipe (CI logs, `| tee`): there rich cannot know the width, and cut cells say nothing."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=max(c.width, 200))


def print_table(result: dict, console=None, plain: bool = False):
    """Rich tables per op when rich is installed (else the plain text)."""
    try:
        if plain:
            raise ImportError
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(render_text(result), end="")
        return
    _register_shorts(result)
    console = console or _console()
    console.print("[bold]fastkern-bench[/] %s — %s" % (result["metadata"].get("date"), ceilings_line(result)))
    for op, rows in sections(result):
        t = Table(title=op, title_justify="left", show_lines=False, header_style="bold")
        for i, c in enumerate(COLUMNS):
            t.add_column(c, justify="right" if 4 <= i <= 10 else "left", no_wrap=i < len(COLUMNS) - 1)
        prev = None
        for e in rows:
            cells = [escape(c) for c in row_cells(e)]  # "fastkern[cpu]" is not rich markup
            key = (e["n"], e["k"], e["m"])
            if prev is not None and key != prev:
                t.add_section()
            prev = key
            style = None
            if e["status"] != "ok":
                style = "dim" if e["status"] == "skipped" else "red"
            elif e["kind"] == "fastkern":
                style = "bold"
            t.add_row(*cells, style=style)
        console.print(t)
    sk = skipped_summary(result)
    if sk:
        console.print("[dim]not timed:[/]")
        for s in sk:
            console.print("  " + s, style="dim", markup=False)
    console.print(_targets_text(result), markup=False, highlight=False, end="")


def render_markdown(result: dict) -> str:
    """A Markdown summary of a run: the machine and its ceilings, then one row per fastkern
    entry with ms, % of read bandwidth and of the compute ceiling, and one column per peer
    (speedup = peer ms / fastkern ms, both timed in this run), then the target checks."""
    _register_shorts(result)
    fk = [e for e in result["results"] if e["kind"] == "fastkern" and e["status"] == "ok"]
    peers = []
    for e in fk:
        for name in e.get("speedup", {}):
            if name not in peers:
                peers.append(name)
    m = result["metadata"]
    lines = ["fastkern-bench %s: %s" % (m.get("date"), ceilings_line(result)), "",
             "Command: `fastkern-bench %s`" % " ".join(m.get("argv", []) or []), ""]
    hdr = ["op", "N x K", "M", "act", "ms", "%BW", "%peak"] + ["vs " + _short(p) for p in peers]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for op, rows in sections(result):
        for e in rows:
            if e not in fk:
                continue
            sp = e.get("speedup", {})
            cells = [op + ("" if e.get("backend") in (None, "cpu") else " [%s]" % e["backend"]),
                     "%dx%d" % (e["n"], e["k"]), str(e["m"]), e["dtype"], _ms(e["ms"]),
                     _f(e.get("pct_bw"), "%.0f%%"), _f(e.get("pct_compute"), "%.0f%%")]
            cells += ["%.2fx" % sp[p] if p in sp else "-" for p in peers]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "```", _targets_text(result).rstrip("\n"), "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ compare


def _key(e):
    return (e["kind"], e.get("op"), e["name"], e["n"], e["k"], e["m"], e["dtype"])


def compare(old: dict, new: dict) -> Tuple[List[dict], List[str]]:
    """Rows {key fields, old_ms, new_ms, change} for entries timed in both runs, and warnings
    (a different machine, torch or thread count makes the comparison meaningless)."""
    warnings = []
    mo, mn = old["metadata"], new["metadata"]
    for field in ("device_name", "cpu_model", "threads", "torch", "bench_device"):
        if mo.get(field) != mn.get(field):
            warnings.append("%s differs: %r (old) vs %r (new)" % (field, mo.get(field), mn.get(field)))
    old_by = {_key(e): e for e in old["results"] if e["status"] == "ok"}
    rows = []
    for e in new["results"]:
        if e["status"] != "ok":
            continue
        o = old_by.get(_key(e))
        if o is None:
            continue
        rows.append({"kind": e["kind"], "op": e.get("op") or ",".join(e.get("ops", [])[:1]), "name": e["name"],
                     "n": e["n"], "k": e["k"], "m": e["m"], "dtype": e["dtype"],
                     "old_ms": o["ms"], "new_ms": e["ms"], "speedup": o["ms"] / e["ms"]})
    for which, a, b in (("old", old, new), ("new", new, old)):
        bkeys = {_key(e) for e in b["results"] if e["status"] == "ok"}
        missing = [e for e in a["results"] if e["status"] == "ok" and _key(e) not in bkeys]
        if missing:
            warnings.append("%d entries timed only in the %s run" % (len(missing), which))
    return rows, warnings


def render_compare_text(rows, warnings, old_date=None, new_date=None) -> str:
    lines = ["change against %s (old) -> %s (new); speedup = old ms / new ms" % (old_date, new_date)]
    lines += ["warning: " + w for w in warnings]
    hdr = ["op", "impl", "shape", "M", "act", "old ms", "new ms", "speedup"]
    cells = [hdr] + [[r["op"] if r["kind"] == "fastkern" else "(peer)", r["name"], "%dx%d" % (r["n"], r["k"]),
                      str(r["m"]), r["dtype"], _ms(r["old_ms"]), _ms(r["new_ms"]), "%.2fx" % r["speedup"]]
                     for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(hdr))]
    for c in cells:
        lines.append("  ".join(v.rjust(w) if i >= 5 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines) + "\n"


def print_compare(old: dict, new: dict, console=None, plain: bool = False) -> List[dict]:
    rows, warnings = compare(old, new)
    od, nd = old["metadata"].get("date"), new["metadata"].get("date")
    try:
        if plain:
            raise ImportError
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(render_compare_text(rows, warnings, od, nd), end="")
        return rows
    console = console or _console()
    for w in warnings:
        console.print("[yellow]warning:[/] " + escape(w))
    t = Table(title="change against %s (speedup = old ms / new ms)" % od, title_justify="left")
    for c in ("op", "impl", "shape", "M", "act", "old ms", "new ms", "speedup"):
        t.add_column(c, justify="right" if c in ("old ms", "new ms", "speedup") else "left")
    for r in rows:
        sp = r["speedup"]
        color = "green" if sp >= 1.05 else ("red" if sp <= 0.95 else "")
        t.add_row(r["op"] if r["kind"] == "fastkern" else "(peer)", escape(r["name"]), "%dx%d" % (r["n"], r["k"]),
                  str(r["m"]), r["dtype"], _ms(r["old_ms"]), _ms(r["new_ms"]),
                  ("[%s]%.2fx[/]" % (color, sp)) if color else "%.2fx" % sp)
    console.print(t)
    return rows
