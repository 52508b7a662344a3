"""linear_w4a16 on every backend against the reference.

The CPU kernel has a GEMV path up to m = 32 (fp32 x) / 40 (fp16/bf16 x) with AVX-512
VNNI, 16 on AVX2 without it: activations quantized per group to three int8 limbs (base 128) for
fp32, two for fp16/bf16, byte dot products against the nibbles combined exactly in
int32 by Horner's rule, zero point folded out; chunks of 64 / 128 weights with
partial chunks for group sizes that are not multiples of them, spans of at most 8
chunks, K blocks, MR x NR tiles of activation and weight rows. With AVX512-BF16 a
second GEMV takes bf16 dot products against the nibbles converted to bf16 (one bf16
operand for bf16 x, two exact ones for fp16 x) when FASTKERN_W4A16_BF16_GEMV=1: the
`gemv` parameter covers both on such CPUs. Larger m: the fp32 GEMM over exactly
dequantized ((q - z) * s) weight slivers, skinny_gemm up to m = 256, blocked_gemm above
(FASTKERN_SKINNY_MAX_M moves the switch; both drivers are tested). The tests reach every path, their tails,
every ISA path this CPU runs, and check that the thread count does not change a
single bit. On AVX2 (no VNNI) groups of a multiple of 64, and g = 32 in pairs, take a
GEMV that sums the byte products in int16 over spans of up to 4 chunks
(FASTKERN_W4A16_AVX2_SPAN16=0 keeps the per-row tile for them; both are tested). fp32 x at
3 <= m <= 32 with groups of a multiple of 16 takes dequantizing fp32 FMA tiles there instead
(and bf16 / fp16 x at 17..32; test_avx2_fp32_tiles; FASTKERN_W4A16_TILE_MAX_M=0 keeps the limbs, as the limb tests do).
"""
import pytest
import torch

import fastkern
from fastkern import formats, ops
from fastkern._ext import _C

from conftest import (FLOAT_DTYPES, has_bf16_dot, M_SIZES, assert_close_rel, backends_for, cpu_isa, cpu_isas, isa_skip_reason,
                      num_threads, on_1_and_2_threads, assert_nonfinite_as_reference)
from test_ops_int8 import make_x

NATIVE = pytest.mark.skipif(_C is None, reason="fastkern._C is not built")
OP = "linear_w4a16"
HAS_BF16_DOT = has_bf16_dot()
BF16_DOT = pytest.mark.skipif(not HAS_BF16_DOT, reason="this CPU lacks AVX512-BF16 (bf16 dot-product GEMV)")
GEMV_VARIANTS = [pytest.param("limbs", id="limbs"),
                 pytest.param("bf16dot", id="bf16dot", marks=BF16_DOT)]


def set_gemv(monkeypatch, isa, variant):
    """Select the GEMV variant for bf16/fp16 activations; bf16dot exists on the avx512 path only."""
    if variant == "bf16dot" and isa != "avx512":
        pytest.skip("the bf16 dot-product GEMV is part of the avx512 path")
    monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV", "1" if variant == "bf16dot" else "0")


def make_w4(gen, n, k, group_size, symmetric=False, scale_dtype=torch.float32):
    w, s, z = formats.quantize_int4(torch.randn(n, k, generator=gen), group_size, symmetric=symmetric)
    return w, s.to(scale_dtype), z


def native(*args):
    return torch.ops.fastkern_C.linear_w4a16(*args)


def check(out, x, w, s, z, g, b, dtype=torch.float32):
    assert out.shape == (*x.shape[:-1], w.shape[0])
    assert_close_rel(out, ops.linear_w4a16_ref(x, w, s, z, g, b), dtype)


def matrix(op=OP):
    """Full product on the native CPU backend; one rotation per m on the others (reference,
    triton under the interpreter: slow, and tested in depth elsewhere)."""
    layouts = ("2d", "3d", "noncontig")
    out = []
    for bp in backends_for(op):
        be = bp.values[0]
        for i, m in enumerate(M_SIZES):
            for dtype in FLOAT_DTYPES:
                for layout in layouts:
                    for bias in (False, True):
                        if be != "cpu" and (FLOAT_DTYPES[i % 3], layouts[i % 3], bool(i % 2)) != (dtype, layout, bias):
                            continue
                        out.append(pytest.param(be, m, dtype, layout, bias, marks=bp.marks,
                                                id="%s-m%d-%s-%s-%s" % (be, m, str(dtype)[6:], layout,
                                                                        "bias" if bias else "nobias")))
    return out


# ----------------------------------------------------------------- against the reference, every backend


@pytest.mark.parametrize("be,m,dtype,layout,bias", matrix())
@pytest.mark.parametrize("n,k,g", [(37, 256, 32), (19, 384, 128), (21, 96, 96), (13, 240, 48)],
                         ids=["g32", "g128", "gK", "g48"])
def test_w4a16_matches_reference(be, m, dtype, layout, bias, n, k, g, gen):
    if be != "cpu" and g != 128 and m != 17:
        pytest.skip("other group sizes are covered at m=17 on this backend")
    x = make_x(gen, m, k, dtype, layout)
    w, s, z = make_w4(gen, n, k, g)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    with fastkern.use_backend(be):
        out = torch.ops.fastkern.linear_w4a16(x, w, s, z, g, b)
    check(out, x, w, s, z, g, b, dtype)


# ----------------------------------------------------------------- CPU paths, tails, threads


def check_native_case(gen, m, n, k, g, dtype, outs, refs, **w4_kw):
    """One native call on fresh random x and weights against the reference: a loose check per
    case (a single output can sit near zero, where fp32 summation orders differ by more than
    1e-5 relative), the outputs kept for the caller's check of the fp32 contract over all."""
    x = torch.randn(m, k, generator=gen).to(dtype)
    w, s, z = make_w4(gen, n, k, g, **w4_kw)
    out = native(x, w, s, z, g, None)
    ref = ops.linear_w4a16_ref(x, w, s, z, g, None)
    assert_close_rel(out, ref, dtype, factor=100 if dtype == torch.float32 else 1)
    outs.append(out.flatten())
    refs.append(ref.flatten())


@NATIVE
@pytest.mark.parametrize("gemv", GEMV_VARIANTS)
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32, 33, 40, 41, 256, 257])
def test_cpu_paths_and_tails(isa, dtype, m, gemv, gen, monkeypatch):
    if gemv == "bf16dot" and (dtype == torch.float32 or m > 16):
        pytest.skip("the bf16 dot-product GEMV serves bf16/fp16 x at m <= 16")
    if isa == "generic" and m in (32, 33, 40, 41, 256):
        pytest.skip("the generic path has no GEMV; m = 17, 257 cover its GEMM drivers")
    set_gemv(monkeypatch, isa, gemv)
    # odd m: the limb GEMVs in K blocks (FASTKERN_W4A16_WHOLE_K_KB=0); even m: K whole while
    # the limbs fit the default 768 KiB
    if m % 2:
        monkeypatch.setenv("FASTKERN_W4A16_WHOLE_K_KB", "0")
    # limb GEMV up to m = 32 (fp32) / 40 (bf16) with VNNI (8 for g < 64), 16 on AVX2 without (m = 17 the
    # GEMM there; fp32 x with g % 16 == 0 takes the FMA tiles from m = 6 with AVX-512, 3 to 32 on
    # AVX2); the GEMM: skinny_gemm to m = 256, blocked_gemm at 257
    # (limb MR x NR tiles: AVX-512 (1,1) (2,2) (3,2)
    # (4,2), AVX2 (1,2) (2,1) (3,1), so m = 5, 7, 17, 33, 41 leave every row tail; from m = 17
    # passes of several weight rows and K blocks of a few groups). bf16dot: (1,4) (2,2) (3,1) (4,1) (4,2). n 1..9: tails of the
    # 4-row units and NR tiles; group sizes 2..62 give partial 64- and 128-weight chunks;
    # g = 192 / 550 several chunks with a partial last one; k = 1100 (g = 550) spans three
    # 512-column panels with a group across them; the last row's tail is the tensor's end.
    # A single output can sit near zero (cancellation), where any two fp32 summation
    # orders differ by more than 1e-5 relative: each case gets a loose check that still
    # catches a wrong tile, and all cases together the fp32 contract.
    outs, refs = [], []
    with cpu_isa(isa):
        for n in (1, 2, 3, 5, 9):
            for k, g in ((2, 2), (6, 6), (30, 30), (32, 32), (34, 34), (62, 62), (64, 32), (96, 48), (120, 40),
                         (384, 192), (1100, 550), (1100, 1100)):
                check_native_case(gen, m, n, k, g, dtype, outs, refs)
    assert_close_rel(torch.cat(outs), torch.cat(refs), dtype)


@NATIVE
@pytest.mark.parametrize("gemv", GEMV_VARIANTS)
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 40, 100])
def test_cpu_threads_bitwise_identical(isa, dtype, m, gemv, gen, monkeypatch):
    if gemv == "bf16dot" and (dtype == torch.float32 or m > 16):
        pytest.skip("the bf16 dot-product GEMV serves bf16/fp16 x at m <= 16")
    set_gemv(monkeypatch, isa, gemv)
    n, k, g = 301, 1024, 128
    x = torch.randn(m, k, generator=gen).to(dtype)
    w, s, z = make_w4(gen, n, k, g)
    outs = []
    with cpu_isa(isa):
        for t in (1, 2):
            with num_threads(t):
                outs.append(native(x, w, s, z, g, None))
    assert torch.equal(outs[0], outs[1])



@NATIVE
@pytest.mark.parametrize("rows", [pytest.param("rows", id="rows"), pytest.param("one", id="one_row"),
                                  pytest.param("four", id="four_rows"), pytest.param("tile", id="tile")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_avx512_m1_rows_kernel(rows, dtype, gen, monkeypatch):
    # AVX-512 VNNI, m = 1, g <= 128 (one chunk per group): a thread's rows of a K block in one
    # call, w4l_rows1_avx512 (one weight row at a time, two groups per step; odd group counts
    # leave a single group) or, where a block's limbs take 16 KiB or more, w4l_rows4_avx512
    # (four weight rows per step, the n % 4 rows of a thread's range by w4l_rows1_avx512);
    # masked loads for g < 128. "one": FASTKERN_W4A16_MULTIROW_KB past every case (one row at a
    # time); "four": FASTKERN_W4A16_MULTIROW_KB=0 (four rows wherever n >= 4); "tile":
    # FASTKERN_W4A16_ROWS512=0, the per-row tiles. Group sizes 2..128 (partial chunks, groups
    # across 64-byte lines), n tails of the 4-row units, k = 12800 (several K blocks with
    # FASTKERN_W4A16_WHOLE_K_KB=0; windows with FASTKERN_W4A16_WINDOW_KB=1; one K block by
    # default: i = 11; fp32 limbs of 37.5 KiB, so four rows at a time by default), the last
    # row's bytes the tensor's end. Against the reference; 1 and 2 threads bitwise equal.
    why = isa_skip_reason("avx512")
    if why:
        pytest.skip(why)
    monkeypatch.setenv("FASTKERN_W4A16_ROWS512", "0" if rows == "tile" else "1")
    if rows in ("one", "four"):
        monkeypatch.setenv("FASTKERN_W4A16_MULTIROW_KB", "0" if rows == "four" else "100000")
    outs, refs = [], []
    with cpu_isa("avx512"):
        for i, (n, k, g) in enumerate(((1, 2, 2), (3, 6, 2), (5, 96, 32), (9, 126, 42), (2, 384, 128), (7, 512, 128),
                                       (13, 640, 64), (6, 700, 50), (33, 1152, 96), (11, 4224, 128),
                                       (37, 12800, 128), (10, 12800, 64), (9, 12800, 100))):
            x = torch.randn(1, k, generator=gen).to(dtype)
            w, s, z = make_w4(gen, n, k, g, symmetric=bool(i % 2))
            if k == 12800 and i != 11:
                monkeypatch.setenv("FASTKERN_W4A16_WINDOW_KB", str((i // 2) % 2))
                monkeypatch.setenv("FASTKERN_W4A16_WHOLE_K_KB", "0")
            one, two = on_1_and_2_threads(native, x, w, s, z, g, None)
            monkeypatch.delenv("FASTKERN_W4A16_WINDOW_KB", raising=False)
            monkeypatch.delenv("FASTKERN_W4A16_WHOLE_K_KB", raising=False)
            assert torch.equal(one, two), (n, k, g)
            ref = ops.linear_w4a16_ref(x, w, s, z, g, None)
            assert_close_rel(two, ref, dtype, factor=100 if dtype == torch.float32 else 1)
            outs.append(two.flatten())
            refs.append(ref.flatten())
    assert_close_rel(torch.cat(outs), torch.cat(refs), dtype)


@NATIVE
@pytest.mark.parametrize("m", [6, 7, 8, 9, 13, 17, 24, 41, 64, 65])
def test_avx512_fp32_tiles(m, gen, monkeypatch):
    # AVX-512, fp32 x, 6 <= m <= 64, g % 16 == 0: the dequantizing FMA tiles (4 rows of x x
    # 4 weight rows, passes of 3 or 4 rows: 7 = 4 + 3, 9 = 3 + 3 + 3, 13 = 4 + 3 + 3 + 3),
    # single-row tiles for the n % 4 rows, one 16-weight table per row and group (g = 16, 48:
    # odd multiples of 16), x permuted per 16 columns. Against the reference (the same
    # dequantized fp32 weights), 1 and 2 threads bitwise equal; FASTKERN_W4A16_TILE_MAX_M=0
    # (the limbs, or from m = 33 the GEMM) within the contract too. m = 65: past the tiles.
    # bf16 / fp16 x take the tiles above the limbs' range (m = 41, 64 with VNNI).
    why = isa_skip_reason("avx512")
    if why:
        pytest.skip(why)
    outs, refs = [], []
    with cpu_isa("avx512"):
        for n, k, g in TILE_CASES:
            x = torch.randn(m, k, generator=gen)
            w, s, z = make_w4(gen, n, k, g)
            ref = ops.linear_w4a16_ref(x, w, s, z, g, None)
            check_tile_threads(x, w, s, z, g, ref, outs, refs)
            check_without_tiles(x, w, s, z, g, ref, monkeypatch)
            monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMM_MIN_M", "0")  # bf16 x: the tiles, not the bf16 GEMM
            check_tiles_half(x, w, s, z, g)
    assert_close_rel(torch.cat(outs), torch.cat(refs), torch.float32)


# (n, k, g) of the FMA tile tests: n tails of the weight-row tiles, g = 16 / 48 odd multiples of
# 16, several groups per row, K = 4096
TILE_CASES = ((1, 16, 16), (3, 96, 48), (5, 256, 32), (9, 384, 128), (70, 1024, 128), (13, 4096, 64))


def check_tile_threads(x, w, s, z, g, ref, outs, refs):
    """fp32 x: 1 and 2 threads bitwise equal and within the contract (collected for the total)."""
    one, two = on_1_and_2_threads(native, x, w, s, z, g, None)
    assert torch.equal(one, two), (w.shape, g)
    assert_close_rel(two, ref, torch.float32, factor=100)
    outs.append(two.flatten())
    refs.append(ref.flatten())


def check_without_tiles(x, w, s, z, g, ref, monkeypatch):
    """FASTKERN_W4A16_TILE_MAX_M=0: the path before the tiles, within the contract too."""
    monkeypatch.setenv("FASTKERN_W4A16_TILE_MAX_M", "0")
    assert_close_rel(native(x, w, s, z, g, None), ref, torch.float32, factor=100)
    monkeypatch.delenv("FASTKERN_W4A16_TILE_MAX_M")


def check_tiles_half(x, w, s, z, g):
    """bf16 / fp16 x: 1 and 2 threads bitwise equal and within the half-precision contract."""
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        one, two = on_1_and_2_threads(native, xh, w, s, z, g, None)
        assert torch.equal(one, two), (w.shape, g, dtype)
        assert_close_rel(two, ops.linear_w4a16_ref(xh, w, s, z, g, None), dtype)


@NATIVE
@pytest.mark.parametrize("isa", ["avx2", "avx2vnni"])
@pytest.mark.parametrize("m", [3, 4, 5, 7, 8, 9, 13, 16, 17, 32, 33])
def test_avx2_fp32_tiles(isa, m, gen, monkeypatch):
    # AVX2 (and AVX2 + AVX-VNNI, which runs the same W4A16 code), fp32 x, 3 <= m <= 32,
    # g % 16 == 0: the dequantizing FMA tiles (4 rows of x x 2 weight rows, passes of at most
    # 4 rows spread evenly: 5 = 3 + 2, 7 = 4 + 3, 9 = 3 + 3 + 3, 13 = 4 + 3 + 3 + 3), a
    # single-row tile for an odd n, 16 weights per 8-byte load (g = 16, 48: odd multiples of
    # 16), x permuted per 16 columns into padded rows; the group scale once per group (the
    # default where |x| <= 1e30) and per weight (FASTKERN_W4A16_AVX2_TILE_FOLD=0, and the
    # path of x holding NaN / inf / huge values: test_nan_and_inf, test_huge_activations_every_path
    # at m = 8). Against the reference, 1 and 2 threads bitwise equal; FASTKERN_W4A16_TILE_MAX_M=0 (the
    # limbs to m = 16, the GEMM above) within the contract too; m = 33 is past the tiles (the
    # GEMM), and FASTKERN_W4A16_TILE_MAX_M=64 takes it to them. bf16 / fp16 x: the limbs to
    # m = 16, the tiles at 17 and 32.
    why = isa_skip_reason(isa)
    if why:
        pytest.skip(why)
    outs, refs = [], []
    with cpu_isa(isa):
        for n, k, g in TILE_CASES:
            x = torch.randn(m, k, generator=gen)
            w, s, z = make_w4(gen, n, k, g, symmetric=n % 2 == 0)
            ref = ops.linear_w4a16_ref(x, w, s, z, g, None)
            for top in (None, "64") if m > 32 else (None,):
                if top:
                    monkeypatch.setenv("FASTKERN_W4A16_TILE_MAX_M", top)
                for fold in ("1", "0"):  # the group scale once per group / per weight
                    monkeypatch.setenv("FASTKERN_W4A16_AVX2_TILE_FOLD", fold)
                    check_tile_threads(x, w, s, z, g, ref, outs, refs)
                monkeypatch.delenv("FASTKERN_W4A16_AVX2_TILE_FOLD")
            check_without_tiles(x, w, s, z, g, ref, monkeypatch)
            check_tiles_half(x, w, s, z, g)
    assert_close_rel(torch.cat(outs), torch.cat(refs), torch.float32)


AVX2 = pytest.mark.skipif(_C is not None and isa_skip_reason("avx2") is not None,
                          reason="this CPU cannot run the avx2 path")
SPAN16 = [pytest.param("1", id="span16"), pytest.param("0", id="tile")]
# group sizes of the AVX2 int16-span GEMV (g % 64 == 0): 1, 2, 3, 4 chunks of 64 per span
# (g = 64..256), several spans per group (320: 5 x 1, 384: 2 x 3, 512: 2 x 4, 640: 5 x 2)
# g = 32: groups in pairs per 64-weight chunk where K % 64 == 0 (96: the tile's fallback)
SPAN16_CASES = [(64, 64), (128, 128), (192, 192), (256, 256), (640, 320), (768, 384), (1024, 512), (1280, 640),
                (384, 64), (1536, 128), (64, 32), (256, 32), (96, 32), (1088, 32)]


@NATIVE
@AVX2
@pytest.mark.parametrize("span16", SPAN16 + [pytest.param("2", id="span16_two_rows")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_avx2_gemv_groups_of_64(span16, dtype, gen, monkeypatch):
    # The AVX2 GEMV for g % 64 == 0 (span16: int16 span sums, one call per thread and K
    # block for all rows at m = 1, one x row per call in 4-row passes above, g = 32 pairs in
    # tiles of 1..3 x rows; tile: the
    # older per-row tile, FASTKERN_W4A16_AVX2_SPAN16=0) on every group layout above, every
    # m remainder of the 3-row tiles and 4-row passes (m = 1..7, 16, 17, 47, 48, 64 and 65,
    # above the AVX2 limit of 16 through FASTKERN_W4A16_LIMB_MAX_M), n tails of the passes, and k = 12800 (two K blocks at m = 1 fp32,
    # several at m = 3, with FASTKERN_W4A16_WHOLE_K_KB=0; with g = 32 blocks of whole pairs).
    # span16_two_rows: FASTKERN_W4A16_MULTIROW_KB=0, two weight rows per step at m = 1 (by
    # default only where a K block's limbs take 40 KiB), n tails of the pairs.
    if span16 == "2":
        monkeypatch.setenv("FASTKERN_W4A16_MULTIROW_KB", "0")
    monkeypatch.setenv("FASTKERN_W4A16_AVX2_SPAN16", "0" if span16 == "0" else "1")
    monkeypatch.setenv("FASTKERN_W4A16_LIMB_MAX_M", "65")  # the limbs also above the AVX2 default (16)
    monkeypatch.setenv("FASTKERN_W4A16_TILE_MAX_M", "0")  # and at fp32 m = 3..16 (the tiles' range)
    monkeypatch.setenv("FASTKERN_W4A16_WHOLE_K_KB", "0")  # K blocks (test_gemv_k_blocks_windows_and_whole_k: one)
    outs, refs = [], []
    with cpu_isa("avx2"):
        for m in (1, 2, 3, 4, 5, 7, 16, 17, 47, 48, 64, 65):
            for i, (k, g) in enumerate(SPAN16_CASES + [(12800, 128), (12800, 32)]):
                if (k == 12800 and m not in (1, 3)) or (m >= 47 and i % 3):
                    continue
                n = (1, 2, 3, 5, 9, 6)[(i + m) % 6]
                check_native_case(gen, m, n, k, g, dtype, outs, refs, symmetric=bool((i + m) % 2))
    assert_close_rel(torch.cat(outs), torch.cat(refs), dtype)


@NATIVE
@AVX2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("g", [32, 64, 192, 640])
def test_avx2_span16_threads_bitwise_identical(dtype, m, g, gen, monkeypatch):
    # m = 1: two weight rows per step (FASTKERN_W4A16_MULTIROW_KB=0) give every row the same
    # bits as one row at a time, on 1 and 2 threads (g = 32 takes the pairs, one row at a time)
    n, k = 301, 1920
    x = torch.randn(m, k, generator=gen).to(dtype)
    w, s, z = make_w4(gen, n, k, g)
    monkeypatch.setenv("FASTKERN_W4A16_TILE_MAX_M", "0")  # fp32 m = 3: the span GEMV, not the FMA tiles
    outs = []
    with cpu_isa("avx2"):
        for kb in (("100000", "0") if m == 1 else ("100000",)):
            monkeypatch.setenv("FASTKERN_W4A16_MULTIROW_KB", kb)
            for t in (1, 2):
                with num_threads(t):
                    outs.append(native(x, w, s, z, g, None))
    for out in outs[1:]:
        assert torch.equal(outs[0], out)



@NATIVE
@pytest.mark.parametrize("isa", [i for i in cpu_isas() if i != "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemv_k_blocks_windows_and_whole_k(isa, dtype, gen, monkeypatch):
    # GEMV shapes with several K blocks (the limbs of all m rows beyond the 36 KiB block
    # budget): k = 12800 at m = 1, 3, 5; m = 16 at k = 2000. Group sizes: 128 and 64 (the
    # AVX2 int16-span GEMV), 32 (its pairs), 50 (the per-row tiles on every ISA).
    # - Windows (w4l_gemv: each thread's rows in windows, every K block of a window before
    #   the next): FASTKERN_W4A16_WINDOW_KB=1 (4-row windows, many per thread) against 0 (no
    #   windows) bitwise equal, as they only reorder whole tiles; 1 and 2 threads equal.
    # - Whole K (both limb GEMVs: one K block while the limbs of all m rows fit in
    #   FASTKERN_W4A16_WHOLE_K_KB, 768 by default): the default and 0 (always blocks) both
    #   against the reference.
    monkeypatch.setenv("FASTKERN_W4A16_TILE_MAX_M", "0")  # the limbs at m = 5, 16 (not the fp32 tiles)
    outs, refs = [], []
    with cpu_isa(isa):
        for m, n, k, g in ((1, 37, 12800, 128), (1, 21, 12800, 32), (1, 11, 12800, 50), (3, 13, 12800, 64),
                           (5, 9, 12800, 128), (16, 23, 2000, 50), (16, 6, 2048, 128)):
            x = torch.randn(m, k, generator=gen).to(dtype)
            w, s, z = make_w4(gen, n, k, g)
            ref = ops.linear_w4a16_ref(x, w, s, z, g, None)
            monkeypatch.setenv("FASTKERN_W4A16_WHOLE_K_KB", "0")
            monkeypatch.setenv("FASTKERN_W4A16_WINDOW_KB", "0")
            plain = native(x, w, s, z, g, None)
            monkeypatch.setenv("FASTKERN_W4A16_WINDOW_KB", "1")
            one, two = on_1_and_2_threads(native, x, w, s, z, g, None)
            assert torch.equal(plain, one) and torch.equal(one, two), (m, n, k, g)
            monkeypatch.delenv("FASTKERN_W4A16_WINDOW_KB")
            monkeypatch.delenv("FASTKERN_W4A16_WHOLE_K_KB")
            whole = native(x, w, s, z, g, None)
            for out in (plain, whole):
                assert_close_rel(out, ref, dtype, factor=100 if dtype == torch.float32 else 1)
                outs.append(out.flatten())
                refs.append(ref.flatten())
    assert_close_rel(torch.cat(outs), torch.cat(refs), dtype)

def even_divisors(k):
    return [g for g in range(2, k + 1, 2) if k % g == 0]


@NATIVE
@BF16_DOT
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bf16_dot_gemv_matches_reference(dtype, gen, monkeypatch):
    # every m of the GEMV (tiles (1,4) (2,2) (3,1) (4,1), (4,2) from 8 rows on, and their tails), odd n
    # (NR tails), every group size the format allows for k = 384 (partial and several
    # 128-weight chunks, group = K) and k = 1100 / 6 (chunk tails, the tensor's last bytes).
    # The products are exact (bf16 x, or fp16 x as two exact bf16 parts) and the sums
    # fp32: the outputs match the reference's up to rare last-bit rounding flips.
    monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV", "1")
    cases = [(384, g) for g in even_divisors(384)] + [(1100, 550), (1100, 1100), (1100, 22), (6, 2), (6, 6)]
    with cpu_isa("avx512"):
        for m in range(1, 17):
            for i, (k, g) in enumerate(cases):
                if (i + m) % 3:  # a third of the (m, group) pairs, every m and every group covered
                    continue
                n = (3, 5, 7, 11)[(i + m) % 4]
                x = torch.randn(m, k, generator=gen).to(dtype)
                w, s, z = make_w4(gen, n, k, g, symmetric=bool(i % 2))
                out = native(x, w, s, z, g, None)
                assert_close_rel(out, ops.linear_w4a16_ref(x, w, s, z, g, None), dtype)


@NATIVE
@BF16_DOT
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bf16_dot_nan_and_inf(dtype, m, gen, monkeypatch):
    monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV", "1")
    x = torch.randn(m, 256, generator=gen).to(dtype)
    x[0, 5] = float("nan")
    if m > 2:
        x[1, 200] = float("-inf")
    w, s, z = make_w4(gen, 9, 256, 128)
    with cpu_isa("avx512"):
        out = native(x, w, s, z, 128, None)
    ref = ops.linear_w4a16_ref(x, w, s, z, 128, None)
    assert torch.isnan(out[0]).all()
    torch.testing.assert_close(out[:2].float(), ref[:2].float(), rtol=1e-2, atol=1e-2, equal_nan=True)
    if m > 2:
        assert_close_rel(out[2:], ref[2:], dtype)


@NATIVE
@BF16_DOT
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 13, 16])
def test_bf16_dot_threads_bitwise_identical(dtype, m, gen, monkeypatch):
    monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV", "1")
    n, k, g = 203, 1100, 550
    x = torch.randn(m, k, generator=gen).to(dtype)
    w, s, z = make_w4(gen, n, k, g)
    outs = []
    with cpu_isa("avx512"):
        for t in (1, 2):
            with num_threads(t):
                outs.append(native(x, w, s, z, g, None))
    assert torch.equal(outs[0], outs[1])



BF16_GEMM = pytest.mark.skipif(not HAS_BF16_DOT, reason="this CPU lacks AVX512-BF16 (bf16 dot-product GEMM)")
# (n, k, g): weight rows in tasks of 48 (n = 49, 97 cross them) and tiles of 6 / 4 / 2 / 1 (n
# tails), K blocks of 512 pairs (k = 2048, 4224: several, a partial last one), group sizes 2
# and 6 (several groups per 16-pair chunk), 48 (24 pairs: chunks across groups, the scalar
# widening), 32 / 64 / 128 (whole chunks), 550 (a group across K blocks; 550 pairs, not a
# multiple of 16), k (one group)
BF16_GEMM_CASES = [(1, 64, 2), (5, 96, 6), (13, 96, 48), (6, 256, 32), (49, 2048, 128), (97, 4224, 64),
                   (7, 1100, 550), (11, 1024, 1024), (3, 2048, 32), (10, 160, 32)]


@NATIVE
@BF16_GEMM
@pytest.mark.parametrize("m", [16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 130])
def test_bf16_gemm_matches_reference(m, gen, monkeypatch):
    # bf16 x at m >= 16 with AVX512-BF16 (w4b_gemm_bf16): x packed in blocks of 64 rows (the
    # last one 16, 32, 48 or 64 wide, rows past m zero: m = 17..130 leave each), the cases
    # above; with and without bias (always past 16 rows: every strip of the transpose). Against
    # the reference, 1 and 2 threads bitwise equal.
    # Groups under 32 (g = 2, 6) take it only through FASTKERN_W4A16_BF16_GEMM_MIN_G (by
    # default the fp32 paths are faster there).
    monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMM_MIN_G", "2")
    outs, refs = [], []
    with cpu_isa("avx512"):
        for i, (n, k, g) in enumerate(BF16_GEMM_CASES):
            x = torch.randn(m, k, generator=gen).bfloat16()
            w, s, z = make_w4(gen, n, k, g, symmetric=bool(i % 2))
            b = torch.randn(n, generator=gen).bfloat16() if i % 3 == 0 or n > 16 else None
            one, two = on_1_and_2_threads(native, x, w, s, z, g, b)
            assert torch.equal(one, two), (n, k, g)
            ref = ops.linear_w4a16_ref(x, w, s, z, g, b)
            assert_close_rel(two, ref, torch.bfloat16)
            outs.append(two.flatten())
            refs.append(ref.flatten())
    assert_close_rel(torch.cat(outs), torch.cat(refs), torch.bfloat16)


@NATIVE
@BF16_GEMM
@pytest.mark.parametrize("m", [16, 17, 18, 20, 21, 24, 27, 28, 29, 33, 36, 52, 60])
def test_bf16_gemm_gemv_tail(m, gen, monkeypatch):
    # m = 16 j + r with 1 <= r <= 10 (j >= 1; by default, and up to 12 rows through
    # FASTKERN_W4A16_BF16_GEMV_TAIL=12 here): the bf16 GEMM's tiles take the
    # first 16 j rows and a GEMV within it the last r, against each widened weight block (groups
    # of a multiple of 32; g = 550 keeps the tiles on all rows, as r >= 13 and m <= 16 do). The
    # first rows bit for bit the GEMM's own call on them alone, the tail rows close to the
    # reference (their fp32 sums in another order), bias included. Cases of BF16_GEMM_CASES
    # (several tasks per thread, K blocks, a group per K block), 3-D x for one; 1 and 2 threads
    # equal; a NaN in a tail row sends the whole call to the fp32 paths (NaN in that row only);
    # and the default (r <= 10) on a weight of 1M elements against the reference.
    monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMM_MIN_G", "2")
    r = m % 16
    with cpu_isa("avx512"):
        for i, (n, k, g) in enumerate(BF16_GEMM_CASES[3:8]):
            head = m - r if m > 16 and 1 <= r <= 12 and g % 32 == 0 else m
            x = torch.randn(m, k, generator=gen).bfloat16()
            w, s, z = make_w4(gen, n, k, g, symmetric=bool(i % 2))
            b = torch.randn(n, generator=gen).bfloat16() if i % 2 == 0 else None
            monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV_TAIL", "12")
            xi = x.reshape(1, m, k) if i == 0 else x
            one, two = on_1_and_2_threads(native, xi, w, s, z, g, b)
            assert torch.equal(one, two), (n, k, g)
            two = two.reshape(m, n)
            ref = ops.linear_w4a16_ref(x, w, s, z, g, b)
            assert_close_rel(two, ref, torch.bfloat16)
            if head < m:
                assert_close_rel(two[head:], ref[head:], torch.bfloat16)
                xn = x.clone()
                xn[-1, 3] = float("nan")
                yn = native(xn, w, s, z, g, b)
                assert yn[-1].isnan().all() and not yn[:-1].isnan().any(), (n, k, g)
                assert_close_rel(yn[:-1], ref[:-1], torch.bfloat16)
            monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV_TAIL", "0")
            assert torch.equal(two[:head], native(x[:head], w, s, z, g, b)), (n, k, g)
            if head == m:
                assert torch.equal(two, native(x, w, s, z, g, b)), (n, k, g)
        monkeypatch.delenv("FASTKERN_W4A16_BF16_GEMV_TAIL")
        n, k, g = 1024, 1024, 128
        x = torch.randn(m, k, generator=gen).bfloat16()
        w, s, z = make_w4(gen, n, k, g)
        assert_close_rel(native(x, w, s, z, g, None), ops.linear_w4a16_ref(x, w, s, z, g, None), torch.bfloat16)


@NATIVE
@BF16_GEMM
@pytest.mark.parametrize("m", [16, 40, 64])
def test_bf16_gemm_exact_products(m, gen):  # g = 128: the default switch
    # the products are exact (q - z and bf16 x are both bf16): a group whose largest activation
    # meets a zero weight (q = z) leaves its small activations to carry the output, which the
    # limbs (x quantized to 2 x 8 bits per group) would round away; here only fp32 summation
    # and the bf16 output round. Against a float64 truth.
    n, k, g = 24, 512, 128
    x = torch.randn(m, k, generator=gen) * 1e-3
    x[:, ::g] = 1000.0
    x = x.bfloat16()
    w, s, z = make_w4(gen, n, k, g)
    q = torch.stack([w & 15, w >> 4], dim=-1).reshape(n, k)
    q[:, ::g] = z  # q - z = 0 where x is large
    w = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    with cpu_isa("avx512"):
        out = native(x, w, s, z, g, None)
    deq = (q.double() - z.double().repeat_interleave(g, dim=1)) * s.double().repeat_interleave(g, dim=1)
    truth = x.double() @ deq.T
    assert (out.double() - truth).norm() <= 4e-3 * truth.norm()


@NATIVE
@BF16_GEMM
def test_bf16_gemm_nan_inf_and_huge_values(gen):
    # NaN / inf, or |x| beyond 1e30 (where 15 |x| summed over K could overflow fp32 before the
    # scale), take the fp32 path, which matches the reference; rows without them are unchanged.
    # x = 1e38 against small weight scales: the reference's outputs are ~1e35, while (q - z) x
    # summed before the scale would be inf.
    m, n, k, g = 20, 9, 256, 128
    x = torch.randn(m, k, generator=gen).bfloat16()
    w, s, z = formats.quantize_int4(torch.randn(n, k, generator=gen) * 1e-3, g)
    with cpu_isa("avx512"):
        clean = native(x, w, s, z, g, None)
        for bad in (float("nan"), float("inf"), 1e38):
            xb = x.clone()
            xb[3, 17] = bad
            out = native(xb, w, s, z, g, None)
            ref = ops.linear_w4a16_ref(xb, w, s, z, g, None)
            if bad == 1e38:  # finite, within the contract (norms in float64: fp32 ones overflow)
                o, r = out.double(), ref.double()
                assert torch.isfinite(o).all() and (o - r).norm() <= 1e-2 * r.norm()
            else:  # +-inf where the weight is non-zero, NaN where it is zero, as in the reference
                torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2, equal_nan=True)
            rows = [r for r in range(m) if r != 3]
            assert_close_rel(out[rows], clean[rows], torch.bfloat16)


@NATIVE
@BF16_GEMM
@pytest.mark.parametrize("m", [16, 17, 33, 40])
def test_bf16_limbs_without_the_gemm(m, gen, monkeypatch):
    # FASTKERN_W4A16_BF16_GEMM_MIN_M=0: bf16 x at m = 16..40 back on the AVX-512 limbs (their
    # range on CPUs without AVX512-BF16); against the reference, 1 and 2 threads bitwise equal
    monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMM_MIN_M", "0")
    outs, refs = [], []
    with cpu_isa("avx512"):
        for n, k, g in ((5, 96, 48), (49, 2048, 128), (7, 1100, 550), (13, 256, 32)):
            x = torch.randn(m, k, generator=gen).bfloat16()
            w, s, z = make_w4(gen, n, k, g)
            one, two = on_1_and_2_threads(native, x, w, s, z, g, None)
            assert torch.equal(one, two), (n, k, g)
            outs.append(two.flatten())
            refs.append(ops.linear_w4a16_ref(x, w, s, z, g, None).flatten())
    assert_close_rel(torch.cat(outs), torch.cat(refs), torch.bfloat16)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
def test_gemv_activation_outliers(isa, gen):
    # limbs are relative to each group's absmax: a group with one huge activation keeps the
    # others to fp32-like precision (three limbs resolve ~2^-23 of the absmax)
    x = torch.randn(2, 1024, generator=gen)
    x[0, 5] = 300.0
    x[1, 700] = -1e4
    w, s, z = make_w4(gen, 77, 1024, 128)
    with cpu_isa(isa):
        check(native(x, w, s, z, 128, None), x, w, s, z, 128, None)
        check(native(x.bfloat16(), w, s, z, 128, None), x.bfloat16(), w, s, z, 128, None, torch.bfloat16)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k,g", [(4096, 128), (4096, 4096), (14336, 14336), (16448, 64)])
def test_gemv_accuracy_long_rows(isa, m, k, g, gen):
    # the GEMV folds the zero point out (s * (sum q x - z sum x)); its cancellation must stay
    # inside the fp32 contract for long groups too, and for symmetric (z = 8) weights;
    # k = 16448 takes several K blocks (their partial sums added to y in order)
    x = torch.randn(m, k, generator=gen)
    with cpu_isa(isa):
        for sym in (False, True):
            w, s, z = make_w4(gen, 64, k, g, symmetric=sym)
            check(native(x, w, s, z, g, None), x, w, s, z, g, None)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,g", [(2048, 1024), (2304, 1152), (14336, 14336), (2048, 256), (1024, 64), (1024, 32)])
def test_gemv_extreme_values_no_overflow(isa, dtype, k, g, gen):
    # the limbs of a group combine in one int32 per lane (Horner, base 128) over spans of at
    # most 8 chunks: the largest products (q = 15, every activation at the group's absmax, so
    # every first limb is +-127) over groups of 8, 9 and 112 chunks of 128 weights must not wrap;
    # g = 256 / 64: the AVX2 int16 span sums at their bound (4 chunks: 8 x 2 x 15 x 127 = 30480)
    # and at one chunk, and the g = 32 pairs
    x = torch.ones(3, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    x = x.to(dtype)
    w = torch.full((5, k // 2), 0xFF, dtype=torch.uint8)
    s = torch.rand(5, k // g, generator=gen) + 0.5
    z = torch.zeros(5, k // g, dtype=torch.uint8)
    z[1] = 8
    with cpu_isa(isa):
        out = native(x, w, s, z, g, None)
    # float64 truth: sums of thousands of equal terms are where fp32 summation orders differ
    # most, so the check is loose; a wrapped int32 would be off by 100%
    deq = (15.0 - z.double().repeat_interleave(g, dim=1)) * s.double().repeat_interleave(g, dim=1)
    ref = x.double() @ deq.T
    assert (out.double() - ref).norm() <= (1e-4 if dtype == torch.float32 else 1e-2) * ref.norm()


@NATIVE
def test_larger_shapes(gen):
    x = torch.randn(33, 2048, generator=gen)
    w, s, z = make_w4(gen, 200, 2048, 128)
    b = torch.randn(200, generator=gen)
    check(native(x, w, s, z, 128, b), x, w, s, z, 128, b)


@NATIVE
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scale_and_bias_dtypes(scale_dtype, gen):
    x = torch.randn(2, 128, generator=gen).bfloat16()
    w, s, z = make_w4(gen, 11, 128, 32, scale_dtype=scale_dtype)
    b = torch.randn(11, generator=gen).half()
    check(native(x, w, s, z, 32, b), x, w, s, z, 32, b, torch.bfloat16)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("m", [1, 3, 8])
def test_nan_and_inf(isa, m, gen):
    x = torch.randn(m, 64, generator=gen)
    x[0, 5] = float("nan")
    if m > 2:
        x[1, 7] = float("inf")
    w, s, z = make_w4(gen, 9, 64, 32)
    with cpu_isa(isa):
        out = native(x, w, s, z, 32, None)
    ref = ops.linear_w4a16_ref(x, w, s, z, 32, None)
    assert torch.isnan(out[0]).all()
    # inf behaves as in the reference: +-inf where the weight is non-zero, NaN where it is zero
    torch.testing.assert_close(out[:2], ref[:2], rtol=1e-5, atol=1e-5, equal_nan=True)
    if m > 2:
        assert_close_rel(out[2:], ref[2:], torch.float32)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemv", ["limbs", "bf16dot"])
def test_huge_activations_every_path(isa, dtype, gemv, gen, monkeypatch):
    """|x| far beyond what the scale-free sums can hold (3e38, 1e35; 1e31 is past the 1e30
    bound too) against ordinary weight scales: the limbs and bf16 paths hand such rows to the
    fp32 path, which dequantizes as the reference does. x = 3e38 there used to give NaN (inf
    minus inf from the zero point's share) where the reference is finite or +-inf. Every M up
    to the GEMMs and the M = 1 rows kernel; NaN / inf where the reference has them, the finite
    outputs within the contract."""
    if gemv == "bf16dot":
        if dtype != torch.bfloat16 or isa != "avx512" or not HAS_BF16_DOT:
            pytest.skip("the bf16 dot GEMV: bf16 x on the AVX-512 path with AVX512-BF16")
        monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV", "1")
    w, s, z = make_w4(gen, 37, 512, 128)
    with cpu_isa(isa):
        for m in (1, 3, 8, 20, 40, 64):
            for big in (3e38, -1e35, 1e31):
                x = torch.randn(m, 512, generator=gen).to(dtype)
                x[0, 5] = big
                x[m - 1, 300] = -big / 3
                out = native(x, w, s, z, 128, None)
                ref = ops.linear_w4a16_ref(x, w, s, z, 128, None)
                assert_nonfinite_as_reference(out, ref, dtype, (m, big))


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemv", ["limbs", "bf16dot"])
def test_tiny_activations_every_path(isa, dtype, gemv, gen, monkeypatch):
    """Rows of x whose largest |x| is tiny but normal (1e-37 .. 1e-19) against ordinary weight
    scales: the limbs scale each group by 127 / |x|max, which overflowed under 3.7e-37 (outputs
    100x off), and lost bits where the finest limb weight times the scale left the normal
    range (1e-35: 2e-4 error). Such groups take the fp32 path; each row's outputs within the
    contract (a row at a time: the tiny rows would vanish in a whole-tensor norm). The
    vdpbf16ps paths (bf16 x, AVX-512) flush subnormals as documented, which at 1e-37 takes
    a visible share of the sums (the reference's own products are subnormal there too): those
    start at 1e-35."""
    dot = dtype == torch.bfloat16 and isa == "avx512" and HAS_BF16_DOT
    if gemv == "bf16dot":
        if dtype != torch.bfloat16 or isa != "avx512" or not HAS_BF16_DOT:
            pytest.skip("the bf16 dot GEMV: bf16 x on the AVX-512 path with AVX512-BF16")
        monkeypatch.setenv("FASTKERN_W4A16_BF16_GEMV", "1")
    with cpu_isa(isa):
        # g = 128: the vector limbs; g = 40 (not a multiple of 32): the scalar ones
        for k, g in ((512, 128), (480, 40)):
            w, s, z = make_w4(gen, 37, k, g)
            for m in (1, 3, 8, 20, 40, 64):
                for tiny in (1e-35, 1e-30, 1e-22, 1e-19) if dot else (1e-37, 1e-35, 1e-30, 1e-22, 1e-19):
                    x = torch.randn(m, k, generator=gen)
                    x[0] *= tiny
                    x[m - 1, g:2 * g] *= tiny  # one group of the last row (the whole row when m = 1)
                    x = x.to(dtype)
                    out = native(x, w, s, z, g, None)
                    ref = ops.linear_w4a16_ref(x, w, s, z, g, None)
                    for i in range(m):
                        assert_close_rel(out[i], ref[i], dtype)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_weight_scales_every_path(isa, dtype, gen):
    """Weight scales so small that |x|max x scale is under 2.5e-32 while every product of the
    reference, x * ((q - z) s), stays a normal number: the limbs multiplied the finest limb
    weight (|x|max / 127 / 128^(L-1)) by the weight scale first, which left fp32's normal range
    there (subnormal, bits lost: 0.3 relative error at x ~ 1e-10, scales ~ 1e-28). Normal x
    against scales of 1e-36, x of 1e-8 against 1e-26 and x of 1e-19 against 1e-16 (products
    ~1e-35, normal for the vdpbf16ps paths too); each row's outputs within the contract, on
    every M up to the GEMMs."""
    with cpu_isa(isa):
        for k, g in ((512, 128), (512, 256), (600, 40), (384, 128), (512, 32)):
            w, s, z = make_w4(gen, 37, k, g)
            for xs, ss in ((1.0, 1e-36), (1e-8, 1e-26), (1e-19, 1e-16)):
                for m in (1, 3, 8, 20, 64):
                    x = (torch.randn(m, k, generator=gen) * xs).to(dtype)
                    out = native(x, w, s * ss, z, g, None)
                    ref = ops.linear_w4a16_ref(x, w, s * ss, z, g, None)
                    for i in range(m):
                        assert_close_rel(out[i], ref[i], dtype)


# the two ops over the int4 format (linear_w4a8: the same arguments and checks, int8 activations)
INT4_OPS = pytest.mark.parametrize("op", [OP, "linear_w4a8"])


@NATIVE
@INT4_OPS
def test_empty_dims(op, gen):
    f = getattr(torch.ops.fastkern_C, op)
    w, s, z = make_w4(gen, 6, 64, 32)
    assert f(torch.randn(0, 64), w, s, z, 32, None).shape == (0, 6)
    assert f(torch.randn(2, 0, 64), w, s, z, 32, None).shape == (2, 0, 6)
    e = torch.zeros(0, 32, dtype=torch.uint8)
    out = f(torch.randn(3, 64), e, torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.uint8), 32, None)
    assert out.shape == (3, 0)


# ----------------------------------------------------------------- op checks and errors


@NATIVE
@INT4_OPS
@pytest.mark.parametrize("ns", ["fastkern", "fastkern_C"])
def test_opcheck(op, ns, gen):
    opobj = getattr(getattr(torch.ops, ns), op)
    w, s, z = make_w4(gen, 5, 64, 32)
    for args in [(torch.randn(3, 64, generator=gen), w, s, z, 32, None),
                 (torch.randn(2, 1, 64, generator=gen).half(), w, s, z, 32, torch.randn(5, generator=gen))]:
        torch.library.opcheck(opobj, args)


@NATIVE
@INT4_OPS
def test_native_bad_inputs(op, gen):
    f = getattr(torch.ops.fastkern_C, op)
    w, s, z = make_w4(gen, 5, 64, 32)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match=op + r".*x \(shape \[3, 63\].*must have shape \[\.\.\., 64\]"):
        f(torch.randn(3, 63), w, s, z, 32, None)
    with pytest.raises(RuntimeError, match=r"x \(shape \[3, 64\], dtype Long.*must be float32, float16 or bfloat16"):
        f(torch.ones(3, 64, dtype=torch.long), w, s, z, 32, None)
    with pytest.raises(RuntimeError, match=op + r": group_size=24 must be a positive even number dividing K=64"):
        f(x, w, s, z, 24, None)
    with pytest.raises(RuntimeError, match=r"group_size=-2 must be"):
        f(x, w, s, z, -2, None)
    with pytest.raises(RuntimeError, match=r"scales \(shape \[5, 1\].*must have shape \[5, 2\]"):
        f(x, w, s[:, :1], z, 32, None)
    with pytest.raises(RuntimeError, match=r"zeros \(shape \[5, 2\], dtype Float.*must have dtype Byte"):
        f(x, w, s, z.float(), 32, None)
    with pytest.raises(RuntimeError, match=r"w \(shape \[5, 32\], dtype Char.*must have dtype Byte"):
        f(x, w.to(torch.int8), s, z, 32, None)
    with pytest.raises(RuntimeError, match=r"bias \(shape \[4\].*must have shape \[5\]"):
        f(x, w, s, z, 32, torch.randn(4))


@INT4_OPS
def test_public_bad_inputs(op, gen):
    w, s, z = make_w4(gen, 5, 64, 32)
    f = getattr(torch.ops.fastkern, op)
    with pytest.raises(ValueError, match=r"x must have K=64 features.*shape \[3, 63\]"):
        f(torch.randn(3, 63), w, s, z, 32, None)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16.*int64"):
        f(torch.ones(3, 64, dtype=torch.long), w, s, z, 32, None)
    with pytest.raises(ValueError, match=r"group_size=24 must be a positive even number dividing K=64"):
        f(torch.randn(3, 64), w, s, z, 24, None)
    with pytest.raises(ValueError, match=r"scales must have shape \[5, 2\]"):
        f(torch.randn(3, 64), w, s[:, :1], z, 32, None)
    with pytest.raises(TypeError, match=r"zeros must be uint8.*float32"):
        f(torch.randn(3, 64), w, s, z.float(), 32, None)
