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


def pytest_addoption(parser):
    parser.addoption(
        "--shard",
        metavar="I/N",
        help="run every N-th collected test from the I-th (0-based) on: N processes with I = 0 .. N-1 run the "
        "selection between them (scripts/run_next_triton_tests.sh runs its smoke so, one process per core)",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard takes I/N (two integers), got {spec!r}") from None
    if not 0 <= i < n:
        raise pytest.UsageError(f"--shard {spec}: I must be in 0 .. N-1")
    # Every N-th test, not a contiguous block: a file's parametrized cases sit together and cost alike, so
    # taking turns gives each shard about the same share of each file.
    config.hook.pytest_deselected(items=[t for k, t in enumerate(items) if k % n != i])
    items[:] = items[i::n]


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


@pytest.fixture(scope="session")
def _cuda_ops_emu_build(tmp_path_factory):
    """``csrc/lora_ops.cpp`` compiled for the CPU over the kernel emulation (tests/cuda_emu/ops_emu.cpp),
    once per session (≈ 70 s on 2 cores)."""
    import shutil
    from pathlib import Path

    from torch.utils.cpp_extension import load

    from tests.test_cuda_emulation import _cuda_include

    if (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")) is None:
        pytest.skip("no host C++ compiler to build csrc/lora_ops.cpp for the CPU")
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_runtime.h, cuda_fp16.h): neither a CUDA toolkit nor pip's nvidia headers")
    root = Path(__file__).resolve().parents[1]
    emu = root / "tests" / "cuda_emu"
    mod = load(
        name="lora_ops_emu",
        sources=[str(emu / "ops_emu.cpp")],
        # shim/ first: its ATen/cuda and c10/cuda headers stand in for torch's CUDA ones.
        extra_include_paths=[str(emu / "shim"), str(root / "csrc"), str(emu), str(inc)],
        extra_cflags=["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas"],
        extra_ldflags=["-pthread"],
        build_directory=str(tmp_path_factory.mktemp("ops_emu")),
    )
    return mod


@pytest.fixture
def cuda_ops_emu(_cuda_ops_emu_build):
    """The CUDA backend's host code on CPU tensors (see ``_cuda_ops_emu_build``).

    A block's threads run one at a time, last to first (emu_runtime.h): deterministic, and several times
    faster here than OS threads at a barrier (races are test_cuda_emulation.py's business). Deterministic
    algorithms are on during the test: ``at::empty`` in lora_ops.cpp then comes back NaN-filled, so an
    output element no kernel writes fails the comparison.
    """
    mod = _cuda_ops_emu_build
    mod.set_schedule(2)
    mod.set_split_min_c(32)  # small shapes take the split-reduction path too (as the harness does)
    mod.set_device(9, 0, True)  # an H100, sm90a kernels compiled, GEMM path chosen as on the GPU
    mod.set_gemm_backend(0)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield mod
    torch.use_deterministic_algorithms(prev)


class _Spy:
    """The emulated extension, recording which entry points the Python layer calls and which GEMM path
    each call ended on (lora_ops.cpp's ``last_gemm_path``, lora_ops.h's GemmBackend numbering)."""

    def __init__(self, mod):
        self._mod = mod
        self.calls: list[str] = []
        self.paths: list[int] = []

    def lora_fwd(self, *args):
        self.calls.append("lora_fwd")
        self.fwd_save_mask = args[9]
        try:
            return self._mod.lora_fwd(*args)
        finally:  # also when it raises: paths[i] stays the path of calls[i]
            self.paths.append(self._mod.last_gemm_path())

    def lora_bwd(self, *args):
        self.calls.append("lora_bwd")
        self.bwd_needs = tuple(args[10:13])
        try:
            return self._mod.lora_bwd(*args)
        finally:  # also when it raises: paths[i] stays the path of calls[i]
            self.paths.append(self._mod.last_gemm_path())


@pytest.fixture
def emu_cuda(cuda_ops_emu, monkeypatch) -> _Spy:
    """backend="cuda" served by the emulated extension (``cuda_ops_emu``) on CPU tensors."""
    from lora_kernels.cuda_ops import _ext
    from lora_kernels.cuda_ops import lora_linear as cuda_ll

    spy = _Spy(cuda_ops_emu)
    monkeypatch.setattr(_ext, "get_ext", lambda build=True: spy)

    def unavailable_reason(x, weight, lora_A):  # the real one needs CUDA tensors; its dtype rule stays
        for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A)):
            if t.dtype not in cuda_ll._DTYPES:
                return f"{name} dtype {t.dtype} is not supported by the cuda backend"
        return None

    monkeypatch.setattr(cuda_ll, "unavailable_reason", unavailable_reason)
    return spy
