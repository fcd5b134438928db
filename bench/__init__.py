"""Benchmarks for lora_kernels.

* ``python -m bench.lora_linear`` — the LoRA-linear table (cuBLAS floor, naive eager, PEFT,
  torch.compile, ours per backend and mask mode); ``--quick`` for a subset, ``--dry`` for a tiny
  CPU run that exercises the same code paths (used by ``tests/test_bench_dry.py``).
* ``python -m bench.plot <csv>`` — ratio-to-cuBLAS plot of one run.
* ``pytest bench/ --benchmark-only`` — pytest-benchmark regression suite (needs CUDA).

Results land in ``bench/results/`` (see its README for the CSV columns); the performance log
with the byte/FLOP accounting of each design is ``bench/NOTES.md``.
"""

import os as _os
import sys as _sys


def _dry_run_needs_interpreter(argv: list[str]) -> bool:
    """True for ``python -m bench.lora_linear --dry`` (not ``--device cuda``): a CPU run of the Triton rows.

    ``argv`` is the interpreter's own command line (``sys.orig_argv``): while ``-m`` imports this
    package, ``sys.argv[0]`` is only "-m", and the module name is known from the original argv alone.
    """
    try:
        module = argv[argv.index("-m") + 1]
    except (ValueError, IndexError):
        return False
    args = argv[argv.index("-m") + 2 :]
    return module == "bench.lora_linear" and "--dry" in args and not any(a.endswith("cuda") for a in args)


# On the CPU, Triton kernels run only in the interpreter, which must be on before the kernels are
# defined (@triton.jit reads TRITON_INTERPRET then), and bench.lora_linear imports them before its
# main() runs. Only for the command line: in-process callers (pytest) may hold compiled kernels.
if _dry_run_needs_interpreter(list(getattr(_sys, "orig_argv", []))):
    _os.environ.setdefault("TRITON_INTERPRET", "1")
