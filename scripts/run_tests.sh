#!/usr/bin/env bash
# Run the test suite in .venv. Without a CUDA GPU the Triton kernels run in the interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1) and GPU-only tests skip with a stated reason.
#
# Beside it, the suite once more on the GPU image's torch 2.11 + Triton 3.6 (scripts/run_gpu_stack_tests.sh:
# a second venv under .cache/, the extension built against torch 2.11). The two run at the same time:
# each is one Python process that keeps one core busy (the interpreter), and CI machines have two, so
# together they take the longer one's time, not the sum (measured: two copies of a test file at once
# took 52 s each, one alone 55 s). The stack's output goes to .cache/gpu-stack.log and is printed
# after the main suite's. That venv takes 5.2 GB and 7.2 GB at the peak of its install; on a machine
# with less free disk (CI machines can have less) the stack script exits 75 and, in its place beside the main
# suite, the lighter rerun it replaced runs: the Triton kernel tests under Triton 3.6 from a `pip install
# --target` (under 1 GB), still catching Triton API and compiler differences. GPU_STACK=0 (or the older
# TRITON_COMPAT=0) skips both; GPU_STACK_SERIAL=1 runs the stack after the main suite instead.
# After the main suite, the Triton kernels' smoke under a newer Triton, 3.9 (scripts/run_next_triton_tests.sh,
# 5-6 min; NEXT_TRITON=0 skips it, and GPU_STACK=0 or test arguments skip it with the stack).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1

stack=0
[ "${GPU_STACK:-${TRITON_COMPAT:-1}}" != "0" ] && [ $# -eq 0 ] && stack=1
LOG=.cache/gpu-stack.log

# The Triton kernel tests under Triton 3.6 from a `pip install --target` (under 1 GB), torch from $VENV: what the
# stack chain runs where the stack's venv does not fit on the disk.
triton36_rerun() {
  local t36=${TRITON_COMPAT_DIR:-.cache/triton-3.6.0}
  if [ ! -f "$t36/.complete" ]; then
    rm -rf "$t36"
    "$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check --no-deps --target "$t36" \
      "triton==3.6.0" "numpy==2.3.5" || return
    touch "$t36/.complete"
  fi
  echo "=== run_tests: Triton kernel tests under $(PYTHONPATH="$t36" "$VENV/bin/python" -c \
    'import triton, numpy; print("triton", triton.__version__, "numpy", numpy.__version__)') (torch from $VENV)"
  PYTHONPATH="$t36" LORA_KERNELS_EXPECT_TRITON=3.6.0 "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/test_lora_linear.py tests/test_single_pass.py
}
# The stack's suite, or where it steps aside (75: no disk for its venv, said in its output) the Triton 3.6 rerun at
# once, in the same chain: run after the main suite, as it was, it kept one core idle for the main suite's hour and
# then ran alone for 25 more minutes (bench/NOTES.md, session 49). Its exit code: the stack's, else the rerun's.
stack_chain() {
  local rc=0
  bash scripts/run_gpu_stack_tests.sh || rc=$?
  [ "$rc" -eq 75 ] || return "$rc"
  echo "=== run_tests: the GPU-stack suite stepped aside (exit 75); the Triton kernel tests under Triton 3.6 instead"
  triton36_rerun
}

pid=
if [ "$stack" = 1 ] && [ "${GPU_STACK_SERIAL:-0}" != "1" ]; then
  mkdir -p .cache
  echo "=== run_tests: the GPU-stack suite runs beside this one; its output: $LOG (printed at the end)"
  # Launched with job control on (set -m), as a job in a process group of its own ($! is its id), so
  # that Ctrl-C or a CI timeout on this script stops the whole run (pytest's children, pip and ninja)
  # with one kill. Without job control bash would start it with SIGINT and SIGQUIT ignored, and its
  # tests would inherit that (one that interrupts a child hung so); with it, they keep their defaults.
  set -m
  stack_chain > "$LOG" 2>&1 &
  pid=$!
  set +m
  trap 'kill -- -"$pid" 2>/dev/null; exit 130' INT TERM
fi

main_rc=0
"$VENV/bin/python" -m pytest -q -ra --durations=15 tests "$@" || main_rc=$?
# When each part ended, in seconds since this script began (bash's SECONDS): which of the two chains, the main
# suite then the next Triton's smoke or the stack's suite, decides CI's time (bench/NOTES.md, session 48).
echo "=== run_tests: the main suite ended at ${SECONDS} s (exit $main_rc)"
[ "$stack" = 1 ] || exit "$main_rc"

# The kernels' smoke under the newest Triton (scripts/run_next_triton_tests.sh), on the core the main suite
# freed; its 75 (no disk) said why and ran nothing. Its failure counts after the main suite's and the stack's.
next_rc=0
bash scripts/run_next_triton_tests.sh || next_rc=$?
echo "=== run_tests: the next Triton's smoke ended at ${SECONDS} s (exit $next_rc)"
[ "$next_rc" -eq 75 ] && next_rc=0

rc=0
if [ -n "$pid" ]; then
  wait "$pid" || rc=$?
  trap - INT TERM
  echo "=== run_tests: the GPU-stack suite (exit $rc), from $LOG (its own times: 'gpu-stack: ... at N s')"
  cat "$LOG"
else
  stack_chain || rc=$?
fi
[ "$main_rc" -ne 0 ] && exit "$main_rc"
[ "$rc" -ne 0 ] && exit "$rc"
exit "$next_rc"
