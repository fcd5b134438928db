#!/usr/bin/env bash
# The test suite once more on the GPU device image's software: torch 2.11 (CUDA 13.0 build) and
# Triton 3.6, where .venv has torch 2.14 and Triton 3.8. Run by scripts/run_tests.sh after the main
# suite (GPU_STACK=0 skips it). It shows, without spending scarce GPU time, that
#   - the CUDA extension compiles and links against torch 2.11's headers (for sm_90, as the device
#     builds it) and imports with matching build metadata;
#   - the Triton kernels run in 3.6's interpreter and compile for sm_90 with 3.6's compiler;
#   - the torch.library ops, opcheck, torch.compile, PEFT and verify work with torch 2.11's APIs.
# GPU_STACK_BUILD_ONLY=1 stops after the build (scripts/device_prebuild.sh).
# A separate venv (.cache/venv-gpu-stack) and a copy of the tracked sources (.cache/gpu-stack-src):
# building there leaves the checkout's own extension (built for .venv's torch) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SVENV=${GPU_STACK_VENV:-.cache/venv-gpu-stack}
SRC=${GPU_STACK_SRC:-.cache/gpu-stack-src}
REQ=requirements-gpu-stack.txt

# The image runs Python 3.12: use it where this machine has one (on PATH, or a pyenv version that
# is installed but not selected), else python3.
BASE_PY=${GPU_STACK_PYTHON:-}
if [ -z "$BASE_PY" ]; then
  for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 python3; do
    if "$c" -c 'import venv' >/dev/null 2>&1; then BASE_PY=$c; break; fi
  done
fi
# (Re)create the venv when the requirements or the interpreter change.
stamp="$SVENV/.requirements"
want=$(cat "$REQ"; "$BASE_PY" -c 'import sys; print(sys.version)')
if [ "$want" != "$(cat "$stamp" 2>/dev/null)" ]; then
  rm -rf "$SVENV"
  # Measured (Python 3.12, --no-cache-dir): 5.2 GB installed, 7.2 GB at the install's peak (the
  # CUDA wheels unpack beside their archives). Too little disk: exit 75 (EX_TEMPFAIL), which
  # scripts/run_tests.sh answers with the lighter Triton-only rerun, rather than fail halfway.
  need_gb=${GPU_STACK_MIN_FREE_GB:-9}
  mkdir -p "$(dirname "$SVENV")"
  free_gb=$(df -Pk "$(dirname "$SVENV")" | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "=== gpu-stack: not run: ${free_gb} GB free on disk, the torch 2.11 venv needs ${need_gb} GB" \
      "(GPU_STACK_MIN_FREE_GB)"
    exit 75
  fi
  "$BASE_PY" -m venv "$SVENV"
  # No pip cache: it would hold a second copy of the ~3 GB of wheels.
  if ! "$SVENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check -r "$REQ"; then
    rm -rf "$SVENV"  # give the disk back: a half-installed venv helps nobody
    exit 1
  fi
  echo "$want" > "$stamp"
fi
echo "=== gpu-stack: venv ready at ${SECONDS} s"
PY=$ROOT/$SVENV/bin/python
[[ $SVENV = /* ]] && PY=$SVENV/bin/python

# The tracked files of the working tree (uncommitted edits included), over the previous copy:
# unchanged files keep their mtimes, so ninja recompiles only what changed.
mkdir -p "$SRC"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$SRC"
else
  tar --exclude=./.cache --exclude=./.venv --exclude=./build -cf - . | tar -xf - -C "$SRC"
fi
cd "$SRC"

echo "=== gpu-stack: $("$PY" -c 'import sys, torch, triton, numpy; print("python", sys.version.split()[0],
"torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)')"
CUDA_HOME=$(bash scripts/find_cuda_home.sh)
if [ -n "$CUDA_HOME" ]; then
  export CUDA_HOME
  # The device builds for the H100 only (scripts/gpu_check.sh); half the compile time of 80;90.
  export LORA_KERNELS_CUDA_ARCHS=${GPU_STACK_ARCHS:-90}
  export TORCH_CUDA_ARCH_LIST=9.0
  echo "=== gpu-stack: building the extension against torch 2.11 (sm_$LORA_KERNELS_CUDA_ARCHS)"
else
  echo "=== gpu-stack: no CUDA toolkit found: installing without the CUDA extension"
fi
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
# scripts/device_prebuild.sh wants the binary only (it is in $SRC/lora_kernels now).
[ "${GPU_STACK_BUILD_ONLY:-0}" = "1" ] && exit 0
echo "=== gpu-stack: installed (extension built) at ${SECONDS} s"

# The wheel test repeats the link step only; the JIT build test compiles the sources the build above
# just compiled against this torch (a minute more, through the same flags); the emulation harness is
# plain C++ (no torch); the CPU build of lora_ops.cpp (test_cuda_ops_emulation) checks the host code's
# logic, and lora_ops.cpp was compiled against this torch by the extension build above: all four ran
# in the main suite.
# The fuzz tests replay the main suite's derandomized examples: here the first 30 of its 60, under Triton 3.6 and
# torch 2.11 (LORA_KERNELS_FUZZ_EXAMPLES; the stack's fuzz took 6 min of its 55 with 60).
rc=0
LORA_KERNELS_EXPECT_TRITON=3.6.0 LORA_KERNELS_EXPECT_TORCH=2.11.0 LORA_KERNELS_TEST_WHEEL=0 \
  LORA_KERNELS_TEST_JIT=0 HF_HUB_OFFLINE=1 LORA_KERNELS_FUZZ_EXAMPLES=${LORA_KERNELS_FUZZ_EXAMPLES:-30} \
  "$PY" -m pytest -q -ra -p no:cacheprovider -W ignore::DeprecationWarning \
  --ignore=tests/test_cuda_emulation.py --ignore=tests/test_cuda_ops_emulation.py tests "$@" || rc=$?
echo "=== gpu-stack: the suite ended at ${SECONDS} s (exit $rc)"
exit "$rc"
