"""lora_kernels tests (a package so modules can share tests/_utils.py)."""
