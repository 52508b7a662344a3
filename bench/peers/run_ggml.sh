#!/usr/bin/env bash
# Build ggml (CPU backend only) if needed, build bench/peers/ggml_mulmat.c against it, and run it.
#
#   bench/peers/run_ggml.sh [--isa avx2|native] GGML_SRC BUILD_DIR [ggml_mulmat options...]
#
#   --isa avx2    (default) GGML_NATIVE=OFF, SSE4.2/AVX/AVX2/FMA/F16C/BMI2 on, every AVX-512,
#                 AVX-VNNI and AMX option off: the "AVX2 target machine" of DESIGN.md section 6.
#   --isa native  GGML_NATIVE=ON (-march=native).
#   GGML_SRC      a checkout of https://github.com/ggml-org/ggml (outside this repository).
#   BUILD_DIR     its build directory (outside this repository); configured on first use with the
#                 flags above, rebuilt with ninja every time (a no-op when up to date).
#   options       passed to ggml_mulmat (--types, --shapes, --m, --layouts, --json, ...; see
#                 bench/peers/README.md). Default: Q4_0, Q4_K, Q8_0 on the four Llama shapes,
#                 M = 1 and 16, plain and repacked weights, 2 threads.
#
# Builds run under the shared CPU lock and ggml_mulmat takes the exclusive lock itself for its
# timing phase (FK_LOCK, default /tmp/fk-cpu.lock; FK_LOCK= runs without locks).
set -euo pipefail

isa=avx2
if [[ "${1:-}" == "--isa" ]]; then isa="$2"; shift 2; fi
if [[ $# -lt 2 ]]; then sed -n '2,20p' "$0"; exit 2; fi
src="$(realpath "$1")"; build="$(realpath -m "$2")"; shift 2
here="$(cd "$(dirname "$0")" && pwd)"
lock="${FK_LOCK-/tmp/fk-cpu.lock}"
shared() { if [[ -n "$lock" ]]; then flock -s "$lock" "$@"; else "$@"; fi; }

case "$isa" in
  avx2)   isa_flags=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
                     -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
          cflags=(-mavx2 -mfma -mf16c) ;;
  native) isa_flags=(-DGGML_NATIVE=ON); cflags=(-march=native) ;;
  *) echo "run_ggml.sh: --isa takes avx2 or native, got '$isa'" >&2; exit 2 ;;
esac

if [[ ! -f "$src/include/ggml.h" ]]; then
  echo "run_ggml.sh: $src/include/ggml.h not found: GGML_SRC must be a ggml checkout" >&2; exit 2
fi
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  # CPU backend only; llama.cpp's defaults for the CPU kernels (llamafile sgemm and weight
  # repacking on, OpenMP threads); no BLAS, no GPU backend, nothing fetched from the network.
  shared cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CPU=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_OPENCL=OFF \
    -DGGML_OPENMP=ON -DGGML_LLAMAFILE=ON -DGGML_CPU_REPACK=ON -DGGML_CCACHE=OFF \
    -DGGML_BUILD_TESTS=ON -DGGML_BUILD_EXAMPLES=OFF "${isa_flags[@]}" >/dev/null
fi
shared ninja -C "$build" -j2 ggml test-backend-ops >/dev/null
exe="$build/ggml_mulmat"
if [[ ! -x "$exe" || "$here/ggml_mulmat.c" -nt "$exe" || "$build/src/libggml-cpu.so" -nt "$exe" ]]; then
  shared gcc -O2 -fopenmp "${cflags[@]}" -Wall -Wextra -I"$src/include" "$here/ggml_mulmat.c" -o "$exe" \
    -L"$build/src" -lggml -lggml-cpu -lggml-base -Wl,-rpath,"$build/src" -lm
fi
echo "# ggml $(git -C "$src" rev-parse --short=8 HEAD 2>/dev/null || echo '?') build $build (--isa $isa), $(date -u +%Y-%m-%dT%H:%M:%SZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
lockopt=(); [[ -n "$lock" ]] && lockopt=(--lock "$lock")
# ggml's repack buffer prints one line per repacked tensor on stderr: keep the rest of stderr
"$exe" "${lockopt[@]}" "$@" 2> >(grep -v '^repack: repack tensor' >&2)
