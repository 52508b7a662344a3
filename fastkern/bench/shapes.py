"""The shape sets the harness times (DESIGN.md §5).

A ``Case`` is one fastkern op at one problem size and activation dtype. The CLI,
the pytest-benchmark suite in ``bench/`` and the tests all take their cases from
here, so the sizes they time cannot drift apart.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Llama-7B attention/MLP projections and Llama-3-8B's MLP down-projection input width.
LLAMA_SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (4096, 11008), (4096, 14336))
GPU_SHAPES: Tuple[Tuple[int, int], ...] = ((8192, 8192), (28672, 8192), (8192, 28672)) + LLAMA_SHAPES
CPU_M: Tuple[int, ...] = (1, 16, 64, 256)
GPU_M: Tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
QUICK_M: Tuple[int, ...] = (1, 64)

# ops that compute x @ W.T for a weight in some format; gemm is timed as a square problem
LINEAR_OPS = ("int8_gemm", "linear_w8a16", "linear_w8a8", "linear_w4a16", "linear_w4a8", "linear_sparse24",
              "linear_blocksparse")
ALL_OPS = ("gemm",) + LINEAR_OPS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

DEFAULT_PARAMS = {
    "group_size": 128,  # int4 groups along K
    "block_size": (16, 16),  # block-sparse (bn, bk)
    "sparsity": 0.9,  # block-sparse fraction of empty blocks
}


@dataclass(frozen=True)
class Case:
    """One op at one size: ``x [m, k] @ W[n, k].T`` (gemm: ``a [m, k] @ b[n, k].T``)."""

    op: str
    n: int
    k: int
    m: int
    dtype: str = "fp32"  # activation dtype name (int8_gemm always runs int8 x int8)
    params: Tuple[Tuple[str, object], ...] = field(default_factory=tuple)

    def param(self, name):
        return dict(self.params).get(name, DEFAULT_PARAMS.get(name))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_key(self) -> Tuple[int, int, int]:
        return (self.n, self.k, self.m)

    @property
    def label(self) -> str:
        return "%s N=%d K=%d M=%d %s" % (self.op, self.n, self.k, self.m, self.dtype)

    @property
    def group(self) -> str:
        """pytest-benchmark group: one op at one shape, all implementations side by side."""
        return "%s N=%d K=%d M=%d" % (self.op, self.n, self.k, self.m)


def resolve_ops(names: Optional[Sequence[str]]) -> List[str]:
    """Op names from user input; ``w4a16`` is accepted for ``linear_w4a16``."""
    if not names:
        return list(ALL_OPS)
    out = []
    for raw in names:
        for name in str(raw).split(","):
            name = name.strip()
            if not name:
                continue
            if name not in ALL_OPS and ("linear_" + name) in ALL_OPS:
                name = "linear_" + name
            if name not in ALL_OPS:
                raise ValueError("unknown op %r; expected one of %s" % (name, ", ".join(ALL_OPS)))
            if name not in out:
                out.append(name)
    return out


def default_dtypes(op: str, device: str) -> Tuple[str, ...]:
    """Activation dtypes timed by default: the targets name fp32 on CPU (and bf16 for W4A16), fp16 on GPU."""
    if device == "cuda":
        return ("fp16",)
    if op == "linear_w4a16":
        return ("fp32", "bf16")
    return ("fp32",)


def _linear_cases(ops, shapes, ms, device, dtypes) -> List[Case]:
    cases = []
    for op in ops:
        if op == "gemm":
            continue
        for n, k in shapes:
            for m in ms:
                for dt in (dtypes or default_dtypes(op, device)):
                    cases.append(Case(op, n, k, m, "int8" if op == "int8_gemm" else dt))
    return _dedup(cases)


def _gemm_cases(ops, sizes, device, dtypes) -> List[Case]:
    if "gemm" not in ops:
        return []
    return _dedup([Case("gemm", s, s, s, dt) for s in sizes for dt in (dtypes or default_dtypes("gemm", device))])


def _dedup(cases):
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def full_cases(ops=None, device="cpu", dtypes=None) -> List[Case]:
    """DESIGN §5: Llama shapes x M in {1,16,64,256} on CPU; 8192-wide, M up to 4096 on GPU; gemm 2048^3 (GPU 8192^3 too)."""
    ops = resolve_ops(ops)
    if device == "cuda":
        return _gemm_cases(ops, (4096, 8192), device, dtypes) + _linear_cases(ops, GPU_SHAPES, GPU_M, device, dtypes)
    return _gemm_cases(ops, (2048,), device, dtypes) + _linear_cases(ops, LLAMA_SHAPES, CPU_M, device, dtypes)


def quick_cases(ops=None, device="cpu", dtypes=None) -> List[Case]:
    """About a minute on 2 cores: one Llama shape per op at M in {1, 64}, plus the W4A16 target shape at M=1
    (and W4A8 there too)."""
    ops = resolve_ops(ops)
    if device == "cuda":
        cases = _gemm_cases(ops, (4096,), device, dtypes) + _linear_cases(ops, ((8192, 8192),), QUICK_M, device, dtypes)
    else:
        cases = _gemm_cases(ops, (1024,), device, dtypes) + _linear_cases(ops, ((4096, 4096),), QUICK_M, device, dtypes)
        wide = [op for op in ("linear_w4a16", "linear_w4a8") if op in ops]
        if wide:
            cases += _linear_cases(wide, ((4096, 14336),), (1,), device, dtypes)
    return _dedup(cases)


def custom_cases(ops, shapes: Sequence[Tuple[int, int]], ms: Sequence[int], device="cpu", dtypes=None) -> List[Case]:
    """Cases for user-given (N, K) pairs and M values; gemm runs as M x K by N x K."""
    ops = resolve_ops(ops)
    cases = []
    for op in ops:
        for n, k in shapes:
            for m in ms:
                for dt in (dtypes or default_dtypes(op, device)):
                    cases.append(Case(op, n, k, m, "int8" if op == "int8_gemm" else dt))
    return _dedup(cases)


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """'4096x4096,11008x4096' -> [(4096, 4096), (11008, 4096)] (N x K)."""
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n, k = part.split("x")
            out.append((int(n), int(k)))
        except ValueError:
            raise ValueError("shape %r is not of the form NxK (e.g. 4096x11008)" % part) from None
    return out


def parse_ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError("expected a comma-separated list of integers, got %r" % text) from None


def group_by_weight(cases: Sequence[Case]) -> Dict[Tuple[int, int], List[Case]]:
    """Cases sharing one (N, K) weight, in first-seen order (one random weight per group)."""
    groups: Dict[Tuple[int, int], List[Case]] = {}
    for c in cases:
        groups.setdefault((c.n, c.k), []).append(c)
    return groups
