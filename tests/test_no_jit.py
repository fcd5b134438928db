"""``LORA_KERNELS_NO_JIT=1``: no JIT build of the CUDA extension (lora_kernels/cuda_ops/_ext.py).

Without a prebuilt ``lora_kernels._C`` the cuda backend would otherwise report itself available
whenever a CUDA toolkit is found and then compile for many minutes on its first call. With the
switch it is unavailable, with a reason saying why, and ``get_ext`` raises instead of building.

Runs without a GPU: the prebuilt module's presence, the toolkit lookup and the JIT build itself
are monkeypatched (this machine has both a toolkit and a built ``_C``).
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_kernels import backends
from lora_kernels.cuda_ops import _build, _ext
from lora_kernels.cuda_ops import lora_linear as cuda_ll

GPU = torch.device("cuda", 0)


def _fake_ext() -> types.ModuleType:
    mod = types.ModuleType("lora_kernels_fake_C")
    mod.build_metadata = lambda: {"archs": "80;90"}
    return mod


@pytest.fixture
def no_prebuilt(monkeypatch):
    """No prebuilt ``_C``, none loaded yet, a toolkit found; a JIT build is recorded, not run."""
    builds: list[types.ModuleType] = []

    def jit_build() -> types.ModuleType:
        builds.append(_fake_ext())
        return builds[-1]

    monkeypatch.setattr(_ext, "_EXT", None)
    monkeypatch.setattr(_ext, "prebuilt_available", lambda: False)
    monkeypatch.setattr(_ext, "_jit_build", jit_build)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: "/usr/local/cuda-13.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda_ll, "_DEVICE_REASONS", {})  # the backend caches its answer per device
    return builds


@pytest.mark.parametrize("value", ["1", "yes"])
def test_no_jit_makes_the_backend_unavailable_and_get_ext_raise(no_prebuilt, monkeypatch, value):
    monkeypatch.setenv("LORA_KERNELS_NO_JIT", value)
    assert _ext.jit_disabled()
    reason = _ext.availability(GPU)
    assert reason is not None
    assert reason.startswith("lora_kernels._C is not built and LORA_KERNELS_NO_JIT=1 forbids building it here")
    assert cuda_ll._device_reason(0) == reason
    with pytest.raises(RuntimeError, match="LORA_KERNELS_NO_JIT=1 forbids building it"):
        _ext.get_ext()
    assert no_prebuilt == [], "nothing may be built"
    assert _ext._EXT is None


def test_backend_resolution_reports_the_reason(no_prebuilt, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_NO_JIT", "1")
    with FakeTensorMode():  # CUDA tensors without a GPU: only their device and dtype are read
        x = torch.empty(4, 16, device="cuda", dtype=torch.float16)
        w = torch.empty(8, 16, device="cuda", dtype=torch.float16)
        a = torch.empty(2, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here: lora_kernels._C is not built and"):
        backends.resolve("cuda", x, w, a)
    monkeypatch.setattr(backends, "_AUTO_DEFAULT", ("cuda",))
    monkeypatch.setattr(backends, "_AUTO_ORDER", {})
    assert backends.resolve("auto", x, w, a) is None  # "auto" falls back to the reference, builds nothing
    assert no_prebuilt == []


@pytest.mark.parametrize("value", [None, "", "0"])
def test_without_the_switch_a_missing_prebuilt_is_jit_built(no_prebuilt, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("LORA_KERNELS_NO_JIT", raising=False)
    else:
        monkeypatch.setenv("LORA_KERNELS_NO_JIT", value)
    assert not _ext.jit_disabled()
    assert _ext.availability(GPU) is None, "a toolkit was found: the backend will be JIT-built"
    ext = _ext.get_ext()
    assert no_prebuilt == [ext] and _ext._EXT is ext


def test_no_jit_still_loads_a_prebuilt_extension(no_prebuilt, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_NO_JIT", "1")
    prebuilt = _fake_ext()
    monkeypatch.setattr(_ext, "prebuilt_available", lambda: True)
    monkeypatch.setattr(_ext, "_import_prebuilt", lambda: prebuilt)
    assert _ext.availability(GPU) is None
    assert _ext.get_ext() is prebuilt and no_prebuilt == []


def test_no_jit_is_reported_before_a_missing_toolkit(no_prebuilt, monkeypatch):
    """The switch is the reason to report: even with a toolkit nothing would be built."""
    monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    monkeypatch.delenv("LORA_KERNELS_NO_JIT", raising=False)
    assert "no CUDA toolkit was found" in _ext.availability(GPU)
    monkeypatch.setenv("LORA_KERNELS_NO_JIT", "1")
    assert _ext.availability(GPU) == _ext.NO_JIT_REASON


def test_auto_never_starts_a_jit_build(no_prebuilt, monkeypatch, tmp_path):
    """Without a built ``_C`` "auto" must not pick the cuda backend: its first call would compile for
    minutes inside the user's forward (and raise there if the build fails). backend="cuda" still
    builds; once the extension is loaded, "auto" may pick it."""
    monkeypatch.delenv("LORA_KERNELS_NO_JIT", raising=False)
    monkeypatch.setenv("LORA_KERNELS_CACHE", str(tmp_path))  # no JIT build of an earlier process
    with FakeTensorMode():
        x = torch.empty(4, 16, device="cuda", dtype=torch.float16)
        w = torch.empty(8, 16, device="cuda", dtype=torch.float16)
        a = torch.empty(300, 16, device="cuda", dtype=torch.float16)  # r > 256: Triton declines
    assert "up to 256" in (backends._unavailable("triton", x, w, a) or "")
    assert cuda_ll.unavailable_reason(x, w, a) is None  # explicitly, it would build and run
    assert cuda_ll.auto_unavailable_reason(x, w, a) == cuda_ll.AUTO_NO_BUILD_REASON
    assert backends.resolve("auto", x, w, a) is None  # the reference, nothing built
    assert backends.resolved_backend("auto", x, w, a) == "torch"  # what a benchmark row records
    assert backends.resolved_backend("auto", x, w, a[:16]) == "triton"
    assert no_prebuilt == []
    assert backends.resolve("cuda", x, w, a) is cuda_ll.lora_linear_2d
    assert backends.resolved_backend("cuda", x, w, a) == "cuda"
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: .*up to 256"):
        backends.resolved_backend("triton", x, w, a)
    assert no_prebuilt == []  # resolving does not build either: the first call does
    _ext.get_ext()
    assert len(no_prebuilt) == 1
    assert cuda_ll.auto_unavailable_reason(x, w, a) is None
    assert backends.resolve("auto", x, w, a) is cuda_ll.lora_linear_2d
    assert backends.resolved_backend("auto", x, w, a) == "cuda"


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch has no JIT build to find")
def test_auto_takes_the_jit_build_of_an_earlier_process(no_prebuilt, monkeypatch, tmp_path):
    """A JIT build already in the cache loads in seconds: "auto" may use it."""
    monkeypatch.delenv("LORA_KERNELS_NO_JIT", raising=False)
    monkeypatch.setenv("LORA_KERNELS_CACHE", str(tmp_path))
    assert not _ext.jit_cached() and cuda_ll._needs_build()
    built = _ext.jit_cache_dir(_ext._jit_archs())
    built.mkdir(parents=True)
    (built / "lora_kernels_jit_C.so").write_bytes(b"")
    assert _ext.jit_cached() and not cuda_ll._needs_build()
    monkeypatch.setattr(_build, "CSRC", tmp_path / "no-sources")  # an install without csrc/: nothing to load
    assert not _ext.jit_cached()


# ---- the JIT build's own glue (cpp_extension.load stubbed; tests/test_cuda_build.py builds for real)


@pytest.fixture
def load_spy(monkeypatch, tmp_path):
    """``cpp_extension.load`` recorded instead of compiling; a toolkit, CUDA torch, a clean cache."""
    from torch.utils import cpp_extension

    calls: list[dict] = []

    def load(**kwargs):
        calls.append(kwargs)
        return _fake_ext()

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # _jit_build resets it
    monkeypatch.setattr(_build, "find_cuda_home", lambda: "/opt/cuda-test")
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setenv("LORA_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("LORA_KERNELS_CUDA_ARCHS", "80;90")
    monkeypatch.setenv("CUDA_HOME", "/elsewhere")  # (both restored afterwards: _jit_build sets them)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    return calls


def test_jit_build_hands_setup_py_s_sources_and_flags_to_cpp_extension_load(load_spy, capsys):
    """The JIT build compiles what ``pip install`` compiles (the same sources, flags and include
    paths, shared with setup.py through _build), into the per-torch/CUDA/arch/sources cache dir,
    under a module name of its own, with the toolkit it found; it says what it is doing."""
    from torch.utils import cpp_extension

    mod = _ext._jit_build()
    assert mod.__name__ == "lora_kernels_fake_C" and len(load_spy) == 1
    kw = load_spy[0]
    archs = ["80", "90"]
    build_dir = _ext.jit_cache_dir(archs)
    assert kw["name"] == "lora_kernels_jit_C"
    assert kw["sources"] == _build.sources() and all(Path(s).exists() for s in kw["sources"])
    flags = _build.compile_flags(archs)
    assert kw["extra_cflags"] == flags["cxx"] and kw["extra_cuda_cflags"] == flags["nvcc"]
    assert "-DLORA_KERNELS_SM90A" in kw["extra_cuda_cflags"]
    assert kw["extra_include_paths"] == _build.include_dirs("/opt/cuda-test")
    assert kw["build_directory"] == str(build_dir) and build_dir.is_dir()
    assert build_dir.name.startswith(f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-sm80_90-")
    assert kw["verbose"] is False
    # torch's cpp_extension reads the toolkit from CUDA_HOME (a PATH wrapper can mislead its own guess)
    assert os.environ["CUDA_HOME"] == "/opt/cuda-test" and cpp_extension.CUDA_HOME == "/opt/cuda-test"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == _build.torch_arch_list(archs)
    err = capsys.readouterr().err
    assert "JIT-building the CUDA backend for sm_80, sm_90 into " + str(build_dir) in err
    # A build already in the cache: ninja finds nothing to do, and the message says it loads.
    (build_dir / "lora_kernels_jit_C.so").write_bytes(b"")
    _ext._jit_build()
    assert f"loading the JIT build in {build_dir}" in capsys.readouterr().err


def test_jit_build_keeps_a_user_s_arch_list(load_spy, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    _ext._jit_build()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"


def test_jit_build_errors_say_what_is_missing(load_spy, monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    with pytest.raises(RuntimeError, match=r"no CUDA toolkit was found to JIT-build it: .*\(set CUDA_HOME\)"):
        _ext._jit_build()
    monkeypatch.setattr(_build, "find_cuda_home", lambda: "/opt/cuda-test")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="is a CPU-only build: the cuda backend needs CUDA torch"):
        _ext._jit_build()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_build, "CSRC", tmp_path / "no-csrc")
    with pytest.raises(RuntimeError, match=r"sources \(.*no-csrc\) are not present"):
        _ext._jit_build()
    assert load_spy == []


def test_a_prebuilt_extension_that_fails_to_load_says_how_to_rebuild(monkeypatch):
    """An installed ``_C`` whose metadata matches but whose import fails (a missing CUDA library, a
    build for another Python): ImportError with the loader's message, the build metadata, the
    running torch and the rebuild command, not a bare undefined-symbol error."""
    import importlib

    monkeypatch.setattr(_ext.build_info, "check", lambda: None)
    real = importlib.import_module

    def import_module(name, *args):
        if name == "lora_kernels._C":
            raise ImportError("libcudart.so.13: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ImportError) as exc:
        _ext._import_prebuilt()
    msg = str(exc.value)
    assert msg.startswith("lora_kernels._C exists but cannot be loaded (libcudart.so.13: cannot open")
    assert f"running torch {torch.__version__}" in msg and "pip install --no-build-isolation -e ." in msg
