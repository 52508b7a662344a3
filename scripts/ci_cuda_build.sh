#!/usr/bin/env bash
# CI step: build and LINK fastkern's CUDA kernels on a machine without a GPU, so
# that a CUDA compile or link error never lands (issue 5, DESIGN §7).
#
#   1. a separate venv with a CUDA build of torch (pip's default torch, ~5.5 GB)
#      and cuobjdump (the nvidia-cuda-cuobjdump package);
#   2. scripts/build_wheel.sh for $ARCHS: the wheel, a cubin per arch (cuobjdump),
#      the torch pin in its metadata;
#   3. the wheel installed in that venv and imported from outside the source tree
#      without a GPU: `python -m fastkern info` must list the archs, and every op
#      of the catalogue must have a kernel registered for the CUDA dispatch key;
#   4. when a CPU-torch venv is given (CPU_PYTHON, default $VENV/bin/python), the
#      same wheel imported under that other torch must fail with a message that
#      names both torch versions.
#
# Env: VENV_CUDA (default .venv-cuda), TORCH_CUDA_SPEC (default torch==2.14.1),
#      ARCHS (default "8.0;9.0a"), CUDA_HOME (default: build_wheel.sh's),
#      MAX_JOBS (default 2), CPU_PYTHON (default $VENV/bin/python if it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV_CUDA=${VENV_CUDA:-.venv-cuda}
TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}
ARCHS=${ARCHS:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-2}
CPU_PYTHON=${CPU_PYTHON:-${VENV:-.venv}/bin/python}
start=$SECONDS
say() { echo "ci_cuda_build: $* (after $((SECONDS - start)) s)"; }

if [[ ! -x "$VENV_CUDA/bin/python" ]]; then
  python3 -m venv "$VENV_CUDA"
fi
# git (and anything that copies untracked files, build_wheel.sh included) must
# never pick up the 5.5 GB venv
[[ -f "$VENV_CUDA/.gitignore" ]] || echo '*' >"$VENV_CUDA/.gitignore"
PY="$ROOT/$VENV_CUDA/bin/python"
[[ "$VENV_CUDA" = /* ]] && PY="$VENV_CUDA/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja pybind11 numpy "$TORCH_CUDA_SPEC"
# cuobjdump for build_wheel.sh's cubin check: CI's toolkit (nvcc only) has none
"$PY" -m pip install -q --disable-pip-version-check nvidia-cuda-cuobjdump
say "CUDA venv ready ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"

DIST=$(mktemp -d /tmp/fastkern-ci-dist.XXXXXX)
CHECK=$(mktemp -d /tmp/fastkern-ci-import.XXXXXX)
trap 'rm -rf "$DIST" "$CHECK"' EXIT
PYTHON="$PY" OUT_DIR="$DIST" bash scripts/build_wheel.sh "$ARCHS"
WHEEL=$(ls "$DIST"/fastkern-*.whl)
say "wheel built and checked"

"$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"
# from an empty folder, so that `import fastkern` is the installed wheel, not the source tree
(
  cd "$CHECK"
  "$PY" -m fastkern info | tee info.txt
  want="CUDA kernels: archs $(echo "$ARCHS" | sed 's/;/, /g')"
  grep -qxF "$want" info.txt || { echo "ci_cuda_build: 'python -m fastkern info' does not say '$want'" >&2; exit 1; }
  "$PY" - "$ARCHS" <<'PY'
import sys
import torch
import fastkern
from fastkern import _ext, ops

assert _ext._C is not None, "fastkern._C did not load: %s" % _ext.LOAD_ERROR
assert fastkern.__file__.find("site-packages") >= 0, "imported %s, not the wheel" % fastkern.__file__
b = _ext._C.build_info()
assert b["with_cuda"] and b["cuda_archs"] == sys.argv[1], b
missing = [op for op in ops.OPS if not _ext.has_kernel(op, "CUDA")]
assert not missing, "no CUDA kernel registered for: %s" % missing
# the CPU kernels of this build (C++20 against this torch) against the reference
torch.manual_seed(0)
lin = torch.nn.Linear(256, 96)
x = torch.randn(3, 256)
for q in (fastkern.QLinear.from_linear(lin, weight_dtype="int4", group_size=64),
          fastkern.QLinear.from_linear(lin, weight_dtype="int8", act_dtype="int8")):
    y = q(x)
    with fastkern.use_backend("reference"):
        y_ref = q(x)
    err = ((y - y_ref).norm() / y_ref.norm()).item()
    assert err < 1e-5, "%r: cpu backend differs from the reference (rel. error %g)" % (q, err)
print("ci_cuda_build: fastkern._C (torch %s, archs %s) imports without a GPU (cuda available: %s); "
      "CUDA kernels registered for %d ops" % (b["torch_version"], b["cuda_archs"],
                                              torch.cuda.is_available(), len(ops.OPS)))
PY
)
say "wheel imports under its own torch"

if [[ -n "$CPU_PYTHON" && -x "$CPU_PYTHON" ]]; then
  # the wheel's files under another torch: the import must fail and say why
  "$PY" -m zipfile -e "$WHEEL" "$CHECK/other"
  other=$("$CPU_PYTHON" -c 'import torch; print(torch.__version__)')
  built=$("$PY" -c 'import torch; print(torch.__version__)')
  if [[ "$other" != "$built" ]]; then
    CPU_PYTHON="$(cd "$(dirname "$CPU_PYTHON")" && pwd)/$(basename "$CPU_PYTHON")"  # absolute, links kept
    if msg=$(cd "$CHECK" && PYTHONPATH="$CHECK/other" "$CPU_PYTHON" -c "import fastkern" 2>&1); then
      echo "ci_cuda_build: the wheel built for torch $built imported under torch $other without an error" >&2
      exit 1
    fi
    echo "$msg" | tail -n 1
    if ! { grep -qF "${built%%+*}" <<<"$msg" && grep -qF "$other" <<<"$msg"; }; then
      echo "ci_cuda_build: importing the wheel under torch $other fails without naming both torch versions" >&2
      exit 1
    fi
    say "under torch $other the import fails with a clear message"
  fi
fi
say "OK"
