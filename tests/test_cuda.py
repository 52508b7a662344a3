"""The cuda backend (CUDA C++ kernels in fastkern._C) of every op against its reference.

Every test here needs an NVIDIA GPU (marker ``cuda``; conftest skips them with the
reason when none is visible). References run on CPU copies of the inputs, in the
upcast math of fastkern/ops.py, so a GPU library's own rounding never enters the
comparison. Shapes cover each kernel path: the three tile configs (M <= 16,
<= 64, larger), split-K (few output tiles, long K), the byte-wise copy taken
when rows are not 16-byte aligned (odd K), tile tails in M, N and K, fp32 (the
CUDA-core path) and fp16/bf16 (tensor cores).
"""
import pytest
import torch

import fastkern
from fastkern import formats, ops
from fastkern._ext import _C

from conftest import FLOAT_DTYPES, M_SIZES, assert_close_rel, rel_err

pytestmark = pytest.mark.cuda

DEV = "cuda"
LAYOUTS = ["2d", "3d", "noncontig"]


@pytest.fixture(autouse=True)
def _cuda_backend():
    """Skip when the extension has no CUDA kernels; a CUDA build missing one op's kernel fails."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU; none is visible")
    if _C is None or not _C.build_info()["with_cuda"]:
        pytest.skip("fastkern._C was built without CUDA kernels (rebuild with FASTKERN_CUDA=1)")
    # the GPU-side references (large shapes) must be true fp32 matmuls
    torch.backends.cuda.matmul.allow_tf32 = False
    yield


def run(op, *args):
    """The public op forced onto the cuda backend."""
    with fastkern.use_backend("cuda"):
        out = getattr(torch.ops.fastkern, op)(*args)
    torch.cuda.synchronize()
    return out


def ref(op, *args):
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    return getattr(ops, op + "_ref")(*cpu)


def make_x(gen, m, k, dtype, layout):
    if layout == "noncontig":
        # sliced on the device: .to() would make a gapped view contiguous
        x = torch.randn(m, 2 * k + 3, generator=gen).to(dtype).to(DEV)[:, 3::2]
        assert not x.is_contiguous() or m <= 1
        return x
    x = torch.randn(m, k, generator=gen).to(dtype)
    if layout == "3d":
        x = x.reshape(1, m, k) if m % 2 else x.reshape(m, 1, k)
    return x.to(DEV)


def make_bias(gen, n, with_bias, dtype=torch.float32):
    return torch.randn(n, generator=gen).to(dtype).to(DEV) if with_bias else None


def check(out, expected, dtype):
    assert out.device.type == "cuda"
    assert_close_rel(out.cpu(), expected, dtype)


def test_every_op_has_a_cuda_kernel():
    missing = [op for op in ops.OPS if ops.backend_status(op, "cuda", torch.device(DEV)) is not None]
    assert not missing, {op: ops.backend_status(op, "cuda", torch.device(DEV)) for op in missing}
    assert ops.select_backend("gemm", torch.device(DEV)) == "cuda"


# ----------------------------------------------------------------- gemm

GEMM_NK = [(5, 7), (33, 47), (64, 128), (130, 264), (257, 1031)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("nk", GEMM_NK, ids=str)
@pytest.mark.parametrize("m", M_SIZES + [65, 300])
def test_gemm(gen, m, nk, dtype, layout):
    n, k = nk
    a = make_x(gen, m, k, dtype, layout)
    b = torch.randn(n, k, generator=gen).to(dtype).to(DEV)
    check(run("gemm", a, b), ref("gemm", a, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gemm_split_k(gen, m, dtype):
    # few output tiles and a long K: the launcher splits K and sums the partials in order
    a = torch.randn(m, 8192, generator=gen).to(dtype).to(DEV)
    b = torch.randn(96, 8192, generator=gen).to(dtype).to(DEV)
    out = run("gemm", a, b)
    check(out, ref("gemm", a, b), dtype)
    assert torch.equal(out, run("gemm", a, b)), "split-K must be deterministic"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemm_half_error_vs_torch(gen, dtype):
    # flash-attention's rule: the low-precision kernel's error at most 2x plain torch's in the same precision
    a = torch.randn(200, 1000, generator=gen).to(dtype).to(DEV)
    b = torch.randn(300, 1000, generator=gen).to(dtype).to(DEV)
    exact = a.double() @ b.double().T
    ours = rel_err(run("gemm", a, b), exact)
    theirs = rel_err(torch.nn.functional.linear(a, b), exact)
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)


# ----------------------------------------------------------------- int8

INT8_NK = [(5, 7), (33, 47), (64, 128), (130, 264), (257, 1031)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nk", INT8_NK, ids=str)
@pytest.mark.parametrize("m", M_SIZES + [65, 300])
def test_int8_gemm_exact(gen, m, nk, layout):
    n, k = nk
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    if layout == "3d":
        a = a.reshape(1, m, k)
    a = a.to(DEV)
    if layout == "noncontig":
        a = torch.randint(-128, 128, (m, 2 * k), generator=gen, dtype=torch.int8).to(DEV)[:, ::2]
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(DEV)
    out = run("int8_gemm", a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.cpu(), ref("int8_gemm", a, b))


def make_w8(gen, n, k):
    q, s = formats.quantize_int8(torch.randn(n, k, generator=gen))
    return q.to(DEV), s.to(DEV)


@pytest.mark.parametrize("op", ["linear_w8a16", "linear_w8a8"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("nk", INT8_NK, ids=str)
@pytest.mark.parametrize("m", M_SIZES + [65])
def test_linear_w8(gen, op, m, nk, dtype, layout, with_bias):
    n, k = nk
    x = make_x(gen, m, k, dtype, layout)
    w, s = make_w8(gen, n, k)
    bias = make_bias(gen, n, with_bias)
    # fp32 outputs at 1e-5 also pin W8A8's activation quantization: a single
    # int8 value off by one moves the output by far more than that
    check(run(op, x, w, s, bias), ref(op, x, w, s, bias), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_linear_w8a8_quantization_edge_rows(gen, dtype):
    k, n = 96, 40
    x = torch.randn(6, k, generator=gen)
    x[1] = 0.0  # s = 0, q = 0
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    x[4] = torch.arange(k) - k / 2 + 0.5  # exact .5 ties after scaling: round half to even
    x = x.to(dtype).to(DEV)
    w, s = make_w8(gen, n, k)
    out = run("linear_w8a8", x, w, s, None).cpu()
    expected = ref("linear_w8a8", x, w, s, None)
    assert torch.isnan(out[2]).all() and torch.isnan(out[3]).all()
    assert torch.equal(out[1], expected[1])
    keep = [0, 1, 4, 5]
    assert_close_rel(out[keep], expected[keep], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_w8a8_large(gen, dtype):
    x = torch.randn(512, 4096, generator=gen).to(dtype).to(DEV)
    w, s = make_w8(gen, 1024, 4096)
    check(run("linear_w8a8", x, w, s, None), ref("linear_w8a8", x, w, s, None), dtype)


# ----------------------------------------------------------------- int4

W4_NK_GROUP = [
    (5, 32, 32),
    (33, 128, 128),
    (64, 256, 64),
    (130, 384, 128),
    (257, 1024, 128),
    (40, 96, 96),  # one group = K, not a power of two
    (24, 72, 24),  # group % 16 != 0 ... 24 % 16 = 8: the per-fragment group lookup
    (17, 60, 6),  # tiny odd-multiple group; K % 32 != 0: byte-wise weight copy
    (31, 250, 10),
]


def make_w4(gen, n, k, group):
    w = torch.randn(n, k, generator=gen)
    packed, scale, zero = formats.quantize_int4(w, group_size=group)
    return packed.to(DEV), scale.to(DEV), zero.to(DEV)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("nkg", W4_NK_GROUP, ids=str)
@pytest.mark.parametrize("m", M_SIZES + [65])
def test_linear_w4a16(gen, m, nkg, dtype, layout, with_bias):
    n, k, group = nkg
    x = make_x(gen, m, k, dtype, layout)
    w, sc, z = make_w4(gen, n, k, group)
    bias = make_bias(gen, n, with_bias)
    check(run("linear_w4a16", x, w, sc, z, group, bias), ref("linear_w4a16", x, w, sc, z, group, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_w4a16_symmetric_and_scale_dtypes(gen, dtype):
    w = torch.randn(96, 256, generator=gen)
    packed, scale, zero = formats.quantize_int4(w, group_size=64, symmetric=True)
    x = torch.randn(9, 256, generator=gen).to(dtype).to(DEV)
    for sc in (scale, scale.to(dtype)):
        args = (x, packed.to(DEV), sc.to(DEV), zero.to(DEV), 64, None)
        check(run("linear_w4a16", *args), ref("linear_w4a16", *args), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 64])
def test_linear_w4a16_large(m, dtype):
    # DESIGN §6's GPU shape; reference computed on the GPU in fp32 (a CPU one is slow at this size)
    g = torch.Generator(device=DEV).manual_seed(7)
    n = k = 8192
    w = torch.randn(n, k, generator=g, device=DEV)
    packed, scale, zero = formats.quantize_int4(w, group_size=128)
    del w
    x = torch.randn(m, k, generator=g, device=DEV).to(dtype)
    out = run("linear_w4a16", x, packed, scale, zero, 128, None)
    expected = ops.linear_w4a16_ref(x, packed, scale, zero, 128, None)
    assert_close_rel(out, expected, dtype)


def test_linear_w4a16_nonfinite_propagates(gen):
    x = torch.randn(3, 128, generator=gen).half()
    x[1, 3] = float("nan")
    w, sc, z = make_w4(gen, 16, 128, 32)
    out = run("linear_w4a16", x.to(DEV), w, sc, z, 32, None).cpu()
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("nkg", W4_NK_GROUP, ids=str)
@pytest.mark.parametrize("m", M_SIZES + [65])
def test_linear_w4a8(gen, m, nkg, dtype, with_bias):
    n, k, group = nkg
    x = make_x(gen, m, k, dtype, "3d" if m % 2 else "noncontig")
    w, sc, z = make_w4(gen, n, k, group)
    bias = make_bias(gen, n, with_bias)
    check(run("linear_w4a8", x, w, sc, z, group, bias), ref("linear_w4a8", x, w, sc, z, group, bias), dtype)


def test_linear_w4a8_nonfinite_rows(gen):
    x = torch.randn(3, 128, generator=gen).half()
    x[1, 3] = float("inf")
    w, sc, z = make_w4(gen, 16, 128, 32)
    out = run("linear_w4a8", x.to(DEV), w, sc, z, 32, None).cpu()
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()


# ----------------------------------------------------------------- 2:4

S24_NK = [(5, 8), (33, 52), (64, 128), (130, 264), (257, 1024), (19, 4)]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("nk", S24_NK, ids=str)
@pytest.mark.parametrize("m", M_SIZES + [65])
def test_linear_sparse24(gen, m, nk, dtype, layout, with_bias):
    n, k = nk
    x = make_x(gen, m, k, dtype, layout)
    values, meta = formats.compress_2_4(torch.randn(n, k, generator=gen).to(dtype))
    values, meta = values.to(DEV), meta.to(DEV)
    bias = make_bias(gen, n, with_bias)
    check(run("linear_sparse24", x, values, meta, bias), ref("linear_sparse24", x, values, meta, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_sparse24_every_meta_pattern(gen, dtype):
    # all six position pairs, in every slot of a k-step, for every lane of a quad
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    n, k = 24, 96
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    for r in range(n):
        for gi in range(k // 4):
            i0, i1 = pairs[(r + gi) % 6]
            mask[r, gi, i0] = mask[r, gi, i1] = True
    w = torch.randn(n, k, generator=gen).to(dtype)
    values, meta = formats.compress_2_4(w, mask.reshape(n, k))
    x = torch.randn(5, k, generator=gen).to(dtype).to(DEV)
    args = (x, values.to(DEV), meta.to(DEV), None)
    check(run("linear_sparse24", *args), ref("linear_sparse24", *args), dtype)


# 2:4 on sparse tensor cores (mma.sp, fp16/bf16 with K % 16 == 0): the instruction's
# metadata word is built in registers from the canonical meta, so every meta
# pattern must reach every nibble of it (4 groups x 2 k16 halves x rows g / g + 8);
# K not a multiple of 32 or 64 leaves zero-filled tails (padded meta nibbles).
S24_SP_NK = [(37, 48), (130, 80), (27, 16), (64, 1040), (257, 256), (200, 4096)]
S24_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def _with_mma_sp(monkeypatch, enabled):
    monkeypatch.setenv("FASTKERN_SPARSE24_MMA_SP", "1" if enabled else "0")


def _pattern_weight(gen, n, k, dtype, shift=0):
    """2:4 weight whose groups cycle through all six kept-position pairs, by row and group."""
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    for r in range(n):
        for gi in range(k // 4):
            i0, i1 = S24_PAIRS[(r + gi + shift) % 6]
            mask[r, gi, i0] = mask[r, gi, i1] = True
    w = torch.randn(n, k, generator=gen).to(dtype)
    return formats.compress_2_4(w, mask.reshape(n, k))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nk", S24_SP_NK, ids=str)
@pytest.mark.parametrize("m", [1, 17, 128])
def test_linear_sparse24_mma_sp(gen, monkeypatch, m, nk, dtype, with_bias):
    n, k = nk
    _with_mma_sp(monkeypatch, True)
    x = make_x(gen, m, k, dtype, "2d")
    values, meta = formats.compress_2_4(torch.randn(n, k, generator=gen).to(dtype))
    values, meta = values.to(DEV), meta.to(DEV)
    bias = make_bias(gen, n, with_bias)
    expected = ref("linear_sparse24", x, values, meta, bias)
    check(run("linear_sparse24", x, values, meta, bias), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nk", [(27, 96), (40, 80), (19, 48), (130, 128)], ids=str)
@pytest.mark.parametrize("m", [1, 17, 128])
@pytest.mark.parametrize("shift", [0, 3])
def test_linear_sparse24_mma_sp_every_meta_pattern(gen, monkeypatch, m, nk, dtype, shift):
    n, k = nk
    _with_mma_sp(monkeypatch, True)
    values, meta = _pattern_weight(gen, n, k, dtype, shift)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    args = (x, values.to(DEV), meta.to(DEV), None)
    check(run("linear_sparse24", *args), ref("linear_sparse24", *args), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 17, 128])
def test_linear_sparse24_mma_sp_single_pattern_weights(gen, monkeypatch, m, dtype):
    # one pattern for the whole weight: a wrong nibble order or half-word shows up
    # as a large error instead of averaging out over mixed patterns
    _with_mma_sp(monkeypatch, True)
    n, k = 33, 64
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    for i0, i1 in S24_PAIRS:
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
        mask[..., i0] = mask[..., i1] = True
        values, meta = formats.compress_2_4(torch.randn(n, k, generator=gen).to(dtype), mask.reshape(n, k))
        args = (x, values.to(DEV), meta.to(DEV), None)
        check(run("linear_sparse24", *args), ref("linear_sparse24", *args), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_linear_sparse24_mma_sp_split_k(gen, monkeypatch, m, dtype):
    # few output tiles and a long K: linear_splits picks split-K on any GPU
    _with_mma_sp(monkeypatch, True)
    n, k = 64, 8192
    values, meta = formats.compress_2_4(torch.randn(n, k, generator=gen).to(dtype))
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    bias = make_bias(gen, n, True)
    args = (x, values.to(DEV), meta.to(DEV), bias)
    out = run("linear_sparse24", *args)
    check(out, ref("linear_sparse24", *args), dtype)
    assert torch.equal(out, run("linear_sparse24", *args)), "split-K result is not deterministic"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 17, 128])
def test_linear_sparse24_mma_sp_matches_dense_expansion(gen, monkeypatch, m, dtype):
    # the two fp16/bf16 paths (mma.sp and values expanded into dense mma) side by side
    n, k = 96, 320
    values, meta = formats.compress_2_4(torch.randn(n, k, generator=gen).to(dtype))
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    args = (x, values.to(DEV), meta.to(DEV), make_bias(gen, n, True))
    _with_mma_sp(monkeypatch, True)
    sp = run("linear_sparse24", *args)
    _with_mma_sp(monkeypatch, False)
    dense = run("linear_sparse24", *args)
    expected = ref("linear_sparse24", *args)
    check(sp, expected, dtype)
    check(dense, expected, dtype)
    assert rel_err(sp.cpu(), dense.cpu()) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 17, 128])
def test_linear_sparse24_mma_sp_nonfinite_propagates(gen, monkeypatch, m, dtype):
    # mma.sp never reads x at pruned positions; the reference multiplies them by 0
    # (0 * inf = NaN): the fix-up pass must give the same NaN/inf pattern
    _with_mma_sp(monkeypatch, True)
    n, k = 40, 128
    values, meta = _pattern_weight(gen, n, k, dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[0, 5] = float("nan")
    x[m - 1, 70] = float("inf")
    values[3, 0] = float("inf")
    args = (x.to(DEV), values.to(DEV), meta.to(DEV), None)
    out = run("linear_sparse24", *args).cpu()
    expected = ref("linear_sparse24", *args)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    fin = torch.isfinite(expected)
    if m > 2:  # rows 1 .. m-2 hold finite x
        assert bool(fin.any())
        assert_close_rel(out[fin], expected[fin], dtype)


# ----------------------------------------------------------------- block-sparse

BLOCK_CASES = [
    # (n, k, (bn, bk), sparsity)
    (64, 64, (16, 16), 0.5),
    (100, 90, (16, 16), 0.9),
    (37, 53, (7, 5), 0.6),
    (96, 128, (32, 8), 0.75),
    (130, 200, (64, 64), 0.5),
    (257, 300, (128, 32), 0.8),
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
@pytest.mark.parametrize("m", M_SIZES + [65])
def test_linear_blocksparse(gen, m, case, dtype, layout, with_bias):
    n, k, block, sparsity = case
    w = torch.randn(n, k, generator=gen).to(dtype)
    mask = formats.prune_blocks(w, block, sparsity)
    blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, block, mask)
    x = make_x(gen, m, k, dtype, layout)
    bias = make_bias(gen, n, with_bias)
    args = (x, blocks.to(DEV), row_ptr.to(DEV), col_idx.to(DEV), n, bias)
    check(run("linear_blocksparse", *args), ref("linear_blocksparse", *args), dtype)


def test_linear_blocksparse_empty_block_rows(gen):
    w = torch.randn(48, 64, generator=gen)
    w[16:32] = 0  # a block row with no blocks at all: its outputs are the bias
    blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, (16, 16))
    assert row_ptr[2] == row_ptr[1]
    x = torch.randn(5, 64, generator=gen).to(DEV)
    bias = torch.randn(48, generator=gen).to(DEV)
    args = (x, blocks.to(DEV), row_ptr.to(DEV), col_idx.to(DEV), 48, bias)
    out = run("linear_blocksparse", *args)
    check(out, ref("linear_blocksparse", *args), torch.float32)
    assert torch.equal(out[:, 16:32].cpu(), bias[16:32].cpu().expand(5, 16))


# ----------------------------------------------------------------- op contract

def _opcheck_cases(gen):
    x16 = torch.randn(3, 64, generator=gen).half().to(DEV)
    w8, s8 = make_w8(gen, 48, 64)
    w4, sc4, z4 = make_w4(gen, 48, 64, 32)
    vals, meta = formats.compress_2_4(torch.randn(48, 64, generator=gen).half())
    w = torch.randn(48, 64, generator=gen)
    blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w * formats.prune_blocks(w, (16, 16), 0.5), (16, 16))
    bias = torch.randn(48, generator=gen).to(DEV)
    a8 = torch.randint(-128, 128, (3, 64), generator=gen, dtype=torch.int8).to(DEV)
    return {
        "gemm": (x16, torch.randn(48, 64, generator=gen).half().to(DEV)),
        "int8_gemm": (a8, w8),
        "linear_w8a16": (x16, w8, s8, bias),
        "linear_w8a8": (x16, w8, s8, bias),
        "linear_w4a16": (x16, w4, sc4, z4, 32, bias),
        "linear_w4a8": (x16, w4, sc4, z4, 32, bias),
        "linear_sparse24": (x16, vals.to(DEV), meta.to(DEV), None),
        "linear_blocksparse": (x16.float(), blocks.to(DEV), row_ptr.to(DEV), col_idx.to(DEV), 48, bias),
    }


@pytest.mark.parametrize("op", list(ops.OPS))
def test_opcheck(gen, op):
    args = _opcheck_cases(gen)[op]
    torch.library.opcheck(getattr(torch.ops.fastkern_C, op), args)
    with fastkern.use_backend("cuda"):
        torch.library.opcheck(getattr(torch.ops.fastkern, op), args)


@pytest.mark.parametrize("op", list(ops.OPS))
def test_runs_on_current_stream(gen, op):
    args = _opcheck_cases(gen)[op]
    expected = getattr(torch.ops.fastkern_C, op)(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = getattr(torch.ops.fastkern_C, op)(*args)
    s.synchronize()
    assert torch.equal(out, expected)


def test_native_errors_name_the_tensor(gen):
    x = torch.randn(3, 64, generator=gen).half().to(DEV)
    w8, s8 = make_w8(gen, 48, 64)
    with pytest.raises(RuntimeError, match=r"w_scale .*must be a CUDA tensor"):
        torch.ops.fastkern_C.linear_w8a16(x, w8, s8.cpu(), None)
    with pytest.raises(RuntimeError, match=r"x .*must have K=64"):
        torch.ops.fastkern_C.linear_w8a16(x[:, :32], w8, s8, None)
    w4, sc4, z4 = make_w4(gen, 48, 64, 32)
    with pytest.raises(RuntimeError, match=r"zeros .*must have shape \[48, 2\]"):
        torch.ops.fastkern_C.linear_w4a16(x, w4, sc4, z4[:, :1], 32, None)
    with pytest.raises(RuntimeError, match=r"group_size=12"):
        torch.ops.fastkern_C.linear_w4a16(x, w4, sc4, z4, 12, None)


def test_k_zero_gives_bias(gen):
    x = torch.randn(4, 0).half().to(DEV)
    w = torch.zeros(6, 0, dtype=torch.int8, device=DEV)
    s = torch.ones(6, device=DEV)
    bias = torch.randn(6, generator=gen).to(DEV)
    out = torch.ops.fastkern_C.linear_w8a16(x, w, s, bias)
    assert torch.equal(out.cpu(), bias.half().cpu().expand(4, 6))
