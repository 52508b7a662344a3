"""quantize_ and sparsify_: swap a model's nn.Linear modules in place."""
from typing import Callable, Optional

from torch import nn

from fastkern.nn import QLinear, SparseLinear

FilterFn = Callable[[nn.Module, str], bool]


def _swap(model: nn.Module, make: Callable[[nn.Linear, str], nn.Module], filter_fn: Optional[FilterFn]) -> nn.Module:
    """Replace every plain nn.Linear accepted by filter_fn(module, fqn) with make(linear, fqn)."""
    if type(model) is nn.Linear:
        raise TypeError("fastkern: the model itself is an nn.Linear, which cannot be replaced in place; "
                        "use QLinear.from_linear / SparseLinear.from_linear instead")
    targets = [(fqn, m) for fqn, m in model.named_modules()
               if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, fqn))]
    for fqn, linear in targets:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(linear, fqn))
    return model


def _conversion_error(fqn, err):
    return type(err)("fastkern: cannot convert layer %r: %s (pass filter_fn to skip it)" % (fqn, err))


def quantize_(model: nn.Module, weight_dtype: str = "int8", act_dtype: Optional[str] = None, group_size: int = 128,
              filter_fn: Optional[FilterFn] = None, method: str = "rtn", calibration=None,
              symmetric: bool = False) -> nn.Module:
    """Quantize the model's nn.Linear layers in place and return the model.

    weight_dtype "int8" (per-channel) or "int4" (group-wise, ``group_size``);
    act_dtype "int8" for dynamic int8 activations (W8A8, or W4A8 with int4 weights). method: "rtn" (round to
    nearest), "search" (int4, data-free per-group clipping search) or "gptq" (int4,
    calibrated on ``calibration``: model inputs, see fastkern.calibrate).
    filter_fn(module, fqn) -> bool picks the layers (default: all nn.Linear).
    """
    if method == "gptq":
        if weight_dtype != "int4" or act_dtype is not None:
            raise ValueError("fastkern.quantize_: method='gptq' is for int4 weights (W4A16)")
        if calibration is None:
            raise ValueError("fastkern.quantize_: method='gptq' needs calibration inputs (calibration=...)")
        from fastkern.calibrate import quantize_gptq_

        return quantize_gptq_(model, group_size=group_size, calibration=calibration, filter_fn=filter_fn)

    def make(linear, fqn):
        try:
            return QLinear.from_linear(linear, weight_dtype=weight_dtype, act_dtype=act_dtype, group_size=group_size,
                                       method=method, symmetric=symmetric)
        except ValueError as e:
            raise _conversion_error(fqn, e) from e

    return _swap(model, make, filter_fn)


def sparsify_(model: nn.Module, pattern: str = "2:4", filter_fn: Optional[FilterFn] = None, block_size=(16, 16),
              sparsity: float = 0.9) -> nn.Module:
    """Prune the model's nn.Linear layers in place into SparseLinear ("2:4" or "block") and return the model."""

    def make(linear, fqn):
        try:
            return SparseLinear.from_linear(linear, pattern=pattern, block_size=block_size, sparsity=sparsity)
        except ValueError as e:
            raise _conversion_error(fqn, e) from e

    return _swap(model, make, filter_fn)
