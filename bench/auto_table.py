"""Derive backend="auto"'s order per GPU compute capability from benchmark CSVs.

    python -m bench.auto_table bench/results/nvidia-h100-80gb-hbm3.csv            # print the table
    python -m bench.auto_table bench/results/*.csv --write                        # and update the package

For every compute capability (the CSV's ``cc`` column) it pairs the ``triton-bitmask`` and ``cuda-bitmask``
rows of one run on the same configuration (both ``ok``, timed on a GPU), takes one run per configuration
(autotuned rows before fixed-tile ones, then the latest), and compares the two backends by the geometric
mean over configurations of the CUDA / Triton forward+backward time (training is what the layer is for;
the forward ratio is reported beside it). The faster comes first when it wins by more than ``--margin``;
within the margin Triton stays first (it needs no extension build). Fewer than ``--min-configs``
configurations give no entry, and that capability keeps the default order.

``--write`` rewrites ``lora_kernels/_auto_table.py``: measured capabilities replace their entries, the
others are kept. Commit it with the CSV it came from.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._report import read_csv

__all__ = ["Entry", "derive", "markdown", "read_table", "render_module", "write_table", "main"]

TRITON, CUDA = "triton-bitmask", "cuda-bitmask"
TABLE_PATH = Path(__file__).resolve().parent.parent / "lora_kernels" / "_auto_table.py"
# What identifies a configuration (the two rows must agree on all of it).
CONFIG_KEYS = ("M", "K", "N", "r", "p", "dtype", "adapter_dtype", "bias", "scaling", "frozen")


@dataclass
class Entry:
    """What one compute capability's measurements say."""

    cc: tuple[int, int]
    gpu: str
    configs: int
    runs: list[str]
    commits: list[str]
    tuned: bool  # every chosen pair from an autotuned run
    fwdbwd: float  # geometric mean of cuda / triton forward+backward time
    fwdbwd_min: float
    fwdbwd_max: float
    fwd: float  # the same for the forward alone
    order: tuple[str, ...] | None  # None: too few configurations, no entry
    why: str


def _float(v: object) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _cc(text: str) -> tuple[int, int] | None:
    try:
        major, minor = (int(x) for x in text.strip().split("."))
    except ValueError:
        return None
    return major, minor


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def derive(rows: Iterable[dict], margin: float = 0.02, min_configs: int = 3) -> tuple[list[Entry], list[str]]:
    """The entry per compute capability found in ``rows``, and notes on the rows left out."""
    notes: list[str] = []
    pairs: dict[tuple, dict[str, dict]] = {}
    no_cc = 0
    for row in rows:
        if row.get("impl") not in (TRITON, CUDA) or row.get("status") != "ok" or row.get("timer") != "do_bench":
            continue
        cc = _cc(row.get("cc") or "")
        if cc is None:
            no_cc += 1
            continue
        times = (_float(row.get("fwd_ms")), _float(row.get("fwdbwd_ms")))
        if not all(t > 0 and math.isfinite(t) for t in times):
            continue
        key = (cc, row.get("run_id", ""), *(row.get(k, "") for k in CONFIG_KEYS))
        pairs.setdefault(key, {})[row["impl"]] = row
    if no_cc:
        notes.append(f"{no_cc} timed triton/cuda rows have no compute capability (a CSV without the cc column)")
    # One run per (capability, configuration): autotuned before fixed tiles, then the latest.
    chosen: dict[tuple, dict[str, dict]] = {}
    for (cc, _run_id, *config), pair in sorted(pairs.items(), key=lambda kv: kv[0][1]):
        if len(pair) != 2:
            continue
        key = (cc, *config)
        tuned = "+untuned" not in pair[TRITON].get("preset", "")
        old = chosen.get(key)
        if old is None or tuned or "+untuned" in old[TRITON].get("preset", ""):
            chosen[key] = pair
    by_cc: dict[tuple[int, int], list[dict[str, dict]]] = {}
    for (cc, *_), pair in chosen.items():
        by_cc.setdefault(cc, []).append(pair)
    entries = []
    for cc, cc_pairs in sorted(by_cc.items()):
        fb = [_float(p[CUDA]["fwdbwd_ms"]) / _float(p[TRITON]["fwdbwd_ms"]) for p in cc_pairs]
        fw = [_float(p[CUDA]["fwd_ms"]) / _float(p[TRITON]["fwd_ms"]) for p in cc_pairs]
        g = _geomean(fb)
        if len(cc_pairs) < min_configs:
            order, why = None, f"{len(cc_pairs)} configuration(s), fewer than {min_configs}: no entry"
        elif g < 1 - margin:
            order, why = ("cuda", "triton"), f"cuda faster by {1 - g:.1%} (geometric mean, forward+backward)"
        elif g > 1 + margin:
            order, why = ("triton", "cuda"), f"triton faster by {1 - 1 / g:.1%} (geometric mean, forward+backward)"
        else:
            order, why = ("triton", "cuda"), f"within ±{margin:.0%} (ratio {g:.3f}): triton first, no build needed"
        entries.append(
            Entry(
                cc=cc,
                gpu=", ".join(sorted({p[TRITON].get("gpu", "") for p in cc_pairs})),
                configs=len(cc_pairs),
                runs=sorted({p[TRITON].get("run_id", "") for p in cc_pairs}),
                commits=sorted({p[TRITON].get("commit", "") for p in cc_pairs}),
                tuned=all("+untuned" not in p[TRITON].get("preset", "") for p in cc_pairs),
                fwdbwd=g,
                fwdbwd_min=min(fb),
                fwdbwd_max=max(fb),
                fwd=_geomean(fw),
                order=order,
                why=why,
            )
        )
    return entries, notes


def markdown(entries: Sequence[Entry]) -> str:
    lines = [
        "| cc | gpu | configurations | tuned | cuda/triton fwd+bwd (min–max) | cuda/triton fwd | auto order | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        order = " > ".join(e.order) if e.order else "(default)"
        lines.append(
            f"| {e.cc[0]}.{e.cc[1]} | {e.gpu} | {e.configs} | {'yes' if e.tuned else 'no'} | "
            f"{e.fwdbwd:.3f} ({e.fwdbwd_min:.3f}–{e.fwdbwd_max:.3f}) | {e.fwd:.3f} | {order} | {e.why} |"
        )
    return "\n".join(lines)


def _measured_node(text: str, path: Path) -> ast.AnnAssign:
    for node in ast.parse(text).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "MEASURED":
            return node
    raise ValueError(f"{path}: no `MEASURED: ... = {{...}}` assignment")


def read_table(path: Path | None = None) -> dict[tuple[int, int], dict[str, object]]:
    """The ``MEASURED`` dict of a table module (default: the package's), read without importing it."""
    path = path or TABLE_PATH
    return ast.literal_eval(_measured_node(Path(path).read_text(), path).value)


def _entry_dict(e: Entry) -> dict[str, object]:
    return {
        "order": e.order,
        "gpu": e.gpu,
        "configurations": e.configs,
        "tuned": e.tuned,
        "cuda_over_triton_fwdbwd": round(e.fwdbwd, 4),
        "cuda_over_triton_fwdbwd_range": (round(e.fwdbwd_min, 4), round(e.fwdbwd_max, 4)),
        "cuda_over_triton_fwd": round(e.fwd, 4),
        "runs": ", ".join(e.runs),
        "commits": ", ".join(e.commits),
    }


def _literal(v: object) -> str:
    """A Python literal as ruff format writes it (double quotes)."""
    if isinstance(v, str):
        # Double quotes unless the text holds more of them than of single quotes (fewer escapes).
        return repr(v) if v.count('"') > v.count("'") else json.dumps(v, ensure_ascii=False)
    if isinstance(v, tuple):
        return "(" + ", ".join(map(_literal, v)) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, bool | int | float):
        return repr(v)
    raise TypeError(f"cannot write {type(v).__name__} into the table")


def render_module(measured: dict[tuple[int, int], dict[str, object]], path: Path | None = None) -> str:
    """The text of the table module at ``path`` (default: the package's) with ``measured`` as its MEASURED
    (formatted as ruff format leaves it); the rest of the module is kept as it is."""
    path = path or TABLE_PATH
    text = Path(path).read_text()
    node = _measured_node(text, path)
    lines = text.splitlines(keepends=True)
    if not measured:
        body = "MEASURED: dict[tuple[int, int], dict[str, object]] = {}\n"
    else:
        items = []
        for cc in sorted(measured):
            fields = "".join(f"        {_literal(k)}: {_literal(v)},\n" for k, v in measured[cc].items())
            items.append(f"    {_literal(tuple(cc))}: {{\n{fields}    }},\n")
        body = "MEASURED: dict[tuple[int, int], dict[str, object]] = {\n" + "".join(items) + "}\n"
    return "".join(lines[: node.lineno - 1]) + body + "".join(lines[node.end_lineno :])


def write_table(entries: Sequence[Entry], path: Path | None = None) -> dict[tuple[int, int], dict[str, object]]:
    """Merge the entries that have an order into the table at ``path`` (default: the package's); returns the
    new MEASURED."""
    path = path or TABLE_PATH
    measured = read_table(path)
    for e in entries:
        if e.order is not None:
            measured[e.cc] = _entry_dict(e)
    Path(path).write_text(render_module(measured, path))
    return measured


def main(argv: Sequence[str] | None = None) -> list[Entry]:
    ap = argparse.ArgumentParser(prog="python -m bench.auto_table", description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, nargs="+", help="bench/results/*.csv files (python -m bench.lora_linear)")
    ap.add_argument("--margin", type=float, default=0.02, help="relative win that reorders (default 0.02)")
    ap.add_argument("--min-configs", type=int, default=3, help="configurations needed for an entry (default 3)")
    ap.add_argument("--write", action="store_true", help=f"update {TABLE_PATH.relative_to(TABLE_PATH.parents[1])}")
    args = ap.parse_args(argv)
    if not 0 <= args.margin < 1:
        ap.error(f"--margin must be in [0, 1), got {args.margin}")
    if args.min_configs < 1:
        ap.error(f"--min-configs must be at least 1, got {args.min_configs}")
    rows: list[dict] = []
    for path in args.csv:
        if not path.is_file():
            ap.error(f"{path}: no such file")
        file_rows = read_csv(path)
        if file_rows and "impl" not in file_rows[0]:
            ap.error(f"{path}: not a bench.lora_linear CSV (no impl column)")
        rows += file_rows
    entries, notes = derive(rows, margin=args.margin, min_configs=args.min_configs)
    for note in notes:
        print(f"bench.auto_table: {note}")
    if not entries:
        print(f"bench.auto_table: no configuration with both {TRITON} and {CUDA} timed ok on a GPU")
        return entries
    print(markdown(entries))
    if args.write:
        write_table(entries)
        kept = [e for e in entries if e.order is not None]
        print(f"bench.auto_table: wrote {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} to {TABLE_PATH}")
    return entries


if __name__ == "__main__":
    main()
