"""The ``verify`` / ``demo`` command line (lora_kernels/verify.py, lora_kernels/__main__.py).

The checker is itself tested against deliberately broken backends: a verifier that cannot fail
proves nothing.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lora_kernels import backends, verify
from lora_kernels.__main__ import main
from lora_kernels.reference import dropout_draws, dropout_keep_mask, dropout_threshold, lora_linear_ref, pack_mask
from tests._utils import HAS_CUDA, TOL, requires_gpu

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if HAS_CUDA else "cpu"
FAKE = "lk_fake_backend_for_tests"


def test_tolerance_table_is_the_test_table():
    assert verify.TOLERANCES == TOL
    assert verify.tol_for(torch.bfloat16, torch.float32) == TOL[torch.bfloat16]


def test_compare_uses_the_scale_of_the_reference():
    ref = torch.tensor([100.0, -50.0, 0.0], dtype=torch.float64)
    atol, rtol = TOL[torch.float32]
    bound = atol * 100.0 + rtol * 100.0
    ok = verify.compare(ref + torch.tensor([0.0, 0.0, 0.9 * bound], dtype=torch.float64), ref, [torch.float32])
    bad = verify.compare(ref + torch.tensor([0.0, 0.0, 1.1 * bound], dtype=torch.float64), ref, [torch.float32])
    assert ok.ok and not bad.ok
    assert bad.frac == pytest.approx(1.1) and bad.rel == pytest.approx(1.1 * bound / 100.0)
    assert not verify.compare(torch.full((3,), float("nan")), ref, [torch.float32]).ok
    assert not verify.compare(ref[:2], ref, [torch.float32]).ok
    assert verify.compare(torch.empty(0, 4), torch.empty(0, 4, dtype=torch.float64), [torch.float16]).ok


def _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
    return lora_linear_ref(x, weight, lora_A, lora_B, bias, lora_bias, scaling, p, True, seed)


@pytest.fixture
def fake_backend(monkeypatch):
    """Install a module as the "cuda" backend: its ``lora_linear_2d`` can be swapped per test."""
    mod = types.ModuleType(FAKE)
    mod.unavailable_reason = lambda x, weight, lora_A: None
    mod.lora_linear_2d = _ref_2d
    monkeypatch.setitem(sys.modules, FAKE, mod)
    monkeypatch.setitem(backends._MODULES, "cuda", FAKE)
    return mod


def _args(*argv: str):
    import argparse

    ap = argparse.ArgumentParser()
    verify.add_verify_args(ap)
    return ap.parse_args(["--no-progress", "--device", DEVICE, *argv])


def test_correct_backend_passes_every_check(fake_backend):
    case = verify.Case("cuda", "fp32", 37, 45, 29, 5, p=0.3, mask_mode="regenerate")
    res = verify.run_case(case, DEVICE)
    assert res.status == "pass", res.reason
    assert set(res.checks) == {"out", "dx", "dA", "dB", "dlora_bias"}
    mask = verify.run_mask_check("cuda", "fp16", DEVICE, 0.3, "bitmask")
    pb = verify.boundary_p(verify._PROBE_SEED, mask.M, mask.K, 0.3)
    assert mask.status == "pass" and mask.mismatches == {"forward": 0, "backward": 0, f"threshold p={pb:.6f}": 0}


def test_wrong_dropout_mask_is_caught_by_output_and_probe(fake_backend):
    def wrong_seed(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed + 1, mask_mode)

    fake_backend.lora_linear_2d = wrong_seed
    at_p0 = verify.run_case(verify.Case("cuda", "fp32", 40, 48, 24, 4, p=0.0), DEVICE)
    assert at_p0.status == "pass", "p = 0 has no mask: the wrong seed must not matter"
    res = verify.run_case(verify.Case("cuda", "fp32", 40, 48, 24, 4, p=0.1), DEVICE)
    assert res.status == "fail" and "out err" in res.reason
    # In bf16 one flipped bit can hide inside the tolerance; the probe reads the mask exactly.
    mask = verify.run_mask_check("cuda", "bf16", DEVICE, 0.1, "bitmask")
    assert mask.status == "fail"
    assert mask.mismatches["forward"] > 0 and mask.mismatches["backward"] > 0


def test_mask_probe_runs_the_configured_adapter_dtype(fake_backend):
    """The "bf16+fp32a" config is other kernel variants than "bf16" (fp32 adapter tiles): its mask probe
    must run those, with fp32 adapters, not the bf16 ones again."""
    seen = []

    def spy(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        seen.append((x.dtype, lora_A.dtype, lora_B.dtype))
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode)

    fake_backend.lora_linear_2d = spy
    mask = verify.run_mask_check("cuda", "fp16+fp32a", DEVICE, 0.1, "bitmask")
    assert mask.status == "pass", mask.reason
    assert seen and set(seen) == {(torch.float16, torch.float32, torch.float32)}


def _keep_above_threshold(seed, M, K, p, device):
    """A kernel's classic slip: keep iff u > threshold (the definition keeps u == threshold)."""
    return dropout_draws(seed, M, K, device) > dropout_threshold(p)


def test_threshold_off_by_one_is_caught(fake_backend):
    """``>`` for ``>=`` differs only where a draw equals the threshold: probability 2⁻¹⁶ per element, none
    in the CPU probe at p = 0.1, so verify also checks at a p whose threshold is one of the probe's draws.
    The CPU probe's size on every device: the GPU's (1000 × 203) happens to hold one tie at p = 0.1."""
    M, K = verify.probe_size("cpu")
    thr = dropout_threshold(0.1)
    assert not (dropout_draws(verify._PROBE_SEED, M, K, DEVICE) == thr).any(), "the probe at p itself sees no tie"
    pb = verify.boundary_p(verify._PROBE_SEED, M, K, 0.1)
    assert 0 < pb < 1 and (dropout_draws(verify._PROBE_SEED, M, K, DEVICE) == dropout_threshold(pb)).any()
    assert abs(pb - 0.1) < 0.01

    def off_by_one(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        keep = _keep_above_threshold(seed, x.shape[0], x.shape[1], p, x.device)
        h = x * keep.to(x.dtype) / (1.0 - p)
        return torch.nn.functional.linear(x, weight, bias) + scaling * torch.nn.functional.linear(
            torch.nn.functional.linear(h, lora_A), lora_B, lora_bias
        )

    fake_backend.lora_linear_2d = off_by_one
    mask = verify.run_mask_check("cuda", "fp32", DEVICE, 0.1, "bitmask", M=M, K=K)
    assert mask.status == "fail" and mask.mismatches["forward"] == 0, mask.mismatches
    assert mask.mismatches[f"threshold p={pb:.6f}"] > 0 and "threshold p=" in mask.reason
    # The module's own mask function (Triton's dropout_bitmask) with the same slip.
    fake_backend.lora_linear_2d = _ref_2d
    fake_backend.dropout_bitmask = lambda seed, M, K, p, device: pack_mask(_keep_above_threshold(seed, M, K, p, device))
    mask = verify.run_mask_check("cuda", "fp32", DEVICE, 0.1, "bitmask", M=M, K=K)
    assert mask.status == "fail" and mask.mismatches["module_bitmask"] == 0
    assert mask.mismatches[f"threshold p={pb:.6f}"] > 0


def _with_wrong_grad(t: torch.Tensor, wrong) -> torch.Tensor:
    """``t`` unchanged forward; its incoming gradient g replaced by ``wrong(g)`` (a backward-only bug)."""

    class _WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return wrong(g)

    return _WrongGrad.apply(t)


def test_backward_only_bug_is_caught(fake_backend):
    def bad(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        lb = _with_wrong_grad(lora_bias, torch.zeros_like)
        return _ref_2d(x, weight, bias, lora_A, lora_B, lb, scaling, p, seed, mask_mode)

    fake_backend.lora_linear_2d = bad
    res = verify.run_case(verify.Case("cuda", "fp32", 16, 24, 8, 2, p=0.0), DEVICE)
    assert res.status == "fail"
    assert res.checks["out"].ok and res.checks["dx"].ok and not res.checks["dlora_bias"].ok


def test_output_of_another_dtype_fails(fake_backend):
    """Right numbers in the wrong dtype (an fp32 y for fp16 x) break the contract: the case fails."""

    def fp32_out(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode).float()

    fake_backend.lora_linear_2d = fp32_out
    res = verify.run_case(verify.Case("cuda", "fp16", 16, 24, 8, 2, p=0.0), DEVICE)
    assert res.status == "fail" and "output dtype torch.float32" in res.reason, res.reason


def test_backward_only_mask_bug_is_caught_by_the_probe(fake_backend):
    """A backward that applies another mask than its forward (rows of dX swapped here): the probe's forward
    count stays 0, its backward count does not."""

    def bad(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        x = _with_wrong_grad(x, lambda g: g.flip(0))
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode)

    fake_backend.lora_linear_2d = bad
    mask = verify.run_mask_check("cuda", "fp32", DEVICE, 0.1, "bitmask")
    assert mask.status == "fail" and mask.mismatches["forward"] == 0 and mask.mismatches["backward"] > 0


def test_each_mask_mode_is_run_and_a_mask_failure_fails_the_sweep(fake_backend, tmp_path):
    """p > 0 cases run in both mask modes, each really in its mode: a backend wrong only in "regenerate"
    fails those cases. A mask that differs only in the module's own mask function (the kernels right)
    fails the sweep too."""
    modes = []

    def regen_wrong(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        modes.append(mask_mode)
        seed = seed + 1 if mask_mode == "regenerate" else seed
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode)

    fake_backend.lora_linear_2d = regen_wrong
    out = io.StringIO()
    argv = ["--backend", "cuda", "--dtype", "fp32", "--only-shapes", "--shape", "9,16,8,2", "-p", "0", "-p", "0.1"]
    assert verify.run_verify(_args(*argv), out=out, err=io.StringIO()) == 1
    failed = [line for line in out.getvalue().splitlines() if line.startswith("FAILED")]
    assert "FAILED cuda fp32 9x16->8 r=2 p=0.1 regenerate: fail: out err" in "\n".join(failed), failed
    assert not any("bitmask" in line for line in failed), failed
    assert {"bitmask", "regenerate"} <= set(modes)

    fake_backend.lora_linear_2d = _ref_2d
    fake_backend.dropout_bitmask = lambda seed, M, K, p, device: pack_mask(
        dropout_keep_mask(seed ^ 1, M, K, p, device=device)
    )
    out = io.StringIO()
    assert verify.run_verify(_args(*argv), out=out, err=io.StringIO()) == 1
    text = out.getvalue()
    assert "FAILED mask cuda fp32 p=0.1" in text and not any(
        line.startswith("FAILED cuda") for line in text.splitlines()
    ), text
    # What each device sweeps by default: every dtype configuration, bf16 included (the interpreter
    # upcasts bf16 after each load), and the reference in fp64 / fp32 on the CPU.
    assert verify.default_dtypes("cpu", "triton") == verify.default_dtypes("cuda", "cuda") == list(verify._GPU_DTYPES)
    assert verify.default_dtypes("cpu", "torch") == ["fp64", "fp32"]


def test_partial_gradient_cases_check_what_is_trained(fake_backend):
    """Each TRAIN_SETS case compares exactly the trained leaves' gradients (dbias when the base bias
    trains), and a bug on a partial path, invisible to the all-trained case, fails it."""
    for train, leaves in verify.TRAIN_SETS.items():
        res = verify.run_case(verify.Case("cuda", "fp32", 16, 24, 8, 2, p=0.2, train=train), DEVICE)
        assert res.status == "pass", (train, res.reason)
        want = {g for g, leaf in verify._GRAD_OF.items() if leaf in leaves}
        assert set(res.checks) == {"out", *want}, train

    def bad(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        # Wrong only when the base bias trains and lora_A does not (a broken LoRA-FA + bias path).
        if bias is not None and bias.requires_grad and not lora_A.requires_grad:
            bias = _with_wrong_grad(bias, lambda g: g / 2)
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode)

    fake_backend.lora_linear_2d = bad
    assert verify.run_case(verify.Case("cuda", "fp32", 16, 24, 8, 2, p=0.2), DEVICE).status == "pass"
    res = verify.run_case(verify.Case("cuda", "fp32", 16, 24, 8, 2, p=0.2, train="fa+bias"), DEVICE)
    assert res.status == "fail" and not res.checks["dbias"].ok and res.checks["dB"].ok, res.reason
    assert "train=fa+bias" in res.case.label


def test_sweep_holds_the_partial_gradient_cases(fake_backend, tmp_path):
    path = tmp_path / "v.json"
    argv = ["--backend", "cuda", "--dtype", "fp32", "-p", "0", "-p", "0.1", "--json", str(path)]
    assert verify.run_verify(_args(*argv), out=io.StringIO(), err=io.StringIO()) == 0
    cases = [r for r in json.loads(path.read_text())["results"] if r.get("kind") == "case"]
    partial = [r for r in cases if r["train"] != "all"]
    assert sorted(r["train"] for r in partial) == sorted(t for t in verify.TRAIN_SETS if t != "all")
    assert all(r["p"] == 0.1 and r["status"] == "pass" for r in partial), partial
    # ... and one case with the weight stored (K, N), at the same shape and p.
    kn = [r for r in cases if r["weight_layout"] == "kn"]
    assert [(r["train"], r["p"], r["status"], r["M"]) for r in kn] == [("all", 0.1, "pass", partial[0]["M"])], kn
    # --only-shapes leaves them out unless --partial asks (the GPU short plan does): at the second shape.
    only = [*argv, "--only-shapes", "--shape", "9,16,8,2", "--shape", "11,24,16,4"]
    for extra, want in (([], []), (["--partial"], [[11, 24, 16, 4]] * len(verify.TRAIN_SETS))):
        assert verify.run_verify(_args(*only, *extra), out=io.StringIO(), err=io.StringIO()) == 0
        cases = [r for r in json.loads(path.read_text())["results"] if r.get("kind") == "case"]
        extras = [r for r in cases if r["train"] != "all" or r["weight_layout"] != "nk"]
        assert [[r["M"], r["K"], r["N"], r["r"]] for r in extras] == want, extra


def test_weight_stored_k_by_n_case_catches_a_backend_that_ignores_the_weight_s_strides(fake_backend):
    """The (K, N)-stored weight case hands the backend the (N, K) view with strides (1, N), as GPT-2's Conv1D
    layers do; a backend that reads the weight as if it were row-major passes every (N, K) case and fails it."""
    seen = []

    def row_major_only(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        seen.append(weight.stride())
        weight = weight.as_strided(weight.shape, (weight.shape[1], 1))  # the bug: strides assumed
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode)

    fake_backend.lora_linear_2d = row_major_only
    assert verify.run_case(verify.Case("cuda", "fp32", 16, 24, 8, 2, p=0.2), DEVICE).status == "pass"
    res = verify.run_case(verify.Case("cuda", "fp32", 16, 24, 8, 2, p=0.2, weight_layout="kn"), DEVICE)
    assert seen == [(24, 1), (1, 8)], seen
    assert res.status == "fail" and not res.checks["out"].ok and res.case.label.endswith(" W(K,N)"), res.reason
    fake_backend.lora_linear_2d = _ref_2d
    assert (
        verify.run_case(verify.Case("cuda", "fp32", 16, 24, 8, 2, p=0.2, weight_layout="kn"), DEVICE).status == "pass"
    )


def test_module_mask_function_is_compared_bit_for_bit(fake_backend):
    fake_backend.dropout_bitmask = lambda seed, M, K, p, device: pack_mask(
        dropout_keep_mask(seed, M, K, p, device=device)
    )
    good = verify.run_mask_check("cuda", "fp32", DEVICE, 0.25, "regenerate")
    assert good.status == "pass" and good.mismatches["module_bitmask"] == 0
    fake_backend.dropout_bitmask = lambda seed, M, K, p, device: pack_mask(
        dropout_keep_mask(seed ^ 1, M, K, p, device=device)
    )
    bad = verify.run_mask_check("cuda", "fp32", DEVICE, 0.25, "regenerate")
    assert bad.status == "fail" and bad.mismatches["module_bitmask"] > 0
    assert bad.mismatches["forward"] == 0, "the kernels themselves were right: only the module mask differs"


def test_crash_is_an_error_not_a_pass(fake_backend):
    def crash(*args):
        raise RuntimeError("illegal memory access (simulated)")

    fake_backend.lora_linear_2d = crash
    res = verify.run_case(verify.Case("cuda", "fp16", 8, 16, 8, 2, p=0.1), DEVICE)
    assert res.status == "error" and "illegal memory access" in res.reason


def test_cli_fails_with_nonzero_exit_and_lists_failures(fake_backend, tmp_path):
    def no_scaling(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, 1.0, p, seed, mask_mode)

    fake_backend.lora_linear_2d = no_scaling
    out = io.StringIO()
    path = tmp_path / "v.json"
    argv = ["--backend", "cuda", "--dtype", "fp32", "--only-shapes", "--shape", "9,16,8,2", "-p", "0"]
    rc = verify.run_verify(_args(*argv, "--json", str(path)), out=out, err=io.StringIO())
    assert rc == 1
    text = out.getvalue()
    assert "FAILED cuda fp32 9x16->8 r=2 p=0" in text and text.rstrip().splitlines()[-2].startswith("FAIL")
    doc = json.loads(path.read_text())
    assert doc["ok"] is False and doc["results"][0]["status"] == "fail"


def test_cli_reference_sweep_passes_with_json_table_and_progress(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "verify.json"
    args = _args("--backend", "torch", "--dtype", "fp32", "--dtype", "fp64", "--shape", "0,8,8,2",
                 "--shape", "5,24,16,4", "--only-shapes", "--json", str(path))  # fmt: skip
    args.no_progress = False
    rc = verify.run_verify(args, out=out, err=err)
    assert rc == 0, out.getvalue()
    assert "| torch | fp32 | 4 | 4 | 0 | 0 |" in out.getvalue()
    assert "| torch | fp64 | 4 | 4 | 0 | 0 |" in out.getvalue()
    assert "10/10 100%" in err.getvalue()
    doc = json.loads(path.read_text())
    assert doc["ok"] is True and doc["tolerances"]["float32"] == list(TOL[torch.float32])
    cases = [r for r in doc["results"] if r["kind"] == "case"]
    assert len(cases) == 8 and {r["status"] for r in cases} == {"pass"}
    assert {(r["M"], r["K"], r["N"], r["r"]) for r in cases} == {(0, 8, 8, 2), (5, 24, 16, 4)}
    assert all(set(r["checks"]) == {"out", "dx", "dA", "dB", "dlora_bias"} for r in cases)
    assert [m["status"] for m in doc["mask_checks"]] == ["pass", "pass"]


def test_unavailable_backend_skips_with_reason_but_fails_when_requested(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cuda", "lora_kernels._no_such_backend_module")
    out = io.StringIO()
    argv = ["--dtype", "fp32", "--only-shapes", "--shape", "4,8,8,2", "-p", "0"]
    assert verify.run_verify(_args("--backend", "torch", *argv), out=out, err=io.StringIO()) == 0
    out = io.StringIO()
    rc = verify.run_verify(_args("--backend", "torch", "--backend", "cuda", *argv), out=out, err=io.StringIO())
    assert rc == 1
    assert "skipped cuda [fp32]: " in out.getvalue() and "_no_such_backend_module" in out.getvalue()
    assert "FAILED backend cuda was requested" in out.getvalue()


def test_triton_backend_passes_verify(monkeypatch, tmp_path):
    """The real Triton kernels (in the interpreter without a GPU), fp16 and bf16."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # restored afterwards
    path = tmp_path / "t.json"
    argv = [
        "--backend",
        "triton",
        "--dtype",
        "fp16",
        "--dtype",
        "bf16",
        "--only-shapes",
        "--shape",
        "37,40,24,8",
    ]
    argv += ["--json", str(path)] + ([] if HAS_CUDA else ["--interpret"])
    out = io.StringIO()
    rc = verify.run_verify(_args(*argv), out=out, err=io.StringIO())
    assert rc == 0, out.getvalue()
    doc = json.loads(path.read_text())
    by_dtype = {}
    for r in doc["results"]:
        by_dtype.setdefault(r["dtype"], set()).add(r["status"])
    assert by_dtype["fp16"] == {"pass"}
    # bf16 runs in the interpreter too: the kernels upcast right after each load there.
    assert by_dtype["bf16"] == {"pass"}
    masks = {(m["dtype"], m["mask_mode"]): m["status"] for m in doc["mask_checks"]}
    assert masks[("fp16", "bitmask")] == masks[("fp16", "regenerate")] == "pass"


def test_progress_bar_redraws_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = verify.Progress(4, stream=stream)
    for i in range(4):
        bar.start(f"case {i}")
        bar.step(f"case {i}", "pass")
    bar.close()
    text = stream.getvalue()
    assert "\r[" in text and "4/4 100%" in text and "case 3" in text and "\n" not in text


def test_shape_argument_is_validated():
    assert verify.parse_shape("8,16,32,4") == (8, 16, 32, 4)
    for bad in ("8,16,32", "a,b,c,d", "8,0,32,4", "-1,16,32,4"):
        with pytest.raises(Exception, match="--shape"):
            verify.parse_shape(bad)


def test_python_dash_m_entry_point(capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # --device cpu: on a GPU the default dtypes are fp32/fp16/bf16, without the fp64 row checked below.
    argv = ["verify", "--backend", "torch", "--device", "cpu", "--only-shapes", "--shape", "3,16,8,2",
            "--no-progress"]  # fmt: skip
    res = subprocess.run([sys.executable, "-m", "lora_kernels", *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS:" in res.stdout and "| torch | fp64 | 2 | 2 | 0 | 0 |" in res.stdout
    assert f"lora_kernels._C: {verify._extension_note()}\n" in res.stdout  # built, missing or refused
    assert main(argv) == 0  # the console script's entry point, in-process
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--shape", "3,16"])
    assert exc.value.code == 2 and "--shape" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="the CPU demo path (a GPU machine runs test_demo_gpu)")
def test_demo_on_cpu_checks_numerics_and_explains_missing_timing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setattr(verify, "DEMO_SHAPES_CPU", [(33, 40, 24, 8)])  # the full demo takes ~30 s
    out = io.StringIO()
    assert verify.run_demo(["--no-progress"], out=out, err=io.StringIO()) == 0, out.getvalue()
    text = out.getvalue()
    assert "| triton | fp32 |" in text and "PASS" in text
    assert "timing: skipped: no CUDA GPU" in text


def test_cli_hands_demo_its_options_and_refuses_unknown_verify_options(monkeypatch, capsys):
    """``lora-kernels demo ...`` (the README's main command) passes its own options on to run_demo
    (which parses them, so ``demo --help`` lists them); verify refuses an option it does not know."""
    seen = []
    monkeypatch.setattr(verify, "run_demo", lambda argv: seen.append(argv) or 7)
    assert main(["demo", "--no-progress", "--interpret"]) == 7
    assert seen == [["--no-progress", "--interpret"]]
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--backend", "torch", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@requires_gpu
def test_demo_gpu():
    out = io.StringIO()
    assert verify.run_demo(["--no-progress"], out=out, err=io.StringIO()) == 0, out.getvalue()
    text = out.getvalue()
    assert "| 8192 x 4096 -> 4096, 16 | 0.1 | triton |" in text


def test_verify_runs_the_single_pass_kernels_when_selected(monkeypatch, tmp_path):
    """LORA_KERNELS_FWD/BWD=single: verify's Triton cases (and its mask probe) go through the
    single-pass kernels where eligible, pass, and the header says which modes ran."""
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops import single_pass as sp

    if tri.TensorDescriptor is None:
        pytest.skip("this Triton has no triton.tools.tensor_descriptor")
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the single-pass kernels are a Hopper (sm90+) path")
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # restored afterwards
    monkeypatch.setattr(tri, "FWD_MODE", "single")
    monkeypatch.setattr(tri, "BWD_MODE", "single")
    if not HAS_CUDA:
        monkeypatch.setattr(tri, "TMA_MODE", "1")
    calls = []
    fwd, bwd = sp.lora_fwd_single_pass, sp.lora_bwd_single_pass
    monkeypatch.setattr(sp, "lora_fwd_single_pass", lambda *a, **k: calls.append("fwd") or fwd(*a, **k))
    monkeypatch.setattr(sp, "lora_bwd_single_pass", lambda *a, **k: calls.append("bwd") or bwd(*a, **k))
    argv = ["--backend", "triton", "--dtype", "fp16", "--only-shapes", "--shape", "37,40,24,8"]
    argv += [] if HAS_CUDA else ["--interpret"]
    out = io.StringIO()
    rc = verify.run_verify(_args(*argv), out=out, err=io.StringIO())
    assert rc == 0, out.getvalue()
    assert "triton forward=single backward=single" in out.getvalue()
    assert {"fwd", "bwd"} <= set(calls)


# --- a sweep that cannot finish still reports (a CUDA fault, SIGTERM, Ctrl-C) ----------------------

FAULT = "CUDA error: an illegal memory access was encountered"
# Two shapes x (p = 0, p = 0.1 bitmask) per backend; cuda (the fake) runs first, then torch.
SWEEP = ["--backend", "cuda", "--backend", "torch", "--dtype", "fp32", "--only-shapes", "--shape", "9,16,8,2",
         "--shape", "5,24,16,4", "-p", "0", "-p", "0.1", "--mask-mode", "bitmask"]  # fmt: skip


def _fails_on_call(n: int, action):
    """A backend kernel that is correct until its n-th call, which runs ``action()`` instead."""
    calls = []

    def kernel(*args):
        calls.append(1)
        if len(calls) == n:
            action()
        return _ref_2d(*args)

    return kernel, calls


def _raise(exc: BaseException):
    def action():
        raise exc

    return action


def _run_sweep(tmp_path, *extra: str):
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "v.json"
    rc = verify.run_verify(_args(*SWEEP, *extra, "--json", str(path)), out=out, err=err)
    return rc, out.getvalue(), err.getvalue(), json.loads(path.read_text())


def test_cuda_fault_stops_the_sweep_and_still_reports(fake_backend, tmp_path, monkeypatch):
    # The simulated fault leaves a real GPU healthy: make the context check see the sticky error.
    monkeypatch.setattr(verify, "_device_works", lambda device: False)
    kernel, calls = _fails_on_call(2, _raise(RuntimeError(FAULT)))
    fake_backend.lora_linear_2d = kernel
    rc, text, log, doc = _run_sweep(tmp_path)
    assert rc == 1
    assert len(calls) == 2, "no case may run after the context is lost"
    assert "| cuda | fp32 | 4 | 1 | 3 | 0 |" in text and "| torch | fp32 | 4 | 0 | 4 | 0 |" in text
    assert f"FAILED cuda fp32 9x16->8 r=2 p=0.1 bitmask: error: RuntimeError: {FAULT}" in text
    assert (
        "ABORTED: 6 cases and 2 mask checks not run (counted as failed): CUDA context lost (RuntimeError: CUDA error"
        in text
    )
    assert text.count("| not run |") == 2, "mask checks that never ran do not DIFFER"
    summary = text.rstrip().splitlines()[-2]
    assert summary.startswith("FAIL: 1 passed, 7 failed (6 not run), 0 skipped cases; mask checks: 0 identical,")
    assert summary.endswith("0 differ, 2 not run, 0 skipped")
    assert doc["ok"] is False and doc["aborted"] == f"CUDA context lost (RuntimeError: {FAULT})"
    statuses = [(r["backend"], r["status"], r["context_lost"]) for r in doc["results"]]
    assert statuses[:2] == [("cuda", "pass", False), ("cuda", "error", True)]
    not_run = doc["results"][2:] + doc["mask_checks"]
    assert len(not_run) == 8 and len(doc["results"]) == 8
    assert all(r["status"] == "error" and r["reason"] == f"not run: {doc['aborted']}" for r in not_run)
    assert "2/10 cuda fp32 9x16->8 r=2 p=0.1 bitmask: error (" in log  # --no-progress still logs each case


def test_error_in_inputs_or_availability_check_is_a_case_error(fake_backend, monkeypatch):
    """After a fault the next CUDA call anywhere fails, making the inputs included: run_case reports it."""
    monkeypatch.setattr(verify, "_device_works", lambda device: False)  # the real GPU is fine: simulate

    def poisoned(*args, **kwargs):
        raise torch.AcceleratorError(FAULT) if hasattr(torch, "AcceleratorError") else RuntimeError(FAULT)

    monkeypatch.setattr(verify, "make_inputs", poisoned)
    res = verify.run_case(verify.Case("cuda", "fp32", 8, 16, 8, 2, p=0.0), DEVICE)
    assert res.status == "error" and res.context_lost and FAULT in res.reason
    fake_backend.unavailable_reason = lambda x, weight, lora_A: poisoned()
    mask = verify.run_mask_check("cuda", "fp32", DEVICE, 0.1, "bitmask")
    assert mask.status == "error" and mask.context_lost and FAULT in mask.reason


def test_which_errors_lose_the_context(monkeypatch):
    assert verify.context_lost(RuntimeError(FAULT), "cpu")
    assert verify.context_lost(RuntimeError("Triton Error [CUDA]: misaligned address"), "cpu")
    assert not verify.context_lost(RuntimeError("shapes do not match"), "cpu")
    assert not verify.context_lost(ValueError("CUDA error: not from CUDA"), "cpu")
    if hasattr(torch, "AcceleratorError"):
        assert verify.context_lost(torch.AcceleratorError("any accelerator failure"), "cpu")
    # On a CUDA device a trivial kernel decides: a non-sticky CUDA error leaves the context usable.
    monkeypatch.setattr(verify, "_device_works", lambda device: True)
    assert not verify.context_lost(RuntimeError("CUDA error: invalid argument"), "cuda")
    monkeypatch.setattr(verify, "_device_works", lambda device: False)
    assert verify.context_lost(RuntimeError(FAULT), "cuda")


def test_an_ordinary_error_does_not_stop_the_sweep(fake_backend, tmp_path):
    kernel, calls = _fails_on_call(1, _raise(RuntimeError("a plain bug")))
    fake_backend.lora_linear_2d = kernel
    rc, text, _, doc = _run_sweep(tmp_path)
    assert rc == 1 and doc["aborted"] is None and "ABORTED" not in text
    assert [r["status"] for r in doc["results"]] == ["error"] + ["pass"] * 7
    assert [m["status"] for m in doc["mask_checks"]] == ["pass", "pass"]


def test_crashing_availability_check_fails_the_backend_instead_of_the_sweep(fake_backend, tmp_path):
    def broken(x, weight, lora_A):
        raise AttributeError("module 'triton.language' has no attribute 'something_new'")

    fake_backend.unavailable_reason = broken
    rc, text, _, doc = _run_sweep(tmp_path)
    assert rc == 1 and "| torch | fp32 | 4 | 4 | 0 | 0 |" in text
    cuda = [r for r in doc["results"] if r["backend"] == "cuda"]
    assert len(cuda) == 4 and all(r["status"] == "error" for r in cuda)
    assert "the availability check raised AttributeError: module 'triton.language'" in cuda[0]["reason"]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_sweep_reports_the_cases_done(fake_backend, tmp_path, how):
    import signal

    before = signal.getsignal(signal.SIGTERM)

    def sigterm():
        # Only with verify's handler installed: the default action would kill the test run.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before), "no SIGTERM handler"
        signal.raise_signal(signal.SIGTERM)

    kernel, calls = _fails_on_call(3, _raise(KeyboardInterrupt()) if how == "ctrl-c" else sigterm)
    fake_backend.lora_linear_2d = kernel
    rc, text, log, doc = _run_sweep(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before, "the SIGTERM handler must be restored"
    assert rc == 1 and len(calls) == 3
    why = "interrupted (SIGINT)" if how == "ctrl-c" else "interrupted (SIGTERM)"
    assert doc["ok"] is False and doc["aborted"] == why
    assert [r["status"] for r in doc["results"]] == ["pass", "pass"] + ["error"] * 6
    assert doc["results"][2]["reason"] == f"not run: {why}"
    assert "| cuda | fp32 | 4 | 2 | 2 | 0 |" in text and "ABORTED: 6 cases and 2 mask checks not run" in text
    assert "3/10 cuda fp32 5x24->16 r=4 p=0: interrupted\n" in log  # the step it was in


def test_sweep_outside_the_main_thread_runs_without_a_signal_handler():
    import threading

    rcs = []
    argv = ["--backend", "torch", "--dtype", "fp32", "--only-shapes", "--shape", "3,8,8,2", "-p", "0"]
    t = threading.Thread(
        target=lambda: rcs.append(verify.run_verify(_args(*argv), out=io.StringIO(), err=io.StringIO()))
    )
    t.start()
    t.join()
    assert rcs == [0]


def test_line_mode_progress_names_the_step_before_it_ends():
    stream = io.StringIO()
    bar = verify.Progress(2, stream=stream, enabled=False)
    bar.start("case 0")
    assert stream.getvalue() == "1/2 case 0: ", "written (and flushed) when the step starts"
    bar.step("case 0", "pass")
    bar.start("case 1")
    bar.close("interrupted")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("1/2 case 0: pass (") and lines[1] == "2/2 case 1: interrupted"
    with_bar = io.StringIO()
    bar = verify.Progress(1, stream=with_bar)
    bar.step("only", "fail")  # a step without start still makes a whole line
    assert with_bar.getvalue().startswith("[" + "#" * 28 + "] 1/1 100% only: fail (")


@pytest.mark.parametrize("p", ["1.0", "-0.1"])
def test_dropout_p_outside_the_unit_interval_is_a_usage_error(p):
    """``-p 1`` would divide by zero in the inverted-dropout scale: exit status 2 before any case runs."""
    out, err = io.StringIO(), io.StringIO()
    rc = verify.run_verify(_args("--backend", "torch", "--only-shapes", "--shape", "4,8,8,2", "-p", p), out, err)
    assert rc == 2 and f"dropout p must be in [0, 1), got {float(p)}" in err.getvalue()
    assert out.getvalue() == ""


def test_many_failures_are_listed_up_to_thirty(fake_backend):
    def no_scaling(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode):
        return _ref_2d(x, weight, bias, lora_A, lora_B, lora_bias, 1.0, p, seed, mask_mode)

    fake_backend.lora_linear_2d = no_scaling
    shapes = [a for m in range(1, 32) for a in ("--shape", f"{m},16,8,2")]  # one past the list's 30
    out = io.StringIO()
    rc = verify.run_verify(_args("--backend", "cuda", "--dtype", "fp32", "--only-shapes", *shapes, "-p", "0"),
                           out=out, err=io.StringIO())  # fmt: skip
    assert rc == 1
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("FAILED cuda fp32 ") for line in lines) == 30
    assert "... and 1 more failed cases (see --json)" in lines
    assert any(line.startswith("FAIL: 0 passed, 31 failed") for line in lines), lines[-3:]


def test_a_backend_that_cannot_run_reports_its_partial_gradient_cases_as_skipped(monkeypatch, tmp_path):
    """Without --only-shapes the sweep adds the partial-gradient cases: for a backend that cannot run
    they are skipped with the backend's reason like the others, not dropped and not run."""
    monkeypatch.setitem(backends._MODULES, "cuda", "lora_kernels._no_such_backend_module")
    path = tmp_path / "v.json"
    args = _args("--backend", "cuda", "--dtype", "fp32", "-p", "0", "-p", "0.1", "--json", str(path))
    assert verify.run_verify(args, out=io.StringIO(), err=io.StringIO()) == 1  # requested, nothing ran
    doc = json.loads(path.read_text())
    cases = [r for r in doc["results"] if r["kind"] == "case"]
    partial = [r for r in cases if r["train"] != "all"]
    assert partial and len(partial) == len(verify.TRAIN_SETS) - 1
    assert {r["status"] for r in cases} == {"skip"}
    assert all("_no_such_backend_module" in r["reason"] for r in cases)
    masks = doc["mask_checks"]  # p = 0.1, both mask modes: skipped with the same reason
    assert [m["mask_mode"] for m in masks] == ["bitmask", "regenerate"]
    assert all(m["status"] == "skip" and "_no_such_backend_module" in m["reason"] for m in masks)


def test_boundary_p_of_an_empty_probe_is_p_itself():
    assert verify.boundary_p(3, 0, 24, 0.1) == 0.1
    pb = verify.boundary_p(3, 4, 24, 0.1)
    assert pb != 0.1 and 0 < pb < 1 and round(pb * 65536) in dropout_draws(3, 4, 24).flatten().tolist()
