"""Timing: median of many runs after warm-up, rotating among weight copies.

CPU: torch.utils.benchmark.Timer.blocked_autorange with all of torch's threads
(its default is one thread). GPU: triton.testing.do_bench (CUDA events, L2 flushed
between runs), or plain CUDA events when triton is missing.

The callable handed to the timer cycles through several copies of the weights whose
total size exceeds the last-level cache, so a memory-bound kernel is timed reading
DRAM (as it would inside a model, where every layer has its own weights), not cache.

``time_interleaved`` times several implementations of one problem in rounds
(A B C, C B A, A B C, ...) and pools each one's samples, so a change of the machine's
state during the run (a shared host's memory bandwidth can switch between regimes
within minutes) falls on every implementation alike instead of skewing their ratios.
"""
import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Sequence

import torch

# a rotation set is at least this many times the last-level cache
LLC_FACTOR = 4
# never more than this much memory in copies of one weight (unless 2 copies need more)
MAX_ROTATION_BYTES = 2 << 30


# the weight copies of one problem (every implementation timed in it) together take at most
# this share of the machine's memory (and half of what is available when it is prepared)
ROTATION_MEMORY_SHARE = 0.3


def copies_needed(copy_bytes: int, llc_bytes: int, max_copies: int = 64,
                  max_bytes: int = MAX_ROTATION_BYTES) -> int:
    """Copies whose total is >= LLC_FACTOR x the LLC, within max_bytes; at least 2, so no call
    re-reads the previous call's weights."""
    if copy_bytes <= 0:
        return 2
    want = math.ceil(LLC_FACTOR * llc_bytes / copy_bytes)
    cap = max(2, min(MAX_ROTATION_BYTES, max_bytes) // copy_bytes)
    return int(max(2, min(want, cap, max_copies)))


def meminfo_bytes(key: str) -> Optional[int]:
    """A size field of /proc/meminfo (MemTotal, MemAvailable, ...) in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes() -> Optional[int]:
    """What the copies may take: ROTATION_MEMORY_SHARE of MemTotal, at most half of
    MemAvailable (Linux /proc/meminfo), or None where unknown."""
    total, avail = meminfo_bytes("MemTotal"), meminfo_bytes("MemAvailable")
    if total is None or avail is None:
        return None
    return int(min(ROTATION_MEMORY_SHARE * total, 0.5 * avail))


def rotation_cap(implementations: int, device: str) -> int:
    """Bytes of weight copies each of ``implementations`` timed together may hold: on the CPU,
    available_memory_bytes() split among them (a CPU with an LLC of hundreds of MB would
    otherwise ask for LLC_FACTOR x that per implementation, more than the machine has), and
    never more than MAX_ROTATION_BYTES."""
    avail = available_memory_bytes() if device == "cpu" else None
    if avail is None:
        return MAX_ROTATION_BYTES
    return int(min(MAX_ROTATION_BYTES, avail / max(1, implementations)))


class Rotator:
    """Calls ``fn(x, copies[i])`` with i cycling over the copies."""

    def __init__(self, fn: Callable, x: torch.Tensor, copies: List[tuple],
                 context: Callable[[], ContextManager] = contextlib.nullcontext):
        self.fn, self.x, self.copies = fn, x, copies
        self.context = context  # entered around every timed stretch (e.g. fastkern.use_backend)
        self.i = 0

    def __call__(self):
        c = self.copies[self.i]
        self.i = (self.i + 1) % len(self.copies)
        return self.fn(self.x, c)


@dataclass
class Timing:
    ms: float  # median
    iqr_ms: float
    runs: int  # timed calls
    method: str


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def warmup(rot: Rotator, device: str) -> float:
    """One call per copy (first-use costs: lazy init, page faults, layout caches); returns the last, in s."""
    last = 0.0
    for _ in range(len(rot.copies)):
        _sync(device)
        t0 = time.perf_counter()
        rot()
        _sync(device)
        last = time.perf_counter() - t0
    return last


def _single_calls(rot: Rotator, device: str, calls: int) -> List[float]:
    """Seconds of ``calls`` calls timed one by one (calls too long to batch)."""
    times = []
    for _ in range(calls):
        _sync(device)
        t0 = time.perf_counter()
        rot()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _time_slow(rot: Rotator, device: str, calls: int) -> Timing:
    # a call longer than the whole measurement budget: a few single calls, median of them
    return _summary(_single_calls(rot, device, calls), "perf_counter")


def time_cpu(rot: Rotator, min_run_time: float) -> Timing:
    return time_interleaved([rot], "cpu", min_run_time, rounds=1)[0]


def time_cuda(rot: Rotator, min_run_time: float) -> Timing:
    per_call = warmup(rot, "cuda")
    if per_call >= min_run_time:
        return _time_slow(rot, "cuda", 3)
    rep_ms = max(1.0, min_run_time * 1e3)
    try:
        from triton.testing import do_bench

        ms = do_bench(rot, warmup=max(1.0, rep_ms / 4), rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        q1, med, q3 = ms
        runs = max(1, int(rep_ms / max(med, 1e-3)))
        return Timing(med, q3 - q1, runs, "triton.testing.do_bench")
    except ImportError:
        pass
    # CUDA events, one pair per call
    n = max(5, min(1000, int(min_run_time / max(per_call, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        rot()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    q = statistics.quantiles(times, n=4)
    return Timing(statistics.median(times), q[2] - q[0], n, "cuda events")


def time_rotator(rot: Rotator, device: str, min_run_time: float) -> Timing:
    return time_cuda(rot, min_run_time) if device == "cuda" else time_cpu(rot, min_run_time)


def _summary(samples: List[float], method: str) -> Timing:
    """Median and IQR of per-call times in seconds."""
    med = statistics.median(samples)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(med * 1e3, (q[2] - q[0]) * 1e3, len(samples), method)


def _round_samples(rot: Rotator, device: str, budget: float, per_call: float, slow_calls: int) -> tuple:
    """Per-call times (s) of one timed stretch of about ``budget`` seconds, and the timer used."""
    if per_call >= budget:
        return _single_calls(rot, device, slow_calls), "perf_counter"
    if device == "cuda":
        t = time_cuda(rot, budget)
        return [t.ms * 1e-3], t.method
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="f()", globals={"f": rot}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=budget)
    return list(m.times), "torch.utils.benchmark"


def time_interleaved(rots: Sequence[Rotator], device: str, min_run_time: float, rounds: int = 3,
                     on_error: Optional[Callable[[int, BaseException], None]] = None) -> List[Optional[Timing]]:
    """Time every rotator for about ``min_run_time`` seconds in all, split into ``rounds``
    stretches taken in turn (forward, then backward, ...). Returns one Timing per rotator (median
    and IQR over all its samples), or None for one whose call raised (reported via ``on_error``;
    without it the exception propagates)."""
    rounds = max(1, int(rounds))
    budget = min_run_time / rounds
    slow_calls = max(1, math.ceil(3 / rounds))  # calls longer than a stretch: >= 3 in all
    alive = list(range(len(rots)))
    per_call = {}
    samples = {i: [] for i in alive}
    methods = {}

    def guarded(i, fn):
        try:
            with rots[i].context():
                return fn()
        except Exception as e:  # one failing implementation does not stop the others
            if on_error is None:
                raise
            on_error(i, e)
            alive.remove(i)
            return None

    for i in list(alive):
        t = guarded(i, lambda: warmup(rots[i], device))
        if t is not None:
            per_call[i] = t
    for r in range(rounds):
        order = list(alive) if r % 2 == 0 else list(reversed(alive))
        for i in order:
            got = guarded(i, lambda: _round_samples(rots[i], device, budget, per_call[i], slow_calls))
            if got is not None:
                samples[i].extend(got[0])
                methods[i] = got[1]
    out: List[Optional[Timing]] = []
    for i in range(len(rots)):
        if i in alive and samples[i]:
            t = _summary(samples[i], methods[i])
            if rounds > 1:
                t.method += ", %d interleaved rounds" % rounds
            out.append(t)
        else:
            out.append(None)
    return out
