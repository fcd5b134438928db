"""The test-runner scripts' own logic (no installs): the GPU-image stack stage of `make test` steps
aside, with its reason, on a machine without the disk for its venv (a CI machine ran out of disk);
`make gpu-check` keeps to its steps, order and time budget, and installs a prebuilt extension only
when it was built from the same sources (a device session has 15 minutes in all)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
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


def test_next_triton_stage_declines_without_disk_or_when_switched_off(tmp_path):
    """The next Triton's smoke (scripts/run_next_triton_tests.sh) exits 75 with its reason and installs nothing
    where the disk is short, and runs nothing with NEXT_TRITON=0 (exit 0, said so)."""
    target = tmp_path / "triton-next"
    env = {**os.environ, "NEXT_TRITON_DIR": str(target), "NEXT_TRITON_MIN_FREE_GB": "1000000"}
    env.pop("NEXT_TRITON", None)
    proc = subprocess.run(["bash", "scripts/run_next_triton_tests.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "not run: installing triton 3.9.0 needs 1000000 GB free" in proc.stdout, proc.stdout
    assert not target.exists()
    proc = subprocess.run(["bash", "scripts/run_next_triton_tests.sh"], cwd=ROOT, env={**env, "NEXT_TRITON": "0"},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "not run (NEXT_TRITON=0)" in proc.stdout, proc.stdout + proc.stderr
    assert not target.exists()


def test_shard_option_splits_the_selection_between_processes():
    """--shard I/N (tests/conftest.py), with which the next Triton's smoke runs as one process per core: the N
    shards run every selected test once between them, taking turns; a malformed or out-of-range one is a usage
    error, not a silent empty run."""

    def collect(*args: str) -> tuple[int, list[str]]:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only",
                               "tests/test_scripts.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        return proc.returncode, [line for line in proc.stdout.splitlines() if "::" in line]

    rc, whole = collect()
    assert rc == 0 and len(whole) > 10, whole
    shards = [collect("--shard", f"{i}/2") for i in range(2)]
    assert [rc for rc, _ in shards] == [0, 0], shards
    assert shards[0][1] == whole[0::2] and shards[1][1] == whole[1::2]
    for bad in ("2/2", "one/2"):
        rc, _ = collect("--shard", bad)
        assert rc == pytest.ExitCode.USAGE_ERROR, bad


# ---- scripts/run_tests.sh (`make test`): the main suite and the GPU-image stack's suite side by side ----
_FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for .venv/bin/python: the main suite, the fallback's pip and version probe and its pytest.
case "$*" in
  *"-m pip install"*) for a; do [ "$prev" = --target ] && mkdir -p "$a"; prev=$a; done; exit 0 ;;
  "-c "*) echo "triton 3.6.0 numpy 2.3.5"; exit 0 ;;
esac
if [ -n "${PYTHONPATH:-}" ]; then
  if [ "$LORA_KERNELS_EXPECT_TRITON" = 3.6.0 ]; then
    echo "fallback pytest $(date +%s.%N) $*" >> "$REC/calls"; exit "$FALLBACK_RC"
  fi
  echo "next start $(date +%s.%N) triton=$LORA_KERNELS_EXPECT_TRITON $*" >> "$REC/calls"; sleep 1
  echo "next sigign $(awk '/^SigIgn/ { print $2 }' /proc/self/status)" >> "$REC/calls"
  echo "next end $(date +%s.%N)" >> "$REC/calls"; echo "next's own output"; exit "${NEXT_RC:-0}"
fi
echo "main start $(date +%s.%N)" >> "$REC/calls"; sleep "${MAIN_SLEEP:-1}"
echo "main sigign $(awk '/^SigIgn/ { print $2 }' /proc/self/status)" >> "$REC/calls"
echo "main end $(date +%s.%N) args=$*" >> "$REC/calls"; exit "$MAIN_RC"
"""
_FAKE_STACK = r"""#!/usr/bin/env bash
echo "stack start $(date +%s.%N)" >> "$REC/calls"; sleep 1
echo "stack sigign $(awk '/^SigIgn/ { print $2 }' /proc/self/status)" >> "$REC/calls"
echo "stack end $(date +%s.%N)" >> "$REC/calls"; echo "the stack's own output"; exit "$STACK_RC"
"""

_INT_QUIT = 1 << (signal.SIGINT - 1) | 1 << (signal.SIGQUIT - 1)  # their bits in /proc's SigIgn


def _terminal_signals() -> None:
    """SIGINT and SIGQUIT at their defaults, as under a terminal: the test itself may run where they are
    ignored (a background command of a shell without job control, e.g. the stack's suite before)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _run_tests_tree(root: Path, stack: str = _FAKE_STACK, python: str = _FAKE_PYTHON) -> dict:
    """run_tests.sh in ``root`` beside stand-ins for the stack script and the venv's python; the
    environment to run it with (none of the switches that pick its mode)."""
    (root / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "run_tests.sh", root / "scripts")
    shutil.copy(ROOT / "scripts" / "run_next_triton_tests.sh", root / "scripts")
    (root / "scripts" / "run_gpu_stack_tests.sh").write_text(stack)
    py = root / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(python)
    py.chmod(0o755)
    switches = (
        "GPU_STACK",
        "TRITON_COMPAT",
        "GPU_STACK_SERIAL",
        "NEXT_TRITON",
        "NEXT_TRITON_MIN_FREE_GB",
        "NEXT_TRITON_JOBS",
    )
    env = {k: v for k, v in os.environ.items() if k not in switches}
    return {**env, "VENV": str(root / "venv")}


@pytest.mark.parametrize(
    ("main_rc", "stack_rc", "fallback_rc", "next_rc", "expect"),
    [(0, 0, 0, 0, 0), (1, 0, 0, 0, 1), (0, 3, 0, 0, 3), (2, 3, 0, 0, 2), (0, 75, 0, 0, 0), (1, 75, 0, 0, 1),
     (0, 75, 4, 0, 4), (0, 0, 0, 6, 6), (1, 0, 0, 6, 1), (0, 3, 0, 6, 3), (0, 75, 4, 6, 4), (0, 75, 0, 6, 6)],
)  # fmt: skip
@pytest.mark.parametrize("serial", [False, True])
def test_run_tests_runs_the_stack_beside_the_main_suite(
    tmp_path, main_rc, stack_rc, fallback_rc, next_rc, expect, serial
):
    """Both suites run, at the same time unless GPU_STACK_SERIAL=1; the exit code is the main suite's
    failure, else the stack's; the stack's 75 (no disk) brings the Triton-3.6 fallback, whose code counts.
    After the main suite, the kernels' smoke under the next Triton (3.9): its failure counts last."""
    env = _run_tests_tree(tmp_path)
    rec = tmp_path / "rec"
    rec.mkdir()
    env.update(REC=str(rec), MAIN_RC=str(main_rc), STACK_RC=str(stack_rc), FALLBACK_RC=str(fallback_rc),
               NEXT_RC=str(next_rc), GPU_STACK_SERIAL="1" if serial else "0", NEXT_TRITON_JOBS="2",
               MAIN_SLEEP="3" if stack_rc == 75 and not serial else "1")  # fmt: skip
    proc = subprocess.run(["bash", "scripts/run_tests.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60, preexec_fn=_terminal_signals)  # fmt: skip
    assert proc.returncode == expect, proc.stdout + proc.stderr
    calls = (rec / "calls").read_text().splitlines()
    t = {c.split()[0] + " " + c.split()[1]: float(c.split()[2]) for c in calls
         if c.split()[1] in ("start", "end") and c.split()[0] != "next"}  # fmt: skip
    assert set(t) == {"main start", "main end", "stack start", "stack end"}, calls
    overlap = t["stack start"] < t["main end"] and t["main start"] < t["stack end"]
    assert overlap is not serial, calls
    assert "the stack's own output" in proc.stdout, proc.stdout
    # The stack's tests see the signals as the main suite's do: not the SIGINT / SIGQUIT that bash ignores
    # in a background command without job control.
    ignored = {c.split()[0]: int(c.split()[2], 16) for c in calls if c.split()[1] == "sigign"}
    assert ignored["stack"] == ignored["main"] == ignored["next"] and not ignored["main"] & _INT_QUIT, calls
    if not serial:
        # Its log is printed after the main suite, under a line with its chain's exit code: the stack's, or where
        # it stepped aside the Triton 3.6 rerun's.
        chain_rc = fallback_rc if stack_rc == 75 else stack_rc
        head = proc.stdout.index(f"the GPU-stack suite (exit {chain_rc}), from .cache/gpu-stack.log")
        assert head < proc.stdout.index("the stack's own output"), proc.stdout
    fallback = [float(c.split()[2]) for c in calls if c.startswith("fallback pytest")]
    assert len(fallback) == (stack_rc == 75), calls
    if fallback and not serial:
        # In the stack's place beside the main suite, not after it (that left a core idle for the main suite's hour):
        # it starts about 1 s in, after the stand-in stack; the main suite's stand-in takes 3 s here.
        assert fallback[0] < t["main end"], calls
        assert "the GPU-stack suite stepped aside (exit 75)" in proc.stdout, proc.stdout
    # The next Triton's smoke: after the main suite, from its own target directory, on the kernel tests, in two
    # shards (NEXT_TRITON_JOBS=2) that run at the same time; each shard's output printed under its exit code.
    starts = [c.split() for c in calls if c.startswith("next start")]
    ends = [float(c.split()[2]) for c in calls if c.startswith("next end")]
    assert len(starts) == 2 and len(ends) == 2, calls
    assert all(float(s[2]) > t["main end"] and s[3] == "triton=3.9.0" for s in starts), calls
    assert all({"tests/test_bench_dry.py", "tests/test_single_pass.py", "tests/test_fast_launch.py"} <= set(s)
               for s in starts), calls  # fmt: skip
    assert sorted(s[s.index("--shard") + 1] for s in starts) == ["0/2", "1/2"], calls
    assert max(float(s[2]) for s in starts) < min(ends), calls
    for i in range(2):
        head = proc.stdout.index(f"=== next Triton: shard {i}/2 (exit {next_rc})")
        assert proc.stdout.index("next's own output", head) < proc.stdout.index("next Triton's smoke ended"), (
            proc.stdout
        )
    assert (tmp_path / ".cache" / "triton-3.9.0" / ".complete").exists()
    # When each chain's parts ended (CI's log says which chain decides its time).
    assert "=== run_tests: the main suite ended at " in proc.stdout and f"s (exit {main_rc})" in proc.stdout
    assert "=== run_tests: the next Triton's smoke ended at " in proc.stdout, proc.stdout


def test_run_tests_with_arguments_or_gpu_stack_0_runs_the_main_suite_only(tmp_path):
    base = _run_tests_tree(tmp_path)
    for extra_env, args in (({}, ["tests/test_layer.py"]), ({"GPU_STACK": "0"}, []), ({"TRITON_COMPAT": "0"}, [])):
        rec = tmp_path / f"rec{len(extra_env)}{len(args)}{sorted(extra_env)}"
        rec.mkdir()
        env = {**base, **extra_env, "REC": str(rec), "MAIN_RC": "5", "STACK_RC": "0", "FALLBACK_RC": "0"}
        proc = subprocess.run(["bash", "scripts/run_tests.sh", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 5, proc.stdout + proc.stderr
        calls = (rec / "calls").read_text()
        assert "stack" not in calls and "fallback" not in calls and "GPU-stack" not in proc.stdout, calls
        assert "next" not in calls and "next Triton" not in proc.stdout, calls
        assert f"args=-m pytest -q -ra --durations=15 tests {' '.join(args)}".rstrip() in calls, calls


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
def test_run_tests_interrupted_stops_the_stack_beside_it(tmp_path, sig):
    """Ctrl-C (SIGINT to the foreground process group) or SIGTERM to it ends the main suite; the stack, in a
    session of its own so that it does not get it, is killed with its children, not left running."""
    env = _run_tests_tree(tmp_path, stack='sleep 60 & echo $! > "$REC/stack_child"; wait\n',
                          python='#!/usr/bin/env bash\necho started > "$REC/main"; sleep 60\n')  # fmt: skip
    env["REC"] = str(tmp_path)
    proc = subprocess.Popen(["bash", "scripts/run_tests.sh"], cwd=tmp_path, env=env, start_new_session=True,
                            preexec_fn=_terminal_signals,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not ((tmp_path / "main").exists() and (tmp_path / "stack_child").exists()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    child = int((tmp_path / "stack_child").read_text())
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the stack's child outlived run_tests.sh"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
def test_next_triton_smoke_interrupted_stops_its_shards(tmp_path, sig):
    """The next Triton's smoke runs its shards as background jobs, each in a process group of its own: Ctrl-C
    or SIGTERM to the script's group ends it with 130 and kills every shard with its children."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / ".complete").touch()
    (tmp_path / "scripts").mkdir()  # a copy, so that the shards' logs go to tmp_path/.cache, not the checkout's
    shutil.copy(ROOT / "scripts" / "run_next_triton_tests.sh", tmp_path / "scripts")
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text('#!/usr/bin/env bash\ncase "$*" in "-c "*) echo "triton 3.9.0 numpy 2.4.6"; exit 0 ;; esac\n'
                  'sleep 60 & echo $! >> "$REC/shards"; wait\n')  # fmt: skip
    py.chmod(0o755)
    env = {**os.environ, "VENV": str(py.parents[1]), "NEXT_TRITON_DIR": str(tmp_path / "triton"),
           "NEXT_TRITON_JOBS": "3", "REC": str(tmp_path)}  # fmt: skip
    env.pop("NEXT_TRITON", None)
    proc = subprocess.Popen(["bash", "scripts/run_next_triton_tests.sh"], cwd=tmp_path, env=env,
                            start_new_session=True, preexec_fn=_terminal_signals,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    shards = tmp_path / "shards"
    deadline = time.monotonic() + 30
    while not (shards.exists() and len(shards.read_text().split()) == 3):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    children = [int(v) for v in shards.read_text().split()]
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{c}").exists() for c in children), "a shard outlived run_next_triton_tests.sh"


# ---- scripts/gpu_check.sh: the device session's plan (steps in order, a time budget, a prebuilt _C) ----

_STUB_PY = """#!/usr/bin/env bash
# The test venv's python, except that installs do nothing (pure-Python, prebuilt) or fail (builds).
if [ "$1 $2" = "-m pip" ] || [ "$1" = setup.py ]; then
  [ "${LORA_KERNELS_SKIP_CUDA_BUILD:-0}" = 1 ] && [ "$1" != setup.py ] && exit 0
  echo "stub: no build here: $*"; exit 3
fi
exec %s "$@"
"""


def torch_sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _repo_copy(tmp_path: Path) -> Path:
    """What the install step reads (scripts, the package, the sources), without any built binary, in a
    scratch directory: the step writes into lora_kernels/. (Not `git ls-files`: the GPU-stack stage runs
    the suite in a copy that is no git checkout.)"""
    dst = tmp_path / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py")
    for part in ("scripts", "lora_kernels", "csrc"):
        shutil.copytree(ROOT / part, dst / part, ignore=skip)
    return dst


def _stub_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(_STUB_PY % sys.executable)
    (venv / "bin" / "python").chmod(0o755)
    return venv


def _gpu_check(repo: Path, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    """gpu_check.sh in ``repo`` with ``env`` over this environment (a None value removes the variable)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "BENCH_", "VERIFY_"))}
    # No Triton cache seed from this checkout's .device/ unless a test gives one; a cache of the test's own.
    hermetic = {"GPU_CHECK_TRITON_CACHE": "", "TRITON_CACHE_DIR": str(repo / ".pytest-triton-cache")}
    env = {**base, "VENV": str(Path(sys.executable).parent.parent), **hermetic, **env}
    env = {k: v for k, v in env.items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="gpu-check-test-") as logs:
        # The script's default is a fresh mktemp directory kept for the user: a test that does not
        # read the logs gets one that goes away with it.
        env.setdefault("GPU_CHECK_LOGS", logs)
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


# Each tool a step starts (bench, verify, ncu_profile, pytest) records its command line, the environment
# it was handed and what the check had packed by then, and prints a table line instead of running.
_PROBE = """
import json, os, sys, tarfile
tools = {"bench.lora_linear": "bench", "bench.ncu_profile": "profile", "bench.kernel_times": "kernels",
         "bench.host_profile": "host", "verify": "verify", "pytest": "tests"}
tool = next((t for a, t in tools.items() if a in sys.orig_argv[1:4]), None)
if tool:
    archive = os.environ["GPU_CHECK_ARCHIVE"]
    keys = ("LORA_KERNELS_AUTOTUNE", "LORA_KERNELS_NO_JIT", "PYTHONPATH", "LORA_KERNELS_CUTLASS_DIR", "CUDA_HOME",
            "LORA_KERNELS_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST", "TRITON_CACHE_DIR", "HF_HUB_OFFLINE",
            "LORA_KERNELS_TEST_DEADLINE", "MAX_JOBS")
    rec = dict(tool=tool, argv=sys.orig_argv[1:], env={k: os.environ.get(k) for k in keys},
               packed=tarfile.open(archive).getnames() if os.path.exists(archive) else [],
               cache_packed=os.path.exists(os.environ["GPU_CHECK_TRITON_CACHE_OUT"]))
    with open(os.environ["PROBE_OUT"], "a") as f:
        f.write(json.dumps(rec) + "\\n")
    print(f"| probe | {tool} |", flush=True)
    os._exit(0)
"""


def _probe_dir(tmp_path: Path) -> Path:
    """A directory for PYTHONPATH: the probe above, and an `xdist` that imports (the tests step then asks
    for workers)."""
    probe = tmp_path / "probe"
    (probe / "xdist").mkdir(parents=True)
    (probe / "xdist" / "__init__.py").write_text("")
    (probe / "sitecustomize.py").write_text(_PROBE)
    return probe


def _probed(records: Path) -> dict[str, dict]:
    return {r["tool"]: r for r in map(json.loads, records.read_text().splitlines())}


def _plan_values(env: dict | None = None) -> dict[str, str]:
    """The short plan's variables as gpu_check.sh and device_prebuild.sh source them (``env`` first)."""
    names = ("BENCH_ARGS", "VERIFY_ARGS", "BENCH_AUTOTUNE", "VERIFY_AUTOTUNE", "GPU_CHECK_TESTS", "PYTEST_ARGS")
    script = "source scripts/gpu_check_short_plan.sh; printf '%s\\0' " + " ".join(f'"${n}"' for n in names)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "BENCH_", "VERIFY_", "PYTEST_"))}
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**base, **(env or {})})  # fmt: skip
    return dict(zip(names, proc.stdout.split("\0"), strict=False))


def test_gpu_check_hands_each_step_its_arguments_and_environment(tmp_path):
    """What each step's tool is started with, in a child shell under a budget (so only what is exported
    reaches it): its arguments (BENCH_OUT, the verify JSON, quoted test paths and -k, xdist workers),
    the per-step autotune switches, and after the install the checkout on PYTHONPATH, no JIT build, the
    CUTLASS headers of third_party/, the Hopper-only arch list. The logs and the Triton cache are packed
    after each step (a call stopped mid-way returns what the finished steps wrote), and the tables of
    verify, profile and bench are repeated before the summary."""
    repo = _repo_copy(tmp_path)
    (repo / "third_party" / "cutlass" / "include" / "cutlass").mkdir(parents=True)
    (repo / "third_party" / "cutlass" / "include" / "cutlass" / "cutlass.h").write_text("// stand-in\n")
    probe = _probe_dir(tmp_path)
    cache = tmp_path / "cache"
    (cache / "k1").mkdir(parents=True)
    (cache / "k1" / "__grp__k.json").write_text('{"child_paths": {}}')
    out, logs, records = tmp_path / "out", tmp_path / "logs", tmp_path / "records.jsonl"
    out.mkdir()
    env = {
        "VENV": str(_stub_venv(tmp_path)), "PYTHONPATH": str(probe), "PROBE_OUT": str(records),
        "GPU_CHECK_PREBUILT": str(tmp_path / "none"), "GPU_CHECK_STEPS": "install,verify,bench,kernels,host,tests",
        "GPU_CHECK_PROFILE": "1", "NCU": "true", "GPU_CHECK_BUDGET": "400", "STEP_TIMEOUT": "100",
        "GPU_CHECK_CAP_VERIFY": "45", "GPU_CHECK_CAP_BENCH": "50", "GPU_CHECK_LOGS": str(logs),
        "BENCH_ARGS": "--m 64 --impls cublas", "BENCH_OUT": str(out / "bench"), "BENCH_AUTOTUNE": "0",
        "VERIFY_ARGS": "--backend torch", "VERIFY_AUTOTUNE": "1",
        "GPU_CHECK_TESTS": "tests/test_a.py 'tests/b c.py'", "PYTEST_ARGS": '-k "x or y"',
        "GPU_CHECK_ARCHIVE": str(out / "logs.tar.gz"), "GPU_CHECK_TRITON_CACHE_OUT": str(out / "cache.tar.gz"),
        "TRITON_CACHE_DIR": str(cache), "LORA_KERNELS_AUTOTUNE": None, "LORA_KERNELS_NO_JIT": None,
        "LORA_KERNELS_CUTLASS_DIR": None, "LORA_KERNELS_CUDA_ARCHS": None, "TORCH_CUDA_ARCH_LIST": None,
        "MAX_JOBS": None, "KERNELS_ARGS": "--impls cublas -p 0.1", "PROFILE_ARGS": "--impls naive --steps 1",
        "HOST_ARGS": "--steps 5 --p 0",
    }  # fmt: skip
    start = time.time()
    proc = _gpu_check(repo, env)
    text = proc.stdout
    assert proc.returncode == 1 and "| install | FAILED (exit 3) |" in text, text + proc.stderr  # the stub's pip
    for step, limit in (("verify", 45), ("bench", 50), ("kernels", 100), ("host", 100), ("tests", 100),
                        ("profile", 100)):  # fmt: skip
        assert f"=== gpu-check: {step} (limit {limit} s" in text and f"| {step} | ok |" in text, text
    rec = _probed(records)
    assert list(rec) == ["verify", "bench", "kernels", "host", "tests", "profile"], list(rec)
    argv = {t: r["argv"][1:] for t, r in rec.items()}  # after "-m"
    assert argv["verify"] == ["lora_kernels", "verify", "--backend", "torch", "--json", f"{logs}/verify.json"]
    assert argv["bench"] == ["bench.lora_linear", "--m", "64", "--impls", "cublas", "--out", f"{out}/bench"]
    assert argv["tests"] == ["pytest", "-ra", "-n", "8", "-v", "tests/test_a.py", "tests/b c.py", "-k", "x or y"]
    assert argv["kernels"] == ["bench.kernel_times", "--impls", "cublas", "-p", "0.1"]
    assert argv["profile"] == ["bench.ncu_profile", "--impls", "naive", "--steps", "1"]
    assert argv["host"] == ["bench.host_profile", "--steps", "5", "--p", "0"]
    autotune = {t: r["env"]["LORA_KERNELS_AUTOTUNE"] for t, r in rec.items() if t != "tests"}
    assert autotune == {"verify": "1", "bench": "0", "kernels": "0", "host": "0", "profile": "0"}, autotune
    deadline = int(rec["tests"]["env"]["LORA_KERNELS_TEST_DEADLINE"])
    assert start + 100 - 30 - 5 <= deadline <= time.time() + 100 - 30  # the step's limit less 30 s
    for t, r in rec.items():
        e = r["env"]
        assert e["PYTHONPATH"].split(os.pathsep)[:2] == [str(repo), str(probe)], (t, e)
        assert e["LORA_KERNELS_NO_JIT"] == "1" and e["HF_HUB_OFFLINE"] == "1" and e["TRITON_CACHE_DIR"] == str(cache)
        assert e["LORA_KERNELS_CUTLASS_DIR"] == str(repo / "third_party" / "cutlass"), (t, e)
        assert e["MAX_JOBS"].isdigit() and int(e["MAX_JOBS"]) > 0, (t, e)  # nproc when not given
        if e["CUDA_HOME"]:  # a toolkit found: a fallback build on the device compiles for Hopper only
            assert e["LORA_KERNELS_CUDA_ARCHS"] == "90" and e["TORCH_CUDA_ARCH_LIST"] == "9.0", (t, e)
    # Packed after each step: what the tests step found already there.
    assert {"./install.log", "./verify.log", "./bench.log"} <= set(rec["tests"]["packed"])
    assert "./tests.log" not in rec["tests"]["packed"] and rec["tests"]["cache_packed"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"./tests.log", "./profile.log"} <= set(tar.getnames())
    tables = text.split("=== gpu-check summary")[0]
    for step in ("verify", "kernels", "host", "profile", "bench"):
        assert f"=== gpu-check: {step} table\n| probe | {step} |" in tables, tables


def test_short_plan_hands_the_steps_its_own_arguments(tmp_path):
    """Call 1 of the runbook as its steps see it. The plan's defaults are shell variables of a sourced
    file: only what gpu_check.sh exports reaches the steps' child shells (a step run under a limit)."""
    records, out, logs = tmp_path / "records.jsonl", tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    env = {"GPU_CHECK_PLAN": "short", "GPU_CHECK_STEPS": "verify,host,bench,tests",
           "PYTHONPATH": str(_probe_dir(tmp_path)), "PROBE_OUT": str(records), "BENCH_OUT": str(out),
           "GPU_CHECK_LOGS": str(logs),
           "GPU_CHECK_ARCHIVE": str(out / "logs.tar.gz"), "GPU_CHECK_TRITON_CACHE_OUT": str(out / "cache.tar.gz"),
           "LORA_KERNELS_AUTOTUNE": None}  # fmt: skip
    proc = _gpu_check(ROOT, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step, limit in (("verify", "45 s"), ("host", "60 s"), ("bench", "140 s"), ("tests", "1")):  # tests: what's left
        assert f"=== gpu-check: {step} (limit {limit}" in proc.stdout, proc.stdout
    plan, rec = _plan_values(), _probed(records)
    assert rec["verify"]["argv"][1:] == ["lora_kernels", "verify", *shlex.split(plan["VERIFY_ARGS"]), "--json",
                                         f"{logs}/verify.json"]  # fmt: skip
    assert rec["bench"]["argv"][1:] == ["bench.lora_linear", *shlex.split(plan["BENCH_ARGS"]), "--out", str(out)]
    assert rec["tests"]["argv"][1:] == ["pytest", "-ra", "-n", "8", "-v", *shlex.split(plan["GPU_CHECK_TESTS"]),
                                        *shlex.split(plan["PYTEST_ARGS"])]  # fmt: skip
    assert "--impls" in rec["bench"]["argv"] and "tests/test_lora_linear.py" in rec["tests"]["argv"]
    autotune = {t: r["env"]["LORA_KERNELS_AUTOTUNE"] for t, r in rec.items()}
    assert autotune == {"verify": "0", "host": "0", "bench": "0", "tests": None}, autotune
    # (a node id with brackets reaches pytest as it is: no glob expansion on the way)
    assert "tests/test_lora_linear.py::test_backward_split_sums_under_load[tuned]" in rec["tests"]["argv"]


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
    proc = _gpu_check(ROOT, {"GPU_CHECK_PLAN": "short", "GPU_CHECK_STEPS": "environment,verify"})
    assert "steps=environment,verify budget=360s" in proc.stdout, proc.stdout
    assert "=== gpu-check: environment (limit 3" in proc.stdout and "| environment | ok |" in proc.stdout
    if not torch_sees_gpu():  # the plan stops after environment on a machine without a GPU
        assert proc.returncode == 1 and "| (the rest) | skipped (no CUDA GPU) |" in proc.stdout, proc.stdout
        assert "=== gpu-check: verify" not in proc.stdout


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


def test_gpu_check_tests_step_stopped_at_its_limit_still_prints_pytest_summary(tmp_path):
    """A test still running at the step's limit: pytest gets SIGINT (not TERM, on which it dies without a
    word), so the log and the report end with its summary. PYTEST_ARGS is parsed like a command line:
    a quoted -k expression stays one argument. (A file outside tests/: no conftest deadline applies.)"""
    tests = tmp_path / "test_slow.py"
    tests.write_text("import time\n\ndef test_fast():\n    pass\n\ndef test_slow():\n    time.sleep(120)\n")
    env = {"GPU_CHECK_STEPS": "tests", "GPU_CHECK_CAP_TESTS": "8", "GPU_CHECK_WORKERS": "0",
           "GPU_CHECK_TESTS": str(tests), "PYTEST_ARGS": '-p no:cacheprovider -k "fast or slow"',
           "GPU_CHECK_LOGS": str(tmp_path / "logs")}  # fmt: skip
    proc = _gpu_check(ROOT, env, timeout=60)
    assert proc.returncode == 1 and "| tests | FAILED (exit 124) |" in proc.stdout, proc.stdout + proc.stderr
    log = (tmp_path / "logs" / "tests.log").read_text()
    assert "KeyboardInterrupt" in log and "1 passed in" in log, log
    assert proc.stdout.splitlines()[-1].startswith("tests: 1 passed in"), proc.stdout


def test_gpu_check_splits_a_large_triton_cache_and_seeds_from_the_parts(tmp_path):
    """The device tool returns no file over 16 MiB: a larger packed cache comes back in parts, packed
    after every step (a call stopped later keeps them), and the next call's seed reads the parts."""
    cache, out = tmp_path / "cache", tmp_path / "out" / "triton-cache.tar.gz"
    (cache / "k1").mkdir(parents=True)
    (cache / "k1" / "kernel.cubin").write_bytes(os.urandom(200_000))  # incompressible: 4 parts of 64 KiB
    (cache / "k1" / "__grp__kernel.json").write_text('{"child_paths": {}}')
    (cache / "k2").mkdir()
    (cache / "k2" / "__triton_launcher.so").write_bytes(b"launcher")  # built with gcc on the device
    (cache / "PREWARM_INFO").write_text("cache_dir=/elsewhere\nplan=abc123\n")  # the seed's plan digest
    out.parent.mkdir()
    # An older whole archive next to the parts (a previous seed not removed): the newer parts win.
    stale = tmp_path / "stale"
    (stale / "k9").mkdir(parents=True)
    (stale / "k9" / "old.cubin").write_bytes(b"old")
    with tarfile.open(out, "w:gz") as tar:
        tar.add(stale / "k9", arcname="k9")
    os.utime(out, (1, 1))
    env = {"GPU_CHECK_STEPS": "environment", "TRITON_CACHE_DIR": str(cache), "GPU_CHECK_TRITON_CACHE_OUT": str(out),
           "GPU_CHECK_PART_BYTES": "65536", "GPU_CHECK_ARCHIVE": str(tmp_path / "out" / "logs.tar.gz")}  # fmt: skip
    proc = _gpu_check(ROOT, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = sorted(p.name for p in out.parent.iterdir())
    assert parts == ["logs.tar.gz", *(f"triton-cache.tar.gz.part0{i}" for i in range(4))], parts
    # (pack_triton_cache removed the stale whole archive; put it back, older than the parts)
    with tarfile.open(out, "w:gz") as tar:
        tar.add(stale / "k9", arcname="k9")
    os.utime(out, (1, 1))
    fresh = tmp_path / "fresh"
    env = {"GPU_CHECK_STEPS": "environment", "TRITON_CACHE_DIR": str(fresh), "GPU_CHECK_TRITON_CACHE": str(out)}
    proc = _gpu_check(ROOT, env)
    assert f"seeded from {out}: 1 kernels" in proc.stdout, proc.stdout
    assert (fresh / "k1" / "kernel.cubin").read_bytes() == (cache / "k1" / "kernel.cubin").read_bytes()
    assert (fresh / "k2" / "__triton_launcher.so").read_bytes() == b"launcher" and not (fresh / "k9").exists()
    info = (fresh / "PREWARM_INFO").read_text()
    assert "plan=abc123\n" in info and f"cache_dir={fresh}\n" in info, info  # the plan carried over


def test_gpu_check_kills_a_step_that_ignores_term(tmp_path):
    """A step that catches TERM and goes on (bench and verify catch it to write what they have; a hung
    CUDA call does not return) is killed 15 s after its limit, and the check goes on to its summary."""
    (tmp_path / "sitecustomize.py").write_text(
        "import signal, sys, time\n"
        "if 'verify' in sys.orig_argv:\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(120)\n"
    )
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    env = {"GPU_CHECK_STEPS": "verify", "GPU_CHECK_CAP_VERIFY": "2", "VERIFY_ARGS": "--backend torch",
           "PYTHONPATH": path, "GPU_CHECK_LOGS": str(tmp_path / "logs")}  # fmt: skip
    start = time.monotonic()
    proc = _gpu_check(ROOT, env, timeout=100)
    assert proc.returncode == 1 and "| verify | FAILED (exit 137) |" in proc.stdout, proc.stdout + proc.stderr
    assert time.monotonic() - start < 60


def test_gpu_check_takes_a_matching_prebuilt_binary_and_refuses_a_stale_one(tmp_path):
    built = sorted((ROOT / "lora_kernels").glob("_C.*.so"))
    info = ROOT / "lora_kernels" / "_build_info.py"
    if not built or not info.exists():
        pytest.skip("lora_kernels._C is not built in this checkout (no CUDA toolkit at install)")
    repo = _repo_copy(tmp_path)
    venv = _stub_venv(tmp_path)
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

    # From these sources but not loadable here (another torch, a truncated copy): not left in the package.
    (pre / "SOURCES_DIGEST").write_text(digest)
    (pre / built[0].name).write_bytes(b"\x7fELF truncated")
    proc = _gpu_check(repo, env)
    assert "the prebuilt binary does not load here: building" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 1 and "stub: no build here" in proc.stdout
    assert not (repo / "lora_kernels" / built[0].name).exists()
    assert not (repo / "lora_kernels" / "_build_info.py").exists()

    shutil.copy2(built[0], pre / built[0].name)
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


# ---- the Triton kernels compiled ahead (scripts/prewarm_triton_cache.py) and gpu_check.sh's cache ----

_PREWARM_BENCH = "--m 256 --shapes 512x512 --ranks 16 --dropout 0.1 --impls triton-bitmask"
_PREWARM_VERIFY = (
    "--backend triton --dtype bf16+fp32a --only-shapes --shape 67,203,130,1 -p 0.1 --mask-mode bitmask --partial"
)


def _prewarm(cache: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    cmd = [sys.executable, "scripts/prewarm_triton_cache.py", "--out", str(out), "--cache-dir", str(cache),
           "--bench-args", _PREWARM_BENCH, "--verify-args", _PREWARM_VERIFY, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_prewarmed_triton_cache_seeds_gpu_check_and_is_hit_there(tmp_path):
    """The device-session path without the device: kernels compiled ahead for sm_90 (the benchmark's and
    verify's launches, on CPU tensors), packed; gpu_check.sh unpacks them into a cache elsewhere and
    re-points Triton's index files; the same launches then compile nothing (every kernel is a hit from
    the new path, in a new process); gpu_check.sh packs the cache again for a second device call."""
    pytest.importorskip("triton")
    first, seed = tmp_path / "first-cache", tmp_path / "seed.tar.gz"
    (first / "stale").mkdir(parents=True)  # a kernel of an earlier prewarm: gone unless --keep
    (first / "stale" / "__grp__old.json").write_text("{}")
    proc = _prewarm(first, seed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bench triton-bitmask Config(M=256, K=512, N=512, r=16, p=0.1): ok" in proc.stdout, proc.stdout
    n = int(proc.stdout.split(" kernels in ")[0].rsplit(" ", 1)[-1])
    assert n >= 6, proc.stdout  # shrink, GEMM, dY, dX, pointer kernels of the odd verify shape, the mask probe
    with tarfile.open(seed) as tar:
        names = tar.getnames()
        info = seed_info = tar.extractfile("PREWARM_INFO").read().decode()
    assert sum(x.endswith(".cubin") for x in names) == n and not any(x.endswith((".ptx", ".llir")) for x in names)
    assert not (first / "stale").exists() and not any(x.startswith("stale") for x in names)
    assert f"cache_dir={first}\n" in info and "arch=90\n" in info and "sms=132\n" in info, info

    # gpu_check.sh, with the cache somewhere else: unpacked, re-pointed, the build recognised.
    second, again, logs = tmp_path / "second-cache", tmp_path / "again.tar.gz", tmp_path / "logs"
    env = {"GPU_CHECK_STEPS": "environment", "TRITON_CACHE_DIR": str(second), "GPU_CHECK_TRITON_CACHE": str(seed),
           "GPU_CHECK_TRITON_CACHE_OUT": str(again), "GPU_CHECK_LOGS": str(logs)}  # fmt: skip
    out = _gpu_check(ROOT, env).stdout
    assert f"seeded from {seed}: {n} kernels" in out and "the same Triton build as here" in out, out
    assert "compiled from other lora_kernels/triton_ops sources" not in out, out
    assert "| environment | ok |" in out and out.split("| environment | ok |")[1].split("\n")[0].endswith("| 0 |")
    grp = [p.read_text() for p in second.glob("*/__grp__*.json")]
    assert len(grp) == n and all(str(second) in g and str(first) not in g for g in grp)

    # The same launches, another process, the re-pointed cache: nothing left to compile.
    proc = _prewarm(second, tmp_path / "unused.tar.gz", "--keep")
    assert proc.returncode == 0 and f"prewarm: 0 kernels compiled, {n} kernels" in proc.stdout, proc.stdout

    # What gpu_check.sh packed for a second call: the cubins and index files, pointing at its cache.
    with tarfile.open(again) as tar:
        names = tar.getnames()
        info = tar.extractfile("./PREWARM_INFO").read().decode()
    assert sum(x.endswith(".cubin") for x in names) == n and f"cache_dir={second}\n" in info
    sources = [next(v for v in i.splitlines() if v.startswith("sources=")) for i in (info, seed_info)]
    assert sources[0] == sources[1]  # this tree's digest


def test_gpu_check_reports_a_seed_from_another_triton_build_or_other_sources(tmp_path):
    cache = tmp_path / "cache"
    (cache / "ABC").mkdir(parents=True)
    (cache / "ABC" / "__grp___k.json").write_text('{"child_paths": {}}')
    (cache / "PREWARM_INFO").write_text(f"cache_dir={cache}\ntriton_key=0000000000000000\nsources=0123\n")
    seed = tmp_path / "seed.tar.gz"
    with tarfile.open(seed, "w:gz") as tar:
        for p in cache.iterdir():
            tar.add(p, arcname=p.name)
    env = {"GPU_CHECK_STEPS": "environment", "TRITON_CACHE_DIR": str(tmp_path / "here"),
           "GPU_CHECK_TRITON_CACHE": str(seed)}  # fmt: skip
    out = _gpu_check(ROOT, env).stdout
    assert "1 kernels, compiled for Triton build 0000000000000000, NOT this Triton build" in out, out
    assert "WARNING: the seed was compiled from other lora_kernels/triton_ops sources" in out, out


def test_short_plan_verifies_on_fixed_tiles():
    """verify autotunes in eager GPU calls (every config of every kernel variant compiles): the 45 s the
    short plan gives it fit the fixed tiles only, like the benchmark's."""
    env = {
        "GPU_CHECK_PLAN": "short",
        "GPU_CHECK_STEPS": "verify",
        "TRITON_CACHE_DIR": "/nonexistent/cache",
        "VERIFY_ARGS": "--backend triton --backend torch --dtype fp32 --only-shapes --shape 3,40,24,2 -p 0",
    }
    out = _gpu_check(ROOT, env).stdout
    assert "autotune=off (fixed tiles)" in out, out
    assert "=== gpu-check: verify (limit 45 s" in out, out  # the runbook's cap, under the 360 s budget
    out = _gpu_check(ROOT, {**env, "GPU_CHECK_PLAN": "", "LORA_KERNELS_AUTOTUNE": "1"}).stdout
    assert "autotune=" in out and "autotune=off (fixed tiles)" not in out, out


def test_prewarm_compiles_nothing_for_a_verify_without_triton(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import prewarm_triton_cache as prewarm

    call = prewarm.verify_call("--backend cuda --dtype bf16 --only-shapes --shape 67,203,130,1")
    assert call() == "skipped: no triton backend in the verify arguments"


def test_prewarm_compiles_every_tuning_config_when_the_run_tunes(tmp_path):
    """With BENCH_AUTOTUNE=1 on the device, the first call of each kernel compiles its whole tuning table
    (what survives the table's prune): the prewarm compiles the same set (Triton's autotuner arguments)."""
    pytest.importorskip("triton")
    cache = tmp_path / "cache"
    cmd = [sys.executable, "scripts/prewarm_triton_cache.py", "--out", str(tmp_path / "t.tar.gz"), "--cache-dir",
           str(cache), "--bench-args", _PREWARM_BENCH, "--bench-autotune"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0 and "every tuning config" in proc.stdout, proc.stdout + proc.stderr
    per_kernel = {}
    for grp in cache.glob("*/__grp__*.json"):
        name = grp.name.removeprefix("__grp__").removesuffix(".json")
        per_kernel[name] = per_kernel.get(name, 0) + 1
    # bf16, rank 16, p = 0.1, the TMA path: lora_linear._configs() less what _prune drops for 16-bit operands
    # (the fp32 family: BLOCK_K = 32 in the tables, also for _bwd_dy_kernel, which takes no BLOCK_K); of the dX
    # kernel's 9, its three 256-wide output tiles are kept (rank 16, the mask from a bitmask), the 4-stage one
    # that stores in halves is not (it does not fit with dropout); the forward's 4-stage one is kept.
    assert per_kernel == {"_shrink_kernel": 4, "_fwd_tma_kernel": 5, "_bwd_dy_kernel": 4, "_bwd_dx_tma_kernel": 8}


_SAME_LAUNCHES = """
import argparse, io, json, shlex, sys
import torch
sys.path[:0] = ["scripts", "."]
import prewarm_triton_cache as prewarm
from bench import lora_linear as bl
from lora_kernels import verify
from lora_kernels.triton_ops.compile_only import compile_only

def kernels(run):
    seen = []
    with compile_only(seen.append):
        run()
    return sorted({f"{c.kernel} {c.compiled.hash}" for c in seen})

bench_args, verify_args = sys.argv[1:3]
got = {"prewarm_bench": kernels(lambda: [call() for _, call in prewarm.bench_calls(bench_args)])}
# The benchmark's own rows as main() runs them (its measure(): untimed step, rel_err, saved bytes, timings).
args = bl.parse_args([*shlex.split(bench_args), "--cpu-reps", "1"])
args.dtype = args.dtype or "bf16"
cpu = torch.device("cpu")
got["bench"] = kernels(lambda: [bl.run_config(c, args.impls, args, cpu, {}, "") for c in bl.build_configs(args)])
got["prewarm_verify"] = kernels(prewarm.verify_call(verify_args))
# verify's own sweep with its float64 reference, as on the device: the one device-dependent choice of
# its launches is the mask probe's size (the interpreter gets a smaller one).
ap = argparse.ArgumentParser()
verify.add_verify_args(ap)
vargs = ap.parse_args([*shlex.split(verify_args), "--device", "cpu", "--no-progress"])
verify.probe_size = lambda device_type, size=verify.probe_size("cuda"): size
got["verify"] = kernels(lambda: verify.run_verify(vargs, out=io.StringIO(), err=io.StringIO()))
print(json.dumps(got))
"""


def test_prewarm_replays_the_benchmarks_and_verifys_own_launches(tmp_path):
    """The prewarm rebuilds the benchmark's problems itself (dtype, adapter dtype, bias, frozen adapters)
    and runs verify with a stand-in reference and the device's probe size: whatever it launches
    differently compiles other kernels, which the device then compiles inside its timed steps. Under
    compile_only both must compile the same kernels (names and Triton's hashes)."""
    pytest.importorskip("triton")
    bench = ("--m 256 --shapes 512x512 --ranks 16 --dropout 0,0.1 --dtype fp16 --adapter-dtype fp32 --bias --frozen A "
             "--impls cublas,triton-bitmask,triton-regen,triton-flat,triton-1pass")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORA_KERNELS_AUTOTUNE")}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", _SAME_LAUNCHES, bench, _PREWARM_VERIFY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    names = {k.split()[0] for k in got["bench"]}
    assert {"_shrink_kernel", "_fwd_tma_kernel", "_fwd_single_pass_kernel", "_bwd_single_pass_kernel"} <= names
    assert got["prewarm_bench"] == got["bench"]
    assert {k.split()[0] for k in got["verify"]} >= {"_shrink_kernel", "_fwd_kernel", "_bwd_dx_kernel"}
    assert got["prewarm_verify"] == got["verify"]


# ---- scripts/device_preflight.py: is what a device call carries the committed code and plan? ----


def _preflight_repo(tmp_path: Path) -> Path:
    """A committed copy of what the digests read, with a .device/ and CUTLASS stand-in that match it."""
    repo = _repo_copy(tmp_path)
    (repo / "third_party" / "cutlass" / "include" / "cutlass").mkdir(parents=True)
    (repo / "third_party" / "cutlass" / "include" / "cutlass" / "cutlass.h").write_text("// stand-in\n")
    (repo / ".gitignore").write_text(".device/\nthird_party/\n__pycache__/\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=repo, check=True)
    digest = subprocess.run([sys.executable, "lora_kernels/cuda_ops/_build.py", "digest"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    (repo / ".device" / "prebuilt").mkdir(parents=True)
    (repo / ".device" / "prebuilt" / "SOURCES_DIGEST").write_text(digest)
    _device_cache(repo)
    return repo


def _device_cache(repo: Path, env: dict | None = None, key: str = "abc", arcname: str = "PREWARM_INFO") -> None:
    """.device/triton-cache.tar.gz as make device-prebuild writes it for the short plan under ``env``:
    device_prebuild.sh sources the plan and hands its arguments and autotune flags to the prewarm."""
    v = _plan_values(env)
    plan = [v["BENCH_ARGS"], v["VERIFY_ARGS"], v["BENCH_AUTOTUNE"], v["VERIFY_AUTOTUNE"]]
    probe = (
        "import sys; sys.path[:0] = ['scripts']; import prewarm_triton_cache as p; "
        "print(p.plan_digest(sys.argv[1], sys.argv[2], sys.argv[3] == '1', sys.argv[4] == '1')); "
        "print(p.kernel_sources_digest())"
    )
    plan, sources = subprocess.run([sys.executable, "-c", probe, *plan], cwd=repo, capture_output=True, text=True,
                                   check=True).stdout.split()  # fmt: skip
    info = repo.parent / "PREWARM_INFO"
    info.write_text(f"triton_key={key}\ntriton=3.6.0\nkernels=32\nsources={sources}\nplan={plan}\n")
    with tarfile.open(repo / ".device" / "triton-cache.tar.gz", "w:gz") as tar:
        tar.add(info, arcname=arcname)


def _preflight(repo: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "BENCH_", "VERIFY_"))}
    return subprocess.run([sys.executable, "scripts/device_preflight.py"], cwd=repo, env={**base, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_device_preflight_passes_a_matching_device_dir_and_names_each_mismatch(tmp_path):
    repo = _preflight_repo(tmp_path)
    proc = _preflight(repo)
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout + proc.stderr
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert (repo / ".device" / "COMMIT").read_text().strip() == head.stdout.strip()

    # Another plan than the cache was compiled for (the environment overrides the short plan's arguments).
    proc = _preflight(repo, BENCH_ARGS="--m 4096 --impls cublas,triton-bitmask")
    assert proc.returncode == 1 and "FAIL Triton cache for plan" in proc.stdout, proc.stdout

    # Uncommitted kernel and extension edits: the tree, the binary's digest and the kernels' sources.
    with open(repo / "csrc" / "lora_ops.cpp", "a") as f:
        f.write("// edited\n")
    with open(repo / "lora_kernels" / "triton_ops" / "philox.py", "a") as f:
        f.write("# edited\n")
    proc = _preflight(repo)
    assert proc.returncode == 1, proc.stdout
    for line in ("FAIL uncommitted changes", "FAIL prebuilt _C built from", "FAIL Triton cache from sources"):
        assert line in proc.stdout, proc.stdout
    assert "not ready" in proc.stdout.splitlines()[-1]


def test_device_preflight_reads_a_returned_cache_and_fails_on_key_headers_size_and_untracked_files(tmp_path):
    repo = _preflight_repo(tmp_path)
    # The cache a device call returned (gpu_check.sh packs "./PREWARM_INFO"), copied over the seed as the
    # runbook says: read like the prewarm's own.
    _device_cache(repo, arcname="./PREWARM_INFO")
    assert _preflight(repo).returncode == 0
    # A cache compiled for the tuned benchmark fits a call that tunes it, not one that does not.
    _device_cache(repo, env={"BENCH_AUTOTUNE": "1"})
    assert _preflight(repo, BENCH_AUTOTUNE="1").returncode == 0
    proc = _preflight(repo)
    assert proc.returncode == 1 and "FAIL Triton cache for plan" in proc.stdout, proc.stdout
    _device_cache(repo, key="")
    proc = _preflight(repo)
    assert proc.returncode == 1 and "FAIL Triton cache has no build key" in proc.stdout, proc.stdout
    _device_cache(repo)
    # Over the device tool's 64 MiB of carried paths (a sparse file: its size counts, not its blocks).
    with open(repo / ".device" / "big.bin", "wb") as f:
        f.truncate(65 * 2**20)
    proc = _preflight(repo)
    assert proc.returncode == 1 and "FAIL tree + .device + third_party = 6" in proc.stdout, proc.stdout
    (repo / ".device" / "big.bin").unlink()
    shutil.rmtree(repo / "third_party")
    (repo / "new_module.py").write_text("# untracked: travels to the device, but no commit names it\n")
    (repo / ".device" / "COMMIT").unlink()  # (written by the passing runs above)
    proc = _preflight(repo)
    assert proc.returncode == 1 and not (repo / ".device" / "COMMIT").exists(), proc.stdout
    assert "FAIL no third_party/cutlass" in proc.stdout and "?? new_module.py" in proc.stdout, proc.stdout
