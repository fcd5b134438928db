"""CPU time of the Triton and CUDA backends' eager call paths, measured without a GPU.

    python -m bench.host_overhead [--reps 300]

Every eager ``lora_linear(backend="triton")`` call runs Python before its kernels start: argument
checks, backend dispatch, the autograd Function, the launchers' tile and grid choices, TMA descriptors,
and Triton's argument binding. When that takes longer than the GPU work it issues, a training loop is
host-bound (small M: at M = 2048, K = N = 4096 an H100 forward is ≈ 100 µs). This runs the real path
under ``lora_kernels.triton_ops.compile_only`` on tiny CPU tensors: each launch binds its arguments and
finds its compiled kernel as on a GPU, then returns instead of launching, so the figures are the host
path minus the driver's launch (a few µs per kernel on a GPU). The rows "to the launcher" run under
``record_launches`` instead: the kernels stay Triton's JITFunctions and each launch reaches the compiled
kernel's launcher (which runs Triton's expansion of the host TMA descriptors, then records instead of calling
the driver), through ``JITFunction.run``, through
lora_kernels' launch cache (``lora_kernels/triton_ops/launch.py``), replayed from its launch plans and from its
call plans (and those once more through Triton's runner, ``CompiledKernel[grid]``, where the others call each
launcher directly, and once more passing tensors where call plans pass their addresses as ints), in alternation.
The CUDA backend's rows run its Python layer (checks, autograd Function, op dispatch policy) with the pybind extension
replaced by a stub that
returns preallocated outputs: the C++ launcher's own host time is not in them. Each is measured twice
in the same run, as eager calls are made (straight to the extension) and through the registered
``torch.library`` ops (what torch.compile and dispatch modes use), so the difference is the
dispatcher's cost. The last rows call a patched PEFT LoRA Linear over the same stub: the module call and
the PEFT integration's per-call checks on top of the eager CUDA layer. No wall-time assertion rests on
them; ``bench/NOTES.md`` keeps them. On a GPU, the benchmark's ``host_us`` column measures the whole path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=300, help="timed calls per row (median)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls first (compiles, caches)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    return args


def _median_us(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _time_calls(x, W, A, B, dy, p: float, reps: int, warmup: int, backend: str = "triton") -> tuple[float, float]:
    """(forward µs, forward + backward µs) of the public call on these tensors."""
    import torch

    import lora_kernels as lk

    def fwd():
        return lk.lora_linear(x, W, A, B, None, None, 2.0, p, True, 1234, backend=backend)

    def step():
        x.grad = A.grad = B.grad = None
        fwd().backward(dy)

    with torch.no_grad():
        f_us = _median_us(fwd, reps, warmup)
    return f_us, _median_us(step, reps, warmup)


M_, N_, R_ = 64, 256, 16  # every row's sizes (tiny: the launches bind and return), K per row


def _inputs(K: int = 256) -> tuple:
    """x (M_, K), W (N_, K), dy (M_, N_) in bf16; A (R_, K), B (N_, R_) in fp32 (PEFT's default); x, A, B
    require grad."""
    import torch

    x = torch.randn(M_, K, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N_, K, dtype=torch.bfloat16)
    A = torch.randn(R_, K, requires_grad=True)
    B = torch.randn(N_, R_, requires_grad=True)
    return x, W, A, B, torch.randn(M_, N_, dtype=torch.bfloat16)


def measure(reps: int = 300, warmup: int = 20) -> list[dict]:
    """Rows of host µs per call: the TMA path (16-byte rows) and the pointer path (odd K), p = 0 and 0.1,
    and the single-pass kernels (``LORA_KERNELS_FWD/BWD=single``) on the TMA path."""

    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops.compile_only import compile_only

    rows = []
    cases = [
        ("two-launch, TMA", 256, "two"),
        ("two-launch, pointer (K = 250)", 250, "two"),
        ("single-pass", 256, "single"),
    ]
    with compile_only(lambda c: None):
        for label, K, mode in cases:
            x, W, A, B, dy = _inputs(K)
            for p in (0.0, 0.1):
                prev = tri.FWD_MODE, tri.BWD_MODE
                tri.FWD_MODE = tri.BWD_MODE = mode
                try:
                    f_us, fb_us = _time_calls(x, W, A, B, dy, p, reps, warmup)
                finally:
                    tri.FWD_MODE, tri.BWD_MODE = prev
                rows.append(dict(path=label, p=p, fwd_us=f_us, fwdbwd_us=fb_us))
        rows += _tuned_rows(reps, warmup)
    return rows + _recorded_rows(reps, warmup) + measure_cuda_layer(reps, warmup)


RECORDED_ROWS = (
    "to the launcher: Triton's run", "to the launcher: launch cache", "to the launcher: launch plans",
    "to the launcher: call plans", "to the launcher: call plans, Triton's runner",
    "to the launcher: call plans, pointers as tensors",
)  # fmt: skip
# (launch cache, launch plans, call plans, launchers called directly, call plans' pointers as ints) per row above; the
# fifth row calls each compiled kernel through Triton's runner (``CompiledKernel[grid]``), as before
# launch.run_compiled; the last passes the call plans' tensors to the launcher, which asks each for its address (the
# driver's check of each address, which follows on a GPU, is not in these rows)
_RECORDED_MODES = (
    (False, False, False, True, True), (True, False, False, True, True), (True, True, False, True, True),
    (True, True, True, True, True), (True, True, True, False, True), (True, True, True, True, False),
)  # fmt: skip
RECORDED_PATHS = (
    ("two-launch, TMA", 256), ("two-launch, TMA, in-kernel descriptors", 256), ("two-launch, pointer (K = 250)", 250),
    ("single-pass", 256),
)  # (label, K); in-kernel descriptors: LORA_KERNELS_TMA_DESC=device  # fmt: skip


def _recorded_rows(reps: int, warmup: int) -> list[dict]:
    """The eager path down to the compiled kernel's launcher (``record_launches``: real JITFunctions, the
    launcher records instead of calling the driver), each launch through ``JITFunction.run``, through
    :mod:`lora_kernels.triton_ops.launch`'s cache, replayed from that module's launch plans, and each call replayed
    whole from its call plan (its launchers called directly, and again through Triton's runner), measured in
    alternation (two rounds, the lower median)."""
    from lora_kernels.triton_ops import launch
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops.compile_only import record_launches

    rows = []
    saved = (launch.FAST_LAUNCH, launch.PLANS, launch.CALLS, launch.DIRECT_RUN, launch.POINTER_INTS, tri.FWD_MODE,
             tri.BWD_MODE, tri.TMA_DESC)  # fmt: skip
    try:
        with record_launches(lambda launched: None):
            for label, K in RECORDED_PATHS:
                tri.FWD_MODE = tri.BWD_MODE = "single" if label == "single-pass" else "two"
                tri.TMA_DESC = "device" if "in-kernel" in label else "host"
                x, W, A, B, dy = _inputs(K)
                best: dict[tuple[bool, ...], tuple[float, float]] = {}
                for _ in range(2):
                    for mode in _RECORDED_MODES:
                        launch.FAST_LAUNCH, launch.PLANS, launch.CALLS, launch.DIRECT_RUN, launch.POINTER_INTS = mode
                        f_us, fb_us = _time_calls(x, W, A, B, dy, 0.1, reps, warmup)
                        prev = best.get(mode, (f_us, fb_us))
                        best[mode] = (min(prev[0], f_us), min(prev[1], fb_us))
                for mode, how in zip(_RECORDED_MODES, RECORDED_ROWS, strict=True):
                    rows.append(dict(path=f"{label}, {how}", p=0.1, fwd_us=best[mode][0], fwdbwd_us=best[mode][1]))
    finally:
        (launch.FAST_LAUNCH, launch.PLANS, launch.CALLS, launch.DIRECT_RUN, launch.POINTER_INTS, tri.FWD_MODE,
         tri.BWD_MODE, tri.TMA_DESC) = saved  # fmt: skip
    return rows


TUNED_ROWS = ("two-launch, TMA, tuned: Autotuner.run", "two-launch, TMA, tuned: chosen config")


def _tuned_rows(reps: int, warmup: int) -> list[dict]:
    """The autotuned eager path (the default on a GPU) on keys tuned already: each launch through Triton's
    ``Autotuner.run``, then as lora_kernels launches from the second call of a key (the config the Autotuner
    chose, directly). Real Autotuners over the compile-only kernels, pruned to one config each so that nothing
    is benchmarked (there is no GPU to time on); the key is computed and looked up as on a GPU."""
    import functools
    from unittest import mock

    from lora_kernels.triton_ops import lora_linear as tri

    def first(configs, named_args, **kwargs):
        return tri._prune(configs, named_args, **kwargs)[:1]

    x, W, A, B, dy = _inputs()
    rows = []
    for label, chosen in zip(TUNED_ROWS, (False, True), strict=True):

        def make(kernel, chosen=chosen):
            tuner = tri._make_autotuner(kernel, prune=first)
            # Triton 3.6 times even a single pruned config (3.8 takes it as chosen): nothing to time on here.
            tuner._bench = lambda *args, config, **meta: [0.0, 0.0, 0.0]
            if not chosen:
                tuner.lk_chosen = None  # every launch through Autotuner.run, as before session 30
            return tuner

        with mock.patch.object(tri, "_autotuner", functools.cache(make)), mock.patch.object(tri, "AUTOTUNE", True):
            for p in (0.0, 0.1):
                f_us, fb_us = _time_calls(x, W, A, B, dy, p, reps, warmup)
                rows.append(dict(path=label, p=p, fwd_us=f_us, fwdbwd_us=fb_us))
            if chosen:  # the rows timed what they say: every launch of a step had its config chosen
                assert all(len(tri._autotuner(k).lk_chosen) == 2 for k in (tri._shrink_kernel, tri._bwd_dx_tma_kernel))
    return rows


class _StubExt:
    """``lora_kernels._C``'s lora_fwd / lora_bwd returning preallocated outputs of the right shapes."""

    def __init__(self, M: int, K: int, N: int, r: int, dtype, adapter_dtype):
        import torch

        bits = torch.empty(M, (K + 7) // 8, dtype=torch.uint8)
        self.fwd_out = (torch.empty(M, N, dtype=dtype), torch.empty(M, r), bits)
        shapes = (((M, K), dtype), ((r, K), adapter_dtype), ((N, r), adapter_dtype), ((N,), adapter_dtype))
        self.bwd_out = tuple(torch.empty(*shape, dtype=d) for shape, d in shapes)

    def lora_fwd(self, *args):
        return self.fwd_out

    def lora_bwd(self, *args):
        return self.bwd_out


def measure_cuda_layer(reps: int = 300, warmup: int = 20) -> list[dict]:
    """Rows for backend="cuda" with the extension stubbed: eager (direct) and through the ops."""
    from unittest import mock

    import torch

    from lora_kernels.cuda_ops import _ext
    from lora_kernels.cuda_ops import lora_linear as cuda_ll

    x, W, A, B, dy = _inputs()
    stub = _StubExt(M_, x.shape[1], N_, R_, torch.bfloat16, torch.float32)
    rows = []
    with mock.patch.object(_ext, "get_ext", lambda build=True: stub), \
            mock.patch.object(cuda_ll, "unavailable_reason", lambda *a: None):  # fmt: skip
        for label, via_ops in (("cuda layer, eager (direct)", False), ("cuda layer, through the ops", True)):
            with mock.patch.object(cuda_ll, "use_registered_op", (lambda: True) if via_ops else (lambda: False)):
                for p in (0.0, 0.1):
                    f_us, fb_us = _time_calls(x, W, A, B, dy, p, reps, warmup, backend="cuda")
                    rows.append(dict(path=label, p=p, fwd_us=f_us, fwdbwd_us=fb_us))
        rows += _peft_layer_rows(x, W, A, B, dy, reps, warmup)
    return rows


def _time_module(module, x, dy, reps: int, warmup: int) -> tuple[float, float]:
    """(forward µs, forward + backward µs) of ``module(x)``; grads reset as in :func:`_time_calls`
    (``zero_grad`` would add its own walk over the module)."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]

    def fwd():
        return module(x)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        fwd().backward(dy)

    with torch.no_grad():
        f_us = _median_us(fwd, reps, warmup)
    return f_us, _median_us(step, reps, warmup)


def _peft_layer_rows(x, W, A, B, dy, reps: int, warmup: int) -> list[dict]:
    """A patched ``peft.tuners.lora.Linear`` called as a training stack calls it (module call, PEFT's
    state checks, the integration's plan) on to the stubbed CUDA layer; none if peft is not installed."""
    from bench._impls import import_peft

    try:
        LoraConfig, get_peft_model = import_peft()
    except ImportError:
        return []
    import torch
    from torch import nn

    from lora_kernels.integrations import patch

    rows = []
    for p in (0.0, 0.1):
        holder = nn.Module()
        holder.proj = nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
        cfg = LoraConfig(r=A.shape[0], lora_alpha=2 * A.shape[0], lora_dropout=p, target_modules=["proj"])
        model = get_peft_model(holder, cfg)  # adapters in fp32 next to the bf16 base: PEFT's default
        patch(model, backend="cuda", log=False)
        model.train()
        layer = model.base_model.model.proj
        assert layer.lora_A["default"].weight.dtype == torch.float32
        f_us, fb_us = _time_module(layer, x, dy, reps, warmup)
        assert layer._lk_last_fallback is None, layer._lk_last_fallback  # timed the fused path
        rows.append(dict(path="peft layer, patched (cuda layer)", p=p, fwd_us=f_us, fwdbwd_us=fb_us))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("host_overhead: unset TRITON_INTERPRET (the launch path under test is the compiled one)", file=sys.stderr)
        return 2
    rows = measure(args.reps, args.warmup)
    print("| path | p | forward µs | forward + backward µs |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['p']:g} | {r['fwd_us']:.0f} | {r['fwdbwd_us']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
