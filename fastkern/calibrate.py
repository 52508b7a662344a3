"""Calibrated conversion, block by block: int4 GPTQ and 2:4 SparseGPT.

``quantize_gptq_(model, group_size, calibration, filter_fn)`` (also reached as
``fastkern.quantize_(..., method="gptq", calibration=...)``) replaces the model's
nn.Linear layers with int4 ``fastkern.QLinear`` modules in the canonical format,
whose integers were chosen with the layer's input statistics.
``prune_sparsegpt_(model, calibration, filter_fn)`` does the same for 2:4
``fastkern.SparseLinear`` modules (the mask and the kept weights chosen by the same
second-order rule): a much better starting point for ``fastkern.finetune`` than
magnitude pruning. Both show a tqdm bar and report their cost (wall and CPU
seconds, passes). What the int4 path does, and why:

* Sequential. The model's repeated blocks (the nn.ModuleList holding most of the
  layers, e.g. a transformer's layers) are processed one at a time on cached block
  inputs, and inside a block the layers are quantized stage by stage in execution
  order (q/k/v share an input and form one stage), each stage seeing the inputs
  that the already-quantized layers before it produce. Layers outside the blocks
  are done last, with one pass of the whole model.
* GPTQ. For each layer the Hessian of the output error, ``H = X^T X`` over the
  calibration tokens (padding tokens excluded when the batches carry an
  ``attention_mask``), drives column-by-column quantization where each column's
  rounding error is pushed onto the columns not yet quantized (through the
  Cholesky factor of H^-1, dampened by ``damp * mean(diag H)``).
* Activation order without a permuted format. Columns are processed in order of
  decreasing ``diag(H)`` (the most used inputs first, while the most freedom is
  left to compensate them), but the canonical int4 format keeps groups of
  consecutive columns in the original order. So a group's scale and zero are fixed
  lazily, the first time any of its columns comes up, from the group's current
  (error-updated) weights, and every column is quantized with its own group's
  parameters. The stored layout needs no permutation.
* Searched group ranges. Each group's (scale, zero) is chosen by the clipping
  search of ``fastkern.formats.int4_search`` with every column's error weighted by
  its GPTQ cost (1 / [U]_jj^2, U the Cholesky factor of H^-1), not by min/max.
* Float target. Plain sequential GPTQ fits the quantized layer to ``W x_q`` (its
  own quantized-path input), which lets errors from earlier layers pass through.
  Here the target is the float model's output ``W x_f``: with ``H = X_q^T X_q`` and
  ``D = (X_f - X_q)^T X_q``, the least-squares weight for quantized inputs is
  ``W + W D H^-1``, and GPTQ quantizes that. (The float model's block inputs are
  carried along for this: one more block pass each.)
* Scale refit. With the integers fixed, each row's group scales are refitted by
  least squares on the same objective ``(w - w_q) H (w - w_q)^T`` (a G x G system
  per row); a row keeps its old scales unless the refit lowers its error.
"""
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from fastkern.formats.int4 import check_group_size, pack_int4
from fastkern.formats.int4_search import search_int4_params

FilterFn = Callable[[nn.Module, str], bool]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once it has given what was needed."""


# ---------------------------------------------------------------------------
# GPTQ on one weight matrix


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    return h


def _upper_inv_chol(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising the dampening until H factors."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    for _ in range(8):
        try:
            lo = torch.linalg.cholesky(h + extra * eye)
            hinv = torch.cholesky_inverse(lo)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10.0, 1e-6 * float(torch.diagonal(h).mean()))
    raise RuntimeError("fastkern.calibrate: the layer's input Hessian is not positive definite even with dampening")


def gptq_quantize_weight(w: torch.Tensor, h: torch.Tensor, group_size: int, *, damp: float = 0.01,
                         act_order: bool = True, search: bool = True, refit_scales: bool = True,
                         block_size: int = 128):
    """Quantize w [N, K] to canonical int4 minimizing ``(w - w_q) H (w - w_q)^T`` per row.

    ``h`` [K, K] is the (unnormalized or normalized) input second moment X^T X.
    Returns (packed uint8 [N, K/2], scale float32 [N, K/g], zero uint8 [N, K/g]) and
    the dequantized float32 weight.
    """
    n, k = w.shape
    group_size = check_group_size(k, group_size)
    groups = k // group_size
    w = w.detach().float().clone()
    h = h.detach().float()
    dead = torch.diagonal(h) <= 0
    w[:, dead] = 0.0
    hd = _damped(h, damp)
    perm = torch.argsort(torch.diagonal(hd), descending=True, stable=True) if act_order else torch.arange(k)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(k)
    u = _upper_inv_chol(hd[perm][:, perm])
    cost = 1.0 / torch.diagonal(u).pow(2)  # GPTQ cost of an error in each (permuted) column

    wp = w[:, perm].contiguous()
    q_perm = torch.zeros_like(wp)
    scale = torch.zeros(n, groups)
    zero = torch.zeros(n, groups)
    have = torch.zeros(groups, dtype=torch.bool)
    col_group = perm // group_size  # group of each permuted column

    threads = torch.get_num_threads()
    # the column loop is thousands of tiny ops: extra threads only add synchronization
    torch.set_num_threads(1)
    try:
        for b0 in range(0, k, block_size):
            b1 = min(b0 + block_size, k)
            wb = wp[:, b0:b1].clone()
            err = torch.zeros_like(wb)
            ub = u[b0:b1, b0:b1]
            for j in range(b1 - b0):
                gi = int(col_group[b0 + j])
                if not have[gi]:
                    _group_params(gi, group_size, inv, wp, wb, err, u, b0, b1, j, cost, search, scale, zero)
                    have[gi] = True
                s, z = scale[:, gi], zero[:, gi]
                col = wb[:, j]
                q = torch.round(col / s + z).clamp_(0, 15)
                q_perm[:, b0 + j] = q
                e = (col - (q - z) * s) / ub[j, j]
                err[:, j] = e
                wb[:, j + 1:].addr_(e, ub[j, j + 1:], alpha=-1.0)
            wp[:, b1:].addmm_(err, u[b0:b1, b1:], alpha=-1.0)
    finally:
        torch.set_num_threads(threads)

    q = q_perm[:, inv]
    if refit_scales:
        scale = _refit_scales(w, hd, q, scale, zero, group_size)
    wq = ((q.reshape(n, groups, group_size) - zero[..., None]) * scale[..., None]).reshape(n, k)
    return (pack_int4(q), scale.float(), zero.to(torch.uint8)), wq


def _group_params(gi, group_size, inv, wp, wb, err, u, b0, b1, j, cost, search, scale, zero):
    """Fix group gi's (scale, zero) from its columns' current values (none is quantized yet)."""
    cols = inv[gi * group_size:(gi + 1) * group_size]  # their positions in processing order
    # columns of the current block carry its updates already; later columns still
    # lack this block's pending ones, which are added here
    cur = wp[:, cols].clone()
    in_block = (cols >= b0) & (cols < b1)
    if in_block.any():
        cur[:, in_block] = wb[:, cols[in_block] - b0]
    later = cols >= b1
    if later.any() and j > 0:
        cur[:, later] -= err[:, :j] @ u[b0:b0 + j][:, cols[later]]
    if search:
        s, z = search_int4_params(cur, cost[cols][None, :])
    else:
        s, z = search_int4_params(cur, steps=1, refine=0)
    scale[:, gi], zero[:, gi] = s, z


def _row_loss(w, wq, h):
    e = w - wq
    return ((e @ h) * e).sum(1)


def _refit_scales(w, h, q, scale, zero, group_size, rows_per_chunk=256):
    """Least-squares group scales for fixed integers, row by row, kept only where they help."""
    n, k = w.shape
    groups = k // group_size
    out = scale.clone()
    hb = h.reshape(k, groups, group_size)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        c = (q[r0:r1].reshape(-1, groups, group_size) - zero[r0:r1, :, None])  # [R, G, g]
        # a[r, h, i] = sum over columns j of group h of H[i, j] c[r, h, j]
        a = torch.einsum("rhj,ihj->rhi", c, hb)  # [R, G, K]
        m = torch.einsum("rgi,rhgi->rgh", c, a.reshape(r1 - r0, groups, groups, group_size))
        rhs = torch.einsum("rgi,rgi->rg", c, (w[r0:r1] @ h).reshape(-1, groups, group_size))
        ridge = 1e-6 * torch.diagonal(m, dim1=1, dim2=2).mean(1).clamp(min=1e-30)
        m = m + ridge[:, None, None] * torch.eye(groups)
        try:
            s = torch.linalg.solve(m, rhs[..., None])[..., 0]
        except torch.linalg.LinAlgError:
            continue
        ok = torch.isfinite(s).all(1) & (s > 0).all(1)
        old = scale[r0:r1]
        new = torch.where(ok[:, None], s, old)
        wq_old = (c * old[..., None]).reshape(r1 - r0, k)
        wq_new = (c * new[..., None]).reshape(r1 - r0, k)
        better = _row_loss(w[r0:r1], wq_new, h) < _row_loss(w[r0:r1], wq_old, h)
        out[r0:r1] = torch.where(better[:, None], new, old)
    return out


# ---------------------------------------------------------------------------
# statistics of a layer's inputs


class _Stats:
    """Running X_q^T X_q and (X_f - X_q)^T X_q of one layer over calibration tokens."""

    def __init__(self, k):
        self.h = torch.zeros(k, k)
        self.d = None
        self.tokens = 0

    def add(self, xq: torch.Tensor, xf: Optional[torch.Tensor] = None):
        self.h.addmm_(xq.T, xq)
        if xf is not None:
            if self.d is None:
                self.d = torch.zeros_like(self.h)
            self.d.addmm_((xf - xq).T, xq)
        self.tokens += xq.shape[0]


def _tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of a layer input [..., K] that are real tokens (padding dropped when the mask fits)."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(torch.bool)].float()
    return x.reshape(-1, x.shape[-1]).float()


# ---------------------------------------------------------------------------
# running the model on the calibration data


def _as_batches(calibration):
    if callable(calibration) and not isinstance(calibration, (list, tuple, dict, torch.Tensor)):
        return None
    if isinstance(calibration, (dict, torch.Tensor)):
        return [calibration]
    batches = list(calibration)
    if not batches:
        raise ValueError("fastkern.calibrate: the calibration data is empty")
    return batches


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_mask(batch):
    if isinstance(batch, dict):
        m = batch.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m
    return None


def _find_blocks(model: nn.Module, targets: Dict[str, nn.Module]):
    """(fqn, ModuleList) of the repeated blocks holding the most target layers, or None."""
    best, best_count = None, 0
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        prefix = fqn + "." if fqn else ""
        count = sum(1 for t in targets if t.startswith(prefix))
        if count > best_count:
            best, best_count = (fqn, mod), count
    return best


def _hidden_slot(args, kwargs):
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return ("arg", i)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return ("kw", "hidden_states")
    for key, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return ("kw", key)
    raise RuntimeError("fastkern.calibrate: cannot find the hidden-state tensor among the block's inputs")


def _with_hidden(call, hidden):
    args, kwargs, slot = call
    if slot[0] == "arg":
        args = args[: slot[1]] + (hidden,) + args[slot[1] + 1:]
    else:
        kwargs = dict(kwargs)
        kwargs[slot[1]] = hidden
    return args, kwargs


def _first_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise RuntimeError("fastkern.calibrate: cannot read the hidden state from a block output of type %s" % type(out))


# ---------------------------------------------------------------------------
# the driver


class _Calibrator:
    def __init__(self, model, calibration, filter_fn, solve, damp, float_target, progress, desc, check=None):
        self.model = model
        self.solve = solve  # solve(w float32 [N, K], h [K, K] or None) -> (payload, new float weight)
        self.damp = damp
        self.float_target = float_target
        self.batches = _as_batches(calibration)
        self.runner = calibration if self.batches is None else None
        self.targets = {fqn: m for fqn, m in model.named_modules()
                        if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, fqn))}
        if check is not None:
            for fqn, m in self.targets.items():
                check(fqn, m)
        self.results = {}  # fqn -> (packed, scale, zero)
        self.report = {"layers": {}, "model_passes": 0, "block_passes": 0}
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=len(self.targets), desc=desc, unit="layer")
            except ImportError:
                self.bar = None

    # -- one layer
    def _quantize_layer(self, fqn, stats: _Stats):
        lin = self.targets[fqn]
        t0 = time.perf_counter()
        w = lin.weight.detach().float()
        h = (stats.h / max(stats.tokens, 1)).float()
        if stats.d is not None and self.float_target:
            # least-squares weight for the quantized-path inputs: W + W D (H + damp)^-1
            d = stats.d / max(stats.tokens, 1)
            lo, info = torch.linalg.cholesky_ex(_damped(h, self.damp))
            if int(info) == 0:  # else keep the plain target (H too ill-conditioned to solve)
                w = w + torch.cholesky_solve(d.T @ w.T, lo).T
        payload, wq = self.solve(w, h)
        with torch.no_grad():
            lin.weight.copy_(wq.to(lin.weight.dtype))  # later layers see this layer's converted output
        self.results[fqn] = payload
        self.report["layers"][fqn] = {"tokens": stats.tokens, "seconds": time.perf_counter() - t0}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(fqn[-40:])

    # -- staged passes over some forward function
    def _staged(self, names: List[str], run_pass, fp_inputs=None, can_stop=True):
        """Quantize ``names`` stage by stage, in execution order.

        A stage is the first not-yet-quantized layer that runs plus every other one fed
        the very same input tensor (q/k/v). run_pass(on_batch) runs the forward over all
        calibration batches, calling on_batch(i, mask) before batch i; with can_stop the
        hooks end each batch with _Stop once the stage has its inputs. fp_inputs maps a
        layer name to its float-path inputs per batch (for the float target).
        """
        todo = list(names)
        while todo:
            stage, stats = [], {}
            st = {"key": None, "closed": False, "batch": 0, "mask": None}

            def make_hook(name):
                def hook(mod, inputs):
                    x = inputs[0]
                    key = (x.data_ptr(), tuple(x.shape))
                    if not st["closed"] and name not in stage and (st["key"] is None or key == st["key"]):
                        st["key"] = key
                        stage.append(name)
                        # members of a stage share one input, hence one set of statistics
                        stats[name] = stats[stage[0]] if len(stage) > 1 else _Stats(x.shape[-1])
                    if name in stage:
                        if name != stage[0]:
                            return None
                        xq = _tokens(x, st["mask"])
                        xf = None
                        if fp_inputs is not None and name in fp_inputs:
                            xf = _tokens(fp_inputs[name][st["batch"]], st["mask"])
                            if xf.shape != xq.shape:
                                xf = None
                        stats[name].add(xq, xf)
                        return None
                    if stage:
                        # a later layer: the stage has what it needs from this batch
                        st["closed"] = True
                        if can_stop:
                            raise _Stop()
                    return None
                return hook

            def on_batch(i, m):
                st["batch"], st["mask"] = i, m
                if stage:
                    st["closed"] = True

            hooks = [self.targets[n].register_forward_pre_hook(make_hook(n)) for n in todo]
            try:
                run_pass(on_batch)
            finally:
                for hk in hooks:
                    hk.remove()
            if not stage:
                for n in todo:  # never ran on the calibration data
                    self._quantize_unused(n)
                return
            for n in stage:
                self._quantize_layer(n, stats[n])
            todo = [n for n in todo if n not in stage]

    def _quantize_unused(self, fqn):
        lin = self.targets[fqn]
        payload, wq = self.solve(lin.weight.detach().float(), None)
        with torch.no_grad():
            lin.weight.copy_(wq.to(lin.weight.dtype))
        self.results[fqn] = payload
        self.report["layers"][fqn] = {"tokens": 0, "seconds": 0.0, "note": "never ran on calibration data"}
        if self.bar is not None:
            self.bar.update(1)

    # -- whole-model passes (layers outside the blocks, or models without blocks)
    def _model_pass(self, on_batch):
        self.report["model_passes"] += 1
        if self.batches is None:
            # a user callable: the model's own pre-hook marks where each batch starts
            count = [0]

            def pre(mod, args):
                on_batch(count[0], None)
                count[0] += 1

            hk = self.model.register_forward_pre_hook(pre)
            try:
                self.runner(self.model)
            finally:
                hk.remove()
            return
        for i, b in enumerate(self.batches):
            on_batch(i, _batch_mask(b))
            try:
                _call(self.model, b)
            except _Stop:
                pass

    def _capture_block_inputs(self, block):
        calls = []
        masks = []
        stop_early = self.batches is not None
        current_mask = [None]

        def hook(mod, args, kwargs):
            calls.append((tuple(args), dict(kwargs), _hidden_slot(args, kwargs)))
            masks.append(current_mask[0])
            if stop_early:
                raise _Stop()
            return None

        hk = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self._model_pass(lambda i, m: current_mask.__setitem__(0, m))
        finally:
            hk.remove()
        if not calls:
            raise RuntimeError("fastkern.calibrate: the calibration data never reached the model's first block")
        return calls, masks

    def _run_block(self, block, calls, hidden):
        self.report["block_passes"] += 1
        out = []
        for c, x in zip(calls, hidden):
            args, kwargs = _with_hidden(c, x)
            out.append(_first_output(block(*args, **kwargs)))
        return out

    def run(self):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            found = _find_blocks(self.model, self.targets)
            done = set()
            if found is not None:
                prefix, blocks = found
                prefix = prefix + "." if prefix else ""
                calls, masks = self._capture_block_inputs(blocks[0])
                q_hidden = [c[0][c[2][1]] if c[2][0] == "arg" else c[1][c[2][1]] for c in calls]
                f_hidden = list(q_hidden)
                for bi, block in enumerate(blocks):
                    bprefix = "%s%d." % (prefix, bi)
                    names = [n for n in self.targets if n.startswith(bprefix)]
                    fp_inputs, f_next = None, None
                    if names and self.float_target:
                        f_next, fp_inputs = self._float_block_pass(block, calls, f_hidden, names)
                    if names:
                        self._staged(names, self._block_runner(block, calls, q_hidden, masks), fp_inputs)
                        done.update(names)
                    q_next = self._run_block(block, calls, q_hidden)
                    if self.float_target:
                        f_hidden = f_next if f_next is not None else self._run_block(block, calls, f_hidden)
                    q_hidden = q_next
            rest = [n for n in self.targets if n not in done]
            if rest:
                self._staged(rest, self._model_pass, can_stop=self.batches is not None)
        self.report["seconds"] = time.perf_counter() - t0
        # CPU seconds of this process: on a shared machine, a steadier cost than the wall time
        self.report["cpu_seconds"] = time.process_time() - c0
        if self.bar is not None:
            # the cost, left on the finished bar
            self.bar.set_postfix_str("%.1f s (%.1f CPU s), %d block + %d model passes" % (
                self.report["seconds"], self.report["cpu_seconds"], self.report["block_passes"],
                self.report["model_passes"]))
            self.bar.close()
        return self.results

    def _float_block_pass(self, block, calls, f_hidden, names):
        """Run the (still float) block on float inputs: its outputs and every target's float inputs."""
        fp_inputs = {n: [] for n in names}
        hooks = [self.targets[n].register_forward_pre_hook(
            lambda mod, inp, n=n: fp_inputs[n].append(inp[0])) for n in names]
        try:
            outs = []
            for c, x in zip(calls, f_hidden):
                args, kwargs = _with_hidden(c, x)
                outs.append(_first_output(block(*args, **kwargs)))
        finally:
            for hk in hooks:
                hk.remove()
        self.report["block_passes"] += 1
        n_batches = len(calls)
        for n in names:
            if len(fp_inputs[n]) != n_batches:  # a layer that runs more than once per batch: no float target
                fp_inputs[n] = None
        return outs, {n: v for n, v in fp_inputs.items() if v is not None}

    def _block_runner(self, block, calls, q_hidden, masks):
        def run_pass(on_batch):
            self.report["block_passes"] += 1
            for i, (c, x) in enumerate(zip(calls, q_hidden)):
                on_batch(i, masks[i])
                args, kwargs = _with_hidden(c, x)
                try:
                    block(*args, **kwargs)
                except _Stop:
                    pass
        return run_pass


def _replace(model: nn.Module, fqn: str, module: nn.Module):
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _calibrate(model, calibration, filter_fn, solve, make, *, damp, float_target, progress, report, desc, check=None,
               fn_name):
    if calibration is None:
        raise ValueError("fastkern.%s: calibration inputs are required (calibration=...)" % fn_name)
    if type(model) is nn.Linear:
        raise TypeError("fastkern.%s: the model itself is an nn.Linear, which cannot be replaced in place" % fn_name)
    was_training = model.training
    model.eval()
    cal = _Calibrator(model, calibration, filter_fn, solve, damp, float_target, progress, desc, check)
    try:
        results = cal.run()
    finally:
        model.train(was_training)
    for fqn, payload in results.items():
        _replace(model, fqn, make(cal.targets[fqn], payload))
    cal.report["layers_converted"] = len(results)
    if report is not None:
        report.update(cal.report)
    return model


def quantize_gptq_(model: nn.Module, group_size: int = 128, calibration=None, filter_fn: Optional[FilterFn] = None,
                   *, damp: float = 0.01, act_order: bool = True, search: bool = True, refit_scales: bool = True,
                   float_target: bool = True, progress: bool = True, report: Optional[dict] = None) -> nn.Module:
    """Replace the model's nn.Linear layers (those accepted by filter_fn(module, fqn)) in
    place with int4 ``fastkern.QLinear`` modules quantized by calibrated GPTQ; returns model.

    calibration: an iterable of model inputs (dicts are passed as keyword arguments,
    tuples as positional ones, a tensor as the single argument), or a callable
    ``calibration(model)`` that runs the model on its data. With batches of a
    tokenizer's output, padding tokens (attention_mask == 0) are left out of the
    statistics. ``report``, if given, receives the time taken (``seconds``, and
    ``cpu_seconds`` of this process), the number of whole-model and block passes and
    per-layer details.
    ``act_order``, ``search``, ``refit_scales`` and ``float_target`` switch off the
    improvements over plain GPTQ one by one (see the module doc); all False is
    plain sequential GPTQ.
    """
    from fastkern.nn import QLinear

    def check(fqn, m):
        check_group_size(m.in_features, group_size, "layer %r (in_features=%d)" % (fqn, m.in_features))

    def solve(w, h):
        if h is None:  # a layer the calibration data never reached: plain reconstruction error
            return gptq_quantize_weight(w, torch.eye(w.shape[1]), group_size, damp=damp, act_order=False,
                                        search=search, refit_scales=False)
        return gptq_quantize_weight(w, h, group_size, damp=damp, act_order=act_order, search=search,
                                    refit_scales=refit_scales)

    def make(linear, payload):
        packed, scale, zero = payload
        return QLinear.from_quantized(linear, weight=packed, weight_scale=scale, weight_zero=zero, weight_dtype="int4",
                                      group_size=group_size)

    return _calibrate(model, calibration, filter_fn, solve, make, damp=damp, float_target=float_target,
                      progress=progress, report=report, desc="fastkern gptq", check=check, fn_name="quantize_gptq_")


# ---------------------------------------------------------------------------
# 2:4 pruning with the same machinery (SparseGPT-style)


def sparsegpt_prune_2_4(w: torch.Tensor, h: Optional[torch.Tensor], *, damp: float = 0.01, block_size: int = 128):
    """2:4 mask and compensated weight for w [N, K] minimizing ``(w - w_p) H (w - w_p)^T`` per row.

    In each group of 4 consecutive inputs the 2 weights with the smallest GPTQ cost
    ``w^2 / [H^-1]_jj`` (on the already-updated weights) are pruned, and each pruned
    weight's error is pushed onto the inputs not yet visited, as GPTQ does for
    rounding errors. With ``h=None`` it is plain magnitude 2:4 pruning.
    Returns (bool mask [N, K], pruned float32 weight [N, K]).
    """
    n, k = w.shape
    if k % 4:
        raise ValueError("sparsegpt_prune_2_4: 2:4 needs K divisible by 4, got weight of shape %s" % (tuple(w.shape),))
    w = w.detach().float().clone()
    if h is None:
        from fastkern.formats.sparse import prune_2_4

        mask = prune_2_4(w)
        return mask, w * mask
    block_size = max(4, block_size - block_size % 4)
    h = h.detach().float()
    dead = torch.diagonal(h) <= 0
    w[:, dead] = 0.0
    u = _upper_inv_chol(_damped(h, damp))
    d = torch.diagonal(u)
    mask = torch.zeros(n, k, dtype=torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b0 in range(0, k, block_size):
            b1 = min(b0 + block_size, k)
            wb = w[:, b0:b1].clone()
            err = torch.zeros_like(wb)
            ub = u[b0:b1, b0:b1]
            for j in range(b1 - b0):
                if j % 4 == 0:
                    score = wb[:, j:j + 4].pow(2) / d[b0 + j:b0 + j + 4].pow(2)
                    keep = score.topk(2, dim=1).indices
                    mask[:, b0 + j:b0 + j + 4].scatter_(1, keep, True)
                col = wb[:, j]
                q = col * mask[:, b0 + j]
                e = (col - q) / ub[j, j]
                wb[:, j] = q
                err[:, j] = e
                wb[:, j + 1:].addr_(e, ub[j, j + 1:], alpha=-1.0)
            w[:, b0:b1] = wb
            w[:, b1:].addmm_(err, u[b0:b1, b1:], alpha=-1.0)
    finally:
        torch.set_num_threads(threads)
    return mask, w * mask


def prune_sparsegpt_(model: nn.Module, calibration=None, filter_fn: Optional[FilterFn] = None, *, damp: float = 0.01,
                     float_target: bool = True, progress: bool = True, report: Optional[dict] = None) -> nn.Module:
    """Replace the model's nn.Linear layers in place with 2:4 ``fastkern.SparseLinear``
    modules whose masks and kept weights were chosen on calibration data (the same
    sequential, float-target driver as ``quantize_gptq_``); returns model.

    A much better starting point than magnitude pruning for ``fastkern.finetune``.
    """
    from fastkern.nn import SparseLinear

    def check(fqn, m):
        if m.in_features % 4:
            raise ValueError("fastkern.prune_sparsegpt_: layer %r has in_features=%d, not divisible by 4 (2:4); "
                             "skip it with filter_fn" % (fqn, m.in_features))

    def solve(w, h):
        mask, wp = sparsegpt_prune_2_4(w, h, damp=damp)
        return mask, wp

    def make(linear, mask):
        return SparseLinear.from_linear(linear, pattern="2:4", mask=mask)

    return _calibrate(model, calibration, filter_fn, solve, make, damp=damp, float_target=float_target,
                      progress=progress, report=report, desc="fastkern sparsegpt", check=check,
                      fn_name="prune_sparsegpt_")
