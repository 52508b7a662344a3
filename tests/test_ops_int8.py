"""int8 ops (int8_gemm, linear_w8a16, linear_w8a8) on every backend against the references.

The CPU kernels have a small-M (GEMV) path and a panel (GEMM) path, and a
generic and an AVX2 variant of each; the tests below reach all of them, their
tile tails, and check that the thread count does not change a single bit.
"""

import itertools

import pytest
import torch

import fastkern
from fastkern import formats, ops
from fastkern._ext import _C

from conftest import (FLOAT_DTYPES, M_SIZES, assert_close_rel, backends_for, cpu_isa, cpu_isas, num_threads,
                      on_1_and_2_threads, assert_nonfinite_as_reference)

NATIVE = pytest.mark.skipif(_C is None, reason="fastkern._C is not built")
W8_OPS = ["linear_w8a16", "linear_w8a8"]


def make_x(gen, m, k, dtype, layout):
    """x with m rows of k features: "2d", "3d" ([m, 1, k] or [1, m, k]) or "noncontig" (strided view)."""
    if layout == "noncontig":
        base = torch.randn(m, 2 * k + 3, generator=gen).to(dtype)
        x = base[:, 3::2]
        assert not x.is_contiguous() or m <= 1
        return x
    x = torch.randn(m, k, generator=gen).to(dtype)
    if layout == "3d":
        return x.reshape(1, m, k) if m % 2 else x.reshape(m, 1, k)
    return x


def make_w8(gen, n, k, scale_dtype=torch.float32):
    q, s = formats.quantize_int8(torch.randn(n, k, generator=gen))
    return q, s.to(scale_dtype)


def matrix(op, layouts=("2d", "3d", "noncontig")):
    """(be, m, dtype, layout, bias) params: the full product on the native CPU backend; on the
    others (reference, triton under the interpreter: slow, and tested in depth elsewhere) one
    rotation per m, which still visits every m, dtype, layout and bias value."""
    out = []
    for bp in backends_for(op):
        be = bp.values[0]
        for i, m in enumerate(M_SIZES):
            for dtype in FLOAT_DTYPES:
                for li, layout in enumerate(layouts):
                    for bias in (False, True):
                        if be != "cpu" and (FLOAT_DTYPES[i % 3], layouts[i % len(layouts)], bool(i % 2)) != (
                            dtype, layout, bias):
                            continue
                        out.append(pytest.param(be, m, dtype, layout, bias, marks=bp.marks,
                                                id="%s-m%d-%s-%s-%s" % (be, m, str(dtype)[6:], layout,
                                                                        "bias" if bias else "nobias")))
    return out


def native(op):
    return getattr(torch.ops.fastkern_C, op)


def run(op, be, *args):
    with fastkern.use_backend(be):
        return getattr(torch.ops.fastkern, op)(*args)


# ----------------------------------------------------------------- against the reference, every backend


@pytest.mark.parametrize("be", backends_for("int8_gemm"))
@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
def test_int8_gemm_matches_reference(be, m, layout, gen):
    n, k = 37, 83
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    if layout == "3d":
        a = a.reshape(1, m, k)
    elif layout == "noncontig":
        a = torch.randint(-128, 128, (k, m), generator=gen, dtype=torch.int8).T
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    out = run("int8_gemm", be, a, b)
    ref = ops.int8_gemm_ref(a, b)
    assert out.dtype == torch.int32 and out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("be", backends_for("int8_gemm"))
def test_int8_gemm_extremes_exact(be):
    # -128 * -128 products everywhere: the largest int8 dot product, still exact in int32.
    a = torch.full((5, 300), -128, dtype=torch.int8)
    b = torch.full((7, 300), -128, dtype=torch.int8)
    b[1] = 127
    out = run("int8_gemm", be, a, b)
    assert torch.equal(out, ops.int8_gemm_ref(a, b))
    assert out[0, 0].item() == 300 * 128 * 128


@pytest.mark.parametrize("be,m,dtype,layout,bias", matrix("linear_w8a16"))
def test_w8a16_matches_reference(be, m, dtype, layout, bias, gen):
    check_w8_against_reference("linear_w8a16", be, m, dtype, layout, bias, gen)


@pytest.mark.parametrize("be,m,dtype,layout,bias", matrix("linear_w8a8"))
def test_w8a8_matches_reference(be, m, dtype, layout, bias, gen):
    check_w8_against_reference("linear_w8a8", be, m, dtype, layout, bias, gen)


def check_w8_against_reference(op, be, m, dtype, layout, bias, gen):
    n, k = 37, 99
    x = make_x(gen, m, k, dtype, layout)
    w, s = make_w8(gen, n, k)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = run(op, be, x, w, s, b)
    ref = getattr(ops, op + "_ref")(x, w, s, b)
    assert out.shape == (*x.shape[:-1], n)
    assert_close_rel(out, ref, dtype)
    if op == "linear_w8a8" and be == "cpu":
        # same integer dot products and the same double-precision scaling as the reference
        assert torch.equal(out, ref)


@NATIVE
@pytest.mark.parametrize("op", W8_OPS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_w8_scale_and_bias_dtypes(op, scale_dtype, gen):
    x = torch.randn(5, 64, generator=gen)
    w, s = make_w8(gen, 19, 64, scale_dtype)
    b = torch.randn(19, generator=gen).to(torch.bfloat16)
    out = native(op)(x, w, s, b)
    ref = getattr(ops, op + "_ref")(x, w, s, b)
    assert_close_rel(out, ref, torch.float32)


# ----------------------------------------------------------------- CPU paths, tails, threads


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16, 17, 70])
def test_cpu_paths_and_tails(isa, m, gen):
    # m <= 3 runs the GEMV kernels (AVX2), larger m the panel kernels (3-row tiles);
    # linear_w8a16 runs the GEMV in groups of 3 rows of x (tails of 1 and 2) up to m = 16
    # (generic), in passes of up to 4 rows spread evenly up to 128 on AVX2 (4 x 3 and 3 x 4 /
    # 2 x 4 / 1 x 4 tiles: m = 5 = 3 + 2, 7 = 4 + 3, 17 = 4 + 4 + 3 + 3 + 3), the dequantized
    # panels / fp32 GEMM above (AVX-512: the GEMV to m = 12, the GEMM from 13);
    # n 1..9 covers the 3- and 4-row tiles' tails, k = 1..33 the 8- and 16-wide K tails,
    # k = 1100 two int16 panels and three fp32 panels.
    outs, refs = [], []
    with cpu_isa(isa):
        for n in (1, 2, 3, 5, 9):
            for k in (1, 7, 15, 16, 17, 33, 1100):
                a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
                b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
                assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b)), (n, k)
                x = torch.randn(m, k, generator=gen)
                w, s = make_w8(gen, n, k)
                out = native("linear_w8a8")(x, w, s, None)
                assert torch.equal(out, ops.linear_w8a8_ref(x, w, s, None)), (n, k)
                out = native("linear_w8a16")(x, w, s, None)
                ref = ops.linear_w8a16_ref(x, w, s, None)
                # loose per case (a lone output near zero is ill-conditioned), exact contract overall
                assert_close_rel(out, ref, torch.float32, factor=100)
                outs.append(out.flatten())
                refs.append(ref.flatten())
    assert_close_rel(torch.cat(outs), torch.cat(refs), torch.float32)


def check_int8_exact(gen, m, n, k):
    """int8_gemm on full-range int8 (-128 included) and W8A8 on fresh data: bit-identical to the references."""
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b)), (m, n, k)
    x = torch.randn(m, k, generator=gen)
    w, s = make_w8(gen, n, k)
    assert torch.equal(native("linear_w8a8")(x, w, s, None), ops.linear_w8a8_ref(x, w, s, None)), (m, n, k)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [4, 5, 16, 33, 50, 64, 130])
def test_cpu_gemm_blocks_exact(isa, m, gen):
    # AVX-512 VNNI: GEMV up to m = 4, then x packed (+128) in blocks of 64 rows (16/32/48-row
    # last blocks), 12-row thread shares in tasks of up to 96 weight rows (fewer for large K)
    # with 12- or 6-row tiles and their tails, 2048-byte K blocks accumulated, K % 4 tails,
    # the weight row sums; every other path too, exact
    with cpu_isa(isa):
        for n, k in ((101, 4099), (53, 2050), (7, 37), (250, 520)):
            check_int8_exact(gen, m, n, k)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [17, 65, 130])
def test_w8a8_gemm_bias_in_epilogue(isa, m, gen):
    # The GEMMs add the bias as they write the output (the GEMV and small-layer paths leave it
    # to the op): AVX-512 VNNI per 16 x 16 block, cut by 12-row thread shares and tasks (n =
    # 101 / 250 / 300); AVX2 and avx2vnni per 8 columns with single-column tails (n = 1100,
    # 101). 16- and 8-row tails of x, fp32 / bf16 x and bias. The GEMMs take m <= 64 only on
    # layers over 1 MiB (AVX-512: 300 x 4099) or 4 MiB (AVX2: 1100 x 4099). Bit-identical to
    # the reference (the bias added in fp32 to the rounded product, as the reference does), 1
    # and 2 threads alike.
    with cpu_isa(isa):
        bias_in_epilogue_check(gen, m)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
def test_gemm_scratch_reuse_and_oversize(isa, gen):
    # The GEMMs' temporaries come from per-thread buffers kept between calls (up to 32 MB per
    # buffer): calls that grow them, one whose packed x (8200 x 4100, ~34 MB) is served by a
    # buffer of its own, and smaller calls after it reusing larger buffers, all exact.
    with cpu_isa(isa):
        for m, n, k in ((70, 40, 300), (700, 90, 2000), (8200, 20, 4100), (65, 33, 1000), (700, 90, 2000)):
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b)), (m, n, k)


def bias_in_epilogue_check(gen, m):
    for n, k in ((1100, 4099), (300, 4099), (101, 4099), (250, 520), (33, 1100)):
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=gen).to(dt)
            w, s = make_w8(gen, n, k)
            b = (torch.randn(n, generator=gen) * 3).to(dt)
            one, two = on_1_and_2_threads(lambda: native("linear_w8a8")(x, w, s, b))
            ref = ops.linear_w8a8_ref(x, w, s, b)
            assert torch.equal(one, two), (m, n, k, dt)
            assert torch.equal(one, ref), (m, n, k, dt, (one.float() - ref.float()).abs().max())


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [4, 5, 6, 7, 8, 12, 13, 17, 31, 64, 65])
def test_small_m_weight_vector_tails(isa, m, gen, monkeypatch):
    # Small layers (weights up to 1 MiB with VNNI, 4 MiB with AVX2) at 4/5 < m <= 64: the
    # weight-vector kernels (on AVX2 without VNNI only where FASTKERN_INT8_WV_MAX_M is set, as
    # here; with VNNI 64 is their default). x in register tiles of up to 6 rows (m = 13: 5 + 4 + 4, 17: 6 + 6 +
    # 5, 31, 64: 6s and 5s), 16-row thread shares, 64-row packed blocks with 1-4 (VNNI) or 1-8
    # (AVX2) vectors and rows past N, K in blocks of 512 (VNNI) / 256 (AVX2) columns with
    # partial last blocks and K % 4 (VNNI) / K % 32 (AVX2 packing) tails; m = 65, the generic
    # path and (VNNI) K > 512 from m = 25 run the other kernels. int8_gemm exact with -128,
    # W8A8 bit-identical.
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "64")
    with cpu_isa(isa):
        for n, k in ((1, 1), (7, 3), (17, 33), (65, 257), (130, 513), (37, 1030), (200, 1537), (1100, 384)):
            check_int8_exact(gen, m, n, k)


def int8_threads_check(gen, m, n, k, min_rows=False, a_low=-128):
    """int8_gemm and linear_w8a8 on fresh data with 1 and 2 threads: bitwise equal, and exact
    against the references; min_rows puts -128 in every 7th weight row; int8_gemm's a holds
    a_low..127."""
    a = torch.randint(a_low, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    if min_rows:
        b[::7, ::3] = -128
    x = torch.randn(m, k, generator=gen)
    w, s = make_w8(gen, n, k)
    one, two = on_1_and_2_threads(lambda: (native("int8_gemm")(a, b), native("linear_w8a8")(x, w, s, None)))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[0], ops.int8_gemm_ref(a, b))
    assert torch.equal(one[1], ops.linear_w8a8_ref(x, w, s, None))
    return a, b, x, w, s, one


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [5, 17, 64])
def test_small_m_weight_vector_threads_and_old_tiles(isa, m, gen, monkeypatch):
    # several 64-row blocks per thread and uneven 16-row shares: 1 and 2 threads bitwise equal;
    # FASTKERN_INT8_WV_MAX_M=0 (read per call) runs the same small shapes on the other kernels
    # (64 first: the wv kernels on AVX2 too)
    n, k = 900, 700
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "64")
    with cpu_isa(isa):
        a, b, x, w, s, one = int8_threads_check(gen, m, n, k, min_rows=True)
        monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
        assert torch.equal(native("int8_gemm")(a, b), one[0])
        assert torch.equal(native("linear_w8a8")(x, w, s, None), one[1])
        for nn, kk in ((70, 1100), (9, 17)):
            check_int8_exact(gen, m, nn, kk)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 9, 12, 13, 16, 33, 50, 64, 65, 90, 130])
def test_w8a16_gemm_tiles(isa, m, gen):
    # AVX-512: up to m = 3 the streaming GEMV (1-3 rows of x, 64-wide K steps and masked
    # 16-wide K tails; K > 2048 in blocks of 2048 over 8-row chunks), m = 4..24 its tiles
    # (test_w8a16_avx512_gemv_tiles; to 32 under a 48 KiB L1d), from m = 25 (33) the fp32 GEMM: x
    # packed in 64-row blocks (16/32/48/64 wide: m = 130, 90, 33, 64), dequantized panels of 96 rows x 512 columns (K blocks accumulated,
    # masked K tails), 12- and 6-row tiles with 1-row tails, 12-row thread shares split into
    # 96-row tasks (n = 250). bf16 x with AVX512-BF16, from m = 13: the vdpbf16ps tiles
    # (1024-column panels, odd K). Other ISAs: their GEMV / panel paths.
    with cpu_isa(isa):
        for n, k in ((250, 1030), (13, 517), (7, 16), (5, 71), (37, 4500)):
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            out = native("linear_w8a16")(x, w, s, None)
            assert_close_rel(out, ops.linear_w8a16_ref(x, w, s, None), torch.float32)
            if k == 4500:  # the GEMV's K blocks (2048 columns, 8-row chunks) on 1 and 2 threads
                one, two = on_1_and_2_threads(native("linear_w8a16"), x, w, s, None)
                assert torch.equal(one, two)
            xb = x.to(torch.bfloat16)
            b = torch.randn(n, generator=gen)
            assert_close_rel(native("linear_w8a16")(xb, w, s, b), ops.linear_w8a16_ref(xb, w, s, b), torch.bfloat16)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [1, 3, 5, 16, 40, 70])
def test_cpu_threads_bitwise_identical(isa, m, gen):
    n, k = 301, 1030
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    x = torch.randn(m, k, generator=gen)
    w, s = make_w8(gen, n, k)
    outs = []
    xb = x.to(torch.bfloat16)
    with cpu_isa(isa):
        for t in (1, 2):
            with num_threads(t):
                outs.append([native("int8_gemm")(a, b), native("linear_w8a16")(x, w, s, None),
                             native("linear_w8a8")(x, w, s, None), native("linear_w8a16")(xb, w, s, None)])
    for one, two in zip(*outs):
        assert torch.equal(one, two)


def isa_or_skip(name):
    from conftest import isa_skip_reason

    why = isa_skip_reason(name)
    if why:
        pytest.skip(why)


@NATIVE
@pytest.mark.parametrize("m", [13, 16, 17, 32])
@pytest.mark.parametrize("rows", ["6", "12", "auto"])
def test_vnni_gemm_tile_rows(m, rows, gen, monkeypatch):
    # The AVX-512 VNNI GEMM with one or two vectors of x rows runs tiles of 12 weight rows, or of
    # 6 where 12 rows K bytes apart alias in the L1 (K = 4096 on an 8-way L1d) or the L1d is
    # under 48 KiB; FASTKERN_TILE_ROWS forces either. Exact for every K (aliasing or not, with
    # a K % 4 tail), tile tails (n % 6, n % 12) and both.
    isa_or_skip("avx512")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
    monkeypatch.setenv("FASTKERN_INT8_ROW_MAX_M", "0")
    if rows != "auto":
        monkeypatch.setenv("FASTKERN_TILE_ROWS", rows)
    with cpu_isa("avx512"):
        for n, k in ((7, 4096), (53, 4096), (101, 1040), (30, 4099)):
            check_int8_exact(gen, m, n, k)


@NATIVE
@pytest.mark.parametrize("m", [5, 16, 17, 31, 32, 33, 48, 63, 64, 65, 97, 130])
def test_amx_gemm_tails(m, gen, monkeypatch):
    # The AMX GEMM (amx path; the small-layer and row GEMVs turned off so it takes every m > 4):
    # 2 x 2 blocks of 16 x 16 tiles with a missing second weight or x tile (16/32/48/64-row
    # blocks of x, odd 16-row groups of weight rows), weight rows past N from a zero-padded
    # copy (n % 16), K % 64 bytes from padded copies of the weight rows and of x's last
    # k-words (K < 64: no whole chunk; k = 4099: a second K block holding only that tail),
    # 32-row thread shares in tasks of 64 rows (n = 300: five); int8_gemm exact with -128,
    # W8A8 bit-identical.
    isa_or_skip("amx")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
    monkeypatch.setenv("FASTKERN_INT8_ROW_MAX_M", "0")
    with cpu_isa("amx"):
        for n in (1, 15, 16, 17, 33, 47, 300):
            for k in (1, 3, 63, 64, 70, 130, 4099):
                check_int8_exact(gen, m, n, k)


@NATIVE
@pytest.mark.parametrize("m", [40, 300])
def test_amx_gemm_threads_and_streamed_output(m, gen, monkeypatch):
    # Several tasks per thread (n = 1000: uneven 32-row shares of 64-row tasks), three K
    # blocks of 4 KB accumulated (k = 8250, its last one partial with a tail), passes of 256
    # rows of x (m = 300), 1 and 2 threads bitwise equal and exact; FASTKERN_STREAM_OUT_KB=0
    # streams every output of whole 64-byte lines (n % 16 == 0) with non-temporal stores,
    # bias included.
    isa_or_skip("amx")
    with cpu_isa("amx"):
        int8_threads_check(gen, m, 1000, 2048, min_rows=True)
        int8_threads_check(gen, m, 200, 8250)
        monkeypatch.setenv("FASTKERN_STREAM_OUT_KB", "0")
        int8_threads_check(gen, m, 1008, 2050)
        x = torch.randn(m, 520, generator=gen)
        w, s = make_w8(gen, 96, 520)
        b = torch.randn(96, generator=gen)
        assert torch.equal(native("linear_w8a8")(x, w, s, b), ops.linear_w8a8_ref(x, w, s, b))


def avx2_gemm_only(monkeypatch, gemv_tail=True):
    """The AVX2 (no VNNI) int16 GEMM for every m > 3: the small-layer kernels and the GEMV
    passes off (their knobs are read per call), its GEMV tail as asked."""
    isa_or_skip("avx2")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
    monkeypatch.setenv("FASTKERN_INT8_GEMV_MAX_M", "3")
    if not gemv_tail:
        monkeypatch.setenv("FASTKERN_S16_GEMV_TAIL", "0")


@NATIVE
@pytest.mark.parametrize("m", [4, 5, 8, 9, 15, 17, 24, 40, 70])
def test_avx2_gemm_tails(m, gen, monkeypatch):
    # The AVX2 (no VNNI) GEMM for m > 3 (the small-layer weight-vector kernels, off on AVX2
    # unless FASTKERN_INT8_WV_MAX_M asks, and the GEMV passes, which take m <= 8 on large
    # weights, turned off): x packed as int16 pairs in blocks of
    # 16 rows (the last 8 or 16 wide), 6-row weight tiles with 4-, 2- and 1-row tails, 48-row
    # tasks in 8-row thread shares, 1024-column K blocks widened in 16s (odd K: a half pair),
    # 8 x 8 transposed output blocks and their row / column tails (its GEMV tail off, so m = 17
    # ends in a one-vector block); exact for int8_gemm and bit-identical W8A8.
    avx2_gemm_only(monkeypatch, gemv_tail=False)
    with cpu_isa("avx2"):
        for n in (1, 3, 4, 5, 6, 7, 9, 13, 37, 70, 101):
            for k in (1, 2, 3, 17, 33, 1025, 2050):
                check_int8_exact(gen, m, n, k)


@NATIVE
@pytest.mark.parametrize("m", [17, 18, 19, 20, 21, 23, 24, 33, 36, 39, 66, 131, 516])
def test_avx2_gemm_gemv_tail(m, gen, monkeypatch):
    # The AVX2 int16 GEMM leaves the last m % 16 rows to a GEMV within it where they are 1..7
    # (m = 17-23, 33, 36, 39, 66, 131, 516: the GEMM's tiles on 16 j rows, the rest against each
    # widened weight block after them, 2 weight rows at a time up to 4 rows of x, then 1, its K
    # blocks summed, the bias added by the GEMM's output); m = 24 keeps the GEMM alone. Several
    # tasks per thread (n = 130) and K blocks (k = 1025, 4099); m = 516 with x in two chunks of
    # 256 rows (FASTKERN_S16_X_WHOLE_KB=0), the tail computed in the first only. int8_gemm exact
    # with and without -128 in a, W8A8 (with a bias) bit-identical to the reference and to the
    # GEMM alone (FASTKERN_S16_GEMV_TAIL=0), 1 and 2 threads alike.
    avx2_gemm_only(monkeypatch)
    if m > 256:
        monkeypatch.setenv("FASTKERN_S16_X_WHOLE_KB", "0")
        monkeypatch.setenv("FASTKERN_S16_X_CHUNK_KB", "1")
    with cpu_isa("avx2"):
        for (n, k), a_low in itertools.product(((37, 1), (70, 33), (9, 1025), (130, 4099)), (-128, -127)):
            a = torch.randint(a_low, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            b[::5, ::3] = -128
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            bias = torch.randn(n, generator=gen)
            run = lambda: (native("int8_gemm")(a, b), native("linear_w8a8")(x, w, s, bias))  # noqa: E731
            one, two = on_1_and_2_threads(run)
            assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]), (m, n, k)
            assert torch.equal(one[0], ops.int8_gemm_ref(a, b)), (m, n, k)
            assert torch.equal(one[1], ops.linear_w8a8_ref(x, w, s, bias)), (m, n, k)
            monkeypatch.setenv("FASTKERN_S16_GEMV_TAIL", "0")
            alone = run()
            monkeypatch.delenv("FASTKERN_S16_GEMV_TAIL")
            assert torch.equal(alone[0], one[0]) and torch.equal(alone[1], one[1]), (m, n, k)


def check_avx2vnni_exact(gen, m, n, k, row_step, col_step):
    """int8_gemm (with -128 in every row_step-th weight row, every col_step-th column) and W8A8 on
    fresh data on the avx2vnni path: exact against the references, W8A8 bit-identical to avx2's."""
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    b[::row_step, ::col_step] = -128
    x = torch.randn(m, k, generator=gen)
    w, s = make_w8(gen, n, k)
    got = {}
    for isa in ("avx2vnni", "avx2"):
        with cpu_isa(isa):
            got[isa] = (native("int8_gemm")(a, b), native("linear_w8a8")(x, w, s, None))
    assert torch.equal(got["avx2vnni"][0], ops.int8_gemm_ref(a, b)), (m, n, k)
    assert torch.equal(got["avx2vnni"][1], ops.linear_w8a8_ref(x, w, s, None)), (m, n, k)
    assert torch.equal(got["avx2vnni"][1], got["avx2"][1]), (m, n, k)


@NATIVE
@pytest.mark.parametrize("m", [4, 8, 9, 15, 16, 17, 23, 24, 33, 40, 48, 64, 65, 130])
def test_avx2vnni_gemm_tails(m, gen, monkeypatch):
    # The AVX-VNNI GEMM (avx2vnni path: matmul_vnni256) with the GEMV and the small-layer
    # kernels turned off: x + 128 packed in 64-row blocks (16/32/48-row last blocks: m = 17,
    # 33, 48, 65, 130) taken 16 rows at a time in 6-row weight tiles, a last slice of at most 8
    # real rows (m = 4, 8, 17, 23, 24, 40, 65, 130) 8 at a time in 12-row tiles, their 1-row
    # tails (n = 1..7, 12, 13, 25, 37, 101), 2048-byte K blocks (k = 4099: two and a partial third) and K % 4 tails,
    # the weight row sums subtracted, 8 x 8 transposed output. int8_gemm exact (-128
    # included), W8A8 bit-identical to the reference and to the avx2 path, 1 and 2 threads
    # equal; then the default thresholds (the GEMV up to m = 7) on the same shapes.
    isa_or_skip("avx2vnni")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
    monkeypatch.setenv("FASTKERN_INT8_GEMV_MAX_M", "3")
    for n in (1, 2, 3, 5, 6, 7, 12, 13, 25, 37, 101):
        for k in (1, 3, 4, 17, 130, 2049, 4099):
            if k > 200 and n not in (7, 37, 101):
                continue
            check_avx2vnni_exact(gen, m, n, k, 3, 5)
    with cpu_isa("avx2vnni"):
        int8_threads_check(gen, m, 101, 4099, min_rows=True)
        monkeypatch.delenv("FASTKERN_INT8_GEMV_MAX_M")
        monkeypatch.delenv("FASTKERN_INT8_WV_MAX_M")
        int8_threads_check(gen, m, 37, 1100)
        int8_threads_check(gen, m, 384, 384)


@NATIVE
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_avx2vnni_gemv(m, gen, monkeypatch):
    # The AVX-VNNI GEMV (avx2vnni path: gemv_vnni256): one weight row at a time against passes
    # of up to 8 rows of x (m = 9: 5 + 4, 16: 8 + 8, 17: 6 + 6 + 5, through
    # FASTKERN_INT8_GEMV_MAX_M), 4 / 2 / 1 accumulators per row (m = 1 / 2-3 / 4+) over K
    # steps of 128 / 64 / 32 bytes and their tails (k = 1..33, 95, 127, 129), the last K % 32
    # bytes copied (the tensor's last row never read past its end), the weight flipped to
    # w + 128 and 128 * sum(x) subtracted. int8_gemm exact (-128 included), W8A8
    # bit-identical to the reference and to the avx2 path, 1 and 2 threads equal; the small
    # layers come here too.
    isa_or_skip("avx2vnni")
    monkeypatch.setenv("FASTKERN_INT8_GEMV_MAX_M", "17")
    for n in (1, 2, 5, 13, 64):
        for k in (1, 2, 31, 32, 33, 95, 127, 129, 4099):
            check_avx2vnni_exact(gen, m, n, k, 2, 7)
    with cpu_isa("avx2vnni"):
        int8_threads_check(gen, m, 301, 1100, min_rows=True)
        monkeypatch.delenv("FASTKERN_INT8_GEMV_MAX_M")
        int8_threads_check(gen, m, 384, 384)
        int8_threads_check(gen, m, 70, 4099)


@NATIVE
@pytest.mark.parametrize("m", [3, 4, 5, 6, 7, 8, 9, 12, 13, 23, 24, 25])
def test_avx2_gemv_passes(m, gen, monkeypatch):
    # AVX2 without VNNI, 3 <= m <= 24 on weights the small-layer kernels leave alone: the GEMV in
    # passes of up to 4 rows of x (m = 5: 3 + 2, 7: 4 + 3, 9: 3 + 3 + 3, 23: 4 x 4 + 3 x 2), one
    # weight row per step (2 accumulators per row of x in 4-row passes) or three (passes of 3
    # and 4 rows; FASTKERN_S16_GEMV_NR=3 / 1 force either, the default picks by m and K), n
    # tails of the three-row steps, K tails of 16 and 64; exact for int8_gemm, bit-identical
    # W8A8, 1 and 2 threads equal. m = 25 runs the GEMM tiles; FASTKERN_INT8_GEMV_MAX_M holds the
    # GEMV's range at 24 (by default the GEMM takes m >= 16 on these small weights), then sends
    # each m to the other path, which gives the same bits.
    isa_or_skip("avx2")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
    monkeypatch.setenv("FASTKERN_INT8_GEMV_MAX_M", "24")
    with cpu_isa("avx2"):
        for nr in ("3", "1"):
            monkeypatch.setenv("FASTKERN_S16_GEMV_NR", nr)
            for n, k in ((1, 1), (5, 17), (19, 64), (37, 1100), (70, 4099)):
                check_int8_exact(gen, m, n, k)
        monkeypatch.delenv("FASTKERN_S16_GEMV_NR")
        a, b, x, w, s, one = int8_threads_check(gen, m, 300, 1000)
        monkeypatch.setenv("FASTKERN_INT8_GEMV_MAX_M", "3" if m <= 24 else "32")
        assert torch.equal(native("int8_gemm")(a, b), one[0])
        assert torch.equal(native("linear_w8a8")(x, w, s, None), one[1])
        check_int8_exact(gen, m, 37, 1100)


@NATIVE
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9])
def test_avx2_gemv_int8_x(m, gen, monkeypatch):
    # AVX2 without VNNI, the GEMV on int8 x (the sign trick: vpmaddubsw(|w|, x * sign(w)), taken
    # at m = 1 and where a pass's int16 x outgrows the L1d; FASTKERN_I8S_GEMV_MAX_M=9 / 0 force
    # it on / off): passes of up to 4 rows (m = 5: 3 + 2, 9: 3 + 3 + 3), 2 / 1 accumulators per
    # row, K in 64-byte steps with 32-byte tails (k = 1, 31, 32, 33, 95, 4099) copied from the
    # weight row. Weights hold -128 (|w| = 128 as the unsigned operand); x at +-127 against
    # -128 weights gives the largest pair sums (2 x 128 x 127, under int16's limit). int8_gemm
    # exact, also where x holds -128 (which the trick cannot take: it runs the int16 GEMV), and
    # W8A8 bit-identical to the reference, on and off; 1 and 2 threads equal.
    isa_or_skip("avx2")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
    with cpu_isa("avx2"):
        for on in ("9", "0"):
            monkeypatch.setenv("FASTKERN_I8S_GEMV_MAX_M", on)
            for n, k in ((1, 1), (3, 31), (5, 32), (7, 33), (19, 95), (37, 1100), (6, 4099)):
                a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
                b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
                b[::2, ::3] = -128
                assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b)), (m, n, k)
                a[0, k // 2] = -128
                assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b)), (m, n, k)
                a = torch.full((m, k), -127, dtype=torch.int8)
                a[:, ::5] = 127
                b = torch.full((n, k), -128, dtype=torch.int8)
                assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b)), (m, n, k)
                x = torch.randn(m, k, generator=gen)
                w, s = make_w8(gen, n, k)
                w[::3, ::2] = -128
                assert torch.equal(native("linear_w8a8")(x, w, s, None), ops.linear_w8a8_ref(x, w, s, None)), (m, n, k)
            int8_threads_check(gen, m, 301, 2000, min_rows=True, a_low=-127)


@NATIVE
@pytest.mark.parametrize("m", [17, 24, 70, 257])
def test_w8a16_avx2_gemm_tails_and_threads(m, gen, monkeypatch):
    # AVX2 without AVX-512, above the GEMV's rows (moved down to 16 here, so that m = 17..128
    # reach the GEMM too): the fp32 GEMM (skinny_gemm up to m = 256, blocked_gemm at
    # 257) with its B slivers dequantized from the int8 rows in 8 x 8 blocks (K tails element by
    # element): sliver (16-column) tails in N, K within and across 192-wide KC blocks; 1 and 2
    # threads bitwise equal; FASTKERN_W8A16_AVX2=panel still runs the dequantized panels.
    isa_or_skip("avx2")
    monkeypatch.setenv("FASTKERN_W8A16_GEMV_MAX_M", "16")
    check_w8a16_avx2(gen, m, ((1, 1), (5, 7), (16, 9), (17, 33), (37, 300), (70, 1100)), monkeypatch,
                     "FASTKERN_W8A16_AVX2", "panel")


def check_w8a16_avx2(gen, m, shapes, monkeypatch, alt_var, alt_value):
    """linear_w8a16 on the AVX2 path for each (n, k): 1 and 2 threads bitwise equal and the
    reference's results, and again with alt_var=alt_value (the path it selects instead)."""
    with cpu_isa("avx2"):
        for n, k in shapes:
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            ref = ops.linear_w8a16_ref(x, w, s, None)
            one, two = on_1_and_2_threads(native("linear_w8a16"), x, w, s, None)
            assert torch.equal(one, two), (n, k)
            assert_close_rel(two, ref, torch.float32)
            monkeypatch.setenv(alt_var, alt_value)
            assert_close_rel(native("linear_w8a16")(x, w, s, None), ref, torch.float32)
            monkeypatch.delenv(alt_var)


@NATIVE
@pytest.mark.parametrize("m", [1, 2, 3])
def test_w8a16_avx2_streaming_gemv(m, gen, monkeypatch):
    # AVX2, m <= 2: linear_w8a16's GEMV streams one weight row at a time (8 or 4 accumulators
    # per row of x, 64-column steps, 8-column K tails through a zeroed copy of the row's end);
    # m = 3 and FASTKERN_W8A16_STREAM=0 run the 4-row tiles. Against the reference, 1 and 2
    # threads bitwise equal.
    isa_or_skip("avx2")
    check_w8a16_avx2(gen, m, ((1, 1), (3, 7), (5, 63), (9, 64), (13, 65), (70, 1100), (37, 4099)), monkeypatch,
                     "FASTKERN_W8A16_STREAM", "0")


@NATIVE
@pytest.mark.parametrize("m", [1, 2])
def test_w8a16_avx2_streaming_gemv_k_blocks(m, gen, monkeypatch):
    # AVX2, m <= 2, the streaming GEMV in chunks of 8 weight rows (tails: n = 1, 7, 9, 17, 37)
    # through K blocks of 2048 columns, the accumulators parked between blocks (k = 2049, 4099,
    # 6150: a last block of 1, 3 or 6 columns; k = 2048, 4096: whole blocks only), forced on with
    # FASTKERN_W8F_KBLOCK=1: bitwise the one-pass result (=0), within the contract of the
    # reference, 1 and 2 threads bitwise equal; the default (blocks where x takes over half the
    # L1d) gives one of the two.
    isa_or_skip("avx2")
    with cpu_isa("avx2"):
        for n, k in ((1, 1), (7, 65), (9, 2048), (17, 2049), (37, 4099), (9, 4096), (20, 6150)):
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            ref = ops.linear_w8a16_ref(x, w, s, None)
            monkeypatch.setenv("FASTKERN_W8F_KBLOCK", "0")
            flat = native("linear_w8a16")(x, w, s, None)
            monkeypatch.setenv("FASTKERN_W8F_KBLOCK", "1")
            one, two = on_1_and_2_threads(native("linear_w8a16"), x, w, s, None)
            assert torch.equal(one, two) and torch.equal(one, flat), (n, k)
            assert_close_rel(one, ref, torch.float32)
            monkeypatch.delenv("FASTKERN_W8F_KBLOCK")
            assert torch.equal(native("linear_w8a16")(x, w, s, None), flat), (n, k)


@NATIVE
@pytest.mark.parametrize("isa,m", [("avx2", 1), ("avx2", 2), ("avx512", 1), ("avx512", 2), ("avx512", 3)])
def test_w8a16_limb_gemv(isa, m, gen, monkeypatch):
    # m <= 2 (AVX2) / 3 (AVX-512): the GEMV on two int16 limbs of x per row and block of 1024
    # columns (x ~ s_b (a1 + a2 / 65534)); AVX2 on vpmaddwd in groups of 4 (m = 1) / 2 weight
    # rows, AVX-512 on vpdpwssd (AVX512-VNNI) in groups of 2 / 4 / 3 (the rest of a chunk of 8
    # rows in a group of its own). K tails of the 16-, 32- and 64-column steps and of the limb
    # blocks (k = 1023..1025, 2049: a last block of one column) within and across the
    # 2048-column K blocks; blocks of very different magnitudes (each row and block its own
    # scale), a block of zeros and values at +-absmax; every row within the contract of the
    # reference, 1 and 2 threads bitwise equal, and not the fp32 GEMV's result
    # (FASTKERN_W8A16_LIMBS=0), so the limbs ran. A block of one row whose largest |x| is under
    # 1e-30 (and not zero) sends the call to the fp32 GEMV, bitwise.
    isa_or_skip(isa)
    if isa == "avx512" and not _C.cpu_features()["avx512vnni"]:
        pytest.skip("no AVX-512 VNNI")
    with cpu_isa(isa):
        for n, k in ((1, 1), (3, 15), (5, 16), (7, 17), (9, 31), (2, 33), (9, 63), (13, 1023), (6, 1024),
                     (11, 1025), (17, 2049), (37, 4099), (9, 6150), (70, 2100)):
            x = torch.randn(m, k, generator=gen)
            x *= 10.0 ** torch.randint(-6, 7, (m, (k + 1023) // 1024), generator=gen).repeat_interleave(1024, 1)[:, :k]
            if k > 2048:
                x[:, 1024:2048] = 0
            x[:, k // 2] = -x.abs().amax(1) if k > 1 else x[:, 0]
            w, s = make_w8(gen, n, k)
            ref = ops.linear_w8a16_ref(x, w, s, None)
            one, two = on_1_and_2_threads(native("linear_w8a16"), x, w, s, None)
            assert torch.equal(one, two), (n, k)
            for i in range(m):
                assert_close_rel(one[i], ref[i], torch.float32)
            monkeypatch.setenv("FASTKERN_W8A16_LIMBS", "0")
            fp32 = native("linear_w8a16")(x, w, s, None)
            monkeypatch.delenv("FASTKERN_W8A16_LIMBS")
            if k >= 1024:
                assert not torch.equal(one, fp32), (n, k)
            if k > 1100:
                x[m - 1, 1030:1100] = 1e-33 * torch.randn(70, generator=gen)
                x[m - 1, 1024:1030] = 0
                x[m - 1, 1100:2048] = 0
                monkeypatch.setenv("FASTKERN_W8A16_LIMBS", "0")
                fp32 = native("linear_w8a16")(x, w, s, None)
                monkeypatch.delenv("FASTKERN_W8A16_LIMBS")
                assert torch.equal(native("linear_w8a16")(x, w, s, None), fp32), (n, k)
                ref = ops.linear_w8a16_ref(x, w, s, None)
                for i in range(m):
                    assert_close_rel(fp32[i], ref[i], torch.float32)


@NATIVE
@pytest.mark.parametrize("m", [4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 32])
def test_w8a16_avx512_gemv_tiles(m, gen, monkeypatch):
    # AVX-512, 4 <= m <= 24 (32 under a 48 KiB L1d, and here through FASTKERN_W8A16_TILE_MAX_M;
    # bf16 x with AVX512-BF16: <= 12): linear_w8a16's GEMV tiles, MR
    # rows of x x NR weight rows ((4..6) x 4, (7, 8) x 3), in passes of at most 8 rows spread
    # evenly (9: 5 + 4, 17: 6 + 6 + 5), single-row tiles for the n % NR rows, 64-column steps
    # and masked 16-column K tails. Against the reference, 1 and 2 threads bitwise equal, and
    # FASTKERN_W8A16_TILE_MAX_M=0 (the 3-row GEMV / the GEMMs) within the contract as well.
    from conftest import isa_skip_reason

    why = isa_skip_reason("avx512")
    if why:
        pytest.skip(why)
    tile_max = "32" if m > 24 else ""
    with cpu_isa("avx512"):
        for n, k in ((1, 1), (5, 15), (7, 16), (13, 63), (4, 64), (9, 65), (70, 1100), (37, 4500)):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = torch.randn(m, k, generator=gen).to(dtype)
                w, s = make_w8(gen, n, k)
                ref = ops.linear_w8a16_ref(x, w, s, None)
                monkeypatch.setenv("FASTKERN_W8A16_TILE_MAX_M", tile_max)
                one, two = on_1_and_2_threads(native("linear_w8a16"), x, w, s, None)
                assert torch.equal(one, two), (n, k, dtype)
                assert_close_rel(two, ref, dtype)
                monkeypatch.setenv("FASTKERN_W8A16_TILE_MAX_M", "0")
                assert_close_rel(native("linear_w8a16")(x, w, s, None), ref, dtype)
                monkeypatch.delenv("FASTKERN_W8A16_TILE_MAX_M")


@NATIVE
@pytest.mark.parametrize("m", [17, 20, 24, 26, 27, 28, 31, 33, 44, 76, 140])
def test_w8a16_bf16_gemm_tail(m, gen, monkeypatch):
    # bf16 x with AVX512-BF16, above the tiles: m = 16 j + r runs the last r rows within the
    # vdpbf16ps GEMM (against each weight panel after its tiles) where K is a multiple of 32 and
    # r <= 10 (8 below K = 4096; FASTKERN_W8A16_BF16_TAIL, up to 12, here). The first 16 j rows are
    # bit for bit the GEMM's on them alone, the last r match the reference, 1 and 2 threads agree.
    # 140 x 32 against 140000 weight rows: the GEMM runs M in passes of 64 rows there, the tail
    # within the second.
    from conftest import isa_skip_reason

    why = isa_skip_reason("avx512")
    if why:
        pytest.skip(why)
    if not _C.cpu_features()["avx512bf16"]:
        pytest.skip("the vdpbf16ps GEMM needs AVX512-BF16")
    r = m % 16
    shapes = ((250, 1024), (37, 4096), (13, 544), (7, 32)) if m != 140 else ((140000, 32),)
    with cpu_isa("avx512"):
        for knob in ("12", "3", None):
            for i, (n, k) in enumerate(shapes):
                x = torch.randn(m, k, generator=gen).bfloat16()
                w, s = make_w8(gen, n, k)
                b = torch.randn(n, generator=gen) if i != 1 else None
                if knob is None:
                    monkeypatch.delenv("FASTKERN_W8A16_BF16_TAIL", raising=False)
                    within = r <= (10 if k >= 4096 else 8)
                else:
                    monkeypatch.setenv("FASTKERN_W8A16_BF16_TAIL", knob)
                    within = r <= int(knob)
                xi = x.reshape(1, m, k) if i == 2 else x
                one, two = on_1_and_2_threads(native("linear_w8a16"), xi, w, s, b)
                assert torch.equal(one, two), (n, k, knob)
                two = two.reshape(m, n)
                assert_close_rel(two, ops.linear_w8a16_ref(x, w, s, b), torch.bfloat16)
                if not within:
                    continue
                # the head: the GEMM alone (no tiles, no tail of either kind)
                monkeypatch.setenv("FASTKERN_W8A16_BF16_TAIL", "0")
                monkeypatch.setenv("FASTKERN_W8A16_GEMV_TAIL", "0")
                monkeypatch.setenv("FASTKERN_W8A16_TILE_MAX_M", "0")
                head = m - r
                assert torch.equal(two[:head], native("linear_w8a16")(x[:head], w, s, b)), (n, k, knob)
                # the tail against the reference on its rows alone (and so not the GEMM's
                # zero-padded vector: a sum left out or counted twice shows here)
                assert_close_rel(two[head:], ops.linear_w8a16_ref(x[head:], w, s, b), torch.bfloat16)
                monkeypatch.delenv("FASTKERN_W8A16_GEMV_TAIL")
                monkeypatch.delenv("FASTKERN_W8A16_TILE_MAX_M")


@NATIVE
@pytest.mark.parametrize("m", [16, 17, 20, 21, 25, 27, 28, 33, 43, 44])
def test_w8a16_gemv_tail(m, gen, monkeypatch):
    # AVX-512, above the tiles (held to 24 here, 12 for bf16 x with AVX512-BF16): m = 16 j + r
    # with 1 <= r <= 11 (fp32 / fp16 x, the fp32 GEMM) or 2 (bf16 x, the vdpbf16ps GEMM; 4 here), j >= 1:
    # the GEMM takes the first 16 j rows and a call of their own (the tiles, the GEMV) the last r
    # (by default from 1M weight elements; FASTKERN_W8A16_GEMV_TAIL here, for any size), so
    # each part is bit for bit what its own call gives on those rows alone, bias included;
    # other m keep the GEMM on all rows. 3-D x for one shape, 1 and 2 threads equal, and the
    # default on a weight of 1M elements against the reference.
    from conftest import isa_skip_reason

    why = isa_skip_reason("avx512")
    if why:
        pytest.skip(why)
    bf16_gemm = _C.cpu_features()["avx512bf16"]
    r = m % 16
    with cpu_isa("avx512"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            is_bf16 = dtype == torch.bfloat16 and bf16_gemm
            gemm = m > (12 if is_bf16 else 24)
            tail = r if gemm and m > 16 and 1 <= r <= (4 if is_bf16 else 11) else 0
            monkeypatch.setenv("FASTKERN_W8A16_TILE_MAX_M", "12" if is_bf16 else "24")
            for i, (n, k) in enumerate(((250, 1030), (37, 4500), (13, 517))):
                x = torch.randn(m, k, generator=gen).to(dtype)
                w, s = make_w8(gen, n, k)
                b = torch.randn(n, generator=gen) if i != 1 else None
                monkeypatch.setenv("FASTKERN_W8A16_GEMV_TAIL", "4" if is_bf16 else "11")
                xi = x.reshape(1, m, k) if i == 2 else x
                one, two = on_1_and_2_threads(native("linear_w8a16"), xi, w, s, b)
                assert torch.equal(one, two), (n, k, dtype)
                two = two.reshape(m, n)
                assert_close_rel(two, ops.linear_w8a16_ref(x, w, s, b), dtype)
                monkeypatch.setenv("FASTKERN_W8A16_GEMV_TAIL", "0")
                head = m - tail
                if gemm:  # the head on the GEMM alone (16 rows would take the tiles by themselves)
                    monkeypatch.setenv("FASTKERN_W8A16_TILE_MAX_M", "0")
                assert torch.equal(two[:head], native("linear_w8a16")(x[:head], w, s, b)), (n, k, dtype)
                monkeypatch.setenv("FASTKERN_W8A16_TILE_MAX_M", "12" if is_bf16 else "24")
                if tail:
                    assert torch.equal(two[head:], native("linear_w8a16")(x[head:], w, s, b)), (n, k, dtype)
            monkeypatch.delenv("FASTKERN_W8A16_GEMV_TAIL")
            monkeypatch.delenv("FASTKERN_W8A16_TILE_MAX_M")
            x = torch.randn(m, 1024, generator=gen).to(dtype)
            w, s = make_w8(gen, 1024, 1024)
            assert_close_rel(native("linear_w8a16")(x, w, s, None), ops.linear_w8a16_ref(x, w, s, None), dtype)


@NATIVE
@pytest.mark.parametrize("x_l1", ["1", "0"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 12, 13, 14, 17, 18, 20, 21, 23, 24])
def test_vnni_gemv_blocked(m, x_l1, gen, monkeypatch):
    # AVX-512 VNNI: int8_gemm / linear_w8a8 run gemv_vnni_blocked for 5 <= m <= 12, for
    # 17 <= m <= 20 where K <= 4096 (the GEMM above it), and for m <= 4 where the m rows of x
    # exceed 24 KB (K = 7000 at m = 4, 9000 at m = 3, 30000 at m = 1 and 2; otherwise the one-row
    # GEMV). Passes of at most 8 rows (9: 5 + 4; 17, 18, 20: 6 + 6 + 5, 6 + 6 + 6, 7 + 7 + 6; 13,
    # 14, 21, 23, 24 with FASTKERN_INT8_ROW_MAX_M=24, as the wide rule (test_vnni_row_wide) takes
    # them on larger weights: 7 + 6, 7 + 7, 7 + 7 + 7, 8 + 8 + 7, 8 + 8 + 8); x whole where a pass holds
    # at most 32 KB of it and 2/3 of the L1d (FASTKERN_INT8_ROW_X_L1=0: 32 KB alone; the two
    # differ on an L1d under 48 KiB: on 32 KiB at K = 4096 with 6 to 8 rows a pass), else in 8 KB K blocks
    # (K = 4500 at m = 8: 4 x 1024 + 404; K = 30000 at m = 1: 3 x 8192 + 5424; masked last
    # 64-byte steps); each thread's rows in 128 KB blocks
    # (70 x 4500: 28 rows), the full int8 range (-128 included). Exact against the reference,
    # 1 and 2 threads bitwise equal, and the GEMM (FASTKERN_INT8_ROW_MAX_M=0) equal.
    from conftest import isa_skip_reason

    why = isa_skip_reason("avx512")
    if why or not _C.cpu_features()["avx512vnni"]:
        pytest.skip(why or "no AVX-512 VNNI")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")  # the small-layer kernels would take these weights
    monkeypatch.setenv("FASTKERN_INT8_ROW_X_L1", x_l1)
    default_path = m <= 12 or 17 <= m <= 20
    if not default_path:
        monkeypatch.setenv("FASTKERN_INT8_ROW_MAX_M", "24")
    with cpu_isa("avx512"):
        for n, k in ((1, 1), (5, 63), (7, 64), (13, 65), (70, 1100), (70, 4096), (70, 4500), (37, 7000), (9, 9000),
                     (5, 30000)):
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            both = lambda: (native("int8_gemm")(a, b), native("linear_w8a8")(x, w, s, None))
            one, two = on_1_and_2_threads(both)
            assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]), (n, k)
            assert torch.equal(two[0], ops.int8_gemm_ref(a, b)), (n, k)
            assert torch.equal(two[1], ops.linear_w8a8_ref(x, w, s, None)), (n, k)
            monkeypatch.setenv("FASTKERN_INT8_ROW_MAX_M", "0")
            gemm = both()
            assert torch.equal(gemm[0], two[0]) and torch.equal(gemm[1], two[1]), (n, k)
            monkeypatch.setenv("FASTKERN_INT8_ROW_MAX_M", "24")
            if default_path:
                monkeypatch.delenv("FASTKERN_INT8_ROW_MAX_M")


@NATIVE
@pytest.mark.parametrize("m", [13, 15, 16, 21, 24, 25])
def test_vnni_row_wide(m, gen, monkeypatch):
    # AVX-512 VNNI, under a 48 KiB L1d (FASTKERN_INT8_ROW_WIDE=1 forces it on any): the row GEMV
    # also takes M = 13..15 and 17..24 on weights of 4M elements or more, K blocks included
    # (K = 8200 here: x in 8 KB blocks and a masked last step); M = 16 and 25 stay on the GEMM.
    # Either rule gives the reference's exact integers, for int8_gemm and linear_w8a8 (3-D x),
    # on 1 and 2 threads.
    from conftest import isa_skip_reason

    why = isa_skip_reason("avx512")
    if why or not _C.cpu_features()["avx512vnni"]:
        pytest.skip(why or "no AVX-512 VNNI")
    n, k = 512, 8200
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    x = torch.randn(1, m, k, generator=gen)
    w, s = make_w8(gen, n, k)
    ref = ops.int8_gemm_ref(a, b), ops.linear_w8a8_ref(x, w, s, None)
    with cpu_isa("avx512"):
        for wide in ("1", "0"):
            monkeypatch.setenv("FASTKERN_INT8_ROW_WIDE", wide)
            one, two = on_1_and_2_threads(lambda: (native("int8_gemm")(a, b), native("linear_w8a8")(x, w, s, None)))
            for got in (one, two):
                assert torch.equal(got[0], ref[0]), (m, wide)
                assert torch.equal(got[1], ref[1]), (m, wide)


@NATIVE
@pytest.mark.parametrize("m", [32, 33, 36, 37, 43, 49, 52, 65, 79])
def test_vnni_gemv_tail(m, gen, monkeypatch):
    # AVX-512 VNNI: where the GEMM takes m = 16 j + r, the last r rows go to the GEMV within the
    # GEMM, over each task's weight rows after its tiles (by default r <= 11 from 1M weight
    # elements; FASTKERN_INT8_GEMV_TAIL=15 here, for any size, so every r > 0 and two GEMV passes
    # from r = 9). Each part is bit for bit its own call on those rows alone (int8_gemm;
    # linear_w8a8 with bias and 3-D x) and exact against the reference, 1 and 2 threads equal.
    # The weights: one task per thread, several (250 x 1100: 96-row tasks, the last short) and
    # K blocks of the GEMM (37 x 4500), K % 64 != 0 and N under one tile (13 x 63).
    # FASTKERN_INT8_ROW_MAX_M=32 makes the rows before a tail of m = 33..47 the GEMV's in a call
    # of m - r rows, not here: the GEMM still takes them with the tail.
    from conftest import isa_skip_reason

    why = isa_skip_reason("avx512")
    if why or not _C.cpu_features()["avx512vnni"]:
        pytest.skip(why or "no AVX-512 VNNI")
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")  # the small-layer kernels would take these weights
    head = m - m % 16

    def same(p, q):  # bit for bit, NaN where the other has NaN
        return torch.equal(p.isnan(), q.isnan()) and torch.equal(p.nan_to_num(), q.nan_to_num())

    with cpu_isa("avx512"):
        for i, (n, k) in enumerate(((70, 1100), (37, 4500), (13, 63), (250, 1100))):
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            x = torch.randn(m, k, generator=gen)
            if i == 2:
                x[-1, :7] = float("nan")  # a NaN row (in the tail where m % 16 > 0): NaN out, as the reference
            w, s = make_w8(gen, n, k)
            bias = torch.randn(n, generator=gen) if i != 1 else None
            xi = x.reshape(1, m, k) if i == 0 else x
            ref = ops.int8_gemm_ref(a, b), ops.linear_w8a8_ref(x, w, s, bias)
            for row_max in ("", "32"):
                monkeypatch.setenv("FASTKERN_INT8_ROW_MAX_M", row_max)
                monkeypatch.setenv("FASTKERN_INT8_GEMV_TAIL", "15")
                one, two = on_1_and_2_threads(lambda: (native("int8_gemm")(a, b), native("linear_w8a8")(xi, w, s, bias)))
                assert torch.equal(one[0], two[0]), (n, k)
                assert same(one[1], two[1]), (n, k)
                assert torch.equal(two[0], ref[0]), (n, k, row_max)
                assert same(two[1].reshape(m, n), ref[1]), (n, k, row_max)
                if row_max:
                    continue
                monkeypatch.setenv("FASTKERN_INT8_GEMV_TAIL", "0")
                assert torch.equal(two[0][:head], native("int8_gemm")(a[:head], b)), (n, k)
                head_y = native("linear_w8a8")(x[:head], w, s, bias)
                assert same(two[1].reshape(m, n)[:head], head_y), (n, k)
                if head < m:
                    assert torch.equal(two[0][head:], native("int8_gemm")(a[head:], b)), (n, k)
                    tail_y = native("linear_w8a8")(x[head:], w, s, bias)
                    assert same(two[1].reshape(m, n)[head:], tail_y), (n, k)
                    assert two[1].reshape(m, n)[-1].isnan().all() == (i == 2), (n, k)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [4, 7, 12, 17, 40, 128])
def test_gemv_row_blocks(isa, m, gen, monkeypatch):
    # GEMVs with more than one pass over the weight take each thread's rows in blocks, all
    # passes over a block before the next: linear_w8a16's GEMV (3 rows of x per pass, up to
    # m = 128 on AVX2 and 16 generic; AVX-512 tiles of up to 8 rows per pass to m = 24) and the
    # AVX2 int8 GEMV (4-row passes; held to m = 24 here, where by default the GEMM takes these
    # small weights from m = 16). FASTKERN_GEMV_BLOCK_KB=1 makes the blocks 16 rows (several per
    # thread, the last one short), 0 turns them off: the same bits either way, on 1 and 2
    # threads, and the reference's results.
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")
    if isa == "avx2":
        monkeypatch.setenv("FASTKERN_INT8_GEMV_MAX_M", "24")
    with cpu_isa(isa):
        for n, k in ((70, 1100), (250, 4500)):
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            outs = {}
            for kb in ("0", "1", "256"):
                monkeypatch.setenv("FASTKERN_GEMV_BLOCK_KB", kb)
                outs[kb] = on_1_and_2_threads(
                    lambda: (native("linear_w8a16")(x, w, s, None), native("int8_gemm")(a, b),
                             native("linear_w8a8")(x, w, s, None)))
            base = outs["0"][0]
            for one, two in outs.values():
                for u, v, o in zip(one, two, base):
                    assert torch.equal(u, o) and torch.equal(v, o), (n, k)
            assert_close_rel(base[0], ops.linear_w8a16_ref(x, w, s, None), torch.float32)
            assert torch.equal(base[1], ops.int8_gemm_ref(a, b))
            assert torch.equal(base[2], ops.linear_w8a8_ref(x, w, s, None))


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 9, 17, 40])
def test_int8_minus_128_exact_on_every_path(isa, m, gen):
    # -128 in x and in the weight (vpmaddubsw-style tricks break there; the AVX2 kernels widen
    # to int16, VNNI offsets x): all -128 (the largest dot product), -128 against 127, and
    # random rows with -128 mixed in; int8_gemm exact, and W8A8 with -128 weights bit-identical
    with cpu_isa(isa):
        for n, k in ((5, 1), (9, 31), (37, 1030), (8, 4099)):
            a = torch.full((m, k), -128, dtype=torch.int8)
            b = torch.full((n, k), -128, dtype=torch.int8)
            b[0] = 127
            out = native("int8_gemm")(a, b)
            assert torch.equal(out, ops.int8_gemm_ref(a, b)), (n, k)
            assert out[0, 1].item() == k * 128 * 128
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            a[:, ::3] = -128
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            b[:, 1::2] = -128
            assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b)), (n, k)
            x = torch.randn(m, k, generator=gen)
            s = torch.rand(n, generator=gen) + 0.5
            assert torch.equal(native("linear_w8a8")(x, b, s, None), ops.linear_w8a8_ref(x, b, s, None)), (n, k)


@NATIVE
@pytest.mark.parametrize("m", [1, 3, 4, 40])
def test_avx2_panel_path_still_selectable(m, gen, monkeypatch):
    # FASTKERN_INT8_AVX2=panel: the previous AVX2 kernels (int16 panels), kept for A/B timing
    isa_or_skip("avx2")
    monkeypatch.setenv("FASTKERN_INT8_AVX2", "panel")
    with cpu_isa("avx2"):
        for n, k in ((9, 17), (70, 1100)):
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b))
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            assert torch.equal(native("linear_w8a8")(x, w, s, None), ops.linear_w8a8_ref(x, w, s, None))


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [2, 24, 64])
def test_int8_threads_bitwise_identical_large(isa, m, gen):
    # enough weight rows for several tasks per thread and uneven thread shares, K over two
    # K blocks; a GEMV row count and two GEMM ones
    n, k = 523, 2100
    with cpu_isa(isa):
        int8_threads_check(gen, m, n, k)


@NATIVE
def test_w8a16_larger_shapes(gen):
    # several panels in N and K, with 2 threads
    x = torch.randn(33, 2100, generator=gen)
    w, s = make_w8(gen, 200, 2100)
    assert_close_rel(native("linear_w8a16")(x, w, s, None), ops.linear_w8a16_ref(x, w, s, None), torch.float32)
    assert torch.equal(native("linear_w8a8")(x, w, s, None), ops.linear_w8a8_ref(x, w, s, None))


@NATIVE
@pytest.mark.parametrize("op", W8_OPS)
@pytest.mark.parametrize("m", [1, 2, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_propagates(op, m, dtype, gen):
    x = torch.randn(m, 40, generator=gen).to(dtype)
    x[0, 5] = float("nan")
    w, s = make_w8(gen, 9, 40)
    out = native(op)(x, w, s, None)
    assert torch.isnan(out[0]).all()
    if m > 1:
        assert torch.isfinite(out[1:]).all()
        assert_close_rel(out[1:], getattr(ops, op + "_ref")(x[1:], w, s, None), dtype)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_activations_every_path(isa, dtype, gen):
    """|x| beyond 1e30 against ordinary weight scales: linear_w8a16's GEMVs, tiles and bf16
    GEMM sum x * q before the scale and would overflow (x = 3e38 gave inf where the
    reference's x * (q * s) is finite), so such inputs take the paths that dequantize the
    weight first; linear_w8a8 scales in double. Every M from the GEMVs to the GEMMs: NaN and
    inf exactly where the reference has them, the finite outputs within the contract."""
    w, s = make_w8(gen, 37, 512)
    with cpu_isa(isa):
        for op in W8_OPS:
            for m in (1, 3, 8, 13, 20, 40, 64, 130):
                for big in (3e38, -1e35, 1e31):
                    x = torch.randn(m, 512, generator=gen).to(dtype)
                    if m < 130:  # m = 130: only the last row's, past the first 65536 elements
                        x[0, 5] = big
                    x[m - 1, 300] = -big / 3
                    out = native(op)(x, w, s, None)
                    ref = getattr(ops, op + "_ref")(x, w, s, None)
                    assert_nonfinite_as_reference(out, ref, dtype, (op, m, big))


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
def test_w8a8_quantization_edge_rows(isa, gen):
    # an all-zero row, a row with inf, ties at .5 after division, a tiny row
    x = torch.randn(5, 50, generator=gen)
    x[0] = 0
    x[1, 3] = float("inf")
    x[2] = torch.arange(50, dtype=torch.float32) - 24.5
    x[3] *= 1e-30
    w, s = make_w8(gen, 11, 50)
    with cpu_isa(isa):
        out = native("linear_w8a8")(x, w, s, None)
    ref = ops.linear_w8a8_ref(x, w, s, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)  # exact, NaN row included
    assert (out[0] == 0).all() and torch.isnan(out[1]).all()


def edge_rows_x(gen, m, k):
    """x [m, k] fp32 with an all-zero row, rows holding inf / NaN, ties at .5 after the
    division, a tiny row and a huge one among random rows."""
    x = torch.randn(m, k, generator=gen)
    x[0] = 0
    x[1, k // 2] = float("inf")
    x[2, k - 1] = float("nan")
    x[3] = (torch.arange(k, dtype=torch.float32) % 255 - 127) * 0.5 + 0.25 * (torch.arange(k) % 2)
    x[4] *= 1e-30
    x[m - 1] *= 1e30
    return x


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
@pytest.mark.parametrize("m", [21, 33, 64, 70, 130, 300])
def test_w8a8_gemm_quantization_edge_rows(isa, m, gen, monkeypatch):
    # The GEMM paths quantize x straight into their packed layouts (AVX-512 VNNI: 16 rows at a
    # time, 64 columns per transposed block; avx2vnni 8 rows, 32 columns; AVX2 int16 pairs, 8
    # rows, 16 columns): edge rows, rows past m in the last group and block, K % 4 / % 16 / %
    # 64 tails and partial last column blocks; m = 300: the AVX2 GEMM's chunks of x (256
    # rows; forced on below their default size). Exact against the reference (NaN rows
    # included), 1 and 2 threads alike.
    monkeypatch.setenv("FASTKERN_INT8_WV_MAX_M", "0")  # small layers too: the GEMM, not the wv kernels
    monkeypatch.setenv("FASTKERN_S16_X_WHOLE_KB", "0")  # the AVX2 GEMM in chunks of x whatever its size
    with cpu_isa(isa):
        for n, k in ((37, 50), (64, 1030), (20, 4099), (48, 64)):
            x = edge_rows_x(gen, m, k)
            w, s = make_w8(gen, n, k)
            b = torch.randn(n, generator=gen)
            one, two = on_1_and_2_threads(lambda: native("linear_w8a8")(x, w, s, b))
            ref = ops.linear_w8a8_ref(x, w, s, b)
            torch.testing.assert_close(one, ref, rtol=0, atol=0, equal_nan=True, msg=lambda e: "%s %s" % ((m, n, k), e))
            torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
            assert torch.isnan(one[1]).all() and torch.isnan(one[2]).all() and torch.isfinite(one[3:]).all()


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
def test_gemm_streamed_output(isa, gen, monkeypatch):
    # Outputs beyond the caches leave the AVX-512 VNNI GEMM through non-temporal stores (rows
    # of whole aligned lines: N % 16 == 0); a 16 MiB one by default, and with the threshold at 0
    # small ones too, next to N % 16 != 0 (plain stores); int8_gemm and W8A8, exact.
    with cpu_isa(isa):
        a = torch.randint(-128, 128, (4096, 40), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (1024, 40), generator=gen, dtype=torch.int8)
        assert torch.equal(native("int8_gemm")(a, b), ops.int8_gemm_ref(a, b))
        monkeypatch.setenv("FASTKERN_STREAM_OUT_KB", "0")
        for m, n, k in ((70, 48, 300), (130, 50, 1030), (65, 96, 40)):
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            one, two = on_1_and_2_threads(lambda: native("int8_gemm")(a, b))
            assert torch.equal(one, ops.int8_gemm_ref(a, b)) and torch.equal(one, two), (m, n, k)
            x = torch.randn(m, k, generator=gen)
            w, s = make_w8(gen, n, k)
            bias = torch.randn(n, generator=gen)
            one, two = on_1_and_2_threads(lambda: native("linear_w8a8")(x, w, s, bias))
            assert torch.equal(one, ops.linear_w8a8_ref(x, w, s, bias)) and torch.equal(one, two), (m, n, k)


@NATIVE
def test_empty_dims(gen):
    w, s = torch.zeros(6, 0, dtype=torch.int8), torch.rand(6, generator=gen)
    x = torch.randn(3, 0)
    for op in W8_OPS:
        assert torch.equal(native(op)(x, w, s, None), torch.zeros(3, 6))
    a = torch.zeros(3, 0, dtype=torch.int8)
    assert torch.equal(native("int8_gemm")(a, w), torch.zeros(3, 6, dtype=torch.int32))
    w, s = make_w8(gen, 0, 8)
    assert native("linear_w8a16")(torch.randn(2, 8), w, s, None).shape == (2, 0)


# ----------------------------------------------------------------- op checks and errors


@NATIVE
@pytest.mark.parametrize("ns", ["fastkern", "fastkern_C"])
@pytest.mark.parametrize("op", ["int8_gemm"] + W8_OPS)
def test_opcheck(ns, op, gen):
    opobj = getattr(getattr(torch.ops, ns), op)
    if op == "int8_gemm":
        samples = [(torch.randint(-128, 128, (3, 20), generator=gen, dtype=torch.int8),
                    torch.randint(-128, 128, (5, 20), generator=gen, dtype=torch.int8))]
    else:
        w, s = make_w8(gen, 5, 20)
        samples = [(torch.randn(3, 20, generator=gen), w, s, None),
                   (torch.randn(2, 3, 20, generator=gen).bfloat16(), w, s, torch.randn(5, generator=gen))]
    for args in samples:
        torch.library.opcheck(opobj, args)


@NATIVE
@pytest.mark.parametrize("op", W8_OPS)
def test_native_bad_inputs(op, gen):
    f = native(op)
    w, s = make_w8(gen, 5, 20)
    with pytest.raises(RuntimeError, match=r"x \(shape \[3, 21\].*must have shape \[\.\.\., 20\]"):
        f(torch.randn(3, 21), w, s, None)
    with pytest.raises(RuntimeError, match=r"x \(shape \[3, 20\], dtype Int.*must be float32, float16 or bfloat16"):
        f(torch.ones(3, 20, dtype=torch.int32), w, s, None)
    with pytest.raises(RuntimeError, match=r"w_scale \(shape \[4\].*must have shape \[5\]"):
        f(torch.randn(3, 20), w, s[:4], None)
    with pytest.raises(RuntimeError, match=r"w \(shape \[5, 20\], dtype Float.*must have dtype Char"):
        f(torch.randn(3, 20), w.float(), s, None)
    with pytest.raises(RuntimeError, match=r"w \(shape \[100\].*must be 2-D"):
        f(torch.randn(3, 20), w.flatten(), s, None)
    with pytest.raises(RuntimeError, match=r"bias \(shape \[6\].*must have shape \[5\]"):
        f(torch.randn(3, 20), w, s, torch.randn(6))


@NATIVE
def test_native_bad_inputs_int8_gemm(gen):
    f = native("int8_gemm")
    b = torch.zeros(5, 20, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"a \(shape \[3, 21\].*must have shape \[\.\.\., 20\]"):
        f(torch.zeros(3, 21, dtype=torch.int8), b)
    with pytest.raises(RuntimeError, match=r"a \(shape \[3, 20\], dtype Float.*must have dtype Char"):
        f(torch.zeros(3, 20), b)
    with pytest.raises(RuntimeError, match=r"b \(shape \[5, 20\], dtype Byte.*must have dtype Char"):
        f(torch.zeros(3, 20, dtype=torch.int8), b.to(torch.uint8))


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
def test_int8_gemm_k_limit_is_an_error(isa):
    # -128 x -128 everywhere: K * 16384 < 2^31 up to K = 131071; past it the int32 result
    # would wrap (the op used to return the wrapped number)
    k = 131071
    with cpu_isa(isa):
        for m in (1, 3, 64):
            a = torch.full((m, k), -128, dtype=torch.int8)
            b = torch.full((2, k), -128, dtype=torch.int8)
            out = native("int8_gemm")(a, b)
            assert torch.equal(out, torch.full((m, 2), k * 16384, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"K=131072.*K <= 131071"):
        native("int8_gemm")(torch.ones(1, k + 1, dtype=torch.int8), torch.ones(1, k + 1, dtype=torch.int8))


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas(avx2vnni=True, amx=True))
def test_w8a8_k_limit_is_an_error(isa):
    # the largest int32 sum: x quantized to -127 everywhere against weights of -128, in 1, 3
    # and 64 rows (K * 127 * 128 < 2^31 up to K = 132104; a bound of K * 127^2 let it wrap and flip sign)
    k = 132104
    w = torch.full((2, k), -128, dtype=torch.int8)
    with cpu_isa(isa):
        for m in (1, 3, 64):
            x = torch.full((m, k), -1.0)
            out = native("linear_w8a8")(x, w, torch.ones(2), None)
            assert_close_rel(out, ops.linear_w8a8_ref(x, w, torch.ones(2), None), torch.float32)
    w = torch.ones(1, k + 1, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"K=132105.*K <= 132104"):
        native("linear_w8a8")(torch.randn(1, k + 1), w, torch.ones(1), None)


@pytest.mark.parametrize("op", W8_OPS)
def test_public_bad_inputs(op, gen):
    w, s = make_w8(gen, 5, 20)
    with pytest.raises(ValueError, match=r"x must have K=20 features.*shape \[3, 21\]"):
        getattr(torch.ops.fastkern, op)(torch.randn(3, 21), w, s, None)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16.*int32"):
        getattr(torch.ops.fastkern, op)(torch.ones(3, 20, dtype=torch.int32), w, s, None)
    with pytest.raises(ValueError, match=r"w_scale must have shape \[5\]"):
        getattr(torch.ops.fastkern, op)(torch.randn(3, 20), w, s[:4], None)
