#!/usr/bin/env bash
# Cheap CI check of the CUDA kernels without torch: compiles every
# csrc/cuda/*.cu (they include CUDA headers only, see csrc/cuda/kernels.h) for
# sm_80 and sm_90a with the flags setup.py uses, and fails on any compile error.
# Register spills reported by ptxas are listed, not fatal.
#
#   CUDA_HOME=/usr/local/cuda-13.0 scripts/check_cuda_compile.sh
# Env: CUDA_HOME (default /usr/local/cuda), ARCHS (default "80 90a"), JOBS (default 2),
#      CXX_STD (default -std=c++17).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC="$CUDA_HOME/bin/nvcc"
ARCHS=${ARCHS:-"80 90a"}
JOBS=${JOBS:-2}
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda_compile: no nvcc at $NVCC (set CUDA_HOME to the toolkit folder with bin/nvcc)" >&2
  exit 2
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# setup.py builds with C++17 against torch <= 2.13 and C++20 against torch >= 2.14
# (its headers demand it); the kernels include no torch header and must compile
# under both. The torch-linked build (scripts/ci_cuda_build.sh) covers C++20.
STD=${CXX_STD:--std=c++17}
gencode=()
for a in $ARCHS; do
  gencode+=(-gencode "arch=compute_${a},code=sm_${a}")
done
echo "nvcc: $("$NVCC" --version | tail -1)"
echo "archs: $ARCHS, $STD"
status=0
compile() {
  local src=$1 base
  base=$(basename "$src" .cu)
  local start=$SECONDS
  # the same nvcc flags setup.py passes (minus torch's include folders)
  if "$NVCC" "$STD" -O3 --expt-relaxed-constexpr -lineinfo -Icsrc \
      -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -Xptxas -warn-spills "${gencode[@]}" -c "$src" -o "$OUT/$base.o" >"$OUT/$base.log" 2>&1; then
    echo "ok    $src ($((SECONDS - start)) s)"
    grep -i "spill\|warning" "$OUT/$base.log" | sort | uniq -c | sed 's/^/      /' || true
  else
    echo "FAIL  $src" >&2
    cat "$OUT/$base.log" >&2
    return 1
  fi
}
srcs=(csrc/cuda/*.cu)
if [[ ${#srcs[@]} -eq 0 || ! -e ${srcs[0]} ]]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi
pids=()
running=0
for src in "${srcs[@]}"; do
  compile "$src" &
  pids+=($!)
  running=$((running + 1))
  if (( running >= JOBS )); then
    wait -n || status=1
    running=$((running - 1))
  fi
done
while (( running > 0 )); do
  wait -n || status=1
  running=$((running - 1))
done
if [[ $status -ne 0 ]]; then
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
echo "check_cuda_compile: all ${#srcs[@]} files compile for: $ARCHS"
