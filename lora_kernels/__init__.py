"""lora_kernels: fused LoRA linear forward/backward kernels (Triton and CUDA C++)."""

from .api import lora_linear
from .backends import available_backends
from .reference import dropout_keep_mask, lora_linear_ref
from .version import __version__

__all__ = [
    "__version__",
    "lora_linear",
    "lora_linear_ref",
    "dropout_keep_mask",
    "available_backends",
]
