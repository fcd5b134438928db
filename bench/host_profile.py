"""Where the host's time per training step goes, on the GPU machine itself.

    python -m bench.host_profile [--shape 8192,4096,4096,16] [--p 0.1] [--steps 50] [--top 25] [--single-pass]

The H200 run of session 28 measured the Triton backend's eager forward + backward issuing in 1.2–1.7 ms of
CPU time per step, more than its ~1.0 ms of kernels at N = 4096 (bench/NOTES.md), where cuBLAS's own step
issued in 0.2–0.3 ms. ``bench.host_overhead`` measures our Python on any CPU without a GPU; this measures
the real path on the device's CPU, so the next change can aim at what costs there:

1. calibration: µs per host call of the things a step is made of (an empty allocation, one aten kernel, a
   bare Triton launch with 3 and with 30 arguments, the compiled launcher alone with 16 pointers given as tensors
   and as ints, a host TMA descriptor), so a step's time can be read as launches × their price plus our Python;
2. steps: host µs per step (steps enqueued back to back while the GPU runs behind, as the benchmark's
   ``host_us``) for cuBLAS's frozen F.linear and the Triton backend, forward and forward + backward, with
   the number of Triton launches per step; the Triton rows as shipped and with one switch changed for the
   row (the A/Bs of ``lora_kernels/triton_ops/launch.py``: call plans off, launch plans off, the launch cache
   off, Triton's runner, call plans passing tensors; in-kernel TMA descriptors); with ``--single-pass``
   the single-pass kernels (the opt-in path); the CUDA backend (its C++ launchers; where it cannot run
   without a build, the row says why);
3. a cProfile of ``--steps`` Triton forward + backward steps: the functions with the most own time, and the
   time summed by area (Triton's runtime, torch's autograd, torch otherwise, lora_kernels, the rest).

CUDA only: exits 2 with a message elsewhere (``bench.host_overhead`` is the CPU measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import pstats
import sys
import time

from .host_overhead import _median_us


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8192,4096,4096,16", help="M,K,N,r (default %(default)s)")
    ap.add_argument("--p", type=float, default=0.1, help="dropout probability (default %(default)s)")
    ap.add_argument("--steps", type=int, default=50, help="profiled forward+backward steps (default %(default)s)")
    ap.add_argument("--top", type=int, default=25, help="functions listed by own time (default %(default)s)")
    ap.add_argument("--reps", type=int, default=200, help="timed calls per calibration row (median)")
    ap.add_argument("--single-pass", action="store_true", help="also the single-pass kernels' row (compiles them)")
    args = ap.parse_args(argv)
    try:
        args.dims = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        ap.error(f"--shape takes M,K,N,r integers, got {args.shape!r}")
    if len(args.dims) != 4 or min(args.dims) < 1:
        ap.error(f"--shape takes four positive integers M,K,N,r, got {args.shape!r}")
    if args.steps < 1 or args.top < 1 or args.reps < 1 or not 0.0 <= args.p < 1.0:
        ap.error("--steps, --top and --reps must be >= 1 and --p in [0, 1)")
    return args


def area(filename: str) -> str:
    """The area a profiled function's file belongs to (cProfile's ``~`` for built-ins, C calls)."""
    f = filename.replace("\\", "/")
    if "/triton/" in f:
        return "triton runtime"
    if "/torch/autograd/" in f:
        return "torch autograd"
    if "/torch/" in f:
        return "torch, other"
    if "/lora_kernels/" in f:
        return "lora_kernels"
    if f == "~":
        return "built-ins (C calls: launches, torch ops)"
    return "other"


def area_totals(stats: pstats.Stats) -> dict[str, float]:
    """Own (tottime) seconds summed per :func:`area`, largest first."""
    out: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        out[area(filename)] = out.get(area(filename), 0.0) + tottime
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _calibration(reps: int, dev=None) -> list[tuple[str, float]]:
    """(what, µs per host call) rows; ``dev``: the GPU (a CPU device under TRITON_INTERPRET in the tests)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _noop3(X, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < n)

    @triton.jit
    def _noop30(X, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
                a21, a22, a23, a24, a25, a26, a27, a28, a29, BLOCK: tl.constexpr):  # fmt: skip
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < a1)

    dev = dev or torch.device("cuda")
    x = torch.empty(4096, device=dev)
    ints = [4096 + 3 * i for i in range(29)]  # varied values: specialisation looks at each
    rows = [
        ("torch.empty (caching allocator)", _median_us(lambda: torch.empty(4096, device=dev), reps, 10)),
        ("aten kernel (x.add_(1))", _median_us(lambda: x.add_(1), reps, 10)),
        ("Triton launch, 3 arguments", _median_us(lambda: _noop3[(1,)](x, 4096, BLOCK=128), reps, 10)),
        ("Triton launch, 30 arguments", _median_us(lambda: _noop30[(1,)](x, *ints, BLOCK=128), reps, 10)),
    ]
    rows += _pointer_rows(reps, dev)
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w = torch.empty(256, 256, device=dev, dtype=torch.bfloat16)
        rows.append(
            ("TensorDescriptor.from_tensor", _median_us(lambda: TensorDescriptor.from_tensor(w, [64, 64]), reps, 10))
        )
    except ImportError:  # pragma: no cover - Triton < 3.4
        pass
    _sync(dev)
    return rows


def _pointer_rows(reps: int, dev) -> list[tuple[str, float | None]]:
    """The compiled launcher alone (``launch.run_compiled``, as call plans launch) with 16 pointer arguments given as
    tensors (it calls ``data_ptr()`` on each and has the driver check the address) and as ints (taken as they are):
    the difference is what ``launch.POINTER_INTS`` saves per pointer of a call plan's launch. None (and why, in the
    name) where there is no compiled kernel to call (the interpreter)."""
    import torch
    import triton
    import triton.language as tl
    from triton.compiler.compiler import CompiledKernel

    from lora_kernels.triton_ops import launch

    @triton.jit
    def _noop16p(P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, P12, P13, P14, P15, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(P0 + offs, tl.zeros((BLOCK,), tl.float32))

    names = ("launcher alone, 16 pointers as tensors", "launcher alone, 16 pointers as ints")
    ts = [torch.empty(4096, device=dev) for _ in range(16)]
    compiled = _noop16p[(1,)](*ts, BLOCK=128)
    if not isinstance(compiled, CompiledKernel):
        return [(f"{name}: – (no compiled kernel: the interpreter)", None) for name in names]
    stream = launch.direct_stream()
    if stream is None:
        return [(f"{name}: – (a launch hook is set: launches go through Triton's runner)", None) for name in names]
    ints = [t.data_ptr() for t in ts]
    grid, tail = (1, 1, 1), launch._tail(_noop16p, 16, {"BLOCK": 128})
    return [
        (names[0], _median_us(lambda: launch.run_compiled(compiled, grid, ts, tail, stream), reps, 10)),
        (names[1], _median_us(lambda: launch.run_compiled(compiled, grid, ints, tail, stream), reps, 10)),
    ]


def _steps(M: int, K: int, N: int, r: int, p: float, dev, single_pass: bool = False):
    """(name, forward fn, forward+backward fn, grads to clear) for cuBLAS and the Triton backend."""
    import torch
    import torch.nn.functional as F

    import lora_kernels as lk
    from lora_kernels import backends
    from lora_kernels.triton_ops import launch
    from lora_kernels.triton_ops import lora_linear as tri

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(N, K, device=dev, generator=g) / K**0.5).to(torch.bfloat16)
    # bf16 adapters, as the benchmark's rows (``--adapter-dtype same``): the host path is the same as with PEFT's fp32
    # ones, and the kernels are then the benchmark's, which the short plan's cache holds compiled.
    A = (torch.randn(r, K, device=dev, generator=g) / K**0.5).to(torch.bfloat16).requires_grad_()
    B = (torch.randn(N, r, device=dev, generator=g) / r**0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, N, device=dev, generator=g).to(torch.bfloat16)

    def cublas_fwd():  # (W frozen, as the benchmark's cublas row: the backward is dX alone)
        return F.linear(x, W)

    def triton_fwd():
        return lk.lora_linear(x, W, A, B, None, None, 2.0, p, True, 1234, backend="triton")

    @contextlib.contextmanager
    def setting(module, **values):
        # Those attributes of ``module`` set for a whole row (set once: a per-call switch would move the launchers'
        # module's generation each call and cost every call plan a full check, launch.WatchedModule): the A/Bs
        # (launch.CALLS off: LORA_KERNELS_CALL_PLANS=0; launch.PLANS off: LORA_KERNELS_LAUNCH_PLANS=0;
        # launch.FAST_LAUNCH off too: LORA_KERNELS_FAST_LAUNCH=0, every launch through Triton's JITFunction.run;
        # launch.DIRECT_RUN off: each compiled kernel through Triton's runner; launch.POINTER_INTS off: call plans pass
        # tensors) and the single-pass kernels (LORA_KERNELS_FWD=single, LORA_KERNELS_BWD=single), the in-kernel
        # descriptors (LORA_KERNELS_TMA_DESC=device).
        saved = {name: getattr(module, name) for name in values}
        for name, value in values.items():
            setattr(module, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)

    def switched(fast: bool, plans: bool, calls: bool = False):
        return functools.partial(setting, launch, FAST_LAUNCH=fast, PLANS=plans, CALLS=calls)

    def triton_step():
        triton_fwd().backward(dy)

    def cuda_fwd():
        return lk.lora_linear(x, W, A, B, None, None, 2.0, p, True, 1234, backend="cuda")

    std = [x, A, B]
    rows = [
        ("cublas F.linear", cublas_fwd, lambda: cublas_fwd().backward(dy), [x]),
        ("triton", triton_fwd, triton_step, std),
        ("triton, call plans off", triton_fwd, triton_step, std, switched(True, True)),
        ("triton, launch plans off", triton_fwd, triton_step, std, switched(True, False)),
        ("triton, launch cache off", triton_fwd, triton_step, std, switched(False, False)),
    ]
    # Every launch through Triton's runner (``CompiledKernel[grid]``: the hooks' metadata built, the empty hook chains
    # called) where the launch cache and the plans call each launcher directly (bench/NOTES.md, session 43).
    rows.append(("triton, Triton's runner", triton_fwd, triton_step, std,
                 functools.partial(setting, launch, DIRECT_RUN=False)))  # fmt: skip
    # Call plans passing tensors, which the launcher asks for their addresses and the driver checks, launch by launch
    # (bench/NOTES.md, session 44).
    rows.append(("triton, pointers as tensors", triton_fwd, triton_step, std,
                 functools.partial(setting, launch, POINTER_INTS=False)))  # fmt: skip
    # No host descriptors for Triton's launcher to expand (bench/NOTES.md, session 42): its kernels are prewarmed for
    # the short plan (its benchmark's triton-devdesc row, the same specialization at this shape).
    rows.append(("triton, in-kernel descriptors", triton_fwd, triton_step, std,
                 functools.partial(setting, tri, TMA_DESC="device")))  # fmt: skip
    if single_pass:  # (opt-in: its kernels are not in the short plan's prewarmed cache; compiling them takes time)
        rows.append(("triton, single-pass", triton_fwd, triton_step, std,
                     functools.partial(setting, tri, FWD_MODE="single", BWD_MODE="single")))  # fmt: skip
    # The CUDA backend's C++ launchers: the other route past the Python per call (bench/NOTES.md, session 40).
    # As backend="auto" asks (auto=True): where the extension is not built, the row says so instead of building it.
    reason = backends._unavailable("cuda", x, W, A, auto=True)
    rows.append(("cuda", cuda_fwd, lambda: cuda_fwd().backward(dy), [x, A, B]) if reason is None else ("cuda", reason))
    return rows


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _host_us(fn, clear, dev, steps: int = 20) -> float:
    for _ in range(3):
        for t in clear:
            t.grad = None
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        for t in clear:
            t.grad = None
        fn()
    us = (time.perf_counter() - t0) / steps * 1e6
    _sync(dev)
    return us


def profile_steps(
    dims: tuple[int, int, int, int], p: float, steps: int, dev, single_pass: bool = False, report=None
) -> tuple[list[tuple], pstats.Stats | None]:
    """Rows (name, forward host µs, forward+backward host µs, Triton kernels of one step or None) and a
    cProfile of ``steps`` Triton forward + backward steps. ``dev``: the GPU; a CPU device only under
    ``compile_only`` (the tests: launches bind and return). A row whose step raises is (name, None, None,
    "error: ..."), and the rows after it still run (a path that never ran on a GPU must not cost the others);
    ``report(row)`` is called as each row ends; the cProfile is None where the Triton step raises."""
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops import single_pass as sp

    launches: list[str] = []
    real_launch, real_planned = tri._launch, sp._planned_launch

    def counting(real):
        def counted(kernel, *a, **k):
            launches.append(kernel.__name__)
            return real(kernel, *a, **k)

        return counted

    rows = []
    for name, *step_row in _steps(*dims, p, dev, single_pass):
        if len(step_row) == 1:  # a backend that cannot run here: the row says why
            row = (name, None, None, f"unavailable: {step_row[0]}")
        else:
            try:
                row = _step_row(name, step_row, dev, launches, counting, real_launch, real_planned)
            except Exception as e:  # noqa: BLE001 - the row records it; the next rows still run
                row = (name, None, None, f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
        rows.append(row)
        if report is not None:
            report(row)
    _, _, step, clear = next(s for s in _steps(*dims, p, dev) if s[0] == "triton")[:4]
    try:
        _host_us(step, clear, dev, steps=2)
    except Exception:  # noqa: BLE001 - the triton row above already says why
        return rows, None
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        for t in clear:
            t.grad = None
        step()
    prof.disable()
    _sync(dev)
    return rows, pstats.Stats(prof)


def _step_row(name: str, step_row: list, dev, launches: list, counting, real_launch, real_planned) -> tuple:
    """One row of :func:`profile_steps`: the launchers counted through one step, then the timed steps, within the
    row's scope (its switches)."""
    import torch

    from lora_kernels.triton_ops import launch
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops import single_pass as sp

    fwd, step, clear, *scope = step_row
    with scope[0]() if scope else contextlib.nullcontext():
        tri._launch, sp._planned_launch = counting(real_launch), counting(real_planned)
        try:
            _host_us(step, clear, dev, steps=1)  # warm-up (compiles, tunes)
            launches.clear()
            saved, launch.CALLS = launch.CALLS, False  # (a call plan's replay goes around the launchers counted)
            try:
                step()
            finally:
                launch.CALLS = saved
            names = list(launches)
        finally:
            tri._launch, sp._planned_launch = real_launch, real_planned
        with torch.no_grad():  # (the launchers not wrapped while timed: one generation for the whole row)
            f_us = _host_us(fwd, [], dev)
        fb_us = _host_us(step, clear, dev)
    return (name, f_us, fb_us, names if name.startswith("triton") else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("host_profile: needs a CUDA GPU (none here); `python -m bench.host_overhead` measures the host "
              "path on a CPU", file=sys.stderr)  # fmt: skip
        return 2
    print(f"host_profile: {torch.cuda.get_device_name()}, M,K,N,r = {args.shape}, p = {args.p}", flush=True)
    # Each table as soon as it is measured (a step stopped at its time limit keeps what it printed), then all of them
    # together last.
    calib = _calibration(args.reps)
    _print_calibration(calib)
    print("host_profile: step rows, as each ends:", flush=True)
    rows, stats = profile_steps(args.dims, args.p, args.steps, torch.device("cuda"), args.single_pass,
                                report=lambda row: print(f"  {_step_line(row)}", flush=True))  # fmt: skip
    if stats is None:
        print("\n### cProfile: not run (the triton row failed)")
    else:
        print(f"\n### cProfile: own time, top functions (seconds over {args.steps} steps)")
        stats.sort_stats("tottime").print_stats(args.top)
        print("\n| area | own µs per step |\n|---|---|")
        for name, secs in area_totals(stats).items():
            print(f"| {name} | {secs / args.steps * 1e6:.0f} |")
    _print_calibration(calib)
    print("\n| step | forward host µs | fwd+bwd host µs | Triton launches per fwd+bwd |\n|---|---|---|---|")
    for row in rows:
        print(_step_line(row))
    return 0 if all(row[1] is not None or not row[3].startswith("error") for row in rows) else 1


def _print_calibration(calib: list[tuple]) -> None:
    print("\n| host call | µs |\n|---|---|")
    for name, us in calib:
        print(f"| {name} | {'–' if us is None else f'{us:.1f}'} |")
    print(flush=True)


def _step_line(row: tuple) -> str:
    """A step row as a table line (a row without figures: its reason in the launches column)."""
    name, f_us, fb_us, names = row
    if f_us is None:
        return f"| {name} | – | – | {names} |"
    counted = "" if names is None else f"{len(names)} ({', '.join(names)})"
    return f"| {name} | {f_us:.0f} | {fb_us:.0f} | {counted} |"


if __name__ == "__main__":
    sys.exit(main())
