"""Small Triton kernels that run a device helper of the backend on its own (imported once Triton is known
to be available: under TRITON_INTERPRET=1 on the CPU, compiled on a GPU)."""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton_ops.lora_linear import _first_at_least


@triton.jit
def first_at_least_probe(out, start, STEP: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(out + pid, _first_at_least(pid, start, STEP))
