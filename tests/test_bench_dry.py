"""The benchmark harness in its --dry mode (tiny fp32 shapes on the CPU), run in-process.

Checks the rows, the CSV columns, the plot and the saved-activation accounting on cases whose
answer is known from the algorithm (no assertion on wall time).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import _impls, _measure, _report, plot
from bench import host_profile as hp
from bench import lora_linear as bench_ll
from lora_kernels import available_backends
from tests._utils import record_meta

ROOT = Path(__file__).resolve().parents[1]

# The dry run is on the CPU: its Triton rows run iff the interpreter is on (tests/conftest.py turns it
# on when there is no GPU); otherwise they must be skipped with the backend's own reason.
TRITON_REASON = available_backends(dtype=torch.float32, device="cpu")["triton"]
# The axolotl row runs where axolotl is installed (CI installs it for tests/test_axolotl.py).
try:
    import axolotl.kernels.lora  # noqa: F401

    AXOLOTL_REASON = None
except ImportError as _e:
    AXOLOTL_REASON = f"axolotl is not installed ({_e})"
# The accounting tests run on the CPU and, where there is one, on the GPU (where the real kernels run).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-dry")
    rows = bench_ll.main(["--dry", "--out", str(out), "--cpu-reps", "2"])
    return out, rows


def test_dry_run_writes_every_row_and_column(dry_run):
    out, rows = dry_run
    csvs = list(out.glob("*.csv"))
    assert [p.name for p in csvs] == [f"{_report.device_slug(rows[0]['gpu'])}.csv"]
    with csvs[0].open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == _report.COLUMNS
        written = list(reader)
    configs = bench_ll.build_configs(bench_ll.parse_args(["--dry"]))
    assert len(configs) == 2
    assert len(written) == len(rows) == len(configs) * len(bench_ll.DRY_IMPLS)
    assert {r["run_id"] for r in written} == {rows[0]["run_id"]}
    for r in written:
        assert (int(r["M"]), int(r["K"]), int(r["N"]), int(r["r"])) == (64, 64, 96, 8)
        assert r["dtype"] == "fp32" and r["timer"] == "perf_counter" and r["preset"] == "dry"
        assert r["torch"] == torch.__version__ and r["commit"] and r["gpu"]
    by = {(r["impl"], float(r["p"])): r for r in written}
    for impl in ("cublas", "naive", "peft", "torch"):
        for p in (0.0, 0.1):
            r = by[(impl, p)]
            assert r["status"] == "ok", r["status"]
            for col in ("fwd_ms", "fwdbwd_ms", "fwd_ratio", "fwdbwd_ratio", "fwd_tflops", "fwdbwd_tflops"):
                assert float(r[col]) > 0, (impl, p, col)
            assert float(r["saved_mib"]) >= 0
            # Allocator statistics exist only on CUDA: empty, not made-up, on the CPU.
            assert r["peak_mib"] == "" and r["retained_mib"] == "" and r["host_us"] == ""
        assert float(by[("cublas", 0.0)]["fwd_ratio"]) == 1.0
    assert bench_ll.exit_status(rows) == 0
    # Every implementation computes the same function at p = 0 (the check the GPU run also records).
    for (impl, p), r in by.items():
        if p == 0.0 and r["status"] == "ok":
            assert float(r["rel_err"]) < 1e-5, (impl, r["rel_err"])
    assert by[("triton-regen", 0.0)]["status"].startswith("skipped: p = 0")
    assert by[("addmm", 0.0)]["status"] == "ok" and by[("addmm", 0.1)]["status"].startswith("skipped: Unsloth")
    for p in (0.0, 0.1):
        if AXOLOTL_REASON is None:
            assert by[("axolotl", p)]["status"] == "ok", by[("axolotl", p)]["status"]
        else:
            assert by[("axolotl", p)]["status"] == f"skipped: {AXOLOTL_REASON}"
    for key in (("triton-bitmask", 0.0), ("triton-bitmask", 0.1), ("triton-regen", 0.1)):
        if TRITON_REASON is None:
            assert by[key]["status"] == "ok", by[key]["status"]
        else:
            assert by[key]["status"] == f"skipped: {TRITON_REASON}"


def test_dry_run_derived_columns_follow_from_the_measurements(dry_run):
    """What the committed GPU table is read by, recomputed from each row's own times: the ratios against
    the same configuration's cublas row, TFLOP/s from the FLOPs of what the row computes (the floor's
    backward is dX only; LoRA rows add the shrink, the expand, dT, dA and dB), the bytes saved beyond x
    (known exactly where the algorithm fixes them), the recorded adapter dtype."""
    _, rows = dry_run
    M, K, N, r = 64, 64, 96, 8
    lora_fwd = 2 * M * N * K + 2 * M * K * r + 2 * M * r * N
    lora_bwd = 2 * M * N * r + 2 * N * M * r + 2 * r * M * K + 2 * M * N * K + 2 * M * r * K
    flops = {"cublas": (2 * M * N * K, 4 * M * N * K)}
    saved = {  # bytes of (impl, p): T = x·Aᵀ is M×r fp32; the bitmask one bit per element of x
        ("cublas", 0.0): 0, ("cublas", 0.1): 0, ("naive", 0.0): M * r * 4,
        ("triton-bitmask", 0.0): M * r * 4, ("triton-bitmask", 0.1): M * r * 4 + M * math.ceil(K / 8),
        ("triton-regen", 0.1): M * r * 4,
        # Axolotl's LoRA_O recomputes x·Aᵀ in backward: nothing beyond x at p = 0
        ("axolotl", 0.0): 0,
    }  # fmt: skip
    checked = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        floor = next(f for f in rows if f["impl"] == "cublas" and f["p"] == row["p"])
        assert row["fwd_ratio"] == pytest.approx(row["fwd_ms"] / floor["fwd_ms"]), row["impl"]
        assert row["fwdbwd_ratio"] == pytest.approx(row["fwdbwd_ms"] / floor["fwdbwd_ms"]), row["impl"]
        fwd, fwdbwd = flops.get(row["impl"], (lora_fwd, lora_fwd + lora_bwd))
        assert row["fwd_tflops"] == pytest.approx(fwd / (row["fwd_ms"] * 1e-3) / 1e12), row["impl"]
        assert row["fwdbwd_tflops"] == pytest.approx(fwdbwd / (row["fwdbwd_ms"] * 1e-3) / 1e12), row["impl"]
        if (row["impl"], row["p"]) in saved:
            assert row["saved_mib"] * 2**20 == saved[(row["impl"], row["p"])], (row["impl"], row["p"])
            checked += 1
        assert row["adapter_dtype"] == "fp32" and row["copies"] > 1
    assert checked >= (6 if TRITON_REASON is None else 3) + (AXOLOTL_REASON is None)
    if AXOLOTL_REASON is None:
        ax, pf = (next(r for r in rows if r["impl"] == i and r["p"] == 0.1) for i in ("axolotl", "peft"))
        # At p > 0 both keep what PEFT's dropout module keeps (the dropped copy of x); PEFT keeps T = x̃·Aᵀ too.
        assert ax["saved_mib"] * 2**20 == pf["saved_mib"] * 2**20 - M * r * 4 > 0


def test_rows_time_every_input_copy_with_cleared_gradients():
    """A row cycles through its input copies (cache-cold inputs on a GPU) and clears every gradient
    before each call, x's included: a gradient accumulating into x.grad would add a kernel to the
    timed backward."""
    prob = _impls.make_problem(16, 32, 24, 4, 0.0, dtype=torch.float32, adapter_dtype=torch.float32,
                               device="cpu", copies=3)  # fmt: skip
    base = _impls.build("torch", prob)
    seen = []

    def fn(x):
        seen.append((next(i for i, c in enumerate(prob.xs) if c is x), x.grad is None, base.owned[1].grad is None))
        return base.fn(x)

    impl = _impls.Impl("torch", fn, base.owned, base.flops_fwd, base.flops_fwdbwd)
    bench_ll.measure(impl, prob, bench_ll.parse_args(["--dry", "--cpu-reps", "4"]), {})
    timed = seen[1:]  # after the untimed first step
    assert {i for i, _, _ in timed} == {0, 1, 2}, seen
    assert all(x_clear and a_clear for _, x_clear, a_clear in seen), seen


def test_status_is_wrong_just_past_the_tolerance():
    tol = bench_ll.rel_err_tolerance(torch.float32)
    assert bench_ll._checked_status({"rel_err": tol}, tol) == "ok"
    assert bench_ll._checked_status({"rel_err": tol * 1.01}, tol).startswith("WRONG")
    assert bench_ll._checked_status({}, tol) == "ok"  # p > 0: nothing to compare


def test_inputs_are_random_everywhere_and_copies_defeat_the_cache():
    """Never zeros (lora_B included, unlike PEFT's init: a zero B would leave the low-rank path's cost in
    the timing but none of its numbers in the rel_err check); enough copies to cover twice the L2."""
    prob = _impls.make_problem(16, 32, 24, 4, 0.1, dtype=torch.float32, adapter_dtype=torch.float32,
                               device="cpu", bias=True, copies=2)  # fmt: skip
    for name in ("weight", "bias", "lora_A", "lora_B"):
        t = getattr(prob, name)
        assert bool((t != 0).all()) and t.std() > 0, name
    assert all(bool((t != 0).all()) for t in prob.xs + prob.dys)
    assert not torch.equal(prob.xs[0], prob.xs[1]) and prob.xs[0] is not prob.xs[1]
    mib = 2**20
    cpu = torch.device("cpu")  # the CPU stands in for a 4 MiB L2: twice that, at most 8 copies
    assert [_impls.num_copies(b, cpu) for b in (mib, 3 * mib, 8 * mib, 64 * mib)] == [8, 3, 1, 1]


def test_measure_counts_what_has_no_plain_storage_and_whole_storages():
    """A saved tensor without a plain storage (sparse) counts its logical size; a saved view of a larger
    tensor keeps, and counts, all of that tensor's storage."""
    x = torch.randn(4, requires_grad=True)
    sparse = torch.eye(4).to_sparse()
    big = torch.randn(100)

    class Saves(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kept):
            ctx.save_for_backward(kept)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2, None

    assert _measure.saved_activation_bytes(lambda: Saves.apply(x, sparse), exclude=[x])[0] == 16 * 4
    assert _measure.saved_activation_bytes(lambda: Saves.apply(x, big[:10]), exclude=[x])[0] == 100 * 4


def test_cpu_timer_reports_milliseconds(monkeypatch):
    """The --dry timer's unit, on a fake clock: each call of fn takes 5 ms."""
    clock = [0.0]

    def fn():
        clock[0] += 0.005

    monkeypatch.setattr(_measure, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    ms, timer = _measure.time_ms(fn, torch.device("cpu"), grad_to_none=[], cpu_reps=3)
    assert (ms, timer) == (pytest.approx(5.0), "perf_counter")


def test_dry_run_plot_and_table(dry_run):
    out, rows = dry_run
    png = out / f"{_report.device_slug(rows[0]['gpu'])}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _report.markdown_table(rows).splitlines()
    assert table[0].startswith("| M × K → N |") and len(table) == 2 + len(rows)
    assert table[0].endswith("| rel_err | status |")
    # Re-plotting from the CSV picks that run and gives the same kind of file.
    again = plot.plot_csv(next(out.glob("*.csv")), out / "again.png")
    assert again is not None and again.read_bytes()[:4] == b"\x89PNG"


def _drawn(monkeypatch) -> list:
    """The figures bench.plot closes, kept open for inspection."""
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    return figs


def test_plot_draws_each_ratio_at_its_configuration_and_the_latest_run(tmp_path, monkeypatch):
    """The PNG committed with the H100 table is read as evidence: each bar is its row's ratio, over its
    own configuration, one bar series per implementation; cublas is the 1.0 line, rows not ok are not
    drawn, the targets are the dashed lines; from a CSV holding several runs, the latest (or --run-id)."""
    pytest.importorskip("matplotlib")
    base = dict(gpu="GPU", dtype="bf16", commit="abc", date="d", K=64, N=32, r=8, p=0.1)

    def row(run, m, impl, fwd, fwdbwd, status="ok"):
        return dict(base, run_id=run, M=m, impl=impl, fwd_ratio=fwd, fwdbwd_ratio=fwdbwd, status=status)

    rows = [
        row("2", 64, "cublas", 1.0, 1.0), row("2", 64, "naive", 1.5, 1.6), row("2", 64, "ours", 1.02, 1.08),
        row("2", 128, "cublas", 1.0, 1.0), row("2", 128, "ours", 1.04, 1.09), row("2", 128, "naive", 1.3, 1.4),
        row("2", 128, "bad", 0.5, 0.5, status="WRONG (rel_err 1e-1 > 8e-3)"),
    ]  # fmt: skip
    older = [row("1", 256, "cublas", 1.0, 1.0), row("1", 256, "naive", 2.5, 2.6)]
    figs = _drawn(monkeypatch)
    assert plot.plot_rows(rows, tmp_path / "a.png") == tmp_path / "a.png"
    fwd_ax, fwdbwd_ax = figs[0].axes
    labels = [t.get_text() for t in fwdbwd_ax.get_xticklabels()]
    assert labels == ["64×64→32\nr=8 p=0.1", "128×64→32\nr=8 p=0.1"]
    for ax, key in ((fwd_ax, "fwd_ratio"), (fwdbwd_ax, "fwdbwd_ratio")):
        bars = {c.get_label(): [round(b.get_height(), 6) for b in c] for c in ax.containers}
        want = {i: [r[key] for r in rows if r["impl"] == i] for i in ("naive", "ours")}
        assert bars == want, (key, bars)
        # each configuration's bars side by side around its tick (0, 1), in implementation order
        xs = [[b.get_x() + b.get_width() / 2 for b in c] for c in ax.containers]
        assert xs == [[pytest.approx(-0.2), pytest.approx(0.8)], [pytest.approx(0.2), pytest.approx(1.2)]], xs
        lines = sorted(round(ln.get_ydata()[0], 6) for ln in ax.get_lines())
        assert lines == [1.0, {"fwd_ratio": 1.05, "fwdbwd_ratio": 1.10}[key]]  # issue 3's targets

    csv_path = tmp_path / "run.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([*older, *rows])  # the older run first in the file
    plot.plot_csv(csv_path)
    assert [t.get_text().split("\n")[0] for t in figs[1].axes[1].get_xticklabels()] == ["64×64→32", "128×64→32"]
    plot.main([str(csv_path), "--run-id", "1", "-o", str(tmp_path / "old.png")])
    assert [t.get_text().split("\n")[0] for t in figs[2].axes[1].get_xticklabels()] == ["256×64→32"]
    assert (tmp_path / "old.png").exists() and csv_path.with_suffix(".png").exists()


def test_plot_and_the_scripts_refuse_bad_arguments_with_a_message(tmp_path):
    """bench.plot on a CSV that is not a benchmark table (an e2e CSV, a header only) and counts of zero
    timed calls: a one-line error, not a traceback (KeyError, StatisticsError, ZeroDivisionError)."""
    from bench import e2e_peft, host_overhead

    e2e = tmp_path / "e2e.csv"
    e2e.write_text("gpu,variant,step_ms\nH100,floor,1.0\n")
    with pytest.raises(SystemExit, match="not a bench.lora_linear results CSV"):
        plot.main([str(e2e)])
    e2e.write_text("gpu,variant,step_ms\n")
    with pytest.raises(SystemExit, match="has no rows"):
        plot.main([str(e2e)])
    with pytest.raises(SystemExit, match="No such file"):
        plot.main([str(tmp_path / "missing.csv")])
    for parse, argv in [(host_overhead.parse_args, ["--reps", "0"]), (e2e_peft.parse_args, ["--steps", "0"])]:
        with pytest.raises(SystemExit) as info:
            parse(argv)
        assert info.value.code == 2


def test_csv_appends_and_never_mixes_headers(tmp_path):
    row = {c: "1" for c in _report.COLUMNS} | {"run_id": "R1", "impl": "cublas", "status": "ok"}
    path = tmp_path / "gpu.csv"
    assert _report.write_csv([row], path) == path
    assert _report.write_csv([row | {"run_id": "R2"}], path) == path
    assert [r["run_id"] for r in _report.read_csv(path)] == ["R1", "R2"]
    old = tmp_path / "old.csv"
    old.write_text("run_id,some_old_column\nR0,1\n")
    moved = _report.write_csv([row], old)
    assert moved != old and _report.read_csv(moved)[0]["run_id"] == "R1"
    assert old.read_text() == "run_id,some_old_column\nR0,1\n"


def test_results_readme_documents_every_column_of_both_csvs():
    """bench/results/README.md is where a reader of a results CSV looks a column up: each table lists exactly
    the columns its writer writes (the e2e list had fallen five columns behind)."""
    from bench import e2e_peft

    text = (ROOT / "bench" / "results" / "README.md").read_text()
    bench_part, e2e_part = text.split("## `e2e_<gpu>.csv`")

    def documented(part: str) -> list[str]:  # the first cell of each table row: `a`, `b` → [a, b]
        cells = [line.split("|")[1] for line in part.splitlines() if line.startswith("| `")]
        return [name for cell in cells for name in re.findall(r"`([A-Za-z_]+)`", cell)]

    assert sorted(documented(bench_part)) == sorted(_report.COLUMNS)
    assert sorted(documented(e2e_part)) == sorted(e2e_peft.CSV_FIELDS)


def test_cli_parsing_and_presets():
    a = bench_ll.parse_args(["--shapes", "4096x14336,14336->4096", "--m", "128", "--ranks", "16,64"])
    assert a.shapes == [(4096, 14336), (14336, 4096)]
    cfgs = bench_ll.build_configs(a)
    assert len(cfgs) == 2 * 1 * 2 * 2 and {c.M for c in cfgs} == {128}
    quick = bench_ll.build_configs(bench_ll.parse_args(["--quick"]))
    assert {(c.M, c.K, c.N) for c in quick} == {(8192, 4096, 4096), (8192, 4096, 14336), (2048, 4096, 4096)}
    assert {c.p for c in quick} == {0.0, 0.1} and len(quick) == 6
    full = bench_ll.build_configs(bench_ll.parse_args([]))
    assert len(full) == 3 * 4 * 2 * 2
    # An axis given on the command line replaces the preset's product, extras (quick's M = 2048) included.
    ranks = bench_ll.build_configs(bench_ll.parse_args(["--quick", "--ranks", "64"]))
    assert {(c.M, c.r) for c in ranks} == {(8192, 64)} and len(ranks) == 4
    with pytest.raises(SystemExit):
        bench_ll.parse_args(["--impls", "cublas,nonsense"])
    with pytest.raises(SystemExit) as info:
        bench_ll.parse_args(["--shapes", "4096x4096,14336"])  # not KxN: argparse's usage error
    assert info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
def test_benchmark_without_a_gpu_says_to_use_dry():
    with pytest.raises(SystemExit, match=r"no CUDA GPU: the benchmark needs one \(use --dry"):
        bench_ll.main(["--quick"])
    with pytest.raises(SystemExit, match="--device cuda but no CUDA GPU is available"):
        bench_ll.main(["--dry", "--device", "cuda"])


# ---- saved-activation accounting on known cases --------------------------------------------------

M, K, N, R = 64, 64, 96, 8


def _saved(name: str, p: float, device: str, dtype=torch.float32, adapter_dtype=None) -> tuple[int, list]:
    prob = _impls.make_problem(
        M, K, N, R, p, dtype=dtype, adapter_dtype=adapter_dtype or dtype, device=device, copies=1
    )
    try:
        impl = _impls.build(name, prob)
    except _impls.Unavailable as e:
        pytest.skip(f"{name} cannot run on {device} here: {e}")
    return _measure.saved_activation_bytes(lambda: impl.fn(prob.xs[0]), exclude=prob.xs + impl.owned)


def test_accounting_counts_unique_storages_and_skips_views_of_x():
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(K, requires_grad=True)

    def forward():
        h = x * 2.0  # a new M×K storage, saved twice below (h * h): counted once
        return (x.reshape(M * K) * w.repeat(M)).sum() + (h * h).sum() + (x.t() * 3.0).sum()

    total, details = _measure.saved_activation_bytes(forward, exclude=[x, w])
    # x.reshape and x.t() are views of x: free. w.repeat(M) is a new storage saved for the
    # gradient of x.reshape(...) * it: M·K floats. h: M·K floats.
    assert total == 2 * M * K * 4, details
    assert _measure.retained_bytes(forward, torch.device("cpu")) is None
    assert _measure.peak_step_bytes(lambda: None, torch.device("cpu")) is None


@pytest.mark.parametrize("device", DEVICES)
def test_naive_saves_only_the_rank_r_product_at_p0(device):
    total, details = _saved("naive", 0.0, device)
    assert total == M * R * 4, details  # T = x·Aᵀ for dB; x itself and the weights are not counted


@pytest.mark.parametrize("device", DEVICES)
def test_naive_saves_a_dropped_copy_of_x_and_a_mask_at_p_positive(device):
    total, details = _saved("naive", 0.1, device)
    dropped_x, t = M * K * 4, M * R * 4
    # The mask is a bool tensor where the fused CUDA dropout runs, a float "noise" tensor on the CPU.
    assert total - dropped_x - t == (M * K if device == "cuda" else M * K * 4), details


@pytest.mark.parametrize("device", DEVICES)
def test_peft_default_saves_an_fp32_copy_of_x(device):
    # fp16 base, fp32 adapters (PEFT's default): x is cast to fp32 before lora_A and that copy is saved.
    total, details = _saved("peft", 0.0, device, dtype=torch.float16, adapter_dtype=torch.float32)
    assert total == M * K * 4 + M * R * 4, details


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,p,extra",
    [
        ("triton-regen", 0.1, 0),  # only T (M×r fp32): the mask is regenerated from the seed
        ("triton-bitmask", 0.1, M * math.ceil(K / 8)),  # T plus one bit per element of x
        ("triton-bitmask", 0.0, 0),  # no dropout, no mask
    ],
)
def test_ours_saves_only_t_and_the_mask_mode(name, p, extra, device):
    total, details = _saved(name, p, device)
    assert total == M * R * 4 + extra, details


@pytest.mark.skipif(not torch.cuda.is_available(), reason="allocator statistics need a CUDA GPU")
def test_retained_and_peak_on_cuda():
    prob = _impls.make_problem(M, K, N, R, 0.1, dtype=torch.float32, adapter_dtype=torch.float32, device="cuda")
    impl = _impls.build("naive", prob)
    dev = torch.device("cuda")
    saved, _ = _measure.saved_activation_bytes(lambda: impl.fn(prob.xs[0]), exclude=prob.xs + impl.owned)
    retained = _measure.retained_bytes(lambda: impl.fn(prob.xs[0]), dev)
    # The caching allocator rounds each block up to 512 bytes; everything saved must show as retained.
    assert saved <= retained <= saved + 8 * 512
    peak = _measure.peak_step_bytes(lambda: impl.fn(prob.xs[0]).backward(prob.dys[0]), dev)
    assert peak >= retained + M * N * 4  # saved activations and y are alive together in the step


def _tma_row_problem(monkeypatch, name: str, p: float, refusal: str) -> _impls.Problem:
    """A problem for a row offered on the TMA path only (fp16 x, fp32 adapters): ``name`` is refused with
    ``refusal`` while TMA is off; then TMA is forced on (the interpreter runs the TMA kernels)."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob = _impls.make_problem(M, K, N, R, p, dtype=torch.float16, adapter_dtype=torch.float32, device="cpu", copies=1)
    monkeypatch.setattr(tri, "TMA_MODE", "0")
    with pytest.raises(_impls.Unavailable, match=refusal):
        _impls.build(name, prob)
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    return prob


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_single_pass_row(monkeypatch):
    """``triton-1pass``: refused with its reason off the TMA path; with TMA forced (interpreter) it
    takes the single-pass forward, saves exactly what ``triton-bitmask`` saves and computes the same."""
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops import single_pass as sp

    prob = _tma_row_problem(monkeypatch, "triton-1pass", 0.1, refusal="TMA path only")
    calls = []
    fwd, bwd = sp.lora_fwd_single_pass, sp.lora_bwd_single_pass
    monkeypatch.setattr(sp, "lora_fwd_single_pass", lambda *a, **k: calls.append("fwd") or fwd(*a, **k))
    monkeypatch.setattr(sp, "lora_bwd_single_pass", lambda *a, **k: calls.append("bwd") or bwd(*a, **k))
    one = _impls.build("triton-1pass", prob)
    total, details = _measure.saved_activation_bytes(lambda: one.fn(prob.xs[0]), exclude=prob.xs + one.owned)
    assert total == M * R * 4 + M * math.ceil(K / 8), details
    assert calls == ["fwd"] and (tri.FWD_MODE, tri.BWD_MODE) == ("two", "two"), "modes must be set per call only"
    one.fn(prob.xs[0]).backward(prob.dys[0])  # the backward follows the forward's mode, set or not
    assert calls == ["fwd", "fwd", "bwd"]
    calls.clear()
    # At p = 0 the rows compute the same function (at p > 0 each call draws a fresh seed).
    prob0 = _impls.make_problem(
        M, K, N, R, 0.0, dtype=torch.float16, adapter_dtype=torch.float32, device="cpu", copies=1
    )
    y1 = _impls.build("triton-1pass", prob0).fn(prob0.xs[0])
    y2 = _impls.build("triton-bitmask", prob0).fn(prob0.xs[0])
    assert calls == ["fwd"]
    torch.testing.assert_close(y1, y2, atol=2e-2, rtol=1e-2)
    # The row reports the device's barrier fallbacks (none here: the interpreter runs the phases).
    assert one.fallbacks is not None and one.fallbacks() == sp.barrier_fallbacks("cpu")
    assert _impls.build("triton-bitmask", prob).fallbacks is None


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_flat_row(monkeypatch):
    """``triton-flat``: refused off the TMA path; on it (TMA forced, interpreter) the row's persistent TMA
    kernels, the backward's dX kernel included, are launched flattened, ``triton-bitmask``'s are not, and
    the switch is restored after the row; both compute the same function (p = 0)."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob = _tma_row_problem(monkeypatch, "triton-flat", 0.0, refusal="TMA kernels only")
    seen = record_meta(monkeypatch, tri, "FLATTEN")
    out = {}
    for name in ("triton-flat", "triton-bitmask"):
        impl = _impls.build(name, prob)
        x = prob.xs[0].detach().requires_grad_()
        with impl.scope():
            y = impl.fn(x)
            y.backward(prob.dys[0])
        out[name] = (y.detach(), x.grad, prob.lora_A.grad.clone())
        prob.lora_A.grad = prob.lora_B.grad = None
        assert tri.TMA_FLATTEN is False
    assert seen == [("_fwd_tma_kernel", True), ("_bwd_dx_tma_kernel", True),
                    ("_fwd_tma_kernel", False), ("_bwd_dx_tma_kernel", False)], seen  # fmt: skip
    for a, b in zip(out["triton-flat"], out["triton-bitmask"], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_w_kn_row(monkeypatch):
    """``triton-kn``: refused off the TMA path; on it (TMA forced, interpreter) the row passes a copy of W stored
    (K, N) as its (N, K) view, so both of its TMA kernels take the W_KN variant, ``triton-bitmask``'s do not,
    and the two compute the same function with the same gradients (p = 0.1, the same seed)."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob = _tma_row_problem(monkeypatch, "triton-kn", 0.1, refusal="TMA path")
    seen = []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        if "W_KN" in meta:
            seen.append((kernel.__name__, meta["W_KN"]))
        real_launch(kernel, grid, args, meta, fixed, wrap)

    monkeypatch.setattr(tri, "_launch", launch)
    out = {}
    for name in ("triton-kn", "triton-bitmask"):
        impl = _impls.build(name, prob)
        w = impl.owned[0]
        assert torch.equal(w, prob.weight) and w.stride() == ((1, N) if name == "triton-kn" else (K, 1))
        x = prob.xs[0].detach().requires_grad_()
        torch.manual_seed(3)  # the row draws its dropout seed per call, as in training
        y = impl.fn(x)
        y.backward(prob.dys[0])
        out[name] = (y.detach(), x.grad, prob.lora_A.grad.clone(), prob.lora_B.grad.clone())
        prob.lora_A.grad = prob.lora_B.grad = None
    assert seen == [("_fwd_tma_kernel", True), ("_bwd_dx_tma_kernel", True),
                    ("_fwd_tma_kernel", False), ("_bwd_dx_tma_kernel", False)], seen  # fmt: skip
    for a, b in zip(out["triton-kn"], out["triton-bitmask"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_row_scope_holds_through_every_backward(monkeypatch):
    """``Impl.scope`` is entered once around all of a row's calls, so a setting the backward reads when
    it runs (cuda-expand's LORA_KERNELS_CUDA_CONCAT_K=0: at p = 0 the dX GEMM reads it) is in force
    there, not only during ``fn``; it is restored afterwards."""
    import contextlib

    prob = _impls.make_problem(
        16, 32, 24, 4, 0.0, dtype=torch.float32, adapter_dtype=torch.float32, device="cpu", copies=1
    )
    base = _impls.build("torch", prob)
    active, seen = [False], []

    @contextlib.contextmanager
    def scope():
        active[0] = True
        yield
        active[0] = False

    def fn(x):
        y = base.fn(x)
        y.register_hook(lambda g: seen.append(active[0]))  # runs in the backward
        return y

    impl = _impls.Impl("torch", fn, base.owned, base.flops_fwd, base.flops_fwdbwd, scope=scope)
    bench_ll.measure(impl, prob, bench_ll.parse_args(["--dry", "--cpu-reps", "2"]), {})
    assert len(seen) > 3 and all(seen) and not active[0]
    # cuda-expand's scope: the variable set inside, restored after (the extension is modelled away).
    monkeypatch.setattr(_impls, "_ours", lambda prob, backend, mode, name: base)
    monkeypatch.setenv("LORA_KERNELS_CUDA_CONCAT_K", "1")
    expand = _impls.build("cuda-expand", prob)
    with expand.scope():
        assert os.environ["LORA_KERNELS_CUDA_CONCAT_K"] == "0"
    assert os.environ["LORA_KERNELS_CUDA_CONCAT_K"] == "1"


def test_cuda_scalar_row(monkeypatch):
    """``cuda-scalar``: refused for fp32 x (the FMA kernels run either way); with 16-bit x ``cuda-bitmask`` with
    LORA_KERNELS_CUDA_VEC_LOADS=0 in its scope only (the extension reads it at every low-rank launch; modelled
    away here)."""
    kw = dict(adapter_dtype=torch.float32, device="cpu", copies=1)
    prob32 = _impls.make_problem(16, 32, 24, 4, 0.1, dtype=torch.float32, **kw)
    with pytest.raises(_impls.Unavailable, match="16-bit x"):
        _impls.build("cuda-scalar", prob32)
    prob = _impls.make_problem(16, 32, 24, 4, 0.1, dtype=torch.bfloat16, **kw)
    base, asked = _impls.build("torch", prob), []
    monkeypatch.setattr(_impls, "_ours", lambda prob, backend, mode, name: asked.append((backend, mode, name)) or base)
    monkeypatch.delenv("LORA_KERNELS_CUDA_VEC_LOADS", raising=False)
    row = _impls.build("cuda-scalar", prob)
    assert asked == [("cuda", "bitmask", "cuda-scalar")] and row.fn is base.fn
    with row.scope():
        assert os.environ["LORA_KERNELS_CUDA_VEC_LOADS"] == "0"
    assert "LORA_KERNELS_CUDA_VEC_LOADS" not in os.environ


def test_row_reports_barrier_fallbacks_of_its_own_calls():
    """``sp_fallbacks``: the increase of the impl's fallback count over the row's calls after the first
    (untimed) step; rows without a barrier have no such column."""
    prob = _impls.make_problem(
        16, 32, 24, 4, 0.0, dtype=torch.float32, adapter_dtype=torch.float32, device="cpu", copies=1
    )
    base = _impls.build("torch", prob)
    calls = []

    def fn(x):
        calls.append(1)
        return base.fn(x)

    args = bench_ll.parse_args(["--dry", "--cpu-reps", "2"])
    # The device's counter does not start at 0: it counts every earlier row's fallbacks too.
    counted = _impls.Impl("torch", fn, base.owned, base.flops_fwd, base.flops_fwdbwd, lambda: len(calls) + 40)
    out = bench_ll.measure(counted, prob, args, {})
    assert out["sp_fallbacks"] == len(calls) - 1 > 0  # every call but the first (untimed) step's
    assert "sp_fallbacks" not in bench_ll.measure(base, prob, args, {})
    assert "sp_fallbacks" in _report.COLUMNS


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_no_split_row(monkeypatch):
    """``triton-nosplit``: refused where the shrink would not split anyway; elsewhere it runs
    ``triton-bitmask`` with LORA_KERNELS_SHRINK_SPLIT_K=1 for its own calls only, computing the same."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob0 = _impls.make_problem(
        M, K, N, R, 0.0, dtype=torch.float16, adapter_dtype=torch.float32, device="cpu", copies=1
    )
    with pytest.raises(_impls.Unavailable, match="does not split"):
        _impls.build("triton-nosplit", prob0)  # the interpreter never splits by itself
    real, seen = tri._shrink_splits, []

    def splits(x):  # as a GPU at this M would: 2 splits unless fixed by the switch
        seen.append(tri.SHRINK_SPLIT_K)
        return 2 if tri.SHRINK_SPLIT_K == "auto" else real(x)

    monkeypatch.setattr(tri, "_shrink_splits", splits)
    y1 = _impls.build("triton-nosplit", prob0).fn(prob0.xs[0])
    assert seen == ["auto", "1"] and tri.SHRINK_SPLIT_K == "auto", seen
    y2 = _impls.build("triton-bitmask", prob0).fn(prob0.xs[0])
    assert seen[-1] == "auto"
    torch.testing.assert_close(y1, y2, atol=2e-2, rtol=1e-2)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_da_separate_row(monkeypatch):
    """``triton-daseparate``: refused off the TMA path; on it (TMA forced, interpreter) the row's dA is a launch
    of its own after the dX kernel, ``triton-bitmask``'s dX kernel holds the dA tiles and no dA launch follows;
    the switch is restored after the row, and both give the same output and gradients (p = 0.1, the same
    seed)."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob = _tma_row_problem(monkeypatch, "triton-daseparate", 0.1, refusal="TMA backward only")
    seen = []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        if "DO_DA" in meta:
            seen.append((kernel.__name__, meta["DO_DA"], meta.get("DO_DX")))
        real_launch(kernel, grid, args, meta, fixed, wrap)

    monkeypatch.setattr(tri, "_launch", launch)
    out = {}
    for name in ("triton-daseparate", "triton-bitmask"):
        impl = _impls.build(name, prob)
        x = prob.xs[0].detach().requires_grad_()
        with impl.scope():
            torch.manual_seed(3)  # the dropout seed each call draws
            y = impl.fn(x)
            y.backward(prob.dys[0])
        out[name] = (y.detach(), x.grad, prob.lora_A.grad.clone(), prob.lora_B.grad.clone())
        prob.lora_A.grad = prob.lora_B.grad = None
        assert tri.BWD_DA == "fused"
    assert seen == [("_bwd_dx_tma_kernel", False, True), ("_bwd_dx_kernel", True, False),
                    ("_bwd_dx_tma_kernel", True, True)], seen  # fmt: skip
    for a, b in zip(out["triton-daseparate"], out["triton-bitmask"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_no_split_m_row(monkeypatch):
    """``triton-nosplitm``: refused where the backward would not split M anyway (the interpreter never does
    by itself); elsewhere ``triton-bitmask`` with LORA_KERNELS_BWD_SPLIT_M=1 for its own calls only: its
    reductions unsplit, ``triton-bitmask``'s split, the same gradients."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob = _impls.make_problem(M, K, N, R, 0.0, dtype=torch.float16, adapter_dtype=torch.float32, device="cpu",
                               copies=1)  # fmt: skip
    with pytest.raises(_impls.Unavailable, match="does not split"):
        _impls.build("triton-nosplitm", prob)
    real, seen = tri._row_splits, []

    def splits(x, blocks):  # as a GPU would at a large M: 3 splits unless fixed by the switch
        seen.append(tri.BWD_SPLIT_M)
        return 3 if tri.BWD_SPLIT_M == "auto" else real(x, blocks)

    monkeypatch.setattr(tri, "_row_splits", splits)
    grads = {}
    for name in ("triton-nosplitm", "triton-bitmask"):
        impl = _impls.build(name, prob)
        seen.clear()
        with impl.scope():
            impl.fn(prob.xs[0]).backward(prob.dys[0])
        assert set(seen) == ({"1"} if name == "triton-nosplitm" else {"auto"}), (name, seen)
        grads[name] = (prob.lora_A.grad.clone(), prob.lora_B.grad.clone())
        prob.lora_A.grad = prob.lora_B.grad = None
    assert tri.BWD_SPLIT_M == "auto"
    for a, b in zip(grads["triton-nosplitm"], grads["triton-bitmask"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _ab_rows(prob, names, seen, want) -> dict:
    """Forward + backward of each row in ``names`` inside its scope, on one dropout seed: ``seen`` (cleared before
    each) must read ``want(name)`` after it. The output and gradients of each row, by name."""
    out = {}
    for name in names:
        impl = _impls.build(name, prob)
        x = prob.xs[0].detach().requires_grad_()
        seen.clear()
        with impl.scope():
            torch.manual_seed(3)  # the dropout seed each call draws
            y = impl.fn(x)
            y.backward(prob.dys[0])
        assert seen == want(name), (name, seen)
        out[name] = (y.detach(), x.grad, prob.lora_A.grad.clone(), prob.lora_B.grad.clone())
        prob.lora_A.grad = prob.lora_B.grad = None
    return out


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_dx128_row(monkeypatch):
    """``triton-dx128``: refused off the TMA path, when autotuned (the tuner picks the tiles) and where the fixed dX
    tiles are 128×128 anyway; elsewhere ``triton-bitmask`` with LORA_KERNELS_DX_WIDE=0 for its own calls only (the
    dX tiles asked for with the switch off, ``triton-bitmask``'s with it on), the same output and gradients."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob = _tma_row_problem(monkeypatch, "triton-dx128", 0.1, refusal="TMA backward")
    with pytest.raises(_impls.Unavailable, match="128×128 here already"):
        _impls.build("triton-dx128", prob)  # M = 64: too few wide tiles for an H100
    monkeypatch.setattr(tri, "AUTOTUNE", True)
    with pytest.raises(_impls.Unavailable, match="autotuned"):
        _impls.build("triton-dx128", prob)
    monkeypatch.setattr(tri, "AUTOTUNE", False)
    monkeypatch.setattr(tri, "_dx_wide", lambda x, r, regenerate=False: tri.DX_WIDE != "0")  # as a GPU at a large M
    real_cfg, seen = tri._tma_cfg, []

    def cfg(x, r, backward, regenerate=False):
        if backward:
            seen.append(tri._dx_wide(x, r, regenerate))
        return real_cfg(x, r, backward, regenerate)

    monkeypatch.setattr(tri, "_tma_cfg", cfg)
    out = _ab_rows(prob, ("triton-dx128", "triton-bitmask"), seen, lambda name: [name == "triton-bitmask"])
    assert tri.DX_WIDE == "auto"
    for a, b in zip(out["triton-dx128"], out["triton-bitmask"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_dy1_row(monkeypatch):
    """``triton-dy1``: refused where one read of dY does not apply (rank > 16); elsewhere ``triton-bitmask`` with
    LORA_KERNELS_DY_PASSES=1 for its own calls only (``_bwd_dy1_kernel`` launched, ``triton-bitmask``'s
    ``_bwd_dy_kernel`` with the switch back), the same output and gradients within fp32 summation order."""
    from lora_kernels.triton_ops import lora_linear as tri

    M, K, N = 67, 64, 72
    wide = _impls.make_problem(M, K, N, 32, 0.1, dtype=torch.float16, adapter_dtype=torch.float32, device="cpu",
                               copies=1)  # fmt: skip
    with pytest.raises(_impls.Unavailable, match="rank ≤ 16"):
        _impls.build("triton-dy1", wide)
    prob = _impls.make_problem(M, K, N, 16, 0.1, dtype=torch.float16, adapter_dtype=torch.float32, device="cpu",
                               copies=1)  # fmt: skip
    real_launch, seen = tri._launch, []

    def launch(kernel, *args, **kwargs):
        if kernel.__name__.startswith("_bwd_dy"):
            seen.append(kernel.__name__)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(tri, "_launch", launch)
    out = _ab_rows(
        prob,
        ("triton-dy1", "triton-bitmask"),
        seen,
        lambda name: [f"_bwd_dy{'1' if name == 'triton-dy1' else ''}_kernel"],
    )
    assert tri.DY_PASSES == "2"
    for a, b in zip(out["triton-dy1"], out["triton-bitmask"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=2e-3)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels unavailable on the CPU: {TRITON_REASON}")
def test_devdesc_row(monkeypatch):
    """``triton-devdesc``: refused off the TMA path; elsewhere ``triton-bitmask`` with LORA_KERNELS_TMA_DESC=device
    for its own calls only (both TMA kernels with in-kernel descriptors, ``triton-bitmask``'s with host ones), the
    same output and gradients bit for bit."""
    from lora_kernels.triton_ops import lora_linear as tri

    prob = _tma_row_problem(monkeypatch, "triton-devdesc", 0.1, refusal="TMA kernels'")
    seen = record_meta(monkeypatch, tri, "DEVICE_DESC")
    tma = ("_fwd_tma_kernel", "_bwd_dx_tma_kernel")
    names = ("triton-devdesc", "triton-bitmask")
    out = _ab_rows(prob, names, seen, lambda name: [(k, name == "triton-devdesc") for k in tma])
    assert tri.TMA_DESC == "host"
    for a, b in zip(out["triton-devdesc"], out["triton-bitmask"], strict=True):
        assert torch.equal(a, b)


def test_compiled_row_needs_a_gpu():
    """``triton-compile`` (torch.compile of our Triton path) is refused on a CPU with its reason: the
    interpreter's kernels cannot be traced."""
    prob = _impls.make_problem(
        M, K, N, R, 0.0, dtype=torch.float32, adapter_dtype=torch.float32, device="cpu", copies=1
    )
    with pytest.raises(_impls.Unavailable, match="needs a GPU"):
        _impls.build("triton-compile", prob)


def test_compile_row_and_a_biased_base_on_the_cpu(tmp_path):
    """The rows the dry run leaves out: ``compile`` (torch.compile of the naive math, inductor's C++ backend on a
    CPU; its GPU rows are item 6 of the runbook) and a base layer with a bias (``--bias``), for naive, peft and
    ours. Every row ok; at p = 0 each computes cuBLAS's row's function with its bias."""
    rows = bench_ll.main(["--dry", "--bias", "--impls", "naive,peft,compile,torch", "--cpu-reps", "1", "--no-plot",
                          "--out", str(tmp_path)])  # fmt: skip
    by = {(r["impl"], r["p"]): r for r in rows}
    assert set(by) == {(i, p) for i in ("cublas", "naive", "peft", "compile", "torch") for p in (0.0, 0.1)}, by
    assert all(r["status"] == "ok" for r in rows), [(k, r["status"]) for k, r in by.items()]
    for impl in ("naive", "peft", "compile", "torch"):
        assert float(by[(impl, 0.0)]["rel_err"]) < 1e-5, (impl, by[(impl, 0.0)]["rel_err"])
    torch._dynamo.reset()


def _ncu_csv(rows) -> str:
    """Text in the layout of ``ncu --csv --page details``: a banner, then one row per (launch, metric)."""
    head = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
            "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]  # fmt: skip
    out = ["==PROF== Connected to process 1", ",".join(f'"{h}"' for h in head)]
    for launch, kernel, section, name, unit, value in rows:
        cells = [launch, "1", "python", "h", kernel, "1", "7", "(256, 1, 1)", "(132, 1, 1)", "0", "9.0",
                 section, name, unit, value]  # fmt: skip
        out.append(",".join(f'"{c}"' for c in cells))
    return "\n".join(out) + "\n"


_SOL, _CLI = "GPU Speed Of Light Throughput", "Command line profiler metrics"
_NCU_CSV = _ncu_csv(
    [
        ("0", "_fwd_kernel", _SOL, "Duration", "usecond", "350.50"),
        ("0", "_fwd_kernel", _SOL, "Compute (SM) Throughput", "%", "80"),
        ("0", "_fwd_kernel", _SOL, "Memory Throughput", "%", "40"),
        ("0", "_fwd_kernel", _CLI, "dram__bytes_read.sum", "Mbyte", "100"),
        ("0", "_fwd_kernel", _CLI, "lts__t_bytes.sum", "Gbyte", "1.5"),
        ("1", "_fwd_kernel", _SOL, "Duration", "msecond", "0.3495"),
        ("1", "_fwd_kernel", _SOL, "Compute (SM) Throughput", "%", "60"),
        ("2", "_shrink_kernel", _SOL, "Duration", "nsecond", "35,000"),
    ]
)


def test_profile_parses_ncu_details_and_summarizes():
    """bench/ncu_profile.py: ncu's --csv --page details rows -> one record per launch (units normalised to µs
    and bytes) -> one table row per (implementation, kernel) with time-weighted percentages."""
    from bench import ncu_profile as profile

    # ncu's own lines may follow the CSV rows (stdout and the report interleave): not launches.
    launches = profile.parse_ncu_csv(_NCU_CSV + "==PROF== Disconnected from process 1\n", "triton-bitmask")
    assert len(launches) == 3
    first = launches[0]
    assert first["time"] == pytest.approx(350.5) and first["dram_read"] == 100e6 and first["l2_bytes"] == 1.5e9
    assert launches[1]["time"] == pytest.approx(349.5) and launches[2]["time"] == pytest.approx(35.0)
    table = profile.summarize(launches, ["triton-bitmask"]).splitlines()
    assert table[2].startswith("| triton-bitmask | _fwd_kernel | 2 | 700.0 | 100.0 | 1500.0 | 70 |")
    assert table[3].startswith("| triton-bitmask | _shrink_kernel | 1 | 35.0 |")


def test_profile_leaves_the_clocks_alone(tmp_path, capsys):
    """The ncu path end to end with a stand-in ncu (records its arguments, prints a details CSV): ncu is
    told not to lock the clocks (its default would change the card's settings), one process per
    implementation re-runs this module as the child, and the table is built from what ncu printed."""
    from bench import ncu_profile as profile

    (tmp_path / "ncu.csv").write_text(_NCU_CSV)
    fake = tmp_path / "ncu"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/argv\ncat {tmp_path}/ncu.csv\n')
    fake.chmod(0o755)
    assert profile.main(["--ncu", str(fake), "--impls", "cublas,triton-bitmask", "--shape", "64,32,48,4"]) == 0
    calls = (tmp_path / "argv").read_text().splitlines()
    assert len(calls) == 2
    for call, impl in zip(calls, ("cublas", "triton-bitmask"), strict=True):
        assert call.startswith("--clock-control none --profile-from-start off "), call
        assert f"-m bench.ncu_profile --child --impls {impl} --shape 64,32,48,4" in call
    table = capsys.readouterr().out
    assert "| cublas | _fwd_kernel | 2 | 700.0 |" in table and "| triton-bitmask | _shrink_kernel | 1 |" in table


def test_profile_keeps_going_past_a_failing_implementation(tmp_path, capsys):
    """One implementation whose ncu run fails (a kernel error, ncu refusing) does not lose the others'
    counters: each implementation's rows print as it ends, and the exit status says something failed."""
    from bench import ncu_profile as profile

    (tmp_path / "ncu.csv").write_text(_NCU_CSV)
    fake = tmp_path / "ncu"
    fail_cublas = 'case "$*" in *"--impls cublas "*) echo boom >&2; exit 3;; esac'
    fake.write_text(f"#!/bin/sh\n{fail_cublas}\ncat {tmp_path}/ncu.csv\n")
    fake.chmod(0o755)
    argv = ["--ncu", str(fake), "--impls", "cublas,triton-bitmask,naive", "--shape", "64,32,48,4"]
    assert profile.main(argv) == 1
    captured = capsys.readouterr()
    assert "boom" in captured.err and "ncu failed for cublas" in captured.err
    out = captured.out.splitlines()
    assert sum(line.startswith("| impl |") for line in out) == 1  # one header over all implementations
    assert any(line.startswith("| triton-bitmask | _fwd_kernel | 2 |") for line in out)
    assert any(line.startswith("| naive | _shrink_kernel | 1 |") for line in out)


def test_profile_keeps_kernels_with_a_common_prefix_apart():
    """CUTLASS GEMMs' names share their first ~100 characters: two kernels are two rows, not one."""
    from bench import ncu_profile as profile

    stem = "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int, int>, "
    launches = [
        {"impl": "cuda-bitmask", "kernel": stem + "A>", "time": 300.0},
        {"impl": "cuda-bitmask", "kernel": stem + "B>", "time": 100.0},
        {"impl": "cuda-bitmask", "kernel": stem + "A>", "time": 300.0},
    ]
    rows = profile.summarize(launches, ["cuda-bitmask"]).splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith(f"| cuda-bitmask | {stem[:60]} | 2 | 600.0 |")
    assert rows[1].startswith(f"| cuda-bitmask | {stem[:60]} #2 | 1 | 100.0 |")


def test_profile_dry_runs_the_steps():
    from bench import ncu_profile as profile

    assert profile.main(["--dry", "--impls", "cublas,naive", "--shape", "16,32,24,4", "--dtype", "fp32",
                         "--adapter-dtype", "same", "--steps", "1"]) == 0  # fmt: skip


def test_budget_stops_between_configurations(tmp_path, monkeypatch):
    """--budget-s: a time-limited run (the device's gpu-check) starts no configuration that would end
    past the budget, and still returns, writes and tabulates the rows it has."""
    calls = []

    def fake_run_config(cfg, impl_names, args, device, base, tag):
        calls.append(cfg)
        clock[0] += 10.0  # each configuration "takes" 10 s
        return [dict(base, M=cfg.M, K=cfg.K, N=cfg.N, r=cfg.r, p=cfg.p, impl="cublas", status="ok")]

    clock = [0.0]
    monkeypatch.setattr(bench_ll, "run_config", fake_run_config)
    monkeypatch.setattr(bench_ll.time, "perf_counter", lambda: clock[0])
    argv = ["--dry", "--out", str(tmp_path), "--m", "64,65,66,67", "--dropout", "0", "--no-plot"]
    rows = bench_ll.main([*argv, "--budget-s", "25"])  # 2 done (20 s), a third would end at 30 s
    assert [c.M for c in calls] == [64, 65] and len(rows) == 2
    assert len(_report.read_csv(next(tmp_path.glob("*.csv")))) == 2
    calls.clear()
    assert len(bench_ll.main([*argv, "--no-csv"])) == 4 and len(calls) == 4  # no budget: all of them


def test_host_overhead_runs_the_real_launch_path_without_a_gpu():
    """bench.host_overhead times the eager Triton path under compile_only (every launch binds its
    arguments and finds its kernel, none runs) and the CUDA backend's Python layer over a stubbed
    extension, eager and through the ops, and a patched PEFT layer over that stub; the tuned TMA path through
    Triton's Autotuner and through the configs it chose (real Autotuners pruned to one config; the run
    itself asserts that the chosen rows took the chosen path); the path down to the launcher
    (``record_launches``) through Triton's run, through the launch cache, replayed from launch plans and from
    call plans, those also through Triton's runner and passing tensors (two-launch TMA and pointer, single-pass):
    forty rows of positive figures, nothing asserted on time."""
    pytest.importorskip("triton")
    pytest.importorskip("peft", reason="the PEFT layer rows need peft")
    from bench import host_overhead

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.host_overhead", "--reps", "3", "--warmup", "1"],
                          cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "µs" not in line]
    recorded = {f"{path}, {how}" for path, _ in host_overhead.RECORDED_PATHS
                for how in host_overhead.RECORDED_ROWS}  # fmt: skip
    assert len(recorded) == 24 and "single-pass, to the launcher: call plans" in recorded
    assert "two-launch, TMA, to the launcher: call plans, Triton's runner" in recorded
    assert "two-launch, TMA, to the launcher: call plans, pointers as tensors" in recorded
    assert "two-launch, TMA, in-kernel descriptors, to the launcher: call plans" in recorded
    assert len(rows) == 40 and {r[0].strip() for r in rows} == {
        "two-launch, TMA", "two-launch, pointer (K = 250)", "single-pass", *host_overhead.TUNED_ROWS, *recorded,
        "cuda layer, eager (direct)", "cuda layer, through the ops", "peft layer, patched (cuda layer)",
    }, proc.stdout  # fmt: skip
    # Positive figures only: with 3 repetitions on a loaded CI machine even forward+backward > forward
    # does not hold (a CI run measured the single-pass row at 507 µs forward, 444 µs both).
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows), proc.stdout


_HOST_PROFILE = r"""
import json, torch
from bench import host_profile as hp
from lora_kernels.triton_ops.compile_only import compile_only
with compile_only(lambda c: None):
    rows, stats = hp.profile_steps((64, 256, 256, 16), 0.1, 3, torch.device("cpu"), single_pass=True)
from lora_kernels.triton_ops import launch, lora_linear as tri
after = [launch.FAST_LAUNCH, launch.PLANS, launch.CALLS, launch.DIRECT_RUN, launch.POINTER_INTS, tri.TMA_DESC,
         tri.FWD_MODE, tri.BWD_MODE]
print(json.dumps({"rows": rows, "areas": hp.area_totals(stats), "after": after}))
"""


def test_host_profile_counts_launches_and_sorts_time_by_area():
    """bench.host_profile (the GPU machine's own host measurement) on the CPU under compile_only: the step
    rows for cuBLAS and the Triton backend (launch cache, launch plans and call plans on; call plans off; launch
    plans off; the cache off; every launch through Triton's runner; call plans passing tensors; in-kernel TMA
    descriptors: the A/Bs, each switch set for its whole row and restored after; the
    single-pass kernels), one step's Triton launches (four: the backward's sums of its row splits are inside them;
    three single-pass), the CUDA backend's row (here saying why it cannot run), and the cProfile summed by area.
    Without a GPU the command itself exits 2."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", _HOST_PROFILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (cublas, _, _, none), (triton_, f_us, fb_us, launched), *ab, single, cuda = out["rows"]
    calls_off, plans_off, cache_off, runner, tensors, devdesc = ab
    # Each row's switches were set for the row (the single-pass row's launches below), and are back as they were.
    assert out["after"] == [True, True, True, True, True, "host", "two", "two"], out["after"]
    assert cublas == "cublas F.linear" and none is None and triton_ == "triton" and f_us > 0 and fb_us > 0
    assert launched == ["_shrink_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel", "_bwd_dx_tma_kernel"], launched
    for row, name in (
        (calls_off, "triton, call plans off"),
        (plans_off, "triton, launch plans off"),
        (cache_off, "triton, launch cache off"),
        (runner, "triton, Triton's runner"),
        (tensors, "triton, pointers as tensors"),
        (devdesc, "triton, in-kernel descriptors"),
    ):
        assert row[0] == name and row[3] == launched and row[1] > 0 and row[2] > 0, row
    assert single[0] == "triton, single-pass" and single[1] > 0 and single[2] > 0, single
    # (dA: the pointer dX kernel's dA programs, a launch of their own after the single-pass backward)
    assert single[3] == ["_fwd_single_pass_kernel", "_bwd_single_pass_kernel", "_bwd_dx_kernel"], single
    # No extension or GPU here: the CUDA row is there, saying why it has no figures.
    assert cuda[0] == "cuda" and cuda[1] is None and cuda[3].startswith("unavailable: "), cuda
    assert out["areas"]["lora_kernels"] > 0 and out["areas"]["triton runtime"] > 0, out["areas"]
    proc = subprocess.run([sys.executable, "-m", "bench.host_profile"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stderr
    # The calibration rows (their kernels interpreted on the CPU here).
    code = ("import json, torch; from bench import host_profile as hp; "
            "print(json.dumps(hp._calibration(2, torch.device('cpu'))))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calib = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert len(calib) == 7, calib
    pointers = [name for name, us in calib.items() if us is None]
    assert [name.split(":")[0] for name in pointers] == ["launcher alone, 16 pointers as tensors",
                                                         "launcher alone, 16 pointers as ints"], calib  # fmt: skip
    assert all("interpreter" in name for name in pointers), pointers
    assert all(us > 0 for us in calib.values() if us is not None), calib
    # The launcher-alone rows where there is a compiled kernel: here the sm_90 compile with a recording launcher,
    # which sees the tensors, then their addresses as ints.
    code = ("import json, torch; from bench import host_profile as hp; "
            "from lora_kernels.triton_ops.compile_only import record_launches\n"
            "seen = []\n"
            "with record_launches(seen.append):\n"
            "    rows = hp._pointer_rows(3, torch.device('cpu'))\n"
            "kinds = sorted({tuple(type(a).__name__ for a in l.args[:16]) for l in seen})\n"
            "print(json.dumps([rows, kinds, len(seen)]))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows, kinds, n = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r[0] for r in rows] == ["launcher alone, 16 pointers as tensors", "launcher alone, 16 pointers as ints"]
    assert all(r[1] > 0 for r in rows), rows
    assert kinds == [["Tensor"] * 16, ["int"] * 16] and n == 1 + 2 * (3 + 10), (kinds, n)


def test_host_profile_rows_survive_a_failing_row(monkeypatch):
    """A step row that raises (a path that never ran on a GPU) becomes an error row and the rows after it still run;
    each row is reported as it ends (the device step prints it then, so a step stopped at its limit keeps it); with
    the triton row itself failing there is no cProfile, and the table says why."""
    import torch

    def ok():
        return torch.ones(2)

    def boom():
        raise RuntimeError("a path that never ran\nits second line")

    steps = [("cublas F.linear", ok, ok, []), ("triton", ok, ok, []), ("triton, broken", ok, boom, []),
             ("triton, after", ok, ok, []), ("cuda", "no extension here")]  # fmt: skip
    monkeypatch.setattr(hp, "_steps", lambda *a, **k: list(steps))
    reported = []
    rows, stats = hp.profile_steps((1, 1, 1, 1), 0.0, 2, torch.device("cpu"), report=reported.append)
    assert [r[0] for r in rows] == [s[0] for s in steps] and reported == rows
    assert rows[2] == ("triton, broken", None, None, "error: RuntimeError: a path that never ran"), rows[2]
    assert rows[3][1] > 0 and rows[3][2] > 0 and rows[3][3] == [], rows[3]
    assert rows[4] == ("cuda", None, None, "unavailable: no extension here") and stats is not None
    assert hp._step_line(rows[2]) == "| triton, broken | – | – | error: RuntimeError: a path that never ran |"
    assert hp._step_line(rows[3]).startswith("| triton, after | ")
    steps[1] = ("triton", ok, boom, [])
    rows, stats = hp.profile_steps((1, 1, 1, 1), 0.0, 2, torch.device("cpu"))
    assert rows[1][3].startswith("error: RuntimeError") and stats is None


# ---- a first GPU run: partial results survive, faults and wrong numbers show ---------------------


def test_dry_command_runs_the_triton_rows(tmp_path):
    """`python -m bench.lora_linear --dry` (make bench-dry) in a fresh process: the Triton interpreter is on
    before triton is imported (bench/__init__.py), so no row errors and the command exits 0."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command must turn it on
    proc = subprocess.run([sys.executable, "-m", "bench.lora_linear", "--dry", "--cpu-reps", "1", "--no-plot",
                           "--out", str(tmp_path)], cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()[2:]]
    assert len(rows) == 2 * len(bench_ll.DRY_IMPLS), proc.stdout
    status = {(r[3], r[2]): r[-1] for r in rows}
    assert all(s == "ok" or s.startswith("skipped") for s in status.values()), proc.stdout
    assert status[("triton-bitmask", "0.0")] == status[("triton-regen", "0.1")] == "ok", proc.stdout


def _fake_measure(plan: dict[tuple[int, str], object]):
    """A stand-in for bench_ll.measure (fast, no timing): what row (call number, impl) returns or raises."""
    calls: list[tuple[int, str]] = []

    def measure(impl, prob, args, refs):
        calls.append((len(calls), impl.name))
        action = plan.get(calls[-1], 0.0)
        if isinstance(action, BaseException):
            raise action
        if callable(action):
            action()
            action = 0.0
        out = {"fwd_ms": 1.0, "fwdbwd_ms": 2.0, "saved_mib": 0.0, "timer": "perf_counter"}
        return out | ({"rel_err": action} if prob.p == 0.0 else {})

    return measure, calls


# Two configurations (p = 0, p = 0.1) of three rows each, nothing plotted.
_ARGV = ["--dry", "--impls", "cublas,naive,torch", "--no-plot"]


def test_rows_reach_the_csv_as_each_configuration_ends(tmp_path, monkeypatch):
    seen = []
    measure, _ = _fake_measure({(3, "cublas"): lambda: seen.append(_report.read_csv(next(tmp_path.glob("*.csv"))))})
    monkeypatch.setattr(bench_ll, "measure", measure)
    rows = bench_ll.main([*_ARGV, "--out", str(tmp_path)])
    assert [len(s) for s in seen] == [3]  # the first configuration was on disk while the second ran
    assert [r["impl"] for r in _report.read_csv(next(tmp_path.glob("*.csv")))] == ["cublas", "naive", "torch"] * 2
    assert bench_ll.exit_status(rows) == 0
    # Beside a CSV of older columns, every configuration's rows go to the one new file, under one header.
    old = next(tmp_path.glob("*.csv"))
    old.write_text("run_id,some_old_column\nR0,1\n")
    rows = bench_ll.main([*_ARGV, "--out", str(tmp_path)])
    new = [p for p in tmp_path.glob("*.csv") if p != old]
    assert [p.name for p in new] == [f"{old.stem}-{rows[0]['run_id']}.csv"]
    assert len(_report.read_csv(new[0])) == 6 and old.read_text() == "run_id,some_old_column\nR0,1\n"


@pytest.mark.parametrize("how,code", [("sigterm", 143), ("ctrl-c", 130)])
def test_interrupt_keeps_what_ran(how, code, tmp_path, monkeypatch, capsys):
    """SIGTERM (what `timeout` sends) or Ctrl-C in the second configuration: the first configuration's rows
    and the second's finished row are in the CSV and the table, the rest "not run", and the exit is 128 + signal."""
    import signal

    stop = (lambda: os.kill(os.getpid(), signal.SIGTERM)) if how == "sigterm" else KeyboardInterrupt()
    measure, calls = _fake_measure({(4, "naive"): stop})
    monkeypatch.setattr(bench_ll, "measure", measure)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        bench_ll.main([*_ARGV, "--out", str(tmp_path)])
    assert exc.value.code == code and len(calls) == 5
    assert signal.getsignal(signal.SIGTERM) is before  # main's handler is gone again
    written = _report.read_csv(next(tmp_path.glob("*.csv")))
    assert [(r["p"], r["impl"], r["status"]) for r in written][2:] == [
        ("0", "torch", "ok"), ("0.1", "cublas", "ok"), ("0.1", "naive", "not run: interrupted"),
        ("0.1", "torch", "not run: interrupted")]  # fmt: skip
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 6 and table[-1].endswith("| not run: interrupted |")


def test_lost_cuda_context_marks_the_rest_not_run(tmp_path, monkeypatch):
    """A fault that poisons the CUDA context: its row records the error, every later row (this configuration
    and the next) is "not run" with that error, nothing more is measured, and the exit status is 1."""
    fault = RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")
    measure, calls = _fake_measure({(1, "naive"): fault})
    monkeypatch.setattr(bench_ll, "measure", measure)
    rows = bench_ll.main([*_ARGV, "--out", str(tmp_path)])
    assert len(calls) == 2
    error = "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert [r["status"] for r in rows] == ["ok", f"error: {error}"] + [f"not run: CUDA context lost ({error})"] * 4
    assert [r["status"] for r in _report.read_csv(next(tmp_path.glob("*.csv")))] == [r["status"] for r in rows]
    assert bench_ll.exit_status(rows) == 1
    # Any other error is that row's alone.
    measure, calls = _fake_measure({(1, "naive"): ValueError("bad shape")})
    monkeypatch.setattr(bench_ll, "measure", measure)
    rows = bench_ll.main([*_ARGV, "--out", str(tmp_path), "--no-csv"])
    assert len(calls) == 6 and [r["status"] for r in rows].count("ok") == 5


def test_cuda_fault_detection_and_guarded_empty_cache(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(bench_ll, "_cuda_usable", lambda device: False)
    assert bench_ll._context_lost(RuntimeError("CUDA error: unspecified launch failure"), cuda)
    assert bench_ll._context_lost(RuntimeError("Triton Error [CUDA]: misaligned address"), cuda)
    assert not bench_ll._context_lost(ValueError("CUDA error"), cuda)
    if hasattr(torch, "AcceleratorError"):
        assert bench_ll._context_lost(torch.AcceleratorError("anything"), cuda)
    # An error of that kind that left the context usable (a bad launch configuration) stops nothing.
    monkeypatch.setattr(bench_ll, "_cuda_usable", lambda device: True)
    assert not bench_ll._context_lost(RuntimeError("CUDA error: invalid configuration argument"), cuda)

    def empty_cache():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    bench_ll._empty_cache(cuda)  # raises nothing: the row's own error is the one to keep


def test_wrong_numbers_are_not_ok(tmp_path, monkeypatch, capsys):
    """A row off its reference beyond the dtype's tolerance is "WRONG (...)" in the CSV and the table (which
    shows rel_err), keeps its timings, and makes the exit status 1."""
    assert bench_ll.rel_err_tolerance(torch.bfloat16) == pytest.approx(6e-2)
    assert bench_ll.rel_err_tolerance(torch.float16, torch.float32) == pytest.approx(8e-3)
    assert bench_ll.rel_err_tolerance(torch.float32) == pytest.approx(1e-4)
    measure, _ = _fake_measure({(1, "naive"): 0.25, (2, "torch"): float("nan")})
    monkeypatch.setattr(bench_ll, "measure", measure)
    rows = bench_ll.main([*_ARGV, "--out", str(tmp_path)])
    assert [r["status"] for r in rows[:3]] == ["ok", "WRONG (rel_err 2.50e-01 > 1e-04)", "WRONG (rel_err nan > 1e-04)"]
    assert rows[1]["fwd_ratio"] == 1.0 and bench_ll.exit_status(rows) == 1
    table = capsys.readouterr().out.splitlines()
    assert table[3].endswith("| 2.5e-01 | WRONG (rel_err 2.50e-01 > 1e-04) |"), table[3]
    assert table[5].endswith("| – | ok |"), table[5]  # p > 0: no reference, no rel_err


def test_table_columns_and_csv_values(tmp_path):
    """Each table cell sits under its own header (a row with distinct values in every column); the table
    reads back rows from the CSV, where unmeasured values are empty (NaN is written empty too)."""
    row = {c: "" for c in _report.COLUMNS} | dict(
        M=64, K=32, N=96, r=8, p=0.0, impl="naive", status="ok", fwd_ms=1.5, fwdbwd_ms=4.5, fwd_ratio=1.25,
        fwdbwd_ratio=1.75, fwd_tflops=300.0, fwdbwd_tflops=200.0, host_us=42.0, saved_mib=6.5, peak_mib=99.0,
        rel_err=0.002, retained_mib=float("nan"),
    )  # fmt: skip
    head, _, line = _report.markdown_table([row]).splitlines()
    names, values = ([c.strip() for c in t.split("|")[1:-1]] for t in (head, line))
    cells = dict(zip(names, values, strict=True))
    assert cells == {
        "M × K → N": "64 × 32 → 96", "r": "8", "p": "0.0", "impl": "naive", "fwd ms": "1.5000",
        "fwd+bwd ms": "4.5000", "fwd ×": "1.250", "fwd+bwd ×": "1.750", "TFLOP/s fwd / f+b": "300 / 200",
        "host µs/step": "42", "saved MiB": "6.5", "peak MiB": "99.0", "rel_err": "2.0e-03", "status": "ok",
    }  # fmt: skip
    path = _report.write_csv([row | {"p": 0.1, "rel_err": None}], tmp_path / "gpu.csv")
    (back,) = _report.read_csv(path)
    assert back["retained_mib"] == "" and back["rel_err"] == "" and back["fwd_ratio"] == "1.25"
    assert _report.markdown_table([back]).splitlines()[2].endswith("| 99.0 | – | ok |")
    assert _report.device_slug(" NVIDIA H100 80GB HBM3 (MIG 1g.10gb) ") == "nvidia-h100-80gb-hbm3-mig-1g-10gb"


def test_commit_marks_a_modified_tree_dirty(tmp_path, monkeypatch):
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(k, raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.txt").write_text("one\n")
    subprocess.run([*git, "-C", str(tmp_path), "add", "f.txt"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-q", "-m", "c"], check=True)
    clean = _report._git_commit(tmp_path)
    assert len(clean) == 12 and not clean.endswith("-dirty"), clean
    (tmp_path / "f.txt").write_text("two\n")
    assert _report._git_commit(tmp_path) == clean + "-dirty"


def test_commit_without_git(tmp_path, monkeypatch):
    """The device's copy of the tree has no .git: the commit comes from $LORA_KERNELS_COMMIT, else from
    .device/COMMIT (scripts/device_prebuild.sh writes it), else it is "unknown"."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path either
    monkeypatch.delenv("LORA_KERNELS_COMMIT", raising=False)
    assert _report._git_commit(tmp_path) == "unknown"
    (tmp_path / ".device").mkdir()
    (tmp_path / ".device" / "COMMIT").write_text("0123456789ab-dirty\nwritten by device_prebuild.sh\n")
    assert _report._git_commit(tmp_path) == "0123456789ab-dirty"
    monkeypatch.setenv("LORA_KERNELS_COMMIT", "fedcba987654")
    assert _report._git_commit(tmp_path) == "fedcba987654"
    assert _report._git_commit(ROOT) not in ("unknown", "fedcba987654")  # git, where there is one, comes first


def test_no_bench_module_shadows_the_standard_library():
    """`python bench/e2e_peft.py` puts bench/ first on sys.path: a bench/profile.py hid the standard library's
    `profile` (which cProfile imports) from everything it imports."""
    shadowing = {p.stem for p in (ROOT / "bench").glob("*.py")} & set(sys.stdlib_module_names)
    assert not shadowing, shadowing


@pytest.mark.parametrize("frozen", ["A", "B", "AB"])
def test_frozen_adapter_matrices_take_no_gradient_in_any_row(frozen):
    """``--frozen``: every implementation freezes the same adapter matrices (PEFT's layer included) and
    still trains x; the FLOP count drops by what the reference no longer computes."""
    M, K, N, r = 64, 64, 96, 8
    prob = _impls.make_problem(M, K, N, r, 0.1, dtype=torch.float32, adapter_dtype=torch.float32,
                               device="cpu", copies=1, frozen=frozen)  # fmt: skip
    trained = _impls.make_problem(M, K, N, r, 0.1, dtype=torch.float32, adapter_dtype=torch.float32,
                                  device="cpu", copies=1)  # fmt: skip
    saved = ("A" in frozen) * 2 * r * M * K + ("B" in frozen) * 2 * N * M * r
    assert prob.lora_flops_fwdbwd == trained.lora_flops_fwdbwd - saved
    ran = []
    for name in bench_ll.DRY_IMPLS:
        if name == "cublas":
            continue
        try:
            impl = _impls.build(name, prob)
        except _impls.Unavailable:
            continue
        x = prob.xs[0]
        x.grad = None
        impl.fn(x).backward(prob.dys[0])
        assert x.grad is not None, name
        a_like = [t for t in impl.owned if t.shape == (r, K)]
        b_like = [t for t in impl.owned if t.shape == (N, r)]
        assert len(a_like) == len(b_like) == 1, name
        assert (a_like[0].grad is None) == ("A" in frozen), name
        assert (b_like[0].grad is None) == ("B" in frozen), name
        ran.append(name)
    assert {"naive", "peft", "torch"} <= set(ran), ran


def test_frozen_option_is_recorded(tmp_path):
    rows = bench_ll.main(["--dry", "--out", str(tmp_path), "--cpu-reps", "1", "--frozen", "A", "--impls", "naive,torch",
                          "--no-plot"])  # fmt: skip
    assert rows and {r["frozen"] for r in rows} == {"A"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    (csv_path,) = tmp_path.glob("*.csv")
    assert {r["frozen"] for r in _report.read_csv(csv_path)} == {"A"}
    with pytest.raises(ValueError, match="frozen must be"):
        _impls.make_problem(8, 8, 8, 2, 0.0, dtype=torch.float32, adapter_dtype=torch.float32, device="cpu",
                            frozen="x")  # fmt: skip


def test_kernel_times_reads_the_device_events_of_a_trace():
    """bench/kernel_times.py: a Chrome trace's kernel, memset and memcpy events (name, µs), not its host
    events; the table per kernel (launches and µs per step, share of the step) and the sum per step
    against the step's wall time."""
    from bench import kernel_times as kt

    trace = {
        "traceEvents": [
            {"cat": "cpu_op", "name": "aten::mm", "dur": 900.0},
            {"cat": "kernel", "name": "_fwd_tma_kernel", "dur": 350.0},
            {"cat": "kernel", "name": "_fwd_tma_kernel", "dur": 340.0},
            {"cat": "gpu_memset", "name": "Memset (Device)", "dur": 2.0},
            {"cat": "kernel", "name": "_shrink_kernel", "dur": 30.0},
            {"cat": "ac2g", "name": "flow"},  # flow events have no duration
        ]
    }
    events = kt.kernel_events(trace)
    assert events == [("_fwd_tma_kernel", 350.0), ("_fwd_tma_kernel", 340.0), ("Memset (Device)", 2.0),
                      ("_shrink_kernel", 30.0)]  # fmt: skip
    row = {"shape": (8192, 4096, 4096, 16), "impl": "triton-bitmask", "p": 0.1, "wall_us": 400.0, "events": events}
    table = kt.summarize([row], steps=2)
    lines = table.splitlines()
    head = "| 8192 × 4096 → 4096, 16 | triton-bitmask | 0.1 |"
    assert lines[2] == f"{head} `_fwd_tma_kernel` | 1 | 345.0 | 86% |"
    assert lines[3] == f"{head} `_shrink_kernel` | 0.5 | 15.0 | 4% |"
    assert lines[4] == f"{head} `Memset (Device)` | 0.5 | 1.0 | 0% |"
    assert lines[5] == f"{head} **all kernels / step wall time** | 2 | 361.0 / 400.0 | 90% |"
    long = "void cutlass::device_kernel<" + "x" * 100 + ">"
    row = {"shape": (1, 2, 3, 4), "impl": "cuda-bitmask", "p": 0.0, "wall_us": 10.0, "events": [(long, 5.0)]}
    assert f"`{long[:67]}...`" in kt.summarize([row], 1)


def test_kernel_times_runs_the_steps_on_a_gpu(capsys):
    """The whole tool on a small problem: a row per kernel and a total per implementation and p; without
    a CUDA GPU it says so and returns 2 (torch.profiler's CPU trace has no kernels to time)."""
    from bench import kernel_times as kt

    argv = ["--impls", "cublas,naive", "--shape", "256,128,192,8", "--shape", "67,203,130,1", "-p", "0.1",
            "--steps", "2", "--warmup", "1"]  # fmt: skip
    rc = kt.main(argv)
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert rc == 2 and "needs a CUDA GPU" in out
        return
    assert rc == 0
    totals = [line for line in out.splitlines() if "all kernels / step wall time" in line]
    assert [line.split(" | ")[0:3] for line in totals] == [
        [f"| {shape}", impl, "0.1"]
        for shape in ("256 × 128 → 192, 8", "67 × 203 → 130, 1")
        for impl in ("cublas", "naive")
    ]
    assert sum(line.startswith("| M × K → N, r | impl |") for line in out.splitlines()) == 1
