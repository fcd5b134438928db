"""Plot one benchmark run: time ratio to cuBLAS per configuration and implementation.

    python -m bench.plot bench/results/nvidia-h100-80gb-hbm3.csv            # latest run in the file
    python -m bench.plot results.csv --run-id 20250101T120000Z -o out.png

Two panels (forward; forward+backward), one group of bars per configuration, one bar per
implementation; the cuBLAS floor is the line at 1.0 and the targets (forward ≤ 1.05×,
forward+backward ≤ 1.10×, see shared/ANCHORS.md) are dashed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from ._report import read_csv

__all__ = ["plot_rows", "plot_csv", "main"]

TARGETS = {"fwd_ratio": 1.05, "fwdbwd_ratio": 1.10}


def _num(v: object) -> float:
    try:
        f = float(v)  # rows straight from a run hold floats, rows from a CSV hold strings
    except (TypeError, ValueError):
        return math.nan
    return f


def _config_label(row: dict) -> str:
    return f"{row['M']}×{row['K']}→{row['N']}\nr={row['r']} p={_num(row['p']):g}"


def plot_rows(rows: Sequence[dict], png: Path, title: str | None = None) -> Path | None:
    """Write the ratio plot of ``rows`` (one run) to ``png``; None if matplotlib is missing.

    Only rows with status "ok" and a ratio are drawn; the ``cublas`` rows are the 1.0 line.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: CI and the GPU image have no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status") == "ok" and r.get("impl") != "cublas"]
    configs = list(dict.fromkeys(_config_label(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    fig_w = min(40.0, max(6.0, 0.25 * len(configs) * max(1, len(impls)) + 2.0))  # readable, bounded
    fig, axes = plt.subplots(2, 1, figsize=(fig_w, 7.5), sharex=True, squeeze=True)
    width = 0.8 / max(1, len(impls))
    for ax, key, label in zip(axes, ("fwd_ratio", "fwdbwd_ratio"), ("forward", "forward+backward"), strict=True):
        for j, impl in enumerate(impls):
            ys = [math.nan] * len(configs)
            for r in ok:
                if r["impl"] == impl:
                    ys[configs.index(_config_label(r))] = _num(r.get(key))
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(configs))]
            ax.bar(xs, ys, width=width, label=impl)
        ax.axhline(1.0, color="black", linewidth=1.0, label="cuBLAS (frozen F.linear)")
        ax.axhline(TARGETS[key], color="tab:red", linestyle="--", linewidth=1.0, label=f"target {TARGETS[key]}×")
        finite = [_num(r.get(key)) for r in ok if math.isfinite(_num(r.get(key)))]
        if finite and max(finite) > 8.0:  # e.g. interpreted kernels in a dry run: keep small bars visible
            ax.set_yscale("log")
        ax.set_ylabel(f"{label} time / cuBLAS")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(4, len(impls) + 2), loc="upper left")
    axes[1].set_xticks(range(len(configs)))
    axes[1].set_xticklabels(configs, fontsize=7)
    if title is None and rows:
        r0 = rows[0]
        title = f"{r0.get('gpu', '')}  {r0.get('dtype', '')}  commit {r0.get('commit', '')}  {r0.get('date', '')}"
    fig.suptitle(title or "", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_csv(csv_path: Path, png: Path | None = None, run_id: str | None = None) -> Path | None:
    """Plot one run (default: the latest) of a results CSV; PNG next to it unless ``png``."""
    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    if not {"run_id", *TARGETS} <= rows[0].keys():
        raise ValueError(
            f"{csv_path} is not a bench.lora_linear results CSV (no run_id, fwd_ratio, fwdbwd_ratio columns)"
        )
    run_id = run_id or max(r["run_id"] for r in rows)
    run = [r for r in rows if r["run_id"] == run_id]
    if not run:
        raise ValueError(f"run {run_id!r} not in {csv_path}")
    return plot_rows(run, png or Path(csv_path).with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, help="a bench/results/*.csv file")
    ap.add_argument("-o", "--out", type=Path, help="PNG path (default: the CSV's name with .png)")
    ap.add_argument("--run-id", help="which run to plot (default: the latest)")
    args = ap.parse_args(argv)
    try:
        png = plot_csv(args.csv, args.out, args.run_id)
    except (OSError, ValueError) as e:  # a wrong file: say so, no traceback
        raise SystemExit(f"bench.plot: {e}") from None
    if png is None:
        raise SystemExit("matplotlib is not installed: no plot")
    print(png)


if __name__ == "__main__":
    main()
