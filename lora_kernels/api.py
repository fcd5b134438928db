"""Public entry point ``lora_linear``: argument checks, autocast, seeding and backend dispatch.

Every backend implements the same 2-D contract (see ``lora_kernels/backends.py``); this module
turns the user's call into that contract exactly once, so error messages and semantics are the
same whichever backend runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

from . import backends
from .reference import LoRALinearRefRecompute, WeightRecompute, lora_linear_ref

__all__ = ["lora_linear", "check_inputs", "new_seed", "MASK_MODES"]

MASK_MODES = ("bitmask", "regenerate")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    lora_bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: int | None,
) -> None:
    """Raise ValueError/TypeError naming the argument for anything the kernels cannot take."""
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_tensor("lora_A", lora_A)
    _check_tensor("lora_B", lora_B)
    _check_tensor("bias", bias, optional=True)
    _check_tensor("lora_bias", lora_bias, optional=True)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-d tensor")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, K) with K = x.shape[-1] = {K}, got {tuple(weight.shape)}")
    N = weight.shape[0]
    if lora_A.dim() != 2:
        raise ValueError(f"lora_A must have shape (r, K) = (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A has rank r = 0: the LoRA rank must be at least 1")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape (r, K) = ({r}, {K}), got {tuple(lora_A.shape)}")
    # (torch.Size compares equal to a tuple: no tuple() per check on the eager path, which runs this every call)
    if lora_B.shape != (N, r):
        raise ValueError(f"lora_B must have shape (N, r) = ({N}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    if lora_bias is not None and lora_bias.shape != (N,):
        raise ValueError(f"lora_bias must have shape (N,) = ({N},), got {tuple(lora_bias.shape)}")
    device = x.device
    named = (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias), ("lora_bias", lora_bias))
    for name, t in named:
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}: move them to one device")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}: cast x (or use torch.autocast)")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B dtype {lora_B.dtype} differs from lora_A dtype {lora_A.dtype}")
    if lora_bias is not None and lora_bias.dtype != lora_A.dtype:
        raise TypeError(f"lora_bias dtype {lora_bias.dtype} differs from lora_A dtype {lora_A.dtype}")
    # (float and int first: the ABC check costs as much as the rest of a scalar's checks)
    if type(scaling) not in (float, int) and (isinstance(scaling, bool) or not isinstance(scaling, numbers.Real)):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if scaling != scaling or abs(float(scaling)) == float("inf"):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if type(dropout_p) not in (float, int) and (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        if type(seed) is not int and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not torch.compiler.is_compiling() and not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")


CAPTURE_SEED_MESSAGE = (
    "dropout with seed=None inside a CUDA-graph capture: the seed is a host value, drawn once at "
    "capture, so every replay would apply the same dropout mask. Pass seed= to accept a fixed mask, "
    "or capture with dropout off (eval() or lora_dropout=0)"
)


def new_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator (reproducible under manual_seed).

    Raises RuntimeError inside a CUDA-graph capture (see ``CAPTURE_SEED_MESSAGE``)."""
    if not torch.compiler.is_compiling():
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(CAPTURE_SEED_MESSAGE)
        if _get_current_dispatch_mode() is not None:
            # Drawn outside the modes: under FakeTensorMode the draw would be a fake tensor, no value.
            with _disable_current_modes():
                return new_seed()
    # device="cpu": the CPU generator even under torch.set_default_device("cuda") (no host sync).
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu").item())


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_bias: torch.Tensor | None = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    backend: str = "auto",
    dropout_mask: str = "bitmask",
    recompute_weight: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fused LoRA linear ``y = x Wᵀ + bias + scaling · (dropout(x) Aᵀ Bᵀ + lora_bias)``.

    Args:
        x: ``(..., K)`` activations, any leading dims and strides.
        weight: ``(N, K)`` frozen base weight (nn.Linear layout); bias: ``(N,)`` or None.
        lora_A: ``(r, K)``; lora_B: ``(N, r)`` (PEFT's layout); lora_bias: ``(N,)`` or None.
            Adapters may be float32 while x/weight are float16/bfloat16 (PEFT's default).
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the low-rank path, in ``[0, 1)``; ignored unless
            ``training``. The mask is a function of ``seed`` (see ``reference``), bit-identical
            across backends.
        seed: dropout seed; drawn from torch's CPU generator on every call when None.
        backend: "auto", "torch" (reference, any device), "triton" or "cuda".
        dropout_mask: "bitmask" (save 1 bit per element of x for backward) or "regenerate"
            (save nothing; the mask is recomputed from the seed in backward).
        recompute_weight: None (the weight is kept for backward, as nn.Linear keeps it), or a
            callable returning ``weight`` again, called once in backward instead: for a weight that
            is itself computed per call, such as a 4-bit base layer's dequantized copy, which would
            otherwise stay alive (``N·K`` elements per layer) until backward. It must return the
            same values, shape, dtype and device (checked, but for the values). Eager only.

    Returns:
        ``(..., N)`` in x's dtype (autocast's dtype inside ``torch.autocast``).
    """
    if dropout_mask not in MASK_MODES:
        raise ValueError(f"dropout_mask must be one of {MASK_MODES}, got {dropout_mask!r}")
    if recompute_weight is not None:
        if not callable(recompute_weight):
            raise TypeError(f"recompute_weight must be a callable or None, got {type(recompute_weight).__name__}")
        if torch.compiler.is_compiling():
            # A Python callable kept on the autograd graph for backward is not something the compiler traces.
            raise NotImplementedError("recompute_weight is eager only: call lora_linear without it under torch.compile")
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_tensor("bias", bias, optional=True)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.device == weight.device:
        # Autocast does not look inside custom kernels: apply its linear-layer rule here once to
        # the base path, then run with autocast off so nothing is cast twice. The adapters keep
        # their own dtype (fp32 adapters stay fp32, which the kernels take as they are; PEFT's
        # nn.Linear adapters would run in the autocast dtype: ours is the more accurate sum).
        dt = torch.get_autocast_dtype(device_type)

        def cast(t):  # as autocast itself: float64 is never cast (F.linear on float64 stays float64)
            return t if t is None or t.dtype == torch.float64 else t.to(dt)

        recast = None if recompute_weight is None else (lambda: cast(recompute_weight()))
        with torch.autocast(device_type, enabled=False):
            return lora_linear(
                cast(x), cast(weight), lora_A, lora_B, cast(bias), lora_bias, scaling, dropout_p,
                training, seed, backend, dropout_mask, recast,
            )  # fmt: skip
    # Checked after autocast's casts: an fp32 model under bf16 autocast passes bf16 x and fp32 W.
    check_inputs(x, weight, lora_A, lora_B, bias, lora_bias, scaling, dropout_p, seed)
    if seed is not None:
        seed = int(seed)  # numpy integers and the like become a plain int
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = new_seed()
    impl = backends.resolve(backend, x, weight, lora_A)
    recompute = None if recompute_weight is None else WeightRecompute(recompute_weight, weight)
    if impl is None:
        if recompute is not None:
            return LoRALinearRefRecompute.apply(x, weight, bias, lora_A, lora_B, lora_bias, float(scaling), p,
                                                0 if seed is None else seed, recompute)  # fmt: skip
        return lora_linear_ref(x, weight, lora_A, lora_B, bias, lora_bias, float(scaling), p, True, seed)
    K = x.shape[-1]
    N = weight.shape[0]
    # Not reshape(-1, K): with K = 0 the -1 is ambiguous (x has no elements whatever M is). A 2-D x is
    # taken as it is: a reshape to its own shape is still a view, and an autograd node each way.
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), K)
    seed = 0 if seed is None else seed  # (not `seed or 0`: a symbolic int under torch.compile)
    if recompute is None:
        y2 = impl(x2, weight, bias, lora_A, lora_B, lora_bias, float(scaling), p, seed, dropout_mask)
    else:
        y2 = impl(x2, weight, bias, lora_A, lora_B, lora_bias, float(scaling), p, seed, dropout_mask, recompute)
    return y2 if flat else y2.reshape(*x.shape[:-1], N)
