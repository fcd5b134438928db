"""Metadata of the compiled CUDA extension and its compatibility check.

setup.py writes the git-ignored ``lora_kernels/_build_info.py`` when it builds ``lora_kernels._C``
(torch and CUDA versions, archs, git commit, date). Before ``_C`` is imported, :func:`check`
compares it with the running torch: a wheel built for another torch would otherwise fail with an
undefined-symbol ImportError (or worse) from deep inside the dynamic loader.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["load", "check", "mismatch_reason", "format_info"]

_KEYS = ("torch_version", "torch_cuda_version", "nvcc_version", "cuda_archs", "git_commit", "build_date")


def load() -> dict[str, str] | None:
    """The build metadata as a dict, or None when no extension was built in this install."""
    try:
        mod = importlib.import_module("lora_kernels._build_info")
    except ImportError:
        return None
    return {k: getattr(mod, k.upper(), "unknown") for k in _KEYS}


def _torch_series(version: str) -> str:
    # "2.14.1+cu130" -> "2.14": the C++ ABI changes between minor releases, not between patch
    # releases or with the local tag (the wheel's tag, e.g. +cu130torch2.14, and its torch==2.14.*
    # requirement say the same).
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def _major(cuda: str | None) -> str | None:
    return None if cuda in (None, "None") else str(cuda).split(".", 1)[0]


def mismatch_reason(info: dict[str, str] | None = None) -> str | None:
    """Why the recorded build cannot be loaded by the running torch (None: compatible or unknown)."""
    info = load() if info is None else info
    if info is None:
        return None
    built, running = info["torch_version"], torch.__version__
    if _torch_series(built) != _torch_series(running):
        return (
            f"lora_kernels._C was built for torch {built} but torch {running} is installed: install a "
            f"lora_kernels wheel built for torch {_torch_series(running)}, or rebuild from the sources against "
            "this torch (pip install --no-build-isolation [-e] ., or scripts/build_wheels.sh; docs/BUILDING.md)"
        )
    if _major(info["torch_cuda_version"]) != _major(torch.version.cuda):
        return (
            f"lora_kernels._C was built against CUDA {info['torch_cuda_version']} but torch uses CUDA "
            f"{torch.version.cuda}: install a wheel built for this torch, or rebuild from the sources "
            "(pip install --no-build-isolation [-e] .; docs/BUILDING.md)"
        )
    return None


def check() -> dict[str, str] | None:
    """Raise ImportError with a clear message if the recorded build does not match this torch."""
    reason = mismatch_reason()
    if reason is not None:
        raise ImportError(reason)
    return load()


def format_info(info: dict[str, str] | None = None) -> str:
    info = load() if info is None else info
    if info is None:
        return "lora_kernels._C: not built in this install"
    return "lora_kernels._C: " + ", ".join(f"{k}={v}" for k, v in info.items())
