"""The op catalogue itself: schemas/fakes (opcheck), backend routing, input errors, info."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import fastkern as fk
from conftest import isa_skip_reason, num_threads
from fastkern import formats, ops


def sample_args(op, gen, m=5, n=24, k=64, dtype=torch.float32):
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    if op == "gemm":
        return (x, w.to(dtype))
    if op == "int8_gemm":
        return (torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8),
                torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8))
    if op in ("linear_w8a16", "linear_w8a8"):
        q, s = formats.quantize_int8(w)
        return (x, q, s, bias)
    if op in ("linear_w4a16", "linear_w4a8"):
        p, s, z = formats.quantize_int4(w, 32)
        return (x, p, s, z, 32, bias)
    if op == "linear_sparse24":
        v, meta = formats.compress_2_4(w)
        return (x, v.to(dtype), meta, bias)
    if op == "linear_blocksparse":
        blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, (8, 16), formats.prune_blocks(w, (8, 16), 0.5))
        return (x, blocks.to(dtype), row_ptr, col_idx, n, bias)
    raise KeyError(op)


@pytest.mark.parametrize("op", list(ops.OPS))
def test_opcheck_public(gen, op):
    torch.library.opcheck(getattr(torch.ops.fastkern, op), sample_args(op, gen))


@pytest.mark.parametrize("op", list(ops.OPS))
def test_every_op_has_all_parts(op):
    spec = ops.OPS[op]
    assert callable(spec.reference) and callable(spec.check)
    assert getattr(ops, op + "_ref") is spec.reference


@pytest.mark.parametrize("op", list(ops.OPS))
def test_reference_backend_is_reference(gen, op):
    args = sample_args(op, gen)
    with fk.use_backend("reference"):
        out = getattr(torch.ops.fastkern, op)(*args)
    assert torch.equal(out, ops.OPS[op].reference(*args))


def test_reference_w8a8_by_hand(gen):
    x, q, s, bias = sample_args("linear_w8a8", gen)
    xq, xs = formats.quantize_per_token(x)
    expected = (xq.double() @ q.double().T) * xs.double() * s.double() + bias.double()
    assert torch.allclose(ops.linear_w8a8_ref(x, q, s, bias).double(), expected, rtol=1e-6, atol=1e-6)


def test_use_backend_errors(gen):
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with fk.use_backend("nope"):
            pass
    args = sample_args("gemm", gen)
    with fk.use_backend("cuda"):
        with pytest.raises(fk.BackendUnavailableError, match="backend 'cuda' cannot run gemm: the cuda backend runs cuda tensors"):
            torch.ops.fastkern.gemm(*args)


def test_env_backend_override(gen, monkeypatch):
    args = sample_args("linear_w4a16", gen)
    monkeypatch.setenv("FASTKERN_BACKEND", "reference")
    assert ops.select_backend("linear_w4a16", torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTKERN_BACKEND", "cuda")
    with pytest.raises(fk.BackendUnavailableError):
        torch.ops.fastkern.linear_w4a16(*args)
    with fk.use_backend("reference"):  # the context manager wins over the environment
        torch.ops.fastkern.linear_w4a16(*args)
    monkeypatch.setenv("FASTKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        torch.ops.fastkern.linear_w4a16(*args)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in ops.backend_status("gemm", "triton", torch.device("cpu"))


def test_default_backend_on_cpu():
    expected = "cpu" if ops.backend_status("gemm", "cpu", torch.device("cpu")) is None else "reference"
    assert ops.select_backend("gemm", torch.device("cpu")) == expected


BAD = [
    ("gemm", lambda a: (a[0][:, :-1], a[1]), ValueError, r"a must have K=64 .*shape \[5, 63\]"),
    ("gemm", lambda a: (a[0], a[1].double()), TypeError, r"b must be float32, float16 or bfloat16.*float64"),
    ("gemm", lambda a: (a[0], a[1].half()), TypeError, r"one dtype"),
    ("int8_gemm", lambda a: (a[0].float(), a[1]), TypeError, r"a must be int8.*float32"),
    # K past the exact int32 sums, on every backend
    ("int8_gemm", lambda a: (torch.zeros(1, 131072, dtype=torch.int8), torch.zeros(2, 131072, dtype=torch.int8)),
     ValueError, r"int8_gemm: b \(shape \[2, 131072\].*K <= 131071"),
    ("linear_w8a8", lambda a: (torch.zeros(1, 132105), torch.zeros(24, 132105, dtype=torch.int8)) + a[2:],
     ValueError, r"linear_w8a8: w \(shape \[24, 132105\].*K <= 132104"),
    ("linear_w8a16", lambda a: (a[0].to(torch.int32),) + a[1:], TypeError, r"x must be float32.*int32"),
    ("linear_w8a16", lambda a: (a[0], a[1], a[2][:3], a[3]), ValueError, r"w_scale must have shape \[24\].*\[3\]"),
    ("linear_w8a8", lambda a: (a[0], a[1], a[2], a[3][:5]), ValueError, r"bias must have shape \[24\]"),
    ("linear_w4a16", lambda a: a[:4] + (24,) + a[5:], ValueError, r"group_size=24 must be .* dividing K=64"),
    ("linear_w4a16", lambda a: (a[0], a[1].to(torch.int8)) + a[2:], TypeError, r"w must be uint8.*int8"),
    ("linear_w4a16", lambda a: (a[0], a[1], a[2][:, :1]) + a[3:], ValueError, r"scales must have shape \[24, 2\]"),
    ("linear_sparse24", lambda a: (a[0][:, :62], a[1][:, :31], a[2][:, :15], a[3]), ValueError, "K divisible by 4.*K=62"),
    ("linear_sparse24", lambda a: (a[0], a[1].half()) + a[2:], TypeError, r"values must have x's dtype"),
    ("linear_blocksparse", lambda a: a[:4] + (25,) + a[5:], ValueError, r"row_ptr must have shape \[5\]"),
    ("linear_blocksparse", lambda a: (a[0], a[1], a[2].int()) + a[3:], TypeError, r"row_ptr must be int64"),
]


@pytest.mark.parametrize("op,mutate,exc,msg", BAD, ids=[b[0] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_inputs_have_clear_errors(gen, op, mutate, exc, msg):
    args = mutate(sample_args(op, gen))
    with pytest.raises(exc, match=msg):
        getattr(torch.ops.fastkern, op)(*args)


def test_mismatched_devices(gen):
    x, q, s, bias = sample_args("linear_w8a16", gen)
    with pytest.raises(ValueError, match=r"one device: x is on meta but w \(shape \[24, 64\], dtype int8, device cpu\)"):
        torch.ops.fastkern.linear_w8a16(x.to("meta"), q, s, bias)


def test_info_prints(capsys):
    d = fk.info()
    out = capsys.readouterr().out
    assert "fastkern" in out and "backends per op" in out
    assert set(d["backends"]) == set(ops.OPS)
    assert "reference" in d["backends"]["gemm"]["cpu"]


def test_python_m_fastkern_info():
    out = subprocess.run([sys.executable, "-m", "fastkern", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "native extension" in out.stdout and "CPU" in out.stdout


def test_imports_without_native_extension():
    code = (
        "import sys, warnings; sys.modules['fastkern._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastkern, torch\n"
        "assert any('not available' in str(x.message) and 'pip install' in str(x.message) for x in w), w\n"
        "q = fastkern.QLinear.from_linear(torch.nn.Linear(64, 8), weight_dtype='int4', group_size=32)\n"
        "print(fastkern.ops.select_backend('linear_w4a16', torch.device('cpu')), q(torch.randn(2, 64)).shape)\n"
    )
    env = dict(os.environ)
    env.pop("FASTKERN_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "torch.Size([2,", "8])"]


@pytest.mark.skipif(fk._ext._C is None, reason="fastkern._C is not built")
def test_native_kernels_run_on_every_torch_thread():
    # at::parallel_for is compiled into the extension: built without the parallel
    # backend (OpenMP here) it runs every chunk on one thread, and the 1-vs-2-thread
    # identity tests of the kernels would then compare a path with itself
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert fk._ext._C.build_info()["openmp"]
    for t in (1, 2, 3):
        with num_threads(t):
            assert fk._ext._C.parallel_width(8) == t


@pytest.mark.skipif(fk._ext._C is None, reason="fastkern._C is not built")
@pytest.mark.parametrize("isa", ["auto", "avx2"])
@pytest.mark.parametrize("op", list(ops.OPS))
def test_native_kernels_same_bits_on_odd_thread_counts(gen, op, isa):
    # the 1-vs-2-thread identity tests split rows in halves; 3 and 4 threads split them
    # into other shares (rows of a thread's tasks, row blocks, tails at other offsets)
    why = None if isa == "auto" else isa_skip_reason(isa)
    if why:
        pytest.skip(why)
    fn = getattr(torch.ops.fastkern_C, op)
    dtypes = [torch.float32] if op == "int8_gemm" else [torch.float32, torch.bfloat16]
    fk._ext._C.set_cpu_isa(isa)
    try:
        for dtype in dtypes:
            for m in (1, 3, 17, 70):
                # N = 392, K = 640: every thread gets rows; 2:4, group 32 and 8 x 16 blocks divide it
                args = sample_args(op, gen, m=m, n=392, k=640, dtype=dtype)
                outs = []
                for t in (1, 3, 4):
                    with num_threads(t):
                        outs.append(fn(*args))
                for t, o in zip((3, 4), outs[1:]):
                    assert torch.equal(o, outs[0]), (op, isa, str(dtype), m, t)
    finally:
        fk._ext._C.set_cpu_isa("auto")


# ------------------------------------------------ per-call fast paths (checks, backend choice)


def _explain(op):
    return getattr(ops, ops.OPS[op].check.__name__.replace("_check_", "_explain_"))


def _valid_variants(op, gen):
    """Well-formed argument tuples: with/without bias, 3-D and 1-D x, fp16."""
    args = sample_args(op, gen)
    out = [args, sample_args(op, gen, dtype=torch.float16) if op != "int8_gemm" else args]
    out.append((args[0].reshape(1, *args[0].shape),) + args[1:])  # [1, M, K]
    out.append((args[0][0],) + args[1:])  # [K]
    if op not in ("gemm", "int8_gemm"):
        out.append(args[:-1] + (None,))
    return out


def _mutations(args):
    """Argument tuples with one thing wrong (or maybe not: the verdict is _explain_*'s)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            alts = [a.to("meta"), a.unsqueeze(0), a.to(torch.float64), a.to(torch.int16), a.to(torch.uint8),
                    a.to(torch.int8), a.to(torch.int64), a.float(), a.half(), a.bfloat16()]
            if a.dim() >= 1 and a.shape[-1] > 1:
                alts.append(a[..., :-1])
            if a.dim() >= 1 and a.shape[0] > 1:
                alts.append(a[1:])
            if a.dim() >= 2:
                alts.append(a.flatten())
            if a.dim() == 0:
                alts.append(a.reshape(1))
        elif isinstance(a, int):
            alts = [0, -2, 3, 16, 24, 64, a + 8, a * 2]
        else:
            alts = []
        for alt in alts:
            yield args[:i] + (alt,) + args[i + 1:]


@pytest.mark.parametrize("op", list(ops.OPS))
def test_fast_checks_accept_valid_inputs_without_explaining(gen, op, monkeypatch):
    spec = ops.OPS[op]
    monkeypatch.setattr(ops, _explain(op).__name__, lambda *a: pytest.fail("fast check refused valid inputs"))
    for args in _valid_variants(op, gen):
        spec.check(*args)


@pytest.mark.parametrize("op", list(ops.OPS))
def test_fast_checks_agree_with_explanations(gen, op):
    spec, explain = ops.OPS[op], _explain(op)
    seen = 0
    for base in _valid_variants(op, gen):
        for args in _mutations(base):
            try:
                explain(*args)
                want = None
            except (TypeError, ValueError) as e:
                want = (type(e), str(e))
                seen += 1
            try:
                spec.check(*args)
                got = None
            except (TypeError, ValueError) as e:
                got = (type(e), str(e))
            assert got == want, [describe_args(args)]
    assert seen > 20


def describe_args(args):
    return [ops.describe("arg", a) if isinstance(a, torch.Tensor) else a for a in args]


def test_env_backend_read_at_every_call(gen, monkeypatch):
    args = sample_args("gemm", gen)
    cpu = torch.device("cpu")
    default = ops.select_backend("gemm", cpu)
    monkeypatch.setenv("FASTKERN_BACKEND", "reference")
    assert ops.select_backend("gemm", cpu) == "reference"
    monkeypatch.setenv("FASTKERN_BACKEND", "")  # empty means unset
    assert ops.select_backend("gemm", cpu) == default
    os.environ["FASTKERN_BACKEND"] = "cuda"  # plain os.environ assignment (monkeypatch restores it)
    with pytest.raises(fk.BackendUnavailableError, match="backend 'cuda' cannot run gemm"):
        torch.ops.fastkern.gemm(*args)
    with pytest.raises(fk.BackendUnavailableError, match="backend 'cuda' cannot run gemm"):  # refusals are not cached
        torch.ops.fastkern.gemm(*args)
    del os.environ["FASTKERN_BACKEND"]
    assert ops.select_backend("gemm", cpu) == default
    torch.ops.fastkern.gemm(*args)
    # os.environ replaced by another mapping: still honoured
    monkeypatch.setattr(os, "environ", {"FASTKERN_BACKEND": "reference"})
    assert ops.select_backend("gemm", cpu) == "reference"


def test_default_choice_is_recomputed_after_register_kernel(gen):
    cpu = torch.device("cpu")
    default = ops.select_backend("gemm", cpu)
    assert ops._DEFAULT
    key = ("gemm", "triton")
    old = ops._KERNELS.get(key)
    try:
        ops.register_kernel("gemm", "triton")(lambda a, b: None)
        assert not ops._DEFAULT
    finally:
        if old is None:
            ops._KERNELS.pop(key, None)
        else:
            ops._KERNELS[key] = old
        ops._DEFAULT.clear()
    assert ops.select_backend("gemm", cpu) == default


def test_triton_on_cpu_is_asked_at_every_call(gen, monkeypatch):
    if ops.backend_status("gemm", "triton", torch.device("cpu")) is not None:
        pytest.skip(ops.backend_status("gemm", "triton", torch.device("cpu")))
    args = sample_args("gemm", gen, m=2, n=8, k=16)
    with fk.use_backend("triton"):
        torch.ops.fastkern.gemm(*args)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(fk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            torch.ops.fastkern.gemm(*args)


def _python_path_calls(monkeypatch, op):
    """A list that gets one entry per call of ``op`` that goes through the Python path."""
    calls = []
    real = ops._IMPLS[op]
    monkeypatch.setitem(ops._IMPLS, op, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.skipif(fk._ext._C is None, reason="fastkern._C is not built")
@pytest.mark.parametrize("op", list(ops.OPS))
def test_cpu_entry_takes_what_the_fast_check_accepts(gen, op, monkeypatch):
    # The C++ CPU kernel of the public op runs the native kernel itself exactly when the
    # Python fast check would accept the arguments (and no other backend is asked for);
    # everything else, every mutation the check refuses, goes through the Python path
    # (ops._IMPLS), which raises its messages as before.
    spec = ops.OPS[op]
    calls = _python_path_calls(monkeypatch, op)
    explains = [n for n in dir(ops) if n.startswith("_explain_")]

    class Refused(Exception):
        pass

    def fast_check_accepts(args):
        with monkeypatch.context() as m:
            for n in explains:
                m.setattr(ops, n, lambda *a: (_ for _ in ()).throw(Refused()))
            try:
                spec.check(*args)
                return True
            except Refused:
                return False

    taken = refused = 0
    for base in _valid_variants(op, gen):
        for args in [base] + list(_mutations(base)):
            if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                continue
            accepts = fast_check_accepts(args)
            calls.clear()
            try:
                out = getattr(torch.ops.fastkern, op)(*args)
            except (TypeError, ValueError, RuntimeError):
                out = None
            assert (not calls) == accepts, describe_args(args)
            if accepts:
                taken += 1
                assert torch.equal(out, getattr(torch.ops.fastkern_C, op)(*args)), describe_args(args)
            else:
                refused += 1
    assert taken >= 5 and refused >= 10, (taken, refused)


@pytest.mark.skipif(fk._ext._C is None, reason="fastkern._C is not built")
def test_cpu_entry_honours_every_backend_request(gen, monkeypatch):
    # use_backend and FASTKERN_BACKEND (set, emptied, or in a replaced os.environ) send the call
    # through the Python path unless they name "cpu"; an unknown name still raises there.
    args = sample_args("linear_w8a8", gen)
    calls = _python_path_calls(monkeypatch, "linear_w8a8")

    def through_python(ctx=None):
        calls.clear()
        with ctx if ctx is not None else contextlib.nullcontext():
            out = torch.ops.fastkern.linear_w8a8(*args)
        return bool(calls), out

    native = torch.ops.fastkern_C.linear_w8a8(*args)
    ref = ops.linear_w8a8_ref(*args)
    used, out = through_python()
    assert not used and torch.equal(out, native)
    used, out = through_python(fk.use_backend("reference"))
    assert used and torch.equal(out, ref)
    used, out = through_python(fk.use_backend("cpu"))
    assert not used and torch.equal(out, native)
    monkeypatch.setenv("FASTKERN_BACKEND", "reference")
    used, out = through_python()
    assert used and torch.equal(out, ref)
    used, _ = through_python(fk.use_backend("cpu"))  # the context wins over the environment
    assert not used
    monkeypatch.setenv("FASTKERN_BACKEND", "cpu")
    assert not through_python()[0]
    monkeypatch.setenv("FASTKERN_BACKEND", "")
    assert not through_python()[0]
    monkeypatch.setenv("FASTKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        torch.ops.fastkern.linear_w8a8(*args)
    monkeypatch.delenv("FASTKERN_BACKEND")
    monkeypatch.setattr(os, "environ", {"FASTKERN_BACKEND": "reference"})
    used, out = through_python()
    assert used and torch.equal(out, ref)
