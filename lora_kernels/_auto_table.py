"""The order in which backend="auto" tries the kernel backends, per GPU compute capability, from measurements.

Written by ``python -m bench.auto_table bench/results/<gpu>.csv --write`` (do not edit by hand): for each
compute capability, the Triton and CUDA backends' forward+backward times on the same configurations of one
benchmark run (``triton-bitmask`` and ``cuda-bitmask`` rows), the faster by geometric mean first. Each entry
keeps what it was measured from. A capability with no entry uses ``backends._AUTO_DEFAULT`` (Triton first).
"""

from __future__ import annotations

MEASURED: dict[tuple[int, int], dict[str, object]] = {}

AUTO_ORDER: dict[tuple[int, int], tuple[str, ...]] = {cc: tuple(m["order"]) for cc, m in MEASURED.items()}
