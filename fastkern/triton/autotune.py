"""Launch configurations for the Triton kernels, tuned once per (device, shape bucket).

Each kernel family owns a ``Tuner`` built from three functions of a shape key:
``candidates(key)`` (the search space, as Triton's matmul tutorial builds it),
``default(key)`` (a sensible GPU config, used when tuning is switched off) and
``interpret(key)`` (one small fixed config for the CPU interpreter, where timing
means nothing and every extra config multiplies the test time).

Tuning is off under ``TRITON_INTERPRET=1`` and with ``FASTKERN_TRITON_AUTOTUNE=0``.
When on, the first call for a key times every candidate with
``triton.testing.do_bench`` and stores the winner in a JSON file
(``FASTKERN_TRITON_CACHE`` or ``~/.cache/fastkern/triton_autotune.json``), keyed by
the device name, so later processes on the same kind of GPU start tuned.
Triton's own ``@triton.autotune`` keeps its choice only in memory (or in a cache
keyed by the kernel's source hash); fastkern wants the choice to survive a process
and be inspectable, hence this small replacement.
"""
import contextlib
import json
import os
import tempfile
import threading

import torch

_lock = threading.Lock()
_disk = None  # the JSON cache, loaded on first use
_memory = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("FASTKERN_TRITON_AUTOTUNE", "1") != "0"


def cache_path() -> str:
    return os.environ.get("FASTKERN_TRITON_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastkern", "triton_autotune.json"
    )


def bucket_m(m: int) -> int:
    """Rows are bucketed to powers of two: activations vary per call, weights do not."""
    b = 1
    while b < m and b < 8192:
        b *= 2
    return b


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def _load_disk():
    global _disk
    if _disk is None:
        try:
            with open(cache_path()) as f:
                _disk = json.load(f)
        except (OSError, ValueError):
            _disk = {}
    return _disk


def _save_disk(key, cfg):
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # merge with what another process may have written meanwhile, then swap atomically
        try:
            with open(path) as f:
                current = json.load(f)
        except (OSError, ValueError):
            current = {}
        current[key] = cfg
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".triton_autotune.")
        with os.fdopen(fd, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-tuning in the next process


class Tuner:
    def __init__(self, name, candidates, default, interpret):
        self.name = name
        self.candidates = candidates
        self.default = default
        self.interpret = interpret
        self._forced = None

    @contextlib.contextmanager
    def force(self, cfg):
        """Use ``cfg`` for every call inside the block (tests check each candidate this way)."""
        prev, self._forced = self._forced, dict(cfg)
        try:
            yield
        finally:
            self._forced = prev

    def config(self, key, device: torch.device, launch):
        """The config for ``key``; ``launch(cfg)`` runs the kernel once (used for timing)."""
        if self._forced is not None:
            return dict(self._forced)
        if interpreting() or device.type != "cuda":
            return dict(self.interpret(key))
        if not autotune_enabled():
            return dict(self.default(key))
        full = "%s|%s|%s" % (self.name, _device_name(device), "|".join(str(k) for k in key))
        with _lock:
            cfg = _memory.get(full) or _load_disk().get(full)
        if cfg is not None:
            _memory[full] = cfg
            return dict(cfg)
        cfg = self._tune(key, launch)
        with _lock:
            _memory[full] = cfg
            _load_disk()[full] = cfg
            _save_disk(full, cfg)
        return dict(cfg)

    def _tune(self, key, launch):
        import triton.testing

        best, best_ms = None, float("inf")
        for cfg in self.candidates(key):
            try:
                ms = triton.testing.do_bench(lambda: launch(dict(cfg)), warmup=5, rep=20)
            except Exception:  # a config that does not fit (shared memory, registers) is skipped
                continue
            if ms < best_ms:
                best, best_ms = dict(cfg), ms
        return best if best is not None else dict(self.default(key))


def launch_options(cfg):
    """Split a config into kernel meta-parameters and launch options."""
    cfg = dict(cfg)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    return cfg, opts
