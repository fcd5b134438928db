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
#   LORA_KERNELS_CUDA_ARCHS  default 90 (Hopper) to keep a fallback extension build short (setup.py
#                    passes its own -gencode flags, so TORCH_CUDA_ARCH_LIST alone would not do it)
#   LORA_KERNELS_NO_JIT  default 1 after the install step: a missing _C makes the cuda rows and tests
#                    skip with a reason instead of JIT-building CUTLASS for minutes inside a timed step
#   GPU_CHECK_STEPS=a,b,...  the steps, run in this order, of install, environment, verify, tests, bench,
#                    kernels, host, profile (default install,environment,tests,bench), so a time-limited device
#                    session can split the check over several commands
#   GPU_CHECK_PLAN=short  defaults for a 15-minute device session: install,environment,verify,host,bench,tests,
#                    a 360 s budget, a four-configuration benchmark on fixed tiles, the GPU test files
#   GPU_CHECK_REQUIRE_GPU=1  skip every step after environment when torch sees no CUDA GPU (short plan)
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
#   PYTEST_ARGS="..." extra arguments for pytest, parsed like a shell command line (quotes work:
#                    PYTEST_ARGS='-k "a or b"')
#   GPU_CHECK_TESTS="..."  test paths for the tests step (default: tests, the whole suite); at its
#                    limit the tests step gets SIGINT, so pytest still prints its summary
#   GPU_CHECK_WORKERS=n  pytest-xdist workers when xdist is installed (default 8, 0: one process);
#                    the Triton compiles spread over the CPUs, the kernels share the GPU
#   GPU_CHECK_LOGS=dir  keep the per-step logs there (default: a temp dir)
#   GPU_CHECK_ARCHIVE=file.tar.gz  pack the logs into one file, again after every step (the device
#                    tool returns at most 8 files, and only what exists when a call is stopped)
#   TRITON_CACHE_DIR  Triton's kernel cache (default /tmp/lora-kernels-triton-cache: a directory of its
#                    own, so each step reports how many kernels it compiled)
#   GPU_CHECK_TRITON_CACHE=file.tar.gz  seed that cache first (default .device/triton-cache.tar.gz when
#                    present: the kernels make device-prebuild compiled ahead without a GPU, see
#                    scripts/prewarm_triton_cache.py; or a first call's GPU_CHECK_TRITON_CACHE_OUT; "" none)
#   GPU_CHECK_TRITON_CACHE_OUT=file.tar.gz  pack the cache's cubins after every step, to seed a second
#                    call; over 15 MiB it is split into file.tar.gz.part00, .part01, ... (the device
#                    tool returns no file over 16 MiB), which GPU_CHECK_TRITON_CACHE=file.tar.gz reads
#   VERIFY_AUTOTUNE=0|1  LORA_KERNELS_AUTOTUNE for the verify step (short plan: 0, fixed tiles; eager calls
#                    otherwise tune, compiling every config of each kernel variant)
#   KERNELS_ARGS="..." arguments for the kernels step, `python -m bench.kernel_times` (time per kernel of a
#                    forward+backward step from torch.profiler's trace; default: its own)
#   HOST_ARGS="..."  arguments for the host step, `python -m bench.host_profile` (the CPU's time to issue a
#                    step: calibration of a launch, host µs per step, a cProfile by area; default: its own)
#   PROFILE_ARGS="..." arguments for `python -m bench.ncu_profile` (default: six implementations at
#                    8192×4096→4096, r = 16, p = 0.1)
#   GPU_CHECK_PROFILE=1  also run the profile step: `python -m bench.ncu_profile` (Nsight Compute counters per
#                    kernel at 8192×4096→4096, r = 16, p = 0.1) when ncu exists
#   LORA_KERNELS_CUTLASS_DIR  CUTLASS headers (default third_party/cutlass when present: see
#                    scripts/vendor_cutlass.sh; the device image has no nvidia-cutlass package)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${GPU_CHECK_PLAN:-}" = "short" ]; then
  # The plan's defaults live in one file: scripts/device_prebuild.sh compiles its Triton kernels ahead.
  source scripts/gpu_check_short_plan.sh
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
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LORA_KERNELS_CUDA_ARCHS=${LORA_KERNELS_CUDA_ARCHS:-90}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# No package registry on the device image: CUTLASS headers carried in by scripts/vendor_cutlass.sh.
if [ -z "${LORA_KERNELS_CUTLASS_DIR:-}" ] && [ -f third_party/cutlass/include/cutlass/cutlass.h ]; then
  export LORA_KERNELS_CUTLASS_DIR="$PWD/third_party/cutlass"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LOG_DIR=${GPU_CHECK_LOGS:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$LOG_DIR"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lora-kernels-triton-cache}

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
  local name=$1 limit start=$SECONDS kernels
  limit=$(step_limit "$name")
  if [ "$limit" -lt 0 ]; then
    echo "=== gpu-check: $name: skipped: the ${BUDGET} s budget is spent"
    STEPS+=("| $name | skipped (budget) | 0 s | - |")
    return 0
  fi
  kernels=$(triton_kernels)
  echo "=== gpu-check: $name (limit ${limit} s, 0: none)"
  export STEP_DEADLINE=0
  if [ "$limit" -gt 0 ]; then
    STEP_DEADLINE=$(($(date +%s) + limit))
    # pytest prints its summary on SIGINT (on SIGTERM it dies silently); the others stop on TERM.
    local sig=TERM
    [ "$name" = tests ] && sig=INT
    # The wrapper bash traps TERM: without it bash dies at once, timeout sees its child gone and never
    # sends the KILL, and a step that ignores TERM (bench and verify catch it to write what they have)
    # or hangs in a CUDA call would run on unbounded. With it bash waits for the step, and the KILL
    # reaches the whole group 15 s later.
    timeout -s "$sig" --kill-after=15 "$limit" bash -c "trap : TERM; do_$name" 2>&1 | tee "$LOG_DIR/$name.log"
  else
    "do_$name" 2>&1 | tee "$LOG_DIR/$name.log"
  fi
  local rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
    FAILED=1
  fi
  STEPS+=("| $name | $status | $((SECONDS - start)) s | $(($(triton_kernels) - kernels)) |")
  save_outputs
  return "$rc"
}

# What a call returns is what exists when it ends or is stopped: pack the logs and the Triton cache
# after every step (each to a temporary name, then renamed: a call stopped mid-pack keeps the last one).
save_outputs() {
  if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then
    tar -czf "$GPU_CHECK_ARCHIVE.tmp" -C "$LOG_DIR" . && mv -f "$GPU_CHECK_ARCHIVE.tmp" "$GPU_CHECK_ARCHIVE"
  fi
  [ -n "${GPU_CHECK_TRITON_CACHE_OUT:-}" ] && pack_triton_cache "$GPU_CHECK_TRITON_CACHE_OUT" >/dev/null
  return 0
}

# Kernels in Triton's cache (one index file each).
triton_kernels() {
  find "$TRITON_CACHE_DIR" -name '__grp__*.json' 2>/dev/null | wc -l
}

# This Triton's build key (lora_kernels/triton_ops/_build_key.py: imports Triton alone), empty if unknown.
triton_build_key() {
  "$PY" lora_kernels/triton_ops/_build_key.py 2>/dev/null | tail -n 1
}

# sha256 of the Triton kernels' sources (scripts/prewarm_triton_cache.py's kernel_sources_digest).
triton_sources_digest() {
  find lora_kernels/triton_ops -maxdepth 1 -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1
}

# Unpack the seed into Triton's cache: the kernels make device-prebuild compiled without a GPU, or a
# previous call's GPU_CHECK_TRITON_CACHE_OUT. Triton's index files name their members by absolute path,
# so they are re-pointed here; a seed from another Triton build would miss every kernel: say so.
seed_triton_cache() {
  local seed=${GPU_CHECK_TRITON_CACHE-.device/triton-cache.tar.gz} info from want have
  [ -n "$seed" ] || return 0
  if [ ! -f "$seed" ] && [ ! -f "$seed.part00" ]; then
    [ -n "${GPU_CHECK_TRITON_CACHE:-}" ] && echo "gpu-check: WARNING: no Triton cache seed $seed"
    return 0
  fi
  mkdir -p "$TRITON_CACHE_DIR"
  # Both a whole archive and parts (a previous call's large cache copied next to an older seed): the newer.
  if [ -f "$seed" ] && ! [ "$seed.part00" -nt "$seed" ]; then
    tar -xzf "$seed" -C "$TRITON_CACHE_DIR"
  else  # a large cache comes back in parts (pack_triton_cache)
    cat "$seed".part* | tar -xz -C "$TRITON_CACHE_DIR"
  fi || { echo "gpu-check: WARNING: could not unpack $seed"; return 0; }
  info="$TRITON_CACHE_DIR/PREWARM_INFO"
  from=$(sed -n 's/^cache_dir=//p' "$info" 2>/dev/null)
  if [ -n "$from" ] && [ "$from" != "$TRITON_CACHE_DIR" ]; then
    find "$TRITON_CACHE_DIR" -name '__grp__*.json' -exec sed -i "s#\"$from/#\"$TRITON_CACHE_DIR/#g" {} +
    sed -i "s#^cache_dir=.*#cache_dir=$TRITON_CACHE_DIR#" "$info"
  fi
  want=$(sed -n 's/^triton_key=//p' "$info" 2>/dev/null)
  have=$(triton_build_key)
  local verdict="the same Triton build as here"
  [ "$want" = "$have" ] || verdict="NOT this Triton build ($have): every kernel will compile here"
  echo "gpu-check: Triton cache $TRITON_CACHE_DIR seeded from $seed: $(triton_kernels) kernels," \
    "compiled for Triton build ${want:-unknown}, $verdict"
  # Kernels compiled from other sources miss where those changed (make device-prebuild again).
  want=$(sed -n 's/^sources=//p' "$info" 2>/dev/null)
  have=$(triton_sources_digest)
  if [ -n "$want" ] && [ "$want" != "$have" ]; then
    echo "gpu-check: WARNING: the seed was compiled from other lora_kernels/triton_ops sources: kernels that" \
      "changed will compile here (run make device-prebuild again)"
  fi
}

# Pack the cache's cubins and metadata (the IR stays here) for the next call's GPU_CHECK_TRITON_CACHE.
pack_triton_cache() {
  local out=$1 max=${GPU_CHECK_PART_BYTES:-$((15 * 1024 * 1024))}
  [ -d "$TRITON_CACHE_DIR" ] || return 0
  # plan=: the seed's (the bench/verify arguments it was compiled for; this cache holds those kernels
  # and more), so that make device-preflight accepts it as the next call's seed.
  local plan
  plan=$(sed -n 's/^plan=//p' "$TRITON_CACHE_DIR/PREWARM_INFO" 2>/dev/null)
  printf 'cache_dir=%s\ntriton_key=%s\nsources=%s\n' "$TRITON_CACHE_DIR" "$(triton_build_key)" \
    "$(triton_sources_digest)" >"$TRITON_CACHE_DIR/PREWARM_INFO"
  [ -z "$plan" ] || printf 'plan=%s\n' "$plan" >>"$TRITON_CACHE_DIR/PREWARM_INFO"
  # *.so: the launcher modules Triton builds with gcc per kernel signature (none in a prewarmed seed).
  (cd "$TRITON_CACHE_DIR" && find . -type f \( -name '*.cubin' -o -name '*.json' -o -name '*.so' -o -name PREWARM_INFO \) -print0 |
    tar -czf "$out.tmp" --null -T -) || return 0
  rm -f "$out" "$out".part*
  if [ "$(stat -c %s "$out.tmp")" -gt "$max" ]; then
    split -b "$max" -d "$out.tmp" "$out.part" && rm -f "$out.tmp"
  else
    mv -f "$out.tmp" "$out"
  fi
  echo "gpu-check: $(triton_kernels) Triton kernels packed into $out ($(cat "$out" "$out".part* 2>/dev/null | wc -c) bytes)"
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
  # Parsed like a command line, so that PYTEST_ARGS='-k "a or b"' keeps its quoted expression whole.
  local paths extra
  eval "paths=(${GPU_CHECK_TESTS:-tests})" && eval "extra=(${PYTEST_ARGS:-})" || return 4
  LORA_KERNELS_TEST_DEADLINE=$deadline "$PY" -m pytest -ra "${opts[@]}" "${paths[@]}" "${extra[@]}"
}

do_bench() {
  # shellcheck disable=SC2086
  LORA_KERNELS_AUTOTUNE=${BENCH_AUTOTUNE:-${LORA_KERNELS_AUTOTUNE:-1}} \
    "$PY" -m bench.lora_linear ${BENCH_ARGS:---quick} ${BENCH_OUT:+--out "$BENCH_OUT"}
}

do_verify() {
  # shellcheck disable=SC2086
  LORA_KERNELS_AUTOTUNE=${VERIFY_AUTOTUNE:-${LORA_KERNELS_AUTOTUNE:-1}} "$PY" -m lora_kernels verify ${VERIFY_ARGS:-} --json "$LOG_DIR/verify.json"
}

do_kernels() {
  # Time per kernel of one forward+backward step (torch.profiler's trace; caches warm, no replay).
  # shellcheck disable=SC2086
  LORA_KERNELS_AUTOTUNE=${BENCH_AUTOTUNE:-${LORA_KERNELS_AUTOTUNE:-1}} "$PY" -m bench.kernel_times ${KERNELS_ARGS:-}
}

do_host() {
  # Where the CPU's time per step goes (the Triton rows were host-bound at N = 4096 on the H200, session 28).
  # shellcheck disable=SC2086
  LORA_KERNELS_AUTOTUNE=${BENCH_AUTOTUNE:-${LORA_KERNELS_AUTOTUNE:-1}} "$PY" -m bench.host_profile ${HOST_ARGS:-}
}

do_profile() {
  if ! command -v "${NCU:-ncu}" >/dev/null 2>&1; then
    echo "gpu-check: profile: ${NCU:-ncu} not found"
    return 1
  fi
  # The tiles the benchmark rows ran (the short plan's are fixed): counters for the kernels the table timed,
  # and no autotuning compiles (every config of each kernel) inside the ncu child.
  LORA_KERNELS_AUTOTUNE=${BENCH_AUTOTUNE:-${LORA_KERNELS_AUTOTUNE:-1}} \
    "$PY" -m bench.ncu_profile ${PROFILE_ARGS:---impls cublas,triton-bitmask,triton-flat,triton-1pass,cuda-bitmask,cuda-expand
    --shape 8192,4096,4096,16 -p 0.1}
}

do_environment() {
  "$PY" -c "
import torch, triton, lora_kernels
from lora_kernels import build_info
print('torch', torch.__version__, 'triton', triton.__version__, 'lora_kernels', lora_kernels.__version__)
import importlib.metadata as md
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return 'absent'
print(' '.join(f'{n} {v(n)}' for n in ('numpy', 'peft', 'transformers', 'pytest', 'pytest-xdist', 'setuptools')))
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU')
print(build_info.format_info())
print('backends', lora_kernels.available_backends(dtype=torch.bfloat16))
"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>/dev/null || true
}

export -f install_prebuilt do_install do_environment do_verify do_tests do_bench do_kernels do_host do_profile
export PY LOG_DIR GPU_CHECK_PREBUILT GPU_CHECK_TESTS GPU_CHECK_WORKERS PYTEST_ARGS BENCH_ARGS BENCH_OUT \
  BENCH_AUTOTUNE VERIFY_ARGS VERIFY_AUTOTUNE NCU KERNELS_ARGS HOST_ARGS PROFILE_ARGS

STEP_LIST=${GPU_CHECK_STEPS:-install,environment,tests,bench}
[ "${GPU_CHECK_PROFILE:-0}" = "1" ] && [[ ",$STEP_LIST," != *",profile,"* ]] && STEP_LIST="$STEP_LIST,profile"
echo "gpu-check: python=$($PY -c 'import sys; print(sys.executable)') CUDA_HOME=${CUDA_HOME:-none}" \
  "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} steps=$STEP_LIST budget=${BUDGET}s logs=$LOG_DIR"
seed_triton_cache
IFS=, read -r -a ORDER <<<"$STEP_LIST"
for step in "${ORDER[@]}"; do
  case $step in
    install | environment | verify | tests | bench | kernels | host | profile) run_step "$step" "do_$step" ;;
    *) echo "gpu-check: unknown step '$step' (install, environment, verify, tests, bench, kernels, host, profile)"
      exit 2 ;;
  esac
  # Whatever the install did, the checkout is importable (an in-place build, or none at all), and a
  # missing _C is not JIT-built inside a timed step.
  [ "$step" = install ] && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    LORA_KERNELS_NO_JIT=${LORA_KERNELS_NO_JIT:-1}
  if [ "$step" = environment ] && [ "${GPU_CHECK_REQUIRE_GPU:-0}" = 1 ] &&
    ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: torch sees no CUDA GPU: the remaining steps are skipped (GPU_CHECK_REQUIRE_GPU=1)"
    STEPS+=("| (the rest) | skipped (no CUDA GPU) | 0 s | - |")
    FAILED=1
    break
  fi
done

for name in verify kernels host profile bench; do  # the benchmark table nearest the summary (the reply keeps the tail)
  [ -f "$LOG_DIR/$name.log" ] || continue
  echo
  echo "=== gpu-check: $name table"
  grep '^|' "$LOG_DIR/$name.log" || echo "(no table: see $LOG_DIR/$name.log)"
done
[ -n "${GPU_CHECK_TRITON_CACHE_OUT:-}" ] && pack_triton_cache "$GPU_CHECK_TRITON_CACHE_OUT"
if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then
  tar -czf "$GPU_CHECK_ARCHIVE.tmp" -C "$LOG_DIR" . && mv -f "$GPU_CHECK_ARCHIVE.tmp" "$GPU_CHECK_ARCHIVE" &&
    echo "gpu-check: logs packed into $GPU_CHECK_ARCHIVE"
fi
echo
echo "=== gpu-check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s, logs in $LOG_DIR)"
echo "| step | status | time | Triton kernels compiled |"
echo "|---|---|---|---|"
printf '%s\n' "${STEPS[@]}"
tail -n 1 "$LOG_DIR/tests.log" 2>/dev/null | sed 's/^/tests: /'
exit "$FAILED"
