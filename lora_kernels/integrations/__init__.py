"""Integrations with training libraries. PEFT is optional: it is imported on first use only.

``patch`` / ``unpatch`` / ``register_fused_peft_module`` are thin wrappers around
:mod:`lora_kernels.integrations.peft`, so ``import lora_kernels`` works (and stays fast) on an
install without peft/transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .peft import PatchReport

__all__ = ["patch", "unpatch", "register_fused_peft_module"]


def patch(model: nn.Module, *, backend: str = "auto", dropout_mask: str = "bitmask", log: bool = True) -> PatchReport:
    """Run every eligible PEFT LoRA Linear of ``model`` through the fused kernels.

    See :func:`lora_kernels.integrations.peft.patch`.
    """
    from .peft import patch as _patch

    return _patch(model, backend=backend, dropout_mask=dropout_mask, log=log)


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch`: every LoRA layer runs PEFT's own forward again. Returns the count.

    See :func:`lora_kernels.integrations.peft.unpatch`.
    """
    from .peft import unpatch as _unpatch

    return _unpatch(model)


def register_fused_peft_module(config: Any, *, backend: str = "auto", dropout_mask: str = "bitmask") -> Any:
    """Make PEFT create fused LoRA Linear layers for ``config`` (a ``peft.LoraConfig``).

    See :func:`lora_kernels.integrations.peft.register_fused_peft_module`.
    """
    from .peft import register_fused_peft_module as _register

    return _register(config, backend=backend, dropout_mask=dropout_mask)
