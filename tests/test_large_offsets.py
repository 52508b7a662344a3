"""Weights of more than 2**31 bytes: every row offset must be computed in 64 bits.

The weight tensors here are 2.15 GB, mostly zeros (torch.zeros maps untouched pages to the
kernel's zero page, so they cost little memory and read from cache). The first and last
rows hold fresh random values; the last ones start past byte 2**31, where a 32-bit offset
wraps. Every CPU path this machine runs, GEMV and GEMM row counts: the rows at both ends
match the reference computed on those rows alone, and every row in between gives 0.
"""
import pytest
import torch

from fastkern import ops

from conftest import assert_close_rel, cpu_isa, cpu_isas

ROWS = 40      # random rows at each end
K8 = 4096      # int8 weight: bytes per row
K4 = 8192      # int4 weight: K / 2 = 4096 bytes per row
N = (1 << 31) // 4096 + ROWS  # rows: the last ROWS start at or past byte 2**31
G4 = 128


def _ends(w, gen, fill):
    w[:ROWS] = fill((ROWS,) + tuple(w.shape[1:]))
    w[-ROWS:] = fill((ROWS,) + tuple(w.shape[1:]))
    return w


@pytest.fixture(scope="module")
def int8_weight():
    gen = torch.Generator().manual_seed(31)
    w = _ends(torch.zeros(N, K8, dtype=torch.int8), gen,
              lambda s: torch.randint(-127, 128, s, generator=gen, dtype=torch.int8))
    scale = torch.rand(N, generator=gen) * 0.01 + 0.001
    assert w.numel() > 2**31
    return w, scale


@pytest.fixture(scope="module")
def int4_weight():
    gen = torch.Generator().manual_seed(32)
    w = _ends(torch.zeros(N, K4 // 2, dtype=torch.uint8), gen,
              lambda s: torch.randint(0, 256, s, generator=gen, dtype=torch.uint8))
    scales = torch.rand(N, K4 // G4, generator=gen) * 0.01 + 0.001
    zeros = _ends(torch.zeros(N, K4 // G4, dtype=torch.uint8), gen,
                  lambda s: torch.randint(0, 16, s, generator=gen, dtype=torch.uint8))
    assert w.numel() > 2**31
    return w, scales, zeros


def _m_sizes(isa, sizes):
    # the portable path is scalar: its GEMV row count only (the offsets are the same code)
    return sizes[:1] if isa == "generic" else sizes


def _check_ends(out, ref_head, ref_tail, exact):
    head, mid, tail = out[:, :ROWS], out[:, ROWS:-ROWS], out[:, -ROWS:]
    if exact:
        assert torch.equal(head, ref_head) and torch.equal(tail, ref_tail)
    else:
        assert_close_rel(head, ref_head, out.dtype)
        assert_close_rel(tail, ref_tail, out.dtype)
    assert torch.count_nonzero(mid).item() == 0


@pytest.mark.parametrize("isa", cpu_isas())
def test_int8_ops_past_2_31_bytes(isa, int8_weight, gen):
    w, s = int8_weight
    head, tail = slice(0, ROWS), slice(N - ROWS, N)
    for m in _m_sizes(isa, [1, 6, 24]):
        a = torch.randint(-128, 128, (m, K8), generator=gen, dtype=torch.int8)
        x = torch.randn(m, K8, generator=gen)
        with cpu_isa(isa):
            c = torch.ops.fastkern_C.int8_gemm(a, w)
            y16 = torch.ops.fastkern_C.linear_w8a16(x, w, s, None)
            y8 = torch.ops.fastkern_C.linear_w8a8(x, w, s, None)
        _check_ends(c, ops.int8_gemm_ref(a, w[head]), ops.int8_gemm_ref(a, w[tail]), exact=True)
        _check_ends(y16, ops.linear_w8a16_ref(x, w[head], s[head], None),
                    ops.linear_w8a16_ref(x, w[tail], s[tail], None), exact=False)
        _check_ends(y8, ops.linear_w8a8_ref(x, w[head], s[head], None),
                    ops.linear_w8a8_ref(x, w[tail], s[tail], None), exact=False)


@pytest.mark.parametrize("isa", cpu_isas())
def test_w4a16_past_2_31_bytes(isa, int4_weight, gen):
    w, sc, z = int4_weight
    head, tail = slice(0, ROWS), slice(N - ROWS, N)
    # 1: the limb GEMV; 40: the fp32 GEMM (above every limb-GEMV limit)
    for m in _m_sizes(isa, [1, 40]):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, K4, generator=gen).to(dtype)
            with cpu_isa(isa):
                y = torch.ops.fastkern_C.linear_w4a16(x, w, sc, z, G4, None)
            _check_ends(y, ops.linear_w4a16_ref(x, w[head], sc[head], z[head], G4, None),
                        ops.linear_w4a16_ref(x, w[tail], sc[tail], z[tail], G4, None), exact=False)
