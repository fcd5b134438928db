"""bench.auto_table: backend="auto"'s order per compute capability, derived from benchmark CSVs.

The rows are synthetic (no GPU here): they have the columns ``bench.lora_linear`` writes, and the checks
follow the rule the module states (pairs from one run, one run per configuration, tuned before untuned,
the geometric mean against a margin), then the written table as the package imports it.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench import _report, auto_table
from lora_kernels import _auto_table, backends

SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (4096, 14336, 4096), (16384, 8192, 8192)]


def _rows(cc, cuda_over_triton, run_id="20261205T100000Z", preset="quick", gpu="NVIDIA H100 80GB HBM3", p=0.1):
    """cublas, triton-bitmask and cuda-bitmask rows of one run, one configuration per ratio."""
    rows = []
    for (M, K, N), ratio in zip(SHAPES * 3, cuda_over_triton, strict=False):
        base = dict(run_id=run_id, gpu=gpu, cc=cc, commit="abc123", preset=preset, timer="do_bench", M=str(M),
                    K=str(K), N=str(N), r="16", p=str(p), dtype="bf16", adapter_dtype="fp32", bias="0",
                    scaling="2", frozen="none", status="ok")  # fmt: skip
        t = 1.0 + M * K * N / 1e12  # any positive times; only the ratios matter
        rows.append(dict(base, impl="cublas", fwd_ms=str(t / 1.1), fwdbwd_ms=str(t)))
        rows.append(dict(base, impl="triton-bitmask", fwd_ms=str(t / 2), fwdbwd_ms=str(t)))
        rows.append(dict(base, impl="cuda-bitmask", fwd_ms=str(t / 2 * ratio**0.5), fwdbwd_ms=str(t * ratio)))
    return rows


def _by_cc(entries):
    return {e.cc: e for e in entries}


def test_the_faster_backend_by_geometric_mean_comes_first():
    rows = (
        _rows("9.0", [0.85, 0.95, 0.90, 1.02])  # cuda wins overall though not on every shape
        + _rows("8.0", [1.10, 1.20, 1.05])
        + _rows("8.9", [0.99, 1.01, 1.005])  # within ±2 %
        + _rows("12.0", [0.5, 0.5])  # too few configurations
    )
    entries = _by_cc(auto_table.derive(rows)[0])
    h = entries[(9, 0)]
    assert h.order == ("cuda", "triton") and h.configs == 4 and h.tuned
    assert h.fwdbwd == pytest.approx(math.prod([0.85, 0.95, 0.90, 1.02]) ** 0.25)
    assert (h.fwdbwd_min, h.fwdbwd_max) == pytest.approx((0.85, 1.02))
    assert h.fwd == pytest.approx(h.fwdbwd**0.5)  # the forward ratio is its own column
    assert h.gpu == "NVIDIA H100 80GB HBM3" and h.runs == ["20261205T100000Z"] and h.commits == ["abc123"]
    assert "cuda faster by" in h.why
    assert entries[(8, 0)].order == ("triton", "cuda") and "triton faster by" in entries[(8, 0)].why
    assert entries[(8, 9)].order == ("triton", "cuda") and "within" in entries[(8, 9)].why
    assert entries[(12, 0)].order is None and "fewer than 3" in entries[(12, 0)].why
    # A margin wider than cuda's win keeps Triton first; fewer configurations needed give 12.0 an entry.
    wide = _by_cc(auto_table.derive(rows, margin=0.2, min_configs=2)[0])
    assert wide[(9, 0)].order == ("triton", "cuda") and wide[(12, 0)].order == ("cuda", "triton")


def test_only_timed_pairs_of_one_run_count():
    good = _rows("9.0", [0.8, 0.8, 0.8])
    noise = []
    # The other half of a pair in another run, a failed row, a dry (CPU-timed) run, a row without cc.
    for r in _rows("9.0", [0.1], run_id="20261205T110000Z"):
        if r["impl"] != "triton-bitmask":
            noise.append(r)
    noise += [dict(r, status="error: boom") for r in _rows("9.0", [0.1], run_id="20261205T120000Z")]
    noise += [dict(r, timer="perf_counter") for r in _rows("9.0", [0.1], run_id="20261205T130000Z")]
    noise += [dict(r, fwdbwd_ms="nan") for r in _rows("9.0", [0.1], run_id="20261205T140000Z")]
    noise += [dict(r, cc="") for r in _rows("9.0", [0.1], run_id="20261205T150000Z")]
    entries, notes = auto_table.derive(good + noise)
    (e,) = entries
    assert e.configs == 3 and e.fwdbwd == pytest.approx(0.8) and e.runs == ["20261205T100000Z"]
    assert notes == ["2 timed triton/cuda rows have no compute capability (a CSV without the cc column)"]


def test_one_run_per_configuration_tuned_first_then_latest():
    old_tuned = _rows("9.0", [0.8] * 3, run_id="20261205T100000Z")
    new_untuned = _rows("9.0", [1.3] * 3, run_id="20261206T100000Z", preset="quick+untuned")
    (e,) = auto_table.derive(old_tuned + new_untuned)[0]
    assert e.fwdbwd == pytest.approx(0.8) and e.tuned and e.order == ("cuda", "triton")
    newer_tuned = _rows("9.0", [1.25] * 3, run_id="20261207T100000Z")
    (e,) = auto_table.derive(new_untuned + newer_tuned + old_tuned)[0]  # file order does not matter
    assert e.fwdbwd == pytest.approx(1.25) and e.runs == ["20261207T100000Z"] and e.order == ("triton", "cuda")
    (e,) = auto_table.derive(new_untuned)[0]
    assert not e.tuned and e.fwdbwd == pytest.approx(1.3)
    # A configuration that differs in p is another configuration, not another run of the same one.
    (e,) = auto_table.derive(old_tuned + _rows("9.0", [1.0] * 3, p=0.0))[0]
    assert e.configs == 6 and e.tuned
    # Tuned only if every configuration's pair is.
    (e,) = auto_table.derive(old_tuned + _rows("9.0", [1.0] * 3, p=0.0, preset="quick+untuned"))[0]
    assert e.configs == 6 and not e.tuned


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "_auto_table.py"
    shutil.copy(auto_table.TABLE_PATH, path)
    return path


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"auto_table_{abs(hash(path.read_text()))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ruff_format_check(path: Path) -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed here: the format check of the written table needs it")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([ruff, "format", "--check", "--config", str(root / "pyproject.toml"), str(path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_written_table_merges_imports_and_is_formatted(table):
    assert auto_table.read_table(table) == _auto_table.MEASURED
    first = auto_table.derive(_rows("9.0", [0.9] * 4) + _rows("12.0", [0.5]))[0]
    measured = auto_table.write_table(first, table)
    assert set(measured) == {(9, 0)}, "an entry without an order is not written"
    mod = _import(table)
    assert mod.AUTO_ORDER == {(9, 0): ("cuda", "triton")} and mod.MEASURED == measured
    m = mod.MEASURED[(9, 0)]
    assert m["configurations"] == 4 and m["cuda_over_triton_fwdbwd"] == pytest.approx(0.9)
    assert m["runs"] == "20261205T100000Z" and m["gpu"] == "NVIDIA H100 80GB HBM3" and m["tuned"] is True
    # Another capability is added; a new measurement of 9.0 replaces its entry; the docstring stays.
    auto_table.write_table(auto_table.derive(_rows("8.0", [1.2] * 3, gpu='NVIDIA A100 "SXM4"'))[0], table)
    auto_table.write_table(auto_table.derive(_rows("9.0", [1.1] * 3, run_id="20261208T000000Z"))[0], table)
    mod = _import(table)
    assert mod.AUTO_ORDER == {(8, 0): ("triton", "cuda"), (9, 0): ("triton", "cuda")}
    assert mod.MEASURED[(9, 0)]["runs"] == "20261208T000000Z" and mod.MEASURED[(8, 0)]["gpu"] == 'NVIDIA A100 "SXM4"'
    assert mod.__doc__ == _auto_table.__doc__
    # Rendering what is there gives the same text (the writer's format is stable).
    assert auto_table.render_module(auto_table.read_table(table), table) == table.read_text()


def test_written_table_passes_ruff_format(table):
    """CI runs `ruff format --check` over lora_kernels/: a table written from real rows must pass it (GPU
    names with quotes included)."""
    auto_table.write_table(auto_table.derive(_rows("9.0", [0.9] * 4))[0], table)
    auto_table.write_table(auto_table.derive(_rows("8.0", [1.2] * 3, gpu='NVIDIA A100 "SXM4"'))[0], table)
    _ruff_format_check(table)


def test_the_committed_table_is_what_backends_use():
    measured = auto_table.read_table()
    assert measured == _auto_table.MEASURED
    assert auto_table.render_module(measured) == auto_table.TABLE_PATH.read_text(), "edited by hand?"
    assert backends._AUTO_ORDER == _auto_table.AUTO_ORDER
    for cc, order in _auto_table.AUTO_ORDER.items():
        assert isinstance(cc, tuple) and len(cc) == 2 and sorted(order) == ["cuda", "triton"]


@pytest.mark.parametrize(("cc", "expected"), [((9, 0), "cuda"), ((8, 0), "triton"), ((8, 6), "triton")])
def test_auto_follows_the_table_for_the_device_capability(monkeypatch, cc, expected):
    monkeypatch.setattr(backends, "_AUTO_ORDER", {(9, 0): ("cuda", "triton"), (8, 0): ("triton", "cuda")})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(backends, "_unavailable", lambda name, *a, **k: None)  # both backends can run
    with FakeTensorMode():
        x = torch.empty(4, 16, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(8, 16, device="cuda", dtype=torch.bfloat16)
    assert backends.resolved_backend("auto", x, w, w) == expected
    # The winner unavailable for these tensors: the next in the order.
    monkeypatch.setattr(backends, "_unavailable", lambda name, *a, **k: "no" if name == expected else None)
    assert backends.resolved_backend("auto", x, w, w) == {"cuda": "triton", "triton": "cuda"}[expected]


def test_cli_prints_the_table_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    csv_path = tmp_path / "gpu.csv"
    _report.write_csv(_rows("9.0", [0.9] * 3), csv_path)
    table = tmp_path / "_auto_table.py"
    shutil.copy(auto_table.TABLE_PATH, table)  # the shipped table, measured entries included
    monkeypatch.setattr(auto_table, "TABLE_PATH", table)
    shipped = auto_table.read_table(table)
    (e,) = auto_table.main([str(csv_path)])
    out = capsys.readouterr().out
    assert "| 9.0 | NVIDIA H100 80GB HBM3 | 3 | yes | 0.900 (0.900–0.900) |" in out and "cuda > triton" in out
    assert auto_table.read_table(table) == shipped, "nothing written without --write"
    auto_table.main([str(csv_path), "--write"])
    assert "wrote 1 entry" in capsys.readouterr().out and _import(table).AUTO_ORDER == {(9, 0): ("cuda", "triton")}
    # A dry run's CSV (CPU-timed, no cc) gives nothing to order.
    dry = tmp_path / "dry.csv"
    _report.write_csv([dict(r, timer="perf_counter", cc="") for r in _rows("9.0", [0.9])], dry)
    assert auto_table.main([str(dry)]) == []
    assert "no configuration with both triton-bitmask and cuda-bitmask" in capsys.readouterr().out
    e2e = tmp_path / "e2e.csv"
    e2e.write_text("gpu,variant\nx,floor\n")
    bad = [
        ([str(e2e)], "no impl column"),
        ([str(tmp_path / "none.csv")], "no such file"),
        ([str(csv_path), "--margin", "1"], "--margin must be in [0, 1)"),
        ([str(csv_path), "--min-configs", "0"], "--min-configs must be at least 1"),
    ]
    for argv, msg in bad:
        with pytest.raises(SystemExit):
            auto_table.main(argv)
        assert msg in capsys.readouterr().err


def test_rows_carry_the_compute_capability(monkeypatch):
    assert _report.compute_capability(torch.device("cpu")) == ""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    meta = _report.run_metadata(torch.device("cuda"), "quick")
    assert meta["cc"] == "9.0" and meta["gpu"] == "NVIDIA H200"
    assert "cc" in _report.COLUMNS and _report.COLUMNS.index("cc") == _report.COLUMNS.index("gpu") + 1


def test_device_capability_is_read_once_per_gpu(monkeypatch):
    """backends.device_capability (the eager path asks up to three times a call) reads each GPU's
    capability once; a stand-in for torch's function gets its own entries (tests patch it), and a device
    without an index (the current one, which can change) is read every time."""
    calls = []

    def hopper(device=None):
        calls.append(device)
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", hopper)
    for _ in range(3):
        assert backends.device_capability(torch.device("cuda", 0)) == (9, 0)
    assert backends.device_capability(torch.device("cuda", 1)) == (9, 0)
    assert len(calls) == 2
    backends.device_capability(torch.device("cuda"))
    backends.device_capability(torch.device("cuda"))
    assert len(calls) == 4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert backends.device_capability(torch.device("cuda", 0)) == (8, 0)
