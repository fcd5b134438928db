"""Shared test helpers: the one per-dtype tolerance table, float64 comparison, poisoning."""

from __future__ import annotations

import os

import pytest
import torch

from lora_kernels.verify import TOLERANCES

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")

# One table for every backend, test and the `verify` CLI: (atol, rtol) of a result in this dtype
# against the float64 reference, relative to the scale of the reference (see assert_close_ref).
TOL: dict[torch.dtype, tuple[float, float]] = TOLERANCES


def tol_for(*dtypes: torch.dtype) -> tuple[float, float]:
    """The loosest tolerance among the dtypes that took part in a computation."""
    return max((TOL[d] for d in dtypes), key=lambda t: t[0])


def assert_close_ref(
    out: torch.Tensor, ref: torch.Tensor, dtypes, name: str = "output", scale: float | None = None
) -> None:
    """Compare a backend result with the float64 reference.

    Error is measured against the reference's scale (max |ref|), because LoRA outputs and
    gradients are sums whose individual entries can cancel to ~0. ``scale`` raises that scale (never
    lowers it) where a tensor's own values are a poor measure of its size: a one-element gradient
    whose value happens to cancel (tests/test_fuzz.py).
    """
    atol, rtol = tol_for(*dtypes)
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (NaN poison not overwritten?)"
    out64, ref64 = out.double(), ref.double()
    scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, scale or 0.0)
    err = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    assert err <= atol * max(scale, 1.0) + rtol * scale, (
        f"{name}: max abs err {err:.3e} vs scale {scale:.3e} (atol={atol}, rtol={rtol})"
    )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN so that any element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))


def poison_cuda_allocator(nbytes: int = 64 << 20) -> None:
    """Leave NaN-filled blocks in the caching allocator: outputs the CUDA extension allocates with
    at::empty (tests cannot reach its allocations) then start as NaN, so an element a kernel forgets
    to write fails isfinite()."""
    blocks = [torch.full((nbytes // 4,), float("nan"), device="cuda") for _ in range(2)]
    small = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 10, 1 << 14, 1 << 18)]
    del blocks, small


def record_meta(monkeypatch, tri, key: str) -> list[tuple[str, object]]:
    """Patch the Triton launcher to record (kernel name, the constexpr ``key``) for each launch that takes it
    (FLATTEN, DEVICE_DESC: the persistent TMA kernels); the launches still run."""
    real, seen = tri._launch, []

    def launch(kernel, grid, args, meta, fixed, wrap):
        if key in meta:
            seen.append((kernel.__name__, meta[key]))
        return real(kernel, grid, args, meta, fixed, wrap)

    monkeypatch.setattr(tri, "_launch", launch)
    return seen
