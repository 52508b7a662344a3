"""int4 family: linear_w4a16 (group-wise int4 weights, float activations) and
linear_w4a8 (the same weights, dynamic per-token int8 activations).

The canonical format is consumed as is (uint8 [N, K/2], low nibble first; scales and
zeros [N, K/group]): unpacking happens in registers, so there is no derived layout
to cache. A GPU layout that interleaves nibbles for wider loads would be an
optimisation on top (see bench/results/triton_gpu_todo.md).
"""
from fastkern.ops import register_kernel
from fastkern.triton._w4a8 import w4a8_linear
from fastkern.triton._weightonly import weightonly_linear


@register_kernel("linear_w4a16", "triton")
def linear_w4a16(x, w, scales, zeros, group_size, bias):
    return weightonly_linear(x, w, scales, zeros, group_size, bias, bits=4)


@register_kernel("linear_w4a8", "triton")
def linear_w4a8(x, w, scales, zeros, group_size, bias):
    # x is quantized by fastkern.triton.int8.quantize_per_token, as linear_w8a8 does
    return w4a8_linear(x, w, scales, zeros, group_size, bias)
