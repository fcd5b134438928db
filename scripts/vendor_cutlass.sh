#!/usr/bin/env bash
# Copy the CUTLASS/CuTe headers of the installed `nvidia-cutlass` package into third_party/cutlass
# (git-ignored, ~28 MB), for building the CUDA extension on a machine without a package registry
# (e.g. the H100 device image): carry that folder along and set
#   LORA_KERNELS_CUTLASS_DIR=$PWD/third_party/cutlass
# (scripts/gpu_check.sh does so by itself when the folder exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
src=$("$PY" -c 'import cutlass_library, pathlib; print(pathlib.Path(cutlass_library.__file__).parent / "source")')
rm -rf third_party/cutlass
mkdir -p third_party/cutlass/tools/util
cp -r "$src/include" third_party/cutlass/include
cp -r "$src/tools/util/include" third_party/cutlass/tools/util/include
du -sh third_party/cutlass
