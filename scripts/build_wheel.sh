#!/usr/bin/env bash
# Builds a fastkern wheel with the CUDA kernels for the given archs, then checks
# it: cuobjdump must find a cubin for every requested arch in fastkern/_C*.so,
# and the wheel's metadata must pin the torch it was built against.
#
#   scripts/build_wheel.sh ["8.0;8.6;8.9;9.0a"]
#
# Needs, in $PYTHON's environment, a CUDA build of torch (pip's default torch)
# plus setuptools, wheel, ninja and pybind11; and a CUDA toolkit whose major
# version matches torch.version.cuda. No GPU is needed. CUDA_HOME must be the
# toolkit's own folder (bin/nvcc, lib64/): torch guesses wrong when nvcc is
# reached through a link elsewhere on PATH, so the script resolves it.
# The build runs in a scratch copy of the package's files (tracked and
# untracked-but-not-ignored ones), so it never touches an in-place CPU build;
# the wheel lands in $OUT_DIR.
#
# Env: PYTHON (default python3), CUDA_HOME (default: the toolkit of the nvcc on
#      PATH, as nvcc itself reports it, else /usr/local/cuda), OUT_DIR (default dist/), MAX_JOBS
#      (default: setup.py's, from free memory), CUOBJDUMP (default: the
#      toolkit's, else the nvidia-cuda-cuobjdump pip package's, else PATH),
#      KEEP_BUILD=1 keeps the scratch copy (and prints where it is).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCHS=${1:-${TORCH_CUDA_ARCH_LIST:-"8.0;8.6;8.9;9.0a"}}
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-$ROOT/dist}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

die() { echo "build_wheel: $*" >&2; exit 1; }

if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME=/usr/local/cuda
  if command -v nvcc >/dev/null; then
    # the nvcc on PATH may be a link or a wrapper script elsewhere: ask it
    top=$(cd /tmp && nvcc -v --dryrun -c fastkern_probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    [[ -n "$top" ]] && CUDA_HOME=$top
  fi
fi
CUDA_HOME=$(readlink -f "$CUDA_HOME")
[[ -x "$CUDA_HOME/bin/nvcc" && -f "$CUDA_HOME/include/cuda_runtime.h" ]] \
  || die "$CUDA_HOME is not a CUDA toolkit folder (bin/nvcc, include/): set CUDA_HOME to it"
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p')

TORCH_VERSION=$("$PYTHON" - "$NVCC_VERSION" <<'PY'
import sys
try:
    import torch
except ImportError:
    sys.exit("no torch in %s: install pip's default (CUDA) torch" % sys.executable)
if not torch.version.cuda:
    sys.exit("torch %s in %s is a CPU build: the CUDA kernels need a CUDA build of torch "
             "(pip's default torch)" % (torch.__version__, sys.executable))
nvcc = sys.argv[1]
if nvcc and nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
    sys.exit("nvcc is CUDA %s but torch %s was built with CUDA %s: use a toolkit of the same "
             "major version" % (nvcc, torch.__version__, torch.version.cuda))
print(torch.__version__)
PY
) || die "unusable torch (see above)"

# ATen's CUDA headers include cusparse.h / cublas_v2.h, which a pip CUDA torch
# ships in its nvidia-* packages rather than the toolkit has: expose them.
NV_INC=$("$PYTHON" - <<'PY'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "*", "include")))
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)
export CPLUS_INCLUDE_PATH="${NV_INC}${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"

find_cuobjdump() {
  if [[ -n "${CUOBJDUMP:-}" ]]; then echo "$CUOBJDUMP"; return; fi
  if [[ -x "$CUDA_HOME/bin/cuobjdump" ]]; then echo "$CUDA_HOME/bin/cuobjdump"; return; fi
  "$PYTHON" - <<'PY' && return
import glob, os, site, sys
for sp in site.getsitepackages():
    for p in sorted(glob.glob(os.path.join(sp, "nvidia", "**", "bin", "cuobjdump"), recursive=True)):
        if os.access(p, os.X_OK):
            print(p); sys.exit(0)
sys.exit(1)
PY
  command -v cuobjdump || true
}
CUOBJ=$(find_cuobjdump)
[[ -n "$CUOBJ" ]] || die "no cuobjdump: use a full CUDA toolkit or \`pip install nvidia-cuda-cuobjdump\`"

WORK=$(mktemp -d /tmp/fastkern-wheel.XXXXXX)
if [[ "${KEEP_BUILD:-0}" == 1 ]]; then
  echo "build_wheel: scratch copy kept in $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
# what a checkout would build: the tracked and untracked-but-not-ignored files
# of the paths that go into the wheel (never a venv or a build folder), that
# exist (a file deleted in the work tree is skipped)
(
  cd "$ROOT"
  git ls-files -co --exclude-standard -z -- setup.py pyproject.toml README.md MANIFEST.in LICENSE \
      csrc fastkern | while IFS= read -r -d '' f; do
    [[ -f "$f" ]] && printf '%s\0' "$f"
  done | xargs -0 cp --parents -t "$WORK"
) || die "could not copy the source tree (is $ROOT a git checkout?)"

echo "build_wheel: archs '$ARCHS', torch $TORCH_VERSION, $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
echo "build_wheel: CUDA_HOME=$CUDA_HOME MAX_JOBS=${MAX_JOBS:-auto} cuobjdump=$CUOBJ"
start=$SECONDS
(
  cd "$WORK"
  export CUDA_HOME FASTKERN_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" PATH="$CUDA_HOME/bin:$PATH"
  # --no-build-isolation: compile against the torch installed here, which the
  # wheel then pins (setup.py), never against a freshly downloaded one
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check -v \
    -w "$WORK/dist" . >"$WORK/build.log" 2>&1 \
    || { tail -n 80 "$WORK/build.log" >&2; die "build failed (log above; KEEP_BUILD=1 keeps $WORK/build.log)"; }
)
elapsed=$((SECONDS - start))
WHEEL=$(ls "$WORK"/dist/fastkern-*.whl 2>/dev/null | head -1)
[[ -f "$WHEEL" ]] || die "no wheel produced"
grep -i "spill" "$WORK/build.log" | sed 's/^ *//' | sort | uniq -c | sed 's/^/  /' || true
echo "build_wheel: built $(basename "$WHEEL") in ${elapsed} s"

# every requested arch must have its cubin in the extension
UNPACK="$WORK/unpacked"
mkdir -p "$UNPACK"
"$PYTHON" -m zipfile -e "$WHEEL" "$UNPACK"
SO=$(ls "$UNPACK"/fastkern/_C*.so 2>/dev/null | head -1)
[[ -f "$SO" ]] || die "the wheel has no fastkern/_C*.so"
ELFS=$("$CUOBJ" --list-elf "$SO") || die "cuobjdump --list-elf failed on $(basename "$SO")"
echo "$ELFS" | sed 's/^/  /'
missing=()
IFS=';' read -ra arch_list <<<"${ARCHS// /;}"
for a in "${arch_list[@]}"; do
  [[ -z "$a" ]] && continue
  a=${a%+PTX}
  sm="sm_${a/./}"
  grep -q "\.${sm}\.cubin" <<<"$ELFS" || missing+=("$sm")
done
(( ${#missing[@]} == 0 )) || die "cubins missing from $(basename "$SO"): ${missing[*]}"

# the binary is tied to the torch it was compiled against: the metadata must say so
PIN=$(grep -i '^Requires-Dist: torch' "$UNPACK"/fastkern-*.dist-info/METADATA || true)
[[ "$PIN" == "Requires-Dist: torch==${TORCH_VERSION%%+*}" ]] \
  || die "wheel metadata pins '${PIN:-nothing}', expected torch==${TORCH_VERSION%%+*}"

cp "$WHEEL" "$OUT_DIR/"
echo "build_wheel: OK: cubins for ${ARCHS} in $(basename "$SO"), ${PIN#Requires-Dist: } pinned;" \
  "wheel: $OUT_DIR/$(basename "$WHEEL")"
