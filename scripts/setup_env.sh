#!/usr/bin/env bash
# Create/refresh the project virtualenv and install lora_kernels into it (editable), building the
# CUDA extension when a CUDA toolkit is found. Used by `make test`, `make demo` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-ci.txt
CUDA_HOME=$(bash scripts/find_cuda_home.sh)
if [ -n "$CUDA_HOME" ]; then
  export CUDA_HOME
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
  echo "setup_env: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
else
  echo "setup_env: no CUDA toolkit found: installing without the CUDA extension"
fi
export MAX_JOBS=${MAX_JOBS:-2}
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
