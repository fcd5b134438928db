"""``LoRALinear``: a frozen ``nn.Linear`` plus a trainable low-rank update, run by the fused op.

    y = x Wᵀ + bias + scaling · (dropout(x) Aᵀ Bᵀ + lora_bias)

Shapes: ``x: (..., K)``, ``base.weight W: (N, K)`` (frozen), ``lora_A: (r, K)``,
``lora_B: (N, r)`` (PEFT's layout), ``lora_bias: (N,)``; the output is ``(..., N)``. The base may also
be transformers' ``Conv1D`` (GPT-2's projections), which stores ``W`` as ``(K, N)``: the kernels read
it in place through its ``(N, K)`` view.

The module is a thin owner of parameters: every forward is one call of
:func:`lora_kernels.lora_linear`, so the dropout mask, autocast rules and backend choice are
exactly those of the functional API. ``merge()`` folds ``scaling · B A`` into W for
zero-overhead inference; ``unmerge()`` takes it out again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .api import MASK_MODES, lora_linear
from .backends import BACKENDS

__all__ = ["LoRALinear"]

_HALF = (torch.float16, torch.bfloat16)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (``y = x W + b``, ``W: (K, N)``), without importing transformers."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.split(".")[0] == "transformers"


class LoRALinear(nn.Module):
    """A frozen linear layer with a LoRA adapter, forward and backward by the fused kernels.

    Args:
        base: the ``nn.Linear`` to adapt, ``weight: (N, K)``, ``bias: (N,)`` or None, or transformers'
            ``Conv1D`` (``weight: (K, N)``, read in place). It is kept (not copied) as the submodule
            ``base_layer`` and frozen (``requires_grad=False``).
        r: LoRA rank, ``>= 1``.
        lora_alpha: scaling numerator (PEFT's default 8): ``scaling = lora_alpha / r``, or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``.
        lora_dropout: dropout probability on the low-rank path only, in ``[0, 1)``; active in
            ``train()`` mode, off in ``eval()``. A fresh seed is drawn per call from torch's
            default CPU generator, so ``torch.manual_seed`` makes runs (and activation
            checkpointing's recomputation, which restores the CPU RNG state) reproducible.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        lora_bias: add a trainable ``(N,)`` bias on the low-rank path (PEFT's ``lora_bias``),
            initialised to zero.
        backend: "auto", "torch", "triton" or "cuda" (see :func:`lora_kernels.lora_linear`).
        dropout_mask: "bitmask" or "regenerate" (what backward keeps of the dropout mask).
        adapter_dtype: dtype of ``lora_A``/``lora_B``/``lora_bias``. None follows PEFT's default:
            float32 when the base weight is float16/bfloat16 (stable optimizer updates; the
            kernels take fp32 adapters next to a half-precision base), else the base dtype.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_bias: bool = False,
        backend: str = "auto",
        dropout_mask: str = "bitmask",
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear) and not is_hf_conv1d(base):
            raise TypeError(f"base must be an nn.Linear (or transformers' Conv1D), got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        if dropout_mask not in MASK_MODES:
            raise ValueError(f"dropout_mask must be one of {MASK_MODES}, got {dropout_mask!r}")
        w = base.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if w.dtype in _HALF else w.dtype
        if not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating dtype, got {adapter_dtype}")

        base.requires_grad_(False)
        self.base_layer = base
        # A Conv1D's weight is stored (in, out) = (K, N).
        self.in_features, self.out_features = (
            tuple(w.shape) if is_hf_conv1d(base) else (base.in_features, base.out_features)
        )
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.backend = backend
        self.dropout_mask = dropout_mask
        factory = {"device": w.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_bias = nn.Parameter(torch.empty(self.out_features, **factory)) if lora_bias else None
        # A Python bool, not a device buffer: forward reads it every call and a CUDA tensor
        # would cost a host sync. It still travels in the state_dict (get_extra_state).
        self._merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, **kwargs) -> LoRALinear:
        """Wrap ``linear`` (kept, frozen) with a fresh rank-``r`` adapter; kwargs as ``__init__``."""
        return cls(linear, r, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``(N, K)`` (a transposed view for a Conv1D base), so code that reads
        ``layer.weight`` keeps working."""
        w = self.base_layer.weight
        return w.T if is_hf_conv1d(self.base_layer) else w

    @property
    def bias(self) -> torch.Tensor | None:
        """The base bias ``(N,)`` or None."""
        return self.base_layer.bias

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def merged(self) -> bool:
        """True while the adapter is folded into the base weight (see :meth:`merge`)."""
        return self._merged

    def get_extra_state(self) -> torch.Tensor:
        # Saved as "_extra_state" so a state_dict taken after merge() says that W already
        # holds the update; a CPU bool tensor keeps it loadable by weights_only / safetensors.
        return torch.tensor(self._merged, device="cpu")  # (not the default device, which may be a GPU)

    def set_extra_state(self, state: torch.Tensor | bool) -> None:
        self._merged = bool(state)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform with ``a = sqrt(5)`` (as nn.Linear, PEFT and the LoRA paper), B = 0.

        B = 0 makes the adapted layer start out equal to the base layer. A is drawn in float32
        and then cast, so the init does not depend on the adapter dtype's rounding.
        """
        a = torch.empty(self.lora_A.shape, dtype=torch.float32, device=self.lora_A.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.copy_(a)
        self.lora_B.zero_()
        if self.lora_bias is not None:
            self.lora_bias.zero_()

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` as an ``(N, K)`` tensor in float32 (float64 for float64 adapters)."""
        dt = torch.promote_types(self.lora_B.dtype, torch.float32)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling

    def _merge_update(self, sign: float) -> None:
        # In float32 at least (float64 for a float64 layer), rounded once to each base tensor's dtype.
        w = self.weight  # (N, K), a view of a Conv1D's (K, N) weight: updated in place either way
        acc = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(acc) + sign * self.delta_weight().to(acc)).to(w.dtype))
        if self.lora_bias is not None:
            b = self.base_layer.bias
            acc = torch.promote_types(b.dtype, torch.promote_types(self.lora_bias.dtype, torch.float32))
            b.copy_((b.to(acc) + sign * self.scaling * self.lora_bias.to(acc)).to(b.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base layer: ``W += s·B·A`` (and ``bias += s·lora_bias``).

        Computed in float32 (float64 for a float64 layer) and cast once to W's dtype. Afterwards forward is
        the plain linear (no adapter cost, no dropout) until :meth:`unmerge`. A ``lora_bias`` needs a base bias.
        """
        if self.merged:
            return
        if self.lora_bias is not None and self.base_layer.bias is None:
            raise RuntimeError("cannot merge lora_bias: the base layer has no bias")
        self._merge_update(1.0)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W -= s·B·A`` in float32 (float64 for a float64 layer).

        Exact up to one rounding of W's dtype per merge/unmerge (as in PEFT): in float32 the
        round trip is within ~1 ulp, in bfloat16 within bf16 rounding of W.
        """
        if not self.merged:
            return
        self._merge_update(-1.0)
        self._merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., K)`` -> ``(..., N)``; dropout follows ``self.training``."""
        if self.merged:
            return F.linear(x, self.weight, self.base_layer.bias)
        return lora_linear(
            x,
            self.weight,
            self.lora_A,
            self.lora_B,
            bias=self.base_layer.bias,
            lora_bias=self.lora_bias,
            scaling=self.scaling,
            dropout_p=self.lora_dropout,
            training=self.training,
            seed=None,  # drawn per call by lora_linear when dropout is active
            backend=self.backend,
            dropout_mask=self.dropout_mask,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
            f"use_rslora={self.use_rslora}, bias={self.base_layer.bias is not None}, "
            f"lora_bias={self.lora_bias is not None}, adapter_dtype={self.lora_A.dtype}, "
            f"backend={self.backend!r}, dropout_mask={self.dropout_mask!r}, merged={self.merged}"
        )
