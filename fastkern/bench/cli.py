"""fastkern-bench: time fastkern's ops against PyTorch's own on this machine.

    fastkern-bench --quick                      # about a minute: one shape per op, M in {1, 64}
    fastkern-bench --json out.json --plot out.png
    fastkern-bench --ops w4a16 --shapes 4096x14336 --m 1,16
    fastkern-bench --quick --compare bench/results/cpu-quick.json   # change against an earlier run
    fastkern-bench --compare old.json new.json  # compare two saved runs, no timing
    fastkern-bench --model minilm               # model-level benchmark (fastkern.bench.model)
    fastkern-bench --quick --isa avx2           # fastkern and every CPU peer capped to AVX2
"""
import argparse
import os
import sys
import time
from typing import List, Optional

from fastkern.bench import shapes as sh


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkern-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: one or two shapes per op, M in {1, 64}")
    p.add_argument("--ops", nargs="+", metavar="OP", help="ops to time (names or comma lists; w4a16 = linear_w4a16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backends", help="comma list of fastkern backends to time (default: cpu on CPU; cuda,triton on GPU; "
                                      "'reference' times the plain-torch specification)")
    p.add_argument("--peers", help="comma list of peers to time (short names: fp32,bf16,fbgemm,onednn,int8pack,int4pack,"
                                   "_int_mm,fp16,cusparselt); default all")
    p.add_argument("--no-peers", action="store_true", help="time fastkern only (no speedups)")
    p.add_argument("--dtypes", help="activation dtypes, comma list of fp32,fp16,bf16 (default: fp32 on CPU, "
                                    "+bf16 for w4a16; fp16 on GPU)")
    p.add_argument("--shapes", help="weight shapes NxK, comma list (e.g. 4096x11008); gemm times MxK by NxK")
    p.add_argument("--m", help="comma list of M (rows of x)")
    p.add_argument("--json", metavar="PATH", help="write results + metadata as JSON")
    p.add_argument("--txt", metavar="PATH", help="write the table as plain text")
    p.add_argument("--markdown", metavar="PATH",
                   help="write a Markdown summary: one row per fastkern entry, its speedup over each peer")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: speedup vs M per op, and a roofline (matplotlib)")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OLD.json: show the change of this run against OLD; OLD.json NEW.json: compare two saved runs")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timed calls per measurement (default 0.5; --quick 0.15)")
    p.add_argument("--max-copies", type=int, default=64, help="most weight copies rotated to defeat the cache")
    p.add_argument("--bw-mb", type=float, default=None, help="size of the bandwidth probe array in MiB")
    p.add_argument("--peak-n", type=int, default=None, help="size of the peak-matmul probe (n x n x n)")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the ceilings (no %% columns)")
    p.add_argument("--no-error-check", action="store_true", help="skip each output's error against fp32 x @ W.T")
    p.add_argument("--rounds", type=int, default=3,
                   help="time each problem's implementations in this many alternating rounds (default 3; "
                        "1: one after the other)")
    p.add_argument("--isa", choices=sorted(ISA_CAPS),
                   help="cap fastkern AND every CPU peer (ATen, FBGEMM, oneDNN, MKL) to this instruction set: "
                        "'avx2' measures this machine as the 2-core AVX2 kind DESIGN's CPU targets are set for, "
                        "'avx2vnni' as an AVX2 CPU with AVX-VNNI (Intel client cores) "
                        "(the run restarts itself with the capping environment)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="plain-text table even if rich is installed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases that would run, and exit")
    p.add_argument("--model", metavar="NAME",
                   help="run the model-level benchmark instead (fastkern.bench.model): minilm, llama-mlp, "
                        "a comma list of them, or all")
    return p


# environment that caps each CPU library's instruction set; read when the library first
# dispatches, so it must be in place before the process starts (cap_isa re-executes the run)
ISA_CAPS = {
    "avx2": {"FASTKERN_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    # an AVX2 CPU with AVX-VNNI and no AVX-512 (Intel client cores from Alder Lake): oneDNN has an
    # AVX2_VNNI level; FBGEMM, ATen and MKL have none between AVX2 and AVX-512
    "avx2vnni": {"FASTKERN_CPU_ISA": "avx2vnni", "ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                 "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
# the CPU features (fastkern.info's names) each cap needs
ISA_NEEDS = {"avx2": ("avx2",), "avx2vnni": ("avx2", "avxvnni")}


def cap_isa(isa: str, argv: List[str]):
    """Restart this run under ``ISA_CAPS[isa]`` unless that environment is already in place."""
    want = ISA_CAPS[isa]
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    from fastkern._info import info_dict

    have = info_dict().get("cpu_features", [])
    missing = [f for f in ISA_NEEDS[isa] if f not in have]
    if missing:
        raise SystemExit("fastkern-bench --isa %s: this CPU does not have %s (features: %s)" % (
            isa, ", ".join(missing), ", ".join(have) or "none found"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastkern.bench"] + list(argv), dict(os.environ, **want))


def _csv(text):
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def select_cases(args) -> List[sh.Case]:
    ops = sh.resolve_ops(args.ops)
    dtypes = _csv(args.dtypes)
    if dtypes:
        for d in dtypes:
            if d not in ("fp32", "fp16", "bf16"):
                raise ValueError("--dtypes: %r is not one of fp32, fp16, bf16" % d)
    ms = sh.parse_ints(args.m) if args.m else None
    if args.shapes:
        default_m = sh.QUICK_M if args.quick else (sh.GPU_M if args.device == "cuda" else sh.CPU_M)
        return sh.custom_cases(ops, sh.parse_shapes(args.shapes), ms or default_m, args.device, dtypes)
    make = sh.quick_cases if args.quick else sh.full_cases
    cases = make(ops, args.device, dtypes)
    if ms:
        weight_shapes = []
        for c in cases:
            if c.op != "gemm" and (c.n, c.k) not in weight_shapes:
                weight_shapes.append((c.n, c.k))
        cases = [c for c in cases if c.op == "gemm"] + sh.custom_cases(
            [o for o in ops if o != "gemm"], weight_shapes, ms, args.device, dtypes)
    return cases


class _Progress:
    """rich progress bar on stderr (or plain lines when rich is missing)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                    transient=True)
            except ImportError:
                self.bar = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def message(self, text):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, style="dim", markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self, i, total, label):
        if not self.enabled:
            return
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(label, total=total)
            self.bar.update(self.task, completed=i, description=label[:70])
        elif i < total:
            print("[%d/%d] %s" % (i + 1, total, label), file=sys.stderr, flush=True)


MODELS = ("minilm", "llama-mlp", "all")


def _run_model(args, extra=()):
    for name in args.model.split(","):
        if name.strip() not in MODELS:
            raise SystemExit("fastkern-bench --model: %r is not one of %s" % (name, ", ".join(MODELS)))
    backends = _csv(args.backends)
    if backends and len(backends) > 1:
        raise SystemExit("fastkern-bench --model runs one backend; got --backends %s" % args.backends)
    # the model benchmark's own option is --backend (one name)
    args.backend = backends[0] if backends else None
    try:
        from fastkern.bench import model
    except ImportError as e:
        if getattr(e, "name", None) in ("fastkern.bench.model", None) or "fastkern.bench.model" in str(e):
            raise SystemExit("fastkern-bench --model: the model benchmark (fastkern/bench/model.py) is not "
                             "available in this installation (%s)" % e) from None
        raise
    if extra:
        # options only the model benchmark knows (e.g. --eval-sentences) go to its own parser
        own = model.build_parser().parse_args(list(extra))
        for key, value in vars(own).items():
            if value is not None and getattr(args, key, None) is None:
                setattr(args, key, value)
    return model.main(args)


def _warn_if_busy():
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        print("fastkern-bench: warning: load average %.1f on %d cores - other work shares the CPU, timings "
              "will be noisy (ratios against peers timed in this run are the robust part)" % (load, cores),
              file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.isa:
        cap_isa(args.isa, argv if argv is not None else sys.argv[1:])
    if args.model:
        rc = _run_model(args, extra)
        return int(rc or 0)
    if extra:
        parser.error("unrecognized arguments: %s" % " ".join(extra))

    from fastkern.bench import report

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.compare and len(args.compare) > 2:
        raise SystemExit("--compare takes OLD.json, or OLD.json NEW.json")
    if args.compare and len(args.compare) == 2:
        old, new = report.load_json(args.compare[0]), report.load_json(args.compare[1])
        report.print_compare(old, new, plain=args.plain)
        return 0
    old = report.load_json(args.compare[0]) if args.compare else None

    try:
        cases = select_cases(args)
    except ValueError as e:
        raise SystemExit("fastkern-bench: %s" % e) from None
    if not cases:
        raise SystemExit("fastkern-bench: no cases selected")

    from fastkern.bench.runner import RunConfig, plan, run_benchmark

    cfg = RunConfig(
        device=args.device,
        backends=_csv(args.backends),
        peers=[] if args.no_peers else _csv(args.peers),
        min_run_time=args.min_run_time if args.min_run_time is not None else (0.15 if args.quick else 0.5),
        max_copies=args.max_copies,
        seed=args.seed,
        measure_ceilings=not args.no_ceilings,
        bw_bytes=int(args.bw_mb * 2**20) if args.bw_mb else None,
        peak_n=args.peak_n or (1024 if args.quick else None),
        check_error=not args.no_error_check,
        rounds=args.rounds,
    )
    if args.list:
        for t in plan(cases, cfg):
            print(t.label)
        return 0

    _warn_if_busy()
    t0 = time.time()
    with _Progress(not args.no_progress) as prog:
        result = run_benchmark(cases, cfg, argv=argv if argv is not None else sys.argv[1:],
                               on_task=prog.update, on_ceilings=prog.message)
    result["metadata"]["wall_s"] = round(time.time() - t0, 1)
    if args.isa:
        result["metadata"]["isa_cap"] = args.isa
        result["metadata"]["isa_cap_env"] = dict(ISA_CAPS[args.isa])

    if result["metadata"].get("interrupted"):
        print("fastkern-bench: interrupted - reporting what was measured", file=sys.stderr)
    report.print_table(result, plain=args.plain)
    if args.json:
        report.write_json(result, args.json)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write(report.render_text(result))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.render_markdown(result))
    if args.plot:
        from fastkern.bench.plot import plot

        plot(result, args.plot)
    if old is not None:
        report.print_compare(old, result, plain=args.plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
