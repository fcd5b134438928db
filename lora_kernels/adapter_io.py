"""LoRA adapters in PEFT's file format, for models that use :class:`LoRALinear` without PEFT.

    lk.save_peft_adapter(model, "out/")     # adapter_config.json + adapter_model.safetensors
    PeftModel.from_pretrained(base, "out/") # ...loads it (as do servers that read PEFT adapters)
    lk.load_peft_adapter(model, "peft_adapter/")  # and back: a PEFT LoRA adapter onto a plain model

Keys and layouts are PEFT's: ``base_model.model.<module>.lora_A.weight`` (r, K),
``...lora_B.weight`` (N, r), ``...lora_B.bias`` (N,) with ``lora_bias``; per-layer ranks and alphas go
to ``rank_pattern`` / ``alpha_pattern`` under full module names. PEFT itself is not needed for either.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .inject import add_lora, is_plain_linear, lora_layers
from .layer import LoRALinear, is_hf_conv1d

__all__ = ["save_peft_adapter", "load_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.(?P<what>weight|bias)$"
)


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def save_peft_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model``'s LoRALinear layers as a PEFT LoRA adapter in ``directory``.

    The most common rank and alpha become ``r`` / ``lora_alpha``; layers that differ are listed in
    ``rank_pattern`` / ``alpha_pattern``. ``lora_dropout`` is the most common one (PEFT keeps one; it
    only matters for further training). With ``lora_bias`` on some layers every layer gets a
    ``lora_B.bias`` (zeros where it had none: the same function). Returns the directory.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers (lk.add_lora adds them)")
    if any(name == "" for name, _ in layers):
        raise ValueError("model is itself a LoRALinear: save the model that contains it (PEFT keys name the layer)")
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) > 1:
        raise ValueError("PEFT keeps one use_rslora for every layer; these layers mix rsLoRA and plain scaling")
    ranks = [layer.r for _, layer in layers]
    alphas = [layer.lora_alpha for _, layer in layers]
    r, alpha = _most_common(ranks), _most_common(alphas)
    with_bias = any(layer.lora_bias is not None for _, layer in layers)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([layer.lora_dropout for _, layer in layers]),
        "use_rslora": rslora.pop(),
        "target_modules": [name for name, _ in layers],
        "rank_pattern": {name: layer.r for name, layer in layers if layer.r != r},
        "alpha_pattern": {name: layer.lora_alpha for name, layer in layers if layer.lora_alpha != alpha},
        "lora_bias": with_bias,
        "bias": "none",
        # PEFT sets it per layer from the layer's type (with a warning when the config disagrees).
        "fan_in_fan_out": all(is_hf_conv1d(layer.base_layer) for _, layer in layers),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        key = f"{_PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous().clone()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous().clone()
        if with_bias:
            b = layer.lora_bias if layer.lora_bias is not None else torch.zeros_like(layer.lora_B[:, 0])
            tensors[f"{key}.lora_B.bias"] = b.detach().cpu().contiguous().clone()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        from safetensors.torch import save_file
    except ImportError:  # PEFT reads either file
        torch.save(tensors, out / BIN_NAME)
        (out / SAFETENSORS_NAME).unlink(missing_ok=True)
    else:
        save_file(tensors, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
        (out / BIN_NAME).unlink(missing_ok=True)
    return out


def _pattern_value(pattern: dict, name: str, default: object) -> object:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a name that ends with it after a dot."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / SAFETENSORS_NAME))
    if (directory / BIN_NAME).is_file():
        return torch.load(directory / BIN_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no {SAFETENSORS_NAME} or {BIN_NAME}")


def load_peft_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    backend: str = "auto",
    dropout_mask: str = "bitmask",
    adapter_dtype: torch.dtype | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Wrap the layers a PEFT LoRA adapter in ``directory`` targets in LoRALinear and load its weights.

    ``model`` is the plain base model (its module names as PEFT saw them). Each layer gets the adapter's
    rank, alpha (``rank_pattern`` / ``alpha_pattern`` included), ``use_rslora``, ``lora_dropout`` and
    ``lora_bias``. Returns the names of the layers wrapped. Adapters PEFT saves with other variants (DoRA,
    embeddings, ``modules_to_save``) raise a ValueError naming what is not supported.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        raise ValueError(f"{directory}: use_dora=True is not supported by LoRALinear")
    if config.get("modules_to_save"):
        raise ValueError(f"{directory}: modules_to_save ({config['modules_to_save']}) is not supported")
    tensors = _read_tensors(directory)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{directory}: {key!r} is not a LoRA Linear weight (only lora_A / lora_B are supported)")
        parts.setdefault(m["module"], {})[f"{m['part']}.{m['what']}"] = value
    names = list(parts)
    for name in names:
        p = parts[name]
        if "lora_A.weight" not in p or "lora_B.weight" not in p or "lora_A.bias" in p:
            raise ValueError(f"{directory}: {name!r} needs lora_A.weight and lora_B.weight (got {sorted(p)})")
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{directory}: the adapter targets {name!r}, which the model does not have") from e
        if not is_plain_linear(module):
            raise ValueError(
                f"{directory}: the adapter targets {name!r}, a {type(module).__name__}, not an nn.Linear or Conv1D"
            )
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    groups: dict[tuple[int, float, bool], list[str]] = {}
    for name in names:
        r = int(_pattern_value(config.get("rank_pattern") or {}, name, r0))
        if parts[name]["lora_A.weight"].shape[0] != r:
            raise ValueError(f"{directory}: {name!r} has rank {parts[name]['lora_A.weight'].shape[0]}, the config {r}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, alpha0))
        groups.setdefault((r, alpha, "lora_B.bias" in parts[name]), []).append(name)
    wrapped: list[str] = []
    for i, ((r, alpha, lora_bias), group) in enumerate(groups.items()):
        done = add_lora(
            model,
            r,
            target_modules=group,
            lora_alpha=alpha,
            lora_dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora", False)),
            lora_bias=lora_bias,
            backend=backend,
            dropout_mask=dropout_mask,
            adapter_dtype=adapter_dtype,
            freeze_base=freeze_base and i == 0,  # later groups must not freeze the adapters added before
        )
        if sorted(done) != sorted(group):
            raise ValueError(f"{directory}: expected to wrap {sorted(group)}, wrapped {sorted(done)}")
        wrapped += done
    with torch.no_grad():
        for name in wrapped:
            layer: LoRALinear = model.get_submodule(name)
            layer.lora_A.copy_(parts[name]["lora_A.weight"])
            layer.lora_B.copy_(parts[name]["lora_B.weight"])
            if layer.lora_bias is not None:
                layer.lora_bias.copy_(parts[name]["lora_B.bias"])
    return wrapped
