#!/usr/bin/env bash
# The GPU checks in one call, for a machine with an NVIDIA GPU (see
# bench/results/cuda_gpu_todo.md and triton_gpu_todo.md):
#   1. build fastkern._C with the CUDA kernels for this GPU's arch, in place
#   2. tests/test_cuda.py: every CUDA kernel against its reference
#   3. tests/test_triton.py -m cuda: the Triton kernels compiled for the GPU
#   4. the harness on the GPU (cuda and triton backends against cuBLAS,
#      torch._int_mm, torch int4, cuSPARSELt) at the DESIGN §6 shapes
#   5. compute-sanitizer (memcheck, racecheck) on a subset of the CUDA tests
# Each step is bounded so the whole script ends within GPU_CHECK_SECONDS
# (default 540); logs and results go to $OUT (default /tmp/fastkern-gpu).
# Wheels in .whl/ (e.g. expecttest, which opcheck imports) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastkern-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-540}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
# seconds for a step: at most $1, and never past the budget (less a margin)
slot() { local left=$(( budget - $(elapsed) - 10 )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'sm', torch.cuda.get_device_capability())"
# the toolkit behind nvcc, even behind a wrapper script
export CUDA_HOME=${CUDA_HOME:-$(cd /tmp && nvcc -v --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p')}
# A compiler whose libstdc++ differs from the system's one that torch loads can link
# its own copy of the C++ runtime into the extension (seen on the H200 image with
# /opt/gcc's gcc-toolset: formatting an error message then segfaults; setup.py now
# refuses such a build, fastkern/_elf.py). Prefer the system compiler;
# GPU_CHECK_KEEP_CXX=1 keeps the environment's.
if [ -z "${GPU_CHECK_KEEP_CXX:-}" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
echo "== CXX=${CXX:-c++} CC=${CC:-cc}"
arch=${ARCH:-$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print('%d.%d%s' % (a, b, 'a' if a == 9 else ''))")}
echo "== CUDA_HOME=$CUDA_HOME arch=$arch"

FASTKERN_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    timeout "$(slot 300)" $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?
grep -E "spill|registers" "$OUT/build.log" | head -5
if (( rc != 0 )); then tail -60 "$OUT/build.log"; echo "== build failed (rc $rc) after $(elapsed) s"; exit 1; fi
echo "== built after $(elapsed) s"
$PY -m fastkern info

workers=${WORKERS:-8}
echo "== test_cuda.py"
timeout "$(slot ${CUDA_TEST_SECONDS:-170})" $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -n "$workers" \
    --maxfail=60 -rfE --tb=short --durations=10 >"$OUT/test_cuda.log" 2>&1
echo "rc $?"; grep -E "passed|failed|error" "$OUT/test_cuda.log" | tail -3
grep -E "^FAILED|^ERROR" "$OUT/test_cuda.log" | head -40
echo "== after $(elapsed) s"

echo "== test_triton.py -m cuda"
TRITON_INTERPRET=0 FASTKERN_TRITON_AUTOTUNE=0 FASTKERN_TRITON_CACHE=/tmp/fk_autotune.json \
    timeout "$(slot ${TRITON_TEST_SECONDS:-120})" $PY -m pytest tests/test_triton.py -m cuda -q -p no:cacheprovider \
    -n "$workers" -k "not every_candidate" --maxfail=40 -rfE --tb=short --durations=10 >"$OUT/test_triton.log" 2>&1
echo "rc $?"; grep -E "passed|failed|error" "$OUT/test_triton.log" | tail -3
grep -E "^FAILED|^ERROR" "$OUT/test_triton.log" | head -30
echo "== after $(elapsed) s"

echo "== harness"
TRITON_INTERPRET=0 FASTKERN_TRITON_AUTOTUNE=${FASTKERN_TRITON_AUTOTUNE:-0} \
    timeout "$(slot ${BENCH_SECONDS:-150})" $PY -m fastkern.bench --device cuda --no-progress --plain \
    --ops ${BENCH_OPS:-gemm,linear_w4a16,linear_w4a8,linear_w8a8,int8_gemm,linear_sparse24} --dtypes fp16 \
    --shapes ${BENCH_SHAPES:-8192x8192} --m ${BENCH_M:-1,16,64,4096} \
    --json "$OUT/bench-cuda.json" --txt "$OUT/bench-cuda.txt" >"$OUT/bench.log" 2>&1
echo "rc $?"; cat "$OUT/bench-cuda.txt" 2>/dev/null || tail -30 "$OUT/bench.log"
echo "== after $(elapsed) s"

echo "== compute-sanitizer"
for tool in memcheck racecheck; do
    s=$(slot 60); (( s > 20 )) || break
    timeout "$s" compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest tests/test_cuda.py -q -x \
        -p no:cacheprovider -k "float16 and [17- and 2d and not large" >>"$OUT/sanitizer.log" 2>&1
    echo "$tool rc $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -2
done
echo "== done after $(elapsed) s"
