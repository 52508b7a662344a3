"""fastkern.gemm (a @ b.T, float) on every backend against its reference.

The CPU kernel has two paths (GEMV for M <= GEMV_MAX_M[isa], packed blocked GEMM
above) and three ISA paths (generic 4x8, AVX2 6x16, AVX-512 12x32 micro-kernels); the tests
below reach each path this CPU can run, every tile tail of the micro-kernels, the
8-wide k chunks of the packers and GEMV, and every blocking boundary. bf16 operands on a CPU
with AVX512-BF16 take a vdpbf16ps tile GEMM from M = 16 instead (tests at the end); the
tests aimed at the fp32 paths turn it off (`fp32_paths`) so those keep their bf16 coverage.
"""
import pytest
import torch

import fastkern
from fastkern import _ext, ops

from conftest import (FLOAT_DTYPES, M_SIZES, assert_close_rel, backends_for, cpu_isas, has_bf16_dot, on_1_and_2_threads,
                      rel_err, tol)

CPU_REASON = ops.backend_status("gemm", "cpu", torch.device("cpu"))
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=str(CPU_REASON))


# (MR, NR) of each path's GEMM micro-kernel
TILES = {"generic": (4, 8), "avx2": (6, 16), "avx512": (12, 32)}
# largest M on the GEMV path per ISA (kGemvMaxM* in csrc/cpu/gemm.cpp), and the rows
# of x the GEMV holds per pass
GEMV_MAX_M = {"generic": 16, "avx2": 64, "avx512": 64}
GEMV_ROWS = {"generic": 2, "avx2": 2, "avx512": 4}


@pytest.fixture
def fp32_paths(monkeypatch):
    """bf16 operands through the fp32 paths (GEMV, skinny and blocked GEMMs) at every M."""
    monkeypatch.setenv("FASTKERN_GEMM_BF16_MIN_M", "0")
    monkeypatch.setenv("FASTKERN_GEMM_BF16_GEMV_MAX_M", "0")


@pytest.fixture
def isa(request):
    _ext._C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _ext._C.set_cpu_isa("auto")


def assert_close_elementwise(out, a, b, dtype):
    """|out - exact| <= tol * (|a| @ |b|.T) per element: a bound that holds for single
    dot products too, where a relative norm error is ill-conditioned by cancellation."""
    # broadcast products, not a float64 BLAS call: these are tiny and many
    prod = a.double()[:, None, :] * b.double()[None, :, :]
    exact = prod.sum(-1)
    bound = prod.abs().sum(-1) * tol(dtype)
    diff = (out.double() - exact).abs()
    assert out.dtype == dtype and out.shape == exact.shape
    assert bool((diff <= bound).all()), "max excess %.3g" % (diff - bound).max().item()


def gemm_by_knob(monkeypatch, name, values, a, b):
    """{value: gemm(a, b) with the environment knob `name` set to it}"""
    outs = {}
    for v in values:
        monkeypatch.setenv(name, v)
        outs[v] = torch.ops.fastkern_C.gemm(a, b)
    return outs


def make_x(shape_lead, k, dtype, gen, layout):
    """x [*shape_lead, K] laid out as `layout`: contiguous, 3-D or non-contiguous."""
    m = 1
    for s in shape_lead:
        m *= s
    if layout == "3d":
        return torch.randn(2, m, k, generator=gen).to(dtype)
    if layout == "noncontig":
        # every other column of a wider matrix: unit stride is lost along K
        return torch.randn(m, 2 * k, generator=gen).to(dtype)[:, ::2]
    if layout == "transposed":
        return torch.randn(k, m, generator=gen).to(dtype).t()
    return torch.randn(m, k, generator=gen).to(dtype)


@pytest.mark.parametrize("backend", backends_for("gemm"))
@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contig", "3d", "noncontig", "transposed"])
@pytest.mark.parametrize("n,k", [(37, 53), (67, 300)])
def test_gemm_matches_reference(gen, backend, m, dtype, layout, n, k):
    if backend == "triton" and (m not in (1, 17) or dtype != torch.float32):
        pytest.skip("the Triton interpreter is slow: only M=1, 17 fp32 here, tests/test_triton.py covers the rest")
    a = make_x([m], k, dtype, gen, layout)
    b = torch.randn(n, k, generator=gen).to(dtype)
    with fastkern.use_backend(backend):
        out = torch.ops.fastkern.gemm(a, b)
    assert_close_rel(out, ops.gemm_ref(a, b), dtype)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemm_half_precision_error_vs_torch(gen, dtype):
    """Half-precision output: no worse than 2x torch's own matmul in that dtype (both vs fp32)."""
    a = torch.randn(97, 1025, generator=gen).to(dtype)
    b = torch.randn(131, 1025, generator=gen).to(dtype)
    exact = a.double() @ b.double().T
    with fastkern.use_backend("cpu"):
        ours = rel_err(torch.ops.fastkern.gemm(a, b), exact)
    theirs = rel_err(a @ b.T, exact)
    assert ours <= max(2 * theirs, tol(dtype) / 10), (ours, theirs)


def tail_grid(isa, full):
    """(m, n, k) covering, one dimension at a time, every M tail 1..MR-1 on both paths
    (GEMV M <= GEMV_MAX_M, GEMM above: M up to 2*MR+1), every N tail 1..NR-1 and whole tiles,
    every K tail 1..7 of the 8-wide chunks (GEMV, packers) plus the KC=192 block edge."""
    mr, nr = TILES[isa]
    g = GEMV_MAX_M[isa]
    ms = range(1, 2 * mr + 2) if full else sorted({1, 3, 5, 6, 7, mr - 1, mr + 1, 2 * mr + 1})
    ns = range(1, nr + 2) if full else sorted({1, nr // 2 - 1, nr - 1, nr + 1})
    ks = list(range(1, 18)) + [191, 192, 193, 199] if full else [3, 8, 13, 195]
    cases = set()
    for m in ms:
        for n in (nr - 1, nr + 3):
            cases.add((m, n, 11))
    for m in (g - 1, g, g + 1):  # both sides of the GEMV / GEMM switch
        cases.add((m, nr + 3, 11))
    for n in ns:
        for m in (2, mr + 1):
            cases.add((m, n, 9))
    for k in ks:
        for m, n in ((1, 5), (3, nr + 1), (mr + 3, nr - 3), (2 * mr + 1, 2 * nr + 1)):
            cases.add((m, n, k))
    return sorted(cases)


@needs_cpu
@pytest.mark.usefixtures("fp32_paths")
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gemm_every_tail(gen, isa, dtype):
    """Every tile tail of the path's micro-kernel and GEMV, against float64 products.
    Half precision takes a sample of the same grid (its packing is what differs)."""
    for m, n, k in tail_grid(isa, dtype == torch.float32):
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(n, k, generator=gen).to(dtype)
        assert_close_elementwise(torch.ops.fastkern_C.gemm(a, b), a, b, dtype)


@needs_cpu
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("layout", ["noncontig", "transposed"])
def test_gemm_strided_operands_every_path(gen, isa, layout):
    """The packers' strided paths (no unit stride along K; unit stride along rows),
    with M and N tails, for a and for b."""
    for m, n, k in ((13, 37, 21), (29, 70, 300)):
        a = make_x([m], k, torch.float32, gen, layout)
        b = make_x([n], k, torch.float32, gen, layout)
        assert_close_rel(torch.ops.fastkern_C.gemm(a, b), ops.gemm_ref(a, b), torch.float32)
        bc = b.contiguous()
        assert_close_rel(torch.ops.fastkern_C.gemm(a, bc), ops.gemm_ref(a, bc), torch.float32)


@needs_cpu
@pytest.mark.usefixtures("fp32_paths")
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m,n,k", [(1, 3100, 300), (3, 50, 4099), (7, 3100, 530), (130, 70, 600), (301, 3100, 530),
                                   (150, 70, 3500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_blocking_boundaries(gen, isa, m, n, k, dtype):
    """Several NC (3072) panels, KC (192) blocks and MC (144) blocks, on both paths and each ISA;
    K=3500 on the blocked path takes three KB (1536) passes of B packing, the last one
    ending in a short KC block (428 = 2 x 192 + 44)."""
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, k, generator=gen).to(dtype)
    assert_close_rel(torch.ops.fastkern_C.gemm(a, b), ops.gemm_ref(a, b), dtype)


@needs_cpu
@pytest.mark.usefixtures("fp32_paths")
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gemm_gemv_threshold(gen, isa, dtype):
    """M at and around the GEMV / GEMM switch and every remainder of the GEMV's row
    groups, with N tails (4-row tiles, single rows) and K tails (8- and 16-wide
    chunks), against float64 products."""
    g, rows = GEMV_MAX_M[isa], GEMV_ROWS[isa]
    ms = sorted({g - 1, g, g + 1} | {g - r for r in range(rows + 1)} | {5, 9, 17})
    for m in ms:
        for n, k in ((35, 77), (9, 16), (6, 5)) if dtype == torch.float32 else ((35, 77),):
            a = torch.randn(m, k, generator=gen).to(dtype)
            b = torch.randn(n, k, generator=gen).to(dtype)
            assert_close_elementwise(torch.ops.fastkern_C.gemm(a, b), a, b, dtype)


@needs_cpu
@pytest.mark.usefixtures("fp32_paths")
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_gemv_threshold_strided_and_3d(gen, isa, dtype):
    """The GEMV at its largest M with a non-contiguous a, a transposed b and a 3-D a."""
    g = GEMV_MAX_M[isa]
    for m in (g, g + 1):
        a = make_x([m], 45, dtype, gen, "noncontig")
        b = make_x([37], 45, dtype, gen, "transposed")
        assert_close_rel(torch.ops.fastkern_C.gemm(a, b), ops.gemm_ref(a, b), dtype)
    a = torch.randn(2, g // 2, 45, generator=gen).to(dtype)
    b = torch.randn(37, 45, generator=gen).to(dtype)
    out = torch.ops.fastkern_C.gemm(a, b)
    assert out.shape == (2, g // 2, 37)
    assert_close_rel(out, ops.gemm_ref(a, b), dtype)


@needs_cpu
@pytest.mark.usefixtures("fp32_paths")
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gemm_gemv_k_blocks(gen, isa, dtype):
    """The GEMV walks K in blocks of max(256, 65536 // M rounded down to 256) columns and
    adds the blocks' partial sums in y: several blocks, the last one with a tail."""
    g = GEMV_MAX_M[isa]
    for m, k in ((g, 2067), (g - 3, 1800), (5, 13123 if dtype == torch.float32 else 300)):
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(37, k, generator=gen).to(dtype)
        assert_close_rel(torch.ops.fastkern_C.gemm(a, b), ops.gemm_ref(a, b), dtype)


@needs_cpu
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
def test_gemm_gemv_k_blocks_same_result_for_1_and_2_threads(gen, isa):
    a = torch.randn(GEMV_MAX_M[isa], 2100, generator=gen)
    b = torch.randn(301, 2100, generator=gen)
    one, two = on_1_and_2_threads(torch.ops.fastkern_C.gemm, a, b)
    assert torch.equal(one, two)


@needs_cpu
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
def test_gemm_blocked_k_passes_same_result_for_1_and_2_threads(gen, isa):
    """Several KB passes and a panel split between the threads (2 M blocks): every
    element is summed in the same order whichever thread packs or computes what."""
    a = torch.randn(150, 3500, generator=gen)
    b = torch.randn(70, 3500, generator=gen)
    one, two = on_1_and_2_threads(torch.ops.fastkern_C.gemm, a, b)
    assert torch.equal(one, two)


@needs_cpu
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("row_stride", [1024, 1040, 3072])
def test_gemm_a_in_place_or_packed_bitwise_identical(gen, isa, monkeypatch, row_stride):
    """fp32 A with unit stride along K is read in place by the AVX-512 blocked GEMM unless its
    rows alias in the L1 (1024 and 3072 floats: every row in one set; 1040: one set apart), where
    it is packed. Both, forced by FASTKERN_GEMM_A_IN_PLACE, and the default must give the same
    bits (the same products in the same order) and match the reference; full and partial
    12-row slivers, a partial last 32-column sliver and a short last KC block."""
    m, n, k = 12 * 25 + 5, 32 * 3 + 7, 3 * 192 + 40
    a = torch.randn(m, row_stride, generator=gen)[:, :k]
    b = torch.randn(n, k, generator=gen)
    monkeypatch.setenv("FASTKERN_SKINNY_MAX_M", "0")
    outs = gemm_by_knob(monkeypatch, "FASTKERN_GEMM_A_IN_PLACE", ("-1", "0", "1"), a, b)
    assert_close_rel(outs["-1"], ops.gemm_ref(a, b), torch.float32)
    assert torch.equal(outs["0"], outs["-1"]) and torch.equal(outs["1"], outs["-1"])


@needs_cpu
def test_cpu_l1d_geometry():
    """The L1 data cache the kernels plan for: read from sysfs, or 8 ways x 64 sets x 64 bytes."""
    g = _ext._C.cpu_l1d()
    assert g["ways"] >= 1 and g["sets"] >= 1 and g["line"] in (32, 64, 128, 256)
    assert 8 * 1024 <= g["ways"] * g["sets"] * g["line"] <= 4 * 1024 * 1024


def _gemv_threshold_ms():
    return sorted({1, 3, 7} | {g + d for g in GEMV_MAX_M.values() for d in (0, 1)} | {200})


@needs_cpu
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", _gemv_threshold_ms())
def test_gemm_same_result_for_1_and_2_threads(gen, isa, m):
    a = torch.randn(m, 700, generator=gen)
    b = torch.randn(333, 700, generator=gen)
    one, two = on_1_and_2_threads(torch.ops.fastkern_C.gemm, a, b)
    assert torch.equal(one, two)


@needs_cpu
def test_gemm_empty_dims(gen):
    b = torch.randn(5, 0)
    out = torch.ops.fastkern_C.gemm(torch.randn(3, 0), b)
    assert out.shape == (3, 5) and torch.equal(out, torch.zeros(3, 5))
    out = torch.ops.fastkern_C.gemm(torch.randn(2, 0, 7), torch.randn(4, 7))
    assert out.shape == (2, 0, 4)
    out = torch.ops.fastkern_C.gemm(torch.randn(6, 7), torch.randn(0, 7))
    assert out.shape == (6, 0)


@needs_cpu
@pytest.mark.parametrize("m", [1, 9])
def test_gemm_nan_inf_propagate(gen, m):
    a = torch.randn(m, 40, generator=gen)
    b = torch.randn(20, 40, generator=gen)
    a[0, 3] = float("nan")
    b[5, 7] = float("inf")
    out = torch.ops.fastkern_C.gemm(a, b)
    ref = ops.gemm_ref(a, b)
    assert torch.isnan(out[0]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


@needs_cpu
@pytest.mark.parametrize("op", ["fastkern", "fastkern_C"])
@pytest.mark.parametrize("m", [1, 9])
def test_gemm_opcheck(gen, op, m):
    args = (torch.randn(m, 24, generator=gen), torch.randn(10, 24, generator=gen))
    torch.library.opcheck(getattr(torch.ops, op).gemm, args)


@needs_cpu
def test_gemm_bad_inputs_clear_errors(gen):
    a = torch.randn(4, 8, generator=gen)
    with pytest.raises(RuntimeError, match=r"a \(shape \[4, 8\].*K=9 from b \(shape \[3, 9\]"):
        torch.ops.fastkern_C.gemm(a, torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.fastkern_C.gemm(a, torch.randn(3, 8).half())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastkern_C.gemm(a.int(), torch.randn(3, 8).int())
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.fastkern_C.gemm(a, torch.randn(3, 8, 1))
    with fastkern.use_backend("cpu"):
        with pytest.raises(ValueError, match="K=9"):
            torch.ops.fastkern.gemm(a, torch.randn(3, 9))
        with pytest.raises(TypeError, match="one dtype"):
            torch.ops.fastkern.gemm(a, torch.randn(3, 8).bfloat16())


# ------------------------------------------------------------ bf16: vdpbf16ps
#
# bf16 a and b with AVX512-BF16 (gemm.cpp, csrc/cpu/tile_gemm.h) take two vdpbf16ps paths:
# - up to M = 15 a GEMV: 4 rows of w x 4 rows of x (then 3, 2, 1) straight from their rows, 32 k
#   per step with a masked K tail, K in blocks of max(256, 65536 // M // 256 * 256);
# - from M = 16 the tile GEMM: x packed per block of 64 rows as [K/2][16 VM] bf16 pairs (VM =
#   1..4 vectors of 16 rows), the weight copied into panels of 96 rows x 1024 k (12 rows per
#   parallel unit) and broadcast one pair at a time against x, register tiles of 12 weight
#   rows (VM <= 2) or 6 (VM >= 3) and then single rows, the sums in CT [N, Mp] transposed into
#   the output 16 x 16 at a time;
# - where b has fewer rows than a (and at least 16), the same tile GEMM on b as x and a as the
#   weight (C^T = b a^T), its sums [M, N] written out as they lie.
# FASTKERN_GEMM_BF16_GEMV_MAX_M and FASTKERN_GEMM_BF16_MIN_M move the switches (0: off),
# FASTKERN_GEMM_BF16_SWAP forces the orientation (0: a as x, 1: b as x wherever it can).

needs_bf16_dot = pytest.mark.skipif(not has_bf16_dot(), reason="the bf16 vdpbf16ps paths need a CPU with AVX512-BF16")
BF16_GEMV_MAX_M, BF16_GEMM_MIN_M = 15, 16
BF16_PATHS = {"gemv": ("100000", "0", "0"), "tile": ("0", "1", "0"), "tile-swapped": ("0", "1", "1")}


@pytest.fixture(params=sorted(BF16_PATHS))
def bf16_path(request, monkeypatch):
    """One of the vdpbf16ps paths at every M (the tile GEMM in both orientations), on the
    native path."""
    gemv_max, gemm_min, swap = BF16_PATHS[request.param]
    monkeypatch.setenv("FASTKERN_GEMM_BF16_GEMV_MAX_M", gemv_max)
    monkeypatch.setenv("FASTKERN_GEMM_BF16_MIN_M", gemm_min)
    monkeypatch.setenv("FASTKERN_GEMM_BF16_SWAP", swap)
    _ext._C.set_cpu_isa("avx512")
    try:
        yield request.param
    finally:
        _ext._C.set_cpu_isa("auto")


def int_bf16(shape, gen, lo=-4, hi=4):
    """bf16 holding small integers: every product and sum is exact in fp32, so the result
    (rounded to bf16 once) must equal the float64 product's rounding bit for bit."""
    return torch.randint(lo, hi + 1, shape, generator=gen).to(torch.bfloat16)


def exact_bf16(a, b):
    return (a.double() @ b.double().T).to(torch.bfloat16)


@needs_cpu
@needs_bf16_dot
@pytest.mark.usefixtures("bf16_path")
def test_gemm_bf16_dot_every_tail(gen):
    """M: the GEMV's row groups 1..4 and every width of the tile GEMM's last 64-row block
    (1..4 vectors of 16 rows, partial vectors) and several blocks; N: the GEMV's 4-row tiles,
    the tile GEMM's 12- and 6-row register tiles with single-row tails, 12-row parallel units
    and 96-row tasks, output transposes with 1..15 columns left; K: odd K (a pair half-filled
    with zero), the 32-element steps of the GEMV and of the panel copy with every tail, the
    1024-k panels and the GEMV's K blocks with tails. Integer-valued data, bit for bit."""
    cases = set()
    for m in list(range(1, 18)) + [31, 32, 33, 47, 48, 49, 63, 64, 65, 80, 127, 128, 129, 200]:
        cases.add((m, 29, 37))
    for n in list(range(1, 26)) + [95, 96, 97, 108, 191, 193]:
        for m in (5, 40):  # 12-row tiles (VM 1), 6-row tiles (VM 3)
            cases.add((m, n, 21))
    for k in list(range(1, 34)) + [63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 3001, 4353, 5000]:
        cases.add((15, 26, k))
        cases.add((70, 13, k))
    for m, n, k in sorted(cases):
        a = int_bf16((m, k), gen)
        b = int_bf16((n, k), gen)
        out = torch.ops.fastkern_C.gemm(a, b)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert torch.equal(out, exact_bf16(a, b)), (m, n, k)


@needs_cpu
@needs_bf16_dot
@pytest.mark.parametrize("m", [16, 32, 33])
def test_gemm_bf16_tile_rows_bitwise_identical(gen, monkeypatch, m):
    """The bf16 tile GEMM reading b's rows in place runs register tiles of 12 weight rows, or 6
    where 12 rows alias in the L1 (K = 2048 bf16: rows 4 KiB apart) or the L1d is under 48 KiB;
    FASTKERN_TILE_ROWS forces either. Every output is one chain over k in order, so 6, 12 and
    the default give the same bits, all matching the reference; N leaves tile tails of both
    sizes."""
    monkeypatch.setenv("FASTKERN_GEMM_BF16_MIN_M", "1")
    for n, k in ((61, 2048), (29, 1040)):
        a = torch.randn(m, k, generator=gen).bfloat16()
        b = torch.randn(n, k, generator=gen).bfloat16()
        outs = gemm_by_knob(monkeypatch, "FASTKERN_TILE_ROWS", ("0", "6", "12"), a, b)
        assert_close_rel(outs["0"], ops.gemm_ref(a, b), torch.bfloat16)
        assert torch.equal(outs["6"], outs["0"]) and torch.equal(outs["12"], outs["0"])


@needs_cpu
@needs_bf16_dot
@pytest.mark.usefixtures("bf16_path")
def test_gemm_bf16_dot_layouts(gen):
    """Non-contiguous and transposed a, a and b with a row stride above K (rows of a wider
    matrix), transposed b, 3-D a. With even K the tile GEMM reads b's pairs from its own rows
    (an even row stride and 4-byte alignment: offset 4), else through panels (offset 5)."""
    m, n = 37, 45
    for k in (300, 301):
        a_wide = int_bf16((m, k + 40), gen)[:, 3:k + 3]
        for a in [make_x([m], k, torch.float32, gen, layout).round().clamp(-4, 4).bfloat16()
                  for layout in ("noncontig", "transposed", "contig")] + [a_wide]:
            for b in (int_bf16((n, k), gen), int_bf16((k, n), gen).t(), int_bf16((n, k + 40), gen)[:, 4:k + 4],
                      int_bf16((n, k + 40), gen)[:, 5:k + 5]):
                assert torch.equal(torch.ops.fastkern_C.gemm(a, b), exact_bf16(a, b))
    k = 301
    a3 = int_bf16((2, 21, k), gen)
    b = int_bf16((n, 2 * k), gen)[:, ::2]
    out = torch.ops.fastkern_C.gemm(a3, b)
    assert out.shape == (2, 21, n)
    assert torch.equal(out, exact_bf16(a3.reshape(-1, k), b).reshape(2, 21, n))


@needs_cpu
@needs_bf16_dot
@pytest.mark.usefixtures("bf16_path")
def test_gemm_bf16_dot_m_passes(gen):
    """The tile GEMM takes M in passes whose sums [N, pass] fit 32 MB: N = 65537 gives passes
    of 64 rows (M = 150: 64, 64, 22), with the direct (even K) and the panel (odd K) weight."""
    for k in (4, 3):
        a = int_bf16((150, k), gen)
        b = int_bf16((65537, k), gen)
        assert torch.equal(torch.ops.fastkern_C.gemm(a, b), exact_bf16(a, b)), k


@needs_cpu
@needs_bf16_dot
def test_gemm_bf16_orientations_agree(gen, monkeypatch):
    """The tile GEMM packs a (as x) or, where b has fewer rows (and at least 16), b: each output
    is the same vdpbf16ps chain over k either way, so the default and both forced orientations
    give the same bits, within the contract of the reference. Shapes on both sides of the rule,
    tails in M, N and K, odd K (panels), a non-contiguous b, 3-D a; FASTKERN_GEMM_BF16_MIN_M = 1
    lets the swapped GEMM run on b with fewer than 16 rows and on a with 5 (its passes over a's
    rows are in test_gemm_bf16_dot_m_passes, tile-swapped)."""
    monkeypatch.setenv("FASTKERN_GEMM_BF16_MIN_M", "1")
    shapes = [(300, 100, 301), (3000, 16, 64), (100, 300, 64), (16, 17, 130), (17, 16, 130), (40, 40, 33),
              (1030, 70, 1030), (65, 15, 20), (5, 2100, 8)]
    for m, n, k in shapes:
        a = torch.randn(m, k, generator=gen).bfloat16()
        b = torch.randn(n, k + 6, generator=gen).bfloat16()[:, 3:k + 3]
        if m % 5 == 0:
            a = a.reshape(5, m // 5, k)
        outs = gemm_by_knob(monkeypatch, "FASTKERN_GEMM_BF16_SWAP", ("-1", "0", "1"), a, b)
        assert outs["-1"].shape == (*a.shape[:-1], n)
        assert_close_rel(outs["-1"], ops.gemm_ref(a, b), torch.bfloat16)
        assert torch.equal(outs["0"], outs["-1"]) and torch.equal(outs["1"], outs["-1"]), (m, n, k)


@needs_cpu
@needs_bf16_dot
def test_gemm_bf16_gemv_tail(gen, monkeypatch):
    """M = 16 j + r with 1 <= r <= 4 (j >= 1): the tile GEMM takes the first 16 j rows and the
    GEMV the last r (by default where b holds 1M to 8M elements; FASTKERN_GEMM_BF16_GEMV_TAIL=4
    here, for any size), so each part is bit for bit what its own path gives on those rows
    alone; r >= 5 and M <= 16 keep the tile GEMM on all rows. Random data, odd K through the
    GEMV's masked tail and the tile's panels, a non-contiguous b; and the default on a b of 1M
    elements against the reference. (The tail within the tile GEMM, which takes these rows by
    default where K is a multiple of 32, is off here: test_gemm_bf16_tail_within.)"""
    monkeypatch.setenv("FASTKERN_GEMM_BF16_TAIL", "0")
    monkeypatch.setenv("FASTKERN_GEMM_BF16_GEMV_TAIL", "4")
    for m, n, k in [(17, 40, 1536), (18, 7, 33), (20, 29, 64), (33, 16, 301), (36, 45, 2049), (52, 3, 100),
                    (21, 20, 50), (16, 20, 50), (63, 9, 31)]:
        a = torch.randn(m, k, generator=gen).bfloat16()
        b = torch.randn(n, k + 2, generator=gen).bfloat16()[:, 1:k + 1]
        monkeypatch.setenv("FASTKERN_GEMM_BF16_GEMV_TAIL", "4")
        out = torch.ops.fastkern_C.gemm(a, b)
        assert_close_rel(out, ops.gemm_ref(a, b), torch.bfloat16)
        r = m % 16
        head = m - r if m > 16 and 1 <= r <= 4 else m
        monkeypatch.setenv("FASTKERN_GEMM_BF16_GEMV_TAIL", "0")
        assert torch.equal(out[:head], torch.ops.fastkern_C.gemm(a[:head], b)), (m, n, k)
        if head < m:
            monkeypatch.setenv("FASTKERN_GEMM_BF16_GEMV_MAX_M", "100000")  # the GEMV on the tail rows alone
            assert torch.equal(out[head:], torch.ops.fastkern_C.gemm(a[head:], b)), (m, n, k)
            monkeypatch.delenv("FASTKERN_GEMM_BF16_GEMV_MAX_M")
        else:
            assert torch.equal(out, torch.ops.fastkern_C.gemm(a, b))
    monkeypatch.delenv("FASTKERN_GEMM_BF16_GEMV_TAIL")
    a = torch.randn(19, 1024, generator=gen).bfloat16()
    b = torch.randn(1024, 1024, generator=gen).bfloat16()
    assert_close_rel(torch.ops.fastkern_C.gemm(a, b), ops.gemm_ref(a, b), torch.bfloat16)


@needs_cpu
@needs_bf16_dot
@pytest.mark.parametrize("knob", ["12", None])
def test_gemm_bf16_tail_within(knob, gen, monkeypatch):
    """M = 16 j + r (j >= 1) with K a multiple of 32: the last r rows run within the tile GEMM,
    against each weight panel after its tiles (r <= 8 by default, any size;
    FASTKERN_GEMM_BF16_TAIL up to 12 here). The first 16 j rows are bit for bit the tile GEMM's on
    them alone, the last r match the reference on their own rows, 1 and 2 threads agree; b read
    in place (contiguous) and through panels (an odd offset, a's rows an odd number of elements
    apart too), several K blocks (K = 2080), and a 3-D a."""
    from conftest import num_threads

    monkeypatch.setenv("FASTKERN_GEMM_BF16_SWAP", "0")  # (b as the GEMM's x where N < M: no tail)
    monkeypatch.setenv("FASTKERN_GEMM_BF16_MIN_M", "16")
    if knob is None:
        monkeypatch.delenv("FASTKERN_GEMM_BF16_TAIL", raising=False)
    else:
        monkeypatch.setenv("FASTKERN_GEMM_BF16_TAIL", knob)
    cap = 8 if knob is None else int(knob)
    for m, n, k in [(17, 40, 1536), (20, 29, 64), (24, 100, 2080), (28, 16, 32), (33, 7, 96), (44, 130, 512),
                    (76, 21, 160), (27, 300, 1024)]:
        for offset in (0, 1):
            # offset 1: rows of a and b an odd number of elements apart (2-byte aligned pairs)
            a = torch.randn(m, k + 1, generator=gen).bfloat16()[:, offset:k + offset]
            b = torch.randn(n, k + 2, generator=gen).bfloat16()[:, offset:k + offset]
            if offset == 0:
                b = b.contiguous()
            ai = a.contiguous().reshape(2, m // 2, k) if m % 2 == 0 and not offset else a
            with num_threads(1):
                one = torch.ops.fastkern_C.gemm(ai, b)
            with num_threads(2):
                out = torch.ops.fastkern_C.gemm(ai, b)
            assert torch.equal(one, out), (m, n, k, offset)
            out = out.reshape(m, n)
            assert_close_rel(out, ops.gemm_ref(a, b), torch.bfloat16)
            r = m % 16
            if r > cap:
                continue
            head = m - r
            monkeypatch.setenv("FASTKERN_GEMM_BF16_TAIL", "0")
            monkeypatch.setenv("FASTKERN_GEMM_BF16_GEMV_TAIL", "0")
            assert torch.equal(out[:head], torch.ops.fastkern_C.gemm(a[:head], b)), (m, n, k, offset)
            assert_close_rel(out[head:], ops.gemm_ref(a[head:], b), torch.bfloat16)
            monkeypatch.delenv("FASTKERN_GEMM_BF16_GEMV_TAIL")
            if knob is None:
                monkeypatch.delenv("FASTKERN_GEMM_BF16_TAIL")
            else:
                monkeypatch.setenv("FASTKERN_GEMM_BF16_TAIL", knob)


@needs_cpu
@needs_bf16_dot
@pytest.mark.parametrize("m", [1, 6, BF16_GEMV_MAX_M, BF16_GEMM_MIN_M, 100, 300])
def test_gemm_bf16_dot_random_data(gen, m):
    """Random data at the default switches, against float64 products within the bf16
    contract, and no worse than torch's own bf16 matmul."""
    a = torch.randn(m, 2100, generator=gen).bfloat16()
    b = torch.randn(230, 2100, generator=gen).bfloat16()
    out = torch.ops.fastkern_C.gemm(a, b)
    assert_close_elementwise(out, a, b, torch.bfloat16)
    exact = a.double() @ b.double().T
    assert rel_err(out, exact) <= 1.01 * rel_err(a @ b.T, exact) + 1e-4


@needs_cpu
@needs_bf16_dot
@pytest.mark.usefixtures("bf16_path")
def test_gemm_bf16_dot_same_result_for_1_and_2_threads(gen):
    a = torch.randn(100, 2100, generator=gen).bfloat16()
    b = torch.randn(301, 2100, generator=gen).bfloat16()
    one, two = on_1_and_2_threads(torch.ops.fastkern_C.gemm, a, b)
    assert torch.equal(one, two)


@needs_cpu
@needs_bf16_dot
@pytest.mark.usefixtures("bf16_path")
def test_gemm_bf16_dot_nan_inf_propagate(gen):
    a = torch.randn(40, 50, generator=gen).bfloat16()
    b = torch.randn(30, 50, generator=gen).bfloat16()
    a[3, 7] = float("nan")  # row 3: NaN
    a[5, 8] = float("inf")  # row 5: +-inf, -inf where it meets b[9, 8]
    b[9, 8] = float("-inf")  # column 9: +-inf
    b[11, 20] = float("inf")  # column 11: +-inf, NaN at row 5 where the two infs differ in sign
    out = torch.ops.fastkern_C.gemm(a, b)
    ref = ops.gemm_ref(a, b)
    assert torch.isnan(out[3]).all() and torch.isinf(out[5, 9])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])
    # odd K over three panels: the last panel's half-filled pair must not keep the inf that
    # the previous panel held there (inf x the zero that pads x is NaN)
    a = torch.randn(20, 2049, generator=gen).bfloat16()
    b = torch.randn(7, 2049, generator=gen).bfloat16()
    b[2, 1025] = float("inf")
    out = torch.ops.fastkern_C.gemm(a, b)
    assert torch.isinf(out[:, 2]).all() and not torch.isnan(out).any()


@needs_cpu
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [257, 300])
def test_blocked_gemm_adds_the_bias(gen, isa, m):
    # Above the skinny GEMM's 256 rows the weight-only ops run the blocked GEMM, which adds the
    # bias to each output after its last K block, in the task that owns the C block (N slices
    # of 3072 columns and their sliver tails: n = 3100; M blocks of up to 144 rows; K passes of
    # 8 x 192 columns: k = 1600 takes two, the bias after the second). Bitwise what adding it to
    # the finished product gives (the op without a bias, plus the bias in fp32), as the other
    # paths do; 1 and 2 threads alike; a bf16 bias converted first.
    from fastkern import formats

    for n, k in ((3100, 64), (70, 1600)):
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        q8, s8 = formats.quantize_int8(w)
        q4, s4, z4 = formats.quantize_int4(w, 32)
        for bias in (torch.randn(n, generator=gen), torch.randn(n, generator=gen).bfloat16()):
            for name, args in (("linear_w8a16", (q8, s8)), ("linear_w4a16", (q4, s4, z4, 32))):
                op = getattr(torch.ops.fastkern_C, name)
                one, two = on_1_and_2_threads(op, x, *args, bias)
                assert torch.equal(one, two), (name, n, k)
                assert torch.equal(one, op(x, *args, None) + bias.float()), (name, n, k, bias.dtype)
