#!/usr/bin/env bash
# Create/refresh the project virtualenv and install lora_kernels into it (editable), building the
# CUDA extension when a CUDA toolkit is found. Used by `make test`, `make demo` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-ci.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements-axolotl.txt
CUDA_HOME=$(bash scripts/find_cuda_home.sh)
if [ -n "$CUDA_HOME" ]; then
  export CUDA_HOME
  # The archs come from LORA_KERNELS_CUDA_ARCHS (default 80;90); setup.py sets TORCH_CUDA_ARCH_LIST
  # to match, only so that torch's own check does not guess without a GPU.
  echo "setup_env: CUDA_HOME=$CUDA_HOME LORA_KERNELS_CUDA_ARCHS=${LORA_KERNELS_CUDA_ARCHS:-80;90 (default)}"
else
  echo "setup_env: no CUDA toolkit found: installing without the CUDA extension"
fi
export MAX_JOBS=${MAX_JOBS:-2}
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
