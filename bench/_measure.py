"""Timing and memory accounting for one benchmark row.

* Timing: ``triton.testing.do_bench`` medians on CUDA (it warms up, then flushes L2 before every
  timed call); ``time.perf_counter`` medians elsewhere (the ``--dry`` CPU run).
* Saved activations: every tensor autograd saves for backward during one forward passes through
  ``torch.autograd.graph.saved_tensors_hooks``; we count the bytes of the *unique storages*
  behind them, excluding x's storage and the implementation's own parameters. A view of x (a
  reshape) therefore costs nothing, while a cast or dropped copy of x counts in full.
* Retained (CUDA only): allocator growth across one forward minus the output itself: catches
  what a custom autograd.Function keeps outside ``save_for_backward`` (ctx attributes).
* Peak (CUDA only): the allocator's peak during one forward+backward above what was allocated
  before it (inputs and weights are already resident and not counted).
* Host time (CUDA only): what the CPU spends to enqueue one forward+backward, from steps issued back
  to back without waiting for the GPU. Above the GPU time of a step, a training loop is host-bound.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable

import torch

__all__ = [
    "MIB",
    "saved_activation_bytes",
    "retained_bytes",
    "peak_step_bytes",
    "time_ms",
    "timer_name",
    "host_step_us",
    "rotating",
]

MIB = float(2**20)


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """Identity of the memory behind ``t`` (None for tensors without a plain storage)."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. sparse or some wrapper subclasses
        return None
    return (str(t.device), st.data_ptr())


def saved_activation_bytes(
    forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor]
) -> tuple[int, list[tuple[tuple[int, ...], torch.dtype, int]]]:
    """Bytes that autograd saves for backward during ``forward()``, beyond ``exclude``.

    Returns ``(total_bytes, details)`` where details lists ``(shape, dtype, storage_bytes)`` for
    each counted storage (first tensor seen on it), for diagnostics. Storages shared by several
    saved tensors are counted once; zero-size storages count zero.
    """
    excluded = {k for k in (_storage_key(t) for t in exclude) if k is not None}
    counted: dict[tuple[str, int], tuple[tuple[int, ...], torch.dtype, int]] = {}
    anonymous = 0  # saved tensors with no plain storage: count their logical size

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal anonymous
        key = _storage_key(t)
        if key is None:
            anonymous += t.numel() * t.element_size()
        elif key not in excluded and key not in counted:
            counted[key] = (tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y  # frees the graph and with it everything that was saved
    details = list(counted.values())
    return sum(d[2] for d in details) + anonymous, details


def retained_bytes(forward: Callable[[], torch.Tensor], device: torch.device) -> int | None:
    """CUDA allocator growth across ``forward()`` minus the output: what the graph keeps alive."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    y = forward()
    torch.cuda.synchronize(device)
    grown = torch.cuda.memory_allocated(device) - before - y.untyped_storage().nbytes()
    del y
    return max(grown, 0)


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak CUDA allocation during ``step()`` above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def rotating(n: int) -> Callable[[], int]:
    """A counter cycling through ``range(n)``: which input copy the next call uses."""
    it = itertools.cycle(range(n))
    return lambda: next(it)


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _do_bench(device: torch.device) -> Callable | None:
    """triton.testing.do_bench where it times (CUDA with triton installed), else None."""
    if device.type != "cuda":
        return None
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def timer_name(device: torch.device) -> str:
    """The timer :func:`time_ms` uses on ``device``: "do_bench" or "perf_counter"."""
    return "do_bench" if _do_bench(device) is not None else "perf_counter"


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: list[torch.Tensor],
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_warmup: int = 2,
    cpu_reps: int = 5,
) -> tuple[float, str]:
    """Median time of ``fn()`` in ms and the timer used ("do_bench" or "perf_counter").

    Gradients of ``grad_to_none`` are reset before each call so backward never accumulates.
    """
    do_bench = _do_bench(device)
    if do_bench is not None:
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
        return float(ms), "do_bench"
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(cpu_warmup):
        _clear_grads(grad_to_none)
        fn()
    sync()
    times = []
    for _ in range(cpu_reps):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "perf_counter"


def host_step_us(
    step: Callable[[], None], device: torch.device, *, grad_to_none: list[torch.Tensor], steps: int = 20
) -> float | None:
    """Mean CPU time, µs, to issue one ``step()`` while the GPU runs behind (CUDA only).

    After a synchronize, ``steps`` steps are enqueued back to back and timed without waiting for the
    GPU (20 steps of a few launches each stay far below the launch queue's depth, so the CPU never
    blocks on it); then the GPU is drained. A step that synchronizes internally shows its GPU time here.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _clear_grads(grad_to_none)
        step()
    us = (time.perf_counter() - t0) / steps * 1e6
    torch.cuda.synchronize(device)
    return us
