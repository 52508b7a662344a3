"""fastkern.info(): what was built and what this machine offers."""
import platform

import torch

from fastkern import _ext
from fastkern.version import __version__


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info_dict() -> dict:
    """Version, build and run-time facts as a dict (the harness stores it with results)."""
    from fastkern import ops

    d = {
        "fastkern": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": torch.get_num_threads(),
        "native_extension": _ext._C is not None,
        "native_extension_error": _ext.LOAD_ERROR,
    }
    if _ext._C is not None:
        b = _ext._C.build_info()
        d["built_against_torch"] = b["torch_version"]
        d["compiler"] = b["compiler"]
        d["cxx_runtime_problem"] = _ext.CXX_RUNTIME_PROBLEM
        d["built_with_cuda"] = b["with_cuda"]
        d["cuda_archs"] = b["cuda_archs"].split(";") if b["cuda_archs"] else []
        d["cpu_features"] = [k for k, v in _ext._C.cpu_features().items() if v]
        d["cpu_isa"] = _ext._C.cpu_isa()
        d["cpu_l1d"] = dict(_ext._C.cpu_l1d())
    try:
        import triton

        d["triton"] = triton.__version__
    except ImportError:
        d["triton"] = None
    d["cuda_available"] = torch.cuda.is_available()
    if d["cuda_available"]:
        d["gpu"] = torch.cuda.get_device_name()
        d["gpu_capability"] = "%d.%d" % torch.cuda.get_device_capability()
    backends = {}
    for op in ops.OPS:
        backends[op] = {}
        for dev in ["cpu"] + (["cuda"] if d["cuda_available"] else []):
            for be in ("cpu", "cuda", "triton", "reference"):
                reason = ops.backend_status(op, be, torch.device(dev))
                if reason is None:
                    backends[op].setdefault(dev, []).append(be)
    d["backends"] = backends
    return d


def info(file=None) -> dict:
    """Print which backends were built, for which CUDA archs, and the CPU features found; return them."""
    d = info_dict()
    lines = ["fastkern %s (torch %s, python %s)" % (d["fastkern"], d["torch"], d["python"])]
    if d["native_extension"]:
        lines.append("native extension: built against torch %s with %s" % (d["built_against_torch"], d["compiler"]))
        if d["cxx_runtime_problem"]:
            lines.append("WARNING: " + d["cxx_runtime_problem"])
        lines.append("CUDA kernels: %s" % ("archs " + ", ".join(d["cuda_archs"]) if d["built_with_cuda"] else "not built"))
        l1 = d["cpu_l1d"]
        lines.append("CPU: %s, %d threads; features: %s; kernel path: %s; L1d %d KiB %d-way"
                     % (d["cpu_model"], d["cpu_count"], " ".join(d["cpu_features"]) or "baseline", d["cpu_isa"],
                        l1["ways"] * l1["sets"] * l1["line"] // 1024, l1["ways"]))
    else:
        lines.append("native extension: NOT available (%s); reference backend only" % d["native_extension_error"])
        lines.append("CPU: %s, %d threads" % (d["cpu_model"], d["cpu_count"]))
    lines.append("triton: %s" % (d["triton"] or "not installed"))
    lines.append("GPU: %s" % (("%s (sm %s)" % (d["gpu"], d["gpu_capability"])) if d["cuda_available"] else "none visible"))
    lines.append("backends per op (device: backends, best first):")
    for op, per_dev in d["backends"].items():
        lines.append("  %-20s %s" % (op, "; ".join("%s: %s" % (dev, ", ".join(b)) for dev, b in per_dev.items())))
    print("\n".join(lines), file=file)
    return d
