#!/usr/bin/env bash
# Build lora_kernels._C HERE for the GPU device image (Python 3.12, torch 2.11+cu130, sm_90a), so a
# time-limited device session carries the binary instead of compiling CUTLASS there (minutes of its
# 15). Uses the GPU-image venv of scripts/run_gpu_stack_tests.sh (created if missing: ~5 GB of disk).
#
#   bash scripts/device_prebuild.sh        # writes .device/prebuilt/ (git-ignored, ~10 MB) and
#                                          # third_party/cutlass (scripts/vendor_cutlass.sh) if missing
#   then carry ".device" and "third_party" with the device run; `make gpu-check` installs the binary from there when
#   its Python tag and its sources digest (csrc/ + the build flags) match, else builds as before.
#   It also compiles, with the device image's Triton and without a GPU, the Triton kernels that the short
#   plan's benchmark and verify launch (scripts/prewarm_triton_cache.py) into .device/triton-cache.tar.gz,
#   which gpu_check.sh unpacks into Triton's cache: the device loads them instead of compiling them.
#
#   DEVICE_PREBUILT=dir   where to write (default .device/prebuilt)
#   DEVICE_TRITON_CACHE=file.tar.gz  the compiled Triton kernels (default .device/triton-cache.tar.gz)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEVICE_PREBUILT:-.device/prebuilt}
SRC=${GPU_STACK_SRC:-.cache/gpu-stack-src}
[ -n "$(bash scripts/find_cuda_home.sh)" ] || { echo "device_prebuild: no CUDA toolkit found (CUDA_HOME / nvcc)" >&2; exit 1; }
rm -f "$SRC"/lora_kernels/_C.*.so "$SRC"/lora_kernels/_build_info.py
GPU_STACK_BUILD_ONLY=1 GPU_STACK_ARCHS=90 bash scripts/run_gpu_stack_tests.sh
so=$(find "$SRC/lora_kernels" -maxdepth 1 -name '_C.cpython-*.so' | head -1)
[ -n "$so" ] && [ -f "$SRC/lora_kernels/_build_info.py" ] || { echo "device_prebuild: the build left no _C binary in $SRC/lora_kernels" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$so" "$SRC/lora_kernels/_build_info.py" "$DEST/"
strip --strip-debug "$DEST/$(basename "$so")" 2>/dev/null || true
# The digest of the sources it was built from: gpu_check.sh refuses a binary of other sources.
python3 "$SRC/lora_kernels/cuda_ops/_build.py" digest > "$DEST/SOURCES_DIGEST"
cmp -s "$DEST/SOURCES_DIGEST" <(python3 lora_kernels/cuda_ops/_build.py digest) ||
  echo "device_prebuild: WARNING: csrc/ changed during the build; run it again" >&2
echo "device_prebuild: $(du -sh "$DEST" | cut -f1) in $DEST:"
ls -l "$DEST"
sed -n 's/^\([A-Z_]*\) = /  \1 = /p' "$DEST/_build_info.py"
# The Triton kernels of the short plan's benchmark and verify rows (the plan's own arguments), compiled
# for sm_90 by the device image's Triton (the GPU-image venv): ~1 s per kernel here.
(
  source scripts/gpu_check_short_plan.sh
  autotune=()
  [ "$BENCH_AUTOTUNE" = 1 ] && autotune+=(--bench-autotune)
  [ "$VERIFY_AUTOTUNE" = 1 ] && autotune+=(--verify-autotune)
  env -u TRITON_INTERPRET "${GPU_STACK_VENV:-.cache/venv-gpu-stack}/bin/python" scripts/prewarm_triton_cache.py \
    --out "${DEVICE_TRITON_CACHE:-.device/triton-cache.tar.gz}" --bench-args "$BENCH_ARGS" --verify-args "$VERIFY_ARGS" "${autotune[@]}"
)
# The CUTLASS headers too, for the fallback build there if the binary does not load (28 MB).
venv=${GPU_STACK_VENV:-.cache/venv-gpu-stack}
[[ $venv = /* ]] || venv=$PWD/$venv  # (an absolute GPU_STACK_VENV as it is)
[ -f third_party/cutlass/include/cutlass/cutlass.h ] || PYTHON="$venv/bin/python" bash scripts/vendor_cutlass.sh
echo "carry both: run(carry=[\"${DEST%%/*}\", \"third_party\"], command=\"GPU_CHECK_PLAN=short ... bash scripts/gpu_check.sh\")" \
  "(bench/NOTES.md, Runbook)"
