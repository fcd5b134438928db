"""Hardware counters per kernel for one benchmark configuration: the evidence bench/NOTES.md asks for
where a ratio misses its target (which kernel, how many DRAM/L2 bytes, how busy the SMs were).

    python -m bench.ncu_profile --impls cublas,triton-bitmask,triton-1pass --shape 8192,4096,4096,16 -p 0.1

runs, per implementation, one Nsight Compute (``ncu --clock-control none --profile-from-start off``:
the card's clocks are left as they are) process that re-executes
this script with ``--child``: warm-up steps untraced, then ``--steps`` forward+backward steps between
``cudaProfilerStart``/``Stop``. It prints one markdown table: per implementation and kernel, launches,
total time, DRAM bytes, L2 bytes, and the SM / memory "speed of light" percentages. ``--dry`` runs the
steps without ncu (any machine, the interpreter included: it checks the steps, no counters).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence

import torch

from . import _impls

__all__ = ["main", "ncu_command", "parse_ncu_csv", "summarize"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ncu "details" page metrics kept in the table (Section, Metric Name) -> column.
_METRICS = {
    ("GPU Speed Of Light Throughput", "Duration"): "time",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_pct",
    ("GPU Speed Of Light Throughput", "Memory Throughput"): "mem_pct",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_pct",
}
_RAW = {"dram__bytes_read.sum": "dram_read", "dram__bytes_write.sum": "dram_write", "lts__t_bytes.sum": "l2_bytes"}
_UNIT = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
_BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.ncu_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", default="cublas,triton-bitmask,triton-1pass", help="comma list (bench/_impls.py)")
    ap.add_argument("--shape", default="8192,4096,4096,16", help="M,K,N,r")
    ap.add_argument("-p", "--dropout", type=float, default=0.1)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    # "same" as bench.lora_linear's default: the counters explain the benchmark's rows, not another configuration.
    ap.add_argument("--adapter-dtype", choices=["same", *sorted(_DTYPES)], default="same")
    ap.add_argument("--steps", type=int, default=3, help="profiled forward+backward steps per implementation")
    ap.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="the Nsight Compute binary")
    ap.add_argument("--dry", action="store_true", help="run the steps without ncu (no counters)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.split(","))
    if len(args.shape) != 4:
        ap.error("--shape is M,K,N,r")
    return args


def _step(impl: _impls.Impl, x: torch.Tensor, dy: torch.Tensor) -> None:
    for t in (x, *impl.owned):  # no gradient accumulation kernels (x.grad += ...) in the profile
        t.grad = None
    impl.fn(x).backward(dy)


def impl_steps(prob: _impls.Problem, names: str, tool: str):
    """(name, impl, step) for each implementation of the comma list ``names`` that can run on ``prob`` (step:
    one forward+backward on its first copy); the others are reported on stderr, prefixed by ``tool``."""
    for name in names.split(","):
        try:
            impl = _impls.build(name, prob)
        except _impls.Unavailable as e:
            print(f"{tool}: {name} skipped: {e}", file=sys.stderr)
            continue
        yield name, impl, functools.partial(_step, impl, prob.xs[0], prob.dys[0])


def run_steps(args: argparse.Namespace) -> list[str]:
    """Warm up each implementation untraced, then ``steps`` steps with the CUDA profiler on."""
    M, K, N, r = args.shape
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = _DTYPES[args.dtype]
    adt = dt if args.adapter_dtype == "same" else _DTYPES[args.adapter_dtype]
    prob = _impls.make_problem(M, K, N, r, args.dropout, dtype=dt, adapter_dtype=adt, device=dev, copies=1)
    ran = []
    for name, impl, step in impl_steps(prob, args.impls, "profile"):
        with impl.scope():
            for _ in range(2):  # compilation, autotuning, allocator warm-up stay out of the range
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            for _ in range(args.steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
        ran.append(name)
    return ran


def _num(value: str, unit: str) -> float:
    v = float(value.replace(",", ""))
    if unit in _UNIT:
        return v * _UNIT[unit]
    return v * _BYTES.get(unit, 1.0)


def parse_ncu_csv(text: str, impl: str = "") -> list[dict]:
    """Rows of ``ncu --csv --page details``: one dict per kernel launch with ``impl``, the kernel name
    and the metrics of ``_METRICS`` / ``_RAW`` found."""
    start = text.find('"ID"')
    if start < 0:
        return []
    launches: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        if not (row.get("ID") or "").strip().isdigit():  # ncu's own "==PROF== ..." lines among the rows
            continue
        rec = launches.setdefault(row["ID"], {"kernel": row.get("Kernel Name", "?"), "impl": impl})
        name, unit, value = row.get("Metric Name", ""), row.get("Metric Unit", ""), row.get("Metric Value", "")
        col = _METRICS.get((row.get("Section Name", ""), name)) or _RAW.get(name)
        if col and value not in ("", "n/a"):
            rec[col] = _num(value, unit)
    return list(launches.values())


def _weighted(recs: list[dict], key: str) -> float:
    """Time-weighted mean of a percentage over launches."""
    t = sum(r.get("time", 0.0) for r in recs)
    return sum(r.get(key, 0.0) * r.get("time", 0.0) for r in recs) / t if t else 0.0


def summarize(launches: list[dict], impls: Sequence[str]) -> str:
    """A markdown table: per implementation and kernel, launches and totals / time-weighted means."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in launches:  # the full name: CUTLASS GEMMs share their first ~100 characters
        groups[(rec["impl"], rec["kernel"])].append(rec)

    def order(item):
        (impl, _), recs = item
        return impls.index(impl) if impl in impls else len(impls), -sum(r.get("time", 0.0) for r in recs)

    lines = [
        "| impl | kernel | launches | time µs | DRAM MB | L2 MB | SM % | mem % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shown: dict[tuple[str, str], int] = defaultdict(int)
    for (impl, kernel), recs in sorted(groups.items(), key=order):
        shown[(impl, kernel[:60])] += 1  # distinct kernels with the same first 60 characters: #2, #3, ...
        kernel = kernel[:60] + (f" #{shown[(impl, kernel[:60])]}" if shown[(impl, kernel[:60])] > 1 else "")
        t = sum(r.get("time", 0.0) for r in recs)
        dram = sum(r.get("dram_read", 0.0) + r.get("dram_write", 0.0) for r in recs) / 1e6
        l2 = sum(r.get("l2_bytes", 0.0) for r in recs) / 1e6
        sm, mem = _weighted(recs, "sm_pct"), _weighted(recs, "mem_pct")
        lines.append(f"| {impl} | {kernel} | {len(recs)} | {t:.1f} | {dram:.1f} | {l2:.1f} | {sm:.0f} | {mem:.0f} |")
    return "\n".join(lines)


def ncu_command(ncu: str, child: Sequence[str]) -> list[str]:
    """The Nsight Compute command line that profiles ``child``.

    ``--clock-control none``: by default ncu locks the GPU's clocks to base for the duration, which
    changes the card's settings (shared machines here forbid that) and measures another card than the
    benchmark's; with it, kernels run at the clocks the card has, as in ``bench.lora_linear``."""
    return [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "details",
            "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis", "--metrics", ",".join(_RAW),
            *child]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child or args.dry:
        ran = run_steps(args)
        print(f"profile: ran {', '.join(ran) or 'nothing'} ({args.steps} steps each)", file=sys.stderr)
        return 0
    ncu = shutil.which(args.ncu)
    if ncu is None:
        print(f"profile: {args.ncu!r} not found: install Nsight Compute or pass --ncu PATH (--dry runs without)")
        return 2
    impls = args.impls.split(",")
    failed: list[str] = []
    printed = False
    for impl in impls:  # one ncu process per implementation: its kernels are all that is profiled
        child = [sys.executable, "-m", "bench.ncu_profile", "--child", "--impls", impl, "--shape",
                 ",".join(map(str, args.shape)), "-p", str(args.dropout), "--dtype", args.dtype,
                 "--adapter-dtype", args.adapter_dtype, "--steps", str(args.steps)]  # fmt: skip
        cmd = ncu_command(ncu, child)
        print("profile: " + " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # this implementation only: the others may still profile
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            failed.append(impl)
            continue
        new = parse_ncu_csv(proc.stdout, impl)
        # Each implementation's rows as it ends: a step stopped at its time limit keeps them.
        print("\n".join(summarize(new, impls).splitlines()[0 if not printed else 2 :]), flush=True)
        printed = True
    if failed:
        print(f"profile: ncu failed for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
