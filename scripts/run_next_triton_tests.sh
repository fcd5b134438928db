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
# some of them, NOTES). Split in as many processes as cores (below). NEXT_TRITON=0 skips it;
# NEXT_TRITON=x.y.z picks the version. Exit 75 (nothing run) where the disk has less than NEXT_TRITON_MIN_FREE_GB
# free.
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
FILES=(tests/test_bench_dry.py tests/test_single_pass.py tests/test_fast_launch.py)
smoke() {
  PYTHONPATH="$DIR" LORA_KERNELS_EXPECT_TRITON="$VERSION" HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -ra \
    -p no:cacheprovider -W ignore::DeprecationWarning "${FILES[@]}" "$@"
}
# As many processes as cores (at most 4), each running every N-th test (tests/conftest.py's --shard): the smoke
# runs after the main suite, and on CI it is the last thing left, so run as one process it kept one core busy and
# left the other idle for its whole 9 minutes (bench/NOTES.md, session 49). Split by file it was no better than
# its longest file. Each shard's output goes to a log, printed in order when all have ended. Started with job
# control on (set -m), as run_tests.sh starts the stack: each in a process group of its own, with SIGINT and
# SIGQUIT at their defaults (bash ignores them in a background command without it), and killed with its
# children on Ctrl-C or a TERM to this script. NEXT_TRITON_JOBS=N: N processes.
jobs=${NEXT_TRITON_JOBS:-$(nproc)}
[ "$jobs" -gt 4 ] && [ -z "${NEXT_TRITON_JOBS:-}" ] && jobs=4
if [ "$jobs" -le 1 ]; then
  smoke
  exit
fi
mkdir -p .cache
pids=()
trap 'for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null; done; exit 130' INT TERM
set -m
for ((i = 0; i < jobs; i++)); do
  smoke --shard "$i/$jobs" > ".cache/next-triton-shard-$i.log" 2>&1 &
  pids+=("$!")
done
set +m
rc=0
for ((i = 0; i < jobs; i++)); do
  part=0
  wait "${pids[$i]}" || part=$?
  echo "=== next Triton: shard $i/$jobs (exit $part)"
  cat ".cache/next-triton-shard-$i.log"
  [ "$rc" -eq 0 ] && rc=$part
done
exit "$rc"
