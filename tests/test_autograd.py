"""Gradients through the public ops and the modules (fastkern/ops.py "autograd").

Each op's gradients are checked against autograd through its reference on the same inputs:
grad_x = grad_y @ W, and the weight-side floats (weight scales, 2:4 values, blocks) and the
bias through the reference's own dequantization. linear_w8a8 passes grad_x straight through
its per-token rounding of x, so its expected gradients are those of linear_w8a16's reference
(the same weight, x unrounded)."""
import warnings

import pytest
import torch

import fastkern
from fastkern import formats, ops

from conftest import assert_close_rel, backends_for

LINEAR_OPS = ["linear_w8a16", "linear_w8a8", "linear_w4a16", "linear_w4a8", "linear_sparse24", "linear_blocksparse",
              "gemm"]
N, K = 24, 64


def op_backend_params():
    return [pytest.param(op, p.values[0], marks=p.marks, id="%s-%s" % (op, p.values[0]))
            for op in LINEAR_OPS for p in backends_for(op)]


def make_args(op, gen, dtype, lead=(3,)):
    """The op's arguments (x first); the float tensors among them require grad."""
    x = torch.randn(*lead, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen)
    if op in ("linear_w8a16", "linear_w8a8"):
        q, s = formats.quantize_int8(w)
        args = [x, q, s, b]
    elif op in ("linear_w4a16", "linear_w4a8"):
        q, s, z = formats.quantize_int4(w, 16)
        args = [x, q, s, z, 16, b]
    elif op == "linear_sparse24":
        values, meta = formats.compress_2_4(w)
        args = [x, values.to(dtype), meta, b]
    elif op == "linear_blocksparse":
        blocks, row_ptr, col_idx = formats.dense_to_blocksparse(w, (8, 16), formats.prune_blocks(w, (8, 16), 0.5))
        args = [x, blocks.to(dtype), row_ptr, col_idx, N, b]
    else:
        args = [x, w.to(dtype)]
    return [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def reference_grads(op, args, grad_y):
    # the int8-activation ops pass grad_x straight through their rounding of x: the gradients of
    # their weight-only counterparts
    ref = {"linear_w8a8": ops.linear_w8a16_ref, "linear_w4a8": ops.linear_w4a16_ref}.get(op, ops.OPS[op].reference)
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]
    y = ref(*leaves)
    y.backward(grad_y)
    return y, [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,backend", op_backend_params())
def test_grads_as_reference(op, backend, dtype, gen):
    args = make_args(op, gen, dtype, lead=(2, 3))
    with fastkern.use_backend(backend):
        y = getattr(ops, op)(*args)
    assert y.requires_grad and y.grad_fn is not None
    grad_y = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(grad_y)
    _, expected = reference_grads(op, args, grad_y)
    checked = 0
    for i, (a, e) in enumerate(zip(args, expected)):
        if e is None:
            continue
        assert a.grad is not None, "argument %d of %s got no gradient" % (i, op)
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape
        assert_close_rel(a.grad, e, dtype)
        checked += 1
    # x and the bias (a and b for gemm), plus the weight-side floats where the format has them
    assert checked == (2 if op == "gemm" else 3)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("op", LINEAR_OPS)
def test_grad_of_x_only(op, chunked, gen, monkeypatch):
    """Only x requires grad (frozen quantized weights, as in adapter fine-tuning): grad_x alone,
    within the contract, and no gradient computed for anything else. chunked: the dense weight
    built a few rows at a time (5 rows of 64, the last chunk 4), as for a large layer."""
    if chunked:
        monkeypatch.setattr(ops, "_GRAD_CHUNK_ELEMS", 5 * K)
    args = make_args(op, gen, torch.float32)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    args[0].requires_grad_()
    y = getattr(ops, op)(*args)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    _, expected = reference_grads(op, args, grad_y)
    assert_close_rel(args[0].grad, expected[0], torch.float32)
    assert all(a.grad is None for a in args[1:] if isinstance(a, torch.Tensor))


@pytest.mark.parametrize("op", LINEAR_OPS + ["int8_gemm"])
def test_no_graph_without_grad(op, gen):
    """Nothing requires grad, or grad mode is off: the result carries no graph (the call went
    below autograd in the native kernel), and no autograd warning is raised."""
    if op == "int8_gemm":
        a = torch.randint(-127, 128, (3, K), generator=gen, dtype=torch.int8)
        args = [a, torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)]
    else:
        args = make_args(op, gen, torch.float32)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    f = getattr(ops, op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = f(*plain)
        assert not y.requires_grad and y.grad_fn is None
        if op != "int8_gemm":
            with torch.no_grad():
                y2 = f(*args)
            assert not y2.requires_grad
            torch.testing.assert_close(y2, y, rtol=0, atol=0)


def test_second_derivative_is_an_error(gen):
    args = make_args("linear_w4a16", gen, torch.float32)
    y = ops.linear_w4a16(*args)
    (gx,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_opcheck_with_grad(op, gen):
    """torch.library.opcheck with inputs that require grad: the autograd registration, and
    AOT autograd tracing the backward (torch.compile's training path)."""
    args = make_args(op, gen, torch.float32)
    torch.library.opcheck(getattr(torch.ops.fastkern, op).default, tuple(args))


def test_adapter_training_through_quantized_modules(gen):
    """A trainable layer in front of frozen QLinear (int4, int8 W8A8) and SparseLinear (2:4,
    block) layers: the trainable weights' gradients match the reference backend's, on every
    batch shape, and a step of SGD lowers the loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(K, K),
        fastkern.QLinear.from_linear(torch.nn.Linear(K, K), weight_dtype="int4", group_size=16),
        torch.nn.GELU(),
        fastkern.QLinear.from_linear(torch.nn.Linear(K, K), weight_dtype="int8", act_dtype="int8"),
        fastkern.SparseLinear.from_linear(torch.nn.Linear(K, K), pattern="2:4"),
        fastkern.SparseLinear.from_linear(torch.nn.Linear(K, N), pattern="block", block_size=(8, 16), sparsity=0.5),
    )
    head = model[0]
    x = torch.randn(2, 5, K, generator=gen)
    target = torch.randn(2, 5, N, generator=gen)

    def grads(backend):
        head.zero_grad()
        with fastkern.use_backend(backend):
            loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        return loss.item(), head.weight.grad.clone(), head.bias.grad.clone()

    loss, gw, gb = grads("cpu")
    _, rw, rb = grads("reference")
    assert gw.abs().sum() > 0
    assert_close_rel(gw, rw, torch.float32, factor=10)  # W8A8's rounding of x differs in ties only
    assert_close_rel(gb, rb, torch.float32, factor=10)
    with torch.no_grad():
        head.weight -= 0.05 * gw
        head.bias -= 0.05 * gb
        assert torch.nn.functional.mse_loss(model(x), target).item() < loss


def test_blocksparse_blocks_past_k_on_the_reference_backend(gen):
    """A col_idx past K (which the native kernels refuse) is accepted by the reference, whose
    product drops those blocks: the gradients do the same instead of indexing past the weight."""
    args = make_args("linear_blocksparse", gen, torch.float32)
    col_idx = args[3].clone()
    col_idx[1] = K // 16 + 1
    args[3] = col_idx
    with fastkern.use_backend("reference"):
        y = ops.linear_blocksparse(*args)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    _, expected = reference_grads("linear_blocksparse", args, grad_y)
    for i in (0, 1, 5):
        assert_close_rel(args[i].grad, expected[i], torch.float32)


def test_grads_without_the_native_extension():
    """Without fastkern._C (an install that could not build it), a Python kernel on the
    Autograd key gives the same gradients, on the reference backend."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastkern._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        warnings.simplefilter("ignore")
        import torch
        from fastkern import _ext, formats, ops
        assert _ext._C is None
        q, s, z = formats.quantize_int4(torch.randn(8, 32), 16)
        x = torch.randn(3, 32, requires_grad=True)
        b = torch.randn(8, requires_grad=True)
        y = ops.linear_w4a16(x, q, s, z, 16, b)
        y.backward(torch.ones_like(y))
        x2 = x.detach().requires_grad_()
        b2 = b.detach().requires_grad_()
        ops.linear_w4a16_ref(x2, q, s, z, 16, b2).backward(torch.ones_like(y))
        assert torch.allclose(x.grad, x2.grad) and torch.allclose(b.grad, b2.grad)
        # W8A8: straight through the rounding of x, as with the native extension (autograd of
        # the reference alone would give zero)
        q8, s8 = formats.quantize_int8(torch.randn(8, 32))
        x3 = x.detach().requires_grad_()
        ops.linear_w8a8(x3, q8, s8, None).sum().backward()
        assert torch.allclose(x3.grad, (q8.float() * s8[:, None]).sum(0).expand(3, 32))
        with torch.no_grad():
            assert not ops.linear_w4a16(x, q, s, z, 16, b).requires_grad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
