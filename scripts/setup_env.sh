#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv with torch and fastkern's
# dependencies, and builds fastkern with its native extension into it.
#   VENV=path      where the environment lives (default .venv)
#   TORCH_SPEC=..  the torch requirement (default torch==2.13.0)
#   FASTKERN_CUDA  see setup.py (default: CUDA kernels only with a GPU and a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja pybind11 numpy "$TORCH_SPEC"
# --no-build-isolation: the extension must be compiled against the torch installed above
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench,triton,model]"
"$PY" -m fastkern info
