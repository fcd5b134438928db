"""Axolotl plugin: an Axolotl run's LoRA Linear layers through the fused kernels, from its config.

```yaml
plugins:
  - lora_kernels.integrations.axolotl.LoraKernelsPlugin
lora_kernels_backend: auto            # optional: auto | triton | cuda | torch
lora_kernels_dropout_mask: bitmask    # optional: bitmask | regenerate
```

Axolotl builds the PEFT model as usual; once it is loaded (the ``post_model_load`` hook, after Axolotl's
own patches) the plugin calls :func:`lora_kernels.patch` on it and logs the report. Nothing else
changes: adapters save, load and merge as PEFT's.

Axolotl's own LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``, switched on by
default for ``adapter: lora``/``qlora`` when none of them is set) replace the attention and MLP
forwards and read the LoRA weights themselves, so the PEFT layers (and the fused ones) would never be
called. With this plugin, those that are unset are set to false before Axolotl validates the config;
one set to true is refused, naming it. ``lora_embedding_kernel`` (embedding LoRA, which the fused
kernels do not serve) is left as it is.

Importing this module needs axolotl (its ``BasePlugin``) and pydantic, which axolotl brings.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field

from ..api import MASK_MODES
from ..backends import BACKENDS
from . import patch

__all__ = ["LoraKernelsPlugin", "LoraKernelsArgs", "AXOLOTL_LORA_KERNEL_KEYS"]

log = logging.getLogger("lora_kernels")

# Axolotl's fused LoRA paths that bypass the PEFT layers' forward (axolotl.monkeypatch.lora_kernels).
AXOLOTL_LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def _refuse_axolotl_kernels(cfg: Any, state: str) -> None:
    on = [k for k in AXOLOTL_LORA_KERNEL_KEYS if cfg.get(k)]
    if on:
        raise ValueError(
            f"lora_kernels' Axolotl plugin: {', '.join(on)} {'is' if len(on) == 1 else 'are'} {state}. "
            "Axolotl's LoRA kernels replace the attention/MLP forward and read the LoRA weights themselves, "
            f"so the fused layers would never run: set {' and '.join(on)} to false, or remove "
            f"{__name__}.LoraKernelsPlugin from plugins"
        )


class LoraKernelsArgs(BaseModel):
    """The plugin's keys in an Axolotl config (merged into Axolotl's schema, validated with it)."""

    lora_kernels_backend: Literal[("auto", *BACKENDS)] | None = Field(  # type: ignore[valid-type]
        default=None, json_schema_extra={"description": "lora_kernels backend for the fused layers (default auto)"}
    )
    lora_kernels_dropout_mask: Literal[MASK_MODES] | None = Field(  # type: ignore[valid-type]
        default=None,
        json_schema_extra={
            "description": "what backward keeps of the dropout mask: a bitmask (default) or nothing (regenerate)"
        },
    )


class LoraKernelsPlugin(BasePlugin):
    """Patches the loaded PEFT model with :func:`lora_kernels.patch`; keeps Axolotl's LoRA kernels off."""

    def __init__(self) -> None:
        super().__init__()
        self._defaulted: list[str] = []  # keys register() set, undone if the config is rejected

    def get_input_args(self) -> str:
        return f"{__name__}.LoraKernelsArgs"

    def _listed(self, cfg: Any) -> bool:
        # Axolotl's PluginManager is a process-wide singleton, and some of its callers run the hooks of
        # every plugin it ever registered: a later config of the process that does not list this one
        # is left alone.
        return any(str(name).rsplit(".", 1)[-1] == type(self).__name__ for name in cfg.get("plugins") or ())

    def register(self, cfg: dict) -> None:
        """Runs on the raw config, before Axolotl validates it (and before it auto-enables its kernels)."""
        if not self._listed(cfg):
            return
        _refuse_axolotl_kernels(cfg, "set to true")
        self._defaulted = [k for k in AXOLOTL_LORA_KERNEL_KEYS if cfg.get(k) is None]
        for k in self._defaulted:
            cfg[k] = False
        if self._defaulted:
            log.info("lora_kernels: set %s to false (the fused layers serve those projections)", self._defaulted)

    def on_config_validation_error(self, cfg: dict) -> None:
        for k in self._defaulted:
            if cfg.get(k) is False:
                del cfg[k]
        self._defaulted = []

    def post_model_load(self, cfg: Any, model: Any) -> None:
        if not self._listed(cfg):
            return
        _refuse_axolotl_kernels(cfg, "on after the plugin registered (another plugin?)")
        # patch() logs its report (INFO; WARNING when no layer could be fused).
        patch(
            model,
            backend=cfg.get("lora_kernels_backend") or "auto",
            dropout_mask=cfg.get("lora_kernels_dropout_mask") or "bitmask",
        )
