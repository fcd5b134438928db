"""FLOP formulas of the fused ops, for ``torch.utils.flop_counter.FlopCounterMode``.

A fused kernel is opaque to FlopCounterMode: without a formula it counts zero, so a training loop
that reports MFU from FlopCounterMode would lose the whole base GEMM of every LoRA layer. These
formulas count what the reference (``backend="torch"``) counts through aten's matmuls, so a model
reports the same FLOPs whichever backend runs it:

    forward:  x·Wᵀ 2MNK  +  x̃·Aᵀ 2MKr  +  T·Bᵀ 2MrN
    backward: dT = dY·B 2MNr                           (when x or lora_A needs a gradient)
              + dB = dYᵀ·T 2NMr                        (when lora_B needs a gradient)
              + dA = dTᵀ·x̃ 2rMK                        (when lora_A needs a gradient)
              + dX = dY·W 2MNK  +  dx̃ = dT·A 2MrK        (when x needs a gradient)

Bias, scaling and dropout are elementwise and count nothing, as aten's formulas count them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import register_flop_formula

__all__ = ["forward_flops", "backward_flops", "register", "reach_active_counters"]

# op packet -> the (shape-wrapped) formula registered for it
_FORMULAS: dict = {}


def forward_flops(M: int, K: int, N: int, r: int) -> int:
    """FLOPs of ``y = x Wᵀ + s·(x̃ Aᵀ) Bᵀ`` for x (M, K), W (N, K), A (r, K)."""
    return 2 * M * N * K + 2 * M * K * r + 2 * M * r * N


def backward_flops(M: int, K: int, N: int, r: int, need_dx: bool, need_da: bool = True, need_db: bool = True) -> int:
    """FLOPs of the fused backward, counting only the gradients asked for."""
    flops = 0
    if need_dx or need_da:
        flops += 2 * M * N * r
    if need_db:
        flops += 2 * N * M * r
    if need_da:
        flops += 2 * r * M * K
    if need_dx:
        flops += 2 * M * N * K + 2 * M * r * K
    return flops


def _fwd_formula(x_shape, w_shape, *args, **kwargs) -> int:
    # Op schema: (x (M, K), weight (N, K), bias, lora_A (r, K), ...); tensors arrive as shapes.
    M, K = x_shape
    N = w_shape[0]
    r = args[1][0]
    return forward_flops(M, K, N, r)


def _bwd_formula(dy_shape, x_shape, w_shape, a_shape, *args, **kwargs) -> int:
    # Op schemas: (dy, x, weight, lora_A, lora_B, t, bits, scaling, p, seed, need_dx, need_da, need_db),
    # the last two with defaults (True).
    M, K = x_shape
    N = w_shape[0]
    r = a_shape[0]
    need_dx = args[6]
    need_da = args[7] if len(args) > 7 else kwargs.get("need_da", True)
    need_db = args[8] if len(args) > 8 else kwargs.get("need_db", True)
    return backward_flops(M, K, N, r, bool(need_dx), bool(need_da), bool(need_db))


def register(fwd_op, bwd_op) -> None:
    """Register the formulas for one backend's ops (``torch.ops.lora_kernels.<name>`` packets)."""
    _FORMULAS[fwd_op] = register_flop_formula(fwd_op)(_fwd_formula)
    _FORMULAS[bwd_op] = register_flop_formula(bwd_op)(_bwd_formula)


def reach_active_counters() -> None:
    """Give the formulas to FlopCounterModes that were entered before they were registered.

    A FlopCounterMode copies the global formula registry when it is constructed, and a backend
    module (which registers its ops' formulas) is imported on its first call: so the usual
    ``with FlopCounterMode(): model(x)`` around a first step would count our ops as zero. Called
    on the op path (a dispatch mode is active); best effort, as the mode's registry is private.
    """
    if torch.compiler.is_compiling():
        return  # nothing to reach in a traced graph (and dynamo must not trace the mode stack)
    for mode in _get_current_dispatch_mode_stack():
        registry = getattr(getattr(mode, "counter", None), "flop_registry", None)
        if isinstance(registry, dict):
            for op, formula in _FORMULAS.items():
                registry.setdefault(op, formula)
