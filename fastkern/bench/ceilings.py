"""The machine's own ceilings, measured in the same run as the kernels.

- streaming read bandwidth: a reduction over an array many times the last-level
  cache, with all of torch's threads (CPU) or on the GPU; on CPU also fastkern's
  own vector-load loop (fastkern._C.read_bw), and the ceiling is the faster of the
  two (a kernel's %BW is measured against the best read rate this machine showed);
- peak dense matmul throughput: a large torch matmul (fp32 on CPU; fp16, bf16 and
  int8 on GPU);
- the CPU's fp32 FMA peak, measured with register-only FMA loops on every thread
  (fastkern._C.fma_peak, on the active kernel path), and for reference an estimate
  from the clock and vector width when the clock can be read;
- for the ceilings of DESIGN §6's CPU targets (targets.ceiling_rows): the int8
  multiply-accumulate rates of the exact int16 AVX2 mix, of FBGEMM's u8 x s8 mix and, on
  the AVX-512 VNNI and avx2vnni paths, of vpdpbusd (fastkern._C.int8_peak), and fastkern's W4A16 M=1 rate
  with its weight in the
  last-level cache (its compute rate, w4a16_compute_gbs).
"""
import glob
import os
import re
import subprocess
from typing import Optional

import torch

from fastkern.bench.shapes import DTYPES
from fastkern.bench.timing import Rotator, meminfo_bytes, time_rotator


def _parse_size(text: str) -> Optional[int]:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)(i?B)?", text.strip(), re.I)
    if not m:
        return None
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def cpu_llc_bytes() -> int:
    """Size of the last-level cache seen by cpu0 (sysfs, then lscpu; 32 MiB if neither answers)."""
    best_level, best = -1, None
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and size and level > best_level:
            best_level, best = level, size
    if best:
        return best
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for key in ("L3 cache", "L2 cache"):
            for line in out.splitlines():
                if line.startswith(key):
                    size = _parse_size(line.split(":", 1)[1])
                    if size:
                        return size
    except (OSError, subprocess.SubprocessError):
        pass
    return 32 << 20


def gpu_l2_bytes(device=None) -> int:
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


def llc_bytes(device: str) -> int:
    return gpu_l2_bytes() if device == "cuda" else cpu_llc_bytes()


def sum_probe(device: str, nbytes: int) -> Rotator:
    """A pure streaming read to time: ``sum`` over a float32 array of ``nbytes``."""
    a = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    return Rotator(lambda x, c: x.sum(), a, [()])


def probe_gbs(probe: Rotator, ms: float) -> float:
    """GB/s of one call of ``probe`` that took ``ms``."""
    return probe.x.numel() * probe.x.element_size() / (ms * 1e-3) / 1e9


def read_bandwidth(device: str, nbytes: int, min_run_time: float) -> float:
    """GB/s of ``sum`` over a float32 array of ``nbytes`` (a pure streaming read)."""
    probe = sum_probe(device, nbytes)
    return probe_gbs(probe, time_rotator(probe, device, min_run_time).ms)


def _native_probe(name: str):
    """(fastkern._C's probe ``name``, None), or (None, why it is not there)."""
    try:
        from fastkern import _ext
    except ImportError as e:
        return None, "fastkern._C did not load (%s)" % e
    if _ext._C is None or not hasattr(_ext._C, name):
        return None, "fastkern._C is not built"
    return getattr(_ext._C, name), None


def native_read_bandwidth(nbytes: int):
    """(GB/s, note) of fastkern._C.read_bw (vector loads on every torch thread), or (None, why)."""
    probe, why = _native_probe("read_bw")
    if probe is None:
        return None, why
    r = probe(int(nbytes), 5)
    return r["gbs"], "vector loads, %s path, %d threads" % (r["isa"], r["threads"])


def matmul_peak(device: str, n: int, dtype: torch.dtype, min_run_time: float) -> float:
    """GFLOP/s of an n x n x n torch matmul."""
    if dtype == torch.int8:
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)

        def fn(x, c):
            return torch._int_mm(x, b.t())
    else:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)

        def fn(x, c):
            return torch.mm(x, b)

    t = time_rotator(Rotator(fn, a, [()]), device, min_run_time)
    return 2 * n**3 / (t.ms * 1e-3) / 1e9


def _cpuinfo():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def fma_peak_estimate():
    """(GFLOP/s, note) from the clock in /proc/cpuinfo x fp32 FMA lanes per cycle, or (None, why)."""
    info = _cpuinfo()
    try:
        mhz = float(info.get("cpu MHz", ""))
    except ValueError:
        return None, "the CPU clock is not readable from /proc/cpuinfo"
    flags = set(info.get("flags", "").split())
    family = int(info.get("cpu family", "0") or 0)
    model = int(info.get("model", "0") or 0)
    vendor = info.get("vendor_id", "")
    if "avx512f" in flags:
        per_cycle, why = 64, "AVX-512: 2 FMA units x 16 lanes x 2 flops"
    elif "avx2" in flags and "fma" in flags:
        if vendor == "AuthenticAMD" and family == 0x17 and model < 0x30:
            per_cycle, why = 16, "Zen1 (family 17h model %d): 256-bit FMA at half rate, 8 lanes x 2 flops" % model
        else:
            per_cycle, why = 32, "AVX2: 2 FMA units x 8 lanes x 2 flops"
    elif "sse2" in flags:
        per_cycle, why = 8, "SSE: 2 units x 4 lanes (mul+add)"
    else:
        return None, "unknown vector ISA"
    cores = torch.get_num_threads()
    gflops = mhz * 1e-3 * cores * per_cycle
    note = "%.0f MHz x %d threads x %d flop/cycle (%s; cpuinfo's family/model under a hypervisor may not be the real core)" % (
        mhz, cores, per_cycle, why)
    return gflops, note


def fma_peak_measured(min_run_time: float):
    """(GFLOP/s, note) of register-only fp32 FMA loops on every torch thread, or (None, why)."""
    probe, why = _native_probe("fma_peak")
    if probe is None:
        return None, why
    r = probe(max(0.1, min_run_time))
    return r["gflops"], "register-only FMA loops, %s path, %d threads" % (r["isa"], r["threads"])


def int8_peak_measured(min_run_time: float):
    """({exact_gmacs, u8s8_gmacs, vnni_gmacs, amx_gmacs, threads}, note) of fastkern._C.int8_peak, or (None, why)."""
    probe, why = _native_probe("int8_peak")
    if probe is None:
        return None, why
    r = probe(max(0.1, min_run_time))
    if not r["exact_gmacs"]:
        return None, "this CPU has no AVX2"
    vnni = "" if not r.get("vnni_gmacs") else " and AVX-VNNI" if r.get("isa") == "avx2vnni" else " and AVX-512 VNNI"
    if r.get("amx_gmacs"):
        vnni += " and AMX tile"
    return dict(r), "register-only AVX2%s loops, %d threads" % (vnni, r["threads"])


def remeasure_peaks(ceilings: dict, results: list, min_run_time: float) -> None:
    """The register-only peaks (fp32 FMA, int8) measured again at the end of a CPU run. Another
    tenant of a shared host can only lower such a probe, never raise it, so the larger reading
    of each stands (the start's is kept as ``*_start`` when the end's is larger): a low start
    reading put every row ceiling built on it below what the kernels then reached. Entries'
    ``pct_fma`` follow a raised FMA peak."""
    fma, _ = fma_peak_measured(min_run_time)
    if fma and ceilings.get("fma_peak_gflops") and fma > ceilings["fma_peak_gflops"]:
        ceilings["fma_peak_gflops_start"] = ceilings["fma_peak_gflops"]
        ceilings["fma_peak_gflops"] = fma
        for e in results:
            if e.get("pct_fma") is not None:
                e["pct_fma"] = 100.0 * e["gflops"] / fma
    old = ceilings.get("int8_peak")
    i8, _ = int8_peak_measured(min_run_time) if old else (None, None)
    if i8:
        merged = dict(old)
        for k in ("exact_gmacs", "u8s8_gmacs", "vnni_gmacs", "amx_gmacs"):
            if (i8.get(k) or 0) > (old.get(k) or 0):
                merged[k] = i8[k]
        if merged != old:
            ceilings["int8_peak_start"] = old
            ceilings["int8_peak"] = merged


W4A16_PROBE = (4096, 4096, 128)  # N, K, group size


def w4a16_compute_gbs(min_run_time: float, dtype: str = "fp32"):
    """(GB/s, note) of fastkern's W4A16 at M=1 with `dtype` activations on a weight that stays
    in the last-level cache (one copy, re-read every call; N x K x g = W4A16_PROBE), counting
    the bytes as the harness does (weight, scales, zero points, x and y): the rate the kernel
    computes at when memory is not what bounds it, so the most %BW it can reach. (None, why)
    where fastkern's CPU kernels are not built."""
    probe, why = _native_probe("cpu_isa")
    if probe is None:
        return None, why
    from fastkern.bench.inputs import tensor_bytes

    n, k, g = W4A16_PROBE
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    s = torch.rand(n, k // g, generator=gen) * 0.01
    z = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen)
    x = torch.randn(1, k, generator=gen).to(DTYPES[dtype])
    op = torch.ops.fastkern_C.linear_w4a16

    def fn(xx, c):
        return op(xx, w, s, z, g, None)

    # best of three: other tenants of a shared host use the same cache and cores
    ms = min(time_rotator(Rotator(fn, x, [()]), "cpu", min_run_time).ms for _ in range(3))
    nbytes = tensor_bytes(w, s, z, x, fn(x, None))
    return nbytes / (ms * 1e-3) / 1e9, "%dx%d g%d M=1 %s, %s path, weight in the LLC" % (n, k, g, dtype, probe())


def cpu_probe_bytes(llc: int) -> int:
    """The CPU bandwidth probe's array (kept for the whole run, which times it in every problem):
    16 x the LLC, at least 256 MiB, but no more than a tenth of the machine's memory where the
    LLC is huge (480 MiB: 16 x that took a third of a 23 GB host), and never under 2 x the
    LLC, which a streaming read cannot keep in cache."""
    want = max(256 << 20, 16 * llc)
    total = meminfo_bytes("MemTotal")
    if total is None:
        return want
    return int(min(want, max(2 * llc, total // 10)))


def measure_ceilings(device: str, *, bw_bytes: Optional[int] = None, peak_n: Optional[int] = None,
                     min_run_time: float = 0.3) -> dict:
    """Ceilings for the % columns: read_bw_gbs and matmul_gflops[dtype] (+ llc_bytes, FMA estimate)."""
    llc = llc_bytes(device)
    if bw_bytes is None:
        bw_bytes = cpu_probe_bytes(llc) if device == "cpu" else max(1 << 30, 32 * llc)
    c = {"device": device, "llc_bytes": llc, "threads": torch.get_num_threads(), "bw_array_bytes": int(bw_bytes)}
    c["read_bw_gbs"] = c["read_bw_gbs_sum"] = read_bandwidth(device, bw_bytes, min_run_time)
    if device == "cpu":
        native, c["read_bw_native_note"] = native_read_bandwidth(bw_bytes)
        c["read_bw_gbs_native"] = native
        if native:
            c["read_bw_gbs"] = max(c["read_bw_gbs"], native)
    peaks = {}
    if device == "cuda":
        n = peak_n or 8192
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("int8", torch.int8)):
            try:
                peaks[name] = matmul_peak(device, n, dt, min_run_time)
            except Exception as e:  # e.g. int8 matmul missing on an older arch
                c.setdefault("errors", {})["matmul_" + name] = str(e).splitlines()[0]
        c["matmul_n"] = n
    else:
        n = peak_n or 2048
        peaks["fp32"] = matmul_peak(device, n, torch.float32, min_run_time)
        c["matmul_n"] = n
        est, note = fma_peak_estimate()
        c["fma_peak_gflops_est"] = est
        c["fma_peak_note"] = note
        c["fma_peak_gflops"], c["fma_peak_measured_note"] = fma_peak_measured(min_run_time)
        isa, _ = _native_probe("cpu_isa")
        c["cpu_isa"] = isa() if isa else None
        c["int8_peak"], c["int8_peak_note"] = int8_peak_measured(min_run_time)
        c["w4a16_compute_gbs"], c["w4a16_compute_note"] = w4a16_compute_gbs(min_run_time)
        # the half-precision GEMV does less work per weight (two limbs instead of three)
        c["w4a16_compute_gbs_bf16"], _ = w4a16_compute_gbs(min_run_time, "bf16")
    c["matmul_gflops"] = peaks
    return c


def compute_ceiling(ceilings: dict, op: str, dtype: str) -> Optional[float]:
    """The matmul peak an op's work is measured against (GFLOP/s)."""
    peaks = ceilings.get("matmul_gflops", {})
    if ceilings.get("device") == "cuda":
        if op in ("int8_gemm", "linear_w8a8") or dtype == "int8":
            return peaks.get("int8") or peaks.get("fp16")
        return peaks.get(dtype) or peaks.get("fp16")
    return peaks.get("fp32")
