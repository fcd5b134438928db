"""PEFT integration: run ``peft.tuners.lora.Linear`` layers through :func:`lora_kernels.lora_linear`.

Two ways in, same forward:

* ``patch(model)`` on a built PEFT model: every eligible LoRA Linear gets an instance-level
  ``forward`` (the class is untouched); ``unpatch(model)`` deletes it, so PEFT's own forward
  runs again, bit for bit.
* ``register_fused_peft_module(config)`` before ``get_peft_model``: PEFT's custom-module hook
  (``LoraConfig._register_custom_module``) then builds :class:`FusedLoraLinear` (a subclass of
  ``peft.tuners.lora.Linear``) for every float ``nn.Linear`` target and every transformers ``Conv1D``
  one (GPT-2's).

The fused forward computes, for the active adapters ``i`` of a layer (``x: (..., K)``,
``W: (N, K)``, ``A_i: (r_i, K)``, ``B_i: (N, r_i)``)::

    y = x Wᵀ + bias + Σ_i s_i · (dropout(x) A_iᵀ B_iᵀ + lora_bias_i)

in one fused call: one adapter is passed as is; several are stacked into one rank-Σr update
``A = [A_1; A_2; ...]``, ``B = [s_1 B_1, s_2 B_2, ...]`` (scaling 1). PEFT draws an independent
dropout mask per adapter; stacked adapters share one mask (each adapter's own mask has the
same distribution), so stacking needs one dropout p for all active adapters.

Each call checks whether the fused path applies and otherwise runs PEFT's own forward
unchanged: merged or disabled adapters, ``adapter_names=`` mixed batches (and any other extra
argument), LoRA variants (DoRA, aLoRA, ...), active adapters with different dropout p or dtypes,
disabled input casting, hooks on the modules PEFT calls (base layer, lora_A/lora_B, dropout),
another tuner's layer as the base (PeftMixedModel). Layers that can never be fused
(Embedding/Conv LoRA layers, quantized bases other than bitsandbytes' 4-bit ones or any other than
``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's, ``fan_in_fan_out``: its ``(K, N)`` weight is
passed transposed, a view), subclasses with their own forward, an instance-level forward such as
accelerate's hooks) are not patched.

QLoRA: ``patch`` also takes LoRA layers over a bitsandbytes ``Linear4bit`` base (PEFT's
``lora.bnb.Linear4bit``, or ``lora.Linear`` where PEFT built that). The fused call gets the weight
as bitsandbytes' own training path does, dequantized to the compute dtype for this call, and does
not keep it for backward: backward dequantizes again (``recompute_weight``), as bitsandbytes does.
The base layer keeps its own path under torch.compile.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from ..api import MASK_MODES, lora_linear
from ..backends import BACKENDS

try:  # GPT-2's projections: y = x W + b with W stored (K, N) (PEFT's fan_in_fan_out layers)
    from transformers.pytorch_utils import Conv1D as _Conv1D
except ImportError:  # transformers is optional for PEFT models built without it

    class _Conv1D:  # type: ignore[no-redef]
        pass


__all__ = [
    "FusedLoraLinear",
    "PatchReport",
    "fused_linear_class",
    "patch",
    "unpatch",
    "register_fused_peft_module",
    "inspect_model",
]

logger = logging.getLogger("lora_kernels")

# Keyword arguments PEFT's Linear.forward pops (not passed to the base layer). When all of
# them are None the fused path is equivalent; anything else goes to PEFT.
_POPPED_KWARGS = ("adapter_names", "alora_offsets")
_PATCH_KEYS = (
    "forward", "_replicate_for_data_parallel", "_lk_patched", "_lk_backend", "_lk_dropout_mask", "_lk_last_fallback"
)  # fmt: skip
_MISSING = object()


def _entry(modules: nn.Module, key: str) -> nn.Module:
    """``modules[key]`` of PEFT's per-adapter ``nn.ModuleDict`` (lora_A, lora_B, lora_dropout), read from its
    registry where it is exactly a ModuleDict: its ``__getitem__`` is that read, behind a Python call."""
    return modules._modules[key] if type(modules) is nn.ModuleDict else modules[key]


def _linear_attr(lin: nn.Module, name: str) -> Any:
    """``lin.<name>`` ("weight" or "bias"). For exactly an ``nn.Linear`` (whose class defines neither name), where
    Python finds it: the instance's dict, then the parameter registry; without ``nn.Module.__getattr__``'s Python
    call (≈ 0.35 µs, several a forward). Anything else, or a name in neither place, by the attribute lookup."""
    if type(lin) is nn.Linear:
        d = lin.__dict__
        v = d.get(name, _MISSING)
        if v is _MISSING:
            v = d["_parameters"].get(name, _MISSING)
        if v is not _MISSING:
            return v
    return getattr(lin, name)


def _check_options(backend: str, dropout_mask: str) -> None:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if dropout_mask not in MASK_MODES:
        raise ValueError(f"dropout_mask must be one of {MASK_MODES}, got {dropout_mask!r}")


# ----------------------------------------------------------------------------- eligibility


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch build without distributed: no tensor is a DTensor

    class DTensor:  # type: ignore[no-redef]
        pass


def _base_reason(base: nn.Module) -> str | None:
    """Why the fused op cannot stand in for ``base`` (the frozen layer), or None."""
    if isinstance(base, _Conv1D):
        # transformers' Conv1D computes addmm(bias, x, W) with W (K, N): the fused op takes W.T, a
        # strided view (no copy; on Hopper the Triton kernels' TMA descriptors describe the (K, N) matrix).
        if type(base).forward is not _Conv1D.forward:
            return f"base layer {type(base).__name__} has its own forward"
    elif not isinstance(base, nn.Linear):
        return f"base layer {type(base).__name__} is not an nn.Linear (or transformers' Conv1D)"
    elif type(base).forward is not nn.Linear.forward:
        # bitsandbytes / HQQ / torchao / TE linears subclass nn.Linear with their own forward.
        return f"base layer {type(base).__name__} has its own forward (quantized or wrapped linear)"
    w = base.weight
    # A DTensor weight is what FSDP2 (fully_shard) leaves between steps; its forward runs on the
    # unsharded plain tensors. Whether a forward sees DTensors (tensor parallelism) is decided per
    # call (_call_plan).
    if type(w) not in (torch.Tensor, nn.Parameter, DTensor) or not w.dtype.is_floating_point:
        return f"base weight is {type(w).__name__} of {w.dtype} (quantized or tensor subclass)"
    return None


def _bnb_linear4bit() -> type | None:
    """bitsandbytes' ``nn.Linear4bit`` where bitsandbytes is already imported (a model holding one
    has imported it), else None: never imported here."""
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), "Linear4bit", None) if bnb is not None else None


def _is_bnb_4bit(base: nn.Module) -> bool:
    """Whether ``base`` is a bitsandbytes 4-bit linear running bitsandbytes' own forward (NF4 and FP4
    subclasses included), which the fused path stands in for by dequantizing its weight."""
    cls = _bnb_linear4bit()
    return cls is not None and isinstance(base, cls) and type(base).forward is cls.forward


def _peft_bnb_4bit_class() -> type | None:
    """PEFT's LoRA layer for 4-bit bases (``peft.tuners.lora.bnb.Linear4bit``), where it exists."""
    if _bnb_linear4bit() is None:
        return None
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _static_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` (a PEFT LoRA layer) can never take the fused path, or None."""
    bnb_cls = _peft_bnb_4bit_class()
    if bnb_cls is not None and isinstance(layer, bnb_cls):
        # QLoRA's LoRA layer: base(x) + Σ s·B·A·dropout(x), the same forward as lora.Linear's.
        if type(layer).forward is not bnb_cls.forward:
            return f"{type(layer).__name__} overrides peft's lora.bnb.Linear4bit.forward"
        if not _is_bnb_4bit(layer.get_base_layer()):
            return f"base layer {type(layer.get_base_layer()).__name__} is not bitsandbytes' Linear4bit"
        return _instance_forward_reason(layer)
    if not isinstance(layer, PeftLoraLinear):
        return f"{type(layer).__name__} LoRA layer: only LoRA Linear layers are fused"
    if not isinstance(layer, FusedLoraLinear) and type(layer).forward is not PeftLoraLinear.forward:
        return f"{type(layer).__name__} overrides peft's lora.Linear.forward"
    reason = _instance_forward_reason(layer)
    if reason is not None:
        return reason
    base = layer.get_base_layer()
    if _is_bnb_4bit(base) and not isinstance(layer, FusedLoraLinear):
        # lora.Linear over a 4-bit base: what PEFT builds where its own 4-bit dispatch does not apply
        # (a model not marked is_loaded_in_4bit). Its forward is base(x) + the adapters, as for QLoRA's.
        return None if not getattr(layer, "fan_in_fan_out", False) else "fan_in_fan_out=True on a 4-bit base layer"
    reason = _base_reason(base)
    if reason is not None:
        return reason
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    if fan_in_fan_out != isinstance(base, _Conv1D):
        # PEFT sets it for Conv1D bases (their weight is stored (K, N)) and clears it for nn.Linear:
        # any other pairing merges transposed deltas, a state the fused op does not take sides in.
        return f"fan_in_fan_out={fan_in_fan_out} on a {type(base).__name__} base layer"
    return None


def _instance_forward_reason(layer: nn.Module) -> str | None:
    own = layer.__dict__.get("forward")
    if own is not None and not isinstance(own, _PatchedForward) and not isinstance(layer, FusedLoraLinear):
        # e.g. accelerate's add_hook_to_module: patching would replace it, and unpatch() would not restore it.
        return "has an instance-level forward (e.g. an accelerate hook) that patching would replace"
    return None


def _variant_name(layer: nn.Module, adapter: str) -> str | None:
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA"
    variants = getattr(layer, "lora_variant", None)  # peft >= 0.16
    if variants and adapter in variants:
        return type(variants[adapter]).__name__
    return None


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: module hooks (tensor parallel
    plans, DeepSpeed ZeRO-3's parameter gathering, torch.nn.utils.prune, user hooks) or an
    instance-level forward (accelerate's offloading). PEFT calls base_layer, lora_A, lora_B and the
    dropout as modules; the fused op reads their weights directly and would skip these. Global hooks
    (module trackers such as FlopCounterMode's) are not checked: they observe every module."""
    d = module.__dict__  # read directly: half the cost of four attribute lookups, on every call
    return "forward" in d or bool(
        d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"] or d["_backward_hooks"]
    )


def _state_plan(layer: PeftLoraLinear) -> str | tuple[list[str], float, nn.Module]:
    """The active adapters, their shared dropout p and the base layer, or why the layer's state
    needs PEFT's path.

    Depends only on the layer's state (not on the input), so :func:`inspect_model` reports it.
    """
    if layer.disable_adapters:
        return "adapters disabled (disable_adapter() / disable_adapters)"
    if layer.merged:
        return f"adapter(s) {', '.join(map(repr, layer.merged_adapters))} merged into the base weight"
    # Runs on every forward: each submodule dict is read once (nn.Module.__getattr__ is slow).
    mods = layer._modules
    base = mods["base_layer"]
    if "base_layer" in base._modules:
        # Another tuner's layer (e.g. LoHa under LoRA in a PeftMixedModel): PEFT calls its forward,
        # which adds that tuner's own update; the fused op over the inner nn.Linear would drop it.
        return f"base layer is a {type(base).__name__} tuner layer (nested adapters)"
    lora_As, lora_Bs, dropouts = mods["lora_A"], mods["lora_B"], mods["lora_dropout"]
    active = [a for a in layer.active_adapters if a in lora_As]
    if not active:
        return "no active adapter on this layer"
    ps: set[float] = set()
    dtypes: set[torch.dtype] = set()
    for a in active:
        variant = _variant_name(layer, a)
        if variant is not None:
            return f"adapter {a!r} is a LoRA variant ({variant})"
        lora_A, lora_B = _entry(lora_As, a), _entry(lora_Bs, a)
        if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
            return f"adapter {a!r} has non-Linear lora_A/lora_B ({type(lora_A).__name__})"
        drop = _entry(dropouts, a)
        # PEFT applies the dropout module, so its own training flag decides (as nn.Dropout does).
        if type(drop) is nn.Dropout:
            p = float(drop.p) if drop.training else 0.0
            if p >= 1.0:  # valid for nn.Dropout (all zeros); the fused op takes p in [0, 1)
                return f"adapter {a!r} has dropout p = {p}"
            ps.add(p)
        elif type(drop) is nn.Identity:
            ps.add(0.0)
        else:
            return f"adapter {a!r} has a custom dropout module ({type(drop).__name__})"
        dtypes.add(_linear_attr(lora_A, "weight").dtype)
        dtypes.add(_linear_attr(lora_B, "weight").dtype)
    if len(ps) > 1:
        return f"active adapters have different dropout p {sorted(ps)} (a fused call shares one mask)"
    if len(dtypes) > 1:
        return f"active adapters have different dtypes {sorted(map(str, dtypes))}"
    return active, ps.pop(), base


def _any_dtensor(x: torch.Tensor, weight: torch.Tensor, layer: PeftLoraLinear, adapters: list[str]) -> bool:
    """Whether this call's input or weights are DTensors (a plain loop: torch.compile traces it)."""
    if isinstance(x, DTensor) or isinstance(weight, DTensor):
        return True
    lora_As, lora_Bs = layer._modules["lora_A"], layer._modules["lora_B"]
    for a in adapters:
        if isinstance(_linear_attr(_entry(lora_As, a), "weight"), DTensor) or isinstance(
            _linear_attr(_entry(lora_Bs, a), "weight"), DTensor
        ):
            return True
    return False


def _any_hooks(layer: PeftLoraLinear, base: nn.Module, adapters: list[str]) -> bool:
    """Whether any module PEFT's forward would call for ``adapters`` has hooks (see :func:`_has_hooks`)."""
    if _has_hooks(base):
        return True
    mods = layer._modules
    lora_As, lora_Bs, dropouts = mods["lora_A"], mods["lora_B"], mods["lora_dropout"]
    for a in adapters:
        if _has_hooks(lora_As[a]) or _has_hooks(lora_Bs[a]) or _has_hooks(dropouts[a]):
            return True
    return False


def _call_plan(
    layer: PeftLoraLinear, x: torch.Tensor, args: tuple, kwargs: dict
) -> str | tuple[list[str], float, nn.Module]:
    """:func:`_state_plan` plus the checks that depend on this call's arguments; with the base layer."""
    if args or any(k not in _POPPED_KWARGS or v is not None for k, v in kwargs.items()):
        return "extra forward arguments (adapter_names mixed batch or variant kwargs)"
    plan = _state_plan(layer)
    if isinstance(plan, str):
        return plan
    if not isinstance(x, torch.Tensor):
        return "input is not a tensor"
    adapters, p, base = plan
    weight = _linear_attr(base, "weight")  # read once: a module attribute costs ~0.4 µs
    if _any_dtensor(x, weight, layer, adapters):
        # FSDP2 unshards to plain tensors around the forward; DTensors here are tensor parallelism,
        # whose sharded matmuls the fused op does not implement.
        return "DTensor input or weights in forward (tensor parallelism): PEFT's path"
    if _any_hooks(layer, base, adapters):
        return "hooks or an instance-level forward on the base layer or an adapter's modules: PEFT's path"
    if _is_bnb_4bit(base):
        reason = _bnb_4bit_reason(base)
        if reason is not None:
            return reason
    elif x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return "input dtype differs from the base weight's (PEFT's path decides what happens)"
    adapter_dtype = _linear_attr(_entry(layer._modules["lora_A"], adapters[0]), "weight").dtype
    if x.dtype != adapter_dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled (peft.helpers.disable_input_dtype_casting)"
    return adapters, p, base


def _bnb_4bit_reason(base: nn.Module) -> str | None:
    """Why this call over a bitsandbytes 4-bit base takes PEFT's path, or None."""
    if torch.compiler.is_compiling():
        return "4-bit base under torch.compile: bitsandbytes' path (recompute_weight is eager only)"
    state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if state is None:
        return "4-bit base weight not quantized yet (bitsandbytes quantizes it when the layer moves to its device)"
    if getattr(state, "packing_format_for_cpu", False):
        return "4-bit base weight repacked for bitsandbytes' CPU inference kernel"
    return None


def _bnb_4bit_operands(base: nn.Module, x: torch.Tensor) -> tuple:
    """``(x, weight, bias, recompute)`` for the fused call over a bitsandbytes 4-bit base, as its forward
    computes them: x and bias in the layer's compute dtype, the weight ``(N, K)`` dequantized to it
    (bitsandbytes' own training path: dequantize, then a dense GEMM). ``recompute`` dequantizes again in
    backward, so the dense copy (``N·K`` elements) lives only during each pass, as in bitsandbytes."""
    bnb = sys.modules["bitsandbytes"]
    fix = getattr(bnb.nn.modules, "fix_4bit_weight_quant_state_from_module", None)
    if fix is not None:  # a quant_state lost by a parameter conversion (FSDP), recovered as bitsandbytes does
        fix(base)
    if not getattr(base, "compute_type_is_set", True):  # bitsandbytes picks it from the first input
        base.set_compute_type(x)
        base.compute_type_is_set = True
    cdt = base.compute_dtype or x.dtype
    param = base.weight

    def dequantize() -> torch.Tensor:
        return bnb.functional.dequantize_4bit(param.data, param.quant_state).to(cdt)

    bias = base.bias.to(cdt) if base.bias is not None else None
    return x.to(cdt), dequantize(), bias, dequantize


def _fused_call(layer: PeftLoraLinear, x: torch.Tensor, adapters: list[str], p: float, base: nn.Module) -> torch.Tensor:
    """One fused ``lora_linear`` call for the active ``adapters`` (sharing dropout ``p``) over ``base``."""
    backend = getattr(layer, "_lk_backend", "auto")
    dropout_mask = getattr(layer, "_lk_dropout_mask", "bitmask")
    if len(adapters) == 1:
        a = adapters[0]
        mods = layer._modules
        lin_B = _entry(mods["lora_B"], a)
        lora_A = _linear_attr(_entry(mods["lora_A"], a), "weight")
        lora_B, lora_bias = _linear_attr(lin_B, "weight"), _linear_attr(lin_B, "bias")
        scaling = float(layer.scaling[a])
    else:
        # Several adapters: Σ_i s_i B_i A_i h = [s_1 B_1, s_2 B_2, ...] [A_1; A_2; ...] h, one rank-Σr
        # update. The cat/mul are autograd ops, so every adapter still gets its own gradient.
        lora_A = torch.cat([layer.lora_A[a].weight for a in adapters], dim=0)
        lora_B = torch.cat([layer.lora_B[a].weight * float(layer.scaling[a]) for a in adapters], dim=1)
        biases = [layer.lora_B[a].bias * float(layer.scaling[a]) for a in adapters if layer.lora_B[a].bias is not None]
        lora_bias = torch.stack(biases).sum(0) if biases else None
        scaling = 1.0
    lora = dict(lora_bias=lora_bias, scaling=scaling, dropout_p=p, training=True, backend=backend,
                dropout_mask=dropout_mask)  # fmt: skip
    if not _is_bnb_4bit(base):
        weight = _linear_attr(base, "weight")
        weight = weight.T if isinstance(base, _Conv1D) else weight  # (N, K)
        return lora_linear(x, weight, lora_A, lora_B, bias=_linear_attr(base, "bias"), **lora)
    x_c, weight, bias, dequantize = _bnb_4bit_operands(base, x)
    y = lora_linear(x_c, weight, lora_A, lora_B, bias=bias, recompute_weight=dequantize, **lora)
    return y.to(_peft_4bit_out_dtype(layer, x, lora_A.dtype))


def _peft_4bit_out_dtype(layer: nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT's forward returns over a 4-bit base: the base layer's (x's: bitsandbytes casts
    back). Except PEFT's 4-bit LoRA layer where ``torch.is_autocast_enabled()`` (no device argument: CUDA's
    autocast) holds: it adds the adapters' output uncast, in the autocast dtype where x's device autocasts,
    else in the adapters' dtype, and the sum promotes."""
    if isinstance(layer, PeftLoraLinear) or not torch.is_autocast_enabled():
        return x.dtype
    dev = x.device.type
    lora_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else adapter_dtype
    return torch.promote_types(x.dtype, lora_dtype)


def _forward(layer: PeftLoraLinear, fallback, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    plan = _call_plan(layer, x, args, kwargs)
    # Written straight into __dict__: nn.Module.__setattr__ is needlessly slow for a per-call note.
    layer.__dict__["_lk_last_fallback"] = plan if isinstance(plan, str) else None
    if isinstance(plan, str):
        return fallback(layer, x, *args, **kwargs)
    return _fused_call(layer, x, *plan)


# ----------------------------------------------------------------------------- fused class


class FusedLoraLinear(PeftLoraLinear):
    """``peft.tuners.lora.Linear`` whose forward runs the fused kernels (PEFT's forward as fallback).

    Built by PEFT through :func:`register_fused_peft_module`. Everything else (adapters, merging,
    saving, ``merge_and_unload``) is PEFT's own code. ``_lk_backend`` / ``_lk_dropout_mask`` are
    class defaults, overridable per instance by :func:`patch`.
    """

    _lk_backend = "auto"
    _lk_dropout_mask = "bitmask"

    def __new__(cls, base_layer: nn.Module | None = None, *args: Any, **kwargs: Any):
        if base_layer is None:  # copy.deepcopy / unpickling: object.__new__ without arguments
            return super().__new__(cls)
        # PEFT's custom-module dispatch matches by isinstance, so bitsandbytes/HQQ/torchao linears
        # (nn.Linear subclasses) would land here too. Returning None makes PEFT's dispatcher try
        # its next candidate (its own quantized LoRA layers) instead, on every supported version.
        if _base_reason(_target_of(base_layer)) is not None:
            return None
        return super().__new__(cls)

    def __init__(self, base_layer: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # What PEFT's dispatch_default does: the flag follows the base layer's layout, True for a Conv1D
        # (weight (K, N)), False for an nn.Linear, set with PEFT's own warning where the config says
        # otherwise (a config targeting both kinds flips it, as it does in PEFT); a Conv1D layer is
        # built with is_target_conv_1d_layer=True. Recent peft reads the flag from the config it passes,
        # older releases (0.14) from a keyword argument.
        conv1d = isinstance(_target_of(base_layer), _Conv1D)
        if _fan_in_fan_out(kwargs) != conv1d:
            kind = "`Conv1D`" if conv1d else "`torch.nn.Linear`"
            warnings.warn(
                f"fan_in_fan_out is set to {not conv1d} but the target module is {kind}. "
                f"Setting fan_in_fan_out to {conv1d}.",
                stacklevel=2,
            )
            if hasattr(kwargs.get("config"), "fan_in_fan_out"):
                kwargs["config"].fan_in_fan_out = conv1d
            if "fan_in_fan_out" in kwargs:
                kwargs["fan_in_fan_out"] = conv1d
        if conv1d:
            kwargs["is_target_conv_1d_layer"] = True
        super().__init__(base_layer, adapter_name, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., K)`` -> ``(..., N)``, fused where it applies, else PEFT's forward."""
        return _forward(self, PeftLoraLinear.forward, x, args, kwargs)

    def __repr__(self) -> str:
        return "lora_kernels." + super().__repr__()


def _target_of(base_layer: nn.Module) -> nn.Module:
    return base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer


def _fan_in_fan_out(kwargs: dict) -> bool:
    """The fan_in_fan_out flag PEFT builds a layer with: the config's where it passes one, else the keyword's."""
    return bool(getattr(kwargs.get("config"), "fan_in_fan_out", kwargs.get("fan_in_fan_out", False)))


_FUSED_CLASSES: dict[tuple[str, str], type[FusedLoraLinear]] = {("auto", "bitmask"): FusedLoraLinear}


def fused_linear_class(backend: str = "auto", dropout_mask: str = "bitmask") -> type[FusedLoraLinear]:
    """The :class:`FusedLoraLinear` (sub)class with these defaults, created once per pair.

    Subclasses are published in this module's namespace under a stable name, so models holding
    them still pickle by reference.
    """
    _check_options(backend, dropout_mask)
    key = (backend, dropout_mask)
    if key not in _FUSED_CLASSES:
        name = f"FusedLoraLinear_{backend}_{dropout_mask}"
        cls = type(name, (FusedLoraLinear,), {"_lk_backend": backend, "_lk_dropout_mask": dropout_mask})
        cls.__module__ = __name__
        globals()[name] = cls
        _FUSED_CLASSES[key] = cls
    return _FUSED_CLASSES[key]


def register_fused_peft_module(config: Any, *, backend: str = "auto", dropout_mask: str = "bitmask") -> Any:
    """Make PEFT build fused LoRA Linear layers for ``config``; returns ``config``.

    Call before ``get_peft_model(model, config)`` (or ``add_adapter``). Every float ``nn.Linear``
    target and every transformers ``Conv1D`` one (GPT-2's projections, built with ``fan_in_fan_out``
    as PEFT builds them) becomes a :class:`FusedLoraLinear`; quantized linears and other layer types
    still get PEFT's own LoRA layers. Uses PEFT's experimental ``LoraConfig._register_custom_module``.
    """
    cls = fused_linear_class(backend, dropout_mask)
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        raise RuntimeError(
            f"{type(config).__name__} has no _register_custom_module (peft {peft.__version__}); "
            "use lora_kernels.patch(model) after get_peft_model instead"
        )
    register({nn.Linear: cls} | ({} if _Conv1D.__module__ == __name__ else {_Conv1D: cls}))
    return config


# ----------------------------------------------------------------------------- patch / unpatch


@dataclass
class PatchReport:
    """What :func:`patch` did, by module name.

    Attributes:
        accelerated: patched layers whose next forward takes the fused path.
        fallback: patched layers whose current state sends them to PEFT's forward -> why
            (merged, disabled, DoRA adapter, ...); they switch to the fused path by themselves
            when the state changes (e.g. after ``unmerge_adapter()``).
        skipped: LoRA layers left alone -> why (Embedding/Conv layer, quantized base, ...).
    """

    accelerated: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str = "auto"
    dropout_mask: str = "bitmask"

    @property
    def patched(self) -> list[str]:
        return self.accelerated + list(self.fallback)

    def __str__(self) -> str:
        total = len(self.accelerated) + len(self.fallback) + len(self.skipped)
        lines = [
            f"lora_kernels: {len(self.accelerated)} of {total} LoRA layers run fused "
            f"(backend={self.backend!r}, dropout_mask={self.dropout_mask!r})"
        ]
        if self.fallback:
            lines.append(f"  patched, but on PEFT's path in their current state ({len(self.fallback)}):")
            lines += [f"    {name}: {why}" for name, why in self.fallback.items()]
        if self.skipped:
            lines.append(f"  not patched ({len(self.skipped)}):")
            lines += [f"    {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _is_fused(module: nn.Module) -> bool:
    return isinstance(module, FusedLoraLinear) or module.__dict__.get("_lk_patched", False)


def inspect_model(model: nn.Module) -> PatchReport:
    """The report :func:`patch` would give now, without changing anything."""
    report = PatchReport()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not _is_fused(module):
            reason = _static_reason(module)
            report.skipped[name] = reason or "not patched (call lora_kernels.patch)"
            continue
        report.backend = getattr(module, "_lk_backend", report.backend)
        report.dropout_mask = getattr(module, "_lk_dropout_mask", report.dropout_mask)
        plan = _state_plan(module)
        if isinstance(plan, str):
            report.fallback[name] = plan
        elif _any_hooks(module, plan[2], plan[0]):  # what _call_plan would find (ZeRO-3, offload, TP plans)
            report.fallback[name] = "hooks or an instance-level forward on the base layer or an adapter's modules"
        else:
            report.accelerated.append(name)
    return report


class _PatchedForward:
    """The instance-level ``forward`` that :func:`patch` installs on one PEFT LoRA Linear.

    A small class rather than a bound method so that patched models still deep-copy *and*
    pickle (a bound method of a function that is not a class attribute does not unpickle).
    The class's own forward (PEFT's) is the fallback.
    """

    __slots__ = ("layer",)

    def __init__(self, layer: PeftLoraLinear) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _forward(self.layer, type(self.layer).forward, x, args, kwargs)

    def __getstate__(self) -> tuple[PeftLoraLinear]:
        return (self.layer,)

    def __setstate__(self, state: tuple[PeftLoraLinear]) -> None:
        (self.layer,) = state


class _PatchedReplicate:
    """The instance-level ``_replicate_for_data_parallel`` that :func:`patch` installs next to the
    forward. ``nn.DataParallel`` replicates a module by copying its ``__dict__``, so every replica's
    ``forward`` would still be the original layer's (its weights on the first GPU, a "weight is on
    cuda:0 but x is on cuda:1" error on the others): each replica gets a forward of its own."""

    __slots__ = ("layer",)

    def __init__(self, layer: PeftLoraLinear) -> None:
        self.layer = layer

    def __call__(self) -> PeftLoraLinear:
        replica = type(self.layer)._replicate_for_data_parallel(self.layer)
        replica.__dict__["forward"] = _PatchedForward(replica)
        replica.__dict__.pop("_replicate_for_data_parallel", None)
        return replica

    def __getstate__(self) -> tuple[PeftLoraLinear]:
        return (self.layer,)

    def __setstate__(self, state: tuple[PeftLoraLinear]) -> None:
        (self.layer,) = state


def patch(model: nn.Module, *, backend: str = "auto", dropout_mask: str = "bitmask", log: bool = True) -> PatchReport:
    """Run every eligible LoRA Linear in ``model`` (a PEFT model or any module) fused.

    Installs an instance-level ``forward`` on each ``peft.tuners.lora.Linear`` whose base is a
    float ``nn.Linear`` (idempotent: patching again updates ``backend``/``dropout_mask``);
    :class:`FusedLoraLinear` layers only get the new options. Nothing else changes: parameters,
    state_dict keys, adapter saving/loading, merging, ``disable_adapter()``, gradient
    checkpointing all stay PEFT's. Returns a :class:`PatchReport` and logs it once (logger
    ``"lora_kernels"``, INFO; WARNING when nothing could be patched).
    """
    _check_options(backend, dropout_mask)
    for module in model.modules():
        if not isinstance(module, LoraLayer) or _static_reason(module) is not None:
            continue
        # Plain instance attributes (not parameters/buffers): invisible to state_dict and
        # removed again by unpatch().
        module.__dict__["_lk_backend"] = backend
        module.__dict__["_lk_dropout_mask"] = dropout_mask
        if not isinstance(module, FusedLoraLinear):
            module.__dict__["_lk_patched"] = True
            module.__dict__["forward"] = _PatchedForward(module)
            module.__dict__["_replicate_for_data_parallel"] = _PatchedReplicate(module)
    report = inspect_model(model)
    report.backend, report.dropout_mask = backend, dropout_mask
    if log:
        level = logging.INFO if report.patched else logging.WARNING
        logger.log(level, "%s", report)
    return report


def unpatch(model: nn.Module) -> int:
    """Remove what :func:`patch` installed; returns the number of layers restored.

    Patched layers run PEFT's class forward again (bit-identical to never having patched).
    :class:`FusedLoraLinear` layers were built fused and stay so; only patch's options go.
    """
    restored = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        restored += int(module.__dict__.get("_lk_patched", False))
        for key in _PATCH_KEYS:
            own = {"forward": _PatchedForward, "_replicate_for_data_parallel": _PatchedReplicate}.get(key)
            if own is not None and not isinstance(module.__dict__.get(key), own):
                continue  # not ours (e.g. an accelerate hook on a layer patch() skipped)
            module.__dict__.pop(key, None)
    return restored
