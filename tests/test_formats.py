"""Round trips and invariants of the canonical formats (fastkern.formats)."""
import pytest
import torch

from fastkern import formats
from fastkern.formats.int4 import check_group_size


def sqnr_db(ref, approx):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 256)])
def test_int8_roundtrip(gen, shape):
    w = torch.randn(shape, generator=gen)
    q, s = formats.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert int(q.abs().max()) == 127  # each row's absmax maps to +-127
    err = (formats.dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


def test_int8_zero_row():
    w = torch.zeros(3, 8)
    q, s = formats.quantize_int8(w)
    assert bool((formats.dequantize_int8(q, s) == 0).all())


def test_int8_sqnr_gaussian(gen):
    w = torch.randn(256, 1024, generator=gen)
    q, s = formats.quantize_int8(w)
    assert sqnr_db(w, formats.dequantize_int8(q, s)) >= 40


@pytest.mark.parametrize("shape", [(1, 2), (5, 17), (3, 0)])
def test_per_token_quantization(gen, shape):
    x = torch.randn(shape, generator=gen) * 3
    q, s = formats.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == shape[:-1] + (1,)
    if shape[-1]:
        assert int(q.abs().max()) <= 127
        assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-6).all())


def test_per_token_special_rows():
    x = torch.tensor([[0.0, 0.0], [1.0, float("nan")], [float("inf"), 1.0], [-2.0, 1.0]])
    q, s = formats.quantize_per_token(x)
    assert q[0].tolist() == [0, 0] and s[0].item() == 0
    assert torch.isnan(s[1]).item() and torch.isnan(s[2]).item()
    assert q[3].tolist() == [-127, 64]  # 1 / (2/127) = 63.5 rounds half to even


def test_pack_unpack_int4(gen):
    q = torch.randint(0, 16, (9, 34), generator=gen, dtype=torch.uint8)
    packed = formats.pack_int4(q)
    assert packed.shape == (9, 17) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble first
    assert torch.equal(formats.unpack_int4(packed), q)


@pytest.mark.parametrize("group_size", [2, 32, 96])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_roundtrip(gen, group_size, symmetric):
    w = torch.randn(11, 192, generator=gen)
    packed, scale, zero = formats.quantize_int4(w, group_size, symmetric=symmetric)
    g = 192 // group_size
    assert packed.shape == (11, 96) and scale.shape == (11, g) and zero.shape == (11, g)
    assert zero.dtype == torch.uint8 and int(zero.max()) <= 15
    if symmetric:
        assert bool((zero == 8).all())
    w2 = formats.dequantize_int4(packed, scale, zero, group_size)
    # every weight within half a step of its group's grid (plus clipping at the ends for symmetric)
    step = scale.repeat_interleave(group_size, dim=1)
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert bool(((w2 - w).abs() <= bound).all())


def test_int4_sqnr_gaussian(gen):
    w = torch.randn(256, 1024, generator=gen)
    packed, scale, zero = formats.quantize_int4(w, 128)
    assert sqnr_db(w, formats.dequantize_int4(packed, scale, zero, 128)) >= 19


def test_group_size_errors():
    with pytest.raises(ValueError, match="K=100.*group_size=128"):
        check_group_size(100, 128)
    with pytest.raises(ValueError, match="even"):
        check_group_size(99, 33)
    assert check_group_size(64, -1) == 64


def test_prune_magnitude(gen):
    w = torch.randn(16, 32, generator=gen)
    mask = formats.prune_magnitude(w, 0.75)
    assert int(mask.sum()) == 128
    assert w.abs()[mask].min() >= w.abs()[~mask].max()


@pytest.mark.parametrize("shape", [(1, 4), (13, 44), (64, 128)])
def test_2_4_roundtrip(gen, shape):
    w = torch.randn(shape, generator=gen)
    mask = formats.prune_2_4(w)
    groups = mask.reshape(shape[0], -1, 4)
    assert bool((groups.sum(-1) == 2).all())
    kept = w.abs().reshape(shape[0], -1, 4)
    assert bool((torch.where(groups, kept, torch.inf).amin(-1) >= torch.where(groups, -torch.inf, kept).amax(-1)).all())
    values, meta = formats.compress_2_4(w)
    assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], shape[1] // 4)
    idx0, idx1 = meta & 3, (meta >> 2) & 3
    assert bool((idx0 < idx1).all()) and int(meta.max()) < 16
    assert torch.equal(formats.decompress_2_4(values, meta), w * mask)


def test_2_4_bad_k():
    with pytest.raises(ValueError, match="K divisible by 4.*K=10"):
        formats.prune_2_4(torch.randn(3, 10))
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        formats.compress_2_4(torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool))


@pytest.mark.parametrize("shape,block", [((37, 50), (16, 16)), ((32, 64), (4, 8)), ((5, 70), (1, 32))])
def test_blocksparse_roundtrip(gen, shape, block):
    w = torch.randn(shape, generator=gen)
    mask = formats.prune_blocks(w, block, sparsity=0.6)
    blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, block, mask)
    nb = -(-shape[0] // block[0])
    assert row_ptr.shape == (nb + 1,) and int(row_ptr[-1]) == blocks.shape[0] == col_idx.shape[0]
    assert blocks.shape[1:] == block
    dense = formats.blocksparse_to_dense(blocks, row_ptr, col_idx, shape)
    assert torch.equal(dense, w * mask)
    total = nb * -(-shape[1] // block[1])
    assert abs(blocks.shape[0] / total - 0.4) <= 1.0 / total + 1e-9


def test_prune_blocks_keeps_largest(gen):
    w = torch.randn(8, 8, generator=gen) * 0.01
    w[:4, 4:] = 10.0
    mask = formats.prune_blocks(w, (4, 4), sparsity=0.75)
    assert bool(mask[:4, 4:].all()) and int(mask.sum()) == 16
