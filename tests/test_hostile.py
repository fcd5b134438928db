"""Hostile inputs: each one gives either the correct result or a clear Python exception that names
the offending argument — never a crash, a hang, or a silently wrong answer.

Run over the "torch" (reference) and "triton" backends (the Triton CPU interpreter without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from lora_kernels import backends, lora_linear
from lora_kernels.reference import (
    dropout_draws,
    dropout_keep_mask,
    dropout_threshold,
    lora_linear_ref,
    philox4x32_10,
)
from tests import _big_offsets_worker as big
from tests._utils import HAS_CUDA, assert_close_ref, requires_gpu

DEVICE = "cuda" if HAS_CUDA else "cpu"
M, K, N, R = 37, 24, 20, 4


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    reason = backends.available_backends(torch.empty(1, 16, device=DEVICE))[request.param]
    if reason is not None:
        pytest.skip(f"backend {request.param!r} cannot run here: {reason}")
    return request.param


def _inputs(dtype=torch.float32, m=M, k=K, n=N, r=R, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(DEVICE)

    return {
        "x": rnd(m, k),
        "weight": rnd(n, k, std=k**-0.5),
        "lora_A": rnd(r, k, std=k**-0.5),
        "lora_B": rnd(n, r, std=r**-0.5),
        "bias": rnd(n, std=0.1),
        "lora_bias": rnd(n, std=0.1),
    }


def _call(backend: str, t: dict, **kw) -> torch.Tensor:
    return lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t.get("bias"), t.get("lora_bias"),
                       backend=backend, **kw)  # fmt: skip


def _raises(backend: str, t: dict, exc: type[Exception], match: str, **kw) -> None:
    with pytest.raises(exc, match=match):
        _call(backend, t, **kw)


# ------------------------------------------------------------------------------------------------
# argument errors: the message names the argument


def test_non_tensor_argument(backend):
    t = _inputs()
    t["x"] = t["x"].tolist()
    _raises(backend, t, TypeError, r"^x must be a torch.Tensor, got list")


@pytest.mark.parametrize("name", ["x", "weight", "lora_A", "lora_B", "bias", "lora_bias"])
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_tensors(backend, name, int_dtype):
    t = _inputs()
    t[name] = t[name].to(int_dtype)
    _raises(backend, t, TypeError, rf"^{name} must be a floating tensor .* got {int_dtype}")


def test_zero_dim_x(backend):
    t = _inputs()
    t["x"] = torch.tensor(1.0, device=DEVICE)
    _raises(backend, t, ValueError, r"^x must have at least 1 dimension")


SHAPE_ERRORS = {
    # name: (bad value builder, message)
    "weight 1-D": ("weight", lambda t: t["weight"][0], r"^weight must have shape \(N, K\)"),
    "weight 3-D": ("weight", lambda t: t["weight"][None], r"^weight must have shape \(N, K\)"),
    "weight wrong K": ("weight", lambda t: t["weight"][:, :-1], rf"^weight must have shape \(N, K\) with K = .* = {K}"),
    "x wrong K": ("x", lambda t: t["x"][:, :-1], rf"K = x.shape\[-1\] = {K - 1}, got \({N}, {K}\)"),
    "lora_A 1-D": ("lora_A", lambda t: t["lora_A"][0], r"^lora_A must have shape \(r, K\)"),
    "lora_A wrong K": ("lora_A", lambda t: t["lora_A"][:, 1:], rf"^lora_A must have shape \(r, K\) = \({R}, {K}\)"),
    "lora_B transposed": ("lora_B", lambda t: t["lora_B"].t(), rf"^lora_B must have shape \(N, r\) = \({N}, {R}\)"),
    "lora_B wrong r": ("lora_B", lambda t: t["lora_B"][:, 1:], r"^lora_B must have shape \(N, r\)"),
    "lora_B 3-D": ("lora_B", lambda t: t["lora_B"][None], r"^lora_B must have shape \(N, r\)"),
    "bias wrong N": ("bias", lambda t: t["bias"][1:], rf"^bias must have shape \(N,\) = \({N},\)"),
    "bias 2-D": ("bias", lambda t: t["bias"][None], r"^bias must have shape \(N,\)"),
    "lora_bias wrong N": ("lora_bias", lambda t: t["lora_bias"][1:], r"^lora_bias must have shape \(N,\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SHAPE_ERRORS))
def test_wrong_ranks_and_shapes(backend, case):
    name, bad, match = SHAPE_ERRORS[case]
    t = _inputs()
    t[name] = bad(t)
    _raises(backend, t, ValueError, match)


def test_rank_zero(backend):
    t = _inputs()
    t["lora_A"], t["lora_B"] = t["lora_A"][:0], t["lora_B"][:, :0]
    _raises(backend, t, ValueError, r"^lora_A has rank r = 0")


@pytest.mark.parametrize("name", ["weight", "lora_A", "lora_B", "bias", "lora_bias"])
def test_wrong_device(backend, name):
    # "meta" is a second device on every machine: the check must happen before any kernel runs.
    t = _inputs()
    t[name] = t[name].to("meta")
    _raises(backend, t, ValueError, rf"^{name} is on meta but x is on {DEVICE}")


@requires_gpu
def test_cpu_parameter_with_gpu_activations(backend):
    t = _inputs()
    t["lora_A"] = t["lora_A"].cpu()
    _raises(backend, t, ValueError, r"^lora_A is on cpu but x is on cuda")


@requires_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_different_gpus(backend):
    t = _inputs()
    t["weight"] = t["weight"].to("cuda:1")
    _raises(backend, t, ValueError, r"^weight is on cuda:1 but x is on cuda:0")


@pytest.mark.parametrize("backend_name", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("name", ["weight", "lora_A", "lora_B", "bias", "lora_bias"])
def test_tensors_on_different_gpus_without_two_gpus(backend_name, name, monkeypatch):
    """The device check of the test above on fake CUDA tensors (only devices and shapes exist): every
    argument on another GPU than x is named, for every backend, before anything would launch."""
    from torch._subclasses import fake_tensor

    # On a machine with one real GPU, a fake tensor's first use of a device makes a real tensor there
    # ("initialize the CUDA context"): cuda:1 does not exist (invalid device ordinal). Nothing here
    # runs on a device, so the fake tensors need no context.
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    with fake_tensor.FakeTensorMode():
        t = {k: torch.empty(v.shape, device="cuda:0") for k, v in _inputs().items()}
        t[name] = torch.empty(t[name].shape, device="cuda:1")
        with pytest.raises(ValueError, match=rf"^{name} is on cuda:1 but x is on cuda:0"):
            _call(backend_name, t)


@requires_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_all_tensors_on_a_gpu_that_is_not_current(backend_name):
    """A model spread over GPUs (HF device_map="auto") runs a layer on cuda:1 while cuda:0 is current:
    the kernels must launch on cuda:1 (Triton launches on the current device unless told otherwise)."""
    reason = backends.available_backends(torch.empty(1, 16, device="cuda:1"))[backend_name]
    if reason is not None:
        pytest.skip(f"backend {backend_name!r} cannot run here: {reason}")
    t = {k: v.to("cuda:1").requires_grad_(k in ("x", "lora_A", "lora_B")) for k, v in _inputs().items()}
    with torch.cuda.device(0):
        y = _call(backend_name, t, dropout_p=0.1, seed=7)
        y.backward(torch.ones_like(y))
    ref = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in t.items()}
    y_ref = _call("torch", ref, dropout_p=0.1, seed=7)
    y_ref.backward(torch.ones_like(y_ref))
    assert y.device == torch.device("cuda", 1)
    assert_close_ref(y, y_ref, [torch.float32], "y")
    for k in ("x", "lora_A", "lora_B"):
        assert_close_ref(t[k].grad, ref[k].grad, [torch.float32], f"d{k}")


def test_triton_launchers_make_the_tensors_gpu_current(monkeypatch):
    """The guard behind the test above, without two GPUs: lora_fwd/lora_bwd run with their first
    tensor's GPU made current when it is not, and touch nothing otherwise (CPU, current GPU)."""
    from lora_kernels.triton_ops import lora_linear as tri

    assert tri.lora_fwd.__wrapped__ and tri.lora_bwd.__wrapped__  # both launchers carry the guard
    entered = []

    class Device:  # stands in for torch.cuda.device
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    seen = []
    guarded = tri._on_tensor_device(lambda t, *args: seen.append((list(entered), args)) or "done")

    class OnDevice:  # what the guard reads of a tensor, as torch.Tensor answers it
        def __init__(self, device):
            self.device = torch.device(device)
            self.is_cuda = self.device.type == "cuda"

        def get_device(self):
            return self.device.index if self.device.index is not None else -1

    assert guarded(OnDevice("cuda:1"), 5) == "done" and seen[-1] == ([1], (5,)) and entered == [1, "exit"]
    entered.clear()
    guarded(OnDevice("cuda:0"), 6)
    guarded(OnDevice("cpu"), 7)
    assert entered == [] and [s[1] for s in seen[1:]] == [(6,), (7,)]


DTYPE_ERRORS = {
    "weight": (torch.float16, r"^weight dtype torch.float16 differs from x dtype torch.float32"),
    "bias": (torch.float16, r"^bias dtype torch.float16 differs from weight dtype"),
    "lora_B": (torch.float16, r"^lora_B dtype torch.float16 differs from lora_A dtype"),
    "lora_bias": (torch.float64, r"^lora_bias dtype torch.float64 differs from lora_A dtype"),
}


@pytest.mark.parametrize("name", list(DTYPE_ERRORS))
def test_mismatched_dtypes(backend, name):
    dtype, match = DTYPE_ERRORS[name]
    t = _inputs()
    t[name] = t[name].to(dtype)
    _raises(backend, t, TypeError, match)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_dropout_out_of_range(backend, p):
    _raises(backend, _inputs(), ValueError, r"^dropout_p must be in \[0, 1\)", dropout_p=p, seed=1)


@pytest.mark.parametrize("p", ["0.1", True, None, torch.tensor(0.1)])
def test_dropout_wrong_type(backend, p):
    _raises(backend, _inputs(), TypeError, r"^dropout_p must be a float", dropout_p=p, seed=1)


@pytest.mark.parametrize("seed", [1.5, "7", True, torch.tensor(3), [1]])
def test_non_int_seed(backend, seed):
    _raises(backend, _inputs(), TypeError, r"^seed must be an int or None", dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70])
def test_seed_out_of_range(backend, seed):
    _raises(backend, _inputs(), ValueError, r"^seed must be in \[0, 2\*\*63\)", dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scaling(backend, scaling):
    _raises(backend, _inputs(), ValueError, r"^scaling must be finite", scaling=scaling)


@pytest.mark.parametrize("scaling", ["2", None, True, torch.tensor(2.0)])
def test_scaling_wrong_type(backend, scaling):
    _raises(backend, _inputs(), TypeError, r"^scaling must be a real number", scaling=scaling)


def test_unknown_backend_and_mask_mode():
    _raises("tpu", _inputs(), ValueError, r"^backend must be one of 'auto', 'torch'")
    _raises("torch", _inputs(), ValueError, r"^dropout_mask must be one of", dropout_mask="bytes")


def test_triton_refuses_what_it_cannot_run_with_the_reason():
    reason = backends.available_backends(torch.empty(1, 16, device=DEVICE))["triton"]
    if reason is not None:
        pytest.skip(f"backend 'triton' cannot run here: {reason}")
    _raises("triton", _inputs(torch.float64), RuntimeError, r"backend='triton' cannot run here: .*float64")
    # float64 adapters under float32 activations: refused for the adapters, and "auto" runs the reference
    t64 = _inputs()
    for name in ("lora_A", "lora_B", "lora_bias"):
        t64[name] = t64[name].double()
    _raises("triton", t64, RuntimeError, r"backend='triton' cannot run here: .*adapters, got torch.float64")
    if not HAS_CUDA:
        y = _call("auto", t64, scaling=2.0)
        assert y.dtype == torch.float32
        ref = _call("torch", {k: v.double() for k, v in t64.items()}, scaling=2.0)
        assert_close_ref(y, ref, [torch.float32])
    t = _inputs(r=300)
    _raises("triton", t, RuntimeError, r"backend='triton' cannot run here: .*rank.*300")
    # "auto" falls back instead of failing (on CPU to the reference; on a GPU maybe to "cuda")
    y = _call("auto", t)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    if not HAS_CUDA:
        assert_close_ref(y, _call("torch", {k: v.double() for k, v in t.items()}), [torch.float32])


def test_triton_says_why_it_cannot_run_off_a_cuda_device(monkeypatch):
    """The reasons ``backend="triton"`` and ``available_backends`` show: a CPU tensor outside the
    interpreter, a tensor on another device type (meta here), whatever the dtype."""
    from lora_kernels.triton_ops import lora_linear as tri

    x, a = torch.empty(4, 16), torch.empty(2, 16)
    monkeypatch.setattr(tri, "_interpret", lambda: False)
    assert tri.unavailable_reason(x, x, a) == (
        "x is on the CPU: Triton kernels need a GPU (or TRITON_INTERPRET=1 for testing)"
    )
    xm = torch.empty(4, 16, device="meta")
    assert tri.unavailable_reason(xm, xm, a) == "Triton kernels run on CUDA GPUs, x is on meta"
    monkeypatch.setattr(tri, "_interpret", lambda: True)
    assert tri.unavailable_reason(x, x, a) is None
    assert "ranks up to 256" in tri.unavailable_reason(x, x, torch.empty(257, 16))


def test_raw_triton_ops_check_their_arguments():
    """``torch.ops.lora_kernels.triton_lora_{fwd,bwd}`` are reachable without ``lora_linear``'s checks
    (an exported graph replayed on other inputs, a direct call). Their kernels index by these shapes,
    so each wrong argument is a RuntimeError naming it (as the CUDA ops' TORCH_CHECKs), never an
    out-of-bounds read. A correct call goes through."""
    reason = backends.available_backends(torch.empty(1, 16, device=DEVICE))["triton"]
    if reason is not None:
        pytest.skip(f"backend 'triton' cannot run here: {reason}")
    t = _inputs(k=40, r=4)
    x, W, A, B, b, lb = (t[k] for k in ("x", "weight", "lora_A", "lora_B", "bias", "lora_bias"))
    fwd, bwd = torch.ops.lora_kernels.triton_lora_fwd, torch.ops.lora_kernels.triton_lora_bwd
    y, T, bits = fwd(x, W, b, A, B, lb, 2.0, 0.1, 3, True)
    assert bits.shape == (M, 5)
    dy = torch.randn_like(y)
    dx, dA, dB, colsum = bwd(dy, x, W, A, B, T, bits, 2.0, 0.1, 3, True, True, True)
    assert torch.isfinite(dx).all() and torch.isfinite(dA).all() and dB.shape == (N, 4)
    fwd_cases = {
        "weight must be": (x, W[:, :-1], b, A, B, lb),
        "lora_A must be": (x, W, b, A[:, :-1], B, lb),
        "lora_B must be": (x, W, b, A, B[:-1], lb),
        "lora_bias must be": (x, W, b, A, B, lb[:-1]),
        "bias must be": (x, W, b[:-1], A, B, lb),
        "weight dtype": (x, W.double(), b, A, B, lb),
        "must be 2-D": (x[None], W, b, A, B, lb),
    }
    for match, args in fwd_cases.items():
        with pytest.raises(RuntimeError, match=f"triton op: .*{match}"):
            fwd(*args, 2.0, 0.1, 3, True)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        fwd(x, W, b, A, B, lb, 2.0, 1.0, 3, True)
    bwd_cases = {
        "dy must be": (dy[:-1], T, bits),
        "t must be": (dy, T[:-1], bits),
        "bits must be empty": (dy, T, bits[:-1]),
        "bits must be empty ": (dy, T, bits.reshape(-1)),
    }
    for match, (dy_, T_, bits_) in bwd_cases.items():
        with pytest.raises(RuntimeError, match=f"triton op: {match.strip()}"):
            bwd(dy_, x, W, A, B, T_, bits_, 2.0, 0.1, 3, True, True, True)
    # An empty mask regenerates it from the seed: the same gradients as the saved one.
    dx2, dA2, *_ = bwd(dy, x, W, A, B, T, bits[:0], 2.0, 0.1, 3, True, True, True)
    assert torch.equal(dx2, dx) and torch.equal(dA2, dA)


# ------------------------------------------------------------------------------------------------
# unusual but valid inputs: the correct result (compared with the float64 reference)


def _check_against_reference(backend: str, make, dtype=torch.float32, grads=True, **kw) -> None:
    """``make(cast)`` builds the call's tensors from fixed random values (``cast`` maps a float32
    tensor to the working dtype) and returns ``(args, leaves)``: the 6 tensor arguments of
    lora_linear and the leaves whose gradients are compared."""
    args, leaves = make(lambda t: t.to(dtype).to(DEVICE))
    args64, leaves64 = make(lambda t: t.to(dtype).to(DEVICE).double())
    y = lora_linear(*args, backend=backend, **kw)
    y64 = lora_linear_ref(*args64[:2], *args64[2:4], *args64[4:], **_ref_kw(kw))
    assert_close_ref(y, y64, [dtype], "output")
    if not grads:
        return
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    y.backward(dy)
    y64.backward(dy.double())
    for name in leaves:
        assert leaves[name].grad is not None, f"no gradient for {name}"
        assert_close_ref(leaves[name].grad, leaves64[name].grad, [dtype], f"grad {name}")


def _ref_kw(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k in ("scaling", "dropout_p", "training", "seed")}


def _randn(*shape, seed: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def test_expanded_and_overlapping_strides(backend, dtype=torch.float32):
    """x = one row broadcast to M rows (stride 0), overlapping windows, a stride-0 weight. (``dtype``:
    test_cuda_backend.py runs it in bf16 too, where the CUDA GEMMs' stride checks must refuse them.)"""

    def make(cast):
        row = cast(_randn(K, seed=1)).requires_grad_(True)
        A = cast(_randn(1, K, seed=3, std=K**-0.5)).requires_grad_(True)
        B = cast(_randn(N, R, seed=4, std=R**-0.5)).requires_grad_(True)
        w = cast(_randn(1, K, seed=5, std=K**-0.5))
        # every row of x, of weight and of lora_A is the same memory (stride 0)
        args = (row.expand(M, K), w.expand(N, K), A.expand(R, K), B, None, None)
        return args, {"row": row, "lora_A": A, "lora_B": B}

    _check_against_reference(backend, make, dtype, dropout_p=0.2, seed=11, scaling=1.5)

    def make_windows(cast):
        win = cast(_randn(M + K, seed=2)).requires_grad_(True)
        A = cast(_randn(R, K, seed=3, std=K**-0.5)).requires_grad_(True)
        B = cast(_randn(N, R, seed=4, std=R**-0.5)).requires_grad_(True)
        w = cast(_randn(N, K, seed=5, std=K**-0.5))
        x = win.as_strided((M, K), (1, 1))  # x[m, k] = win[m + k]: overlapping rows (like unfold)
        return (x, w, A, B, None, None), {"win": win, "lora_A": A, "lora_B": B}

    _check_against_reference(backend, make_windows, dtype, dropout_p=0.1, seed=12)


def test_non_contiguous_everything(backend):
    def make(cast):
        x = cast(_randn(3, K, 2 * M, seed=1)).requires_grad_(True)
        w = cast(_randn(K, N, seed=2, std=K**-0.5))
        A = cast(_randn(K, R, seed=3, std=K**-0.5)).requires_grad_(True)
        B = cast(_randn(R, N, seed=4, std=R**-0.5)).requires_grad_(True)
        lb = cast(_randn(2 * N, seed=5, std=0.1)).requires_grad_(True)
        b = cast(_randn(N, 3, seed=6, std=0.1))
        xv = x[1:, :, ::2].transpose(1, 2)  # (2, M, K), strides (2KM, 2, 2M)
        # bias and lora_bias with stride != 1 (columns of a matrix, every other element)
        return (xv, w.t(), A.t(), B.t(), b[:, 1], lb[::2]), {"x": x, "lora_A": A, "lora_B": B, "lb": lb}

    _check_against_reference(backend, make, dropout_p=0.3, seed=5, dropout_mask="regenerate")


def test_frozen_weight_and_bias_that_require_grad(backend):
    """If a user forgets to freeze W and bias, their gradients must still be right."""

    def make(cast):
        t = _inputs(torch.float32, seed=3)
        leaves = {k: cast(v.cpu()).requires_grad_(True) for k, v in t.items()}
        args = tuple(leaves[k] for k in ("x", "weight", "lora_A", "lora_B", "bias", "lora_bias"))
        return args, leaves

    _check_against_reference(backend, make, dropout_p=0.1, seed=3, scaling=0.5)


@pytest.mark.parametrize("lead", [(), (2,), (3, 1)])
def test_empty_batch_forward_and_backward(backend, lead):
    t = _inputs(m=0)
    x = torch.zeros(*lead, 0, K, device=DEVICE, requires_grad=True)
    params = {k: t[k].clone().requires_grad_(True) for k in ("lora_A", "lora_B", "lora_bias")}
    y = lora_linear(x, t["weight"], params["lora_A"], params["lora_B"], t["bias"], params["lora_bias"],
                    dropout_p=0.1, seed=3, backend=backend)  # fmt: skip
    assert y.shape == (*lead, 0, N) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    for k, p in params.items():
        assert p.grad is not None and p.grad.shape == p.shape, k
        assert torch.equal(p.grad, torch.zeros_like(p)), f"grad of {k} over an empty batch must be 0"


@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_no_input_features(backend, lead):
    """K = 0 (x, weight and lora_A without columns): y = bias + s·lora_bias on every row, gradients of
    the right shapes (x's and lora_A's empty, lora_B's 0, lora_bias's s·Σ dY)."""
    t = _inputs()
    x = torch.zeros(*lead, 5, 0, device=DEVICE, requires_grad=True)
    w = t["weight"][:, :0]
    params = {"lora_A": t["lora_A"][:, :0].clone(), "lora_B": t["lora_B"].clone(), "lora_bias": t["lora_bias"].clone()}
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    y = lora_linear(x, w, params["lora_A"], params["lora_B"], t["bias"], params["lora_bias"], scaling=0.5,
                    dropout_p=0.1, seed=3, backend=backend)  # fmt: skip
    assert y.shape == (*lead, 5, N) and y.dtype == x.dtype
    torch.testing.assert_close(y, (t["bias"] + 0.5 * params["lora_bias"].detach()).expand_as(y))
    dy = torch.randn(y.shape, device=DEVICE)
    y.backward(dy)
    assert x.grad.shape == x.shape and params["lora_A"].grad.shape == params["lora_A"].shape
    assert torch.equal(params["lora_B"].grad, torch.zeros_like(params["lora_B"]))
    torch.testing.assert_close(params["lora_bias"].grad, 0.5 * dy.reshape(-1, N).sum(0))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nan_and_inf_in_x_propagate_like_peft(backend):
    t = _inputs()
    x = t["x"].clone()
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[8, K - 1] = -float("inf")
    for p in (0.0, 0.3):
        xg = x.clone().requires_grad_(True)
        A = t["lora_A"].clone().requires_grad_(True)
        y = lora_linear(xg, t["weight"], A, t["lora_B"], t["bias"], t["lora_bias"], scaling=2.0,
                        dropout_p=p, seed=9, backend=backend)  # fmt: skip
        x64 = x.double().requires_grad_(True)
        A64 = t["lora_A"].double().requires_grad_(True)
        y64 = lora_linear_ref(x64, t["weight"].double(), A64, t["lora_B"].double(), t["bias"].double(),
                              t["lora_bias"].double(), 2.0, p, True, 9)  # fmt: skip
        bad_rows = [3, 7, 8]
        assert not torch.isfinite(y[bad_rows]).any(), "a non-finite input row must give a non-finite output row"
        assert torch.equal(torch.isfinite(y), torch.isfinite(y64))
        good = torch.ones(M, dtype=torch.bool)
        good[bad_rows] = False
        assert_close_ref(y[good], y64[good], [torch.float32], f"finite rows (p={p})")
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        y.backward(dy)
        y64.backward(dy.double())
        # dX does not depend on x's values: it stays finite and correct
        assert_close_ref(xg.grad, x64.grad, [torch.float32], "dx")
        if p == 0.0:  # without a mask every backend must agree on which dA columns are poisoned
            assert torch.equal(torch.isfinite(A.grad), torch.isfinite(A64.grad))
            cols = torch.isfinite(A64.grad).all(0)
            assert_close_ref(A.grad[:, cols], A64.grad[:, cols], [torch.float32], "dA (finite columns)")


def test_numpy_integer_seed_matches_int_seed(backend):
    t = _inputs()
    y_np = _call(backend, t, dropout_p=0.25, seed=np.int64(123456789))
    y_int = _call(backend, t, dropout_p=0.25, seed=123456789)
    assert torch.equal(y_np, y_int)


def test_largest_seed_and_tiny_dims(backend):
    def make(cast):
        leaves = {
            "x": cast(_randn(5, 1, seed=1)).requires_grad_(True),
            "lora_A": cast(_randn(1, 1, seed=2)).requires_grad_(True),
            "lora_B": cast(_randn(1, 1, seed=3)).requires_grad_(True),
        }
        w = cast(_randn(1, 1, seed=4))
        return (leaves["x"], w, leaves["lora_A"], leaves["lora_B"], None, None), leaves

    _check_against_reference(backend, make, dropout_p=0.5, seed=2**63 - 1)


def test_eval_mode_ignores_dropout_and_inference_mode_works(backend):
    t = _inputs()
    y_eval = _call(backend, t, dropout_p=0.5, training=False)
    assert torch.equal(y_eval, _call(backend, t, dropout_p=0.0))
    with torch.inference_mode():
        y_inf = _call(backend, t, dropout_p=0.3, seed=4)
    assert_close_ref(y_inf, lora_linear_ref(*(t[k].double() for k in ("x", "weight", "lora_A", "lora_B", "bias",
                     "lora_bias")), 1.0, 0.3, True, 4), [torch.float32])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# more than 2**31 elements: 64-bit offsets (GPU only)


def keep_rows(seed: int, rows: torch.Tensor, K: int, p: float) -> torch.Tensor:
    """Rows ``rows`` of the reference keep-mask (``dropout_keep_mask`` materialises all M rows)."""
    G = (K + 7) // 8
    r = rows.to(torch.int64)[:, None].expand(-1, G)
    g = torch.arange(G, device=rows.device, dtype=torch.int64)[None, :].expand(rows.numel(), G)
    lanes = philox4x32_10(g, r & 0xFFFFFFFF, r >> 32, torch.zeros_like(r), seed & 0xFFFFFFFF, seed >> 32)
    halves = [(lane >> (16 * h)) & 0xFFFF for h in (0, 1) for lane in lanes]
    u16 = torch.stack(halves, dim=-1).reshape(rows.numel(), G * 8)[:, :K]
    return u16 >= dropout_threshold(p)


@pytest.mark.parametrize("mask_mode", ["bitmask", "regenerate"])
def test_dropout_p_next_to_one(backend, mask_mode):
    """p is resolved to 1/65536 (threshold = round(65536 p), the draws are 16-bit) while the scale stays
    1 / (1 - p). From p = 1 - 2⁻¹⁷ on, the threshold is 65536, above every draw: every element is dropped
    although the scale is up to 2¹⁷ (0 · scale must stay 0, not NaN, and a 16-bit compare would wrap the
    threshold to 0 and keep them all). Just below, at threshold 65535, only a draw of 65535 keeps its
    element, at that scale: a seed with such draws in x is searched for, so the case is not vacuous."""
    seed_kept = next(s for s in range(5000) if (dropout_draws(s, M, K) == 65535).any())
    kept = int((dropout_draws(seed_kept, M, K) == 65535).sum())
    for p, seed, n_kept in ((1 - 2**-18, 7, 0), (1 - 2**-16, seed_kept, kept)):
        assert dropout_threshold(p) == 65536 - (n_kept > 0)
        assert int(dropout_keep_mask(seed, M, K, p).sum()) == n_kept

        def make(cast):
            leaves = {
                "x": cast(_randn(M, K, seed=1)).requires_grad_(True),
                "lora_A": cast(_randn(R, K, seed=2, std=K**-0.5)).requires_grad_(True),
                "lora_B": cast(_randn(N, R, seed=3, std=R**-0.5)).requires_grad_(True),
                "lora_bias": cast(_randn(N, seed=4, std=0.1)).requires_grad_(True),
            }
            w, b = cast(_randn(N, K, seed=5, std=K**-0.5)), cast(_randn(N, seed=6, std=0.1))
            return (leaves["x"], w, leaves["lora_A"], leaves["lora_B"], b, leaves["lora_bias"]), leaves

        # outputs and gradients against float64, the kept elements scaled by 1 / (1 - p) = 2¹⁶
        _check_against_reference(backend, make, dropout_p=p, seed=seed, scaling=0.5, dropout_mask=mask_mode)
        args, leaves = make(lambda t: t.to(DEVICE))
        y = lora_linear(*args, dropout_p=p, seed=seed, scaling=0.5, dropout_mask=mask_mode, backend=backend)
        assert torch.isfinite(y).all()
        y.backward(torch.ones_like(y))
        if n_kept == 0:  # T = dropout(x)·Aᵀ = 0: nothing reaches lora_A or lora_B
            assert not leaves["lora_A"].grad.any() and not leaves["lora_B"].grad.any()
        else:  # the kept elements' columns of dA, and nothing else
            cols = dropout_keep_mask(seed, M, K, p).any(0).to(DEVICE)
            assert leaves["lora_A"].grad[:, cols].abs().sum() > 0 and not leaves["lora_A"].grad[:, ~cols].any()


def test_keep_rows_helper_is_the_reference_mask():
    seed = 2**40 + 77
    full = dropout_keep_mask(seed, 50, 21, 0.3)
    rows = torch.tensor([0, 7, 49, 13])
    assert torch.equal(keep_rows(seed, rows, 21, 0.3), full[rows])


@pytest.fixture
def one_big_gpu_test_at_a_time():
    """Tests that hold ~13 GB of the GPU take turns across pytest-xdist workers (gpu_check.sh runs 8), and hand the
    memory back after: each worker's caching allocator would keep it, and six such tests at once, or six workers
    each keeping one's cache, do not fit an H100's 80 GB beside the other tests."""
    import fcntl
    import gc
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "lora_kernels-big-gpu-test.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            gc.collect()
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


# (K, N): "tall", M·K > 2³¹ (x, dX, the bitmask, the backward's transposed reads of x); "wide", M·N > 2³¹ (y and dY:
# a LoRA on an output layer, vocabulary-wide N, over a long batch), with the bitmask only
BIG_SHAPES = {"tall": (4096, 64), "wide": (64, 4096)}
BIG_CASES = [(b, m, "tall") for b in ("triton", "triton-single", "cuda") for m in ("bitmask", "regenerate")]
BIG_CASES += [(b, "bitmask", "wide") for b in ("triton", "triton-single", "cuda")]


@requires_gpu
@pytest.mark.parametrize("backend,mask_mode,shape", BIG_CASES)
@pytest.mark.usefixtures("one_big_gpu_test_at_a_time")
def test_more_than_2_pow_31_elements(monkeypatch, backend, mask_mode, shape):
    """M·K or M·N > 2³¹ (about 13 GB of GPU memory): every offset in the kernels must be 64-bit (x, dx, the
    bitmask, the transposed reads of the backward reductions, the single-pass partials; y and dY). Rows around
    element 2³¹ are checked against float64, dA and dB against a chunked float32 reference."""
    single, taken = backend == "triton-single", []
    if single:  # the opt-in single-pass kernels (LORA_KERNELS_FWD/BWD=single)
        from lora_kernels.triton_ops import lora_linear as tri
        from lora_kernels.triton_ops import single_pass as sp

        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("the single-pass kernels are a Hopper (sm90+) path")
        monkeypatch.setattr(tri, "FWD_MODE", "single")
        monkeypatch.setattr(tri, "BWD_MODE", "single")
        for name in ("lora_fwd_single_pass", "lora_bwd_single_pass"):  # record that they ran
            real = getattr(sp, name)
            monkeypatch.setattr(sp, name, lambda *a, _r=real, _n=name, **k: taken.append(_n) or _r(*a, **k))
        backend = "triton"
    reason = backends.available_backends(torch.empty(1, 16, device="cuda", dtype=torch.bfloat16))[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    (k, n), r, p, seed, s = BIG_SHAPES[shape], 16, 0.1, 2**35 + 3, 2.0
    past = 2**31 // max(k, n)  # the first row that starts beyond element 2**31 (of x, or of y and dY)
    m = past + 1000
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=dt, generator=g).requires_grad_(True)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(dt)
    A = (torch.randn(r, k, device="cuda", generator=g) * k**-0.5).to(dt).requires_grad_(True)
    B = (torch.randn(n, r, device="cuda", generator=g) * r**-0.5).to(dt).requires_grad_(True)
    dy = torch.randn(m, n, device="cuda", dtype=dt, generator=g)
    y = lora_linear(x, w, A, B, scaling=s, dropout_p=p, seed=seed, backend=backend, dropout_mask=mask_mode)
    y.backward(dy)
    if single:
        assert taken == ["lora_fwd_single_pass", "lora_bwd_single_pass"], "the single-pass kernels did not run"
    rows = torch.cat([torch.arange(0, 8), torch.arange(past - 4, past + 4), torch.arange(m - 8, m)])
    rows = rows.cuda()
    keep = keep_rows(seed, rows, k, p)
    x64, dy64 = x.detach()[rows].double(), dy[rows].double()
    w64, A64, B64 = w.double(), A.detach().double(), B.detach().double()
    h = x64 * keep / (1 - p)
    y_ref = x64 @ w64.t() + s * (h @ A64.t()) @ B64.t()
    assert_close_ref(y[rows], y_ref, [dt], "output rows around element 2**31")
    dx_ref = dy64 @ w64 + (s * dy64 @ B64 @ A64) * keep / (1 - p)
    assert_close_ref(x.grad[rows], dx_ref, [dt], "dx rows around element 2**31")
    # dA, dB reduce over all rows: a float32 reference, in chunks of rows
    dA = torch.zeros(r, k, device="cuda", dtype=torch.float64)
    dB = torch.zeros(n, r, device="cuda", dtype=torch.float64)
    for start in range(0, m, 65536):
        idx = torch.arange(start, min(start + 65536, m), device="cuda")
        hc = x.detach()[idx].float() * keep_rows(seed, idx, k, p) / (1 - p)
        tc = hc @ A.detach().float().t()
        dyc = dy[idx].float()
        dB += (s * dyc.t() @ tc).double()
        dA += ((s * dyc @ B.detach().float()).t() @ hc).double()
    assert_close_ref(A.grad, dA, [dt], "dA over > 2**31 elements")
    assert_close_ref(B.grad, dB, [dt], "dB over > 2**31 elements")


# ------------------------------------------------------------------------------------------------
# 64-bit offsets without 13 GB: views with strides of 2**25-2**30 elements, in the interpreter (CPU)

# what each case must launch: the path it names ran (pointer, TMA, single-pass; the one-read dY kernel; dA apart)
BIG_LAUNCHES = {
    "pointer": ["_shrink_kernel", "_fwd_kernel", "_bwd_dy_kernel", "_bwd_dx_kernel"],
    "pointer-rows-dy1": ["_shrink_kernel", "_fwd_kernel", "_bwd_dy1_kernel", "_bwd_dx_kernel"],
    "pointer-rows-dy1-parts": ["_shrink_kernel", "_fwd_kernel", "_bwd_dy1_kernel", "_bwd_dx_kernel"],
    "tma": ["_shrink_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel", "_bwd_dx_tma_kernel"],
    "tma-rows-da-separate": ["_shrink_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel", "_bwd_dx_tma_kernel",
                             "_bwd_dx_kernel"],
    "single": ["_fwd_single_pass_kernel"] * 2 + ["_bwd_single_pass_kernel"] * 2 + ["_bwd_dx_kernel"],
}  # fmt: skip


@pytest.fixture(scope="module")
def big_offsets() -> dict:
    """tests/_big_offsets_worker.py's Triton cases, in a process of its own (a 32-bit offset segfaults it)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton (its CPU interpreter runs the kernels)")
    run = big.run_worker([], {"TRITON_INTERPRET": "1"})
    if "skip" in run:
        pytest.skip(run["skip"])
    return run


@pytest.mark.parametrize("case", list(big.CASES))
def test_64_bit_offsets_in_the_interpreter(big_offsets, case):
    """Each input a view whose row or column index times its stride passes 2**31 (x, weight, lora_A, lora_B and dY
    at once): forward and every gradient against float64, on the pointer, TMA and single-pass paths. The kernels' own
    buffers too (y, T, the bitmask, dT, dX: rows far apart; three split partials of T or dT: the third far off), as
    the launchers' allocator hands them out (``FarBuffers``). A kernel that forms such an offset in 32 bits wraps it
    negative and reads outside the storage: the worker segfaults (on a GPU, an illegal address) or the values are
    wrong. (More than 2**31 elements: test_more_than_2_pow_31_elements, GPU.)"""
    layout = big.CASES[case][0]
    big.check_case(big_offsets, case, layout, BIG_LAUNCHES.get(case) or BIG_LAUNCHES[case.split("-")[0]])


def test_rank_strides_past_int32_are_compacted():
    """The kernels index the rank in 32 bits: lora_A / lora_B whose rank stride would carry that past 2**31 are
    copied with the rank innermost; any other layout passes through untouched (no copy, the same tensor)."""
    pytest.importorskip("triton")
    from lora_kernels.triton_ops.lora_linear import _rank_offsets_fit

    A, B = torch.randn(16, 40), torch.randn(24, 16)
    assert all(a is b for a, b in zip(_rank_offsets_fit(A, B), (A, B), strict=True))
    At, Bt = torch.randn(40, 16).t(), torch.randn(16, 24).t()  # (K, r)- and (r, N)-stored: strides 1 and r
    assert all(a is b for a, b in zip(_rank_offsets_fit(At, Bt), (At, Bt), strict=True))
    try:  # 4 GiB of address space; the rows touched are 40 and 24 elements each
        store = torch.empty(2**31 + 256, dtype=torch.float16)
    except RuntimeError as e:  # an address-space limit (ulimit -v, strict overcommit)
        pytest.skip(f"cannot reserve 4 GiB of address space: {e}")
    A, B = A.half(), B.half()
    wide_A = store.as_strided((16, 40), (2**31 // 15 + 1, 1))  # row 15 starts past element 2**31
    wide_B = store.as_strided((24, 16), (1, 2**31 // 15 + 1), 64)  # (and beside wide_A's rows, not on them)
    with torch.no_grad():
        wide_A.copy_(A)
        wide_B.copy_(B)
    A2, B2 = _rank_offsets_fit(wide_A, wide_B)
    assert A2.stride() == (1, 16) and B2.stride() == (16, 1)
    assert torch.equal(A2, A) and torch.equal(B2, B)
