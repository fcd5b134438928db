"""LoRA-linear benchmark: ours vs cuBLAS, naive eager, PEFT and torch.compile on the same inputs.

    python -m bench.lora_linear                 # default shape set (bf16, H100-sized; long)
    python -m bench.lora_linear --quick         # a few shapes
    python -m bench.lora_linear --dry           # tiny fp32 run on the CPU (writes to a temp dir)
    python -m bench.lora_linear --m 8192 --shapes 4096x4096,4096x14336 --ranks 16 --dropout 0,0.1 \
        --impls cublas,naive,triton-bitmask,triton-regen

Every configuration (M tokens, K → N, rank r, dropout p) builds one set of random inputs and runs
each implementation on them (see ``bench/_impls.py`` for the names). Per row it measures forward
and forward+backward medians (backward = dX for the frozen ``cublas`` floor; dX, dA, dB for LoRA
rows), ratios to ``cublas``, TFLOP/s, the activation memory saved for backward beyond x, and the
peak memory of a step (see ``bench/_measure.py``). Progress goes to stderr; each configuration's rows
are appended to ``<out>/<gpu-name-slug>.csv`` as it ends; the markdown table (with ``rel_err``) is
printed last, then the rows are plotted to ``<out>/<gpu-name-slug>.png``; also after SIGTERM or Ctrl-C,
for the rows that ran. The exit status is 1 if a row errored, is WRONG (``rel_err`` beyond its dtype's
tolerance) or was not run (interrupted, or after a fault lost the CUDA context), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels.verify import TOLERANCES

from . import _impls, _measure, _report

__all__ = [
    "Config",
    "PRESETS",
    "RunStopped",
    "build_configs",
    "exit_status",
    "main",
    "parse_args",
    "rel_err_tolerance",
    "run_config",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: x is ``(M, K)``, W is ``(N, K)``, rank ``r``, dropout ``p``."""

    M: int
    K: int
    N: int
    r: int
    p: float


# Axes of each preset (cartesian product) plus extra configurations appended to it.
PRESETS: dict[str, dict] = {
    "full": {
        "m": [4096, 8192, 16384],
        "shapes": [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)],
        "ranks": [16, 64],
        "dropout": [0.0, 0.1],
        "extra": [],
    },
    "quick": {
        "m": [8192],
        "shapes": [(4096, 4096), (4096, 14336)],
        "ranks": [16],
        "dropout": [0.0, 0.1],
        "extra": [Config(2048, 4096, 4096, 16, 0.0), Config(2048, 4096, 4096, 16, 0.1)],
    },
    # Tiny and non-square (K != N) so that mixed-up dimensions show; runs in seconds on a CPU.
    "dry": {"m": [64], "shapes": [(64, 96)], "ranks": [8], "dropout": [0.0, 0.1], "extra": []},
}
_AXES = ("m", "shapes", "ranks", "dropout")
GPU_IMPLS = (
    "cublas",
    "naive",
    "peft",
    "axolotl",
    "compile",
    "addmm",
    "triton-bitmask",
    "triton-1pass",
    "triton-flat",
    "triton-kn",
    "triton-nosplit",
    "triton-dx128",
    "triton-dy1",
    "triton-devdesc",
    "triton-regen",
    "cuda-bitmask",
    "cuda-expand",
    "cuda-scalar",
    "cuda-regen",
)
# triton-compile (a compile per configuration, like `compile`) only when asked for with --impls.
# torch.compile is left out of the dry run: inductor's C++ build takes minutes on a small CPU.
DRY_IMPLS = ("cublas", "naive", "peft", "axolotl", "addmm", "torch", "triton-bitmask", "triton-regen")


def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _float_list(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _shape_list(s: str) -> list[tuple[int, int]]:
    """ "4096x14336,14336->4096" -> [(4096, 14336), (14336, 4096)] (each K→N)."""
    out = []
    for item in s.split(","):
        item = item.strip().replace("->", "x").replace("→", "x")
        if not item:
            continue
        k, sep, n = item.partition("x")
        if not sep:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not KxN (e.g. 4096x14336)")
        out.append((int(k), int(n)))
    return out


def _impl_list(s: str) -> list[str]:
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [n for n in names if n not in _impls.ALL_IMPLS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {bad}; choose from {', '.join(_impls.ALL_IMPLS)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.lora_linear",
        description="Benchmark LoRA linear forward / forward+backward against the frozen cuBLAS GEMM.",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few shapes: M=8192 (4096→4096, 4096→14336) + M=2048")
    mode.add_argument(
        "--dry", action="store_true",
        help="tiny fp32 run on the CPU with perf_counter timing; output to a temp dir unless --out",
    )  # fmt: skip
    ap.add_argument("--m", type=_int_list, help="token counts M, e.g. 4096,8192 (overrides the preset)")
    ap.add_argument("--shapes", type=_shape_list, help="K→N pairs, e.g. 4096x4096,4096x14336")
    ap.add_argument("--ranks", type=_int_list, help="LoRA ranks, e.g. 16,64")
    ap.add_argument("--dropout", type=_float_list, help="dropout probabilities, e.g. 0,0.1")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), help="activation/weight dtype (default bf16; dry: fp32)")
    ap.add_argument(
        "--adapter-dtype", default="same", choices=["same", *sorted(_DTYPES)],
        help="dtype of lora_A/lora_B for ours rows (naive always uses the activation dtype, peft fp32)",
    )  # fmt: skip
    ap.add_argument("--bias", action="store_true", help="give the base layer a bias (default: none, as in Llama)")
    ap.add_argument("--scaling", type=float, default=2.0, help="LoRA scaling alpha/r (default 2)")
    ap.add_argument(
        "--frozen", default="none", choices=["none", "A", "B", "AB"],
        help="adapter matrices that take no gradient in every row: A (LoRA-FA), B, AB (a frozen adapter; "
        "x still trains). Default none",
    )  # fmt: skip
    ap.add_argument(
        "--impls", type=_impl_list,
        help=f"comma list from {', '.join(_impls.ALL_IMPLS)} (cublas is always run: it is the ratio base). "
        f"Default GPU: {','.join(GPU_IMPLS)}; dry: {','.join(DRY_IMPLS)}",
    )  # fmt: skip
    ap.add_argument("--device", help="cuda or cpu (default: cuda if available; dry: cpu)")
    ap.add_argument("--out", type=Path, help=f"directory for the CSV and PNG (default {RESULTS_DIR}; dry: temp)")
    ap.add_argument("--no-csv", action="store_true", help="do not write the CSV")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time per measurement")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per measurement")
    ap.add_argument("--cpu-reps", type=int, default=5, help="perf_counter repetitions (non-CUDA timing)")
    ap.add_argument("--copies", type=int, help="input copies to rotate through (default: enough to defeat L2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument(
        "--budget-s", type=float,
        help="start no configuration that would end past this many seconds (by the mean time of those so far): "
        "a time-limited run still writes its rows and table",
    )  # fmt: skip
    return ap.parse_args(argv)


def build_configs(args: argparse.Namespace) -> list[Config]:
    """The preset's configurations, or the cartesian product with the axes given on the command line."""
    preset = PRESETS["dry" if args.dry else "quick" if args.quick else "full"]
    given = {a: getattr(args, a) for a in _AXES if getattr(args, a) is not None}
    axes = {a: given.get(a, preset[a]) for a in _AXES}
    configs = [
        Config(m, k, n, r, p)
        for (k, n), m, r, p in itertools.product(axes["shapes"], axes["m"], axes["ranks"], axes["dropout"])
    ]
    if not given:
        configs += preset["extra"]
    return configs


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RunStopped(Exception):
    """Raised by :func:`run_config` when the run cannot go on: interrupted, or the CUDA context is lost.

    ``rows`` are the configuration's rows, the unmeasured ones with ``status``; ``interrupted`` tells the
    two causes apart (after an interrupt nothing more is started; after a lost context the remaining
    configurations are recorded as not run).
    """

    def __init__(self, status: str, rows: list[dict], interrupted: bool) -> None:
        super().__init__(status)
        self.status, self.rows, self.interrupted = status, rows, interrupted


_INTERRUPTED = "not run: interrupted"
# Text of the errors a kernel fault leaves behind (torch's, and Triton's launcher's "Triton Error [CUDA]: ...").
_FAULT_TEXT = (
    "CUDA error",
    "CUDA_ERROR",
    "Triton Error [CUDA]",
    "illegal memory access",
    "misaligned address",
    "device-side assert",
    "unspecified launch failure",
)


def _looks_like_cuda_fault(e: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _FAULT_TEXT)


def _cuda_usable(device: torch.device) -> bool:
    """Whether the CUDA context still runs work: a fault is sticky and every later call repeats it."""
    try:
        torch.ones(1, device=device).add_(1).sum().item()
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def _context_lost(e: BaseException, device: torch.device) -> bool:
    """A row's error is a kernel fault that poisoned the CUDA context: nothing more can be measured."""
    if not _looks_like_cuda_fault(e):
        return False
    # Some CUDA errors (an invalid launch configuration, a failed allocation) leave the context usable;
    # a tiny kernel tells those apart. Off CUDA (a stand-in raising in tests) the text alone decides.
    return device.type != "cuda" or not _cuda_usable(device)


def _empty_cache(device: torch.device) -> None:
    if device.type != "cuda":
        return
    try:
        torch.cuda.empty_cache()
    except Exception:  # after a fault it raises the same error again: keep the row's own error instead
        pass


def rel_err_tolerance(*dtypes: torch.dtype) -> float:
    """Largest ``rel_err`` (max |y - ref| / max |ref|) of a correct row computed in ``dtypes``.

    lora_kernels.verify's bound for the loosest dtype taking part, ``atol · max(scale, 1) + rtol · scale``,
    over the scale ``max |ref|`` (above 1 for these inputs): ``atol + rtol``. At least 1e-4: the reference
    here is fp32 (not verify's fp64), and its own rounding adds to an fp32 row's error.
    """
    return max(max(sum(TOLERANCES[d]) for d in dtypes), 1e-4)


def _checked_status(row: dict, tol: float) -> str:
    """ "ok", or "WRONG (...)" for a row whose output is off its fp32 reference (rel_err exists at p = 0)."""
    err = row.get("rel_err")
    if err is None or err <= tol:
        return "ok"
    return f"WRONG (rel_err {err:.2e} > {tol:.0e})"  # NaN lands here too


def _failed(row: dict) -> bool:
    return not (row["status"] == "ok" or row["status"].startswith("skipped"))


def exit_status(rows: Sequence[dict]) -> int:
    """1 when a row has an error, WRONG or not-run status, else 0 (skipped rows are expected)."""
    return int(any(_failed(r) for r in rows))


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[list[int]]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: `timeout` sends TERM, and the rows measured so far
    must still be tabulated. Only the first one: later ones are ignored so the table gets out. Yields the
    list of signals received; the previous handler is restored after."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reference_fp32(prob: _impls.Problem, lora: bool) -> torch.Tensor:
    """fp32 y of copy 0 at p = 0 (the base GEMM alone when ``lora`` is False)."""
    x = prob.xs[0].detach().float()
    b = None if prob.bias is None else prob.bias.float()
    y = F.linear(x, prob.weight.float(), b)
    if lora:
        y += prob.scaling * F.linear(F.linear(x, prob.lora_A.detach().float()), prob.lora_B.detach().float())
    return y


def measure(impl: _impls.Impl, prob: _impls.Problem, args: argparse.Namespace, refs: dict) -> dict:
    """Every measured column of one row (see bench/results/README.md), inside the row's scope."""
    with impl.scope():
        return _measure_row(impl, prob, args, refs)


def _measure_row(impl: _impls.Impl, prob: _impls.Problem, args: argparse.Namespace, refs: dict) -> dict:
    dev = prob.device
    nxt = _measure.rotating(len(prob.xs))
    trainable = [t for t in impl.owned if t.requires_grad]
    grad_to_none = list(prob.xs) + trainable

    def fwd() -> torch.Tensor:
        return impl.fn(prob.xs[nxt()])

    def step() -> None:
        i = nxt()
        impl.fn(prob.xs[i]).backward(prob.dys[i])

    def clear() -> None:
        for t in grad_to_none:
            t.grad = None

    # One untimed step first: JIT compilation, autotuning and torch.compile stay out of every number.
    step()
    clear()
    out: dict = {}
    fallbacks0 = impl.fallbacks() if impl.fallbacks is not None else None
    if prob.p == 0.0:
        lora = impl.name != "cublas"
        if lora not in refs:
            refs[lora] = _reference_fp32(prob, lora)
        ref = refs[lora]
        # With grad enabled, as the timed calls: under no_grad a torch.compile row would compile again.
        y = impl.fn(prob.xs[0]).detach().float()
        out["rel_err"] = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        del y
    saved, _ = _measure.saved_activation_bytes(lambda: impl.fn(prob.xs[0]), exclude=list(prob.xs) + impl.owned)
    out["saved_mib"] = saved / _measure.MIB
    retained = _measure.retained_bytes(lambda: impl.fn(prob.xs[0]), dev)
    out["retained_mib"] = None if retained is None else retained / _measure.MIB
    timing = dict(grad_to_none=grad_to_none, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps)
    out["fwd_ms"], out["timer"] = _measure.time_ms(fwd, dev, **timing)
    out["fwdbwd_ms"], _ = _measure.time_ms(step, dev, **timing)
    out["host_us"] = _measure.host_step_us(step, dev, grad_to_none=grad_to_none)
    clear()
    peak = _measure.peak_step_bytes(step, dev)
    out["peak_mib"] = None if peak is None else peak / _measure.MIB
    clear()
    if fallbacks0 is not None:  # every call of the row, timed or not, after the untimed first step
        out["sp_fallbacks"] = impl.fallbacks() - fallbacks0
    out["fwd_tflops"] = impl.flops_fwd / (out["fwd_ms"] * 1e-3) / 1e12
    out["fwdbwd_tflops"] = impl.flops_fwdbwd / (out["fwdbwd_ms"] * 1e-3) / 1e12
    return out


def run_config(
    cfg: Config, impl_names: Sequence[str], args: argparse.Namespace, device: torch.device, base: dict, tag: str
) -> list[dict]:
    """All rows of one configuration, ratios filled in against its ``cublas`` row.

    A row whose output is off the fp32 reference gets a "WRONG (...)" status. Raises :class:`RunStopped`,
    carrying the rows, when interrupted or when a row's error lost the CUDA context.
    """
    dtype = _DTYPES[args.dtype]
    adapter_dtype = dtype if args.adapter_dtype == "same" else _DTYPES[args.adapter_dtype]
    tol = rel_err_tolerance(dtype, adapter_dtype)
    common = _config_columns(cfg, args, base)
    rows: list[dict] = []
    refs: dict = {}
    prob: _impls.Problem | None = None
    stop: str | None = None  # the status of every row not measured, once the run cannot go on
    for idx, name in enumerate(impl_names):
        row = dict(common, impl=name)
        t0 = time.perf_counter()
        try:
            if prob is None:  # made in the row's try: a failure (OOM, a fault) is then that row's error
                prob = _impls.make_problem(
                    cfg.M, cfg.K, cfg.N, cfg.r, cfg.p, dtype=dtype, adapter_dtype=adapter_dtype, device=device,
                    bias=args.bias, scaling=args.scaling, copies=args.copies, seed=args.seed,
                    frozen="" if args.frozen == "none" else args.frozen,
                )  # fmt: skip
                common["copies"] = row["copies"] = len(prob.xs)
            impl = _impls.build(name, prob)
            row.update(measure(impl, prob, args, refs))
            del impl
            row["status"] = _checked_status(row, tol)
        except _impls.Unavailable as e:
            row["status"] = f"skipped: {e}"
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through main's handler: keep what ran, stop
            row["status"] = stop = _INTERRUPTED
        except Exception as e:  # one failing row (OOM, kernel error) must not lose the whole run
            traceback.print_exc(file=sys.stderr)
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            if _context_lost(e, device):
                stop = f"not run: CUDA context lost ({row['status'].removeprefix('error: ')})"
        finally:
            _empty_cache(device)
        rows.append(row)
        if "fwd_ms" in row:
            verdict = "" if row["status"] == "ok" else f": {row['status']}"
            if row.get("sp_fallbacks"):  # the barrier timed out: those tiles recomputed T (slower)
                verdict += f" [{row['sp_fallbacks']} barrier fallbacks]"
            _log(f"{tag} {name:>15}: fwd {row['fwd_ms']:.4f} ms, fwd+bwd {row['fwdbwd_ms']:.4f} ms, "
                 f"saved {row['saved_mib']:.4g} MiB, rel_err {_report.fmt_err(row.get('rel_err'))} "
                 f"({time.perf_counter() - t0:.1f} s){verdict}")  # fmt: skip
        else:
            _log(f"{tag} {name:>15}: {row['status']}")
        if stop is not None:
            rows += [dict(common, impl=n, status=stop) for n in impl_names[idx + 1 :]]
            break
    # Timings of WRONG rows are still timings: they get ratios too.
    floor = next((r for r in rows if r["impl"] == "cublas" and "fwd_ms" in r), None)
    for row in rows:
        if floor is not None and "fwd_ms" in row:
            row["fwd_ratio"] = row["fwd_ms"] / floor["fwd_ms"]
            row["fwdbwd_ratio"] = row["fwdbwd_ms"] / floor["fwdbwd_ms"]
    if stop is not None:
        raise RunStopped(stop, rows, interrupted=stop == _INTERRUPTED)
    return rows


def _config_columns(cfg: Config, args: argparse.Namespace, base: dict) -> dict:
    """The run and configuration columns of a row (``copies`` is added once the inputs exist)."""
    adapter_dtype = args.dtype if args.adapter_dtype == "same" else args.adapter_dtype
    return dict(base, M=cfg.M, K=cfg.K, N=cfg.N, r=cfg.r, p=cfg.p, dtype=args.dtype,
                adapter_dtype=adapter_dtype, bias=int(args.bias), scaling=args.scaling,
                frozen=args.frozen)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows (also written to CSV/PNG unless disabled).

    Each configuration's rows are appended to the CSV as it ends. On Ctrl-C or SIGTERM the run stops, the
    table (and plot) of what ran is still printed, then SystemExit(130 / 143) is raised. After a fault
    that loses the CUDA context, the remaining rows are recorded as not run. ``exit_status(rows)`` is the
    command's exit code.
    """
    args = parse_args(argv)
    preset = "dry" if args.dry else "quick" if args.quick else "full"
    if any(getattr(args, a) is not None for a in _AXES):
        preset = f"{preset}+custom"
    device = torch.device(args.device or ("cpu" if args.dry or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is available")
    if device.type != "cuda" and not args.dry:
        raise SystemExit("no CUDA GPU: the benchmark needs one (use --dry for the tiny CPU run)")
    if device.type == "cuda" and os.environ.get("LORA_KERNELS_AUTOTUNE") == "0":
        preset = f"{preset}+untuned"  # our Triton rows ran the fixed tiles (eager GPU calls autotune)
    args.dtype = args.dtype or ("fp32" if args.dry else "bf16")
    impl_names = list(args.impls or (DRY_IMPLS if args.dry else GPU_IMPLS))
    if "cublas" not in impl_names:
        impl_names.insert(0, "cublas")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="lora-bench-dry-")) if args.dry else RESULTS_DIR)

    configs = build_configs(args)
    base = _report.run_metadata(device, preset)
    _log(
        f"bench.lora_linear: {len(configs)} configurations x {len(impl_names)} implementations on {base['gpu']} "
        f"({args.dtype}), commit {base['commit']}, torch {base['torch']}, triton {base['triton']}"
    )
    slug = _report.device_slug(base["gpu"])
    csv_path = out_dir / f"{slug}.csv"
    run_timer = _measure.timer_name(device)  # rows that measured nothing carry it too: self-describing CSV
    rows: list[dict] = []
    stopped: RunStopped | None = None
    t_start = time.perf_counter()
    with _sigterm_interrupts() as signals:
        i = 0
        try:
            for i, cfg in enumerate(configs, 1):
                spent = time.perf_counter() - t_start
                if args.budget_s is not None and i > 1 and spent * i / (i - 1) > args.budget_s:
                    _log(f"bench.lora_linear: stopped before configuration {i}/{len(configs)}: it would end past "
                         f"--budget-s {args.budget_s:g} ({spent:.0f} s spent)")  # fmt: skip
                    break
                tag = f"[{i}/{len(configs)}] M={cfg.M} {cfg.K}->{cfg.N} r={cfg.r} p={cfg.p}"
                try:
                    new = run_config(cfg, impl_names, args, device, base, tag)
                except RunStopped as e:
                    new, stopped = e.rows, e
                if stopped is not None and not stopped.interrupted:  # nothing more can run: say so, row by row
                    new += [dict(_config_columns(c, args, base), impl=n, status=stopped.status)
                            for c in configs[i:] for n in impl_names]  # fmt: skip
                # Written as each configuration ends: a run killed later keeps these rows.
                csv_path = _write(new, csv_path, args, run_timer)
                rows += new
                if stopped is not None:
                    break
        except KeyboardInterrupt:  # between rows (run_config handles its own): the rows so far stand
            stopped = RunStopped(_INTERRUPTED, [], interrupted=True)
        if stopped is not None and stopped.interrupted:
            _log(f"bench.lora_linear: interrupted in configuration {i}/{len(configs)}; "
                 f"{len(configs) - i} not started")  # fmt: skip
        elif stopped is not None:
            _log(f"bench.lora_linear: stopped in configuration {i}/{len(configs)}: {stopped.status}")
        _log(f"bench.lora_linear: done in {time.perf_counter() - t_start:.1f} s")
        if not args.no_csv and rows:
            _log(f"bench.lora_linear: appended {len(rows)} rows to {csv_path}")
        # The table before the plot: importing matplotlib takes seconds a killed run may not have.
        print(_report.markdown_table(rows), flush=True)
        _report_tuning(out_dir / f"{slug}-tuning.jsonl", args, base)
        failed = [r for r in rows if _failed(r)]
        if failed:
            _log(f"bench.lora_linear: {len(failed)} of {len(rows)} rows failed (error, WRONG or not run)")
        if not args.no_plot and rows:
            from . import plot

            png = plot.plot_rows(rows, out_dir / f"{slug}.png")
            _log(f"bench.lora_linear: plot {png}" if png else "bench.lora_linear: no plot (matplotlib missing)")
    if stopped is not None and stopped.interrupted:
        # 128 + signal, as a shell reports a process killed by it: the run is incomplete.
        raise SystemExit(128 + (signals[0] if signals else signal.SIGINT))
    return rows


def _report_tuning(path: Path, args: argparse.Namespace, base: dict) -> None:
    """After an autotuned run: what the Triton rows' tunings timed (every config per kernel and key), printed
    and appended to ``path`` (next to the CSV), so a tuned row's time comes with the tiles behind it."""
    try:
        from lora_kernels.triton_ops import lora_linear as tri
    except ImportError:  # no Triton: no Triton rows, nothing tuned
        return
    log = tri.tuning_log()
    if not log:
        return
    print(_report.tuning_lines(log), flush=True)
    if not args.no_csv:
        _log(f"bench.lora_linear: appended {len(log)} tunings to {_report.write_tuning(log, path, base)}")


def _write(rows: list[dict], path: Path, args: argparse.Namespace, run_timer: str) -> Path:
    """Append one configuration's rows to the CSV; returns the file written (see _report.write_csv)."""
    for row in rows:
        row["timer"] = row.get("timer") or run_timer
    if args.no_csv or not rows:
        return path
    return _report.write_csv(rows, path)


if __name__ == "__main__":
    # --dry turns the Triton interpreter on in bench/__init__.py: it must be on before triton is imported.
    sys.exit(exit_status(main()))
