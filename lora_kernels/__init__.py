"""lora_kernels: fused LoRA linear forward/backward kernels (Triton and CUDA C++).

    y = lora_kernels.lora_linear(x, weight, lora_A, lora_B, bias, lora_bias, scaling, dropout_p, ...)

``LoRALinear`` is the nn.Module form (``add_lora(model, r)`` wraps a model's nn.Linear layers in it);
``patch(model)`` / ``unpatch(model)`` run a PEFT model's
LoRA Linear layers through the fused kernels; ``lora_linear_ref`` is the reference semantics.
"""

from .adapter_io import load_peft_adapter, save_peft_adapter
from .api import lora_linear
from .backends import available_backends
from .inject import add_lora, lora_layers, lora_state_dict, merge_lora
from .integrations import patch, register_fused_peft_module, unpatch
from .layer import LoRALinear
from .reference import dropout_keep_mask, lora_linear_ref
from .version import __version__

__all__ = [
    "__version__",
    "lora_linear",
    "lora_linear_ref",
    "dropout_keep_mask",
    "available_backends",
    "LoRALinear",
    "add_lora",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "save_peft_adapter",
    "load_peft_adapter",
    "patch",
    "unpatch",
    "register_fused_peft_module",
]
