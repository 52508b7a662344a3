"""The two fp32 GEMM drivers of the CPU backend: skinny_gemm (M up to 256: all of x packed
once, each task packing its own weight slivers right before the micro-kernel uses them)
and blocked_gemm (larger M: BLIS-style shared B panels). Both run the same micro-kernels
over the same KC blocks in the same order, so they must agree to the bit; each is also
checked against the reference on every tile tail, for gemm and for linear_w4a16 (whose
slivers are dequantized int4). FASTKERN_SKINNY_MAX_M moves the switch between them.
"""
import pytest
import torch

from fastkern import formats, ops
from fastkern._ext import _C

from conftest import assert_close_rel, cpu_isa, cpu_isas, on_1_and_2_threads

NATIVE = pytest.mark.skipif(_C is None, reason="fastkern._C is not built")
# (MR, NR) of each path's micro-kernel; the GEMV of gemm serves M <= GEMV_MAX_M, the limb
# GEMV of linear_w4a16 M <= 16 on AVX2 (32 with AVX-512 VNNI), so M >= 65 reaches the GEMMs
TILES = {"generic": (4, 8), "avx2": (6, 16), "avx512": (12, 32)}
KC = 192


def both_drivers(monkeypatch, fn, *args):
    """fn(*args) through skinny_gemm (the default up to M = 256) and through blocked_gemm."""
    monkeypatch.setenv("FASTKERN_SKINNY_MAX_M", "100000")
    skinny = fn(*args)
    monkeypatch.setenv("FASTKERN_SKINNY_MAX_M", "0")
    blocked = fn(*args)
    monkeypatch.delenv("FASTKERN_SKINNY_MAX_M")
    return skinny, blocked


def cases(isa):
    """(m, n, k): every M tail of the micro-kernel above the GEMVs (65 .. 65 + MR), N tails
    1..NR+1 and several tasks of 64 columns, K tails around the KC block edges."""
    mr, nr = TILES[isa]
    out = [(65 + d, nr + 3, 2 * KC + 7) for d in range(mr + 1)]
    out += [(70, n, 40) for n in range(1, nr + 2)]
    out += [(66, 3 * 64 + 5, k) for k in (1, 7, KC - 1, KC, KC + 1, 3 * KC + 5)]
    out += [(256, 100, 300), (129, 250, 1000)]
    return out


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemm_skinny_matches_reference_and_blocked(isa, dtype, gen, monkeypatch):
    # bf16 takes the vdpbf16ps tile GEMM from M = 16 where the CPU has AVX512-BF16 (its own
    # tests in test_ops_gemm.py): off here, so both fp32 drivers keep their bf16 coverage
    monkeypatch.setenv("FASTKERN_GEMM_BF16_MIN_M", "0")
    with cpu_isa(isa):
        for m, n, k in cases(isa):
            a = torch.randn(m, k, generator=gen).to(dtype)
            b = torch.randn(n, k, generator=gen).to(dtype)
            skinny, blocked = both_drivers(monkeypatch, torch.ops.fastkern_C.gemm, a, b)
            assert_close_rel(skinny, ops.gemm_ref(a, b), dtype)
            assert torch.equal(skinny, blocked), (m, n, k)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
def test_gemm_skinny_strided_weight(isa, gen, monkeypatch):
    """b without unit stride along K: the skinny driver's packer without prefetching."""
    with cpu_isa(isa):
        a = torch.randn(80, 300, generator=gen)
        b = torch.randn(300, 2 * 150, generator=gen)[:, ::2].t()  # [150, 300], strides (2, 300)
        skinny, blocked = both_drivers(monkeypatch, torch.ops.fastkern_C.gemm, a, b)
        assert_close_rel(skinny, ops.gemm_ref(a, b), torch.float32)
        assert torch.equal(skinny, blocked)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("g", [32, 128])
def test_w4a16_skinny_matches_reference_and_blocked(isa, g, gen, monkeypatch):
    with cpu_isa(isa):
        for m, n, k in cases(isa):
            k = max(g, k // g * g)
            x = torch.randn(m, k, generator=gen)
            w, s, z = formats.quantize_int4(torch.randn(n, k, generator=gen), g)
            skinny, blocked = both_drivers(monkeypatch, torch.ops.fastkern_C.linear_w4a16, x, w, s, z, g, None)
            assert_close_rel(skinny, ops.linear_w4a16_ref(x, w, s, z, g, None), torch.float32)
            assert torch.equal(skinny, blocked), (m, n, k)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
def test_skinny_same_result_for_1_and_2_threads(isa, gen):
    with cpu_isa(isa):
        a = torch.randn(100, 700, generator=gen)
        b = torch.randn(333, 700, generator=gen)
        one, two = on_1_and_2_threads(torch.ops.fastkern_C.gemm, a, b)
        assert torch.equal(one, two)
        x = torch.randn(100, 640, generator=gen)
        w, s, z = formats.quantize_int4(torch.randn(333, 640, generator=gen), 128)
        one, two = on_1_and_2_threads(torch.ops.fastkern_C.linear_w4a16, x, w, s, z, 128, None)
        assert torch.equal(one, two)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
def test_w4a16_fused_sliver_packer_matches_dequantize_then_pack(isa, gen, monkeypatch):
    """The sliver packer that dequantizes the nibbles in registers (g % 8 == 0) gives the same
    bits as dequantizing to a buffer and packing that (FASTKERN_W4A16_FUSED_PACK=0): group
    edges inside and across KC blocks, row tails; g = 130 keeps the buffer path."""
    with cpu_isa(isa):
        for m, n, k, g in ((70, 37, 8 * 50, 8), (65, 50, 2 * KC + 64, 64), (80, 33, 640, 128), (66, 21, 390, 130)):
            x = torch.randn(m, k, generator=gen)
            w, s, z = formats.quantize_int4(torch.randn(n, k, generator=gen), g)
            fused = torch.ops.fastkern_C.linear_w4a16(x, w, s, z, g, None)
            monkeypatch.setenv("FASTKERN_W4A16_FUSED_PACK", "0")
            plain = torch.ops.fastkern_C.linear_w4a16(x, w, s, z, g, None)
            monkeypatch.delenv("FASTKERN_W4A16_FUSED_PACK")
            assert torch.equal(fused, plain), (m, n, k, g)
            assert_close_rel(fused, ops.linear_w4a16_ref(x, w, s, z, g, None), torch.float32)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("layout", ["row_gap", "transposed"])
def test_gemm_blocked_strided_a(isa, gen, monkeypatch, layout):
    """blocked_gemm with an `a` whose rows are not packed one after the other: a gap between
    rows (unit stride along K; the AVX-512 kernel reads such rows in place) and a transposed
    `a` (packed), against a contiguous copy to the bit, on 1 and 2 threads: M blocks ending
    in a partial sliver (301 rows), N over more than one 512-column chunk of B slivers."""
    m, n, k = 301, 600, 2 * KC + 7
    if layout == "row_gap":
        a = torch.randn(m, k + 5, generator=gen)[:, 2 : 2 + k]
    else:
        a = torch.randn(k, m, generator=gen).t()
    b = torch.randn(n, k, generator=gen)
    monkeypatch.setenv("FASTKERN_SKINNY_MAX_M", "0")
    with cpu_isa(isa):
        one, two = on_1_and_2_threads(torch.ops.fastkern_C.gemm, a, b)
        contig = torch.ops.fastkern_C.gemm(a.contiguous(), b)
    assert torch.equal(one, contig) and torch.equal(two, contig)
    assert_close_rel(contig, ops.gemm_ref(a, b), torch.float32)
