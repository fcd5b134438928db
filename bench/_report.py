"""Run metadata, the CSV results file and the markdown table of the LoRA-linear benchmark.

The CSV columns are documented in ``bench/results/README.md``; keep the two in sync.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "COLUMNS",
    "compute_capability",
    "run_metadata",
    "device_slug",
    "write_csv",
    "read_csv",
    "markdown_table",
    "fmt_err",
]

COLUMNS = (
    # run
    "run_id", "date", "gpu", "cc", "commit", "torch", "triton", "peft", "preset", "timer",
    # configuration
    "M", "K", "N", "r", "p", "dtype", "adapter_dtype", "bias", "scaling", "frozen", "copies",
    # row
    "impl", "status",
    "fwd_ms", "fwdbwd_ms", "fwd_ratio", "fwdbwd_ratio", "fwd_tflops", "fwdbwd_tflops", "host_us",
    "saved_mib", "retained_mib", "peak_mib", "rel_err", "sp_fallbacks",
)  # fmt: skip


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # not installed, or broken: the CSV records that instead of failing the run
        return "n/a"


def _git_commit(repo: Path) -> str:
    """Short HEAD commit, with "-dirty" when tracked files differ from it.

    Without git (the device gets a copy of the working tree, no .git): ``$LORA_KERNELS_COMMIT``, else the
    first line of ``<repo>/.device/COMMIT`` (written by scripts/device_prebuild.sh), else "unknown".
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=repo, capture_output=True, timeout=10)
            return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        pass
    env = os.environ.get("LORA_KERNELS_COMMIT", "").strip()
    if env:
        return env
    try:
        lines = (repo / ".device" / "COMMIT").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    return (lines[0].strip() if lines else "") or "unknown"


def compute_capability(device: torch.device) -> str:
    """ "9.0" for an H100/H200, "8.0" for an A100; "" off CUDA (the key of the "auto" table, bench.auto_table)."""
    if device.type != "cuda":
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()}".strip()


def device_slug(name: str) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3" (the results file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def run_metadata(device: torch.device, preset: str) -> dict[str, str]:
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "date": now.isoformat(timespec="seconds"),
        "gpu": device_name(device),
        "cc": compute_capability(device),
        "commit": _git_commit(Path(__file__).resolve().parent.parent),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "preset": preset,
    }


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """Append ``rows`` to ``path`` (header written when new). Returns the file written.

    If an existing file has a different header (columns changed since), the rows go to a new
    file next to it instead of corrupting the old one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(COLUMNS)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            existing = next(csv.reader(f), [])
        if existing != header:
            path = path.with_name(f"{path.stem}-{rows[0]['run_id'] if rows else 'new'}{path.suffix}")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in header})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict, key: str, spec: str) -> str:
    v = row.get(key)
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(float(v), spec)


def fmt_err(v: object) -> str:
    """rel_err for the table and the log: "–" where not measured (p > 0 rows have none)."""
    if v is None or v == "":
        return "–"
    return f"{float(v):.1e}"


def _tiles(t: dict) -> str:
    """128x64x256/8w/3s: BLOCK_M x BLOCK_N x BLOCK_K (those the kernel takes), warps, stages; "/split" for a dX
    config that stores its tiles in column halves at any p (SPLIT_STORE)."""
    dims = "x".join(str(t[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in t)
    return f"{dims}/{t['num_warps']}w/{t['num_stages']}s" + ("/split" if t.get("SPLIT_STORE") else "")


def tuning_lines(log: Sequence[dict]) -> str:
    """The autotuner's timings (``lora_linear.tuning_log()``), a line per tuning key: each config's median µs,
    fastest first, the chosen one starred."""
    out = ["tuned tiles (median µs per config, fastest first; * chosen):"]
    for entry in log:
        key = " ".join(f"{k}={v}" for k, v in entry["key"].items())
        times = sorted(entry["timings"], key=lambda ct: ct[1])
        cells = [f"{_tiles(c)} {'inf' if math.isinf(ms) else f'{ms * 1e3:.0f}'}{'*' if c == entry['best'] else ''}"
                 for c, ms in times]  # fmt: skip
        out.append(f"  {entry['kernel']} [{key}]: " + ", ".join(cells))
    return "\n".join(out)


def write_tuning(log: Sequence[dict], path: Path, base: dict) -> Path:
    """Append the tunings to ``path`` as JSON lines, each with the run's id, commit, GPU and versions."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: base[k] for k in ("run_id", "commit", "gpu", "torch", "triton") if k in base}
    with path.open("a") as f:
        for entry in log:
            f.write(json.dumps({**meta, **entry}, default=str) + "\n")
    return path


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per row; ratios are to cuBLAS of the same configuration and run.

    rel_err (max |y - ref| / max |ref| against an fp32 reference, p = 0 rows only) sits next to the status:
    a fast row is worth nothing if its numbers are wrong (its status then says WRONG).
    """
    lines = [
        "| M × K → N | r | p | impl | fwd ms | fwd+bwd ms | fwd × | fwd+bwd × | TFLOP/s fwd / f+b "
        "| host µs/step | saved MiB | peak MiB | rel_err | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        shape = f"{row['M']} × {row['K']} → {row['N']}"
        tf = f"{_num(row, 'fwd_tflops', '.0f')} / {_num(row, 'fwdbwd_tflops', '.0f')}"
        if row["status"] == "ok" and row.get("fwd_tflops") not in (None, "") and float(row["fwd_tflops"]) < 1:
            tf = f"{_num(row, 'fwd_tflops', '.3f')} / {_num(row, 'fwdbwd_tflops', '.3f')}"  # CPU dry run
        lines.append(
            f"| {shape} | {row['r']} | {row['p']} | {row['impl']} | {_num(row, 'fwd_ms', '.4f')} "
            f"| {_num(row, 'fwdbwd_ms', '.4f')} | {_num(row, 'fwd_ratio', '.3f')} "
            f"| {_num(row, 'fwdbwd_ratio', '.3f')} | {tf} | {_num(row, 'host_us', '.0f')} "
            f"| {_num(row, 'saved_mib', '.4g')} | {_num(row, 'peak_mib', '.1f')} | {fmt_err(row.get('rel_err'))} "
            f"| {row['status']} |"
        )
    return "\n".join(lines)
