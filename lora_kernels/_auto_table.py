"""The order in which backend="auto" tries the kernel backends, per GPU compute capability, from measurements.

Written by ``python -m bench.auto_table bench/results/<gpu>.csv --write`` (do not edit by hand): for each
compute capability, the Triton and CUDA backends' forward+backward times on the same configurations of one
benchmark run (``triton-bitmask`` and ``cuda-bitmask`` rows), the faster by geometric mean first. Each entry
keeps what it was measured from. A capability with no entry uses ``backends._AUTO_DEFAULT`` (Triton first).
"""

from __future__ import annotations

MEASURED: dict[tuple[int, int], dict[str, object]] = {
    (9, 0): {
        "order": ("triton", "cuda"),
        "gpu": "NVIDIA H200",
        "configurations": 4,
        "tuned": False,
        "cuda_over_triton_fwdbwd": 1.2924,
        "cuda_over_triton_fwdbwd_range": (1.0701, 1.5169),
        "cuda_over_triton_fwd": 1.2424,
        "runs": "20261204T174213Z",
        "commits": "d0f1570a887c",
    },
}

AUTO_ORDER: dict[tuple[int, int], tuple[str, ...]] = {cc: tuple(m["order"]) for cc, m in MEASURED.items()}
