#!/usr/bin/env bash
# `make gpu-check`: on a CUDA machine with no package registry (the H100/H200 device image), install
# lora_kernels from this checkout (building the CUDA extension when a toolkit is found, or taking the
# binary of scripts/device_prebuild.sh), run the test suite (the GPU tests run there), then the quick
# benchmark. Every step runs even if an earlier one failed; a summary table is printed last and the
# exit status is non-zero if any failed.
#
# `make gpu-check-short` (GPU_CHECK_PLAN=short) is the plan for a device session of 15 minutes in all:
# 6 minutes of one command (bench/NOTES.md, "Runbook"), so that a fixed rerun still fits.
#
# Environment:
#   VENV=path        use $VENV/bin/python instead of `python` from PATH (the device image has no venv)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (Hopper) to keep the extension build short
#   GPU_CHECK_STEPS=a,b,...  the steps, run in this order, of install, environment, verify, tests, bench,
#                    profile (default install,environment,tests,bench), so a time-limited device
#                    session can split the check over several commands
#   GPU_CHECK_PLAN=short  defaults for a 15-minute device session: install,environment,bench,tests,verify,
#                    a 360 s budget, a four-configuration benchmark on fixed tiles, the GPU test files
#   GPU_CHECK_BUDGET=s  wall-clock budget of the whole check: each step may run for what is left (less
#                    20 s for the summary), a step with under 20 s left is skipped, and pytest starts no
#                    test after its step's deadline (tests/conftest.py), so its summary still prints
#   STEP_TIMEOUT=s   stop any step after s seconds (default 0: no limit); GPU_CHECK_CAP_<STEP>=s caps one
#                    step (e.g. GPU_CHECK_CAP_BENCH=150). A stopped step shows as "FAILED (exit 124)"
#   GPU_CHECK_PREBUILT=dir  lora_kernels._C built elsewhere by scripts/device_prebuild.sh (default
#                    .device/prebuilt): installed instead of compiling when its Python tag and sources
#                    digest match and it imports; otherwise the normal build runs
#   BENCH_OUT=dir    where the benchmark writes its CSV/PNG (default bench/results)
#   BENCH_ARGS="..." arguments for `python -m bench.lora_linear` (default --quick)
#   VERIFY_ARGS="..." arguments for `python -m lora_kernels verify` (default: its whole sweep)
#   PYTEST_ARGS="..." extra arguments for pytest
#   GPU_CHECK_TESTS="..."  test paths for the tests step (default: tests, the whole suite)
#   GPU_CHECK_WORKERS=n  pytest-xdist workers when xdist is installed (default 8, 0: one process);
#                    the Triton compiles spread over the CPUs, the kernels share the GPU
#   GPU_CHECK_LOGS=dir  keep the per-step logs there (default: a temp dir)
#   GPU_CHECK_ARCHIVE=file.tar.gz  pack the logs into one file at the end (the device tool returns at
#                    most 8 files)
#   GPU_CHECK_PROFILE=1  also run the profile step: `python -m bench.profile` (Nsight Compute counters per
#                    kernel at 8192×4096→4096, r = 16, p = 0.1) when ncu exists
#   LORA_KERNELS_CUTLASS_DIR  CUTLASS headers (default third_party/cutlass when present: see
#                    scripts/vendor_cutlass.sh; the device image has no nvidia-cutlass package)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${GPU_CHECK_PLAN:-}" = "short" ]; then
  # The numbers first (their rel_err column already shows a wrong kernel), then the GPU tests, then a
  # small verify (its full sweep compiles ~80 kernel variants in one process: a later call).
  : "${GPU_CHECK_STEPS:=install,environment,bench,tests,verify}"
  : "${GPU_CHECK_BUDGET:=360}"
  : "${GPU_CHECK_CAP_BENCH:=140}"
  : "${GPU_CHECK_CAP_TESTS:=150}"
  : "${GPU_CHECK_CAP_VERIFY:=45}"
  # The headline configurations, every implementation that matters for issues 3 and 5, fixed tiles
  # (autotuning compiles every config: a later session measures it); --budget-s keeps the table.
  : "${BENCH_ARGS:=--m 8192 --shapes 4096x4096,4096x14336 --ranks 16 --dropout 0,0.1 --budget-s 120
    --impls cublas,naive,peft,triton-bitmask,triton-1pass,cuda-bitmask,cuda-expand}"
  : "${BENCH_AUTOTUNE:=0}"
  # The files whose tests run kernels on the GPU; the CPU-only files (extension build, emulation
  # harness, scripts) already pass in CI.
  : "${GPU_CHECK_TESTS:=tests/test_lora_linear.py tests/test_cuda_backend.py tests/test_single_pass.py
    tests/test_hostile.py tests/test_compile.py tests/test_verify.py tests/test_layer.py tests/test_peft.py}"
  # PEFT's default (bf16 base, fp32 adapters) at a real size (TMA path) and an odd one (pointer path).
  : "${VERIFY_ARGS:=--backend triton --backend cuda --dtype bf16+fp32a --only-shapes --shape 2048,4096,14336,16
    --shape 67,203,130,1 -p 0 -p 0.1 --mask-mode bitmask --no-progress}"
fi
BUDGET=${GPU_CHECK_BUDGET:-0}
START=$SECONDS

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
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LOG_DIR=${GPU_CHECK_LOGS:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$LOG_DIR"

STEPS=()
FAILED=0
# step_limit NAME: seconds NAME may run (0: unlimited), from STEP_TIMEOUT, GPU_CHECK_CAP_<NAME> and
# what is left of the budget; negative: no time left for it.
step_limit() {
  local cap_var="GPU_CHECK_CAP_${1^^}" limit=${STEP_TIMEOUT:-0} cap
  cap=${!cap_var:-0}
  if [ "$cap" -gt 0 ] && { [ "$limit" -eq 0 ] || [ "$cap" -lt "$limit" ]; }; then limit=$cap; fi
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - (SECONDS - START) - 20))
    [ "$left" -lt 20 ] && { echo -1; return; }
    if [ "$limit" -eq 0 ] || [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  echo "$limit"
}
# run_step NAME: run the function do_NAME with its output shown and logged, within its time limit
# (`timeout` runs it in a child bash: the do_* functions and their variables are exported below);
# record status and duration. STEP_DEADLINE (epoch seconds, 0: none) is for the step's own use.
run_step() {
  local name=$1 limit start=$SECONDS
  limit=$(step_limit "$name")
  if [ "$limit" -lt 0 ]; then
    echo "=== gpu-check: $name: skipped: the ${BUDGET} s budget is spent"
    STEPS+=("| $name | skipped (budget) | 0 s |")
    return 0
  fi
  echo "=== gpu-check: $name (limit ${limit} s, 0: none)"
  export STEP_DEADLINE=0
  if [ "$limit" -gt 0 ]; then
    STEP_DEADLINE=$(($(date +%s) + limit))
    timeout --kill-after=10 "$limit" bash -c "do_$name" 2>&1 | tee "$LOG_DIR/$name.log"
  else
    "do_$name" 2>&1 | tee "$LOG_DIR/$name.log"
  fi
  local rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
    FAILED=1
  fi
  STEPS+=("| $name | $status | $((SECONDS - start)) s |")
  return "$rc"
}

# A prebuilt binary is usable when it is for this Python, from these sources, and imports.
install_prebuilt() {
  local dir=${GPU_CHECK_PREBUILT:-.device/prebuilt} suffix so
  suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  so="$dir/_C$suffix"
  if [ ! -f "$so" ]; then
    echo "gpu-check: no prebuilt binary $so: building the extension here"
    return 1
  fi
  if [ "$(cat "$dir/SOURCES_DIGEST" 2>/dev/null)" != "$("$PY" lora_kernels/cuda_ops/_build.py digest)" ]; then
    echo "gpu-check: $so was built from other sources (csrc/ or the flags changed): building here"
    return 1
  fi
  cp "$so" "$dir/_build_info.py" lora_kernels/
  if ! "$PY" -c "from lora_kernels.cuda_ops import _ext; from lora_kernels import build_info
_ext.get_ext(build=False); print('gpu-check: prebuilt', build_info.format_info())"; then
    echo "gpu-check: the prebuilt binary does not load here: building the extension instead"
    rm -f "lora_kernels/_C$suffix" lora_kernels/_build_info.py
    return 1
  fi
  # The metadata and console script; without them the checkout still runs from PYTHONPATH (below).
  LORA_KERNELS_SKIP_CUDA_BUILD=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
    echo "gpu-check: WARNING: the editable install failed; running from the checkout (PYTHONPATH)"
}

do_install() {
  install_prebuilt && return 0
  # --no-index: there is no registry to ask; --no-build-isolation: build against the installed torch.
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . && return 0
  # An image whose pip cannot build editable installs (e.g. an old setuptools without `wheel`) can
  # still build the extension in place; the checkout goes on PYTHONPATH (below) either way.
  echo "gpu-check: editable install failed: building the extension in place"
  "$PY" setup.py build_ext --inplace
}

do_tests() {
  local workers=${GPU_CHECK_WORKERS:-8} opts=(-q)
  if [ "$workers" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
    opts=(-n "$workers" -v)  # -v: a killed run still names every test it finished
  fi
  # pytest starts no test after this moment (tests/conftest.py): 30 s before the step's hard limit.
  local deadline=0
  [ "$STEP_DEADLINE" -gt 0 ] && deadline=$((STEP_DEADLINE - 30))
  # shellcheck disable=SC2086  # GPU_CHECK_TESTS / PYTEST_ARGS are word lists on purpose
  LORA_KERNELS_TEST_DEADLINE=$deadline "$PY" -m pytest -ra "${opts[@]}" ${GPU_CHECK_TESTS:-tests} ${PYTEST_ARGS:-}
}

do_bench() {
  # shellcheck disable=SC2086
  LORA_KERNELS_AUTOTUNE=${BENCH_AUTOTUNE:-${LORA_KERNELS_AUTOTUNE:-1}} \
    "$PY" -m bench.lora_linear ${BENCH_ARGS:---quick} ${BENCH_OUT:+--out "$BENCH_OUT"}
}

do_verify() {
  # shellcheck disable=SC2086
  "$PY" -m lora_kernels verify ${VERIFY_ARGS:-} --json "$LOG_DIR/verify.json"
}

do_profile() {
  if ! command -v "${NCU:-ncu}" >/dev/null 2>&1; then
    echo "gpu-check: profile: ${NCU:-ncu} not found"
    return 1
  fi
  "$PY" -m bench.profile --impls cublas,triton-bitmask,triton-1pass,cuda-bitmask,cuda-expand \
    --shape 8192,4096,4096,16 -p 0.1
}

do_environment() {
  "$PY" -c "
import torch, triton, lora_kernels
from lora_kernels import build_info
print('torch', torch.__version__, 'triton', triton.__version__, 'lora_kernels', lora_kernels.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU')
print(build_info.format_info())
print('backends', lora_kernels.available_backends(dtype=torch.bfloat16))
"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>/dev/null || true
}

export -f install_prebuilt do_install do_environment do_verify do_tests do_bench do_profile
export PY LOG_DIR GPU_CHECK_PREBUILT GPU_CHECK_TESTS GPU_CHECK_WORKERS PYTEST_ARGS BENCH_ARGS BENCH_OUT \
  BENCH_AUTOTUNE VERIFY_ARGS NCU

STEP_LIST=${GPU_CHECK_STEPS:-install,environment,tests,bench}
[ "${GPU_CHECK_PROFILE:-0}" = "1" ] && [[ ",$STEP_LIST," != *",profile,"* ]] && STEP_LIST="$STEP_LIST,profile"
echo "gpu-check: python=$($PY -c 'import sys; print(sys.executable)') CUDA_HOME=${CUDA_HOME:-none}" \
  "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} steps=$STEP_LIST budget=${BUDGET}s logs=$LOG_DIR"
IFS=, read -r -a ORDER <<<"$STEP_LIST"
for step in "${ORDER[@]}"; do
  case $step in
    install | environment | verify | tests | bench | profile) run_step "$step" "do_$step" ;;
    *) echo "gpu-check: unknown step '$step' (install, environment, verify, tests, bench, profile)"; exit 2 ;;
  esac
  # Whatever the install did, the checkout is importable (an in-place build, or none at all).
  [ "$step" = install ] && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
done

for name in verify profile bench; do  # the benchmark table nearest the summary (the reply keeps the tail)
  [ -f "$LOG_DIR/$name.log" ] || continue
  echo
  echo "=== gpu-check: $name table"
  grep '^|' "$LOG_DIR/$name.log" || echo "(no table: see $LOG_DIR/$name.log)"
done
if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then
  tar -czf "$GPU_CHECK_ARCHIVE" -C "$LOG_DIR" . && echo "gpu-check: logs packed into $GPU_CHECK_ARCHIVE"
fi
echo
echo "=== gpu-check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s, logs in $LOG_DIR)"
echo "| step | status | time |"
echo "|---|---|---|"
printf '%s\n' "${STEPS[@]}"
tail -n 1 "$LOG_DIR/tests.log" 2>/dev/null | sed 's/^/tests: /'
exit "$FAILED"
