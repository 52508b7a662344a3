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
from fastkern.bench.timing import Rotator, copies_needed, time_rotator

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


_OP_PARAMS = {"linear_w4a16": ("group_size",), "linear_blocksparse": ("block_size", "sparsity")}


def _op_params(case: Case) -> dict:
    return {name: case.param(name) for name in _OP_PARAMS.get(case.op, ())}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, text[0] if text else "")


def _roofline(entry: dict, ceilings: dict, op: str):
    bw = ceilings.get("read_bw_gbs")
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


def measure(impl: Impl, device: str, llc: int, cfg: RunConfig, ref: Optional[torch.Tensor] = None) -> dict:
    """Time one implementation; returns the numeric fields of its entry."""
    first = impl.pool.get(0)
    copy_bytes = impl.weight_bytes(first)
    ncopies = copies_needed(copy_bytes, llc, cfg.max_copies)
    copies = [impl.pool.get(i) for i in range(ncopies)]
    with impl.context():
        out = impl.call(impl.x, first)
        t = time_rotator(Rotator(impl.call, impl.x, copies), device, cfg.min_run_time)
    nbytes = copy_bytes + tensor_bytes(impl.x) + tensor_bytes(out)
    sec = t.ms * 1e-3
    return {
        "status": "ok",
        "ms": t.ms,
        "iqr_ms": t.iqr_ms,
        "runs": t.runs,
        "timer": t.method,
        "copies": ncopies,
        "weight_bytes": int(copy_bytes),
        "bytes": int(nbytes),
        "flops": int(impl.flops),
        "gflops": impl.flops / sec / 1e9,
        "gbs": nbytes / sec / 1e9,
        "rel_err_vs_fp32": _rel_err(out, ref) if cfg.check_error else None,
    }


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

    interrupted = False
    for i, task in enumerate(tasks):
        if interrupted:
            break
        if on_task:
            on_task(i, len(tasks), task.label)
        if (task.n, task.k) not in weights:
            weights.clear()  # one float weight (and its formats) alive at a time
            refs.clear()
            pools.clear()
            gc.collect()
            weights[(task.n, task.k)] = make_weight(task.n, task.k, cfg.seed, device)
        w = weights[(task.n, task.k)]
        key = (task.n, task.k, task.m)
        if cfg.check_error and key not in refs:
            x32 = make_activation(task.m, task.k, torch.float32, cfg.seed + 1, device)
            refs[key] = x32 @ w.T
        entry = _base_entry(task)
        try:
            if task.kind == "fastkern":
                reason = fk_ops.backend_status(task.case.op, task.backend, torch.device(device))
                if reason is not None:
                    entry.update(status="skipped", reason=reason)
                else:
                    pkey = ("fastkern", task.case.op, task.case.dtype, task.case.params)
                    if pkey not in pools:
                        pools[pkey] = fastkern_pool(task.case, w)
                    impl = fastkern_impl(task.case, task.backend, w, device, cfg.seed + 1, pool=pools[pkey])
                    entry.update(measure(impl, device, llc, cfg, refs.get(key)))
            else:
                pkey = ("peer", task.peer.name)
                if pkey not in pools:
                    pools[pkey] = task.peer.pool(w)
                impl = task.peer.impl(w, task.m, device, cfg.seed + 1, pool=pools[pkey])
                entry.update(measure(impl, device, llc, cfg, refs.get(key)))
        except PeerUnavailable as e:
            entry.update(status="skipped", reason=str(e))
        except KeyboardInterrupt:
            # keep what was measured: a long run stopped by hand still reports (and saves) its results
            interrupted = True
            entry.update(status="skipped", reason="interrupted")
        except Exception as e:  # a failing kernel is a result to report, not a reason to stop the run
            entry.update(status="error", reason=_first_line(e))
        if entry.get("status") == "ok":
            _roofline(entry, ceilings, task.case.op if task.kind == "fastkern" else _peer_op(task))
        results.append(entry)
        impl = None

    if cfg.measure_ceilings and ceilings.get("read_bw_gbs") and not interrupted:
        # The memory bandwidth of a shared host can change while the run goes on (seen:
        # ~48 and ~80 GB/s regimes minutes apart on one VM): measured again at the end,
        # and a change beyond 15% is flagged (%BW and the ratios may then mix regimes).
        end = ceil_mod.read_bandwidth(device, ceilings["bw_array_bytes"],
                                      cfg.ceiling_min_run_time or max(cfg.min_run_time, 0.05))
        ceilings["read_bw_gbs_end"] = end
        ceilings["read_bw_drift"] = abs(end - ceilings["read_bw_gbs_sum"]) > 0.15 * ceilings["read_bw_gbs_sum"]
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
    return result


def _peer_op(task: Task) -> str:
    # a peer's compute ceiling follows its own activation dtype; the op only matters for int8 on GPU
    return "int8_gemm" if task.peer.act_dtype == torch.int8 else "gemm"
