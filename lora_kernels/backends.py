"""Backend registry and selection.

Every kernel backend exposes the same 2-D contract::

    fn(x2: (M, K), weight: (N, K), bias: (N,) | None, lora_A: (r, K), lora_B: (N, r),
       lora_bias: (N,) | None, scaling: float, p: float, seed: int, mask_mode: str) -> (M, N)

``p`` is already 0 when not training; ``seed`` is an int in [0, 2**63) (ignored when p == 0);
``mask_mode`` is "bitmask" or "regenerate". Inputs were validated by ``api.check_inputs``.
The function is differentiable (an autograd.Function) in x, lora_A, lora_B, lora_bias and,
when they require grad, weight and bias. A built-in backend also takes an eleventh argument,
``recompute: reference.WeightRecompute | None``: when given, the weight is not saved for backward
and backward calls ``recompute.get()`` for it (``lora_linear(..., recompute_weight=...)``).

A backend module provides ``unavailable_reason(x, weight, lora_A) -> str | None`` (None means
it can run these tensors) and ``lora_linear_2d`` (the contract above). It may also provide
``auto_unavailable_reason`` with the same signature, for what "auto" must not pick although an
explicit request could run (the cuda backend: a JIT build of minutes inside a forward pass).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _auto_table

__all__ = ["BACKENDS", "available_backends", "resolve", "resolved_backend", "interpret_mode", "use_registered_op"]

BACKENDS = ("torch", "triton", "cuda")
# Backend name -> module implementing the contract above (replaceable, e.g. by tests).
_MODULES = {
    "triton": "lora_kernels.triton_ops.lora_linear",
    "cuda": "lora_kernels.cuda_ops.lora_linear",
}
# "auto" preference per GPU compute capability: the measured winner first (lora_kernels/_auto_table.py,
# written from bench/results by `python -m bench.auto_table`). A capability not measured prefers Triton
# (no extension build, the more tested backend).
_AUTO_ORDER: dict[tuple[int, int], tuple[str, ...]] = dict(_auto_table.AUTO_ORDER)
_AUTO_DEFAULT = ("triton", "cuda")


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_CAPABILITY: dict[tuple[Callable, int], tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, read once per GPU: torch re-reads the device's
    properties on each call (lazy-init check, index parsing, a device count), a few µs of host time per
    call on the eager path's critical path, up to three times a call. Keyed on the function as well, so a
    test's stand-in for it is not answered from the real one's entries; a device without an index (the
    current device, which can change) and compiled regions (dynamo traces the plain call) are not cached."""
    fn = torch.cuda.get_device_capability
    if device.index is None or torch.compiler.is_compiling():
        return fn(device)
    key = (fn, device.index)
    cap = _CAPABILITY.get(key)
    if cap is None:
        cap = _CAPABILITY[key] = tuple(fn(device))
    return cap


def use_registered_op() -> bool:
    """True when a kernel call must go through its ``torch.library`` op rather than straight to the
    launcher: under torch.compile/export (the compiler must see the op), and under any
    TorchDispatchMode (FakeTensorMode must reach the op's fake implementation; FlopCounterMode and
    other tracing modes must see the op to count or record it). Plain eager calls skip the
    dispatcher, which costs ≈ 8 µs per op call on a 2-core CPU host (bench/NOTES.md)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _module(name: str):
    path = _MODULES[name]
    # Import statements for the built-in backends, not importlib.import_module: dynamo refuses to
    # trace the latter, and resolve() runs inside torch.compile(fullgraph=True) regions.
    try:
        if path == "lora_kernels.triton_ops.lora_linear":
            from .triton_ops import lora_linear as mod
        elif path == "lora_kernels.cuda_ops.lora_linear":
            from .cuda_ops import lora_linear as mod
        else:  # a module registered at run time (tests, plug-ins); eager use only
            mod = importlib.import_module(path)
        return mod, None
    except ImportError as e:  # e.g. triton missing on a CPU-only install
        return None, f"cannot import the {name} backend: {e}"
    except Exception as e:  # e.g. a broken Triton install, or a torch without an API used
        # at import: "auto" falls back to the reference, an explicit backend= raises with this reason.
        return None, f"cannot import the {name} backend: {type(e).__name__}: {e}"


def _unavailable(
    name: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, auto: bool = False
) -> str | None:
    if name == "torch":
        return None
    mod, err = _module(name)
    if mod is None:
        return err
    if auto and hasattr(mod, "auto_unavailable_reason"):
        return mod.auto_unavailable_reason(x, weight, lora_A)
    return mod.unavailable_reason(x, weight, lora_A)


def available_backends(
    x: torch.Tensor | None = None, dtype: torch.dtype = torch.float16, device: str | None = None
) -> dict[str, str | None]:
    """Map backend name -> None if it can run on (x's or the given) device and dtype, else why not."""
    if x is None:
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        x = torch.empty(1, 16, dtype=dtype, device=dev)
    w = torch.empty(16, x.shape[-1], dtype=x.dtype, device=x.device)
    return {name: _unavailable(name, x, w, w) for name in BACKENDS}


def resolve(
    backend: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor
) -> Callable[..., torch.Tensor] | None:
    """The 2-D kernel for ``backend`` ("auto" picks one), or None for the torch reference."""
    if backend == "torch":
        return None
    if backend in ("triton", "cuda"):
        reason = _unavailable(backend, x, weight, lora_A)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run here: {reason}")
        return _module(backend)[0].lora_linear_2d
    if backend != "auto":
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    name = _auto_pick(x, weight, lora_A)
    return None if name == "torch" else _module(name)[0].lora_linear_2d


def _auto_pick(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> str:
    if x.device.type != "cuda":
        return "torch"  # on CPU the reference is the fast path (the interpreter is for testing)
    order = _AUTO_ORDER.get(device_capability(x.device), _AUTO_DEFAULT)
    for name in order:
        if _unavailable(name, x, weight, lora_A, auto=True) is None:
            return name
    return "torch"


def resolved_backend(backend: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> str:
    """The name of the backend that ``backend`` runs for these tensors ("auto" resolved), for reports
    and benchmark rows. Raises as ``lora_linear`` would for an explicit backend that cannot run."""
    if backend == "auto":
        return _auto_pick(x, weight, lora_A)
    return "torch" if resolve(backend, x, weight, lora_A) is None else backend
