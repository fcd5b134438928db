#!/usr/bin/env bash
# Run the test suite in .venv. Without a CUDA GPU the Triton kernels run in the interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1) and GPU-only tests skip with a stated reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1
"$VENV/bin/python" -m pytest -q -ra --durations=15 tests "$@"
