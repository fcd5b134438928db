"""The CUDA backend's low-rank and dropout-mask kernels, run on the CPU.

``csrc/lowrank_kernels.cuh`` (the device code ``lowrank.cu`` launches) is compiled with the host C++
compiler by ``tests/cuda_emu/harness.cpp``: 256 threads per block, a barrier for ``__syncthreads``.
The harness replays the launch sequence of ``csrc/lora_ops.cpp`` forward and backward, with the
CUTLASS GEMMs as plain loops, over odd shapes (M, K, N ∈ {1…72}, r ∈ {1, 16, 65}, plus reductions of
1030–1100), strided and column-major x, p ∈ {0, 0.3}, saved and regenerated masks, fp32, bf16 x with
fp32 adapters and fp16 storage, the backward's reductions split over blockIdx.z (the launcher's own
plan), empty problems (M, K or N = 0: dA and dB must come out as zeros), and checks T, y, the bits,
dT, dA, dB, dlora_bias and dX against float64 (the bits exactly).
The 16-bit cases take the tensor-core skinny kernel, whose WMMA calls run on a host emulation of the
API (``tests/cuda_emu/wmma_emu.h``, which also checks its alignment and leading-dimension rules); the
16-bit results are checked with an elementwise rounding bound (3u·Σ|terms|), and where both operands
are fp16 already (T's and dT's products are then exact) with the fp32 accumulation's own bound, so
16-bit accumulation cannot pass. Two cases put a Philox value exactly on the keep threshold (saved
and regenerated masks: a ``>`` for ``>=`` fails them), the regenerated mask is compared bit for bit
(tail bits zero), and r = 7 fills the fused pack's 8 columns with one bias column. The fused
forward's and p = 0 dX's decompositions (pack kernel, then one GEMM over a concatenated K, here a
loop) are checked too; ``--random`` draws further cases (r up to 256). ``lora_ops.cpp`` itself (not
this replay of it) runs on the CPU in tests/test_cuda_ops_emulation.py, over the same emulation
(``tests/cuda_emu/emu_runtime.h``). What neither covers: the CUTLASS/cuBLAS GEMMs, the real WMMA
fragment hardware and real concurrency between blocks: those wait for a GPU (tests/test_cuda_backend.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_emu" / "harness.cpp"


def _cuda_include() -> Path | None:
    """A directory with cuda_fp16.h / cuda_bf16.h: the toolkit's, else the pip CUDA headers torch uses."""
    from lora_kernels.cuda_ops._build import find_cuda_home

    home = find_cuda_home()
    candidates = [Path(home) / "include"] if home else []
    try:
        import nvidia

        for base in map(Path, nvidia.__path__):
            candidates += [base / "cu13" / "include", base / "cuda_runtime" / "include"]
    except ImportError:
        pass
    return next((c for c in candidates if (c / "cuda_fp16.h").exists() and (c / "cuda_bf16.h").exists()), None)


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) to build the emulation harness")
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_fp16.h, cuda_bf16.h): neither a CUDA toolkit nor pip's nvidia headers")
    exe = tmp_path_factory.mktemp("cuda_emu") / "harness"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}", f"-I{inc}",
           str(HARNESS), "-o", str(exe)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building the emulation harness failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return exe


def _run(exe: Path, *args: str) -> tuple[int, int, str]:
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    cases, _, fails, _ = last.split()
    return int(cases), int(fails), proc.stdout


def test_lowrank_kernels_match_float64_on_the_cpu(harness):
    cases, fails, out = _run(harness)
    assert cases >= 150, out[-2000:]
    assert fails == 0, out[-4000:]


def test_emulation_detects_wrong_results(harness):
    """The checks bite: with one value of T, of the bits and of dT corrupted, every case fails."""
    cases, fails, out = _run(harness, "--selftest")
    assert cases == 6 and fails >= cases, out[-2000:]


def test_lowrank_kernels_on_random_shapes_and_ranks_up_to_256(harness):
    """Random cases beyond the fixed set: sizes 1..160, r up to 256 (the fixed set stops at 65),
    every dtype configuration, x layout, p, mask mode and split plan (``--random N SEED MAXDIM``).
    The seed is fixed so a failure reproduces; more: ``harness --random 400 <seed> 300``."""
    seed = os.environ.get("LORA_KERNELS_EMU_SEED", "20261201")
    cases, fails, out = _run(harness, "--random", "16", seed, "160")
    assert cases == 16, out[-2000:]
    assert fails == 0, out[-4000:]
