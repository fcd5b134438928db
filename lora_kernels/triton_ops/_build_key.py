"""Which Triton build compiled a kernel cache (``compile_only``, ``scripts/prewarm_triton_cache.py``).

Imports Triton alone, so ``scripts/gpu_check.sh`` runs this file directly (``python
lora_kernels/triton_ops/_build_key.py``) in well under a second, before anything is installed.
"""

from __future__ import annotations

import hashlib


def triton_build_key() -> str:
    """A digest of what Triton's cache keys take from the Triton install: its Python sources and
    libtriton (``triton_key()``) and the ptxas it compiles with. Two machines with the same digest
    compile a kernel to the same cache entry (same kernel source, arguments and target)."""
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    return hashlib.sha256(f"{triton_key()}-{get_ptxas_version(90)}".encode()).hexdigest()[:16]


def ptxas_version() -> str:
    """The last line of ``ptxas --version`` of the ptxas Triton compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    return get_ptxas_version(90).strip().splitlines()[-1]


if __name__ == "__main__":
    print(triton_build_key())
