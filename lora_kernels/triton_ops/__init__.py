"""Triton kernels for lora_kernels (one op per file)."""
