"""Benchmarks for lora_kernels.

* ``python -m bench.lora_linear`` — the LoRA-linear table (cuBLAS floor, naive eager, PEFT,
  torch.compile, ours per backend and mask mode); ``--quick`` for a subset, ``--dry`` for a tiny
  CPU run that exercises the same code paths (used by ``tests/test_bench_dry.py``).
* ``python -m bench.plot <csv>`` — ratio-to-cuBLAS plot of one run.
* ``pytest bench/ --benchmark-only`` — pytest-benchmark regression suite (needs CUDA).

Results land in ``bench/results/`` (see its README for the CSV columns); the performance log
with the byte/FLOP accounting of each design is ``bench/NOTES.md``.
"""
