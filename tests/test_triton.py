"""The triton backend against the op references (DESIGN §4).

On a CPU machine these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1
before triton is imported), on CPU tensors, with each family's small fixed config;
the shapes are small and never multiples of the block sizes (16/32), so masking,
partial K steps, split-K and grouped ordering all run. Tests marked ``cuda`` repeat
the comparisons on a GPU at larger shapes, with the autotuner on, and check every
candidate config the tuner may pick.

Measured under the interpreter (relative Frobenius error against the fp32
reference): fp32 1e-7, fp16 up to 4e-4, bf16 up to 6e-3 (linear_w4a16: the
dequantized weight is rounded to bf16 before the dot, as on the GPU's tensor cores);
conftest.tol allows 1e-5 / 1e-2. The interpreter multiplies fp16 tiles in numpy with
fp32 results and bf16 tiles after an exact upcast to fp32, which is what the GPU's
MMA computes (exact products, fp32 sums), so these errors are representative.
linear_w4a8 (int32 dot products, the scales in fp32): fp32 1.4e-7, fp16 7e-5, bf16 4e-3;
nearly all of bf16's error is the interpreter's cast of fp32 to bf16, which truncates
where a GPU rounds to nearest even.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastkern as fk
from conftest import FLOAT_DTYPES, assert_close_rel, rel_err, tol
from fastkern import formats, ops

triton = pytest.importorskip("triton")

# NaN / inf rows make numpy warn inside the interpreter; the tests check the results
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

from fastkern.triton import _w4a8, _weightonly, autotune, gemm as tgemm, sparse as tsparse  # noqa: E402
from fastkern.triton import quantize_per_token  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = [pytest.param(d, id=DT_IDS[d]) for d in FLOAT_DTYPES]

# (leading dims of x, memory layout of x, bias?) -- M = prod(leading dims)
CASES = [
    pytest.param((0,), "contig", True, id="M0"),
    pytest.param((1,), "contig", False, id="M1"),
    pytest.param((3,), "transposed", True, id="M3-transposed"),
    pytest.param((17,), "strided", False, id="M17-strided"),
    pytest.param((2, 9), "contig", True, id="3d-M18"),
    pytest.param((1, 3), "strided", True, id="3d-M3-strided"),
]

N, K = 40, 72


def make_x(lead, k, dtype, layout, gen, device="cpu"):
    m = math.prod(lead)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    if layout == "contig":
        x = rnd(*lead, k)
    elif layout == "strided":  # every other feature: the K stride is 2
        x = rnd(*lead, 2 * k)[..., ::2]
    else:  # [K, M] storage: the M stride is 1, the K stride is M
        x = rnd(k, m).T.reshape(*lead, k)
    if layout != "contig" and m > 1:
        assert not x.is_contiguous()
    return x


def op_args(op, x, n, gen, bias, group_size=24, block=(16, 16)):
    """Arguments of ``op`` for activations x [..., K]: fresh random weights in the canonical format."""
    k = x.shape[-1]
    dev, dtype = x.device, x.dtype
    w = torch.randn(n, k, generator=gen)
    b = (torch.randn(n, generator=gen) * 0.5).to(dev, dtype) if bias else None
    if op == "gemm":
        return (x, w.to(dev, dtype))
    if op in ("linear_w8a16", "linear_w8a8"):
        q, s = formats.quantize_int8(w)
        return (x, q.to(dev), s.to(dev), b)
    if op in ("linear_w4a16", "linear_w4a8"):
        p, s, z = formats.quantize_int4(w, group_size)
        return (x, p.to(dev), s.to(dev), z.to(dev), group_size, b)
    if op == "linear_sparse24":
        v, meta = formats.compress_2_4(w.to(dtype))
        return (x, v.to(dev), meta.to(dev), b)
    if op == "linear_blocksparse":
        mask = formats.prune_blocks(w, block, 0.6)
        blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w.to(dtype), block, mask)
        return (x, blocks.to(dev), row_ptr.to(dev), col_idx.to(dev), n, b)
    raise AssertionError(op)


def run_triton(op, args):
    with fk.use_backend("triton"):
        return getattr(torch.ops.fastkern, op)(*args)


def check(op, args, dtype):
    out = run_triton(op, args)
    ref = getattr(ops, op + "_ref")(*args)
    assert_close_rel(out, ref, dtype)
    return out


FLOAT_OPS = ["gemm", "linear_w8a16", "linear_w8a8", "linear_w4a16", "linear_w4a8", "linear_sparse24",
             "linear_blocksparse"]


# ------------------------------------------------------------------ every op, every case


@pytest.mark.parametrize("op", FLOAT_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,layout,bias", CASES)
def test_float_ops_match_reference(op, dtype, lead, layout, bias, gen):
    if op == "gemm" and bias:
        bias = False  # gemm has no bias; the case still covers its layout
    x = make_x(lead, K, dtype, layout, gen)
    out = check(op, op_args(op, x, N, gen, bias), dtype)
    assert out.shape == tuple(lead) + (N,)


@pytest.mark.parametrize("lead,layout", [((0,), "contig"), ((1,), "contig"), ((3,), "transposed"),
                                         ((17,), "strided"), ((2, 9), "contig"), ((1, 3), "strided")])
def test_int8_gemm_exact(lead, layout, gen):
    m = math.prod(lead)
    a = torch.randint(-128, 128, (max(m, 1) * 2, K), generator=gen, dtype=torch.int8)
    if layout == "strided":
        a = torch.randint(-128, 128, (*lead, 2 * K), generator=gen, dtype=torch.int8)[..., ::2]
    elif layout == "transposed":
        a = torch.randint(-128, 128, (K, m), generator=gen, dtype=torch.int8).T
    else:
        a = torch.randint(-128, 128, (*lead, K), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    out = run_triton("int8_gemm", (a, b))
    assert out.dtype == torch.int32 and out.shape == tuple(lead) + (N,)
    assert torch.equal(out, ops.int8_gemm_ref(a, b))


def test_int8_gemm_extremes_exact():
    # -128 * -128 summed over K = 300 needs the full int32 accumulator (4.9e6 > 2**16)
    a = torch.full((5, 300), -128, dtype=torch.int8)
    b = torch.full((33, 300), -128, dtype=torch.int8)
    b[1::2] = 127
    out = run_triton("int8_gemm", (a, b))
    assert torch.equal(out, ops.int8_gemm_ref(a, b))
    assert int(out[0, 0]) == 128 * 128 * 300


# ----------------------------------------------------------- per-token quantization


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_bit_exact(dtype, gen):
    x = torch.randn(9, 75, generator=gen) * torch.logspace(-3, 3, 9)[:, None]
    x[1] = 0.0  # s = 0, q = 0
    x[2, 5] = float("nan")
    x[3, 0] = float("inf")
    x[4, 70] = -float("inf")
    # s = 1 exactly, so x / s lands on ties: round half to even must give 2, -2, 0, 4 ...
    x[5] = torch.tensor([127.0] + [((i % 24) - 11.5) for i in range(74)])
    x[6, :4] = torch.tensor([2.5, -2.5, 0.5, -0.5])
    x[6, 4:] = 0.25
    x[6, 10] = 127.0
    x = x.to(dtype)
    q, s = quantize_per_token(x)
    rq, rs = formats.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, rq)
    assert torch.equal(s.isnan(), rs.isnan())
    assert torch.equal(s[~s.isnan()], rs[~rs.isnan()])
    assert q[5, 1:5].tolist() == [-12, -10, -10, -8]  # -11.5, -10.5, -9.5, -8.5
    assert q[6, :4].tolist() == [2, -2, 0, 0]


def test_quantize_per_token_3d_strided(gen):
    x = torch.randn(2, 3, 150, generator=gen)[..., ::2] * 7
    q, s = quantize_per_token(x)
    rq, rs = formats.quantize_per_token(x)
    assert q.shape == rq.shape and s.shape == rs.shape
    assert torch.equal(q, rq) and torch.equal(s, rs)


# ------------------------------------------------------------ formats and variants


@pytest.mark.parametrize("k,group_size", [(72, 24), (128, 64), (72, 72), (48, 6), (64, 32)],
                         ids=["g24-gather", "g64-per-row", "g72-one-group", "g6", "g32-tile"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w4a16_group_sizes(k, group_size, m, gen):
    # BLOCK_K = 32 in the interpreter: groups that are multiples of it take the
    # one-scale-per-row path, the others gather a scale per element
    x = torch.randn(m, k, generator=gen, dtype=torch.float32)
    check("linear_w4a16", op_args("linear_w4a16", x, 37, gen, True, group_size=group_size), torch.float32)


@pytest.mark.parametrize("group_size", [16, 24, 32, 64, 96, 128, 6])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w4a8_group_sizes(group_size, m, gen):
    # BLOCK_K = 32 in the interpreter: groups of 64, 96 and 128 carry int32 sums over
    # two to four tiles, 32 takes one tile per group, 16, 24 and 6 cut each tile into
    # slices of 16, 8 and 2 columns; K holds 2 to 4 groups (13 of 6), and 48 and 78
    # leave a partial last tile
    k = group_size * (2 + group_size % 3) if group_size >= 16 else 78
    x = torch.randn(m, k, generator=gen, dtype=torch.float32) * 3
    check("linear_w4a8", op_args("linear_w4a8", x, 37, gen, True, group_size=group_size), torch.float32)


@pytest.mark.parametrize("cfg,group_size", [
    (dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1), 128),  # one tile per group
    (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=3), 128),   # two tiles per group
    (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=2), 64),   # two groups per tile: two slices
], ids=["bk128", "bk64", "bk128-g64"])
def test_w4a8_gpu_tile_configs(cfg, group_size, gen):
    # the K tiles a GPU picks (64, 128) and other program orders, with M and N odd
    x = torch.randn(2, 19, 256, generator=gen).to(torch.bfloat16)
    args = op_args("linear_w4a8", x, 45, gen, True, group_size=group_size)
    with _w4a8.TUNER.force(cfg):
        check("linear_w4a8", args, torch.bfloat16)


@pytest.mark.parametrize("cfg", [
    dict(BLOCK_N=16, BLOCK_K=16, SPLIT_K=1),   # one split: the GEMV writes the output itself
    dict(BLOCK_N=64, BLOCK_K=16, SPLIT_K=3),   # uneven splits, last one partial
    dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=8),   # more splits asked than K has tiles
], ids=["direct", "split3", "split8"])
@pytest.mark.parametrize("op", ["linear_w8a16", "linear_w4a16"])
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_splitk_configs(cfg, op, m, gen):
    x = torch.randn(m, 96, generator=gen, dtype=torch.float16)
    args = op_args(op, x, 40, gen, True, group_size=32)
    with _weightonly.GEMV_TUNER.force(cfg):
        check(op, args, torch.float16)


@pytest.mark.parametrize("op", ["linear_w8a16", "linear_w4a16"])
def test_gemv_threshold_raised(op, gen, monkeypatch):
    # FASTKERN_TRITON_GEMV_MAX_M lets a GPU run 17..64 rows through split-K (BLOCK_M 32 here)
    monkeypatch.setattr(_weightonly, "GEMV_MAX_M", 64)
    x = torch.randn(20, 64, generator=gen).to(torch.bfloat16)
    check(op, op_args(op, x, 40, gen, True, group_size=16), torch.bfloat16)


@pytest.mark.parametrize("op", ["gemm", "int8_gemm", "linear_w8a8"])
def test_tiled_other_config(op, gen):
    # taller-than-wide tiles and GROUP_M = 3 exercise the grouped program order's edges
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=3)
    m, n, k = 70, 53, 100
    if op == "int8_gemm":
        args = (torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8),
                torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8))
    else:
        args = op_args(op, torch.randn(m, k, generator=gen).to(torch.bfloat16), n, gen, op != "gemm")
    with tgemm.TUNER.force(cfg):
        out = run_triton(op, args)
    ref = getattr(ops, op + "_ref")(*args)
    if op == "int8_gemm":
        assert torch.equal(out, ref)
    else:
        assert_close_rel(out, ref, torch.bfloat16)


@pytest.mark.parametrize("block", [(16, 16), (8, 24), (80, 16), (4, 100)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_blocksparse_block_shapes(block, dtype, gen):
    # blocks smaller than a dot tile are padded; taller ones are split over programs;
    # K = 72 is not a multiple of bk = 16, 24 or 100, so the last block column is padding
    x = torch.randn(17, K, generator=gen).to(dtype)
    check("linear_blocksparse", op_args("linear_blocksparse", x, 90, gen, True, block=block), dtype)


def test_blocksparse_empty_rows_and_no_blocks(gen):
    w = torch.randn(48, 64, generator=gen)
    w[16:32] = 0  # an empty block row: its outputs are the bias alone
    blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, (16, 16))
    assert int(row_ptr[2] - row_ptr[1]) == 0
    x = torch.randn(5, 64, generator=gen)
    b = torch.randn(48, generator=gen)
    out = check("linear_blocksparse", (x, blocks, row_ptr, col_idx, 48, b), torch.float32)
    assert torch.equal(out[:, 16:32], b[16:32].expand(5, 16))
    # no block at all
    blocks0, row_ptr0, col_idx0 = formats.dense_to_blocksparse(torch.zeros(48, 64), (16, 16))
    assert blocks0.shape[0] == 0
    out0 = run_triton("linear_blocksparse", (x, blocks0, row_ptr0, col_idx0, 48, None))
    assert torch.equal(out0, torch.zeros(5, 48))


@pytest.mark.parametrize("dtype", DTYPES)
def test_malformed_sparse_layouts_as_reference(dtype, gen):
    # 2:4 meta bytes of any value (positions in either order, or both the same: their two
    # values add up there) and a block listed twice in its block row (it counts twice)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    values = torch.randn(24, 32, generator=gen).to(dtype)
    meta = torch.randint(0, 256, (24, 16), generator=gen, dtype=torch.uint8)
    meta[0] = 0x05  # position 1 twice in every group of row 0
    check("linear_sparse24", (x, values, meta, None), dtype)
    blocks = torch.randn(5, 16, 16, generator=gen).to(dtype)
    row_ptr, col_idx = torch.tensor([0, 3, 5]), torch.tensor([1, 1, 3, 0, 0])
    check("linear_blocksparse", (x, blocks, row_ptr, col_idx, 32, None), dtype)


def test_mixed_bias_dtype(gen):
    # the op accepts any float bias; it is added in fp32 like the reference does
    x = torch.randn(3, K, generator=gen).to(torch.bfloat16)
    args = list(op_args("linear_w8a16", x, N, gen, True))
    args[3] = torch.randn(N, generator=gen)  # fp32 bias, bf16 activations
    check("linear_w8a16", tuple(args), torch.bfloat16)


@pytest.mark.parametrize("m,n,k", [(0, 40, 64), (5, 0, 64), (0, 0, 64), (3, 40, 0)])
def test_w4a8_empty(m, n, k, gen):
    # K = 0: no product at all, the outputs are the bias
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    p = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    s = torch.rand(n, k // 32, generator=gen) + 0.1
    z = torch.randint(0, 16, (n, k // 32), generator=gen, dtype=torch.uint8)
    args = (x, p, s, z, 32, torch.randn(n, generator=gen).half())
    out = run_triton("linear_w4a8", args)
    ref = ops.linear_w4a8_ref(*args)
    assert out.shape == ref.shape == (m, n) and out.dtype == ref.dtype
    assert torch.equal(out, ref)


# --------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a8_nonfinite_rows_only(dtype, gen):
    # a row holding NaN or inf gets a NaN token scale: all its outputs are NaN, and no
    # other row's (they share every weight tile and program with it)
    x = torch.randn(3, 7, 96, generator=gen).to(dtype)
    x[0, 2, 5] = float("nan")
    x[1, 0, 95] = float("inf")
    x[2, 6, 40] = -float("inf")
    bad = torch.zeros(3, 7, dtype=torch.bool)
    bad[0, 2] = bad[1, 0] = bad[2, 6] = True
    args = op_args("linear_w4a8", x, 33, gen, True, group_size=32)
    out = run_triton("linear_w4a8", args)
    ref = ops.linear_w4a8_ref(*args)
    assert ref[bad].isnan().all() and ref[~bad].isfinite().all()
    assert out[bad].isnan().all()
    assert out[~bad].isfinite().all()
    assert_close_rel(out[~bad], ref[~bad], dtype)


@pytest.mark.parametrize("op", FLOAT_OPS)
@pytest.mark.parametrize("m", [1, 4, 20])
def test_nonfinite_inputs_propagate(op, m, gen):
    x = torch.randn(m, K, generator=gen).to(torch.float16)
    x[0, 7] = float("nan")
    if m > 1:
        x[1, 3] = float("inf")
    args = op_args(op, x, N, gen, op != "gemm")
    out = run_triton(op, args)
    ref = getattr(ops, op + "_ref")(*args)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    assert out[0].isnan().all()
    fin = ref.isfinite().all(dim=1)
    if fin.any():
        assert_close_rel(out[fin], ref[fin], torch.float16)


@pytest.mark.parametrize("block", [(8, 8), (16, 24)], ids=str)
def test_blocksparse_nonfinite_meets_skipped_blocks(block, gen):
    # to the reference a skipped block is zeros and 0 * inf = nan: outputs of block rows
    # that do not store the block under a non-finite input must be NaN, the others not
    args = op_args("linear_blocksparse", torch.randn(6, 96, generator=gen), 48, gen, True, block=block)
    x, blocks, row_ptr, col_idx = args[0].clone(), args[1].clone(), args[2], args[3]
    x[0, int(col_idx[0]) * block[1] + 1] = float("inf")  # a column stored by block row 0 only (likely)
    x[2, 50] = float("nan")
    x[3, 95] = -float("inf")
    blocks[1, 0, 0] = float("inf")  # a non-finite weight
    args = (x, blocks, row_ptr, col_idx, 48, args[5])
    out = run_triton("linear_blocksparse", args)
    ref = ops.linear_blocksparse_ref(*args)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    assert not ref[0].isnan().all()  # the case is not trivially "whole row NaN"
    fin = ref.isfinite()
    assert_close_rel(out[fin], ref[fin], torch.float32)


# -------------------------------------------------------------------- plumbing


def test_backend_registered_for_every_op():
    for op in ops.OPS:
        assert ops.backend_status(op, "triton", torch.device("cpu")) is None, op
        assert ops.kernel(op, "triton").__module__.startswith("fastkern.triton.")


def test_interpreter_uses_the_fixed_config():
    assert autotune.interpreting() and not autotune.autotune_enabled()
    launched = []
    cfg = tgemm.TUNER.config((1, 8, 8, "fp32", ""), torch.device("cpu"), launched.append)
    assert cfg == tgemm._interpret(None) and launched == []


def test_autotune_times_once_and_caches_on_disk(tmp_path, monkeypatch):
    """The tuning logic without a GPU: a fake timer, then a 'second process' reads the file."""
    import triton.testing

    monkeypatch.setenv("FASTKERN_TRITON_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.setattr(autotune, "_device_name", lambda device: "Fake_GPU")
    monkeypatch.setattr(autotune, "_disk", None)
    monkeypatch.setattr(autotune, "_memory", {})
    cands = [dict(BLOCK=b, num_warps=4) for b in (16, 32, 64)]
    timed = []

    def fake_bench(fn, **kw):
        fn()
        return {16: 3.0, 32: 1.0, 64: 2.0}[timed[-1]["BLOCK"]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    tuner = autotune.Tuner("fake", lambda key: cands, lambda key: cands[0], lambda key: cands[0])
    cuda = torch.device("cuda")
    assert tuner.config((4, 8), cuda, timed.append) == cands[1]
    assert len(timed) == 3
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert saved == {"fake|Fake_GPU|4|8": cands[1]}
    # a fresh process: nothing in memory, the file answers without timing
    monkeypatch.setattr(autotune, "_disk", None)
    monkeypatch.setattr(autotune, "_memory", {})
    assert tuner.config((4, 8), cuda, lambda cfg: pytest.fail("re-tuned")) == cands[1]
    monkeypatch.setenv("FASTKERN_TRITON_AUTOTUNE", "0")
    assert tuner.config((5, 8), cuda, lambda cfg: pytest.fail("tuned while disabled")) == cands[0]


def _ptxas():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(_ptxas()), reason="this triton wheel ships no ptxas")
def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter never lowers to PTX; compile three kernels to sm_90 cubins to catch GPU-only errors.

    ``python -m fastkern.triton.aot_check`` does this for every kernel (about a minute).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run(
        [sys.executable, "-m", "fastkern.triton.aot_check", "--arch", "90",
         "--only", "quantize rows=1 ", "--only", "w4a16 gemv M=1 ", "--only", "w4a8 M=1 "],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("\nok ") + r.stdout.startswith("ok ") == 3, r.stdout


# ------------------------------------------------------------------------ GPU


GPU_SHAPES = [(1, 1120, 2176), (16, 1120, 2176), (64, 4096, 1024), (300, 1000, 2048)]


@pytest.mark.cuda
@pytest.mark.parametrize("op", FLOAT_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_gpu_float_ops_match_reference(op, dtype, m, n, k, gen):
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    args = op_args(op, x, n, gen, op != "gemm", group_size=128, block=(32, 32))
    check(op, args, dtype)
    # 3-D, non-contiguous
    x3 = torch.randn(2, m, 2 * k, generator=gen).to("cuda", dtype)[..., ::2]
    check(op, (x3,) + args[1:], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", GPU_SHAPES + [(4096, 1024, 8192)])
def test_gpu_int8_gemm_exact(m, n, k, gen):
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).cuda()
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).cuda()
    assert torch.equal(run_triton("int8_gemm", (a, b)), ops.int8_gemm_ref(a, b))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_quantize_per_token_bit_exact(dtype, gen):
    x = (torch.randn(257, 4099, generator=gen) * torch.logspace(-4, 4, 257)[:, None]).to(dtype)
    x[3, 100] = float("nan")
    x[4, 0] = float("inf")
    x = x.cuda()
    q, s = quantize_per_token(x)
    rq, rs = formats.quantize_per_token(x)
    assert torch.equal(q, rq)
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s[~s.isnan()], rs[~rs.isnan()])


def _gpu_candidate_cases():
    return [
        ("gemm", tgemm.TUNER, tgemm._candidates, (64, 1000, 1000, "half", "")),
        ("int8_gemm", tgemm.TUNER, tgemm._candidates, (64, 1000, 1000, "int8", "")),
        ("linear_w8a8", tgemm.TUNER, tgemm._candidates, (64, 1000, 1000, "int8", "w8a8")),
        ("linear_w4a16", _weightonly.GEMV_TUNER, _weightonly._gemv_candidates, (1, 1000, 1024, 4, 128, "fp16")),
        ("linear_w4a16", _weightonly.GEMV_TUNER, _weightonly._gemv_candidates, (16, 1000, 1024, 4, 128, "fp16")),
        ("linear_w8a16", _weightonly.GEMV_TUNER, _weightonly._gemv_candidates, (1, 1000, 1024, 8, 1, "fp16")),
        ("linear_w4a16", _weightonly.GEMM_TUNER, _weightonly._gemm_candidates, (256, 1000, 1024, 4, 128, "fp16")),
        ("linear_w8a16", _weightonly.GEMM_TUNER, _weightonly._gemm_candidates, (256, 1000, 1024, 8, 1, "fp16")),
        ("linear_sparse24", tsparse.S24_TUNER, tsparse._s24_candidates, (256, 1000, 1024, "torch.float16")),
        ("linear_blocksparse", tsparse.BS_TUNER, tsparse._bs_candidates, (256, 1000, 1024, 32, 32, "torch.float16")),
        ("linear_w4a8", _w4a8.TUNER, _w4a8._candidates, (16, 1000, 1024, 128, "float16")),
        ("linear_w4a8", _w4a8.TUNER, _w4a8._candidates, (256, 1000, 1024, 128, "float16")),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(12))
def test_gpu_every_candidate_config_is_correct(case, gen):
    """The tuner may pick any candidate, so each must compute the right thing."""
    op, tuner, candidates, key = _gpu_candidate_cases()[case]
    m, n, k = key[0], key[1], key[2]
    if op == "int8_gemm":
        args = (torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).cuda(),
                torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).cuda())
    else:
        x = torch.randn(m, k, generator=gen).to("cuda", torch.float16)
        args = op_args(op, x, n, gen, op != "gemm", group_size=128, block=(32, 32))
    ref = getattr(ops, op + "_ref")(*args)
    # warps and stages change the schedule, not which elements a program touches:
    # one config per distinct tiling keeps this within a GPU session's time
    seen = {}
    for cfg in candidates(key):
        seen.setdefault(tuple(sorted((k, v) for k, v in cfg.items() if k not in ("num_warps", "num_stages"))), cfg)
    ran = 0
    for cfg in seen.values():
        try:
            with tuner.force(cfg):
                out = run_triton(op, args)
        except OutOfResources:  # the tuner skips a config this GPU cannot launch (shared memory)
            continue
        ran += 1
        if op == "int8_gemm":
            assert torch.equal(out, ref), cfg
        else:
            assert out.shape == ref.shape
            assert rel_err(out, ref) <= tol(torch.float16), cfg
    assert ran > 0, "no candidate of %s could launch on this GPU" % op


@pytest.mark.cuda
def test_gpu_autotune_cache_survives_process(tmp_path):
    env = dict(os.environ, FASTKERN_TRITON_CACHE=str(tmp_path / "tune.json"), FASTKERN_TRITON_AUTOTUNE="1")
    env.pop("TRITON_INTERPRET", None)
    script = (
        "import sys, torch, fastkern as fk\n"
        "from fastkern import formats\n"
        "from fastkern.triton import autotune\n"
        "if sys.argv[1] == 'second':\n"
        "    autotune.Tuner._tune = lambda self, key, launch: (_ for _ in ()).throw(AssertionError('re-tuned'))\n"
        "p, s, z = formats.quantize_int4(torch.randn(512, 1024), 128)\n"
        "x = torch.randn(1, 1024, dtype=torch.float16, device='cuda')\n"
        "with fk.use_backend('triton'):\n"
        "    torch.ops.fastkern.linear_w4a16(x, p.cuda(), s.cuda(), z.cuda(), 128, None)\n"
        "torch.cuda.synchronize()\n"
    )
    for which in ("first", "second"):
        r = subprocess.run([sys.executable, "-c", script, which], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert any(key.startswith("weightonly_gemv|") for key in saved)
