#!/usr/bin/env bash
# Print the CUDA toolkit directory (CUDA_HOME) or nothing. Follows an `nvcc` on PATH that is a
# wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`) or a symlink.
set -u
if [ -n "${CUDA_HOME:-}" ] && [ -x "${CUDA_HOME}/bin/nvcc" ]; then echo "$CUDA_HOME"; exit 0; fi
# No nvcc on PATH: the default toolkit location, as lora_kernels/cuda_ops/_build.py (and torch) look there.
nvcc_path=$(command -v nvcc 2>/dev/null) || {
  if [ -x /usr/local/cuda/bin/nvcc ]; then readlink -f /usr/local/cuda; fi
  exit 0
}
target=$(sed -n 's/^exec[[:space:]]\{1,\}\([^[:space:]]*nvcc\).*/\1/p' "$nvcc_path" 2>/dev/null | head -1)
[ -n "$target" ] || target=$(readlink -f "$nvcc_path")
dirname "$(dirname "$target")"
