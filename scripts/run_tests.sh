#!/usr/bin/env bash
# Run the test suite in .venv. Without a CUDA GPU the Triton kernels run in the interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1) and GPU-only tests skip with a stated reason.
#
# Then the Triton kernel tests once more under Triton 3.6.0, the version of the GPU image (CI's
# .venv has 3.8): interpreter runs and the compile-for-sm_90 check, so an API or semantics
# difference shows here instead of on scarce GPU time. It uses a scratch `pip install --target`
# (with numpy 2.3: 3.6's interpreter predates numpy 2.4); TRITON_COMPAT=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1
"$VENV/bin/python" -m pytest -q -ra --durations=15 tests "$@"

if [ "${TRITON_COMPAT:-1}" != "0" ] && [ $# -eq 0 ]; then
  T36=${TRITON_COMPAT_DIR:-.cache/triton-3.6.0}
  if [ ! -f "$T36/.complete" ]; then
    rm -rf "$T36"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$T36" \
      "triton==3.6.0" "numpy==2.3.5"
    touch "$T36/.complete"
  fi
  echo "=== run_tests: Triton kernel tests under $(PYTHONPATH="$T36" "$VENV/bin/python" -c \
    'import triton, numpy; print("triton", triton.__version__, "numpy", numpy.__version__)')"
  PYTHONPATH="$T36" LORA_KERNELS_EXPECT_TRITON=3.6.0 "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/test_lora_linear.py tests/test_single_pass.py
fi
