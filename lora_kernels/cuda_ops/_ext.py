"""Loading the CUDA extension: the installed ``lora_kernels._C``, else a JIT build of csrc/.

The prebuilt module is checked against its build metadata first (build_info.py), so a binary
built for another torch gives a clear message instead of an undefined-symbol crash. When no
prebuilt module exists, :func:`get_ext` compiles the same sources with
``torch.utils.cpp_extension.load`` (ninja) into a cache directory keyed by torch, CUDA, archs and
a hash of the sources, so the build happens once per machine and source version.

``LORA_KERNELS_NO_JIT=1`` forbids that build (it takes many minutes, too long for a time-limited
GPU session): without a prebuilt ``_C`` the cuda backend is then unavailable, with a reason, and
:func:`get_ext` raises instead of compiling. Read when checked, not at import (the backend caches
its availability per GPU for the process).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from .. import build_info
from . import _build

__all__ = ["get_ext", "prebuilt_available", "availability", "jit_cache_dir", "jit_cached", "runs_on", "jit_disabled"]

_LOCK = threading.Lock()
_EXT: ModuleType | None = None


NO_JIT_REASON = (
    "lora_kernels._C is not built and LORA_KERNELS_NO_JIT=1 forbids building it here (a JIT build of the "
    "CUDA extension takes many minutes): build it first (`pip install --no-build-isolation -e .` or a "
    "prebuilt wheel, docs/BUILDING.md), or unset LORA_KERNELS_NO_JIT to JIT-build it on first use"
)


def jit_disabled() -> bool:
    """Whether ``LORA_KERNELS_NO_JIT`` forbids the JIT build (any value but empty or "0")."""
    return os.environ.get("LORA_KERNELS_NO_JIT", "0").strip() not in ("", "0")


def prebuilt_available() -> bool:
    """Whether an installed ``lora_kernels._C`` binary exists (it may still fail to load)."""
    return importlib.util.find_spec("lora_kernels._C") is not None


def _import_prebuilt() -> ModuleType:
    build_info.check()  # raises ImportError with a clear message on a torch/CUDA mismatch
    try:
        return importlib.import_module("lora_kernels._C")
    except ImportError as e:
        info = build_info.format_info()
        raise ImportError(
            f"lora_kernels._C exists but cannot be loaded ({e}). {info}; running torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}). Rebuild with "
            "`pip install --no-build-isolation -e .` (see docs/BUILDING.md)."
        ) from e


def _jit_archs() -> list[str]:
    if os.environ.get("LORA_KERNELS_CUDA_ARCHS"):
        return _build.parse_archs()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return _build.parse_archs(f"{major}{minor}")  # only this GPU: a much shorter build
    return _build.parse_archs(_build.DEFAULT_ARCHS)


@functools.cache
def _sources_digest() -> str:
    return _build.sources_digest()  # the sources do not change under a running process


def jit_cache_dir(archs: list[str]) -> Path:
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-sm{'_'.join(archs)}-{_sources_digest()}"
    base = os.environ.get("LORA_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora_kernels"
    )
    return Path(base) / "jit" / tag


_JIT_NAME = "lora_kernels_jit_C"


def jit_cached() -> bool:
    """Whether an earlier process already JIT-built these sources for this torch and GPU (loading
    it takes seconds: ninja finds nothing to do)."""
    if torch.version.cuda is None or not (_build.CSRC / "bindings.cpp").exists():
        return False
    try:
        return (jit_cache_dir(_jit_archs()) / f"{_JIT_NAME}.so").exists()
    except (OSError, ValueError):
        return False


def _jit_build() -> ModuleType:
    cuda_home = _build.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError(
            "lora_kernels._C is not installed and no CUDA toolkit was found to JIT-build it: install a "
            "CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda} (set CUDA_HOME), or install a prebuilt wheel (docs/BUILDING.md)"
        )
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build: the cuda backend needs CUDA torch")
    if not (_build.CSRC / "bindings.cpp").exists():
        raise RuntimeError(f"lora_kernels._C is not installed and the sources ({_build.CSRC}) are not present")
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # computed at import; a PATH wrapper can mislead it
    archs = _jit_archs()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _build.torch_arch_list(archs))
    build_dir = jit_cache_dir(archs)
    build_dir.mkdir(parents=True, exist_ok=True)
    if (build_dir / f"{_JIT_NAME}.so").exists():
        print(f"lora_kernels: lora_kernels._C is not installed; loading the JIT build in {build_dir}", file=sys.stderr)
    else:
        print(
            f"lora_kernels: lora_kernels._C is not installed; JIT-building the CUDA backend for "
            f"sm_{', sm_'.join(archs)} into {build_dir} (the first build takes several minutes)",
            file=sys.stderr,
        )
    flags = _build.compile_flags(archs)
    return cpp_extension.load(
        name=_JIT_NAME,
        sources=_build.sources(),
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags["nvcc"],
        extra_include_paths=_build.include_dirs(cuda_home),
        build_directory=str(build_dir),
        verbose=os.environ.get("LORA_KERNELS_VERBOSE_BUILD", "0") == "1",
    )


def get_ext(build: bool = True) -> ModuleType:
    """The extension module; JIT-builds it if no prebuilt one exists and ``build`` is True."""
    global _EXT
    if _EXT is not None:
        return _EXT
    with _LOCK:
        if _EXT is not None:
            return _EXT
        if prebuilt_available():
            _EXT = _import_prebuilt()
        elif not build:
            raise ImportError("lora_kernels._C is not installed (pip install --no-build-isolation -e .)")
        elif jit_disabled():
            raise RuntimeError(NO_JIT_REASON)
        else:
            _EXT = _jit_build()
        return _EXT


def runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a binary with cubins for ``archs`` (+ PTX of the newest) runs on this capability."""
    built = [int(a) for a in _build.parse_archs(archs)]
    cc = capability[0] * 10 + capability[1]
    cubin = any(a // 10 == capability[0] and a % 10 <= capability[1] for a in built)
    return cubin or max(built) <= cc  # the PTX of the newest arch JIT-compiles for newer GPUs


def availability(device: torch.device) -> str | None:
    """None if the extension can run on ``device`` (or will be JIT-built for it), else why not."""
    if _EXT is not None or prebuilt_available():
        try:
            ext = get_ext(build=False)
        except ImportError as e:
            return str(e)
        cap = torch.cuda.get_device_capability(device)
        archs = ext.build_metadata()["archs"]
        if archs and not runs_on(archs, cap):
            return (
                f"lora_kernels._C was built for sm_{archs} and cannot run on this sm_{cap[0]}{cap[1]} GPU: "
                "rebuild with LORA_KERNELS_CUDA_ARCHS including it"
            )
        return None
    if jit_disabled():
        return NO_JIT_REASON
    if not (_build.CSRC / "bindings.cpp").exists():  # an installed wheel or sdist without csrc/
        return (
            f"lora_kernels._C is not installed and its sources ({_build.CSRC}) are not here to JIT-build it: "
            "install a lora_kernels wheel built with the extension, or build it from the source tree "
            "(pip install --no-build-isolation .; docs/BUILDING.md)"
        )
    if _build.find_cuda_home() is None:
        return (
            "lora_kernels._C is not installed and no CUDA toolkit was found to JIT-build it "
            "(set CUDA_HOME or install a prebuilt wheel, see docs/BUILDING.md)"
        )
    return None
