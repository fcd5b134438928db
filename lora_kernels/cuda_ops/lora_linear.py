"""backend="cuda": the fused LoRA linear on the CUDA C++ extension (csrc/, CUTLASS base GEMMs).

Layers, bottom up:
    * ``lora_kernels._C.lora_fwd / lora_bwd`` (csrc/lora_ops.cpp): the kernels on 2-D tensors;
    * ``torch.ops.lora_kernels.cuda_lora_fwd / cuda_lora_bwd``: ``torch.library.custom_op``
      wrappers with fake (meta) implementations, so torch.compile traces them as opaque ops;
    * ``_CudaLoraFunction``: the autograd.Function tying forward and backward together;
    * ``lora_linear_2d`` and ``unavailable_reason``: the backend contract of lora_kernels/backends.py.

Saved for backward: x, ``T = dropout(x)·Aᵀ`` (M×r, fp32) and, in "bitmask" mode, the packed
mask (M × ceil(K/8) uint8); in "regenerate" mode the mask is recomputed from the seed.
"""

import torch
from torch import Tensor

from .. import flops as _flops
from ..backends import use_registered_op
from ..reference import WeightRecompute, lora_linear_ref_grads
from . import _ext

__all__ = ["unavailable_reason", "lora_linear_2d", "cuda_lora_fwd", "cuda_lora_bwd"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# NB: no `from __future__ import annotations` here: custom_op infers the op schema from the
# runtime annotations.


@torch.library.custom_op("lora_kernels::cuda_lora_fwd", mutates_args=())
def cuda_lora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Tensor | None,
    scaling: float,
    p: float,
    seed: int,
    save_mask: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) -> (y (M, N) in x.dtype, T (M, r) fp32, bits (M, ceil(K/8)) uint8 or (0,))."""
    y, t, bits = _ext.get_ext().lora_fwd(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, save_mask)
    return y, t, bits


@cuda_lora_fwd.register_fake
def _cuda_lora_fwd_fake(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, save_mask):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    y = x.new_empty((M, N))
    t = x.new_empty((M, r), dtype=torch.float32)
    bits_shape = (M, (K + 7) // 8) if (p > 0.0 and save_mask) else (0,)
    return y, t, x.new_empty(bits_shape, dtype=torch.uint8)


@torch.library.custom_op("lora_kernels::cuda_lora_bwd", mutates_args=())
def cuda_lora_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    t: Tensor,
    bits: Tensor,
    scaling: float,
    p: float,
    seed: int,
    need_dx: bool,
    need_da: bool = True,
    need_db: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dy (M, N) -> (dx (M, K), dA (r, K), dB (N, r), dlora_bias (N,)); adapters' dtype.

    A gradient not asked for comes back as an empty ``(0,)`` tensor and costs no pass: dx without
    ``need_dx``, dA without ``need_da``, dB and dlora_bias without ``need_db``.
    ``bits`` is the forward's packed mask, or an empty tensor to regenerate it from ``seed``.
    """
    ext = _ext.get_ext()
    dx, dA, dB, dlb = ext.lora_bwd(dy, x, weight, lora_A, lora_B, t, bits, scaling, p, seed, need_dx, need_da, need_db)
    return dx, dA, dB, dlb


@cuda_lora_bwd.register_fake
def _cuda_lora_bwd_fake(dy, x, weight, lora_A, lora_B, t, bits, scaling, p, seed, need_dx, need_da=True, need_db=True):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    return (
        x.new_empty((M, K) if need_dx else (0,)),
        lora_A.new_empty((r, K) if need_da else (0,)),
        lora_B.new_empty((N, r) if need_db else (0,)),
        lora_B.new_empty((N,) if need_db else (0,)),
    )


_flops.register(torch.ops.lora_kernels.cuda_lora_fwd, torch.ops.lora_kernels.cuda_lora_bwd)


def _fwd(*args):
    # Eager: straight to the pybind function, as the Triton backend does (the dispatcher costs
    # ≈ 8 µs per call, visible at small M). Under torch.compile or a dispatch mode (fake
    # tensors, FLOP counting): the registered op, whose fake implementation those need.
    if use_registered_op():
        _flops.reach_active_counters()
        return torch.ops.lora_kernels.cuda_lora_fwd(*args)
    return _ext.get_ext().lora_fwd(*args)


def _bwd(*args):
    if use_registered_op():
        _flops.reach_active_counters()
        return torch.ops.lora_kernels.cuda_lora_bwd(*args)
    return _ext.get_ext().lora_bwd(*args)


class _CudaLoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode, recompute=None):
        save_mask = p > 0.0 and mask_mode == "bitmask"
        y, t, bits = _fwd(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, save_mask)
        # With a WeightRecompute the weight is not kept: backward asks for it again.
        ctx.save_for_backward(x, weight if recompute is None else None, lora_A, lora_B, t, bits)
        ctx.scaling, ctx.p, ctx.seed, ctx.recompute = scaling, p, seed, recompute
        ctx.has_bias, ctx.has_lora_bias = bias is not None, lora_bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, bits = ctx.saved_tensors
        if ctx.recompute is not None:
            weight = ctx.recompute.get(ctx.needs_input_grad[1])
        need = ctx.needs_input_grad
        # dX += dY·W runs in x's dtype (lora_bwd refuses a mismatch rather than misread the bytes).
        dy = dy if dy.dtype == x.dtype else dy.to(x.dtype)
        if torch.is_grad_enabled():
            # backward(create_graph=True): the kernels' gradients have no autograd history, so a
            # double backward would silently see constants. The reference's graph gives them one.
            grads = lora_linear_ref_grads(dy, x, weight, lora_A, lora_B, ctx.has_bias, ctx.has_lora_bias,
                                          ctx.scaling, ctx.p, ctx.seed, need)  # fmt: skip
            return (*grads, None, None, None, None, None)
        need_db = bool(need[4])
        dx, dA, dB, dlb = _bwd(
            dy, x, weight, lora_A, lora_B, t, bits, ctx.scaling, ctx.p, ctx.seed, bool(need[0]), bool(need[3]), need_db
        )
        want_lb, want_b = bool(need[5]) and ctx.has_lora_bias, bool(need[2]) and ctx.has_bias
        colsum = None  # Σ_m dY in fp32, for the biases' gradients (dlb = s·Σ dY, db = Σ dY)
        if not need_db and (want_lb or want_b):
            # lora_B frozen: no dB = dYᵀ·T, only Σ dY, one fp32-accumulating read of dY for both biases.
            colsum = torch.sum(dy, 0, dtype=torch.float32)
            if want_lb:
                dlb = (colsum * ctx.scaling).to(lora_B.dtype)
        elif want_b:
            if dlb.dtype == torch.float32 and 1e-6 <= abs(ctx.scaling) <= 1e6:
                # The dB pass's ones column already summed dY in fp32: dlb = s·Σ dY, so Σ dY = dlb / s to
                # within an fp32 rounding, and no second read of dY (M·N). fp32 adapters only (PEFT's
                # default): a 16-bit dlb has rounded Σ dY to the adapters' precision. The bounds on s
                # (any real LoRA scaling) keep s·Σ dY clear of fp32 underflow and overflow.
                colsum = dlb / ctx.scaling
            else:
                colsum = torch.sum(dy, 0, dtype=torch.float32)
        # Gradients of the (normally frozen) base layer: plain cuBLAS, only when asked for.
        dW = dy.t().mm(x) if need[1] else None
        db = colsum.to(weight.dtype) if want_b else None
        return (
            dx if need[0] else None,
            dW,
            db,
            dA if need[3] else None,
            dB if need[4] else None,
            dlb if want_lb else None,
            None,
            None,
            None,
            None,
            None,
        )


_DEVICE_REASONS: dict[int, str | None] = {}


@torch.compiler.assume_constant_result
def _device_reason(index: int) -> str | None:
    """Why the extension cannot run on GPU ``index`` (None if it can), computed once per device.

    ``resolve`` runs inside compiled regions (torch.compile(fullgraph=True) of a model): this
    calls into importlib and the pybind module (build_metadata), which dynamo cannot trace, so
    dynamo evaluates it at trace time and bakes in the answer (it is fixed for the process).
    """
    if index not in _DEVICE_REASONS:
        device = torch.device("cuda", index)
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            reason = f"the cuda backend needs an sm_80 or newer GPU, this one is sm_{cap[0]}{cap[1]}"
        else:
            reason = _ext.availability(device)
        _DEVICE_REASONS[index] = reason
    return _DEVICE_REASONS[index]


def unavailable_reason(x: Tensor, weight: Tensor, lora_A: Tensor) -> str | None:
    """None if backend="cuda" can run these tensors, else a one-line reason."""
    if x.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors (x is on {x.device})"
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A)):
        if t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} is not supported by the cuda backend (float16, bfloat16, float32)"
    # A CUDA tensor's device always carries its index.
    return _device_reason(x.device.index)


AUTO_NO_BUILD_REASON = (
    'lora_kernels._C is not built: backend="auto" does not JIT-build it (minutes inside a forward '
    'pass); backend="cuda" does, or install a prebuilt wheel'
)


@torch.compiler.assume_constant_result
def _needs_build() -> bool:
    """Whether a call would JIT-build the extension: not loaded, not installed, not in the JIT cache
    of an earlier process. A compiled region keeps the answer it traced with (see _device_reason)."""
    return _ext._EXT is None and not _ext.prebuilt_available() and not _ext.jit_cached()


def auto_unavailable_reason(x: Tensor, weight: Tensor, lora_A: Tensor) -> str | None:
    """As ``unavailable_reason``, and "auto" never picks an extension that would have to be built."""
    reason = unavailable_reason(x, weight, lora_A)
    if reason is None and _needs_build():
        return AUTO_NO_BUILD_REASON
    return reason


def lora_linear_2d(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Tensor | None,
    scaling: float,
    p: float,
    seed: int,
    mask_mode: str,
    recompute: WeightRecompute | None = None,
) -> Tensor:
    """The backend contract (lora_kernels/backends.py): x2 (M, K) -> (M, N), differentiable."""
    # seed is passed as it is: under torch.compile it may be a symbolic (even unbacked, from
    # .item()) int, which int() would specialize or fail on; the op schema takes a SymInt.
    return _CudaLoraFunction.apply(
        x2, weight, bias, lora_A, lora_B, lora_bias, float(scaling), float(p), seed, mask_mode, recompute
    )
