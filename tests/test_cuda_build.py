"""The CUDA extension's build, metadata and host-side mask (runs on CPU CI).

Where a CUDA toolkit and a CUDA build of torch are present (CI included), `make test` builds
lora_kernels._C during the editable install, so these tests require it to import: a failed or
skipped build is a test failure here, not a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from lora_kernels import build_info, reference
from lora_kernels.cuda_ops import _build, _ext

ROOT = Path(__file__).resolve().parents[1]
CAN_BUILD = _build.find_cuda_home() is not None and torch.version.cuda is not None
requires_toolkit = pytest.mark.skipif(
    not CAN_BUILD, reason="no CUDA toolkit or a CPU-only torch: lora_kernels._C is not built here"
)


# ---- build configuration (pure Python, runs everywhere) ---------------------------------------


def test_parse_archs_spellings():
    assert _build.parse_archs("80;90") == ["80", "90"]
    assert _build.parse_archs("9.0a, 8.0") == ["80", "90"]
    assert _build.parse_archs("sm_86") == ["86"]
    with pytest.raises(ValueError, match="sm_80 or newer"):
        _build.parse_archs("75;80")
    with pytest.raises(ValueError, match="cannot parse"):
        _build.parse_archs("hopper")
    assert _build.parse_archs(" ;90;;80, ") == ["80", "90"]  # empty items between separators are skipped
    with pytest.raises(ValueError, match="is empty"):
        _build.parse_archs(" ; ,")


def test_arch_flags_use_sm90a_and_ptx_of_newest():
    flags = _build.arch_flags(["80", "90"])
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert flags[-1] == "-gencode=arch=compute_90,code=compute_90"
    assert _build.torch_arch_list(["80", "90"]) == "8.0;9.0a"
    assert "-DLORA_KERNELS_ARCHS=80_90" in _build.compile_flags(["80", "90"])["nvcc"]
    assert "-DLORA_KERNELS_SM90A" in _build.compile_flags(["80", "90"])["nvcc"]
    assert "-DLORA_KERNELS_SM90A" not in _build.compile_flags(["80"])["nvcc"]


def test_runs_on_capabilities():
    assert _ext.runs_on("80;90", (8, 0)) and _ext.runs_on("80;90", (8, 6)) and _ext.runs_on("80;90", (9, 0))
    assert _ext.runs_on("80;90", (10, 0))  # through the compute_90 PTX
    assert not _ext.runs_on("90", (8, 0))


def test_build_info_mismatch_message():
    info = {
        "torch_version": "1.13.0+cu117",
        "torch_cuda_version": "11.7",
        "nvcc_version": "11.7",
        "cuda_archs": "80",
        "git_commit": "x",
        "build_date": "d",
    }
    reason = build_info.mismatch_reason(info)
    assert reason is not None and "built for torch 1.13.0+cu117" in reason and torch.__version__ in reason
    same = dict(info, torch_version=torch.__version__, torch_cuda_version=str(torch.version.cuda))
    assert build_info.mismatch_reason(same) is None


def test_cuda_backend_reports_why_not_on_cpu():
    from lora_kernels.cuda_ops import lora_linear as cuda_mod

    x = torch.zeros(2, 8)
    reason = cuda_mod.unavailable_reason(x, torch.zeros(4, 8), torch.zeros(2, 8))
    assert reason is not None and "CUDA tensors" in reason


# ---- the built extension (toolkit + CUDA torch present, as on CI) ------------------------------


@pytest.fixture(scope="module")
def ext():
    assert _ext.prebuilt_available(), (
        "lora_kernels._C is not built although a CUDA toolkit and CUDA torch are present: run "
        "`pip install --no-build-isolation -e .` (scripts/setup_env.sh does) and check its output"
    )
    return _ext.get_ext(build=False)


@requires_toolkit
def test_extension_imports_with_matching_metadata(ext):
    info = build_info.load()
    assert info is not None, "lora_kernels/_build_info.py was not written by the build"
    assert build_info.mismatch_reason(info) is None
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda_version"] == torch.version.cuda
    assert len(info["git_commit"]) >= 7 and info["build_date"][:2] == "20"
    meta = ext.build_metadata()
    assert meta["torch_version"] == torch.__version__.split("+")[0]
    assert meta["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert meta["archs"] == info["cuda_archs"]
    assert meta["sm90_kernels"] == ("90" in meta["archs"].split(";"))
    for name in ("lora_fwd", "lora_bwd", "host_pack_mask", "host_keep_mask", "host_philox", "last_gemm_path"):
        assert callable(getattr(ext, name))


@requires_toolkit
def test_gemm_backend_switch(ext):
    assert ext.gemm_backend() == "auto"
    try:
        ext.set_gemm_backend("sm80")
        assert ext.gemm_backend() == "sm80"
        # (per process: under xdist another test's fused forward may have run last in this worker)
        assert ext.last_gemm_path() in ("none", "cublas", "sm80", "sm90", "sm90-fused")
        with pytest.raises(ValueError, match="gemm backend"):
            ext.set_gemm_backend("tensorcore")
    finally:
        ext.set_gemm_backend("auto")


def _cuobjdump() -> str | None:
    """Triton's bundled cuobjdump (the toolkit here ships only nvcc), else the toolkit's or PATH's."""
    import shutil

    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    home = _build.find_cuda_home()
    if home and (Path(home) / "bin" / "cuobjdump").exists():
        return str(Path(home) / "bin" / "cuobjdump")
    return shutil.which("cuobjdump")


@requires_toolkit
def test_extension_kernels_use_tensor_cores_and_no_local_memory(ext):
    """What the compiler made of the device code, without a GPU: no kernel uses local memory (stack
    arrays, which would cost DRAM traffic inside the hot loops) and none spills registers (a spill is
    counted in STACK, not LOCAL, under the ABI), the CUTLASS 3.x GEMMs for sm_90a issue Hopper wgmma
    (HGMMA), and the tensor-core low-rank kernels issue HMMA.

    skinny_mma_kernel (256 threads) stays within 128 registers, two blocks per SM, at every column tile,
    X load and arch: its slice loop once held 188-255 when the compiler hoisted each element's offsets and
    bounds out of it (one block per SM; bench/NOTES.md, session 30). Its vector X loads are 16-byte LDGs
    (session 37)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither bundled with Triton nor in the CUDA toolkit)")
    so = importlib.util.find_spec("lora_kernels._C").origin
    res = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
    assert len(kernels) >= 20, res[-2000:]
    assert [k for k in kernels if k[3] != "0"] == []
    assert [k for k in kernels if k[2] != "0"] == []
    skinny = [k for k in kernels if "skinny_mma_kernel" in k[0]]
    assert len(skinny) >= 18 and [k for k in skinny if int(k[1]) > 128] == [], skinny
    if "90" not in ext.build_metadata()["archs"].split(";"):
        return
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90a", so], capture_output=True, text=True, check=True).stdout
    tc: dict[str, int] = {}
    name = None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            tc[name] = 0
        elif name is not None and ("HGMMA" in line or "HMMA" in line):
            tc[name] += 1
    gemms = {k: v for k, v in tc.items() if "GemmUniversalIN4cute" in k}  # the CUTLASS 3.x (sm90) kernels
    assert len(gemms) == 8 and all(v > 0 for v in gemms.values()), gemms
    assert all("HGMMA" in sass.split(k, 1)[1].split("Function :", 1)[0] for k in gemms)
    mma = {k: v for k, v in tc.items() if "skinny_mma_kernel" in k or "expand_mma_kernel" in k}
    assert len(mma) == 20 and all(v > 0 for v in mma.values()), mma
    # The vector X loads (XLoad 1 and 2: "XLoadE1E" / "XLoadE2E" in the mangled names) are 16-byte
    # LDGs, two per thread and slice, prologue and loop (lowrank_kernels.cuh's SliceVec); the scalar ones none.
    vec_ldg = {
        k: sass.split(k, 1)[1].split("Function :", 1)[0].count("LDG.E.128") for k in tc if "skinny_mma_kernel" in k
    }
    assert len(vec_ldg) == 18, vec_ldg
    assert all((v >= 4) == ("XLoadE0E" not in k) for k, v in vec_ldg.items()), vec_ldg


@requires_toolkit
def test_device_reason_traces_under_fullgraph_compile(ext, monkeypatch):
    """backends.resolve runs inside compiled regions; the cuda backend's device check calls the
    pybind module (build_metadata), which dynamo cannot trace: it must be a trace-time constant.
    The GPU query is faked (an sm_90 device 0) so this runs on CPU."""
    from lora_kernels.cuda_ops import lora_linear as cuda_mod

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda_mod, "_DEVICE_REASONS", {})

    def f(x):
        # as "auto" asks: can it run, and is the extension there without a JIT build (importlib)?
        return x * 2 if cuda_mod._device_reason(0) is None and not cuda_mod._needs_build() else x * 3

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0))
    assert cuda_mod._DEVICE_REASONS == {0: None}
    torch._dynamo.reset()


@requires_toolkit
def test_host_philox_matches_reference(ext):
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (20, 4), generator=g, dtype=torch.int64).tolist()
    keys = torch.randint(0, 2**32, (20, 2), generator=g, dtype=torch.int64).tolist()
    counters[0] = [0, 0, 0, 0]
    counters[1] = [2**32 - 1] * 4
    for c, k in zip(counters, keys, strict=True):
        want = reference.philox4x32_10(*(torch.tensor([v]) for v in c), k[0], k[1])
        assert tuple(ext.host_philox(*c, *k)) == tuple(int(w) for w in want), (c, k)


@requires_toolkit
@pytest.mark.parametrize(
    "seed, M, K, p",
    [
        (0, 1, 1, 0.1),
        (1, 3, 7, 0.5),
        (12345, 17, 33, 0.1),
        (2**32 + 5, 9, 64, 0.25),  # key high word used
        (2**63 - 1, 5, 100, 0.9),
        (2**64 - 1, 2, 9, 0.05),
        (7, 11, 40, 0.0),
        (7, 11, 40, 0.999),
        (99, 4, 23, 1.5 / 65536),  # threshold rounds half to even, like Python's round()
        (99, 4, 23, 2.5 / 65536),
        (7, 11, 40, 1 - 2**-18),  # threshold 65536: every element dropped (a 16-bit threshold would keep all)
        (121, 11, 40, 1 - 2**-16),  # threshold 65535: only draws of 65535 are kept (seed 121 has one)
        (3, 0, 16, 0.1),  # M = 0
    ],
)
def test_host_mask_is_bit_identical_to_reference(ext, seed, M, K, p):
    keep_ref = reference.dropout_keep_mask(seed, M, K, p)
    assert torch.equal(ext.host_keep_mask(seed, M, K, p), keep_ref)
    bits = ext.host_pack_mask(seed, M, K, p)
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (M, (K + 7) // 8)
    assert torch.equal(bits, reference.pack_mask(keep_ref))


@requires_toolkit
def test_host_mask_keeps_draws_equal_to_the_threshold(ext):
    """u == threshold is kept: p placed on a real draw for each of the 8 (lane, half) slots of a Philox
    group (a random p meets such a draw with probability 2⁻¹⁶ per element, so `>` would pass by luck)."""
    seed, M, K = (1 << 40) + 77, 3, 16
    u = reference.dropout_draws(seed, M, K)
    ps = [int(u[0, j]) / 65536 for j in range(8) if u[0, j] > 0]
    assert len(ps) >= 7
    for p in ps:
        keep_ref = reference.dropout_keep_mask(seed, M, K, p)
        assert keep_ref[u == reference.dropout_threshold(p)].all()
        assert torch.equal(ext.host_keep_mask(seed, M, K, p), keep_ref), p
        assert torch.equal(ext.host_pack_mask(seed, M, K, p), reference.pack_mask(keep_ref)), p


@requires_toolkit
def test_host_mask_rejects_bad_p(ext):
    with pytest.raises(RuntimeError, match="p must be in"):
        ext.host_pack_mask(0, 2, 8, 1.0)


def _fake_cuda_op_args(M=67, K=72, N=40, r=16, dtype=torch.bfloat16, adapter_dtype=torch.float32):
    """Valid (forward, backward) arguments of the extension's ops as CUDA FakeTensors (no GPU needed:
    the ops' C++ checks run on them; the first thing that needs a device is the CUDA guard)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    G = (K + 7) // 8
    with FakeTensorMode(allow_non_fake_inputs=True):
        e = lambda *shape, dt=dtype: torch.empty(shape, device="cuda", dtype=dt)  # noqa: E731
        x, W, b, dy = e(M, K), e(N, K), e(N), e(M, N)
        A, B, lb = e(r, K, dt=adapter_dtype), e(N, r, dt=adapter_dtype), e(N, dt=adapter_dtype)
        T, bits, no_bits = e(M, r, dt=torch.float32), e(M, G, dt=torch.uint8), e(0, dt=torch.uint8)
        bits_cpu = torch.empty((M, G), device="cpu", dtype=torch.uint8)
    fwd = (x, W, b, A, B, lb, 2.0, 0.1, 5, True)
    bwd = {"bitmask": (dy, x, W, A, B, T, bits, 2.0, 0.1, 5, True),
           "regenerate": (dy, x, W, A, B, T, no_bits, 2.0, 0.1, 5, True),
           "p = 0": (dy, x, W, A, B, T, no_bits, 2.0, 0.0, 5, False),
           "lora_A frozen": (dy, x, W, A, B, T, bits, 2.0, 0.1, 5, True, False, True),
           "only lora_B": (dy, x, W, A, B, T, no_bits, 2.0, 0.1, 5, False, False, True),
           "adapter frozen": (dy, x, W, A, B, T, bits, 2.0, 0.1, 5, True, False, False)}  # fmt: skip
    bad_fwd = {
        "expected 2-D": (x[None], W, b, A, B, lb, 2.0, 0.1, 5, True),
        "lora_fwd: shape mismatch": (x, W, b, A[:, :40], B, lb, 2.0, 0.1, 5, True),
        "weight dtype must equal x dtype": (x, W.float(), b, A, B, lb, 2.0, 0.1, 5, True),
        "p must be in": (x, W, b, A, B, lb, 2.0, 1.0, 5, True),
        r"bias must be \(N,\)": (x, W, b[:7], A, B, lb, 2.0, 0.1, 5, True),
        r"lora_bias must be \(N,\)": (x, W, b, A, B, lb[None], 2.0, 0.1, 5, True),
        "x must be a CUDA tensor": (bits_cpu.float(), W, b, A, B, lb, 2.0, 0.1, 5, True),
    }
    bad_bwd = {
        "shape mismatch": (dy, x, W, A[:, :40], B, T, bits, 2.0, 0.1, 5, True),
        "shape mismatch ": (dy, x, W, A, B[:, :8], T, bits, 2.0, 0.1, 5, True),
        "p must be in": (dy, x, W, A, B, T, bits, 2.0, -0.5, 5, True),
        "bits must be a CUDA tensor": (dy, x, W, A, B, T, bits_cpu, 2.0, 0.1, 5, True),
        "bits must be uint8": (dy, x, W, A, B, T, T, 2.0, 0.1, 5, True),
        "expected 2-D": (dy, x, W, A[None], B, T, bits, 2.0, 0.1, 5, True),
        "unsupported dtype": (dy, x, W, A, B, T.to(torch.int32), bits, 2.0, 0.1, 5, True),
    }
    return fwd, bwd, bad_fwd, bad_bwd


_OWN_ERRORS = re.compile(r"lora_kernels|lora_fwd|lora_bwd")


@requires_toolkit
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real ops run (tests/test_cuda_backend.py)")
def test_ops_accept_valid_inputs_and_name_bad_ones_without_a_gpu(ext):
    """The C++ input checks of lora_fwd / lora_bwd on CUDA FakeTensors: valid calls must get past every
    check and stop only at the device (a backward that rejected its own forward's uint8 mask went
    unnoticed for sessions because only a GPU ran these ops); bad calls must name what is wrong."""
    fwd, bwd, bad_fwd, bad_bwd = _fake_cuda_op_args()
    for name, (fn, args) in {"forward": (ext.lora_fwd, fwd), **{f"backward, {k}": (ext.lora_bwd, a)
                                                               for k, a in bwd.items()}}.items():  # fmt: skip
        with pytest.raises(Exception) as err:  # noqa: PT011 - any device error, but not one of ours
            fn(*args)
        assert not _OWN_ERRORS.search(str(err.value).splitlines()[0]), (name, str(err.value)[:300])
    for fn, bad in ((ext.lora_fwd, bad_fwd), (ext.lora_bwd, bad_bwd)):
        for msg, args in bad.items():
            with pytest.raises(RuntimeError, match=msg.strip()):
                fn(*args)


_JIT_CHILD = """
import json, time
from lora_kernels.cuda_ops import _ext
from lora_kernels.reference import dropout_keep_mask, pack_mask
_ext.prebuilt_available = lambda: False  # as an install without _C (a wheel built where no toolkit was)
cached, t0 = _ext.jit_cached(), time.perf_counter()
m = _ext.get_ext()
bits = m.host_pack_mask(123, 37, 45, 0.3)
print(json.dumps({"name": m.__name__, "file": m.__file__, "meta": m.build_metadata(), "cached_before": cached,
                  "cached_after": _ext.jit_cached(), "s": time.perf_counter() - t0,
                  "mask_ok": bool((bits == pack_mask(dropout_keep_mask(123, 37, 45, 0.3))).all())}))
"""


@requires_toolkit
@pytest.mark.skipif(os.environ.get("LORA_KERNELS_TEST_JIT", "1") == "0", reason="LORA_KERNELS_TEST_JIT=0 disables it")
@pytest.mark.skipif(_ext.jit_disabled(), reason="LORA_KERNELS_NO_JIT forbids JIT builds here")
def test_jit_build_compiles_links_and_loads_without_a_prebuilt_extension(tmp_path):
    """backend="cuda" with no installed ``_C`` builds it on first use (``cpp_extension.load``, ninja)
    into the cache. The real build, for sm_80 alone (66 s on 2 cores; sm_90's CUTLASS kernels double
    it), in a child process (an extension cannot be unloaded): the module loads without a GPU, says
    what it was built for, its host Philox gives the reference's mask bit for bit; a second process
    loads it from the cache without compiling (``jit_cached``: what lets "auto" take it)."""
    env = dict(os.environ, LORA_KERNELS_CACHE=str(tmp_path), LORA_KERNELS_CUDA_ARCHS="80",
               TORCH_CUDA_ARCH_LIST=_build.torch_arch_list(["80"]), PYTHONPATH=str(ROOT))  # fmt: skip
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _JIT_CHILD], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=1500)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs.append((json.loads(res.stdout.strip().splitlines()[-1]), res.stderr))
    (first, err1), (second, err2) = runs
    build_dir = tmp_path / "jit" / Path(first["file"]).parent.name
    assert first["name"] == "lora_kernels_jit_C" and Path(first["file"]) == build_dir / "lora_kernels_jit_C.so"
    assert "JIT-building the CUDA backend for sm_80 into" in err1 and (build_dir / "build.ninja").exists()
    assert not first["cached_before"] and first["cached_after"] and second["cached_before"]
    meta = first["meta"]
    assert meta["archs"] == "80" and meta["sm90_kernels"] is False
    assert meta["torch_version"] == torch.__version__.split("+")[0]
    assert first["mask_ok"] and second["mask_ok"]
    assert "loading the JIT build in" in err2 and second["file"] == first["file"]
    assert second["s"] < first["s"] / 2, (first["s"], second["s"])  # nothing recompiled


@requires_toolkit
@pytest.mark.skipif(
    os.environ.get("LORA_KERNELS_TEST_WHEEL", "1") == "0", reason="LORA_KERNELS_TEST_WHEEL=0 disables it"
)
def test_wheel_packs_the_built_extension(ext, tmp_path):
    """scripts/build_wheels.sh's wheel: local version tag, _C and _build_info inside.

    Uses the objects of the editable install's build (same flags -> ninja has nothing to
    recompile), so this takes seconds, not a second full compile.
    """
    so = importlib.util.find_spec("lora_kernels._C").origin
    # pip wheel reuses build/lib.*: a module left there by an earlier build must not be packed.
    build_lib = ROOT / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "lora_kernels"
    build_lib.mkdir(parents=True, exist_ok=True)
    (build_lib / "removed_from_the_sources.py").write_text("")
    tree_info = ROOT / "lora_kernels" / "_build_info.py"
    tree_info_before = tree_info.read_text()
    env = dict(os.environ, VENV=str(Path(sys.executable).parents[1]))
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_wheels.sh"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(tmp_path.glob("lora_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    v = torch.__version__.split("+")[0].split(".")
    tag = f"+cu{torch.version.cuda.replace('.', '')}torch{v[0]}.{v[1]}"
    assert tag in wheels[0].name
    whl = zipfile.ZipFile(wheels[0])
    names = whl.namelist()
    assert any(n.startswith("lora_kernels/_C") and n.endswith(".so") for n in names), names
    assert "lora_kernels/_build_info.py" in names
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lora_kernels").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == tree | {"lora_kernels/_build_info.py"}
    # The binary loads only with its torch series: pip must not pair it with another torch.
    meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [Requirement(line.split(":", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert [str(r.specifier) for r in requires if r.name == "torch"] == [f"=={v[0]}.{v[1]}.*"], meta[:2000]
    assert Path(so).exists()
    # A wheel build leaves the tree's metadata alone: it describes the tree's own _C.
    assert tree_info.read_text() == tree_info_before
