"""Drop-in replacements for nn.Linear: QLinear (int8 / int4 weights, optional int8
activations) and SparseLinear (2:4 or block-sparse weights).

Each module keeps its weights in the canonical, device-independent format of
DESIGN.md §3 as buffers (that is what ``state_dict`` saves), and calls the ops of
fastkern.ops, which pick the backend for the input's device.
"""
import math
from typing import Optional, Tuple

import torch
from torch import nn

from fastkern import formats, ops
from fastkern.formats.int4 import check_group_size

_WEIGHT_DTYPES = ("int8", "int4")
_ACT_DTYPES = (None, "int8")


def _factory(device, dtype):
    return {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}


def _check_incoming(prefix, name, t, shape, dtype, errors):
    """Refuse a checkpoint tensor of the wrong shape or dtype, instead of casting it."""
    key = prefix + name
    if t is None:
        return
    want = "shape %s, dtype %s" % (list(shape), str(dtype).replace("torch.", "") if dtype is not None else "float")
    got = "shape %s, dtype %s" % (list(t.shape), str(t.dtype).replace("torch.", ""))
    ok_dtype = (t.is_floating_point() and t.dtype in ops.FLOAT_DTYPES) if dtype is None else t.dtype == dtype
    if list(t.shape) != list(shape) or not ok_dtype:
        errors.append("fastkern: state_dict entry %r has %s, expected %s" % (key, got, want))


# the overloads themselves (the packets would resolve them on every call)
_linear_w8a16 = ops.linear_w8a16.default
_linear_w8a8 = ops.linear_w8a8.default
_linear_w4a16 = ops.linear_w4a16.default
_linear_w4a8 = ops.linear_w4a8.default
_linear_sparse24 = ops.linear_sparse24.default
_linear_blocksparse = ops.linear_blocksparse.default


class _CanonicalLinear(nn.Module):
    """Shared plumbing: bias, float-buffer dtype handling, checked state_dict loading.

    forward reads the buffers from ``self._buffers`` directly. That finds what
    ``self.<name>`` finds: nn.Module keeps a name in one place only (instance dict,
    ``_parameters``, ``_buffers`` or ``_modules``; assigning a Parameter to a buffer's name
    moves it), and a name that is not a buffer (a bias set to None, a buffer replaced by a
    Parameter) falls back to the attribute.
    """

    # buffers whose float dtype is part of the format and survives .half()/.to(dtype)
    _fp32_buffers: Tuple[str, ...] = ()

    def _init_bias(self, bias, factory):
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, **factory))
        else:
            self.bias = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Scales stay fp32 when the module is cast to half precision: a bf16 scale
        # alone would add up to 0.4% error to every weight of its group.
        for name in self._fp32_buffers:
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def _expected(self):
        """name -> (shape, dtype or None for any float) of the canonical buffers."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        expected = self._expected()
        if self.bias is not None:
            expected["bias"] = ([self.out_features], None)
        errors = []
        for name, (shape, dtype) in expected.items():
            _check_incoming(prefix, name, state_dict.get(prefix + name), shape, dtype, errors)
        if errors:
            error_msgs.extend(errors)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class QLinear(_CanonicalLinear):
    """A Linear layer with int8 or int4 weights (and optionally dynamic int8 activations).

    Args:
        weight_dtype: "int8" (symmetric per output channel) or "int4" (group-wise,
            asymmetric, zero points in 0..15).
        act_dtype: None (activations stay float: W8A16 / W4A16) or "int8"
            (dynamic per-token int8 activations: W8A8 / W4A8).
        group_size: int4 group size along K (-1 for one group per row).
    Inputs of any leading shape [..., in_features] in fp32/fp16/bf16; the output has
    the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_dtype: str = "int8",
                 act_dtype: Optional[str] = None, group_size: int = 128, device=None, dtype=None):
        super().__init__()
        if weight_dtype not in _WEIGHT_DTYPES:
            raise ValueError("QLinear: weight_dtype must be 'int8' or 'int4', got %r" % (weight_dtype,))
        if act_dtype not in _ACT_DTYPES:
            raise ValueError("QLinear: act_dtype must be None or 'int8', got %r" % (act_dtype,))
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype, self.act_dtype = weight_dtype, act_dtype
        factory = _factory(device, dtype)
        if weight_dtype == "int8":
            self.group_size = None
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
            self.weight_zero = None
        else:
            if in_features % 2:
                raise ValueError("QLinear: int4 weights need an even in_features, got %d" % in_features)
            self.group_size = check_group_size(in_features, group_size, "QLinear(in_features=%d)" % in_features)
            groups = in_features // self.group_size
            self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
            self.register_buffer("weight_zero", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device))
        self._fp32_buffers = ("weight_scale",)
        self._init_bias(bias, factory)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_dtype: str = "int8", act_dtype: Optional[str] = None,
                    group_size: int = 128, method: str = "rtn", symmetric: bool = False) -> "QLinear":
        """Quantize a float Linear. method: "rtn" (round to nearest) or "search" (int4:
        per-group clipping search minimizing the reconstruction error)."""
        w = linear.weight.detach()
        if weight_dtype == "int8":
            if method != "rtn":
                raise ValueError("QLinear.from_linear: int8 weights support method='rtn' only, got %r" % (method,))
            q, scale = formats.quantize_int8(w)
            zero = None
        elif weight_dtype == "int4":
            group_size = check_group_size(w.shape[1], group_size, "Linear(in_features=%d)" % w.shape[1])
            if method == "rtn":
                q, scale, zero = formats.quantize_int4(w, group_size, symmetric=symmetric)
            elif method == "search":
                from fastkern.formats.int4_search import quantize_int4_search

                q, scale, zero = quantize_int4_search(w, group_size)
            else:
                raise ValueError("QLinear.from_linear: method must be 'rtn' or 'search' (use fastkern.quantize_ "
                                 "with method='gptq' for calibrated quantization), got %r" % (method,))
        else:
            raise ValueError("QLinear: weight_dtype must be 'int8' or 'int4', got %r" % (weight_dtype,))
        return cls.from_quantized(linear, weight=q, weight_scale=scale, weight_zero=zero, weight_dtype=weight_dtype,
                                  act_dtype=act_dtype, group_size=group_size)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, *, weight: torch.Tensor, weight_scale: torch.Tensor,
                       weight_zero: Optional[torch.Tensor] = None, weight_dtype: str, act_dtype: Optional[str] = None,
                       group_size: int = 128) -> "QLinear":
        """A QLinear holding already-quantized canonical tensors, with ``linear``'s shape and bias."""
        has_bias = linear.bias is not None
        fdtype = linear.weight.dtype if linear.weight.is_floating_point() else None
        mod = cls(linear.in_features, linear.out_features, has_bias, weight_dtype=weight_dtype, act_dtype=act_dtype,
                  group_size=group_size, device=linear.weight.device, dtype=fdtype)
        state = {"weight": weight, "weight_scale": weight_scale.float()}
        if weight_zero is not None:
            state["weight_zero"] = weight_zero
        if has_bias:
            state["bias"] = linear.bias.detach()
        mod.load_state_dict(state, strict=True)
        return mod

    def _expected(self):
        n, k = self.out_features, self.in_features
        if self.weight_dtype == "int8":
            return {"weight": ([n, k], torch.int8), "weight_scale": ([n], None)}
        g = k // self.group_size
        return {"weight": ([n, k // 2], torch.uint8), "weight_scale": ([n, g], None), "weight_zero": ([n, g], torch.uint8)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # buffers read from self._buffers (see _CanonicalLinear): `self.weight` would cost
        # ~0.5 us each, through nn.Module.__getattr__
        b = self._buffers
        w = b["weight"] if "weight" in b else self.weight
        scale = b["weight_scale"] if "weight_scale" in b else self.weight_scale
        bias = b["bias"] if "bias" in b else self.bias
        if self.weight_dtype == "int4":
            zero = b["weight_zero"] if "weight_zero" in b else self.weight_zero
            if self.act_dtype == "int8":
                return _linear_w4a8(x, w, scale, zero, self.group_size, bias)
            return _linear_w4a16(x, w, scale, zero, self.group_size, bias)
        if self.act_dtype == "int8":
            return _linear_w8a8(x, w, scale, bias)
        return _linear_w8a16(x, w, scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] this module computes with."""
        if self.weight_dtype == "int8":
            return formats.dequantize_int8(self.weight, self.weight_scale)
        return formats.dequantize_int4(self.weight, self.weight_scale, self.weight_zero, self.group_size)

    def extra_repr(self) -> str:
        s = "in_features=%d, out_features=%d, bias=%s, weight=%s" % (
            self.in_features, self.out_features, self.bias is not None, self.weight_dtype)
        if self.weight_dtype == "int4":
            s += ", group_size=%d" % self.group_size
        return s + ", act=%s" % (self.act_dtype or "float")


class SparseLinear(_CanonicalLinear):
    """A Linear layer with pruned weights: "2:4" (two of every four along K kept,
    compressed values + 2-bit indices) or "block" (non-empty (bn, bk) blocks only).

    Inputs of any leading shape [..., in_features] in fp32/fp16/bf16; the output has
    the input's dtype. Weights follow the module's dtype (``.half()`` etc.); an input
    of another float dtype uses a converted copy of the weights, cached.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, pattern: str = "2:4",
                 block_size=(16, 16), device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.pattern = in_features, out_features, pattern
        factory = _factory(device, dtype)
        if pattern == "2:4":
            if in_features % 4:
                raise ValueError("SparseLinear: 2:4 sparsity needs in_features divisible by 4, got %d" % in_features)
            self.block_size = None
            self.register_buffer("weight_values", torch.zeros(out_features, in_features // 2, **factory))
            # meta 0b0100: positions 0 and 1 kept, a valid pattern for an empty module
            self.register_buffer("weight_meta", torch.full((out_features, in_features // 4), 4, dtype=torch.uint8, device=device))
        elif pattern == "block":
            bn, bk = (int(b) for b in block_size)
            if bn <= 0 or bk <= 0:
                raise ValueError("SparseLinear: block_size must be positive, got %r" % (block_size,))
            self.block_size = (bn, bk)
            self.register_buffer("weight_blocks", torch.zeros(0, bn, bk, **factory))
            self.register_buffer("weight_row_ptr", torch.zeros(math.ceil(out_features / bn) + 1, dtype=torch.int64, device=device))
            self.register_buffer("weight_col_idx", torch.zeros(0, dtype=torch.int64, device=device))
        else:
            raise ValueError("SparseLinear: pattern must be '2:4' or 'block', got %r" % (pattern,))
        self._init_bias(bias, factory)
        self._cast_cache = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: str = "2:4", block_size=(16, 16), sparsity: float = 0.9,
                    mask: Optional[torch.Tensor] = None) -> "SparseLinear":
        """Prune a float Linear by magnitude (2:4), or by block L2 norm (block), unless ``mask`` is given."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, pattern=pattern,
                  block_size=block_size, device=w.device, dtype=w.dtype)
        if pattern == "2:4":
            values, meta = formats.compress_2_4(w, mask)
            state = {"weight_values": values, "weight_meta": meta}
        else:
            if mask is None:
                mask = formats.prune_blocks(w, mod.block_size, sparsity)
            blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, mod.block_size, mask)
            state = {"weight_blocks": blocks, "weight_row_ptr": row_ptr, "weight_col_idx": col_idx}
        if linear.bias is not None:
            state["bias"] = linear.bias.detach()
        mod.load_state_dict(state, strict=True)
        return mod

    def _expected(self):
        n, k = self.out_features, self.in_features
        if self.pattern == "2:4":
            return {"weight_values": ([n, k // 2], None), "weight_meta": ([n, k // 4], torch.uint8)}
        return {"weight_row_ptr": ([math.ceil(n / self.block_size[0]) + 1], torch.int64)}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if self.pattern == "block":
            # the number of non-empty blocks belongs to the checkpoint: take its shape
            blocks, col_idx = state_dict.get(prefix + "weight_blocks"), state_dict.get(prefix + "weight_col_idx")
            if blocks is not None and col_idx is not None:
                bn, bk = self.block_size
                if blocks.dim() != 3 or list(blocks.shape[1:]) != [bn, bk] or not blocks.is_floating_point():
                    error_msgs.append("fastkern: state_dict entry %r has shape %s dtype %s, expected [nnz_blocks, %d, %d] float"
                                      % (prefix + "weight_blocks", list(blocks.shape), blocks.dtype, bn, bk))
                    return
                if col_idx.dtype != torch.int64 or list(col_idx.shape) != [blocks.shape[0]]:
                    error_msgs.append("fastkern: state_dict entry %r has shape %s dtype %s, expected [%d] int64"
                                      % (prefix + "weight_col_idx", list(col_idx.shape), col_idx.dtype, blocks.shape[0]))
                    return
                self.weight_blocks = torch.empty_like(blocks, dtype=self.weight_blocks.dtype, device=self.weight_blocks.device)
                self.weight_col_idx = torch.empty_like(col_idx, device=self.weight_col_idx.device)
        self._cast_cache = {}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        self._cast_cache = {}
        return super()._apply(fn, recurse)

    def _weights_as(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.dtype == dtype:
            return t
        if torch.compiler.is_compiling():
            return t.to(dtype)
        key = (id(t), t._version, dtype)
        hit = self._cast_cache.get(key)
        if hit is None:
            self._cast_cache = {k: v for k, v in self._cast_cache.items() if k[0] == id(t) and k[1] == t._version}
            hit = self._cast_cache[key] = t.to(dtype)
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # see QLinear.forward
        bias = b["bias"] if "bias" in b else self.bias
        if self.pattern == "2:4":
            values = b["weight_values"] if "weight_values" in b else self.weight_values
            if values.dtype != x.dtype:
                values = self._weights_as(values, x.dtype)
            meta = b["weight_meta"] if "weight_meta" in b else self.weight_meta
            return _linear_sparse24(x, values, meta, bias)
        blocks = b["weight_blocks"] if "weight_blocks" in b else self.weight_blocks
        if blocks.dtype != x.dtype:
            blocks = self._weights_as(blocks, x.dtype)
        row_ptr = b["weight_row_ptr"] if "weight_row_ptr" in b else self.weight_row_ptr
        col_idx = b["weight_col_idx"] if "weight_col_idx" in b else self.weight_col_idx
        return _linear_blocksparse(x, blocks, row_ptr, col_idx, self.out_features, bias)

    def dense_weight(self) -> torch.Tensor:
        """The dense (pruned) weight [out_features, in_features] in the module's dtype."""
        if self.pattern == "2:4":
            return formats.decompress_2_4(self.weight_values, self.weight_meta)
        return formats.blocksparse_to_dense(self.weight_blocks, self.weight_row_ptr, self.weight_col_idx,
                                            (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        s = "in_features=%d, out_features=%d, bias=%s, pattern=%s" % (
            self.in_features, self.out_features, self.bias is not None, self.pattern)
        if self.pattern == "block":
            bn, bk = self.block_size
            total = math.ceil(self.out_features / bn) * math.ceil(self.in_features / bk)
            s += ", block_size=(%d, %d), density=%.3f" % (bn, bk, self.weight_blocks.shape[0] / max(total, 1))
        return s
