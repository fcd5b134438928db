#!/usr/bin/env bash
# `make gpu-check`: on a CUDA machine with no package registry (the H100 device image), install
# lora_kernels from this checkout (building the CUDA extension when a toolkit is found), run the
# whole test suite (the GPU tests run there), then the quick benchmark. Every step runs even if an
# earlier one failed; a summary table is printed last and the exit status is non-zero if any failed.
#
# Environment:
#   VENV=path        use $VENV/bin/python instead of `python` from PATH (the device image has no venv)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (H100) to keep the extension build short
#   BENCH_OUT=dir    where the benchmark writes its CSV/PNG (default bench/results)
#   BENCH_ARGS="..." extra arguments for `python -m bench.lora_linear --quick`
#   PYTEST_ARGS="..." extra arguments for pytest
#   GPU_CHECK_TESTS="..."  test paths for the tests step (default: tests, the whole suite)
#   GPU_CHECK_STEPS=a,b,... which steps run, of install,environment,tests,bench (default: all four), so a
#                    time-limited device session can split the check over several commands (bench/NOTES.md)
#   GPU_CHECK_LOGS=dir  keep the per-step logs there (default: a temp dir)
#   GPU_CHECK_PROFILE=1  also run `python -m bench.profile` (Nsight Compute counters per kernel for the
#                    single-pass and two-launch rows at 8192×4096→4096, r = 16, p = 0.1) when ncu exists
#   STEP_TIMEOUT=s   stop a step after s seconds (default 0: no limit) so one hung step cannot eat a
#                    time-limited device session; a stopped step shows as "FAILED (exit 124)"
#   LORA_KERNELS_CUTLASS_DIR  CUTLASS headers (default third_party/cutlass when present: see
#                    scripts/vendor_cutlass.sh; the device image has no nvidia-cutlass package)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VENV:-}" ]; then
  PY="$VENV/bin/python"
elif command -v python >/dev/null 2>&1; then
  PY=python
else
  PY=python3
fi
CUDA_HOME=$(bash scripts/find_cuda_home.sh)
if [ -n "$CUDA_HOME" ]; then
  export CUDA_HOME
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# No package registry on the device image: CUTLASS headers carried in by scripts/vendor_cutlass.sh.
if [ -z "${LORA_KERNELS_CUTLASS_DIR:-}" ] && [ -f third_party/cutlass/include/cutlass/cutlass.h ]; then
  export LORA_KERNELS_CUTLASS_DIR="$PWD/third_party/cutlass"
fi
export HF_HUB_OFFLINE=1
LOG_DIR=${GPU_CHECK_LOGS:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$LOG_DIR"

STEPS=()
FAILED=0
WANT=",${GPU_CHECK_STEPS:-install,environment,tests,bench},"
want() { [[ $WANT == *",$1,"* ]]; }
# run_step NAME CMD...: run CMD with its output shown and logged; record status and duration.
run_step() {
  local name=$1
  shift
  echo "=== gpu-check: $name: $*"
  local start=$SECONDS
  if [ "${STEP_TIMEOUT:-0}" -gt 0 ]; then
    set -- timeout --kill-after=10 "$STEP_TIMEOUT" "$@"
  fi
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
    FAILED=1
  fi
  STEPS+=("| $name | $status | $((SECONDS - start)) s |")
  return "$rc"
}

echo "gpu-check: python=$($PY -c 'import sys; print(sys.executable)') CUDA_HOME=${CUDA_HOME:-none}" \
  "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} logs=$LOG_DIR"

# --no-index: there is no registry to ask; --no-build-isolation: build against the installed torch.
if want install && ! run_step install "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .; then
  # An image whose pip cannot build editable installs (e.g. an old setuptools without `wheel`) can
  # still build the extension in place; either way the checkout goes on PYTHONPATH so the
  # pure-Python/Triton parts are checked, and the failure stays in the summary.
  run_step build-inplace "$PY" setup.py build_ext --inplace
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
want environment && run_step environment "$PY" -c "
import torch, triton, lora_kernels
print('torch', torch.__version__, 'triton', triton.__version__, 'lora_kernels', lora_kernels.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU')
print('backends', lora_kernels.available_backends(dtype=torch.bfloat16))
"
# shellcheck disable=SC2086  # PYTEST_ARGS / BENCH_ARGS are word lists on purpose
want tests && run_step tests "$PY" -m pytest -q -ra ${GPU_CHECK_TESTS:-tests} ${PYTEST_ARGS:-}
# shellcheck disable=SC2086
want bench && run_step bench "$PY" -m bench.lora_linear --quick ${BENCH_OUT:+--out "$BENCH_OUT"} ${BENCH_ARGS:-}

if [ "${GPU_CHECK_PROFILE:-0}" = "1" ]; then
  if command -v "${NCU:-ncu}" >/dev/null 2>&1; then
    run_step profile "$PY" -m bench.profile --impls cublas,triton-bitmask,triton-1pass,cuda-bitmask,cuda-expand --shape 8192,4096,4096,16 -p 0.1
  else
    echo "=== gpu-check: profile skipped: ${NCU:-ncu} not found"
  fi
fi

if [ -f "$LOG_DIR/bench.log" ]; then
  echo
  echo "=== gpu-check: benchmark table (ratios to cuBLAS of the same run)"
  grep '^|' "$LOG_DIR/bench.log" || echo "(no table: see $LOG_DIR/bench.log)"
fi
if [ -f "$LOG_DIR/profile.log" ]; then
  echo
  echo "=== gpu-check: Nsight Compute counters per kernel"
  grep '^|' "$LOG_DIR/profile.log" || echo "(no table: see $LOG_DIR/profile.log)"
fi
echo
echo "=== gpu-check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), logs in $LOG_DIR)"
echo "| step | status | time |"
echo "|---|---|---|"
printf '%s\n' "${STEPS[@]}"
tail -n 1 "$LOG_DIR/tests.log" 2>/dev/null | sed 's/^/tests: /'
exit "$FAILED"
