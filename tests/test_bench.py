"""The benchmark harness, run end to end through its CLI on tiny shapes (no timing thresholds)."""
import copy
import json
import os
import sys

import pytest
import torch

from fastkern import _ext, formats, ops
from fastkern._info import info_dict
from fastkern.bench import cli, report, shapes
from fastkern.bench.inputs import make_activation, make_weight, op_weight_args
from fastkern.bench.peers import CPU_PEERS, PeerUnavailable, peers_for
from fastkern.bench.timing import copies_needed

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False

# tiny problem, few repeats, small ceiling probes: the whole module stays well under a minute
TINY = ["--shapes", "48x128", "--m", "1", "--min-run-time", "0.002", "--max-copies", "2",
        "--bw-mb", "8", "--peak-n", "64", "--no-progress", "--plain"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    argv = TINY + ["--backends", "reference,cpu", "--json", str(d / "run.json"), "--txt", str(d / "run.txt"),
                   "--markdown", str(d / "run.md")]
    if HAVE_MPL:
        argv += ["--plot", str(d / "run.png")]
    assert cli.main(argv) == 0
    return d


@pytest.fixture(scope="module")
def result(run_dir):
    with open(run_dir / "run.json") as f:
        return json.load(f)


def test_json_is_well_formed(result):
    assert report.validate(result) == []
    meta = result["metadata"]
    for key in ("date", "torch", "fastkern", "triton", "cpu_model", "cpu_count", "device_name", "threads"):
        assert key in meta, key
    assert meta["torch"] == torch.__version__
    c = result["ceilings"]
    assert c["read_bw_gbs"] > 0 and c["matmul_gflops"]["fp32"] > 0 and c["llc_bytes"] > 0
    # the ceiling is the best read rate measured, whichever probe reached it
    assert c["read_bw_gbs"] == max(c["read_bw_gbs_sum"], c.get("read_bw_gbs_native") or 0)
    # measured again after the kernels, and a change between the two is flagged
    assert c["read_bw_gbs_end"] > 0
    assert c["read_bw_drift"] == (abs(c["read_bw_gbs_end"] - c["read_bw_gbs_sum"]) > 0.15 * c["read_bw_gbs_sum"])
    assert "read bandwidth at the end" in report.ceilings_line(result)
    if _ext._C is not None:
        assert c["fma_peak_gflops"] > 0 and _ext._C.cpu_isa() in c["fma_peak_measured_note"]
        assert c["w4a16_compute_gbs"] > 0 and _ext._C.cpu_isa() in c["w4a16_compute_note"]
        if _ext._C.cpu_features()["avx2"]:
            assert c["int8_peak"]["exact_gmacs"] > 0 and c["int8_peak"]["u8s8_gmacs"] > 0
    # the ceilings of the targets, in the JSON and under the targets in the reports
    assert result["target_ceilings"] == targets_mod().ceiling_rows(result)


@pytest.mark.skipif(_ext._C is None, reason="fastkern._C is not built")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("probe", ["fma_peak", "read_bw"])
def test_native_probe_runs_each_path(isa, probe):
    try:
        _ext._C.set_cpu_isa(isa)
    except RuntimeError as e:
        pytest.skip("this CPU cannot run the %s path: %s" % (isa, e))
    try:
        r = _ext._C.fma_peak(0.01) if probe == "fma_peak" else _ext._C.read_bw(1 << 20, 2)
    finally:
        _ext._C.set_cpu_isa("auto")
    assert r["isa"] == isa and r["gflops" if probe == "fma_peak" else "gbs"] > 0
    assert r["threads"] == torch.get_num_threads()


def targets_mod():
    from fastkern.bench import targets

    return targets


@pytest.mark.skipif(_ext._C is None or not _ext._C.cpu_features()["avx2"], reason="needs fastkern._C and AVX2")
def test_int8_peak_probe():
    # both mixes run on every thread and report a rate; how the rates compare is a timing
    # (benchmarks record it), which a loaded machine can turn around, so only their presence
    # is checked: vpdpbusd where the active path has AVX-512 VNNI, else 0
    r = _ext._C.int8_peak(0.05)
    assert r["threads"] == torch.get_num_threads()
    assert r["exact_gmacs"] > 0 and r["u8s8_gmacs"] > 0
    vnni = _ext._C.cpu_isa() in ("avx512", "amx") and _ext._C.cpu_features()["avx512vnni"]
    assert (r["vnni_gmacs"] > 0) if vnni else r["vnni_gmacs"] == 0
    assert (r["amx_gmacs"] > 0) if _ext._C.cpu_isa() == "amx" else r["amx_gmacs"] == 0
    _ext._C.set_cpu_isa("avx2")
    try:
        assert _ext._C.int8_peak(0.02)["vnni_gmacs"] == 0 and _ext._C.int8_peak(0.02)["amx_gmacs"] == 0
        if _ext._C.cpu_features()["avxvnni"]:  # ymm vpdpbusd (32 products) on the avx2vnni path
            _ext._C.set_cpu_isa("avx2vnni")
            r = _ext._C.int8_peak(0.05)
            assert r["isa"] == "avx2vnni" and r["vnni_gmacs"] > r["exact_gmacs"]
    finally:
        _ext._C.set_cpu_isa("auto")


def test_ceiling_rows_from_the_runs_measurements():
    targets = targets_mod()
    res = {"ceilings": {"device": "cpu", "cpu_isa": "avx2", "read_bw_gbs": 50.0, "w4a16_compute_gbs": 30.0,
                        "w4a16_compute_note": "probe", "int8_peak": {"exact_gmacs": 90.0, "u8s8_gmacs": 100.0},
                        "fma_peak_gflops": 200.0, "matmul_gflops": {"fp32": 160.0}, "matmul_n": 2048},
           "results": [
               {"kind": "fastkern", "op": "linear_w4a16", "m": 1, "status": "ok", "read_bw_window_gbs": 40.0},
               {"kind": "fastkern", "op": "linear_w4a16", "m": 1, "status": "ok", "read_bw_window_gbs": 60.0},
               {"kind": "peer", "name": "FBGEMM dynamic int8", "ops": ["linear_w8a8"], "m": 1, "status": "ok",
                "pct_bw": 80.0},
               {"kind": "peer", "name": "FBGEMM dynamic int8", "ops": ["linear_w8a8"], "m": 64, "status": "ok",
                "pct_bw": 5.0}]}
    rows = {r["target"]: r for r in targets.ceiling_rows(res)}
    bw = rows["W4A16 M=1: >= 85% of read bandwidth"]
    assert bw["ceiling"] == pytest.approx(75.0) and bw["ceiling_lo"] == pytest.approx(50.0)
    fb4 = rows["W4A16 M=1: >= 1.5x FBGEMM dynamic int8"]
    assert fb4["ceiling"] == pytest.approx(1.5) and fb4["ceiling_lo"] == pytest.approx(1.0)
    assert rows["W8A8 M=1: >= 1.2x FBGEMM"]["ceiling"] == pytest.approx(1.25)
    assert rows["W8A8 M>=64: >= 1.0x FBGEMM"]["ceiling"] == pytest.approx(0.9)
    assert rows["dense fp32 GEMM 2048^3: >= 1.5x torch"]["ceiling"] == pytest.approx(1.25)
    text = targets.render_ceilings(list(rows.values()))
    assert "at most 50% - 75%" in text and "at most 0.90x" in text
    # a kernel that reached more on cold weights than the probe: the ceiling follows the kernel
    res2 = copy.deepcopy(res)
    res2["results"][0].update(dtype="fp32", gbs=45.0)
    bw2 = {r["target"]: r for r in targets.ceiling_rows(res2)}["W4A16 M=1: >= 85% of read bandwidth"]
    assert bw2["ceiling"] == pytest.approx(100.0) and bw2["ceiling_lo"] == pytest.approx(75.0)
    assert targets.ceiling_rows({"ceilings": {"device": "cuda"}, "results": []}) == []
    # a run's own target checks decide which ceilings it lists
    res["targets"] = [{"target": "W8A8 M=1: >= 1.2x FBGEMM"}]
    assert [r["target"] for r in targets.ceiling_rows(res)] == ["W8A8 M=1: >= 1.2x FBGEMM"]
    # with AVX-512 VNNI fastkern's int8 products are not the AVX2 mix: no such ceiling
    res["ceilings"]["cpu_isa"] = "avx512"
    assert "W8A8 M>=64: >= 1.0x FBGEMM" not in {r["target"] for r in targets.ceiling_rows(res)}


def test_every_op_timed_with_its_peers(result):
    res = result["results"]
    ok = [e for e in res if e["status"] == "ok"]
    for e in ok:
        assert e["ms"] > 0 and e["gflops"] > 0 and e["gbs"] > 0 and e["copies"] >= 2
    for op in shapes.ALL_OPS:
        fk = [e for e in res if e["kind"] == "fastkern" and e["op"] == op and e["backend"] == "reference"]
        assert fk and all(e["status"] == "ok" for e in fk), op
        # the peers compared with this op were timed at the same size, and the speedups refer to them
        for e in fk:
            timed = {p["name"] for p in ok if p["kind"] == "peer" and op in p["ops"]
                     and (p["n"], p["k"], p["m"]) == (e["n"], e["k"], e["m"])}
            assert "F.linear fp32" in timed, op
            assert set(e["speedup"]) == timed
            for name, sp in e["speedup"].items():
                peer = next(p for p in ok if p["name"] == name and (p["n"], p["k"], p["m"]) == (e["n"], e["k"], e["m"]))
                assert sp == pytest.approx(peer["ms"] / e["ms"])


def test_unavailable_backends_are_reported_not_timed(result):
    for e in result["results"]:
        if e["kind"] != "fastkern" or e["backend"] != "cpu":
            continue
        reason = ops.backend_status(e["op"], "cpu", torch.device("cpu"))
        if reason is None:
            assert e["status"] in ("ok", "error")
        else:
            assert e["status"] == "skipped" and e["reason"] == reason


def test_quick_cpu_peers_present(result):
    names = {e["name"] for e in result["results"] if e["kind"] == "peer"}
    for p in CPU_PEERS:
        assert p.name in names


def test_table_text_written(run_dir, result):
    text = (run_dir / "run.txt").read_text()
    for op in shapes.ALL_OPS:
        assert "== " + op in text
    assert "read bandwidth" in text
    assert text == report.render_text(result)


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (pip install 'fastkern[bench]')")
def test_markdown_summary_written(run_dir, result):
    text = (run_dir / "run.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    fk = [e for e in result["results"] if e["kind"] == "fastkern" and e["status"] == "ok"]
    assert len(rows) == len(fk) and fk
    assert "vs fp32" in text and "48x128" in text and "DESIGN" in text
    if result["target_ceilings"]:
        assert "Ceilings measured in this run" in text and result["target_ceilings"][0]["target"] in text


def test_plot_written(run_dir):
    data = (run_dir / "run.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def _slower_copy(result, factor):
    old = copy.deepcopy(result)
    for e in old["results"]:
        if e["status"] == "ok":
            e["ms"] *= factor
    return old


def test_compare_two_files(run_dir, result, capsys):
    old = _slower_copy(result, 2.0)
    old_path = run_dir / "old.json"
    report.write_json(old, str(old_path))
    rows, warnings = report.compare(old, result)
    assert rows and warnings == []
    assert all(r["speedup"] == pytest.approx(2.0) for r in rows)
    assert len(rows) == sum(e["status"] == "ok" for e in result["results"])
    capsys.readouterr()
    assert cli.main(["--compare", str(old_path), str(run_dir / "run.json"), "--plain"]) == 0
    out = capsys.readouterr().out
    assert "2.00x" in out and "0.50x" not in out


def test_compare_warns_across_machines(result):
    other = copy.deepcopy(result)
    other["metadata"]["cpu_model"] = "Some Other CPU"
    other["metadata"]["device_name"] = "Some Other CPU"
    _, warnings = report.compare(other, result)
    assert any("cpu_model" in w for w in warnings)


def test_compare_against_a_new_run(run_dir, capsys):
    capsys.readouterr()
    argv = TINY[:] + ["--ops", "gemm", "--backends", "reference", "--no-ceilings", "--peers", "fp32",
                      "--compare", str(run_dir / "run.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "change against" in out and "gemm" in out


def test_validate_rejects_broken_results(result):
    bad = copy.deepcopy(result)
    ok = next(e for e in bad["results"] if e["status"] == "ok")
    ok["ms"] = 0.0
    del bad["metadata"]["date"]
    problems = report.validate(bad)
    assert any("ms=0.0" in p for p in problems) and any("date" in p for p in problems)
    with pytest.raises(ValueError, match="not a fastkern-bench result"):
        path = os.path.join(os.path.dirname(__file__), "__bad_bench.json")
        try:
            report.write_json(bad, path)
            report.load_json(path)
        finally:
            os.remove(path)


# ------------------------------------------------------------------ library pieces


def test_shape_sets_follow_design():
    full = shapes.full_cases(device="cpu")
    lin = {(c.n, c.k) for c in full if c.op == "linear_w4a16"}
    assert lin == set(shapes.LLAMA_SHAPES)
    assert {c.m for c in full if c.op == "linear_w8a8"} == {1, 16, 64, 256}
    assert {c.dtype for c in full if c.op == "linear_w4a16"} == {"fp32", "bf16"}
    assert [(c.n, c.k, c.m) for c in full if c.op == "gemm"] == [(2048, 2048, 2048)]
    assert all(c.dtype == "int8" for c in full if c.op == "int8_gemm")
    quick = shapes.quick_cases(device="cpu")
    assert {c.m for c in quick if c.op != "gemm"} == {1, 64}
    assert set(shapes.resolve_ops(["w4a16,gemm"])) == {"linear_w4a16", "gemm"}
    with pytest.raises(ValueError, match="unknown op"):
        shapes.resolve_ops(["w3a16"])
    assert shapes.parse_shapes("4096x11008, 8x16") == [(4096, 11008), (8, 16)]


def test_list_prints_plan(capsys):
    assert cli.main(["--quick", "--ops", "w4a16", "--list"]) == 0
    out = capsys.readouterr().out
    assert "linear_w4a16 [cpu] N=4096 K=14336 M=1 fp32" in out
    assert "peer torch int4pack (bf16) N=4096 K=4096 M=64" in out


def test_rotation_exceeds_last_level_cache():
    llc = 8 << 20
    n = copies_needed(3 << 20, llc)
    assert n * (3 << 20) >= 4 * llc and n >= 2
    assert copies_needed(1 << 30, llc) == 2
    assert copies_needed(1024, llc, max_copies=16) == 16


def test_rotation_fits_the_memory(monkeypatch):
    # A CPU whose LLC is hundreds of MB (480 MiB here on a Xeon with 23 GB of memory) asked for
    # LLC_FACTOR x that per implementation: eight implementations of one problem ran the machine
    # out of memory. Their copies together now take at most 30% of the memory, and half of what
    # is available.
    from fastkern.bench import timing

    llc = 480 << 20
    assert copies_needed(64 << 20, llc) * (64 << 20) >= 4 * llc  # unbounded: ~1.9 GB each
    info = {"MemTotal": 80 << 30, "MemAvailable": 16 << 30}
    monkeypatch.setattr(timing, "meminfo_bytes", info.get)
    assert timing.available_memory_bytes() == 8 << 30
    info["MemTotal"] = 20 << 30
    assert timing.available_memory_bytes() == 6 << 30
    monkeypatch.setattr(timing, "available_memory_bytes", lambda: 8 << 30)
    cap = timing.rotation_cap(8, "cpu")
    assert cap == 1 << 30
    n = copies_needed(64 << 20, llc, max_bytes=cap)
    assert n == 16 and 8 * n * (64 << 20) <= 8 << 30
    assert copies_needed(3 << 30, llc, max_bytes=cap) == 2  # never fewer than 2
    assert timing.rotation_cap(1, "cpu") == timing.MAX_ROTATION_BYTES
    assert timing.rotation_cap(8, "cuda") == timing.MAX_ROTATION_BYTES
    monkeypatch.setattr(timing, "available_memory_bytes", lambda: None)
    assert timing.rotation_cap(8, "cpu") == timing.MAX_ROTATION_BYTES


def test_bandwidth_probe_fits_the_memory(monkeypatch):
    # 16 x a 480 MiB LLC (7.5 GiB, alive for the whole run) is now a tenth of the memory, never
    # under 2 x the LLC; ordinary LLCs keep 16 x, at least 256 MiB
    from fastkern.bench import ceilings

    info = {"MemTotal": 23 << 30}
    monkeypatch.setattr(ceilings, "meminfo_bytes", info.get)
    assert ceilings.cpu_probe_bytes(480 << 20) == (23 << 30) // 10
    assert ceilings.cpu_probe_bytes(32 << 20) == 512 << 20
    assert ceilings.cpu_probe_bytes(8 << 20) == 256 << 20
    info["MemTotal"] = 4 << 30
    assert ceilings.cpu_probe_bytes(480 << 20) == 960 << 20
    info.clear()
    assert ceilings.cpu_probe_bytes(480 << 20) == 16 * (480 << 20)


@pytest.mark.parametrize("peer", CPU_PEERS, ids=lambda p: p.short)
def test_cpu_peers_compute_the_same_product(peer):
    """Each peer, built from the harness's weight, matches fastkern's reference for the op it stands
    in for (so a speedup compares like with like)."""
    n, k, m = 48, 256, 5
    w = make_weight(n, k, seed=3)
    try:
        impl = peer.impl(w, m)
    except PeerUnavailable as e:
        pytest.skip(str(e))
    out = impl.call(impl.x, impl.pool.get(0))
    x32 = make_activation(m, k, torch.float32, seed=1)
    if peer.short == "int4pack":
        case = shapes.Case("linear_w4a16", n, k, m, "bf16")
        ref = ops.linear_w4a16_ref(impl.x, *op_weight_args(case, w)).float()
        tol = 1e-2
    elif peer.short in ("int8pack", "fbgemm", "onednn"):
        q, s = formats.quantize_int8(w)
        ref = x32 @ formats.dequantize_int8(q, s).T
        tol = 1e-2 if peer.short == "int8pack" else 3e-2  # fbgemm / onednn also quantize x (uint8)
    else:
        ref = x32 @ w.T
        tol = 1e-5 if peer.short == "fp32" else 1e-2
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < tol, "%s: relative error %.3g" % (peer.name, err)


def test_peer_selection():
    assert {p.short for p in peers_for("linear_w4a16", "cpu")} == {"fp32", "bf16", "fbgemm", "int8pack", "int4pack"}
    assert {p.short for p in peers_for("linear_sparse24", "cpu")} == {"fp32", "bf16"}
    assert {p.short for p in peers_for("linear_w8a8", "cpu")} == {"fp32", "bf16", "fbgemm", "int8pack", "onednn"}
    assert {p.short for p in peers_for("linear_w8a8", "cuda")} == {"fp16", "bf16", "_int_mm"}
    assert [p.short for p in peers_for("linear_w4a16", "cpu", ["int4pack"])] == ["int4pack"]


def test_model_flag_without_model_module(monkeypatch):
    import fastkern.bench as fb

    monkeypatch.delattr(fb, "model", raising=False)
    monkeypatch.setitem(sys.modules, "fastkern.bench.model", None)
    with pytest.raises(SystemExit, match="model benchmark"):
        cli.main(["--model", "minilm"])
    with pytest.raises(SystemExit, match="not one of"):
        cli.main(["--model", "resnet"])


def test_cuda_device_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cli.main(TINY + ["--device", "cuda", "--ops", "gemm"])


def test_each_target_row_carries_its_own_ceiling():
    targets = targets_mod()
    c = {"device": "cpu", "cpu_isa": "avx2", "read_bw_gbs": 50.0, "w4a16_compute_gbs": 30.0,
         "w4a16_compute_gbs_bf16": 45.0, "int8_peak": {"exact_gmacs": 100.0, "u8s8_gmacs": 120.0},
         "fma_peak_gflops": 200.0}
    w4 = {"kind": "fastkern", "op": "linear_w4a16", "backend": "cpu", "status": "ok", "m": 1, "n": 4096, "k": 4096,
          "bytes": 40e6, "flops": 2 * 4096 * 4096, "read_bw_window_gbs": 40.0}
    # fp32: 40 MB at min(40 GB/s window, 30 GB/s compute) takes at least 1.333 ms
    w4f = dict(w4, dtype="fp32", ms=2.0, gbs=20.0, pct_bw=50.0, speedup={"FBGEMM dynamic int8": 1.2})
    # bf16: its own probe (45 GB/s) is above the window, so memory bounds it at 1 ms
    w4b = dict(w4, dtype="bf16", ms=1.25, gbs=32.0, pct_bw=80.0, speedup={"FBGEMM dynamic int8": 1.6})
    # W8A8 M=64 on the AVX2 path: 4096 x 4096 x 64 multiply-adds at 100 GMAC/s take 10.7 ms
    i8 = {"kind": "fastkern", "op": "linear_w8a8", "backend": "cpu", "status": "ok", "m": 64, "n": 4096, "k": 4096,
          "dtype": "fp32", "bytes": 17e6, "flops": 2 * 64 * 4096 * 4096, "read_bw_window_gbs": 40.0, "ms": 12.0,
          "speedup": {"FBGEMM dynamic int8": 0.8}}
    res = {"metadata": {}, "ceilings": c, "results": [w4f, w4b, i8]}
    rows = targets.evaluate(res)
    get = lambda e, target: next(r for r in rows if r["dtype"] == e["dtype"] and r["op"] == e["op"]
                                 and r["target"] == target)
    bw_f = get(w4f, "W4A16 M=1: >= 85% of read bandwidth")
    assert bw_f["ceiling"] == pytest.approx(75.0) and bw_f["ceiling_bound"] == "compute" and bw_f["met"] is False
    fb_f = get(w4f, "W4A16 M=1: >= 1.5x FBGEMM dynamic int8")  # FBGEMM took 2.4 ms
    assert fb_f["ceiling"] == pytest.approx(2.4 / (40e6 / 30e6)) and fb_f["ceiling_bound"] == "compute"
    bw_b = get(w4b, "W4A16 M=1: >= 85% of read bandwidth")
    assert bw_b["ceiling"] == pytest.approx(100.0) and bw_b["ceiling_bound"] == "memory"
    assert get(w4b, "W4A16 M=1: >= 1.5x FBGEMM dynamic int8")["ceiling"] == pytest.approx(2.0)
    w8 = get(i8, "W8A8 M>=64: >= 1.0x FBGEMM")
    assert w8["ceiling"] == pytest.approx(0.8 * 12.0 / (64 * 4096 * 4096 / 100e6)) and w8["ceiling_bound"] == "compute"
    text = targets.render_text(rows)
    assert "ceiling 75% (compute-bound): out of reach" in text and "ceiling 0.89x (compute-bound): out of reach" in text
    assert "ceiling 1.80x (compute-bound)\n" in text  # below its ceiling: not out of reach
    assert "4 miss(es); 2 with a ceiling below the target" in text
    # the VNNI path: vpdpbusd's rate; no ceiling where the run has no probe of it, nor on a GPU run
    res["ceilings"] = dict(c, cpu_isa="avx512", int8_peak=dict(c["int8_peak"], vnni_gmacs=400.0))
    w8v = next(r for r in targets.evaluate(res) if r["op"] == "linear_w8a8")
    assert w8v["ceiling"] == pytest.approx(0.8 * 12.0 / (64 * 4096 * 4096 / 400e6)) and w8v["ceiling_bound"] == "compute"
    res["ceilings"] = dict(c, cpu_isa="avx512")
    assert next(r for r in targets.evaluate(res) if r["op"] == "linear_w8a8")["ceiling"] is None
    res["ceilings"] = dict(c, device="cuda")
    assert len(targets.evaluate(res)) == len(rows) and all(r["ceiling"] is None for r in targets.evaluate(res))


def test_targets_are_checked_on_this_runs_entries(result):
    from fastkern.bench import targets

    r = copy.deepcopy(result)
    w4 = next(e for e in r["results"] if e["kind"] == "fastkern" and e["op"] == "linear_w4a16" and e["status"] == "ok")
    for backend, bw, sp in (("cpu", 90.0, 7.0), ("reference", 10.0, 0.5)):
        e = copy.deepcopy(w4)
        e.update(backend=backend, pct_bw=bw, speedup={"F.linear fp32": sp})
        r["results"].append(e)
    rows = [row for row in targets.evaluate(r) if row["op"] == "linear_w4a16"]
    assert rows and all(row["backend"] == "cpu" for row in rows)  # the reference backend is not a contender
    bw_rows = [row for row in rows if row["metric"] == "pct_bw" and row["value"] == 90.0]
    assert bw_rows and all(row["met"] for row in bw_rows)
    fp32 = [row for row in rows if row["peer"] == "F.linear fp32" and row["value"] == 7.0]
    assert fp32 and all(row["met"] for row in fp32)
    missing = [row for row in rows if row["peer"] == "FBGEMM dynamic int8" and row["value"] is None]
    assert missing and all(row["met"] is None for row in missing)
    assert "DESIGN" in targets.render_text(rows) and "n/a (peer not timed)" in targets.render_text(rows)


def test_plain_table_without_rich(result, monkeypatch, capsys):
    for name in ("rich", "rich.console", "rich.table", "rich.markup"):
        monkeypatch.setitem(sys.modules, name, None)
    report.print_table(result)
    out = capsys.readouterr().out
    assert out == report.render_text(result)
    assert "== linear_w4a16" in out and "speedup vs peers" in out


def test_interrupted_run_keeps_what_was_measured(monkeypatch):
    from fastkern.bench import runner

    real = runner.prepare
    calls = []

    def prepare_then_stop(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "prepare", prepare_then_stop)
    cases = shapes.custom_cases(["gemm"], [(16, 32)], [1, 2])
    cfg = runner.RunConfig(backends=["reference"], peers=[], min_run_time=0.001, max_copies=2,
                           measure_ceilings=False)
    res = runner.run_benchmark(cases, cfg, argv=[])
    assert res["metadata"]["interrupted"] is True
    assert [e["status"] for e in res["results"]] == ["ok", "skipped"]
    assert res["results"][1]["reason"] == "interrupted"
    assert report.validate(res) == []


def test_interleaved_rounds_alternate_and_pool_samples():
    from fastkern.bench.timing import Rotator, time_interleaved

    order = []

    def fn(name):
        def call(x, c):
            order.append(name)
            return x
        return call

    x = torch.zeros(1)
    rots = [Rotator(fn(n), x, [(), ()]) for n in "abc"]
    timings = time_interleaved(rots, "cpu", 0.03, rounds=4)
    assert all(t is not None and t.runs >= 4 and t.ms > 0 for t in timings)
    assert all("4 interleaved rounds" in t.method for t in timings)
    # stretches: warm-up a b c, then rounds a b c / c b a / a b c / c b a (a round's last
    # implementation opens the next one, so its two stretches run back to back)
    runs = [order[0]]
    for name in order[1:]:
        if name != runs[-1]:
            runs.append(name)
    assert runs == list("abc") + list("abc") + list("ba") + list("bc") + list("ba")


def test_interleaved_failure_is_reported_and_others_still_timed():
    from fastkern.bench.timing import Rotator, time_interleaved

    calls = {"n": 0}

    def flaky(x, c):
        calls["n"] += 1
        if calls["n"] > 2:  # fails after warm-up, during a round
            raise RuntimeError("kernel broke")
        return x

    x = torch.zeros(1)
    errors = []
    rots = [Rotator(lambda x, c: x, x, [()]), Rotator(flaky, x, [(), ()])]
    out = time_interleaved(rots, "cpu", 0.01, rounds=2, on_error=lambda i, e: errors.append((i, str(e))))
    assert out[0] is not None and out[1] is None
    assert errors == [(1, "kernel broke")]
    with pytest.raises(RuntimeError, match="kernel broke"):
        calls["n"] = 0
        time_interleaved(rots, "cpu", 0.01, rounds=2)


def test_run_times_fastkern_and_peers_in_rounds(result):
    for e in result["results"]:
        if e["status"] == "ok":
            assert "interleaved rounds" in e["timer"], e


@pytest.mark.skipif("avx2" not in info_dict().get("cpu_features", []), reason="--isa avx2 needs a CPU with AVX2")
def test_isa_cap_restarts_the_run_capped(tmp_path):
    import subprocess

    out = tmp_path / "capped.json"
    env = {k: v for k, v in os.environ.items() if k not in cli.ISA_CAPS["avx2"]}
    proc = subprocess.run([sys.executable, "-m", "fastkern.bench", "--isa", "avx2", "--ops", "w8a8",
                           "--peers", "fbgemm", "--rounds", "1", "--json", str(out)] + TINY,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        res = json.load(f)
    meta = res["metadata"]
    assert meta["isa_cap"] == "avx2" and meta["isa_cap_env"] == cli.ISA_CAPS["avx2"]
    assert meta["cpu_isa"] == "avx2"  # fastkern's kernels really ran on the AVX2 path
    assert "capped to avx2" in proc.stdout
    assert all(e["status"] == "ok" for e in res["results"]), res["results"]
    assert report.validate(res) == []


def test_model_flag_hands_over_to_the_model_benchmark(monkeypatch):
    import argparse
    import types

    import fastkern.bench as fb

    seen = {}
    fake = types.ModuleType("fastkern.bench.model")

    def build_parser():
        p = argparse.ArgumentParser()
        p.add_argument("--eval-sentences", type=int, default=None)
        return p

    def main(args):
        seen.update(vars(args))
        return 0

    fake.build_parser, fake.main = build_parser, main
    monkeypatch.delattr(fb, "model", raising=False)
    monkeypatch.setitem(sys.modules, "fastkern.bench.model", fake)
    assert cli.main(["--model", "minilm", "--quick", "--json", "x.json", "--eval-sentences", "8",
                     "--backends", "reference"]) == 0
    assert seen["model"] == "minilm" and seen["quick"] and seen["json"] == "x.json"
    assert seen["eval_sentences"] == 8 and seen["backend"] == "reference"
    with pytest.raises(SystemExit):
        cli.main(["--eval-sentences", "8"])  # without --model it is no option of the harness


def test_register_peaks_take_the_larger_reading(monkeypatch):
    """The register-only peaks are measured again at the end of a CPU run and the larger
    reading of each stands (a busy host can only lower them); pct_fma follows a raised FMA peak,
    and a lower end reading changes nothing."""
    from fastkern.bench import ceilings as ceil_mod

    c = {"fma_peak_gflops": 100.0, "int8_peak": {"exact_gmacs": 110.0, "u8s8_gmacs": 250.0, "vnni_gmacs": 0.0}}
    results = [{"gflops": 80.0, "pct_fma": 80.0}, {"gflops": 5.0}]
    monkeypatch.setattr(ceil_mod, "fma_peak_measured", lambda t: (200.0, "probe"))
    monkeypatch.setattr(ceil_mod, "int8_peak_measured",
                        lambda t: ({"exact_gmacs": 220.0, "u8s8_gmacs": 240.0, "vnni_gmacs": 0.0}, "probe"))
    ceil_mod.remeasure_peaks(c, results, 0.01)
    assert c["fma_peak_gflops"] == 200.0 and c["fma_peak_gflops_start"] == 100.0
    assert c["int8_peak"] == {"exact_gmacs": 220.0, "u8s8_gmacs": 250.0, "vnni_gmacs": 0.0}
    assert c["int8_peak_start"]["exact_gmacs"] == 110.0
    assert results[0]["pct_fma"] == 40.0 and "pct_fma" not in results[1]
    before = copy.deepcopy(c)
    monkeypatch.setattr(ceil_mod, "fma_peak_measured", lambda t: (150.0, "probe"))
    monkeypatch.setattr(ceil_mod, "int8_peak_measured",
                        lambda t: ({"exact_gmacs": 100.0, "u8s8_gmacs": 100.0, "vnni_gmacs": 0.0}, "probe"))
    ceil_mod.remeasure_peaks(c, results, 0.01)
    assert c == before and results[0]["pct_fma"] == 40.0


def test_bandwidth_measured_in_each_problems_window(monkeypatch):
    """%BW is taken against a read-bandwidth probe timed in the same rounds as the problem's
    implementations, on the scale of the run's best start probe."""
    from fastkern.bench import ceilings as ceil_mod
    from fastkern.bench import runner

    monkeypatch.setattr(ceil_mod, "measure_ceilings", lambda device, **kw: {
        "device": device, "llc_bytes": 1 << 20, "read_bw_gbs": 20.0, "read_bw_gbs_sum": 10.0,
        "bw_array_bytes": 4 << 20, "matmul_gflops": {"fp32": 100.0}})
    cases = shapes.custom_cases(["gemm"], [(16, 32), (24, 32)], [1])
    cfg = runner.RunConfig(backends=["reference"], peers=["fp32"], min_run_time=0.01, max_copies=2)
    res = runner.run_benchmark(cases, cfg, argv=[])
    assert res["ceilings"]["read_bw_probe_factor"] == 2.0
    ok = [e for e in res["results"] if e["status"] == "ok"]
    assert len(ok) == 4
    for e in ok:
        assert e["read_bw_window_gbs"] > 0
        assert e["pct_bw"] == pytest.approx(100.0 * e["gbs"] / e["read_bw_window_gbs"])
    # one window per problem: fastkern and its peer share it
    by_problem = {}
    for e in ok:
        by_problem.setdefault((e["n"], e["k"], e["m"]), set()).add(e["read_bw_window_gbs"])
    assert all(len(v) == 1 for v in by_problem.values()) and len(by_problem) == 2
    assert "own time window" in report.ceilings_line(res)
    assert report.validate(res) == []
