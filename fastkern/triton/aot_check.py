"""Compile every fastkern Triton kernel for a CUDA arch without a GPU.

    python -m fastkern.triton.aot_check [--arch 90] [--all-candidates] [--only LABEL]

The interpreter (how CI tests the kernels on CPU) never lowers them to PTX, so
anything only the GPU compiler rejects (tile shapes tl.dot cannot take, an int8
MMA with too short a K, shared memory past the limit) would first show on a GPU.
Triton's wheel ships ptxas, so the full pipeline down to a cubin runs here; this
prints, per kernel and config, the registers, spills and shared memory, and checks
that the tensor-core instructions expected for the arch are in the PTX.
Nothing here is timed: it says a kernel compiles, not that it is fast.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    # the kernels must be JIT functions, not the interpreter's stand-ins
    sys.exit("aot_check: unset TRITON_INTERPRET first (kernels are built as interpreter functions)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastkern.triton import _common as C  # noqa: E402
from fastkern.triton import _w4a8 as A8  # noqa: E402
from fastkern.triton import _weightonly as W  # noqa: E402
from fastkern.triton import gemm as G  # noqa: E402
from fastkern.triton import int8 as I8  # noqa: E402
from fastkern.triton import sparse as S  # noqa: E402

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8",
        torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}
_LAUNCH = ("num_warps", "num_stages")


def compile_kernel(fn, args, consts, arch):
    """Compile ``fn`` with pointer dtypes / ints in ``args`` and constexprs + launch options in ``consts``."""
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            cx[name] = consts[name]
            continue
        v = args[name]
        if isinstance(v, torch.dtype):
            sig[name] = _PTR[v]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif v == 1:  # the JIT specializes ints equal to 1 (unit strides) into constants
            sig[name] = "constexpr"
            cx[name] = 1
        else:
            sig[name] = "i32"
            if v and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    opts = triton.compiler.make_backend(target).parse_options({k: consts[k] for k in _LAUNCH if k in consts})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                          target=target, options=opts.__dict__)


def resources(kernel):
    """(registers, spill bytes) from the cubin, via the cuobjdump in Triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1)


def _tiled_args(a, b, c, scale=torch.float32):
    return dict(a_ptr=a, b_ptr=b, c_ptr=c, row_scale_ptr=scale, col_scale_ptr=scale, bias_ptr=c,
                M=4096, N=8192, K=8192, stride_am=8192, stride_ak=1, stride_bn=8192, stride_bk=1,
                stride_cm=8192, stride_cn=1)


def _wo_args(x, bits, m):
    k = 8192
    return dict(x_ptr=x, w_ptr=torch.int8 if bits == 8 else torch.uint8, s_ptr=torch.float32,
                z_ptr=torch.uint8, bias_ptr=x, part_ptr=torch.float32, out_ptr=x,
                M=m, N=8192, K=k, K_PER_SPLIT=k // 2,
                stride_xm=k, stride_xk=1, stride_wn=k * bits // 8, stride_wk=1,
                stride_sn=k // 128, stride_sg=1, stride_zn=k // 128, stride_zg=1, stride_om=8192, stride_on=1)


def jobs(all_candidates=False):
    """(label, kernel, args, constexprs, expected PTX instruction) for every kernel and config."""
    f16, bf16, f32, i8 = torch.float16, torch.bfloat16, torch.float32, torch.int8
    out = []
    big = (4096, 8192, 8192)

    def tiled(kind, dtype, tag, flags):
        key = (big[0], big[1], big[2], kind, tag)
        cfgs = G._candidates(key) if all_candidates else [G._default(key)]
        a = i8 if kind == "int8" else dtype
        c = (torch.int32 if not flags["ROW_SCALE"] else dtype) if kind == "int8" else dtype
        for cfg in cfgs:
            consts = dict(flags, **cfg, **C.dot_args(dtype if kind != "int8" else f16))
            out.append(("%s %s" % (tag or kind, cfg), G._tiled_kernel, _tiled_args(a, a, c), consts,
                        "mma" if kind != "fp32" else None))

    plain = dict(ACC_INT=False, ROW_SCALE=False, COL_SCALE=False, HAS_BIAS=False)
    tiled("half", f16, "gemm-fp16", plain)
    tiled("half", bf16, "gemm-bf16", plain)
    tiled("fp32", f32, "gemm-fp32", plain)
    tiled("int8", f16, "int8_gemm", dict(plain, ACC_INT=True))
    tiled("int8", f16, "w8a8", dict(ACC_INT=True, ROW_SCALE=True, COL_SCALE=True, HAS_BIAS=True))

    for bits in (4, 8):
        for m in (1, 16):
            key = (m, 8192, 8192, bits, 128 if bits == 4 else 1, "fp16")
            cfgs = W._gemv_candidates(key) if all_candidates else [W._gemv_default(key)]
            for cfg in cfgs:
                cfg = dict(cfg)
                split = cfg.pop("SPLIT_K")
                consts = dict(BITS=bits, GROUP=128 if bits == 4 else 1, DIRECT=split == 1, HAS_BIAS=True,
                              BLOCK_M=1 if m == 1 else 16, **C.dot_args(f16), **cfg)
                out.append(("w%da16 gemv M=%d %s split=%d" % (bits, m, cfg, split), W._gemv_splitk_kernel,
                            _wo_args(f16, bits, m), consts, None if m == 1 else "mma"))
        key = (4096, 8192, 8192, bits, 128, "fp16")
        for cfg in (W._gemm_candidates(key) if all_candidates else [W._gemm_default(key)]):
            consts = dict(BITS=bits, GROUP=128 if bits == 4 else 1, HAS_BIAS=True, **C.dot_args(f16), **cfg)
            args = _wo_args(f16, bits, 4096)
            del args["part_ptr"], args["K_PER_SPLIT"]
            out.append(("w%da16 gemm %s" % (bits, cfg), W._gemm_kernel, args, consts, "mma"))

    for m in (1, 16, 4096):
        key = (m, 8192, 8192, 128, "float16")
        for cfg in (A8._candidates(key) if all_candidates else [A8._default(key)]):
            args = dict(q_ptr=i8, tok_scale_ptr=f32, w_ptr=torch.uint8, s_ptr=f32, z_ptr=torch.uint8, bias_ptr=f16,
                        out_ptr=f16, M=m, N=8192, K=8192, stride_qm=8192, stride_qk=1, stride_wn=4096, stride_wk=1,
                        stride_sn=64, stride_sg=1, stride_zn=64, stride_zg=1, stride_om=8192, stride_on=1)
            out.append(("w4a8 M=%d %s" % (m, cfg), A8._w4a8_kernel, args,
                        dict(GROUP=128, SUB=min(128, cfg["BLOCK_K"]), HAS_BIAS=True, **cfg), "mma"))

    key = (4096, 8192, 8192, "torch.float16")
    for cfg in (S._s24_candidates(key) if all_candidates else [S._s24_default(key)]):
        args = dict(x_ptr=f16, v_ptr=f16, meta_ptr=torch.uint8, bias_ptr=f16, out_ptr=f16, M=4096, N=8192, K=8192,
                    stride_xm=8192, stride_xk=1, stride_vn=4096, stride_vk=1, stride_mn=2048, stride_mg=1,
                    stride_om=8192, stride_on=1)
        out.append(("sparse24 %s" % cfg, S._sparse24_kernel, args, dict(HAS_BIAS=True, **C.dot_args(f16), **cfg),
                    "mma"))
    key = (4096, 8192, 8192, 32, 32, "torch.float16")
    for cfg in (S._bs_candidates(key) if all_candidates else [S._bs_default(key)]):
        args = dict(x_ptr=f16, blk_ptr=f16, row_ptr_ptr=torch.int64, col_idx_ptr=torch.int64, bias_ptr=f16,
                    out_ptr=f16, bad_ptr=torch.int8, count_ptr=torch.int32,
                    M=4096, N=8192, K=8192, BN=32, BK=32, N_SUB=1, KB=256, stride_xm=8192, stride_xk=1,
                    stride_b0=1024, stride_b1=32, stride_b2=1, stride_om=8192, stride_on=1)
        out.append(("blocksparse %s" % cfg, S._blocksparse_kernel, args,
                    dict(HAS_BIAS=True, TILE_N=32, TILE_K=32, **C.dot_args(f16), **cfg), "mma"))

    out.append(("nonfinite_blocks bk=32", S._nonfinite_blocks_kernel,
                dict(x_ptr=f16, bad_ptr=torch.int8, count_ptr=torch.int32, K=8192, BK=32, KB=256,
                     stride_xm=8192, stride_xk=1), dict(BLOCK_C=64, BK_P=32), None))
    for rows, bk in ((1, 4096), (16, 256)):
        args = dict(x_ptr=f16, q_ptr=torch.int8, s_ptr=f32, M=4096, K=8192, stride_xm=8192, stride_xk=1, stride_qm=8192)
        out.append(("quantize rows=%d BLOCK_K=%d" % (rows, bk), I8._quantize_rows_kernel, args,
                    dict(ROWS=rows, BLOCK_K=bk), "div.rn.f32"))
    out.append(("splitk_reduce", C._splitk_reduce_kernel,
                dict(part_ptr=f32, bias_ptr=f16, out_ptr=f16, M=1, N=8192, SPLIT_K=4, stride_om=8192, stride_on=1),
                dict(HAS_BIAS=True, BLOCK=1024), None))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    p.add_argument("--all-candidates", action="store_true", help="every autotune candidate, not just defaults")
    p.add_argument("--only", action="append", help="compile only jobs whose label contains this (repeatable)")
    opts = p.parse_args(argv)
    failures = 0
    for arch in opts.arch or [80, 90]:
        for label, fn, args, consts, expect in jobs(opts.all_candidates):
            if opts.only and not any(o in label for o in opts.only):
                continue
            try:
                k = compile_kernel(fn, args, consts, arch)
            except Exception as e:  # report and go on: one bad config should not hide the others
                failures += 1
                print("FAIL sm_%d %-22s %s: %s" % (arch, fn.__name__, label, str(e).splitlines()[0][:200]), flush=True)
                continue
            regs, stack = resources(k)
            ptx = k.asm["ptx"]
            ok = expect is None or expect in ptx
            if arch >= 90 and expect == "mma":
                ok = "wgmma" in ptx or "mma" in ptx
            failures += not ok
            print("%s sm_%d %-22s regs=%3d stack=%4d smem=%6d  %s%s" % (
                "ok  " if ok else "FAIL", arch, fn.__name__, regs, stack, k.metadata.shared, label,
                "" if ok else "  (no %s in the PTX)" % expect), flush=True)
    print("%d failure(s)" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
