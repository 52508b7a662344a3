"""Time the Triton kernels against their GPU peers for the issue-4 targets (DESIGN §6).

    python -m fastkern.triton.gpu_bench [--json PATH] [--quick]

Every row is timed in this run, on this GPU, next to its peer, with
``triton.testing.do_bench`` (median; it clears L2 before each repetition, so
memory-bound rows read HBM). The first call of each kernel tunes it (excluded
from the timing) and stores the choice in the autotune cache. Needs a CUDA GPU.
"""
import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F


def _bench(fn):
    import triton.testing

    fn()  # compile / tune outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _peer(fn):
    """A peer's time, or None (with the reason on stderr) when this torch cannot run it."""
    try:
        return _bench(fn)
    except Exception as e:
        print("peer failed: %s" % str(e).splitlines()[0], file=sys.stderr)
        return None


def read_bandwidth():
    """GB/s of a streaming read (a sum over 2 GiB), the ceiling for weight-bound rows."""
    x = torch.empty(2**30, dtype=torch.float16, device="cuda").uniform_()
    ms = _bench(lambda: x.sum(dtype=torch.float32))
    return x.numel() * 2 / ms / 1e6


def _int4_peer(w_f, group_size):
    """torch._weight_int4pack_mm on the same weight (bf16 activations), or None if this torch lacks it."""
    try:
        n, k = w_f.shape
        g = w_f.float().reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        zero = lo + scale * 8  # torch's int4 convention: w = (q - 8) * scale + zero
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return lambda x: torch._weight_int4pack_mm(x, packed, group_size, sz)
    except Exception as e:  # API differs across torch versions: report, do not guess
        print("torch int4 peer unavailable: %s" % e, file=sys.stderr)
        return None


def run(quick=False):
    import fastkern as fk
    from fastkern import formats

    assert torch.cuda.is_available(), "gpu_bench needs a CUDA GPU"
    dev = "cuda"
    rows = []
    bw = read_bandwidth()

    def add(name, shape, ms, peer=None, peer_ms=None, nbytes=None, flops=None):
        row = dict(name=name, shape=shape, ms=ms, peer=peer, peer_ms=peer_ms,
                   speedup=(peer_ms / ms) if peer_ms else None)
        if nbytes:
            row["GB/s"] = nbytes / ms / 1e6
            row["%bw"] = 100 * row["GB/s"] / bw
        if flops:
            row["TFLOP/s"] = flops / ms / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)

    def triton(fn):
        def call():
            with fk.use_backend("triton"):
                return fn()
        return call

    # dense fp16 GEMM vs cuBLAS
    for m, n, k in ([(4096, 8192, 8192)] if quick else [(4096, 8192, 8192), (8192, 8192, 8192), (1024, 4096, 4096)]):
        a = torch.randn(m, k, device=dev, dtype=torch.float16)
        b = torch.randn(n, k, device=dev, dtype=torch.float16)
        add("gemm fp16", (m, n, k), _bench(triton(lambda: fk.ops.gemm(a, b))), "cuBLAS F.linear",
            _bench(lambda: F.linear(a, b)), flops=2 * m * n * k)

    # W4A16 vs cuBLAS fp16 and torch int4 (bf16)
    n = k = 8192
    w = torch.randn(n, k, device=dev) * 0.02
    p, s, z = formats.quantize_int4(w, 128)
    w16 = w.half()
    peer4 = _int4_peer(w, 128)
    for m in ([1, 16] if quick else [1, 16, 32, 64]):
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        ms = _bench(triton(lambda: fk.ops.linear_w4a16(x, p, s, z, 128, None)))
        nbytes = p.numel() + s.numel() * 4 + z.numel() + x.numel() * 2 + m * n * 2
        add("w4a16 g128", (m, n, k), ms, "cuBLAS fp16", _bench(lambda: F.linear(x, w16)), nbytes=nbytes)
        if peer4 is not None:
            xb = x.bfloat16()
            add("w4a16 g128", (m, n, k), ms, "torch int4 (bf16)", _peer(lambda: peer4(xb)), nbytes=nbytes)

    # W8A8 (quantize + int8 GEMM) vs torch._int_mm (int8 operands ready) and cuBLAS bf16
    m = 4096
    q, ws = formats.quantize_int8(w)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xq = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    int_mm = _peer(lambda: torch._int_mm(xq, q.t()))
    add("w8a8 (incl. quantize)", (m, n, k), _bench(triton(lambda: fk.ops.linear_w8a8(x, q, ws, None))),
        "torch._int_mm", int_mm, flops=2 * m * n * k)
    add("int8_gemm", (m, n, k), _bench(triton(lambda: fk.ops.int8_gemm(xq, q))), "torch._int_mm", int_mm,
        flops=2 * m * n * k)
    wb = w.bfloat16()
    add("w8a8 (incl. quantize)", (m, n, k), _bench(triton(lambda: fk.ops.linear_w8a8(x, q, ws, None))),
        "cuBLAS bf16", _bench(lambda: F.linear(x, wb)), flops=2 * m * n * k)

    # 2:4 fp16 vs dense cuBLAS and cuSPARSELt
    v, meta = formats.compress_2_4(w16)
    dense24 = formats.decompress_2_4(v, meta)
    try:
        from torch.sparse import to_sparse_semi_structured

        w_ss = to_sparse_semi_structured(dense24)
    except Exception as e:
        print("cuSPARSELt peer unavailable: %s" % e, file=sys.stderr)
        w_ss = None
    for m in ([4096] if quick else [16, 256, 4096, 8192]):
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        ms = _bench(triton(lambda: fk.ops.linear_sparse24(x, v, meta, None)))
        add("sparse24 fp16", (m, n, k), ms, "cuBLAS dense fp16", _bench(lambda: F.linear(x, dense24)))
        if w_ss is not None:
            add("sparse24 fp16", (m, n, k), ms, "cuSPARSELt", _peer(lambda: F.linear(x, w_ss)))
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), read_GBps=bw, rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="one shape per target")
    opts = p.parse_args(argv)
    res = run(opts.quick)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
