"""linear_w4a8 (int4 group-wise weights, dynamic per-token int8 activations) against the reference.

The activations are quantized as linear_w8a8 quantizes them (fastkern.formats.quantize_per_token,
bit for bit). The CPU kernel: from m = 12 (m = 6 with AVX-512 VNNI and groups of a multiple of 8;
FASTKERN_W4A8_GEMM_MIN_M, 0: off) an int8 GEMM whose lanes run along x's rows (AVX-512 VNNI: over
the canonical nibbles where groups are a multiple of 8, on one 8-row vector where m <= 8, else over
them unpacked to bytes per task, as on AVX2); otherwise the W4A16
limb GEMV with one limb and the token's scale (FASTKERN_W4A8_GEMV_MAX_M caps it; 0 sends every
call on to the last path); where a row holds NaN / inf or magnitudes outside the limbs' bounds,
or on the generic path, the quantized activations as fp32 integers go through linear_w4a16's
fp32 paths and each output row is scaled by its token's scale. The tests reach the three paths
on every ISA path this CPU runs (`path`), the AVX2 GEMV's variants (groups of a multiple of 64
with 1..4 rows of x per call, pairs of g = 32, the per-row tile), their tails in M, N and K,
and check that the thread count changes no bit.
"""
import pytest
import torch

import fastkern
from fastkern import formats, ops
from fastkern._ext import _C

from conftest import assert_close_rel, assert_nonfinite_as_reference, cpu_isa, cpu_isas, num_threads
from test_ops_int4 import matrix
from test_ops_int8 import make_x

NATIVE = pytest.mark.skipif(_C is None, reason="fastkern._C is not built")
OP = "linear_w4a8"
PATHS = [pytest.param("gemm", id="gemm"), pytest.param("gemv", id="gemv"), pytest.param("fp32", id="fp32_paths")]


def set_path(monkeypatch, path, isa):
    """Send every call to one CPU path: the int8 GEMM (from m = 1), the GEMV or the fp32 paths."""
    if path in ("gemm", "gemv") and isa == "generic":
        pytest.skip("the generic path has no int8 GEMM or GEMV (fp32_paths covers it)")
    monkeypatch.setenv("FASTKERN_W4A8_GEMM_MIN_M", "1" if path == "gemm" else "0")
    monkeypatch.setenv("FASTKERN_W4A8_GEMV_MAX_M", "0" if path == "fp32" else "")


def make_w4(gen, n, k, g):
    return formats.quantize_int4(torch.randn(n, k, generator=gen), g)


def native(*args):
    return torch.ops.fastkern_C.linear_w4a8(*args)


@pytest.mark.parametrize("be,m,dtype,layout,bias", matrix(OP))
@pytest.mark.parametrize("n,k,g", [(37, 256, 32), (19, 384, 128), (21, 96, 96), (13, 240, 48)],
                         ids=["g32", "g128", "gK", "g48"])
def test_w4a8_matches_reference(be, m, dtype, layout, bias, n, k, g, gen):
    if be != "cpu" and g != 128 and m != 17:
        pytest.skip("other group sizes are covered at m=17 on this backend")
    x = make_x(gen, m, k, dtype, layout)
    w, s, z = make_w4(gen, n, k, g)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    with fastkern.use_backend(be):
        out = torch.ops.fastkern.linear_w4a8(x, w, s, z, g, b)
    assert out.shape == (*x.shape[:-1], n) and out.dtype == dtype
    assert_close_rel(out, ops.linear_w4a8_ref(x, w, s, z, g, b), dtype)


# ----------------------------------------------------------------- CPU paths, tails, threads


@NATIVE
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17, 33, 70])
def test_cpu_paths_and_tails(isa, dtype, m, path, gen, monkeypatch):
    """n 1..9: tails of the GEMV's 4-row units and tiles; group sizes 2..62 give partial 64- and
    128-weight chunks, g = 192 / 550 several chunks with a partial last one; odd m in K blocks
    (FASTKERN_W4A16_WHOLE_K_KB=0). Each case loosely (a single output can sit near zero), all
    together within the fp32 contract."""
    set_path(monkeypatch, path, isa)
    if m % 2:
        monkeypatch.setenv("FASTKERN_W4A16_WHOLE_K_KB", "0")
    outs, refs = [], []
    with cpu_isa(isa):
        for n in (1, 2, 3, 5, 9):
            for k, g in ((2, 2), (6, 6), (30, 30), (32, 32), (62, 62), (64, 32), (96, 48), (256, 64), (384, 192),
                         (1100, 550)):
                x = torch.randn(m, k, generator=gen).to(dtype)
                w, s, z = make_w4(gen, n, k, g)
                out = native(x, w, s, z, g, None)
                ref = ops.linear_w4a8_ref(x, w, s, z, g, None)
                assert_close_rel(out, ref, dtype, factor=100 if dtype == torch.float32 else 1)
                outs.append(out.flatten())
                refs.append(ref.flatten())
    assert_close_rel(torch.cat(outs), torch.cat(refs), dtype)


@NATIVE
@pytest.mark.parametrize("rows", ["4", "1"], ids=["rows4", "rows1"])
@pytest.mark.parametrize("span16", ["1", "0"], ids=["span16", "row_tile"])
@pytest.mark.parametrize("m", [1, 3, 6, 7, 16])
@pytest.mark.parametrize("g", [32, 64, 128, 192])
def test_avx2_gemv_variants(span16, rows, m, g, gen, monkeypatch):
    """The AVX2 GEMV's three kernels with one limb: int16 spans (g % 64 == 0) with up to 4 rows of
    x per call (m = 6 / 7: a 4-row call and a 2- / 3-row one; FASTKERN_W4A8_AVX2_ROWS=1: one row
    per call), pairs of 32-weight groups, and the per-row tile (FASTKERN_W4A16_AVX2_SPAN16=0)."""
    if span16 == "0" and rows == "1":
        pytest.skip("the per-row tile has no rows knob")
    monkeypatch.setenv("FASTKERN_W4A16_AVX2_SPAN16", span16)
    monkeypatch.setenv("FASTKERN_W4A8_AVX2_ROWS", rows)
    x = torch.randn(m, 4 * g, generator=gen)
    w, s, z = make_w4(gen, 45, 4 * g, g)
    with cpu_isa("avx2"):
        out = native(x, w, s, z, g, None)
    assert_close_rel(out, ops.linear_w4a8_ref(x, w, s, z, g, None), torch.float32)


@NATIVE
@pytest.mark.parametrize("nibbles", ["1", "0"], ids=["nibble_tiles", "unpacked"])
@pytest.mark.parametrize("isa", [i for i in cpu_isas() if i.values[0] != "generic"])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 15, 16, 17, 63, 64, 65, 130])
def test_gemm_tiles_blocks_and_groups(isa, m, nibbles, gen, monkeypatch):
    """The int8 GEMM (AVX-512 VNNI and AVX2 tiles): rows of x in 16-row vectors and 64-row blocks
    (m = 9..130: partial vectors and blocks; m <= 8 one 8-row vector with the nibble tiles), weight
    rows in tiles of 8 (one vector of x, the high
    nibbles in place), 6 or 4 (more vectors) then 4 / 2 / 1 over the canonical nibbles (VNNI, groups
    of a multiple of 8), of 6 / 4 / 2 / 1 over unpacked bytes (VNNI with FASTKERN_W4A8_GEMM_NIBBLES=0
    or groups of 4 / 12 / 1100; AVX2), tasks of 48 (n up to 97), groups of 4..1100 weights with K
    blocks of whole groups (g = 192: 960 weights; g = 1100 alone; AVX2's int16 sums over 8 quads end
    inside groups of 36 and 1100) and unpacked tails that are not multiples of 64 weights. Each case
    loosely, all within the fp32 contract."""
    if nibbles == "0" and isa != "avx512":
        pytest.skip("the nibble tiles are AVX-512 VNNI's (FASTKERN_W4A8_GEMM_NIBBLES changes nothing here)")
    monkeypatch.setenv("FASTKERN_W4A8_GEMM_MIN_M", "1")
    monkeypatch.setenv("FASTKERN_W4A8_GEMM_NIBBLES", nibbles)
    outs, refs = [], []
    with cpu_isa(isa):
        for n in (1, 5, 9, 47, 97):
            for k, g in ((4, 4), (24, 8), (36, 12), (96, 32), (256, 64), (1152, 128), (960, 192), (2200, 1100)):
                x = torch.randn(m, k, generator=gen)
                w, s, z = make_w4(gen, n, k, g)
                out = native(x, w, s, z, g, None)
                ref = ops.linear_w4a8_ref(x, w, s, z, g, None)
                assert_close_rel(out, ref, torch.float32, factor=100)
                outs.append(out.flatten())
                refs.append(ref.flatten())
    assert_close_rel(torch.cat(outs), torch.cat(refs), torch.float32)


@NATIVE
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", cpu_isas())
def test_extreme_products_exact(isa, path, gen, monkeypatch):
    """Every product at its largest (q = 15, x = +-127 after quantization, zero point 0): the int16
    sums of the AVX2 paths (8 quads in the GEMM, spans of chunks in the GEMV) reach 30480 of
    32767 and the int32 group sums 15 * 127 * g. One more pair per int16 sum would wrap."""
    set_path(monkeypatch, path, isa)
    n, k, g = 13, 2048, 1024
    q = formats.pack_int4(torch.full((n, k), 15, dtype=torch.uint8))
    s = torch.rand(n, k // g, generator=gen) + 0.5
    z = torch.zeros(n, k // g, dtype=torch.uint8)
    sign = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
    x = torch.stack([torch.full((k,), 3.0), torch.full((k,), -0.5), 2.0 * sign] * 6)  # 18 rows: the GEMMs too
    for rows in (x, x[:6]):  # 6 rows: the VNNI GEMM's one-vector tiles (high nibbles in place)
        with cpu_isa(isa):
            out = native(rows, q, s, z, g, None)
        ref = ops.linear_w4a8_ref(rows, q, s, z, g, None)
        torch.testing.assert_close(out, ref, rtol=1e-5 if path == "fp32" else 1e-6, atol=1e-3)


@NATIVE
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("m", [1, 3, 17, 40])
def test_cpu_threads_bitwise_identical(isa, m, path, gen, monkeypatch):
    set_path(monkeypatch, path, isa)
    n, k, g = 301, 1024, 128
    x = torch.randn(m, k, generator=gen)
    w, s, z = make_w4(gen, n, k, g)
    outs = []
    with cpu_isa(isa):
        for t in (1, 2, 3):
            with num_threads(t):
                outs.append(native(x, w, s, z, g, None))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@NATIVE
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", cpu_isas())
def test_rounding_is_quantize_per_token(isa, path, gen, monkeypatch):
    """Activations on exact halves of the token's step (x / s = j + 0.5, s a power of two) round
    half to even as quantize_per_token does. Weight row n is one step at column n and zero
    elsewhere (zero points 0), so each output is s_x * s_w * q_x[n], a single product: rounding
    half away from zero, or by x * (1 / s), moves an output by at least 1/127 of itself."""
    set_path(monkeypatch, path, isa)
    k, g = 256, 64
    steps = (torch.arange(k) % 254).float() - 126.5  # -126.5 .. 126.5
    steps[0] = 127.0  # the token's absmax: s = 127 * c / 127 = c for a power of two c
    # rows 3..5: scales that are not powers of two, x the fp32 numbers nearest (j + 0.5) * s, where
    # x / s and x * (1 / s) fall on either side of the half for some j
    rows = [steps * 0.25, steps * -2.0, steps * 2.0**-10]
    for c in (0.3, -1.7, 0.011):
        sc = torch.tensor(127 * abs(c), dtype=torch.float32) / torch.tensor(127.0)
        rows.append(torch.where(steps == 127.0, torch.tensor(127 * c), steps * sc * (1 if c > 0 else -1)))
    x = torch.stack(rows)
    onehot = torch.zeros(k, k, dtype=torch.uint8)
    onehot[torch.arange(k), torch.arange(k)] = 1
    q = formats.pack_int4(onehot)
    s = torch.rand(k, k // g, generator=gen) + 0.5
    z = torch.zeros(k, k // g, dtype=torch.uint8)
    with cpu_isa(isa):
        out = native(x, q, s, z, g, None)
    qx, sx = formats.quantize_per_token(x)
    assert (qx[:3].float() != x[:3] / sx[:3]).sum() > 600  # the halves did round
    expected = qx.float() * sx * s.repeat_interleave(g, 1).diagonal()
    # one rounding flip would be >= 1 / 127 off; the fp32 paths' three-limb GEMV resolves each
    # group to ~1e-7 of its largest |q_x| (the W4A16 contract), hence 1e-5 and not 3e-7 there
    torch.testing.assert_close(out, expected, rtol=1e-5 if path == "fp32" else 3e-7, atol=0)
    torch.testing.assert_close(ops.linear_w4a8_ref(x, q, s, z, g, None), expected, rtol=3e-7, atol=0)


@NATIVE
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("m", [1, 3, 20])
def test_nan_and_inf_rows(isa, m, path, gen, monkeypatch):
    """A row holding NaN or inf quantizes to s = NaN (quantize_per_token): its outputs are all
    NaN, as the reference's; the other rows are untouched."""
    set_path(monkeypatch, path, isa)
    x = torch.randn(m, 128, generator=gen)
    x[0, 5] = float("nan")
    if m > 2:
        x[1, 7] = float("-inf")
    w, s, z = make_w4(gen, 9, 128, 32)
    b = torch.randn(9, generator=gen)
    with cpu_isa(isa):
        out = native(x, w, s, z, 32, b)
    ref = ops.linear_w4a8_ref(x, w, s, z, 32, b)
    bad = 2 if m > 2 else 1
    assert torch.isnan(out[:bad]).all() and torch.isnan(ref[:bad]).all()
    assert_close_rel(out[bad:], ref[bad:], torch.float32)


@NATIVE
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_tiny_and_zero_rows(isa, dtype, gen):
    """Rows whose largest |x| is huge (3e38, 1e35: the limbs' sums would overflow) or tiny but not
    zero (1e-25, 1e-37: the limb weights would leave the normal range) take the fp32 paths;
    each row within the contract (a row at a time), the all-zero row exactly the bias."""
    w, s, z = make_w4(gen, 37, 512, 128)
    b = torch.randn(37, generator=gen)
    with cpu_isa(isa):
        for scale in (3e38 / 4, 1e35, 1e-25, 1e-37):
            x = torch.randn(4, 512, generator=gen)
            x = x / x.abs().amax(-1, keepdim=True)
            x[1] *= scale
            x[2] = 0.0
            x = x.to(dtype)
            out = native(x, w, s, z, 128, b)
            ref = ops.linear_w4a8_ref(x, w, s, z, 128, b)
            for r in (0, 1, 3):
                assert_nonfinite_as_reference(out[r], ref[r], dtype, (scale, r))
            assert torch.equal(out[2], b.to(dtype))


@NATIVE
@pytest.mark.parametrize("path", PATHS)
def test_input_never_written(path, gen, monkeypatch):
    """x fp32, contiguous, K a multiple of 8 reaches the kernel as the caller's own tensor."""
    set_path(monkeypatch, path, "avx2")
    for m in (1, 4, 40):
        x = torch.randn(m, 256, generator=gen)
        keep = x.clone()
        w, s, z = make_w4(gen, 16, 256, 64)
        native(x, w, s, z, 64, None)
        assert torch.equal(x, keep)


@NATIVE
def test_matches_w8a8_on_the_same_weights(gen):
    """One quantization of x for both int8-activation ops: W4A8 equals W8A8 over int8 weights
    that hold the int4 values q - z (a per-channel scale, one group per row)."""
    n, k = 24, 256
    w, s, z = make_w4(gen, n, k, k)
    x = torch.randn(5, k, generator=gen)
    q8 = (formats.unpack_int4(w).to(torch.int16) - z.to(torch.int16)).to(torch.int8)
    out4 = native(x, w, s, z, k, None)
    out8 = torch.ops.fastkern_C.linear_w8a8(x, q8, s[:, 0].contiguous(), None)
    assert_close_rel(out4, out8, torch.float32)


# test_empty_dims, test_opcheck and the bad-input tests run for both int4 ops in test_ops_int4.py
