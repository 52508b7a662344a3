"""fastkern.linear_sparse24 and fastkern.linear_blocksparse on every backend against their references.

The CPU kernels have a small-M path (weights streamed once: M <= 4, and for 2:4 on
AVX2/AVX-512 M <= 8) and a larger-M path (2:4 on AVX2/AVX-512: only the kept weights,
broadcast against rows of x^T picked by meta, in register tiles of 4 weight rows x
16..64 (zmm) or 8..16 (ymm) columns of M; 2:4 generic: expanded into the blocked GEMM's
panels; block-sparse register tiles over x^T), each with generic, AVX2 and AVX-512
versions where they exist, and for bf16 x with AVX512-BF16 the pair kernel (one vdpbf16ps
lane per kept pair, from M = 6); the tests reach every one this CPU can run.
"""
import pytest
import torch

import fastkern
from fastkern import _ext, formats, ops

from conftest import FLOAT_DTYPES, M_SIZES, has_bf16_dot, assert_close_rel, backends_for, cpu_isas, on_1_and_2_threads, tol

needs_cpu24 = pytest.mark.skipif(
    ops.backend_status("linear_sparse24", "cpu", torch.device("cpu")) is not None,
    reason=str(ops.backend_status("linear_sparse24", "cpu", torch.device("cpu"))),
)
needs_cpubs = pytest.mark.skipif(
    ops.backend_status("linear_blocksparse", "cpu", torch.device("cpu")) is not None,
    reason=str(ops.backend_status("linear_blocksparse", "cpu", torch.device("cpu"))),
)


@pytest.fixture
def isa(request):
    _ext._C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _ext._C.set_cpu_isa("auto")


def make_x(m, k, dtype, gen, layout):
    if layout == "3d":
        return torch.randn(2, m, k, generator=gen).to(dtype)
    if layout == "noncontig":
        return torch.randn(m, 2 * k, generator=gen).to(dtype)[:, ::2]
    return torch.randn(m, k, generator=gen).to(dtype)


def sparse24_args(n, k, dtype, gen, bias=True):
    w = torch.randn(n, k, generator=gen)
    values, meta = formats.compress_2_4(w)
    b = torch.randn(n, generator=gen) if bias else None
    return values.to(dtype), meta, b


def blocksparse_args(n, k, block, sparsity, dtype, gen, bias=True):
    w = torch.randn(n, k, generator=gen)
    blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, block, formats.prune_blocks(w, block, sparsity))
    b = torch.randn(n, generator=gen) if bias else None
    return blocks.to(dtype), row_ptr, col_idx, b


def slow_triton(backend, m, dtype):
    # seconds per call in the interpreter: one case per shape here, the rest in tests/test_triton.py
    if backend == "triton" and (m != 3 or dtype != torch.float32):
        pytest.skip("the Triton interpreter is slow: only M=3 fp32 here, tests/test_triton.py covers the rest")


# =================================================================== 2:4


@pytest.mark.parametrize("backend", backends_for("linear_sparse24"))
@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout,n,k,bias", [("contig", 37, 52, True), ("3d", 67, 300, False),
                                             ("noncontig", 29, 100, True)])
def test_sparse24_matches_reference(gen, backend, m, dtype, layout, n, k, bias):
    slow_triton(backend, m, dtype)
    x = make_x(m, k, dtype, gen, layout)
    values, meta, b = sparse24_args(n, k, dtype, gen, bias)
    with fastkern.use_backend(backend):
        out = torch.ops.fastkern.linear_sparse24(x, values, meta, b)
    assert_close_rel(out, ops.linear_sparse24_ref(x, values, meta, b), dtype)


def assert_close_elementwise(out, x, dense_w, bias, dtype):
    """|out - exact| <= tol * sum|x w| per element (robust for single short dot products)."""
    prod = x.double()[:, None, :] * dense_w.double()[None, :, :]
    exact = prod.sum(-1) + (bias.double() if bias is not None else 0)
    bound = prod.abs().sum(-1) * tol(dtype) + (exact.abs() * tol(dtype))
    assert out.dtype == dtype and out.shape == exact.shape
    diff = (out.double() - exact).abs()
    assert bool((diff <= bound).all()), "max excess %.3g" % (diff - bound).max().item()


@needs_cpu24
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sparse24_every_tail(gen, isa, dtype, monkeypatch):
    """Small-M rows (AVX2/AVX-512: one weight row against 1..4 x rows at once, pairs of
    16-wide K chunks, a last odd chunk and 1..3-group tails; generic: pairs of x rows),
    and the GEMM path's tails (M > 4). bf16 without the pair kernel (tested below)."""
    monkeypatch.setenv("FASTKERN_S24_BF16_MIN_M", "0")
    full = dtype == torch.float32
    for m in range(1, 14) if full else (1, 3, 7):
        for n in (1, 2, 3, 4, 5, 7, 17) if full else (1, 6, 17):
            for k in (4, 8, 12, 16, 20, 24, 28, 36, 56, 64, 96, 260) if full else (12, 36, 56, 260):
                x = torch.randn(m, k, generator=gen).to(dtype)
                values, meta, b = sparse24_args(n, k, dtype, gen, bias=(n % 2 == 0))
                out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
                assert_close_elementwise(out, x, formats.decompress_2_4(values, meta), b, dtype)


@needs_cpu24
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 3, 9])
def test_sparse24_meta_high_bits_ignored(gen, isa, m):
    """Only the low 4 bits of a meta byte hold positions: set the high ones, same result."""
    x = torch.randn(m, 64, generator=gen)
    values, meta, b = sparse24_args(33, 64, torch.float32, gen)
    out = torch.ops.fastkern_C.linear_sparse24(x, values, meta | 0xF0, b)
    assert_close_rel(out, ops.linear_sparse24_ref(x, values, meta, b), torch.float32)


@needs_cpu24
@pytest.mark.parametrize("isa", [p for p in cpu_isas() if p.values[0] != "generic"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
def test_sparse24_small_m_k_blocks(gen, isa, dtype, m, monkeypatch):
    """The streaming path on AVX2/AVX-512 (M <= 8, passes of up to 4 rows of x: m = 5 is 4 + 1,
    8 is 4 + 4): chunks of 8 weight rows (n = 1, 7, 9, 17: chunk tails) through K blocks (2048
    columns for 1-2 rows of x, 1344 for 3, 1024 for 4 on a 32 KiB L1d; k = 2052, 2064, 4100,
    6156: several blocks, an odd last chunk, 1-3 tail groups), the accumulators parked between
    blocks: bitwise the whole-row result (FASTKERN_S24_KBLOCK=0), close to the reference, 1 and
    2 threads equal."""
    monkeypatch.setenv("FASTKERN_S24_BF16_MIN_M", "0")
    for n, k in ((1, 2052), (7, 2064), (9, 4100), (17, 6156)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        values, meta, b = sparse24_args(n, k, dtype, gen, bias=True)
        monkeypatch.setenv("FASTKERN_S24_KBLOCK", "0")
        rows = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
        monkeypatch.delenv("FASTKERN_S24_KBLOCK")
        one, two = on_1_and_2_threads(torch.ops.fastkern_C.linear_sparse24, x, values, meta, b)
        assert torch.equal(one, two) and torch.equal(one, rows), (n, k)
        assert_close_elementwise(one, x, formats.decompress_2_4(values, meta), b, dtype)


@needs_cpu24
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 3, 6, 9, 17, 40])
def test_sparse24_garbage_meta_stays_in_bounds(gen, isa, m):
    """Any meta byte selects positions inside its own group of 4 (high bits ignored), and a
    malformed group whose two positions are the same holds the sum of its two values, on every
    path as in the reference (the generic GEMM path used to keep only the second value): random
    bytes against the reference, and all-255 meta against position 3 with both values added."""
    x = torch.randn(m, 64, generator=gen)
    values, _, _ = sparse24_args(20, 64, torch.float32, gen)
    meta = torch.randint(0, 256, (20, 16), generator=gen, dtype=torch.uint8)
    out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, None)
    assert out.shape == (m, 20) and bool(torch.isfinite(out).all())
    assert_close_rel(out, ops.linear_sparse24_ref(x, values, meta, None), torch.float32)
    out = torch.ops.fastkern_C.linear_sparse24(x, values, torch.full((20, 16), 255, dtype=torch.uint8), None)
    x3 = x.reshape(m, 16, 4)[..., 3]
    assert_close_rel(out, torch.einsum("mg,ng->mn", x3, values.reshape(20, 16, 2).sum(-1)), torch.float32)


# largest M on the 2:4 streaming path per ISA (kSmallM, kS24StreamMaxM in csrc/cpu/sparse_gemm.cpp),
# the lanes of a vector and the widest M tile of the kept-weights kernel above it
S24_STREAM_MAX_M = {"generic": 4, "avx2": 8, "avx512": 8}
S24_LANES = {"avx2": 8, "avx512": 16}
S24_MAX_TILE = {"avx2": 32, "avx512": 64}


@needs_cpu24
@pytest.mark.parametrize("isa", [p for p in cpu_isas() if p.values[0] != "generic"], indirect=True)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sparse24_kept_weights_kernel_every_tail(gen, isa, dtype, monkeypatch):
    """The kept-weights kernel (M above the streaming path): every M tile width (1..4
    vectors; the 4-vector ymm tile in two passes of 2 weight rows) and a partial last vector,
    weight rows 1..4 of a register tile and past a parallel chunk, K in several blocks (kc = 256
    or 128 columns; K = 260 and 1028 end in a block of one group) with group tails of the
    8-group packer steps. bf16 x takes it where the pair kernel is off (no AVX512-BF16)."""
    monkeypatch.setenv("FASTKERN_S24_BF16_MIN_M", "0")
    lanes, wide = S24_LANES[isa], S24_MAX_TILE[isa]
    lo = S24_STREAM_MAX_M[isa] + 1
    ms = sorted({lo, lanes - 1, lanes, lanes + 1, 2 * lanes + 3, wide - 1, wide, wide + 1, wide + lanes, 2 * wide + 5})
    ms = [m for m in ms if m >= lo]
    if dtype != torch.float32:
        ms = ms[::3]
    for m in ms:
        for n, k in [(1, 36), (5, 260), (11, 1028), (50, 132), (7, 4)]:
            x = torch.randn(m, k, generator=gen).to(dtype)
            values, meta, b = sparse24_args(n, k, dtype, gen, bias=(n % 2 == 1))
            out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
            assert_close_elementwise(out, x, formats.decompress_2_4(values, meta), b, dtype)


# The bf16 pair kernel (bf16 x and values, AVX512-BF16: one vdpbf16ps lane per kept pair).
HAS_BF16_DOT = has_bf16_dot()
needs_pair = pytest.mark.skipif(not HAS_BF16_DOT, reason="the bf16 2:4 pair kernel needs a CPU with AVX512-BF16")


def int_sparse24(n, k, gen, lo=-3, hi=3):
    """bf16 2:4 weights holding small integers: every product and sum is exact in fp32, so
    the kernel's result (rounded to bf16 once) must equal the reference's bit for bit."""
    w = torch.randint(lo, hi + 1, (n, k), generator=gen).float()
    values, meta = formats.compress_2_4(w + 0.01 * torch.rand(n, k, generator=gen))  # ties broken
    values = values.round().bfloat16()
    return values, meta


def int_x(m, k, gen):
    return torch.randint(-3, 4, (m, k), generator=gen).bfloat16()


@needs_cpu24
@needs_pair
def test_sparse24_bf16_pair_kernel_every_tail(gen, monkeypatch):
    """Every M tile width (16..64 rows of x) and partial last vector, several M tiles, weight
    rows 1..6 of a register tile and several parallel chunks, K in several L1 blocks (85 /
    42 / 28 / 21 groups for 1 / 2 / 3 / 4 vectors of x) with tails of the 16-group packer and
    8-group x-expansion steps. Integer-valued data: exact, compared bit for bit."""
    monkeypatch.setenv("FASTKERN_S24_BF16_MIN_M", "1")
    for m in (1, 5, 15, 16, 17, 31, 33, 47, 49, 63, 64, 65, 80, 130):
        for n, g in [(1, 1), (5, 15), (7, 17), (13, 86), (50, 41), (200, 29), (12, 257)]:
            if m > 33 and n * g > 2000:
                continue
            k = 4 * g
            x = int_x(m, k, gen)
            values, meta = int_sparse24(n, k, gen)
            b = torch.randint(-3, 4, (n,), generator=gen).float() if n % 2 else None
            out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
            ref = ops.linear_sparse24_ref(x, values, meta, b)
            assert torch.equal(out, ref), (m, n, k)


@needs_cpu24
@needs_pair
def test_sparse24_bf16_pair_kernel_random_data(gen):
    """Random bf16 data at the default switch: within the bf16 contract against the exact sum."""
    for m in (6, 9, 40, 200):
        x = torch.randn(m, 1028, generator=gen).bfloat16()
        values, meta, b = sparse24_args(37, 1028, torch.bfloat16, gen)
        out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
        assert_close_elementwise(out, x, formats.decompress_2_4(values, meta), b, torch.bfloat16)


@needs_cpu24
@needs_pair
def test_sparse24_bf16_pair_kernel_meta_orders(gen, monkeypatch):
    """Kept positions in either order (the pair is stored first position low) and groups
    whose two positions are the same (malformed meta: like the other kernels that skip
    pruned weights, both values are added: stored as their bf16 sum); high meta bits ignored."""
    monkeypatch.setenv("FASTKERN_S24_BF16_MIN_M", "1")
    n, g, m = 23, 70, 21
    x = int_x(m, 4 * g, gen)
    values = torch.randint(-3, 4, (n, 2 * g), generator=gen).bfloat16()
    a = torch.randint(0, 4, (n, g), generator=gen)
    b = (a + torch.randint(1, 4, (n, g), generator=gen)) % 4  # distinct from a, either order
    meta = (a | (b << 2) | (torch.randint(0, 16, (n, g), generator=gen) << 4)).to(torch.uint8)
    out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, None)
    assert torch.equal(out, ops.linear_sparse24_ref(x, values, meta & 15, None))
    same = (a | (a << 2)).to(torch.uint8)
    out = torch.ops.fastkern_C.linear_sparse24(x, values, same, None)
    v = values.float().reshape(n, g, 2).sum(-1)  # small integers: exact in bf16
    expected = torch.einsum("mgp,ngp->mn", x.float().reshape(m, g, 4),
                            torch.nn.functional.one_hot(a, 4).float() * v[..., None]).bfloat16()
    assert torch.equal(out, expected)


@needs_cpu24
@needs_pair
def test_sparse24_bf16_pair_kernel_layouts(gen, monkeypatch):
    """3-D and non-contiguous x, values with an odd row stride (its rows are read as 32-bit
    pairs), K in several super-blocks (6 MB of expanded x each: K = 65536 at M = 130 takes
    ten) and M in passes of 256 rows."""
    monkeypatch.setenv("FASTKERN_S24_BF16_MIN_M", "1")
    for layout in ("3d", "noncontig"):
        x = make_x(20, 200, torch.bfloat16, gen, layout).round()
        values, meta = int_sparse24(30, 200, gen)
        assert torch.equal(torch.ops.fastkern_C.linear_sparse24(x, values, meta, None),
                           ops.linear_sparse24_ref(x, values, meta, None))
    big = torch.randint(-3, 4, (30, 101), generator=gen).bfloat16()
    values = big[:, :100]
    assert values.stride(0) == 101
    _, meta = int_sparse24(30, 200, gen)
    x = int_x(19, 200, gen)
    assert torch.equal(torch.ops.fastkern_C.linear_sparse24(x, values, meta, None),
                       ops.linear_sparse24_ref(x, values, meta, None))
    for m, n, k in [(130, 5, 65536), (300, 7, 1028), (530, 13, 260)]:
        x = int_x(m, k, gen)
        values, meta = int_sparse24(n, k, gen, -1, 1)
        assert torch.equal(torch.ops.fastkern_C.linear_sparse24(x, values, meta, None),
                           ops.linear_sparse24_ref(x, values, meta, None)), (m, n, k)


@needs_cpu24
@needs_pair
@pytest.mark.parametrize("m", [6, 40, 200])
def test_sparse24_bf16_pair_kernel_threads_and_nonfinite(gen, m):
    x = torch.randn(m, 704, generator=gen).bfloat16()
    values, meta, b = sparse24_args(333, 704, torch.bfloat16, gen)
    one, two = on_1_and_2_threads(torch.ops.fastkern_C.linear_sparse24, x, values, meta, b)
    assert torch.equal(one, two)
    x[0, 5] = float("nan")
    x[m - 1, 9] = float("inf")
    values[3, 0] = float("inf")
    out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
    ref = ops.linear_sparse24_ref(x, values, meta, b)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


@needs_cpu24
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
def test_sparse24_around_the_path_switch(gen, isa):
    """M on both sides of the streaming / larger-M switch, 3-D and non-contiguous x."""
    s = S24_STREAM_MAX_M[isa]
    for m in (s - 1, s, s + 1):
        for layout in ("contig", "3d", "noncontig"):
            x = make_x(m, 200, torch.float32, gen, layout)
            values, meta, b = sparse24_args(70, 200, torch.float32, gen)
            out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
            assert_close_rel(out, ops.linear_sparse24_ref(x, values, meta, b), torch.float32)


@needs_cpu24
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 3, 9, 40, 200])
def test_sparse24_same_result_for_1_and_2_threads(gen, isa, m):
    x = torch.randn(m, 704, generator=gen)
    values, meta, b = sparse24_args(333, 704, torch.float32, gen)
    one, two = on_1_and_2_threads(torch.ops.fastkern_C.linear_sparse24, x, values, meta, b)
    assert torch.equal(one, two)


@needs_cpu24
@pytest.mark.parametrize("isa", [p for p in cpu_isas() if p.values[0] != "generic"], indirect=True)
def test_sparse24_kept_weights_chunks_per_thread(gen, isa, monkeypatch):
    """The kept-weights kernel's chunks of weight rows: 4 per thread, or one where the
    transposed x is large (here forced both ways by FASTKERN_S24_CHUNKS_PER_THREAD on a small
    x, and the default on an x past 4 MiB): bitwise the same outputs, 1 and 2 threads alike,
    close to the reference."""
    for m, k, n in ((40, 704, 333), (700, 1540, 70)):
        x = torch.randn(m, k, generator=gen)
        values, meta, b = sparse24_args(n, k, torch.float32, gen)
        outs = []
        for cpt in ("1", "4", None):
            if cpt is None:
                monkeypatch.delenv("FASTKERN_S24_CHUNKS_PER_THREAD")
            else:
                monkeypatch.setenv("FASTKERN_S24_CHUNKS_PER_THREAD", cpt)
            one, two = on_1_and_2_threads(torch.ops.fastkern_C.linear_sparse24, x, values, meta, b)
            assert torch.equal(one, two), (m, k, n, cpt)
            outs.append(one)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (m, k, n)
        assert_close_rel(outs[0], ops.linear_sparse24_ref(x, values, meta, b), torch.float32)


@needs_cpu24
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 9, 40])
def test_sparse24_nan_propagates(gen, isa, m):
    x = torch.randn(m, 64, generator=gen)
    values, meta, b = sparse24_args(20, 64, torch.float32, gen)
    x[0, 5] = float("nan")
    values[3, 0] = float("inf")
    out = torch.ops.fastkern_C.linear_sparse24(x, values, meta, b)
    ref = ops.linear_sparse24_ref(x, values, meta, b)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


@needs_cpu24
@pytest.mark.parametrize("op", ["fastkern", "fastkern_C"])
@pytest.mark.parametrize("m", [1, 9])
def test_sparse24_opcheck(gen, op, m):
    values, meta, b = sparse24_args(10, 32, torch.float32, gen)
    args = (torch.randn(m, 32, generator=gen), values, meta, b)
    torch.library.opcheck(getattr(torch.ops, op).linear_sparse24, args)


@needs_cpu24
def test_sparse24_bad_inputs_clear_errors(gen):
    values, meta, b = sparse24_args(10, 32, torch.float32, gen)
    x = torch.randn(3, 32, generator=gen)
    C = torch.ops.fastkern_C.linear_sparse24
    with pytest.raises(RuntimeError, match=r"x \(shape \[3, 36\].*K=32"):
        C(torch.randn(3, 36), values, meta, b)
    with pytest.raises(RuntimeError, match=r"values .*dtype Half.*must have the dtype of x"):
        C(x, values.half(), meta, b)
    with pytest.raises(RuntimeError, match=r"meta \(shape \[10, 7\].*\[10, 8\]"):
        C(x, values, meta[:, :7], b)
    with pytest.raises(RuntimeError, match=r"meta .*uint8"):
        C(x, values, meta.int(), b)
    with pytest.raises(RuntimeError, match=r"bias \(shape \[9\].*\[10\]"):
        C(x, values, meta, b[:9])
    with pytest.raises(RuntimeError, match="K divisible by 4"):
        C(torch.randn(3, 6), torch.randn(10, 3), torch.zeros(10, 1, dtype=torch.uint8), None)
    with fastkern.use_backend("cpu"):
        with pytest.raises(ValueError, match="K=32"):
            torch.ops.fastkern.linear_sparse24(torch.randn(3, 36), values, meta, b)


# =================================================================== block-sparse

@pytest.mark.parametrize("backend", backends_for("linear_blocksparse"))
@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("block,layout,n,k,bias", [
    ((16, 16), "contig", 37, 53, True), ((4, 8), "3d", 67, 300, False),
    ((1, 32), "noncontig", 29, 70, True), ((3, 5), "contig", 31, 77, False), ((16, 16), "3d", 50, 200, True),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_blocksparse_matches_reference(gen, backend, m, dtype, block, layout, n, k, bias):
    slow_triton(backend, m, dtype)
    x = make_x(m, k, dtype, gen, layout)
    blocks, row_ptr, col_idx, b = blocksparse_args(n, k, block, 0.7, dtype, gen, bias)
    with fastkern.use_backend(backend):
        out = torch.ops.fastkern.linear_blocksparse(x, blocks, row_ptr, col_idx, n, b)
    assert_close_rel(out, ops.linear_blocksparse_ref(x, blocks, row_ptr, col_idx, n, b), dtype)


@needs_cpubs
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("block", [(16, 16), (6, 8), (1, 32), (3, 5), (7, 19), (13, 16), (24, 8)],
                         ids=lambda b: "%dx%d" % b)
def test_blocksparse_every_tail(gen, isa, dtype, block):
    """Rows of a block row in tiles (small M: 4 rows AVX2, 16/8/4/2/1 AVX-512; larger M:
    6 rows AVX2, 16 (M tile 16) or 8 (M tile 32) AVX-512) with their tails, k chunks of
    8/16 with their tails, the last block column cut at K, every M tile and its tail."""
    bn, bk = block
    for m in (1, 2, 3, 4, 5, 8, 17, 33) if dtype == torch.float32 else (1, 3, 17):
        for n in (1, bn, bn + 1, 2 * bn + 5):
            for k in (1, bk - 1, bk + 3, 3 * bk + 7):
                if k <= 0:
                    continue
                x = torch.randn(m, k, generator=gen).to(dtype)
                blocks, row_ptr, col_idx, b = blocksparse_args(n, k, block, 0.5, dtype, gen, bias=(n % 2 == 1))
                out = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, n, b)
                dense = formats.blocksparse_to_dense(blocks, row_ptr, col_idx, (n, k))
                assert_close_elementwise(out, x, dense, b, dtype)


@needs_cpubs
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
def test_blocksparse_both_paths_around_the_switch(gen, isa, monkeypatch):
    """M = 5..17, where the dot-product path (up to M = 12 on the AVX2 path, 6 on AVX-512 with
    blocks of 16 columns or more, else 4) meets the panel tiles: both paths forced
    (FASTKERN_BS_SMALL_MAX_M), each against the reference and equal on 1 and 2 threads, and the
    default equal to the path it picks."""
    from conftest import num_threads

    for m in (5, 6, 7, 8, 12, 13, 16, 17):
        for block, n, k in (((16, 16), 70, 300), ((8, 8), 33, 129), ((32, 32), 96, 64)):
            x = torch.randn(m, k, generator=gen)
            blocks, row_ptr, col_idx, b = blocksparse_args(n, k, block, 0.5, torch.float32, gen, bias=True)
            dense = formats.blocksparse_to_dense(blocks, row_ptr, col_idx, (n, k))
            outs = {}
            for knob in ("0", "64"):
                monkeypatch.setenv("FASTKERN_BS_SMALL_MAX_M", knob)
                with num_threads(1):
                    one = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, n, b)
                with num_threads(2):
                    two = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, n, b)
                assert torch.equal(one, two), (m, block, knob)
                assert_close_elementwise(two, x, dense, b, torch.float32)
                outs[knob] = two
            monkeypatch.delenv("FASTKERN_BS_SMALL_MAX_M")
            default = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, n, b)
            small = m <= {"avx2": 12, "avx512": 6 if block[1] >= 16 else 4}.get(isa, 4)
            assert torch.equal(default, outs["64" if small else "0"]), (m, block)


@needs_cpubs
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_blocksparse_padding_never_read(gen, isa, m):
    """Weights past K in the last block column (padding) and empty block rows: NaN in the
    padding must not reach the result, empty rows give just the bias."""
    n, k, block = 40, 37, (8, 16)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    w[8:16] = 0  # an empty block row
    blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, block)
    last = col_idx == (k - 1) // 16
    blocks[last, :, k % 16:] = float("nan")
    b = torch.randn(n, generator=gen)
    out = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, n, b)
    assert_close_rel(out, ops.linear_blocksparse_ref(x, blocks, row_ptr, col_idx, n, b), torch.float32)
    assert torch.equal(out[:, 8:16], b[8:16].expand(m, 8))


@needs_cpubs
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_blocksparse_duplicate_blocks_add(gen, isa, dtype, m):
    """A block listed twice in its block row (a malformed col_idx) counts twice, in every
    kernel and in the reference (which used to keep one of them); against a dense weight
    built by adding the blocks one at a time."""
    n, k = 40, 96
    for block in ((16, 16), (8, 32)):
        bn, bk = block
        cols = [[0, 2, 0, 1, 2, 2], [1], [], [0, 0], [2, 1, 1], [0]][: -(-n // bn)]
        row_ptr = torch.tensor([0] + [sum(len(c) for c in cols[: i + 1]) for i in range(len(cols))])
        col_idx = torch.tensor([c for row in cols for c in row], dtype=torch.int64)
        blocks = torch.randn(len(col_idx), bn, bk, generator=gen).to(dtype)
        dense = torch.zeros(n, k)
        for r, row in enumerate(cols):
            for j, c in enumerate(row):
                dense[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] += blocks[int(row_ptr[r]) + j].float()
        x = torch.randn(m, k, generator=gen).to(dtype)
        out = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, n, None)
        assert_close_rel(out, (x.float() @ dense.T).to(dtype), dtype)
        assert_close_rel(out, ops.linear_blocksparse_ref(x, blocks, row_ptr, col_idx, n, None), dtype)


@needs_cpubs
@pytest.mark.parametrize("m", [1, 3, 200])
def test_blocksparse_same_result_for_1_and_2_threads(gen, m):
    x = torch.randn(m, 700, generator=gen)
    blocks, row_ptr, col_idx, b = blocksparse_args(333, 700, (16, 16), 0.8, torch.float32, gen)
    one, two = on_1_and_2_threads(torch.ops.fastkern_C.linear_blocksparse, x, blocks, row_ptr, col_idx, 333, b)
    assert torch.equal(one, two)


@needs_cpubs
@pytest.mark.parametrize("isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("block", [(16, 16), (4, 8), (13, 3)], ids=lambda b: "%dx%d" % b)
@pytest.mark.parametrize("chunk_kb", [None, "1", "6"], ids=["chunk-default", "chunk-1kb", "chunk-6kb"])
def test_blocksparse_long_block_rows(gen, isa, dtype, block, chunk_kb, monkeypatch):
    """Larger M with block rows of tens to hundreds of blocks: the kernel takes a block
    row's blocks in groups sized for the L1 and carries every sum from one group to the
    next, prefetching each next block's slice of x; with the blocks of each row in column
    order, K in chunks (FASTKERN_BS_CHUNK_KB: 1 KB = one block column per chunk) whose sums
    wait between chunks, M in passes of 256 rows; in any other order one pass over K. Rows
    of 0 to all the blocks (an empty row gives the bias), rows whose blocks all sit in the
    last chunk, M tiles and their tails; 1 = 2 threads."""
    if chunk_kb is not None:
        monkeypatch.setenv("FASTKERN_BS_CHUNK_KB", chunk_kb)
    bn, bk = block
    k = bk * 97 + 5
    for m, shuffle in ((5, False), (9, True), (40, False), (70, True), (70, False), (300, False)):
        w = torch.randn(5 * bn + 3, k, generator=gen)
        w[bn:2 * bn] = 0  # an empty block row
        w[2 * bn:3 * bn] += 1  # a full one
        w[3 * bn:4 * bn, : k - 2 * bk] = 0  # blocks in the last two block columns only
        mask = formats.prune_blocks(w, block, 0.6)
        mask[2 * bn:3 * bn] = True
        mask[3 * bn:4 * bn] = w[3 * bn:4 * bn] != 0
        blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, block, mask)
        if shuffle:
            perm = torch.cat([torch.randperm(int(e - s), generator=gen) + s
                              for s, e in zip(row_ptr[:-1], row_ptr[1:])])
            blocks, col_idx = blocks[perm].contiguous(), col_idx[perm].contiguous()
        blocks = blocks.to(dtype)
        n = w.shape[0]
        x = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen)
        out = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, n, b)
        dense = formats.blocksparse_to_dense(blocks, row_ptr, col_idx, (n, k))
        assert_close_elementwise(out, x, dense, b, dtype)
        assert torch.equal(out[:, bn:2 * bn], b[bn:2 * bn].to(dtype).expand(m, bn))
        one, two = on_1_and_2_threads(torch.ops.fastkern_C.linear_blocksparse, x, blocks, row_ptr, col_idx, n, b)
        assert torch.equal(one, two)


@needs_cpubs
@pytest.mark.skipif(not HAS_BF16_DOT, reason="the bf16 block-sparse pair tiles need a CPU with AVX512-BF16")
@pytest.mark.parametrize("block", [(16, 16), (6, 8), (1, 32), (24, 8), (3, 2)], ids=lambda b: "%dx%d" % b)
def test_blocksparse_bf16_pair_tiles(gen, block):
    """bf16 x and blocks with an even bk at M > 4 (AVX512-BF16): x^T packed as [K/2][Mp] pairs,
    each weight pair broadcast from its block. M tiles of 16 (up to 16 rows) and 32 (up to 8)
    with their tails, block rows with row tails, K odd (the last block ends in a half pair,
    its padding never read, NaN there) and even, K < bk. Integer-valued data and bias: the
    result must equal the exact one rounded to bf16, bit for bit; 1 = 2 threads."""
    bn, bk = block
    C = torch.ops.fastkern_C.linear_blocksparse
    for m in (5, 16, 17, 31, 32, 33, 48, 65):
        for n in (1, bn + 1, 2 * bn + 5, 17 * bn):
            for k in (1, bk - 1, bk, bk + 3, 3 * bk + 7, 4 * bk):
                if k <= 0:
                    continue
                w = torch.randint(-3, 4, (n, k), generator=gen).float()
                blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, block, formats.prune_blocks(w, block, 0.5))
                blocks = blocks.bfloat16()
                if k % bk:  # NaN in the padding of the last block column
                    blocks[col_idx == k // bk, :, k % bk:] = float("nan")
                x = torch.randint(-3, 4, (m, k), generator=gen).bfloat16()
                b = torch.randint(-5, 6, (n,), generator=gen).float()
                dense = formats.blocksparse_to_dense(blocks, row_ptr, col_idx, (n, k)).double()
                exact = (x.double() @ dense.T + b.double()).to(torch.bfloat16)
                out = C(x, blocks, row_ptr, col_idx, n, b)
                assert torch.equal(out, exact), (m, n, k)
    x = torch.randn(70, 700, generator=gen).bfloat16()
    blocks, row_ptr, col_idx, b = blocksparse_args(333, 700, block, 0.6, torch.bfloat16, gen)
    one, two = on_1_and_2_threads(C, x, blocks, row_ptr, col_idx, 333, b)
    assert torch.equal(one, two)


@needs_cpubs
@pytest.mark.parametrize("m", [1, 9])
def test_blocksparse_nan_propagates(gen, m):
    x = torch.randn(m, 64, generator=gen)
    blocks, row_ptr, col_idx, b = blocksparse_args(32, 64, (8, 8), 0.5, torch.float32, gen)
    x[0, int(col_idx[0]) * 8] = float("nan")
    blocks[1, 2, 3] = float("inf")
    out = torch.ops.fastkern_C.linear_blocksparse(x, blocks, row_ptr, col_idx, 32, b)
    ref = ops.linear_blocksparse_ref(x, blocks, row_ptr, col_idx, 32, b)
    assert bool(torch.isnan(out).any())
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


@needs_cpubs
def test_blocksparse_empty_dims(gen):
    blocks, row_ptr, col_idx, b = blocksparse_args(20, 30, (4, 8), 0.5, torch.float32, gen)
    out = torch.ops.fastkern_C.linear_blocksparse(torch.randn(2, 0, 30), blocks, row_ptr, col_idx, 20, b)
    assert out.shape == (2, 0, 20)
    empty = torch.zeros(0, 4, 8)
    out = torch.ops.fastkern_C.linear_blocksparse(torch.randn(3, 30), empty, torch.zeros(6, dtype=torch.long),
                                                  torch.zeros(0, dtype=torch.long), 20, b)
    assert torch.equal(out, b.expand(3, 20))


@needs_cpubs
@pytest.mark.parametrize("op", ["fastkern", "fastkern_C"])
@pytest.mark.parametrize("m", [1, 9])
def test_blocksparse_opcheck(gen, op, m):
    blocks, row_ptr, col_idx, b = blocksparse_args(20, 30, (4, 8), 0.5, torch.float32, gen)
    args = (torch.randn(m, 30, generator=gen), blocks, row_ptr, col_idx, 20, b)
    torch.library.opcheck(getattr(torch.ops, op).linear_blocksparse, args)


@needs_cpubs
def test_blocksparse_bad_inputs_clear_errors(gen):
    blocks, row_ptr, col_idx, b = blocksparse_args(20, 30, (4, 8), 0.5, torch.float32, gen)
    x = torch.randn(3, 30, generator=gen)
    C = torch.ops.fastkern_C.linear_blocksparse
    bad = col_idx.clone()
    bad[2] = 4  # K=30 has 4 block columns of width 8: 0..3
    with pytest.raises(RuntimeError, match=r"col_idx\[2\]=4 is out of range.*K=30"):
        C(x, blocks, row_ptr, bad, 20, b)
    bad[2] = -1
    with pytest.raises(RuntimeError, match=r"col_idx\[2\]=-1 is out of range"):
        C(x, blocks, row_ptr, bad, 20, b)
    rp = row_ptr.clone()
    rp[2] = int(rp[3]) + 1
    with pytest.raises(RuntimeError, match="row_ptr must be non-decreasing"):
        C(x, blocks, rp, col_idx, 20, b)
    rp = row_ptr.clone()
    rp[-1] += 1
    with pytest.raises(RuntimeError, match="row_ptr must start at 0 and end at nnz_blocks"):
        C(x, blocks, rp, col_idx, 20, b)
    with pytest.raises(RuntimeError, match=r"row_ptr \(shape \[5\].*\[6\]"):
        C(x, blocks, row_ptr[:5], col_idx, 20, b)
    with pytest.raises(RuntimeError, match=r"col_idx .*int64"):
        C(x, blocks, row_ptr, col_idx.int(), 20, b)
    with pytest.raises(RuntimeError, match=r"blocks .*dtype BFloat16.*must have the dtype of x"):
        C(x, blocks.bfloat16(), row_ptr, col_idx, 20, b)
    with pytest.raises(RuntimeError, match=r"blocks .*3-D"):
        C(x, blocks[0], row_ptr, col_idx, 20, b)
    with fastkern.use_backend("cpu"):
        bad = col_idx.clone()
        bad[0] = 99
        with pytest.raises(RuntimeError, match="col_idx"):
            torch.ops.fastkern.linear_blocksparse(x, blocks, row_ptr, bad, 20, b)
