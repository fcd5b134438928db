"""Time per kernel of one forward+backward step, per implementation, from torch.profiler's CUDA trace:
which kernel a ratio above its target spends its time in.

    python -m bench.kernel_times --impls cublas,naive,triton-bitmask,cuda-bitmask --shape 8192,4096,4096,16 -p 0 -p 0.1

Unlike ``bench.ncu_profile`` (hardware counters, each kernel replayed alone with caches flushed), the
kernels run here as in the benchmark: back to back, caches warm, at the card's clocks. Per implementation
and dropout p: warm-up steps untraced, the step's wall time from CUDA events over ``--steps`` steps,
then the same steps traced (the trace's kernel events: name and duration). One markdown table: per
kernel, launches and µs per step and its share of the step; per implementation, the sum of its kernels
against the step's wall time (the difference is the GPU idle between launches: host overhead).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence

import torch

from . import _impls
from .ncu_profile import _DTYPES, impl_steps

__all__ = ["kernel_events", "main", "summarize"]

# Chrome-trace categories of device work (kernels and the memsets/copies some implementations issue).
_DEVICE_CATS = ("kernel", "gpu_memset", "gpu_memcpy")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_times", description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", default="cublas,naive,triton-bitmask,cuda-bitmask", help="comma list (bench/_impls.py)")
    ap.add_argument("--shape", action="append", help="M,K,N,r (repeatable; default 8192,4096,4096,16)")
    ap.add_argument("-p", "--dropout", type=float, action="append", help="dropout p (repeatable; default 0 and 0.1)")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--adapter-dtype", choices=["same", *sorted(_DTYPES)], default="same")
    ap.add_argument("--steps", type=int, default=10, help="timed and traced forward+backward steps")
    ap.add_argument("--warmup", type=int, default=3, help="untraced steps first (compilation, allocator)")
    args = ap.parse_args(argv)
    args.shape = [tuple(int(v) for v in s.split(",")) for s in args.shape or ["8192,4096,4096,16"]]
    if any(len(s) != 4 for s in args.shape):
        ap.error("--shape is M,K,N,r")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be ≥ 1 and --warmup ≥ 0")
    args.dropout = args.dropout or [0.0, 0.1]
    return args


def kernel_events(trace: dict) -> list[tuple[str, float]]:
    """(name, duration µs) of every device event of a Chrome trace (``export_chrome_trace``'s JSON)."""
    return [
        (str(e.get("name", "?")), float(e["dur"]))
        for e in trace.get("traceEvents", [])
        if e.get("cat") in _DEVICE_CATS and "dur" in e
    ]


def _traced(step, steps: int) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return kernel_events(json.load(f))


def _wall_us(step, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def summarize(rows: list[dict], steps: int) -> str:
    """Rows {impl, p, wall_us, events: [(name, µs)]} -> one markdown table, kernels by time within each."""
    lines = [
        "| M × K → N, r | impl | p | kernel | launches/step | µs/step | share of step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        M, K, N, r = row["shape"]
        head = f"| {M} × {K} → {N}, {r} | {row['impl']} | {row['p']:g} |"
        per: dict[str, list[float]] = defaultdict(list)
        for name, dur in row["events"]:
            per[name].append(dur)
        wall = row["wall_us"]
        for name, durs in sorted(per.items(), key=lambda kv: -sum(kv[1])):
            t = sum(durs) / steps
            short = name if len(name) <= 70 else name[:67] + "..."
            lines.append(f"{head} `{short}` | {len(durs) / steps:g} | {t:.1f} | {t / wall:.0%} |")
        busy = sum(d for _, d in row["events"]) / steps
        lines.append(f"{head} **all kernels / step wall time** | {len(row['events']) / steps:g} | "
                     f"{busy:.1f} / {wall:.1f} | {busy / wall:.0%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_times: needs a CUDA GPU (torch.profiler's CUDA trace)")
        return 2
    dt = _DTYPES[args.dtype]
    adt = dt if args.adapter_dtype == "same" else _DTYPES[args.adapter_dtype]
    rows: list[dict] = []
    printed = False
    for (M, K, N, r), p in itertools.product(args.shape, args.dropout):
        prob = _impls.make_problem(M, K, N, r, p, dtype=dt, adapter_dtype=adt, device=torch.device("cuda"), copies=1)
        for name, impl, step in impl_steps(prob, args.impls, "kernel_times"):
            with impl.scope():
                for _ in range(args.warmup):
                    step()
                wall = _wall_us(step, args.steps)
                events = _traced(step, args.steps)
            rows.append({"shape": (M, K, N, r), "impl": name, "p": p, "wall_us": wall, "events": events})
            # Each implementation's rows as it ends: a step stopped at its time limit keeps them.
            table = summarize(rows[-1:], args.steps).splitlines()
            print("\n".join(table if not printed else table[2:]), flush=True)
            printed = True
        del prob
        torch.cuda.empty_cache()
    print(f"kernel_times: {args.dtype} (adapters {args.adapter_dtype}), {args.steps} steps each", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
