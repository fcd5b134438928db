#!/usr/bin/env bash
# The Triton kernels' smoke run under the newest Triton on PyPI, newer than the one the main venv's torch
# pins (torch 2.14.1: Triton 3.8; the GPU image: 3.6): scripts/run_tests.sh runs it after the main suite.
# Triton changes its interpreter and the launch internals lora_kernels' launch cache mirrors from release to
# release: 3.9's interpreter refuses a load mask made from a broadcast scalar bool, which 3.6 and 3.8 took, and
# its JITFunction.run folds one more knob into the compile options (bench/NOTES.md, session 46). Triton from a
# `pip install --target` (about 1 GB, no deps), torch and the rest from the venv. What runs: every backend
# path once end to end in the interpreter (tests/test_bench_dry.py), the single-pass kernels and the launch
# cache against that Triton's binder, launcher and knobs (tests/test_fast_launch.py). Not the sm_90 register
# and spill checks: those hold the tiles to the CI's Triton and the GPU image's (3.9 spills 8-24 bytes in
# some of them, NOTES). NEXT_TRITON=0 skips it; NEXT_TRITON=x.y.z picks the version. Exit 75 (nothing run)
# where the disk has less than NEXT_TRITON_MIN_FREE_GB free.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=${NEXT_TRITON:-3.9.0}
if [ "$VERSION" = "0" ]; then
  echo "=== next Triton: not run (NEXT_TRITON=0)"
  exit 0
fi
DIR=${NEXT_TRITON_DIR:-.cache/triton-$VERSION}
if [ ! -f "$DIR/.complete" ]; then
  need=${NEXT_TRITON_MIN_FREE_GB:-2}
  mkdir -p .cache
  free=$(df -Pk .cache | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free" -lt "$need" ]; then
    echo "=== next Triton: not run: installing triton $VERSION needs $need GB free, .cache has $free GB"
    exit 75
  fi
  rm -rf "$DIR"
  "$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check --no-deps --target "$DIR" \
    "triton==$VERSION"
  touch "$DIR/.complete"
fi
echo "=== next Triton: kernel smoke under $(PYTHONPATH="$DIR" "$VENV/bin/python" -c \
  'import triton, numpy; print("triton", triton.__version__, "numpy", numpy.__version__)') (torch from $VENV)"
PYTHONPATH="$DIR" LORA_KERNELS_EXPECT_TRITON="$VERSION" HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -ra \
  -p no:cacheprovider -W ignore::DeprecationWarning tests/test_bench_dry.py tests/test_single_pass.py \
  tests/test_fast_launch.py
