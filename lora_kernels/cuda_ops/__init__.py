"""CUDA C++ backend (backend="cuda"): csrc/ kernels exposed as ``lora_kernels._C``.

``lora_linear`` holds the ops and the backend contract; ``_ext`` loads (or JIT-builds) the
extension; ``_build`` holds the build configuration shared with setup.py.
"""
