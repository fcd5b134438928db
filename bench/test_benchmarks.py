"""pytest-benchmark regression suite for LoRA linear (CUDA only; not part of CI).

    pytest bench/ --benchmark-only                              # run, print grouped tables
    pytest bench/ --benchmark-only --benchmark-autosave         # save to .benchmarks/ for later
    pytest bench/ --benchmark-only --benchmark-compare          # compare with the last saved run

One benchmark group per (configuration, phase) holds the frozen cuBLAS floor next to the naive
path and our backends, so pytest-benchmark's table reads as a ratio to cuBLAS. Configurations are
``bench.lora_linear``'s ``--quick`` set; inputs and implementations are built by the same code
(``bench/_impls.py``). Each round synchronizes the device, so a round's wall time is GPU time plus
launch overhead. The full table with memory columns comes from ``python -m bench.lora_linear``.
"""

from __future__ import annotations

import pytest
import torch

from bench import _impls
from bench.lora_linear import GPU_IMPLS, PRESETS, Config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU (none on this machine)"
)

_Q = PRESETS["quick"]
CONFIGS = [
    Config(m, k, n, r, p) for (k, n) in _Q["shapes"] for m in _Q["m"] for r in _Q["ranks"] for p in _Q["dropout"]
]
CONFIGS += _Q["extra"]
# The benchmark's GPU rows but peft, axolotl and compile: this suite tracks our kernels against the floor and
# naive; the peft, axolotl and compile rows stay in `python -m bench.lora_linear`.
IMPLS = tuple(name for name in GPU_IMPLS if name not in ("peft", "axolotl", "compile"))


def _cfg_id(c: Config) -> str:
    return f"M{c.M}-{c.K}x{c.N}-r{c.r}-p{c.p:g}"


@pytest.mark.parametrize("phase", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl_name", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_lora_linear(benchmark, cfg: Config, impl_name: str, phase: str) -> None:
    prob = _impls.make_problem(
        cfg.M, cfg.K, cfg.N, cfg.r, cfg.p, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16, device="cuda"
    )
    try:
        impl = _impls.build(impl_name, prob)
    except _impls.Unavailable as e:
        pytest.skip(f"{impl_name}: {e}")
    grads = list(prob.xs) + [t for t in impl.owned if t.requires_grad]
    state = {"i": 0}

    def clear() -> None:
        for t in grads:
            t.grad = None

    def run() -> None:
        i = state["i"] = (state["i"] + 1) % len(prob.xs)  # rotate copies: no cache-hot inputs
        y = impl.fn(prob.xs[i])
        if phase == "fwdbwd":
            y.backward(prob.dys[i])
        torch.cuda.synchronize()

    benchmark.group = f"{_cfg_id(cfg)} {phase}"
    benchmark.extra_info.update(
        M=cfg.M, K=cfg.K, N=cfg.N, r=cfg.r, p=cfg.p, impl=impl_name, phase=phase,
        gpu=torch.cuda.get_device_name(), flops=impl.flops_fwd if phase == "fwd" else impl.flops_fwdbwd,
    )  # fmt: skip
    with impl.scope():  # the row's settings hold for its backward passes too
        run()  # compile / autotune outside the measurement
        clear()
        benchmark.pedantic(run, setup=clear, rounds=30, warmup_rounds=3)
        y = impl.fn(prob.xs[0])
    assert y.shape == (cfg.M, cfg.N) and torch.isfinite(y).all()
