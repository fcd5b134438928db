#!/usr/bin/env bash
# Build a lora_kernels wheel (with the CUDA extension) for the torch + CUDA installed in $VENV,
# tagged with a local version such as 0.1.0+cu130torch2.14. Usage:
#   scripts/build_wheels.sh [OUT_DIR]          (default dist/)
# Honours LORA_KERNELS_CUDA_ARCHS (default "80;90"), MAX_JOBS, NVCC_THREADS, CUDA_HOME.
# The build runs against the installed torch (--no-build-isolation): a wheel only works with the
# torch release and CUDA major version it was built with (checked at import, see build_info.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
OUT=${1:-dist}

CUDA_HOME=${CUDA_HOME:-$(bash scripts/find_cuda_home.sh)}
if [ -z "$CUDA_HOME" ]; then
  echo "build_wheels: no CUDA toolkit found (set CUDA_HOME): a wheel without the extension is pointless" >&2
  exit 1
fi
export CUDA_HOME
export LORA_KERNELS_FORCE_BUILD=1  # a wheel without _C must not be produced silently

read -r TORCH_TAG CUDA_TAG < <("$PY" - <<'PYEOF'
import torch
v = torch.__version__.split("+")[0].split(".")
cuda = torch.version.cuda
if cuda is None:
    raise SystemExit("build_wheels: torch is a CPU-only build")
print(f"torch{v[0]}.{v[1]}", "cu" + cuda.replace(".", ""))
PYEOF
)
export LORA_KERNELS_LOCAL_VERSION=${LORA_KERNELS_LOCAL_VERSION:-${CUDA_TAG}${TORCH_TAG}}
ARCHS=${LORA_KERNELS_CUDA_ARCHS:-80;90}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(echo "$ARCHS" | sed -E 's/([0-9])([0-9])/\1.\2/g; s/9\.0/9.0a/')}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "build_wheels: version +$LORA_KERNELS_LOCAL_VERSION, archs $ARCHS, CUDA_HOME=$CUDA_HOME, MAX_JOBS=$MAX_JOBS"
mkdir -p "$OUT"
"$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" .
ls -l "$OUT"/lora_kernels-*"+${LORA_KERNELS_LOCAL_VERSION}"-*.whl
