"""QLinear / SparseLinear / quantize_ / sparsify_: numerics, state_dict, compile, errors."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastkern as fk
from conftest import FLOAT_DTYPES, assert_close_rel

QCONFIGS = [
    dict(weight_dtype="int8"),
    dict(weight_dtype="int8", act_dtype="int8"),
    dict(weight_dtype="int4", group_size=32),
    dict(weight_dtype="int4", group_size=128),
    dict(weight_dtype="int4", act_dtype="int8", group_size=128),
]
SCONFIGS = [dict(pattern="2:4"), dict(pattern="block", block_size=(16, 16), sparsity=0.75)]


def make_linear(gen, k=256, n=96, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


def expected_qlinear(q, x):
    """What QLinear must compute: the op reference on its own canonical tensors."""
    from fastkern import ops

    if q.weight_dtype == "int4" and q.act_dtype == "int8":
        return ops.linear_w4a8_ref(x, q.weight, q.weight_scale, q.weight_zero, q.group_size, q.bias)
    if q.weight_dtype == "int4":
        return ops.linear_w4a16_ref(x, q.weight, q.weight_scale, q.weight_zero, q.group_size, q.bias)
    if q.act_dtype == "int8":
        return ops.linear_w8a8_ref(x, q.weight, q.weight_scale, q.bias)
    return ops.linear_w8a16_ref(x, q.weight, q.weight_scale, q.bias)


def sqnr_db(ref, out):
    ref, out = ref.double(), out.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


@pytest.mark.parametrize("cfg", QCONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_qlinear_matches_reference(gen, cfg, dtype, bias):
    q = fk.QLinear.from_linear(make_linear(gen, bias=bias), **cfg)
    x = torch.randn(2, 5, 256, generator=gen).to(dtype)
    out = q(x)
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    assert_close_rel(out, expected_qlinear(q, x), dtype)


@pytest.mark.parametrize("cfg,floor", [(QCONFIGS[0], 40), (QCONFIGS[1], 37), (QCONFIGS[3], 19), (QCONFIGS[4], 19)],
                         ids=["w8a16", "w8a8", "w4a16-g128", "w4a8-g128"])
def test_quantization_quality(gen, cfg, floor):
    lin = make_linear(gen, k=1024, n=256, bias=False)
    x = torch.randn(64, 1024, generator=gen)
    q = fk.QLinear.from_linear(lin, **cfg)
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) >= floor


@pytest.mark.parametrize("cfg", SCONFIGS, ids=["2:4", "block"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sparselinear_matches_pruned_dense(gen, cfg, dtype):
    lin = make_linear(gen)
    s = fk.SparseLinear.from_linear(lin, **cfg)
    w = s.dense_weight()
    density = (w != 0).float().mean().item()
    assert density <= (0.5 if cfg["pattern"] == "2:4" else 0.25) + 1e-6
    x = torch.randn(3, 4, 256, generator=gen).to(dtype)
    with torch.no_grad():
        ref = F.linear(x.float(), w.float(), lin.bias.float()).to(dtype)
        assert_close_rel(s(x), ref, dtype)


def test_sparse_half_module(gen):
    s = fk.SparseLinear.from_linear(make_linear(gen)).to(torch.bfloat16)
    assert s.weight_values.dtype == torch.bfloat16
    x = torch.randn(4, 256, generator=gen)
    out = s(x)  # fp32 input with bf16 weights: converted copy, fp32 output
    assert out.dtype == torch.float32
    ref = F.linear(x, s.dense_weight().float(), s.bias.float())
    assert_close_rel(out, ref, torch.float32)


def test_repr(gen):
    q = fk.QLinear(4096, 4096, bias=False, weight_dtype="int4", group_size=128)
    assert repr(q) == "QLinear(in_features=4096, out_features=4096, bias=False, weight=int4, group_size=128, act=float)"
    q8 = fk.QLinear(64, 32, weight_dtype="int8", act_dtype="int8")
    assert repr(q8) == "QLinear(in_features=64, out_features=32, bias=True, weight=int8, act=int8)"
    assert "pattern=2:4" in repr(fk.SparseLinear(64, 32))


@pytest.mark.parametrize("cfg", QCONFIGS + SCONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_state_dict_safetensors_roundtrip(gen, tmp_path, cfg):
    from safetensors.torch import load_file, save_file

    lin = make_linear(gen)
    if "pattern" in cfg:
        mod = fk.SparseLinear.from_linear(lin, **cfg)
        empty = fk.SparseLinear(256, 96, pattern=cfg["pattern"], block_size=cfg.get("block_size", (16, 16)))
    else:
        mod = fk.QLinear.from_linear(lin, **cfg)
        empty = fk.QLinear(256, 96, weight_dtype=cfg["weight_dtype"], act_dtype=cfg.get("act_dtype"),
                           group_size=cfg.get("group_size", 128))
    path = tmp_path / "m.safetensors"
    save_file(mod.state_dict(), str(path))
    empty.load_state_dict(load_file(str(path)))
    x = torch.randn(7, 256, generator=gen)
    assert torch.equal(empty(x), mod(x))


def test_quantize_swaps_with_filter(gen):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 10)))
    out = fk.quantize_(model, weight_dtype="int4", group_size=32, filter_fn=lambda m, fqn: fqn != "2.1")
    assert out is model
    assert isinstance(model[0], fk.QLinear) and isinstance(model[2][0], fk.QLinear)
    assert type(model[2][1]) is nn.Linear
    x = torch.randn(3, 64, generator=gen)
    assert model(x).shape == (3, 10)


def test_sparsify_swaps(gen):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    fk.sparsify_(model, pattern="2:4")
    assert all(isinstance(model[i], fk.SparseLinear) for i in (0, 2))
    assert model(torch.randn(2, 64, generator=gen)).shape == (2, 16)


def test_conversion_errors_name_the_layer():
    model = nn.Sequential(nn.Linear(100, 8))
    with pytest.raises(ValueError, match=r"'0'.*K=100.*group_size=128"):
        fk.quantize_(model, weight_dtype="int4", group_size=128)
    with pytest.raises(ValueError, match="divisible by 4"):
        fk.sparsify_(nn.Sequential(nn.Linear(10, 8)), pattern="2:4")
    with pytest.raises(ValueError, match="act_dtype must be None or 'int8', got 'int4'"):
        fk.QLinear(64, 8, weight_dtype="int4", act_dtype="int4")


def test_forward_errors_name_the_tensor(gen):
    q = fk.QLinear.from_linear(make_linear(gen), weight_dtype="int4", group_size=64)
    with pytest.raises(ValueError, match=r"x must have K=256.*shape \[3, 255\]"):
        q(torch.randn(3, 255))
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16.*int32"):
        q(torch.ones(3, 256, dtype=torch.int32))


def test_state_dict_wrong_shapes_and_dtypes(gen):
    q = fk.QLinear.from_linear(make_linear(gen), weight_dtype="int8")
    sd = q.state_dict()
    bad = dict(sd, weight=sd["weight"][:, :128].contiguous())
    with pytest.raises(RuntimeError, match=r"'weight' has shape \[96, 128\].*expected shape \[96, 256\]"):
        fk.QLinear(256, 96).load_state_dict(bad)
    bad = dict(sd, weight=sd["weight"].float())
    with pytest.raises(RuntimeError, match=r"'weight'.*dtype float32.*expected.*dtype int8"):
        fk.QLinear(256, 96).load_state_dict(bad)
    s = fk.SparseLinear.from_linear(make_linear(gen), pattern="block", sparsity=0.5)
    sd = s.state_dict()
    bad = dict(sd, weight_blocks=sd["weight_blocks"][:, :8].contiguous())
    with pytest.raises(RuntimeError, match="weight_blocks"):
        fk.SparseLinear(256, 96, pattern="block").load_state_dict(bad)


def test_to_dtype_keeps_fp32_scales(gen):
    q = fk.QLinear.from_linear(make_linear(gen), weight_dtype="int4", group_size=64).to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert q.weight.dtype == torch.uint8
    x = torch.randn(2, 256, generator=gen, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


def test_backend_choice_changes_nothing(gen):
    q = fk.QLinear.from_linear(make_linear(gen), weight_dtype="int4", group_size=64)
    x = torch.randn(5, 256, generator=gen)
    with fk.use_backend("reference"):
        ref = q(x)
    assert_close_rel(q(x), ref, torch.float32)


class Block(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.a = fk.QLinear.from_linear(make_linear(gen, 64, 128), weight_dtype="int4", group_size=32)
        self.b = fk.SparseLinear.from_linear(make_linear(gen, 128, 64), pattern="2:4")
        self.c = fk.QLinear.from_linear(make_linear(gen, 64, 32), weight_dtype="int8", act_dtype="int8")
        self.d = fk.SparseLinear.from_linear(make_linear(gen, 32, 16), pattern="block", block_size=(4, 8), sparsity=0.5)

    def forward(self, x):
        return self.d(self.c(torch.relu(self.b(torch.relu(self.a(x))))))


def test_torch_compile_fullgraph(gen):
    model = Block(gen)
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert_close_rel(compiled, eager, torch.float32)


def test_export(gen):
    model = Block(gen)
    x = torch.randn(3, 64, generator=gen)
    ep = torch.export.export(model, (x,))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("fastkern.linear_w4a16" in t for t in names)
    assert_close_rel(ep.module()(x), model(x), torch.float32)


@pytest.mark.parametrize("cfg", QCONFIGS + SCONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_forward_sees_swapped_and_reassigned_tensors(gen, cfg):
    # forward reads buffers from _buffers: it must still find what attribute access finds
    cls = fk.SparseLinear if "pattern" in cfg else fk.QLinear
    lin = make_linear(gen, k=128, n=32)
    mod, other = cls.from_linear(lin, **cfg), cls.from_linear(make_linear(gen, k=128, n=32), **cfg)
    x = torch.randn(3, 128, generator=gen)
    base = mod(x)
    # other's weights, mod's bias, swapped in for one call (torch.func writes _buffers directly)
    out = torch.func.functional_call(mod, dict(other.state_dict(), bias=mod.bias), (x,))
    assert torch.equal(out, torch.func.functional_call(other, {"bias": mod.bias}, (x,)))
    assert not torch.equal(out, base)
    assert torch.equal(mod(x), base)  # restored
    mod.bias = None
    nobias = mod(x)
    assert_close_rel(nobias + lin.bias.detach(), base, torch.float32)
    mod.bias = nn.Parameter(lin.bias.detach() * 2)
    assert "bias" in mod._parameters and "bias" not in mod._buffers
    with torch.no_grad():
        assert_close_rel(mod(x), nobias + 2 * lin.bias.detach(), torch.float32)
