"""Recover a pruned and/or quantized model by distillation from its dense teacher.

Typical use (see bench/accuracy.py for the full MiniLM run)::

    teacher = copy.deepcopy(model)
    fastkern.calibrate.prune_sparsegpt_(model, calib_batches)   # or sparsify_, quantize_, ...
    report = fastkern.finetune.distill_(model, teacher, train_batches, steps=1500, lr=5e-4,
                                        max_seconds=900)
    # model holds SparseLinear / QLinear modules again, with trained weights

On all-MiniLM-L6-v2 this recipe (SparseGPT 2:4 start at 0.921, batches of 16 sentences)
reached 0.957 mean embedding cosine in 900 s on a loaded 2-core machine
(bench/results/accuracy.md).

How it works:

* ``to_trainable_`` swaps every SparseLinear / QLinear for a ``TrainableLinear``: a
  float weight that is trained, the 2:4 mask held fixed (pruned weights stay zero),
  and for quantized layers a fake quantization in the forward pass (group-wise int4
  or per-channel int8 round-to-nearest, recomputed from the current weights) whose
  gradient passes straight through (straight-through estimator). W8A8 layers also
  fake-quantize their activations per token.
* ``distill`` trains the student to match the frozen teacher on the given batches:
  ``1 - cosine`` of the mean-pooled embeddings (encoders; ``attention_mask`` pools
  over real tokens) or temperature-scaled KL on ``logits`` (classifiers), plus the
  MSE of every hidden state (each normalized by the teacher's mean square at that
  depth, padding excluded), which gives every layer its own signal. AdamW, linear
  warm-up then cosine decay, dropout off (the teacher is deterministic, so should the
  target be).
* ``repack_`` turns each TrainableLinear back into the canonical SparseLinear /
  QLinear (the same rounding as the fake quantization, so the trained forward is
  what the kernels compute).
"""
import math
import random
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastkern.formats.int4 import check_group_size
from fastkern.nn import QLinear, SparseLinear

FilterFn = Callable[[nn.Module, str], bool]


# ---------------------------------------------------------------------------
# fake quantization with a straight-through gradient


def _fake_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo = g.amin(-1, keepdim=True).clamp(max=0.0)
    hi = g.amax(-1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(n, k)


def _fake_int8(w: torch.Tensor) -> torch.Tensor:
    absmax = w.abs().amax(1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.round(w / scale).clamp(-127, 127) * scale


def _fake_act_int8(x: torch.Tensor) -> torch.Tensor:
    absmax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.round(x / scale).clamp(-127, 127) * scale


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """xq in the forward pass, identity gradient to x in the backward pass."""
    return x + (xq - x).detach()


class TrainableLinear(nn.Module):
    """A float stand-in for a SparseLinear / QLinear during fine-tuning.

    ``mask`` (bool [out, in], fixed) zeroes pruned weights; ``weight_dtype`` "int4" /
    "int8" (with ``group_size`` / ``act_dtype``) fake-quantizes them with a
    straight-through gradient. ``repack()`` returns the canonical module.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], *, mask: Optional[torch.Tensor] = None,
                 weight_dtype: Optional[str] = None, act_dtype: Optional[str] = None, group_size: Optional[int] = None):
        super().__init__()
        if mask is not None and weight_dtype is not None:
            raise ValueError("fastkern.finetune: 2:4 sparsity together with %s weights has no canonical module yet; "
                             "fine-tune one of the two" % weight_dtype)
        if weight_dtype not in (None, "int4", "int8"):
            raise ValueError("fastkern.finetune: weight_dtype must be None, 'int4' or 'int8', got %r" % (weight_dtype,))
        self.out_features, self.in_features = weight.shape
        if weight_dtype == "int4":
            group_size = check_group_size(self.in_features, group_size, "TrainableLinear(in_features=%d)" % self.in_features)
        self.weight_dtype, self.act_dtype, self.group_size = weight_dtype, act_dtype, group_size
        w = weight.detach().float().clone()
        if mask is not None:
            if mask.shape != w.shape or mask.dtype != torch.bool:
                raise ValueError("fastkern.finetune: mask must be bool %s like the weight, got %s %s"
                                 % (tuple(w.shape), mask.dtype, tuple(mask.shape)))
            w = w * mask
            self.register_buffer("mask", mask.clone())
        else:
            self.mask = None
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass computes with (masked and/or fake-quantized)."""
        w = self.weight
        if self.mask is not None:
            w = w * self.mask
        if self.weight_dtype == "int4":
            w = _ste(w, _fake_int4(w, self.group_size))
        elif self.weight_dtype == "int8":
            w = _ste(w, _fake_int8(w))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_dtype == "int8":
            x = _ste(x, _fake_act_int8(x))
        return F.linear(x, self.effective_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def repack(self, dtype=torch.float32) -> nn.Module:
        with torch.no_grad():
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                            device=self.weight.device)
            w = self.weight.detach() * self.mask if self.mask is not None else self.weight.detach()
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        if self.mask is not None:
            return SparseLinear.from_linear(lin, pattern="2:4", mask=self.mask)
        if self.weight_dtype is not None:
            return QLinear.from_linear(lin, weight_dtype=self.weight_dtype, act_dtype=self.act_dtype,
                                       group_size=self.group_size if self.group_size else 128)
        return lin

    def extra_repr(self) -> str:
        what = "2:4 mask" if self.mask is not None else (self.weight_dtype or "float")
        return "in_features=%d, out_features=%d, %s" % (self.in_features, self.out_features, what)


def _mask_2_4(module: SparseLinear) -> torch.Tensor:
    # the kept positions are the meta's; a kept weight may itself be zero, so the mask
    # cannot be read off the dense weight
    n, k = module.out_features, module.in_features
    meta = module.weight_meta.long()
    idx0, idx1 = meta & 3, (meta >> 2) & 3
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=meta.device)
    mask.scatter_(2, idx0[..., None], True)
    mask.scatter_(2, idx1[..., None], True)
    return mask.reshape(n, k)


def _trainable(module: nn.Module) -> Optional[TrainableLinear]:
    if isinstance(module, SparseLinear):
        if module.pattern != "2:4":
            raise ValueError("fastkern.finetune: only 2:4 SparseLinear layers can be fine-tuned, got %s" % module.pattern)
        return TrainableLinear(module.dense_weight(), module.bias, mask=_mask_2_4(module))
    if isinstance(module, QLinear):
        return TrainableLinear(module.dequantized_weight(), module.bias, weight_dtype=module.weight_dtype,
                               act_dtype=module.act_dtype, group_size=module.group_size)
    return None


def _swap(model: nn.Module, convert, types, filter_fn):
    targets = [(fqn, m) for fqn, m in model.named_modules()
               if isinstance(m, types) and (filter_fn is None or filter_fn(m, fqn))]
    for fqn, m in targets:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, convert(m))
    return len(targets)


def to_trainable_(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Swap the model's SparseLinear (2:4) and QLinear modules for TrainableLinear, in place."""
    _swap(model, _trainable, (SparseLinear, QLinear), filter_fn)
    return model


def repack_(model: nn.Module) -> nn.Module:
    """Swap every TrainableLinear back into its canonical SparseLinear / QLinear, in place."""
    _swap(model, lambda m: m.repack(), (TrainableLinear,), None)
    return model


# ---------------------------------------------------------------------------
# the distillation loss


def _call(model, batch, hidden: bool):
    if isinstance(batch, dict):
        if hidden:
            try:
                return model(**batch, output_hidden_states=True)
            except TypeError:
                pass
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _get(out, name):
    if isinstance(out, dict):
        return out.get(name)
    return getattr(out, name, None)


def _main_output(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state",):
        t = _get(out, name)
        if t is not None:
            return t
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError("fastkern.finetune: cannot find the model's output tensor in a %s; pass loss_fn" % type(out).__name__)


def _pool(h, mask):
    if mask is None or h.dim() != 3:
        return h.reshape(h.shape[0], -1) if h.dim() > 2 else h
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def distill_loss(s_out, t_out, batch, *, temperature: float = 2.0, hidden_weight: float = 1.0,
                 embed_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """The distillation loss terms of one batch (a dict with ``loss``, the weighted sum).

    Classifiers (outputs with ``logits``): ``T^2 KL(softmax(t/T) || softmax(s/T))``.
    Otherwise: ``1 - cosine`` of the mean-pooled main output (masked by the batch's
    ``attention_mask``). Plus the normalized MSE of each hidden state when both
    outputs carry ``hidden_states``.
    """
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    terms = {}
    s_logits, t_logits = _get(s_out, "logits"), _get(t_out, "logits")
    if s_logits is not None and t_logits is not None:
        t = temperature
        terms["kl"] = F.kl_div(F.log_softmax(s_logits.float() / t, -1), F.log_softmax(t_logits.float() / t, -1),
                               log_target=True, reduction="batchmean") * t * t
        main = terms["kl"]
    else:
        es, et = _pool(_main_output(s_out).float(), mask), _pool(_main_output(t_out).float(), mask)
        terms["cosine"] = (1.0 - F.cosine_similarity(es, et, dim=-1)).mean()
        main = terms["cosine"]
    loss = embed_weight * main
    hs, ht = _get(s_out, "hidden_states"), _get(t_out, "hidden_states")
    if hidden_weight and hs is not None and ht is not None and len(hs) == len(ht):
        sel = mask.to(torch.bool) if mask is not None and hs[0].dim() == 3 else None
        parts = []
        for a, b in zip(hs[1:], ht[1:]):  # hs[0] is the embedding output, not a layer's
            a, b = a.float(), b.float()
            if sel is not None and tuple(sel.shape) == tuple(a.shape[:2]):
                a, b = a[sel], b[sel]
            parts.append((a - b).pow(2).mean() / b.pow(2).mean().clamp(min=1e-12))
        if parts:
            terms["hidden_mse"] = torch.stack(parts).mean()
            loss = loss + hidden_weight * terms["hidden_mse"]
    elif hidden_weight and "cosine" in terms:
        # no hidden states to match: the main output's size matters too, not only its direction
        a, b = _main_output(s_out).float(), _main_output(t_out).float()
        terms["output_mse"] = (a - b).pow(2).mean() / b.pow(2).mean().clamp(min=1e-12)
        loss = loss + hidden_weight * terms["output_mse"]
    terms["loss"] = loss
    return terms


# ---------------------------------------------------------------------------
# training


def _batches_forever(data, seed):
    if callable(data):
        i = 0
        while True:
            yield data(i)
            i += 1
    items = list(data)
    if not items:
        raise ValueError("fastkern.finetune: the training data is empty")
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            yield items[i]


def distill(student: nn.Module, teacher: nn.Module, data, *, steps: int = 500, lr: float = 2e-4,
            weight_decay: float = 0.0, warmup: float = 0.05, min_lr_ratio: float = 0.1, temperature: float = 2.0,
            hidden_weight: float = 1.0, embed_weight: float = 1.0, loss_fn: Optional[Callable] = None,
            max_seconds: Optional[float] = None, eval_fn: Optional[Callable[[nn.Module], float]] = None,
            eval_every: int = 0, grad_clip: float = 1.0, seed: int = 0, progress: bool = True,
            train_all: bool = True) -> Dict:
    """Train ``student`` (already holding TrainableLinear layers, see ``to_trainable_``)
    to match the frozen ``teacher`` on ``data`` (a list of model inputs, cycled in a
    shuffled order, or a callable ``data(step) -> batch``). Returns a report: steps run,
    seconds, the loss history and the ``eval_fn(student)`` values seen.

    ``report["seconds"]`` and ``max_seconds`` count training only, not the ``eval_fn``
    calls made every ``eval_every`` steps. ``max_seconds`` stops early, and then the
    learning-rate schedule follows the time spent when that is further along than the
    steps. ``train_all`` trains every parameter (layer norms, embeddings, biases too);
    False trains only the TrainableLinear layers. ``loss_fn(s_out, t_out, batch) ->
    dict with "loss"`` replaces ``distill_loss``.
    """
    if not any(isinstance(m, TrainableLinear) for m in student.modules()):
        raise ValueError("fastkern.finetune.distill: the student has no TrainableLinear layer; "
                         "call fastkern.finetune.to_trainable_(student) first")
    torch.manual_seed(seed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if train_all:
        params = [p for p in student.parameters() if p.is_floating_point()]
    else:
        params = [p for m in student.modules() if isinstance(m, TrainableLinear) for p in m.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    def lr_at(frac):
        # linear warm-up, then cosine decay to min_lr_ratio; ``frac`` is the share of the
        # run done, by steps or, with max_seconds, by time if that is further along
        if frac < warmup:
            return (frac + 1.0 / max(steps, 1)) / warmup if warmup > 0 else 1.0
        t = (frac - warmup) / max(1e-9, 1 - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    loss_fn = loss_fn or (lambda s, t, b: distill_loss(s, t, b, temperature=temperature, hidden_weight=hidden_weight,
                                                       embed_weight=embed_weight))
    report = {"steps": 0, "loss": [], "eval": [], "lr": lr, "planned_steps": steps}
    if eval_fn is not None:
        report["eval"].append((0, float(eval_fn(student))))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="fastkern distill", unit="step")
        except ImportError:
            bar = None
    was_training = student.training
    student.eval()  # dropout off: match a deterministic teacher
    t0 = time.perf_counter()
    eval_seconds = 0.0  # evaluations are not training time
    it = _batches_forever(data, seed)
    try:
        for step in range(steps):
            frac = step / steps
            if max_seconds:
                frac = max(frac, (time.perf_counter() - t0 - eval_seconds) / max_seconds)
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, lr_at(frac))
            batch = next(it)
            with torch.no_grad():
                t_out = _call(teacher, batch, hidden_weight > 0)
            s_out = _call(student, batch, hidden_weight > 0)
            terms = loss_fn(s_out, t_out, batch)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            report["steps"] = step + 1
            report["loss"].append({k: round(float(v.detach()), 6) for k, v in terms.items()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: "%.4f" % float(v.detach()) for k, v in terms.items()})
            if eval_fn is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                te = time.perf_counter()
                report["eval"].append((step + 1, float(eval_fn(student))))
                eval_seconds += time.perf_counter() - te
            if max_seconds is not None and time.perf_counter() - t0 - eval_seconds > max_seconds:
                break
    finally:
        if bar is not None:
            bar.close()
        for p in params:
            p.requires_grad_(False)
        student.train(was_training)
    report["seconds"] = time.perf_counter() - t0 - eval_seconds
    report["eval_seconds"] = eval_seconds
    if eval_fn is not None:
        report["eval"].append((report["steps"], float(eval_fn(student))))
    return report


def distill_(student: nn.Module, teacher: nn.Module, data, filter_fn: Optional[FilterFn] = None, **kwargs) -> Dict:
    """to_trainable_ + distill + repack_: fine-tune a converted model in place against its
    dense teacher; returns the training report (see ``distill`` for the options)."""
    to_trainable_(student, filter_fn)
    try:
        return distill(student, teacher, data, **kwargs)
    finally:
        repack_(student)
