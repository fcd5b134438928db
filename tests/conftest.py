"""Test setup: on a machine without a CUDA GPU the Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set here,
before lora_kernels is imported by any test module.
"""

import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Autotuning benchmarks every config for every new (M bucket, N, K, rank): across the hundreds of
# shapes the suite uses that would take many minutes on a GPU. Tests use the fixed tiles;
# test_triton_autotune_gpu covers the tuned path on one shape.
os.environ.setdefault("LORA_KERNELS_AUTOTUNE", "0")


def pytest_configure(config):
    # scripts/run_gpu_stack_tests.sh reruns the suite on the GPU image's torch and Triton (a second
    # venv): refuse to pass if that run silently picked up other versions.
    want = os.environ.get("LORA_KERNELS_EXPECT_TRITON")
    if want:
        import triton

        if triton.__version__ != want:
            raise pytest.UsageError(f"LORA_KERNELS_EXPECT_TRITON={want} but triton {triton.__version__} was imported")
    want = os.environ.get("LORA_KERNELS_EXPECT_TORCH")
    if want and torch.__version__.split("+")[0] != want:
        raise pytest.UsageError(f"LORA_KERNELS_EXPECT_TORCH={want} but torch {torch.__version__} was imported")


# A time-limited device session (scripts/gpu_check.sh's budget) stops starting tests at this moment
# (epoch seconds; 0 or unset: never), so pytest ends with its summary instead of being killed mid-run.
_DEADLINE = float(os.environ.get("LORA_KERNELS_TEST_DEADLINE") or 0)


def pytest_runtest_setup(item):
    if _DEADLINE and time.time() > _DEADLINE:
        pytest.skip("not started: the time budget of this run (LORA_KERNELS_TEST_DEADLINE) was spent")


def pytest_report_header(config):
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    return (
        f"lora_kernels tests: device={dev}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"triton {triton.__version__}"
    )


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
