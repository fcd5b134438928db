"""Pure-PyTorch reference: the semantics every backend is tested against.

    y = x Wᵀ + bias + scaling · (dropout(x) Aᵀ Bᵀ + lora_bias)

Shapes: ``x: (..., K)``, ``weight: (N, K)``, ``bias: (N,)``, ``lora_A: (r, K)``,
``lora_B: (N, r)``, ``lora_bias: (N,)``; returns ``(..., N)``.

Dropout applies only to the low-rank path, with inverted scaling ``1 / (1 - p)``.

The dropout mask
----------------
The mask is a pure function of ``(seed, m, k, p)`` where ``m`` is the row of ``x`` viewed as
``(M, K)`` (leading dims flattened in logical row-major order, independent of strides) and
``k`` the column. It is built from Philox4x32-10 (the generator behind Triton's
``tl.randint4x`` and cuRAND's Philox), so the reference, the Triton kernels and the CUDA C++
kernels produce bit-identical masks:

* one Philox call serves 8 consecutive columns of a row (one *group*, ``g = k // 8``):
  counter ``(c0, c1, c2, c3) = (g, m mod 2³², m >> 32, 0)``, key ``(seed mod 2³², seed >> 32)``;
* column ``k = 8 g + j`` uses the 16-bit half ``j // 4`` (0 = low) of output lane ``j % 4``;
* the element is kept iff that 16-bit value ``u >= threshold`` with
  ``threshold = round(p · 65536)`` (so ``p`` is resolved to 1/65536, while the scale stays exactly
  ``1 / (1 - p)``; from ``p = 1 - 2⁻¹⁷`` on the threshold is 65536 and every element is dropped);
* the packed *bitmask* saved for backward holds group ``g`` of row ``m`` in byte ``[m, g]``,
  bit ``j`` set iff column ``8 g + j`` is kept: ``M · ceil(K / 8)`` bytes.

Amortising one Philox call over 8 decisions is what makes in-kernel dropout affordable:
measured on H100, one call per element costs ~5x a plain pass over x (see shared/ANCHORS.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "PHILOX_KEY_A",
    "PHILOX_KEY_B",
    "PHILOX_ROUND_A",
    "PHILOX_ROUND_B",
    "philox4x32_10",
    "dropout_threshold",
    "dropout_draws",
    "dropout_keep_mask",
    "pack_mask",
    "unpack_mask",
    "lora_linear_ref",
    "lora_linear_ref_grads",
    "WeightRecompute",
    "LoRALinearRefRecompute",
]

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
_U32 = 0xFFFFFFFF
_U16 = 0xFFFF


def _mul32(a: torch.Tensor | int, b: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of two uint32 values held in int64.

    Done in 16-bit limbs so no intermediate exceeds 2⁴⁹: int64 never overflows.
    """
    a_lo, a_hi = a & _U16, a >> 16
    b_lo, b_hi = b & _U16, b >> 16
    ll = a_lo * b_lo
    hl = a_hi * b_lo
    lh = a_lo * b_hi
    hh = a_hi * b_hi
    cross = (ll >> 16) + (hl & _U16) + lh  # < 2^34
    hi = (hh + (hl >> 16) + (cross >> 16)) & _U32
    lo = ((cross & _U16) << 16) | (ll & _U16)
    return hi, lo


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds on uint32 values stored in int64 tensors (same as ``tl.randint4x``)."""
    for _ in range(10):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _U32
        k1 = (k1 + PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """16-bit threshold: an element is dropped iff its random 16-bit value is below it."""
    return int(round(p * 65536.0))


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")


def dropout_draws(seed: int, M: int, K: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-bit random values ``u`` (M, K) int64 behind the mask (kept iff ``u >= threshold``).

    ``verify`` uses them to place a threshold exactly on a draw: random probes meet ``u == threshold``
    with probability 2⁻¹⁶ per element, so a kernel comparing with ``>`` would pass them by luck."""
    G = (K + 7) // 8
    rows = torch.arange(M, device=device, dtype=torch.int64)[:, None].expand(M, G)
    groups = torch.arange(G, device=device, dtype=torch.int64)[None, :].expand(M, G)
    zero = torch.zeros_like(rows)
    lanes = philox4x32_10(groups, rows & _U32, rows >> 32, zero, seed & _U32, (seed >> 32) & _U32)
    halves = [(lane >> (16 * h)) & _U16 for h in (0, 1) for lane in lanes]  # index j = 4*h + lane
    return torch.stack(halves, dim=-1).reshape(M, G * 8)[:, :K]


def _keep_mask_impl(seed: int, M: int, K: int, p: float, device: torch.device | str) -> torch.Tensor:
    return dropout_draws(seed, M, K, device) >= dropout_threshold(p)


@torch.library.custom_op("lora_kernels::dropout_keep_mask", mutates_args=())
def _keep_mask_op(seed: int, M: int, K: int, p: float, device: torch.device) -> torch.Tensor:
    """Opaque to torch.compile: inductor would otherwise inline the 10 Philox rounds into one
    enormous fused expression and take minutes to lower it."""
    return _keep_mask_impl(seed, M, K, p, device)


@_keep_mask_op.register_fake
def _(seed, M, K, p, device):
    return torch.empty((M, K), dtype=torch.bool, device=device)


def dropout_keep_mask(seed: int, M: int, K: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean keep-mask of shape ``(M, K)`` (True = kept) defined by the module docstring."""
    if torch.compiler.is_compiling():
        # The seed may be a symbolic int here (drawn with .item() inside the compiled region).
        torch._check(seed >= 0)
        return _keep_mask_op(seed, M, K, p, torch.device(device))
    _check_seed(seed)
    return _keep_mask_impl(seed, M, K, p, device)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """``(M, K)`` bool -> ``(M, ceil(K/8))`` uint8, bit ``j`` of byte ``g`` = column ``8g + j``."""
    M, K = keep.shape
    G = (K + 7) // 8
    padded = torch.zeros(M, G * 8, dtype=torch.int32, device=keep.device)
    padded[:, :K] = keep.to(torch.int32)
    weights = 1 << torch.arange(8, device=keep.device, dtype=torch.int32)
    return (padded.view(M, G, 8) * weights).sum(-1).to(torch.uint8)


def unpack_mask(bits: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``(M, ceil(K/8))`` uint8 -> ``(M, K)`` bool."""
    M, G = bits.shape
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    out = (bits.to(torch.int32)[:, :, None] >> shifts) & 1
    return out.reshape(M, G * 8)[:, :K].bool()


def lora_linear_ref(
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
) -> torch.Tensor:
    """Reference LoRA linear, differentiable by autograd in every input.

    Numerics follow PEFT: the base path runs in x's dtype; the low-rank path runs in the
    adapters' dtype (x is cast to it, as PEFT does for fp32 adapters) and its result is cast
    back to x's dtype before the add. In float64 this is the exact definition.
    """
    K = x.shape[-1]
    y = F.linear(x, weight, bias)
    h = x.to(lora_A.dtype)
    if training and dropout_p > 0.0:
        if seed is None:
            raise ValueError("seed is required when training with dropout_p > 0")
        M = x.numel() // K if K else 0
        keep = dropout_keep_mask(seed, M, K, dropout_p, device=x.device).reshape(x.shape)
        h = h * keep.to(h.dtype) * (1.0 / (1.0 - dropout_p))
    t = F.linear(h, lora_A)
    u = F.linear(t.to(lora_B.dtype), lora_B, lora_bias)
    return y + (u * scaling).to(y.dtype)


def lora_linear_ref_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    has_bias: bool,
    has_lora_bias: bool,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dweight, dbias, dlora_A, dlora_B, dlora_bias)`` of the reference as tensors
    that are themselves differentiable: the kernel backends' backward under ``create_graph=True``.

    The kernels' gradients have no autograd history, so a double backward through them would
    silently treat first-order gradients as constants. The biases enter y additively: stand-in
    zero biases of the same dtypes give their gradients. ``dropout_p`` > 0 is a training call.
    """
    N = weight.shape[0]
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        bias, lora_bias = (
            torch.zeros(N, dtype=dt, device=x.device, requires_grad=True) if has else None
            for has, dt in ((has_bias, weight.dtype), (has_lora_bias, lora_B.dtype))
        )
        y = lora_linear_ref(x, weight, lora_A, lora_B, bias, lora_bias, scaling, dropout_p, True, seed)
        inputs = (x, weight, bias, lora_A, lora_B, lora_bias)
        want = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i]]
        grads = torch.autograd.grad(y, [inputs[i] for i in want], dy, create_graph=True, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * 6
    for i, g in zip(want, grads, strict=True):
        out[i] = g
    return tuple(out)


class WeightRecompute:
    """The ``recompute_weight`` callable of a forward, with what its weight was (shape, dtype, device).

    A backend's autograd function keeps this instead of the weight (e.g. a 4-bit weight's dequantized
    copy, ``N·K`` elements per layer, ≥ 32 MiB at 4096 × 4096 in bf16) and calls :meth:`get` in backward.
    """

    __slots__ = ("fn", "shape", "dtype", "device")

    def __init__(self, fn: Callable[[], torch.Tensor], weight: torch.Tensor) -> None:
        self.fn = fn
        self.shape, self.dtype, self.device = tuple(weight.shape), weight.dtype, weight.device

    def get(self, weight_grad: bool = False) -> torch.Tensor:
        """The weight again, in a backward that computes the weight's gradient or not (``weight_grad``).

        With ``weight_grad`` it comes back as a leaf that requires grad (the reference's backward
        differentiates with respect to it). Under ``create_graph=True`` that is refused: the copy has no
        history, so a second-order gradient would not reach the weight the forward was given."""
        if weight_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "backward(create_graph=True) with a weight that requires grad: recompute_weight's copy has no "
                "autograd history, so the weight's second-order gradients would be lost; keep the weight "
                "(recompute_weight=None) for double backward"
            )
        w = self.fn()
        if not isinstance(w, torch.Tensor) or (tuple(w.shape), w.dtype, w.device) != (
            self.shape,
            self.dtype,
            self.device,
        ):
            got = f"{tuple(w.shape)} {w.dtype} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise RuntimeError(
                f"recompute_weight() returned {got} in backward, but the forward's weight was "
                f"{self.shape} {self.dtype} on {self.device}: it must return the same weight again"
            )
        return w.detach().requires_grad_() if weight_grad else w


class LoRALinearRefRecompute(torch.autograd.Function):
    """The torch backend of ``lora_linear(..., recompute_weight=...)``, a training call: the reference
    without the weight kept for backward. The forward runs without a graph; the backward differentiates
    the reference again on the recomputed weight (the mask is a function of the seed, so nothing else is
    saved but x and the adapters). Arguments: ``(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p,
    seed, recompute: WeightRecompute)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, recompute):
        with torch.no_grad():
            y = lora_linear_ref(x, weight, lora_A, lora_B, bias, lora_bias, scaling, p, True, seed)
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scaling, ctx.p, ctx.seed, ctx.recompute = scaling, p, seed, recompute
        ctx.has_bias, ctx.has_lora_bias = bias is not None, lora_bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B = ctx.saved_tensors
        weight = ctx.recompute.get(ctx.needs_input_grad[1])
        grads = lora_linear_ref_grads(dy, x, weight, lora_A, lora_B, ctx.has_bias, ctx.has_lora_bias,
                                      ctx.scaling, ctx.p, ctx.seed, ctx.needs_input_grad)  # fmt: skip
        return (*grads, None, None, None, None)
