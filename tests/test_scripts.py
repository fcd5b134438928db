"""The test-runner scripts' own logic (no installs): the GPU-image stack stage of `make test` steps
aside, with its reason, on a machine without the disk for its venv (a CI machine ran out of disk);
`make gpu-check` keeps to its steps, order and time budget, and installs a prebuilt extension only
when it was built from the same sources (a device session has 15 minutes in all)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

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


# ---- scripts/gpu_check.sh: the device session's plan (steps in order, a time budget, a prebuilt _C) ----

_STUB_PY = """#!/usr/bin/env bash
# The test venv's python, except that installs do nothing (pure-Python, prebuilt) or fail (builds).
if [ "$1 $2" = "-m pip" ] || [ "$1" = setup.py ]; then
  [ "${LORA_KERNELS_SKIP_CUDA_BUILD:-0}" = 1 ] && [ "$1" != setup.py ] && exit 0
  echo "stub: no build here: $*"; exit 3
fi
exec %s "$@"
"""


def _repo_copy(tmp_path: Path) -> Path:
    """What the install step reads (scripts, the package, the sources), without any built binary, in a
    scratch directory: the step writes into lora_kernels/. (Not `git ls-files`: the GPU-stack stage runs
    the suite in a copy that is no git checkout.)"""
    dst = tmp_path / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py")
    for part in ("scripts", "lora_kernels", "csrc"):
        shutil.copytree(ROOT / part, dst / part, ignore=skip)
    return dst


def _gpu_check(repo: Path, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "BENCH_", "VERIFY_"))}
    env = {**base, "VENV": str(Path(sys.executable).parent.parent), **env}
    return subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_gpu_check_runs_the_steps_in_the_order_given(tmp_path):
    logs, archive = tmp_path / "logs", tmp_path / "logs.tar.gz"
    verify = "--backend torch --dtype fp32 --only-shapes --shape 3,40,24,2 -p 0 --no-progress"
    env = {"GPU_CHECK_STEPS": "verify,environment", "GPU_CHECK_LOGS": str(logs), "GPU_CHECK_ARCHIVE": str(archive),
           "VERIFY_ARGS": verify}  # fmt: skip
    proc = _gpu_check(ROOT, env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.index("=== gpu-check: verify") < out.index("=== gpu-check: environment") < out.index("| step |")
    assert "| verify | ok |" in out and "| environment | ok |" in out and "backends {" in out
    assert "=== gpu-check: verify table" in out  # verify's summary table repeated at the end
    assert (logs / "verify.json").exists()
    with tarfile.open(archive) as tar:
        assert {"./verify.log", "./environment.log", "./verify.json"} <= set(tar.getnames())


def test_gpu_check_budget_skips_steps_and_stops_a_step_at_its_limit(tmp_path):
    # 30 s in all, 20 of them kept for the summary: no step has the 20 s it needs.
    proc = _gpu_check(ROOT, {"GPU_CHECK_STEPS": "environment", "GPU_CHECK_BUDGET": "30"})
    assert proc.returncode == 0 and "| environment | skipped (budget) | 0 s |" in proc.stdout, proc.stdout
    # A per-step cap stops a step that runs over it (timeout's 124) and the check reports it.
    env = {"GPU_CHECK_STEPS": "verify", "GPU_CHECK_CAP_VERIFY": "1", "VERIFY_ARGS": "--backend torch"}
    proc = _gpu_check(ROOT, env)
    assert proc.returncode == 1 and "| verify | FAILED (exit 124) |" in proc.stdout, proc.stdout
    proc = _gpu_check(ROOT, {"GPU_CHECK_STEPS": "environment,nonsense"})
    assert proc.returncode == 2 and "unknown step 'nonsense'" in proc.stdout, proc.stdout
    # The 15-minute plan's budget applies to the steps the caller picks.
    proc = _gpu_check(ROOT, {"GPU_CHECK_PLAN": "short", "GPU_CHECK_STEPS": "environment"})
    assert proc.returncode == 0 and "steps=environment budget=360s" in proc.stdout, proc.stdout
    assert "=== gpu-check: environment (limit 3" in proc.stdout and "| environment | ok |" in proc.stdout


def test_gpu_check_tests_step_hands_its_deadline_to_pytest(tmp_path):
    # A 30 s limit leaves pytest no time to start a test (it stops 30 s before the limit), so every test
    # is reported as not started and pytest still ends normally with its summary.
    env = {"GPU_CHECK_STEPS": "tests", "GPU_CHECK_CAP_TESTS": "30", "GPU_CHECK_WORKERS": "0",
           "GPU_CHECK_TESTS": "tests/test_reference.py", "PYTEST_ARGS": "-p no:cacheprovider -k gradcheck",
           "GPU_CHECK_LOGS": str(tmp_path)}  # fmt: skip
    proc = _gpu_check(ROOT, env)
    assert proc.returncode == 0 and "| tests | ok |" in proc.stdout, proc.stdout
    log = (tmp_path / "tests.log").read_text()
    assert "not started: the time budget of this run" in log and " passed" not in log, log
    assert "tests: " in proc.stdout.splitlines()[-1]  # pytest's summary line closes the report


def test_gpu_check_takes_a_matching_prebuilt_binary_and_refuses_a_stale_one(tmp_path):
    built = sorted((ROOT / "lora_kernels").glob("_C.*.so"))
    info = ROOT / "lora_kernels" / "_build_info.py"
    if not built or not info.exists():
        pytest.skip("lora_kernels._C is not built in this checkout (no CUDA toolkit at install)")
    repo = _repo_copy(tmp_path)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(_STUB_PY % sys.executable)
    (venv / "bin" / "python").chmod(0o755)
    pre = tmp_path / "prebuilt"
    pre.mkdir()
    shutil.copy2(built[0], pre / built[0].name)
    shutil.copy2(info, pre / info.name)
    digest = subprocess.run([sys.executable, "lora_kernels/cuda_ops/_build.py", "digest"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    env = {"VENV": str(venv), "GPU_CHECK_STEPS": "install", "GPU_CHECK_PREBUILT": str(pre)}

    (pre / "SOURCES_DIGEST").write_text("0123456789abcdef\n")  # built from other sources
    proc = _gpu_check(repo, env)
    assert "was built from other sources" in proc.stdout and "stub: no build here" in proc.stdout, proc.stdout
    assert proc.returncode == 1 and "| install | FAILED" in proc.stdout
    assert not (repo / "lora_kernels" / built[0].name).exists()

    (pre / "SOURCES_DIGEST").write_text(digest)
    proc = _gpu_check(repo, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu-check: prebuilt lora_kernels._C: torch_version=" in proc.stdout and "stub" not in proc.stdout
    assert (repo / "lora_kernels" / built[0].name).read_bytes() == built[0].read_bytes()


def test_pytest_starts_no_test_after_the_deadline():
    env = {**os.environ, "LORA_KERNELS_TEST_DEADLINE": "1"}  # long past
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_reference.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    assert " passed" not in proc.stdout and " skipped" in proc.stdout
    assert "not started: the time budget of this run" in proc.stdout
