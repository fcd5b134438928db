"""LoRA on any PyTorch model without PEFT: wrap its linear layers in :class:`LoRALinear`.

    names = lk.add_lora(model, r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    ...train (only the adapters require grad)...
    torch.save(lk.lora_state_dict(model), "adapter.pt")
    lk.merge_lora(model, unload=True)   # the plain layers again, holding W + s·B·A, for inference

For PEFT models use :func:`lora_kernels.patch` instead: it keeps PEFT's own modules and file format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .layer import LoRALinear, is_hf_conv1d

__all__ = ["add_lora", "lora_layers", "lora_state_dict", "merge_lora"]


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output projection (excluded by "all-linear", as PEFT does): transformers'
    ``get_output_embeddings()`` when the model has it."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):  # a regular expression over the full module name, as PEFT
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (not the root: name is never "")."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from e


def is_plain_linear(module: nn.Module) -> bool:
    """An exact ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's projections, weight stored (K, N))."""
    return type(module) is nn.Linear or is_hf_conv1d(module)


def _skip_reason(module: nn.Module) -> str | None:
    if is_plain_linear(module):
        return None
    # Subclasses may not compute F.linear(x, weight, bias) in forward (quantized layers subclass
    # nn.Linear with packed weights) or may be read without calling forward (nn.MultiheadAttention's
    # out_proj, a NonDynamicallyQuantizableLinear whose weight F.multi_head_attention_forward reads).
    return f"{type(module).__name__} is a subclass of nn.Linear, not nn.Linear itself"


def add_lora(
    model: nn.Module,
    r: int,
    *,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] = (),
    lora_alpha: float = 8.0,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    lora_bias: bool = False,
    backend: str = "auto",
    dropout_mask: str = "bitmask",
    adapter_dtype: torch.dtype | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Replace the targeted linear layers of ``model`` in place by :class:`LoRALinear` wrapping them.

    Args:
        target_modules: ``"all-linear"`` (every ``nn.Linear`` and transformers ``Conv1D`` but the output
            layer, as PEFT's option),
            a list of module names or name suffixes (``["q_proj", "v_proj"]`` matches
            ``layers.0.attn.q_proj``), or another string: a regular expression the full name must match.
        exclude_modules: layers never wrapped, given as ``target_modules`` (names or suffixes, or a regex).
        freeze_base: set ``requires_grad=False`` on every parameter of ``model`` first, so that only
            the new adapters train (as ``peft.get_peft_model`` does).
        The rest: as :class:`LoRALinear` (``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``lora_bias``,
        ``backend``, ``dropout_mask``, ``adapter_dtype``).

    Returns the names of the wrapped layers (each now a ``LoRALinear`` whose ``base_layer`` is the old
    layer, its weight shared, not copied; a layer shared under several names is wrapped once, at all of
    them, and listed under the first). Raises ValueError if no layer matches; a layer already
    wrapped is left as it is.

    Only exact ``nn.Linear`` (and ``Conv1D``) modules are wrapped: a subclass that matches a name raises a ValueError
    naming it (quantized layers and ``nn.MultiheadAttention``'s ``out_proj`` subclass nn.Linear but do
    not compute ``x Wᵀ + b`` through ``forward``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            _check_regex(target_modules, "target_modules")
    elif not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(
            f"target_modules must be 'all-linear', a regex or a non-empty list of names, got {target_modules!r}"
        )
    if isinstance(exclude_modules, str):
        _check_regex(exclude_modules, "exclude_modules")
    else:
        exclude_modules = list(exclude_modules)
        if not all(isinstance(t, str) and t for t in exclude_modules):
            raise ValueError(f"exclude_modules must be a regex or a list of names, got {exclude_modules!r}")
    output = _output_layer(model) if target_modules == "all-linear" else None
    inside_lora = {id(m.base_layer) for m in model.modules() if isinstance(m, LoRALinear)}
    chosen: list[tuple[str, nn.Module]] = []
    already = 0
    for name, module in model.named_modules():
        if not name or (exclude_modules and _matches(name, exclude_modules)):
            continue
        if target_modules == "all-linear":
            # The plain linear layers (subclasses are never guessed at, see _skip_reason), and the layers
            # already wrapped (counted below).
            if isinstance(module, LoRALinear):
                if module.base_layer is not output:
                    already += 1
                continue
            if not is_plain_linear(module) or module is output or id(module) in inside_lora:
                continue
        elif not _matches(name, target_modules):
            continue
        if isinstance(module, LoRALinear) or id(module) in inside_lora:
            already += 1
            continue
        if not isinstance(module, nn.Linear) and not is_hf_conv1d(module):
            raise ValueError(
                f"target_modules matched {name!r}, a {type(module).__name__}: only nn.Linear and Conv1D layers "
                "take LoRA"
            )
        reason = _skip_reason(module)
        if reason is not None:
            raise ValueError(f"target_modules matched {name!r}, which cannot be wrapped: {reason}")
        chosen.append((name, module))
    if not chosen:
        if already:
            return []
        linear = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_hf_conv1d(m))][:8]
        raise ValueError(
            f"target_modules {target_modules!r} matched no nn.Linear layer of the model "
            f"(its nn.Linear layers include: {', '.join(linear) or 'none'})"
        )
    options = dict(
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        lora_bias=lora_bias,
        backend=backend,
        dropout_mask=dropout_mask,
        adapter_dtype=adapter_dtype,
    )
    # Build every layer before replacing any: a bad option raises with the model unchanged (LoRALinear
    # freezes its base layer, so the flags are put back).
    flags = [(p, p.requires_grad) for _, module in chosen for p in module.parameters()]
    try:
        wrappers = {id(module): LoRALinear(module, r, **options) for _, module in chosen}
    except Exception:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    # A layer reachable under several names (shared between blocks) gets one wrapper at every one of
    # them, so no path runs it without its adapter.
    wrapped = [(name, wrappers[id(m)]) for name, m in model.named_modules(remove_duplicate=False) if id(m) in wrappers]
    if freeze_base:  # before the adapters are attached: they stay trainable
        for p in model.parameters():
            p.requires_grad_(False)
    for name, layer in wrapped:
        _replace(model, name, layer)
    return [name for name, _ in chosen]


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The ``(name, LoRALinear)`` layers of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model``'s LoRALinear layers (``lora_A``, ``lora_B``, ``lora_bias``), keyed
    as in ``model.state_dict()``, so that ``model.load_state_dict(sd, strict=False)`` restores them."""
    out = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        for pname in ("lora_A", "lora_B", "lora_bias"):
            p = getattr(layer, pname)
            if p is not None:
                out[prefix + pname] = p.detach()
    return out


@torch.no_grad()
def merge_lora(model: nn.Module, *, unload: bool = False) -> int:
    """Fold every adapter into its base weight (:meth:`LoRALinear.merge`). With ``unload=True`` also
    put each base layer back in place of its LoRALinear (the adapters are dropped: an
    inference model with no LoRA left). Returns the number of layers merged. A ``model`` that is itself
    a LoRALinear is merged, and cannot be unloaded in place (ValueError)."""
    layers = lora_layers(model)
    if unload and any(name == "" for name, _ in layers):
        raise ValueError(
            "merge_lora(unload=True) cannot replace the model itself: use model.merge() and model.base_layer"
        )
    for name, layer in layers:  # checked for every layer first: an error leaves none merged
        if not layer.merged and layer.lora_bias is not None and layer.base_layer.bias is None:
            raise RuntimeError(f"cannot merge {name or 'the model'}: it has a lora_bias and its base layer no bias")
    for _, layer in layers:
        layer.merge()
    if unload:  # every position of a shared layer
        positions = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALinear)]
        for name, layer in positions:
            _replace(model, name, layer.base_layer)
    return len(layers)
