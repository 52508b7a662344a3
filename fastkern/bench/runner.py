"""The run: ceilings, then every case on every backend and every peer, one weight at a time.

``run_benchmark`` returns a plain dict (what ``--json`` writes):
``{"schema", "metadata", "config", "ceilings", "results": [entry, ...]}``. An entry is
one implementation at one size: ``kind`` ("fastkern" or "peer"), ``name``, ``op``
(fastkern) or ``ops`` (peer: the ops it is compared with), ``n, k, m, dtype``,
``status`` ("ok", "skipped" or "error", with ``reason``), and for "ok": ``ms``,
``gflops``, ``gbs``, ``bytes``, ``flops``, ``pct_bw``, ``pct_compute``,
``pct_roofline``, ``bound``, ``copies``, ``rel_err_vs_fp32``; fastkern entries
also carry ``speedup`` {peer name: peer ms / fastkern ms}. ``"targets"`` holds the
DESIGN §6 targets checked on this run's entries (fastkern.bench.targets).
"""
import datetime
import gc
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastkern import ops as fk_ops
from fastkern.bench import ceilings as ceil_mod
from fastkern.bench import targets
from fastkern.bench.impls import CopyPool, Impl, fastkern_impl, fastkern_pool
from fastkern.bench.inputs import make_activation, make_weight, tensor_bytes
from fastkern.bench.peers import PeerSpec, PeerUnavailable, peers_for
from fastkern.bench.shapes import Case, group_by_weight
from fastkern.bench.timing import (MAX_ROTATION_BYTES, Rotator, Timing, copies_needed, rotation_cap,
                                   time_interleaved)

SCHEMA = "fastkern-bench/1"


def default_backends(device: str) -> List[str]:
    """Native kernels (and Triton on GPU). The reference backend is the specification, not a
    contender: it is timed only when asked for; Triton on CPU is its interpreter, never timed by default."""
    return ["cuda", "triton"] if device == "cuda" else ["cpu"]


@dataclass
class RunConfig:
    device: str = "cpu"
    backends: Optional[List[str]] = None  # None: default_backends(device)
    peers: Optional[List[str]] = None  # None: every peer; []: none; else names/shorts to keep
    min_run_time: float = 0.5  # seconds of timed calls per measurement
    max_copies: int = 64
    seed: int = 0
    measure_ceilings: bool = True
    bw_bytes: Optional[int] = None
    peak_n: Optional[int] = None
    ceiling_min_run_time: Optional[float] = None
    check_error: bool = True  # relative error of each output against x @ W.T in fp32
    # each problem's implementations (fastkern and peers) are timed in this many alternating
    # rounds, so a change of the machine's state mid-run affects them alike (timing.time_interleaved)
    rounds: int = 3
    extra: Dict[str, object] = field(default_factory=dict)

    def resolved_backends(self):
        return list(self.backends) if self.backends else default_backends(self.device)


def metadata(device: str, argv: Optional[Sequence[str]] = None) -> dict:
    from fastkern._info import info_dict

    d = info_dict()
    d["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    d["bench_device"] = device
    d["device_name"] = torch.cuda.get_device_name() if device == "cuda" else d.get("cpu_model")
    d["argv"] = list(argv) if argv is not None else sys.argv[1:]
    d["quantized_engine"] = torch.backends.quantized.engine
    d["threads"] = torch.get_num_threads()
    d["cpu_cores"] = os.cpu_count()
    try:
        d["loadavg_start"] = list(os.getloadavg())
    except OSError:
        d["loadavg_start"] = None
    return d


# ------------------------------------------------------------------ plan


@dataclass
class Task:
    kind: str  # "fastkern" | "peer"
    n: int
    k: int
    m: int
    case: Optional[Case] = None
    backend: Optional[str] = None
    peer: Optional[PeerSpec] = None

    @property
    def label(self):
        if self.kind == "fastkern":
            return "%s [%s] N=%d K=%d M=%d %s" % (self.case.op, self.backend, self.n, self.k, self.m, self.case.dtype)
        return "peer %s N=%d K=%d M=%d" % (self.peer.name, self.n, self.k, self.m)


def plan(cases: Sequence[Case], cfg: RunConfig) -> List[Task]:
    """Tasks in run order: per weight (N, K), per M, the peers (each once) then fastkern backends."""
    tasks = []
    for (n, k), group in group_by_weight(cases).items():
        ms = []
        for c in group:
            if c.m not in ms:
                ms.append(c.m)
        for m in ms:
            seen_peers = set()
            at_m = [c for c in group if c.m == m]
            if cfg.peers != []:
                for c in at_m:
                    for p in peers_for(c.op, cfg.device, cfg.peers):
                        if p.name not in seen_peers:
                            seen_peers.add(p.name)
                            tasks.append(Task("peer", n, k, m, peer=p))
            for c in at_m:
                for be in cfg.resolved_backends():
                    tasks.append(Task("fastkern", n, k, m, case=c, backend=be))
    return tasks


# ------------------------------------------------------------------ measuring


def _base_entry(task: Task) -> dict:
    e = {"kind": task.kind, "n": task.n, "k": task.k, "m": task.m}
    if task.kind == "fastkern":
        e.update(name="fastkern[%s]" % task.backend, short="fastkern[%s]" % task.backend, op=task.case.op,
                 backend=task.backend, dtype=task.case.dtype, params=_op_params(task.case))
    else:
        e.update(name=task.peer.name, short=task.peer.short, ops=list(task.peer.ops),
                 dtype={torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                        torch.int8: "int8"}[task.peer.act_dtype])
    return e


_OP_PARAMS = {"linear_w4a16": ("group_size",), "linear_w4a8": ("group_size",),
              "linear_blocksparse": ("block_size", "sparsity")}


def _op_params(case: Case) -> dict:
    return {name: case.param(name) for name in _OP_PARAMS.get(case.op, ())}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, text[0] if text else "")


def _roofline(entry: dict, ceilings: dict, op: str):
    bw = entry.get("read_bw_window_gbs") or ceilings.get("read_bw_gbs")
    peak = ceil_mod.compute_ceiling(ceilings, op, entry["dtype"])
    entry["pct_bw"] = 100.0 * entry["gbs"] / bw if bw else None
    entry["pct_compute"] = 100.0 * entry["gflops"] / peak if peak else None
    fma = ceilings.get("fma_peak_gflops")
    if fma and entry["dtype"] == "fp32":
        entry["pct_fma"] = 100.0 * entry["gflops"] / fma
    if bw and peak and entry["bytes"]:
        ai = entry["flops"] / entry["bytes"]
        entry["arith_intensity"] = ai
        attainable = min(peak, ai * bw)
        entry["bound"] = "memory" if ai * bw < peak else "compute"
        entry["pct_roofline"] = 100.0 * entry["gflops"] / attainable
    else:
        entry["arith_intensity"] = entry["flops"] / entry["bytes"] if entry["bytes"] else None
        entry["bound"] = None
        entry["pct_roofline"] = None


def _rel_err(out: torch.Tensor, ref: Optional[torch.Tensor]) -> Optional[float]:
    if ref is None or not out.is_floating_point() or out.shape != ref.shape:
        return None
    ref = ref.to(out.device).double()
    denom = ref.norm().item()
    return (out.double() - ref).norm().item() / denom if denom > 0 else None


def prepare(impl: Impl, device: str, llc: int, cfg: RunConfig, ref: Optional[torch.Tensor] = None,
            max_bytes: int = MAX_ROTATION_BYTES):
    """Weight copies (at most max_bytes of them), one call (its output gives the error), and the
    rotator to time; returns (the entry's fields known before timing, rotator)."""
    first = impl.pool.get(0)
    copy_bytes = impl.weight_bytes(first)
    ncopies = copies_needed(copy_bytes, llc, cfg.max_copies, max_bytes)
    copies = [impl.pool.get(i) for i in range(ncopies)]
    with impl.context():
        out = impl.call(impl.x, first)
    info = {
        "copies": ncopies,
        "weight_bytes": int(copy_bytes),
        "bytes": int(copy_bytes + tensor_bytes(impl.x) + tensor_bytes(out)),
        "flops": int(impl.flops),
        "rel_err_vs_fp32": _rel_err(out, ref) if cfg.check_error else None,
    }
    return info, Rotator(impl.call, impl.x, copies, impl.context)


def timed_fields(info: dict, t: Timing) -> dict:
    """The numeric fields of an entry from ``prepare``'s fields and its timing."""
    sec = t.ms * 1e-3
    return dict(info, status="ok", ms=t.ms, iqr_ms=t.iqr_ms, runs=t.runs, timer=t.method,
                gflops=info["flops"] / sec / 1e9, gbs=info["bytes"] / sec / 1e9)


def _attach_speedups(results: List[dict]):
    peers = {}
    for e in results:
        if e["kind"] == "peer" and e["status"] == "ok":
            peers.setdefault((e["n"], e["k"], e["m"]), []).append(e)
    for e in results:
        if e["kind"] != "fastkern":
            continue
        sp = {}
        if e["status"] == "ok":
            for p in peers.get((e["n"], e["k"], e["m"]), []):
                if e["op"] in p["ops"]:
                    sp[p["name"]] = p["ms"] / e["ms"]
        e["speedup"] = sp


def run_benchmark(cases: Sequence[Case], cfg: RunConfig, *, argv=None,
                  on_task: Optional[Callable[[int, int, str], None]] = None,
                  on_ceilings: Optional[Callable[[str], None]] = None) -> dict:
    """Measure ceilings, then every task of ``plan(cases, cfg)``; ``on_task(i, total, label)`` reports progress."""
    device = cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to torch %s" % torch.__version__)
    meta = metadata(device, argv)
    llc = ceil_mod.llc_bytes(device)
    ceilings = {"device": device, "llc_bytes": llc}
    if cfg.measure_ceilings:
        if on_ceilings:
            on_ceilings("measuring ceilings (read bandwidth, peak matmul)")
        ceilings = ceil_mod.measure_ceilings(
            device, bw_bytes=cfg.bw_bytes, peak_n=cfg.peak_n,
            min_run_time=cfg.ceiling_min_run_time or max(cfg.min_run_time, 0.05))

    tasks = plan(cases, cfg)
    results: List[dict] = []
    weights: Dict[tuple, torch.Tensor] = {}
    refs: Dict[tuple, torch.Tensor] = {}
    pools: Dict[tuple, CopyPool] = {}  # formats of the current weight, shared across M and backends

    # The machine's read bandwidth is measured again inside every problem's time window (a
    # streaming sum timed in the same alternating rounds as the implementations): a shared
    # host's memory bandwidth can switch regimes within minutes, and %BW is taken against
    # the bandwidth of the minutes the kernel ran in.
    probe = None
    if cfg.measure_ceilings and ceilings.get("read_bw_gbs_sum"):
        ceilings["read_bw_probe_factor"] = ceilings["read_bw_gbs"] / ceilings["read_bw_gbs_sum"]
        probe = ceil_mod.sum_probe(device, ceilings["bw_array_bytes"])

    interrupted = False
    done = 0
    for group in _problems(tasks):
        if interrupted:
            break
        n, k, m = group[0].n, group[0].k, group[0].m
        if (n, k) not in weights:
            weights.clear()  # one float weight (and its formats) alive at a time
            refs.clear()
            pools.clear()
            gc.collect()
            weights[(n, k)] = make_weight(n, k, cfg.seed, device)
        w = weights[(n, k)]
        if cfg.check_error and (n, k, m) not in refs:
            x32 = make_activation(m, k, torch.float32, cfg.seed + 1, device)
            refs[(n, k, m)] = x32 @ w.T
        entries, timed = [], []  # timed: (entry, info, rotator, op for the roofline)
        cap = rotation_cap(len(group), device)
        for task in group:
            if on_task:
                on_task(done, len(tasks), task.label)
            done += 1
            entry = _base_entry(task)
            entries.append(entry)
            if interrupted:
                entry.update(status="skipped", reason="interrupted")
                continue
            try:
                impl = _make_impl(task, w, device, cfg, pools, entry)
                if impl is not None:
                    info, rot = prepare(impl, device, llc, cfg, refs.get((n, k, m)), cap)
                    timed.append((entry, info, rot, task.case.op if task.kind == "fastkern" else _peer_op(task)))
            except PeerUnavailable as e:
                entry.update(status="skipped", reason=str(e))
            except KeyboardInterrupt:
                # keep what was measured: a long run stopped by hand still reports (and saves) its results
                interrupted = True
                entry.update(status="skipped", reason="interrupted")
            except Exception as e:  # a failing kernel is a result to report, not a reason to stop the run
                entry.update(status="error", reason=_first_line(e))
            impl = None
        if timed and not interrupted:
            def failed(j, e):
                timed[j][0].update(status="error", reason=_first_line(e))

            rots = [t[2] for t in timed] + ([probe] if probe is not None else [])
            try:
                timings = time_interleaved(rots, device, cfg.min_run_time, cfg.rounds, on_error=failed)
            except KeyboardInterrupt:
                interrupted = True
                timings = [None] * len(rots)
            window_bw = None
            if probe is not None and timings[-1] is not None:
                # the read bandwidth of this problem's own time window, on the scale of the
                # run's best probe (fastkern's vector loads read faster than torch's sum)
                window_bw = ceil_mod.probe_gbs(probe, timings[-1].ms) * ceilings["read_bw_probe_factor"]
            for (entry, info, _, op), t in zip(timed, timings):
                if t is not None:
                    entry.update(timed_fields(info, t))
                    if window_bw:
                        entry["read_bw_window_gbs"] = window_bw
                    _roofline(entry, ceilings, op)
        for entry in entries:
            if "status" not in entry:  # prepared, never timed: the run was stopped
                entry.update(status="skipped", reason="interrupted")
        results.extend(entries)
        timed = rots = None  # the group's weight copies go with its rotators
    probe = None

    if cfg.measure_ceilings and ceilings.get("read_bw_gbs") and not interrupted:
        # The memory bandwidth of a shared host can change while the run goes on (seen:
        # ~48 and ~80 GB/s regimes minutes apart on one VM): measured again at the end,
        # and a change beyond 15% is flagged (%BW and the ratios may then mix regimes).
        end = ceil_mod.read_bandwidth(device, ceilings["bw_array_bytes"],
                                      cfg.ceiling_min_run_time or max(cfg.min_run_time, 0.05))
        ceilings["read_bw_gbs_end"] = end
        ceilings["read_bw_drift"] = abs(end - ceilings["read_bw_gbs_sum"]) > 0.15 * ceilings["read_bw_gbs_sum"]
        if device == "cpu":
            ceil_mod.remeasure_peaks(ceilings, results, cfg.ceiling_min_run_time or max(cfg.min_run_time, 0.05))
    if on_task and not interrupted:
        on_task(len(tasks), len(tasks), "done")
    meta["interrupted"] = interrupted
    _attach_speedups(results)
    try:
        meta["loadavg_end"] = list(os.getloadavg())
    except OSError:
        meta["loadavg_end"] = None
    config = asdict(cfg)
    config["backends"] = cfg.resolved_backends()
    config["cases"] = len(cases)
    result = {"schema": SCHEMA, "metadata": meta, "config": config, "ceilings": ceilings, "results": results}
    result["targets"] = targets.evaluate(result)
    result["target_ceilings"] = targets.ceiling_rows(result)
    return result


def _problems(tasks: List[Task]) -> List[List[Task]]:
    """Runs of consecutive tasks on the same (N, K, M): the implementations timed against each other."""
    groups: List[List[Task]] = []
    for t in tasks:
        if groups and (groups[-1][0].n, groups[-1][0].k, groups[-1][0].m) == (t.n, t.k, t.m):
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _make_impl(task: Task, w: torch.Tensor, device: str, cfg: RunConfig, pools: Dict[tuple, CopyPool],
               entry: dict) -> Optional[Impl]:
    """The implementation a task times, or None (``entry`` then says why it is skipped)."""
    if task.kind == "fastkern":
        reason = fk_ops.backend_status(task.case.op, task.backend, torch.device(device))
        if reason is not None:
            entry.update(status="skipped", reason=reason)
            return None
        pkey = ("fastkern", task.case.op, task.case.dtype, task.case.params)
        if pkey not in pools:
            pools[pkey] = fastkern_pool(task.case, w)
        return fastkern_impl(task.case, task.backend, w, device, cfg.seed + 1, pool=pools[pkey])
    pkey = ("peer", task.peer.name)
    if pkey not in pools:
        pools[pkey] = task.peer.pool(w)
    return task.peer.impl(w, task.m, device, cfg.seed + 1, pool=pools[pkey])


def _peer_op(task: Task) -> str:
    # a peer's compute ceiling follows its own activation dtype; the op only matters for int8 on GPU
    return "int8_gemm" if task.peer.act_dtype == torch.int8 else "gemm"

