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
case "$(echo "${LORA_KERNELS_SKIP_CUDA_BUILD:-0}" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')" in  # as setup.py reads it
1 | true | yes | on)
  echo "build_wheels: LORA_KERNELS_SKIP_CUDA_BUILD=$LORA_KERNELS_SKIP_CUDA_BUILD: this script builds the CUDA wheel" >&2
  exit 1
  ;;
esac

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
whl=$(ls -t "$OUT"/lora_kernels-*"+${LORA_KERNELS_LOCAL_VERSION}"-*.whl | head -1)
# The extension and its metadata must be inside (setup.py's FORCE makes a missing _C fail, this checks the result).
"$PY" - "$whl" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
missing = [what for what, ok in (("lora_kernels/_C*.so", any(n.startswith("lora_kernels/_C") and n.endswith(".so") for n in names)),
                                 ("lora_kernels/_build_info.py", "lora_kernels/_build_info.py" in names)) if not ok]
if missing:
    sys.exit(f"build_wheels: {sys.argv[1]} lacks {', '.join(missing)}")
PYEOF
ls -l "$whl"
