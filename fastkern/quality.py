"""Per-layer quality of a converted model: which layers hurt, and how to skip them.

``layer_report(converted, reference, inputs)`` pairs every QLinear / SparseLinear of
``converted`` with the nn.Linear of the same name in ``reference`` (the float model
it came from, e.g. a ``copy.deepcopy`` taken before ``quantize_``) and measures

* weight SQNR: ``10 log10(|W|^2 / |W - W_conv|^2)`` of the weight the module computes
  with (dequantized / decompressed) against the float weight (data-free);
* output SQNR (when ``inputs`` are given): the same ratio on the layer's outputs,
  both layers fed the very inputs the float layer sees when the reference model runs
  on ``inputs`` (so each layer is judged alone, not through earlier layers' errors).

``skip_filter(report, min_db=...)`` or ``skip_filter(report, worst=n)`` turns a report
into a ``filter_fn`` for ``quantize_`` / ``sparsify_`` that leaves those layers float.
"""
import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from fastkern.calibrate import _call  # a batch is a tensor, a tuple of arguments or a dict of keywords
from fastkern.nn import QLinear, SparseLinear


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of ``approx`` against ``ref`` (inf when equal)."""
    ref, approx = ref.detach().float(), approx.detach().float()
    if ref.shape != approx.shape:
        raise ValueError("sqnr_db: shapes differ, ref %s vs approx %s" % (tuple(ref.shape), tuple(approx.shape)))
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def effective_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The float32 [out, in] weight a fastkern module (or nn.Linear) computes with, or None."""
    if isinstance(module, QLinear):
        return module.dequantized_weight().float()
    if isinstance(module, SparseLinear):
        return module.dense_weight().float()
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    dense = getattr(module, "effective_weight", None)
    if callable(dense):
        return dense().detach().float()
    return None


def _describe(module):
    if isinstance(module, QLinear):
        s = module.weight_dtype
        if module.weight_dtype == "int4":
            s += " g%d" % module.group_size
        if module.act_dtype:
            s += " a" + module.act_dtype
        return s
    if isinstance(module, SparseLinear):
        return module.pattern
    return type(module).__name__


@torch.no_grad()
def layer_report(converted: nn.Module, reference: nn.Module, inputs=None, max_tokens: int = 4096) -> List[Dict]:
    """One dict per converted layer, in module order: ``name``, ``kind``, ``shape``,
    ``weight_sqnr_db`` and, with ``inputs`` (an iterable of model inputs: dicts as
    keyword arguments, tuples as positional ones, a tensor alone), ``output_sqnr_db``
    over at most ``max_tokens`` input rows per layer.
    """
    ref_modules = dict(reference.named_modules())
    pairs = []
    for name, mod in converted.named_modules():
        if not isinstance(mod, (QLinear, SparseLinear)):
            continue
        ref = ref_modules.get(name)
        if not isinstance(ref, nn.Linear):
            raise ValueError("fastkern.quality.layer_report: converted layer %r has no float nn.Linear of the same "
                             "name in the reference model (found %s)" % (name, type(ref).__name__))
        pairs.append((name, mod, ref))
    captured = {name: [] for name, _, _ in pairs}
    if inputs is not None:
        if isinstance(inputs, (dict, torch.Tensor)):
            inputs = [inputs]

        def make_hook(name):
            def hook(mod, args):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])
                have = sum(t.shape[0] for t in captured[name])
                if have < max_tokens:
                    captured[name].append(x[: max_tokens - have].clone())
            return hook

        hooks = [ref.register_forward_pre_hook(make_hook(name)) for name, _, ref in pairs]
        was_training = reference.training
        reference.eval()
        try:
            for batch in inputs:
                _call(reference, batch)
        finally:
            reference.train(was_training)
            for h in hooks:
                h.remove()
    rows = []
    for name, mod, ref in pairs:
        w_ref = ref.weight.detach().float()
        row = {"name": name, "kind": _describe(mod), "shape": [mod.out_features, mod.in_features],
               "weight_sqnr_db": sqnr_db(w_ref, effective_weight(mod))}
        if captured[name]:
            x = torch.cat(captured[name])
            y_ref = nn.functional.linear(x.float(), w_ref, None if ref.bias is None else ref.bias.float())
            y = mod(x.to(ref.weight.dtype)).float()
            row["output_sqnr_db"] = sqnr_db(y_ref, y)
            row["tokens"] = int(x.shape[0])
        rows.append(row)
    return rows


def _key(row):
    return row.get("output_sqnr_db", row["weight_sqnr_db"])


def skip_filter(report: List[Dict], min_db: Optional[float] = None, worst: Optional[int] = None,
                base: Optional[Callable[[nn.Module, str], bool]] = None) -> Callable[[nn.Module, str], bool]:
    """A ``filter_fn(module, fqn)`` that rejects the report's layers whose SQNR (output SQNR when
    measured, else weight SQNR) is below ``min_db``, and/or the ``worst`` n of them; every
    other layer is left to ``base`` (default: accepted)."""
    if min_db is None and worst is None:
        raise ValueError("fastkern.quality.skip_filter: give min_db and/or worst")
    skip = set()
    if min_db is not None:
        skip.update(r["name"] for r in report if _key(r) < min_db)
    if worst:
        skip.update(r["name"] for r in sorted(report, key=_key)[:worst])

    def filter_fn(module, fqn):
        if fqn in skip:
            return False
        return True if base is None else base(module, fqn)

    filter_fn.skipped = sorted(skip)
    return filter_fn


def format_report(report: List[Dict], title: str = "fastkern per-layer quality") -> str:
    """A plain-text table of a layer_report, worst layer marked."""
    worst = min(report, key=_key)["name"] if report else None
    has_out = any("output_sqnr_db" in r for r in report)
    lines = [title, "%-48s %-10s %-12s %10s%s" % ("layer", "kind", "shape", "weight dB", "   output dB" if has_out else "")]
    for r in report:
        line = "%-48s %-10s %-12s %10.2f" % (r["name"][-48:], r["kind"], "%dx%d" % tuple(r["shape"]), r["weight_sqnr_db"])
        if has_out:
            line += "%12.2f" % r.get("output_sqnr_db", float("nan"))
        if r["name"] == worst:
            line += "  <- worst"
        lines.append(line)
    return "\n".join(lines)


def print_report(report: List[Dict], title: str = "fastkern per-layer quality") -> None:
    """Print a layer_report as a rich table (plain text when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_report(report, title))
        return
    has_out = any("output_sqnr_db" in r for r in report)
    table = Table(title=title)
    for col in ("layer", "kind", "shape", "weight SQNR dB") + (("output SQNR dB",) if has_out else ()):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    worst = min(report, key=_key)["name"] if report else None
    for r in report:
        cells = [r["name"], r["kind"], "%dx%d" % tuple(r["shape"]), "%.2f" % r["weight_sqnr_db"]]
        if has_out:
            cells.append("%.2f" % r.get("output_sqnr_db", float("nan")))
        table.add_row(*cells, style="bold red" if r["name"] == worst else None)
    Console().print(table)
