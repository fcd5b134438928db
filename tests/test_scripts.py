"""The test-runner scripts' own logic (no installs): the GPU-image stack stage of `make test` steps
aside, with its reason, on a machine without the disk for its venv (a CI machine ran out of disk)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_stack_stage_declines_without_disk(tmp_path):
    venv = tmp_path / "venv-gpu-stack"  # absent, so the script would have to create it
    env = {**os.environ, "GPU_STACK_VENV": str(venv), "GPU_STACK_SRC": str(tmp_path / "src"),
           "GPU_STACK_MIN_FREE_GB": "1000000"}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/run_gpu_stack_tests.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "not run:" in proc.stdout and "needs 1000000 GB" in proc.stdout, proc.stdout
    assert not venv.exists() and not (tmp_path / "src").exists()  # nothing installed, nothing copied
