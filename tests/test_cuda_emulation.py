"""The CUDA backend's low-rank and dropout-mask kernels, run on the CPU.

``csrc/lowrank_kernels.cuh`` (the device code ``lowrank.cu`` launches) is compiled with the host C++
compiler by ``tests/cuda_emu/harness.cpp``: 256 threads per block, run as fibers one at a time from one
``__syncthreads`` to the next, in thread order and again in reverse order (so a missing barrier fails
deterministically, rather than when the OS happens to interleave threads badly). The harness replays the
launch sequence of ``csrc/lora_ops.cpp`` forward and backward, with the CUTLASS GEMMs as plain loops,
over odd shapes (M, K, N ∈ {1…72}, r ∈ {1, 16, 65}, plus reductions of 1030–1100), strided and
column-major x, p ∈ {0, 0.3}, saved and regenerated masks, fp32, bf16 x with fp32 adapters and fp16
storage, the backward's reductions split over blockIdx.z (the launcher's own plan), empty problems (M, K
or N = 0: dA and dB must come out as zeros), and checks T, y, the bits, dT, dA, dB, dlora_bias and dX
against float64 (the bits exactly). The 16-bit cases take the tensor-core skinny kernel, whose WMMA
calls run on a host emulation of the API (``tests/cuda_emu/wmma_emu.h``, which also checks its alignment
and leading-dimension rules); the 16-bit results are checked with an elementwise rounding bound
(3u·Σ|terms|), and where both operands are fp16 already (T's and dT's products are then exact) with the
fp32 accumulation's own bound, so 16-bit accumulation cannot pass. With 16-bit x or dY at unit stride
and aligned rows, that kernel loads X as 16-byte vectors (along c for T and dT, along i for dB and dAᵀ):
aligned-row and column-major x layouts and N a multiple of 8 take those paths, and an AddressSanitizer
build checks their partial vectors. Two cases put a Philox value exactly on the keep threshold (saved
and regenerated masks: a ``>`` for ``>=`` fails them), the regenerated mask is compared bit for bit
(tail bits zero), and r = 7 fills the fused pack's 8 columns with one bias column. The fused forward's
and p = 0 dX's decompositions (pack kernel, then one GEMM over a concatenated K, here a loop) are
checked too; ``--random`` draws further cases (r up to 256). ``lora_ops.cpp`` itself (not this replay of
it) runs on the CPU in tests/test_cuda_ops_emulation.py, over the same emulation
(``tests/cuda_emu/emu_runtime.h``). What neither covers: the CUTLASS/cuBLAS GEMMs, the real WMMA
fragment hardware and real concurrency between blocks: those wait for a GPU
(tests/test_cuda_backend.py).
"""

from __future__ import annotations

import os
import re
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


def _build(csrc: Path, exe: Path, flags: list[str] | None = None) -> Path:
    """The harness built against the device code in ``csrc`` (the checkout's, or a mutant's copy), with
    extra compiler ``flags`` (a sanitizer)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) to build the emulation harness")
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_fp16.h, cuda_bf16.h): neither a CUDA toolkit nor pip's nvidia headers")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", *(flags or []), f"-I{csrc}", f"-I{inc}",
           str(HARNESS), "-o", str(exe)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building the emulation harness failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return exe


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    return _build(ROOT / "csrc", tmp_path_factory.mktemp("cuda_emu") / "harness")


def _run(exe: Path, *args: str, schedule: str = "forward", stop_at_fail: bool = False) -> tuple[int, int, str]:
    """Run the harness; ``schedule`` is LORA_EMU_SCHEDULE (how a block's 256 threads run, see
    emu_runtime.h): "forward"/"reverse"/"shuffle:SEED" run them one at a time from barrier to barrier
    in that order, deterministically; "parallel" as OS threads at a barrier."""
    env = {**os.environ, "LORA_EMU_SCHEDULE": schedule, "LORA_EMU_STOP_AT_FAIL": "1" if stop_at_fail else "0"}
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    cases, _, fails, _ = last.split()
    return int(cases), int(fails), proc.stdout


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_lowrank_kernels_match_float64_on_the_cpu(harness, schedule):
    """Every case, with each block's threads run one at a time in thread order and in reverse order.
    A missing ``__syncthreads`` (a thread reading shared memory that another writes in the same phase,
    or overwriting what another has yet to read) gives a wrong value in one of the two, every time."""
    cases, fails, out = _run(harness, schedule=schedule)
    assert cases >= 150, out[-2000:]
    assert fails == 0, out[-4000:]
    # Every way the tensor-core kernel loads X ran: an element at a time, 16-byte vectors along c and along i.
    assert all(n > 0 for n in _x_loads(out)), out[-2000:]


def _x_loads(out: str) -> tuple[int, int, int]:
    """The harness's count of tensor-core skinny launches per X load (skinny_x_load): scalar, along c, along i."""
    m = re.search(r"by X loads: scalar (\d+), along c (\d+), along i (\d+)", out)
    assert m, out[-2000:]
    return int(m[1]), int(m[2]), int(m[3])


def test_vector_loads_match_element_loads_bit_for_bit(harness):
    """The vector set run twice (``--vector-ab``): 16-byte loads, then element loads (the emulation's
    LORA_KERNELS_CUDA_VEC_LOADS=0). The same values are staged and multiplied in the same order, so T, dT,
    dB, dAᵀ and the bits must hash the same; the GPU test ``test_vector_and_element_loads_agree_bitwise``
    asks the same of the real kernels."""
    cases, fails, out = _run(harness, "--vector-ab")
    assert cases >= 60 and fails == 0, out[-3000:]
    assert re.search(r"vector loads: [1-9]\d* launches", out), out[-2000:]


def test_vector_loads_stay_inside_x_under_address_sanitizer(tmp_path):
    """The 16-byte X loads (lowrank_kernels.cuh's SliceVec) at the edges: K = 203 and R = 203 end in a partial
    vector, which must be read an element at a time. The harness's aligned x layout ends at x(M - 1, K - 1),
    so a vector read whole past K in the last row overflows the buffer; AddressSanitizer turns that into a
    failure here (on a GPU it reads past the allocation, or faults). The keep bits would zero the values
    read, so the results alone cannot tell (bench/NOTES.md, session 37). Threads as OS threads: ASan does
    not follow the fiber schedules' stack switches."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    probe = tmp_path / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    if cxx is None or subprocess.run([cxx, "-fsanitize=address", str(probe), "-o", str(tmp_path / "probe")],
                                     capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("the host C++ compiler cannot build with -fsanitize=address (no libasan)")
    exe = _build(ROOT / "csrc", tmp_path / "harness_asan", ["-fsanitize=address", "-g"])
    env = {**os.environ, "LORA_EMU_SCHEDULE": "parallel", "ASAN_OPTIONS": "detect_leaks=0"}
    proc = subprocess.run([str(exe), "--vector"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "AddressSanitizer" not in proc.stderr, proc.stderr[-3000:]
    cases, _, fails, _ = proc.stdout.strip().splitlines()[-1].split()
    assert int(cases) >= 30 and int(fails) == 0, proc.stdout[-3000:]
    scalar, along_c, along_i = _x_loads(proc.stdout)
    assert along_c >= 40 and along_i >= 40, proc.stdout[-2000:]


def test_emulation_detects_wrong_results(harness):
    """The checks bite: with one value of T, of the bits and of dT corrupted, every case fails."""
    cases, fails, out = _run(harness, "--selftest")
    assert cases == 6 and fails >= cases, out[-2000:]


def test_lowrank_kernels_on_random_shapes_and_ranks_up_to_256(harness):
    """Random cases beyond the fixed set: sizes 1..160, r up to 256 (the fixed set stops at 65),
    every dtype configuration, x layout, p, mask mode and split plan (``--random N SEED MAXDIM``).
    The seed is fixed so a failure reproduces; more: ``harness --random 400 <seed> 300``."""
    seed = os.environ.get("LORA_KERNELS_EMU_SEED", "20261201")
    cases, fails, out = _run(harness, "--random", "16", seed, "160", schedule=f"shuffle:{seed}")
    assert cases == 16, out[-2000:]
    assert fails == 0, out[-4000:]


def test_serial_schedules_catch_a_missing_syncthreads(tmp_path):
    """The barrier that ends skinny_kernel's slice loop removed: threads that finish their FMAs early
    restage the next slice over values others have yet to read. Run as parallel OS threads this was
    caught only when the OS interleaved them badly (session 15's mutation test); run one at a time it
    fails every time, in thread order and in reverse. (Every other barrier of lowrank_kernels.cuh,
    removed one at a time, fails both orders too: bench/NOTES.md, session 16.)"""
    src = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    kernels = src / "lowrank_kernels.cuh"
    text = kernels.read_text()
    loop_end = "acc[a][q] = fmaf(xv[a], av[q], acc[a][q]);\n    }\n    __syncthreads();\n  }\n"
    assert text.count(loop_end) == 1, "skinny_kernel's slice loop changed: update this mutant"
    kernels.write_text(text.replace(loop_end, loop_end.replace("__syncthreads();", "/* removed */")))
    exe = _build(src, tmp_path / "mutant")
    for schedule in ("forward", "reverse"):
        cases, fails, out = _run(exe, schedule=schedule, stop_at_fail=True)
        assert fails > 0, f"{schedule}: the missing barrier went unnoticed\n{out[-2000:]}"
