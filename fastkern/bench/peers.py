"""Peers (DESIGN.md §5): what PyTorch already offers for the same product.

Each peer is built from the same float weight as the fastkern op it is compared with.
A peer that cannot run a shape (or is missing from this torch build) raises
``PeerUnavailable`` with the reason; the harness reports the reason instead of a time.

CPU: F.linear fp32 and bf16, FBGEMM and oneDNN dynamic int8 (torch.ao dynamic Linear),
torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu (bf16 activations,
its fast path). GPU: cuBLAS fp16/bf16 (F.linear), torch._int_mm,
torch._weight_int4pack_mm, 2:4 semi-structured sparsity (cuSPARSELt / CUTLASS).
"""
import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from fastkern import formats
from fastkern.bench.impls import CopyPool, Impl
from fastkern.bench.inputs import clone_args, make_activation, tensor_bytes
from fastkern.bench.shapes import DEFAULT_PARAMS, DTYPE_NAMES


class PeerUnavailable(Exception):
    """This peer cannot run here (its reason is the message)."""


LINEAR_FAMILY = ("linear_w8a16", "linear_w8a8", "linear_w4a16", "linear_w4a8", "linear_sparse24", "linear_blocksparse",
                 "int8_gemm")
QUANT_FAMILY = ("linear_w8a16", "linear_w8a8", "linear_w4a16", "linear_w4a8")


@dataclass
class PeerSpec:
    name: str
    short: str
    device: str
    ops: Tuple[str, ...]  # the fastkern ops it is compared with
    act_dtype: torch.dtype
    build: Callable[[torch.Tensor], tuple]  # w fp32 [N, K] on the device -> state (one weight copy)
    call: Callable[[torch.Tensor, tuple], torch.Tensor]
    clone: Optional[Callable[[tuple], tuple]] = clone_args  # None: build again for each copy
    weight_bytes: Optional[Callable[[tuple], int]] = None
    applies: Optional[Callable[[int, int, int, str], Optional[str]]] = None  # (n, k, m, device) -> reason or None

    def pool(self, w: torch.Tensor) -> CopyPool:
        return CopyPool(lambda: self.build(w), self.clone)

    def impl(self, w: torch.Tensor, m: int, device="cpu", seed: int = 1, pool: Optional[CopyPool] = None) -> Impl:
        n, k = w.shape
        reason = self.applies(n, k, m, device) if self.applies else None
        if reason:
            raise PeerUnavailable(reason)
        pool = pool or self.pool(w)
        pool.get(0)  # build now: an unavailable peer fails here, before anything is timed
        return Impl(
            name=self.name,
            short=self.short,
            kind="peer",
            dtype=DTYPE_NAMES[self.act_dtype],
            x=make_activation(m, k, self.act_dtype, seed, device),
            pool=pool,
            call=self.call,
            flops=2 * m * n * k,
            weight_bytes=self.weight_bytes or tensor_bytes,
        )


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _quant_engine(name):
    old = torch.backends.quantized.engine
    if name not in torch.backends.quantized.supported_engines:
        raise PeerUnavailable("quantized engine %r is not in this torch build" % name)
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def _needs(cond, reason):
    if not cond:
        raise PeerUnavailable(reason)


def _int4_scales_and_zeros(w, group_size):
    """torch's int4pack ops dequantize as (q - 8) * scale + zero with [K/g, N, 2] bf16 (scale, zero)
    tables; fastkern's (q - z) * s is the same with zero = (8 - z) * s."""
    packed, scale, zero = formats.quantize_int4(w, group_size)
    sz = torch.stack([scale, (8.0 - zero.float()) * scale], dim=-1).transpose(0, 1).contiguous()
    return packed, sz.to(torch.bfloat16)


# ---------------------------------------------------------------- CPU peers


def _linear_build(dtype):
    def build(w):
        return (w.to(dtype).contiguous(),)

    return build


def _linear_call(x, state):
    return F.linear(x, state[0])


def _dynamic_int8_build(engine):
    """torch.ao's dynamic int8 Linear with its weight packed by quantized engine ``engine``
    (fbgemm: FBGEMM's AVX2 / AVX-512 kernels; onednn: oneDNN's, AMX where the CPU has it)."""

    def build(w):
        n, k = w.shape
        q, s = formats.quantize_int8(w)
        with _quant_engine(engine), warnings.catch_warnings():
            # torch marks its quantized tensor types deprecated; they are still the API of this peer
            warnings.simplefilter("ignore")
            import torch.ao.nn.quantized.dynamic as nnqd

            qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(n, dtype=torch.long), 0)
            lin = nnqd.Linear(k, n, bias_=False, dtype=torch.qint8)
            lin.set_weight_bias(qw, None)
        return (lin, n * k + 8 * n)  # int8 weight + per-channel scale and column offsets

    return build


def _dynamic_int8_call(x, state):
    return state[0](x)


def _int8pack_build(w):
    _needs(hasattr(torch, "_weight_int8pack_mm"), "torch._weight_int8pack_mm is not in this torch")
    q, s = formats.quantize_int8(w)
    return (q, s.to(torch.bfloat16))


def _int8pack_call(x, state):
    return torch._weight_int8pack_mm(x, state[0], state[1])


def _int4pack_cpu_build(w):
    _needs(hasattr(torch, "_weight_int4pack_mm_for_cpu"), "torch._weight_int4pack_mm_for_cpu is not in this torch")
    gs = DEFAULT_PARAMS["group_size"]
    n, k = w.shape
    _needs(k % gs == 0, "K=%d is not a multiple of group_size=%d" % (k, gs))
    packed, sz = _int4_scales_and_zeros(w, gs)
    q = formats.unpack_int4(packed).to(torch.int32)
    # innerKTiles is ignored by the CPU packing; 1 satisfies its argument check for any K
    return (torch._convert_weight_to_int4pack_for_cpu(q, 1), sz)


def _int4pack_cpu_call(x, state):
    return torch._weight_int4pack_mm_for_cpu(x, state[0], DEFAULT_PARAMS["group_size"], state[1])


def _int_mm_build(w):
    _needs(hasattr(torch, "_int_mm"), "torch._int_mm is not in this torch")
    q, _ = formats.quantize_int8(w)
    return (q,)


def _int_mm_applies(n, k, m, device):
    if device == "cuda" and m <= 16:
        return "torch._int_mm on CUDA needs M > 16, got M=%d" % m
    if device == "cuda" and (k % 8 or n % 8):
        return "torch._int_mm on CUDA needs N and K multiples of 8, got N=%d K=%d" % (n, k)
    return None


def _int_mm_call(x, state):
    # [K, N] column-major view of the [N, K] weight, the layout cuBLASLt int8 wants
    return torch._int_mm(x, state[0].t())


CPU_PEERS = [
    PeerSpec("F.linear fp32", "fp32", "cpu", ("gemm",) + LINEAR_FAMILY, torch.float32,
             _linear_build(torch.float32), _linear_call),
    PeerSpec("F.linear bf16", "bf16", "cpu", ("gemm",) + LINEAR_FAMILY, torch.bfloat16,
             _linear_build(torch.bfloat16), _linear_call),
    PeerSpec("FBGEMM dynamic int8", "fbgemm", "cpu", ("int8_gemm",) + QUANT_FAMILY, torch.float32,
             _dynamic_int8_build("fbgemm"), _dynamic_int8_call, clone=None, weight_bytes=lambda st: st[1]),
    # the same module packed for oneDNN, which multiplies on AMX tiles where the CPU has them
    # (Intel Xeon from Sapphire Rapids): the peer of fastkern's amx path, W8A8 only
    PeerSpec("oneDNN dynamic int8", "onednn", "cpu", ("int8_gemm", "linear_w8a8"), torch.float32,
             _dynamic_int8_build("onednn"), _dynamic_int8_call, clone=None, weight_bytes=lambda st: st[1]),
    PeerSpec("torch int8pack (bf16)", "int8pack", "cpu", QUANT_FAMILY, torch.bfloat16,
             _int8pack_build, _int8pack_call),
    PeerSpec("torch int4pack (bf16)", "int4pack", "cpu", ("linear_w4a16", "linear_w4a8"), torch.bfloat16,
             _int4pack_cpu_build, _int4pack_cpu_call),
]
# torch._int_mm also runs on CPU, but through a generic loop (seconds for one 4096x4096 M=64 product):
# it is no contender there, and would dominate the run time.

# ---------------------------------------------------------------- GPU peers
# Written for CUDA builds of torch on sm80+; every failure becomes a reported reason.


def _int4pack_cuda_build(w):
    _needs(hasattr(torch, "_weight_int4pack_mm"), "torch._weight_int4pack_mm is not in this torch")
    gs = DEFAULT_PARAMS["group_size"]
    n, k = w.shape
    inner_k_tiles = 8
    _needs(k % (inner_k_tiles * 16) == 0, "torch int4pack needs K divisible by %d, got K=%d" % (inner_k_tiles * 16, k))
    _needs(n % 8 == 0, "torch int4pack needs N divisible by 8, got N=%d" % n)
    packed, sz = _int4_scales_and_zeros(w, gs)
    # the CUDA packing reads two values per byte high nibble first; fastkern's canonical is low first
    swapped = ((packed & 0xF) << 4) | (packed >> 4)
    return (torch._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles), sz)


def _int4pack_cuda_call(x, state):
    return torch._weight_int4pack_mm(x, state[0], DEFAULT_PARAMS["group_size"], state[1])


def _semi_structured_build(w):
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError as e:
        raise PeerUnavailable("torch.sparse.to_sparse_semi_structured is missing (%s)" % e) from None
    _needs(torch.cuda.get_device_capability(w.device) >= (8, 0), "2:4 semi-structured sparsity needs sm80+")
    dense = (w * formats.prune_2_4(w)).to(torch.float16)
    try:
        ws = to_sparse_semi_structured(dense)
    except Exception as e:  # shape or arch limits of cuSPARSELt/CUTLASS
        raise PeerUnavailable("to_sparse_semi_structured failed: %s" % str(e).splitlines()[0]) from None
    packed = getattr(ws, "packed", None)
    meta = getattr(ws, "meta", None)
    nbytes = tensor_bytes(packed, meta) or dense.numel() * dense.element_size() * 9 // 16
    return (ws, nbytes)


def _semi_structured_call(x, state):
    return F.linear(x, state[0])


GPU_PEERS = [
    PeerSpec("cuBLAS fp16", "fp16", "cuda", ("gemm",) + LINEAR_FAMILY, torch.float16,
             _linear_build(torch.float16), _linear_call),
    PeerSpec("cuBLAS bf16", "bf16", "cuda", ("gemm",) + LINEAR_FAMILY, torch.bfloat16,
             _linear_build(torch.bfloat16), _linear_call),
    PeerSpec("torch._int_mm", "_int_mm", "cuda", ("int8_gemm", "linear_w8a8"), torch.int8,
             _int_mm_build, _int_mm_call, applies=_int_mm_applies),
    PeerSpec("torch int4pack (bf16)", "int4pack", "cuda", ("linear_w4a16", "linear_w4a8"), torch.bfloat16,
             _int4pack_cuda_build, _int4pack_cuda_call),
    PeerSpec("2:4 semi-structured fp16", "cusparselt", "cuda", ("linear_sparse24",), torch.float16,
             _semi_structured_build, _semi_structured_call, clone=None, weight_bytes=lambda st: st[1]),
]


def peers_for(op: str, device: str, names=None):
    """The peers compared with ``op`` on ``device`` (optionally only those whose name/short is in ``names``)."""
    table = GPU_PEERS if device == "cuda" else CPU_PEERS
    out = [p for p in table if op in p.ops]
    if names:
        wanted = {s.strip().lower() for s in names}
        out = [p for p in out if p.short.lower() in wanted or p.name.lower() in wanted]
    return out


def all_peers(device: str):
    return list(GPU_PEERS if device == "cuda" else CPU_PEERS)
