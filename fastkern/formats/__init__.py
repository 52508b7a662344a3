"""Canonical weight and activation formats (DESIGN.md §3): pure tensor math, no kernels.

Nothing here imports the rest of fastkern; the modules, the op references and the
tests all build on these functions.
"""
from fastkern.formats.int8 import dequantize_int8, quantize_int8, quantize_per_token
from fastkern.formats.int4 import (
    dequantize_int4,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from fastkern.formats.sparse import (
    blocksparse_to_dense,
    compress_2_4,
    decompress_2_4,
    dense_to_blocksparse,
    prune_2_4,
    prune_blocks,
    prune_magnitude,
)

__all__ = [
    "quantize_int8",
    "dequantize_int8",
    "quantize_per_token",
    "quantize_int4",
    "dequantize_int4",
    "pack_int4",
    "unpack_int4",
    "prune_magnitude",
    "prune_2_4",
    "compress_2_4",
    "decompress_2_4",
    "prune_blocks",
    "dense_to_blocksparse",
    "blocksparse_to_dense",
]
