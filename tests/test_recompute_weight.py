"""``lora_linear(..., recompute_weight=fn)``: the weight is not kept for backward, ``fn()`` gives it again.

For a weight computed per call (a 4-bit base layer's dequantized copy, tests/test_qlora.py), keeping it
for backward would hold ``N·K`` dense elements per layer until then. Checked per backend: the same
output and gradients as the plain call, bit for bit (the same kernels run), ``fn`` called once, in
backward, and no saved tensor shares the weight's storage.
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import lora_linear_ref

from ._utils import HAS_CUDA, INTERPRET, assert_close_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (INTERPRET or HAS_CUDA), reason="the Triton backend needs a GPU or TRITON_INTERPRET=1"))]  # fmt: skip


def _tensors(M=67, K=80, N=72, r=8, dt=torch.float32, adt=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if HAS_CUDA and not INTERPRET else "cpu"

    def rnd(*s, dtype=dt, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=dev, dtype=dtype)

    return {
        "x": rnd(M, K).requires_grad_(),
        "weight": rnd(N, K, scale=K**-0.5),
        "lora_A": rnd(r, K, dtype=adt, scale=K**-0.5).requires_grad_(),
        "lora_B": rnd(N, r, dtype=adt).requires_grad_(),
        "bias": rnd(N),
        "lora_bias": rnd(N, dtype=adt).requires_grad_(),
        "dy": rnd(M, N),
    }


class _Recorder:
    """The recompute callable plus what autograd saved during the forward (storage pointers)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.calls = weight, 0
        self.saved: list[int] = []

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.weight.clone()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saved.append(t.untyped_storage().data_ptr())
        return t


def _grads(y, t):
    leaves = [t[n] for n in ("x", "lora_A", "lora_B", "lora_bias")]
    return torch.autograd.grad(y, leaves, t["dy"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p, mode", [(0.0, "bitmask"), (0.3, "bitmask"), (0.3, "regenerate")])
def test_same_results_without_keeping_the_weight(backend: str, p: float, mode: str) -> None:
    t = _tensors()
    kw = dict(bias=t["bias"], lora_bias=t["lora_bias"], scaling=0.7, dropout_p=p, seed=1234, backend=backend,
              dropout_mask=mode)  # fmt: skip
    plain = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], **kw)
    want = _grads(plain, t)
    weight = t["weight"].clone()  # a weight of its own, as a dequantized copy would be
    rec = _Recorder(t["weight"])
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda x: x):
        y = lk.lora_linear(t["x"], weight, t["lora_A"], t["lora_B"], recompute_weight=rec, **kw)
    assert rec.calls == 0, "recompute_weight ran in the forward"
    assert weight.untyped_storage().data_ptr() not in rec.saved, "the weight was saved for backward"
    got = _grads(y, t)
    assert rec.calls == 1
    torch.testing.assert_close(y, plain, atol=0, rtol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_the_float64_reference_with_a_trained_weight(backend: str) -> None:
    """Every gradient, the weight's and the bias's included (their grads need no weight, but go through
    the same Function), against the reference in float64."""
    t = _tensors(M=33, K=48, N=40, r=4, dt=torch.float16 if backend == "triton" else torch.float32)
    weight = t["weight"].clone().requires_grad_()
    bias = t["bias"].clone().requires_grad_()
    y = lk.lora_linear(t["x"], weight, t["lora_A"], t["lora_B"], bias, t["lora_bias"], scaling=1.5,
                       dropout_p=0.2, seed=9, backend=backend, recompute_weight=weight.detach().clone)  # fmt: skip
    leaves = [t["x"], weight, bias, t["lora_A"], t["lora_B"], t["lora_bias"]]
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    ref = lora_linear_ref(ref_leaves[0], ref_leaves[1], ref_leaves[3], ref_leaves[4], ref_leaves[2], ref_leaves[5],
                          1.5, 0.2, True, 9)  # fmt: skip
    dtypes = [t["x"].dtype, torch.float32]
    assert_close_ref(y, ref, dtypes, "y")
    got = torch.autograd.grad(y, leaves, t["dy"])
    refs = torch.autograd.grad(ref, ref_leaves, t["dy"].double())
    names = ("x", "weight", "bias", "lora_A", "lora_B", "lora_bias")
    for name, leaf, g, r in zip(names, leaves, got, refs, strict=True):
        assert g.dtype == leaf.dtype, f"d{name} came back as {g.dtype}"
        assert_close_ref(g, r, dtypes, f"d{name}")


def test_cuda_backend_over_its_host_code(emu_cuda) -> None:
    """backend="cuda" on the CPU (the extension's host code over emulated kernels): the weight is not kept."""
    t = _tensors(M=21, K=24, N=40, r=4, dt=torch.bfloat16)
    kw = dict(bias=t["bias"], lora_bias=t["lora_bias"], scaling=0.5, dropout_p=0.25, seed=77, backend="cuda")
    plain = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], **kw)
    want = _grads(plain, t)
    weight = t["weight"].clone()
    rec = _Recorder(t["weight"])
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda x: x):
        y = lk.lora_linear(t["x"], weight, t["lora_A"], t["lora_B"], recompute_weight=rec, **kw)
    assert weight.untyped_storage().data_ptr() not in rec.saved
    got = _grads(y, t)
    assert rec.calls == 1 and emu_cuda.calls[-2:] == ["lora_fwd", "lora_bwd"]
    torch.testing.assert_close(y, plain, atol=0, rtol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_autocast_casts_the_recomputed_weight_too() -> None:
    """Under bf16 autocast an fp32 weight runs as bf16: backward must get the bf16 weight again."""
    t = _tensors(M=9, K=32, N=16, r=2)
    calls = []

    def again() -> torch.Tensor:
        calls.append(1)
        return t["weight"].clone()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], backend="torch", recompute_weight=again)
        plain = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], backend="torch")
    assert y.dtype == torch.bfloat16
    dy = t["dy"].to(torch.bfloat16)
    got = torch.autograd.grad(y, [t["x"], t["lora_A"]], dy)
    want = torch.autograd.grad(plain, [t["x"], t["lora_A"]], dy)
    assert calls == [1]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_a_different_weight_in_backward_is_an_error() -> None:
    t = _tensors(M=5, K=16, N=8, r=2)
    y = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], backend="torch",
                       recompute_weight=lambda: t["weight"][:4])  # fmt: skip
    with pytest.raises(RuntimeError, match=r"recompute_weight\(\) returned \(4, 16\).*was \(8, 16\)"):
        y.sum().backward()
    y = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], backend="torch",
                       recompute_weight=lambda: t["weight"].double())  # fmt: skip
    with pytest.raises(RuntimeError, match="float64"):
        y.sum().backward()
    y = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], backend="torch", recompute_weight=lambda: None)
    with pytest.raises(RuntimeError, match="returned NoneType"):
        y.sum().backward()


def test_not_a_callable_is_a_type_error() -> None:
    t = _tensors(M=5, K=16, N=8, r=2)
    with pytest.raises(TypeError, match="recompute_weight must be a callable"):
        lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], recompute_weight=t["weight"])


def test_no_graph_no_recompute() -> None:
    """Without grad mode there is no backward: the plain path runs and the callable is never called."""
    t = _tensors(M=5, K=16, N=8, r=2)

    def never() -> torch.Tensor:
        raise AssertionError("called")

    with torch.no_grad():
        y = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], recompute_weight=never)
    assert y.grad_fn is None and y.shape == (5, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(backend: str) -> None:
    """backward(create_graph=True) differentiates the reference on the recomputed weight: with a frozen
    weight, second-order gradients equal the plain call's; a weight that requires grad is refused there
    (its recomputed copy has no history: its second-order gradient would silently be lost)."""
    t = _tensors(M=11, K=32, N=16, r=2)
    out = []
    for recompute in (None, t["weight"].clone):
        y = lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling=0.5, dropout_p=0.2, seed=5,
                           backend=backend, recompute_weight=recompute)  # fmt: skip
        gx, ga = torch.autograd.grad(y, [t["x"], t["lora_A"]], t["dy"], create_graph=True)
        out.append(torch.autograd.grad(gx.square().sum() + ga.square().sum(), [t["x"], t["lora_A"], t["lora_B"]]))
    for g, w in zip(*out, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    weight = t["weight"].clone().requires_grad_()
    y = lk.lora_linear(t["x"], weight, t["lora_A"], t["lora_B"], backend=backend, recompute_weight=t["weight"].clone)
    with pytest.raises(RuntimeError, match="create_graph=True.*recompute_weight=None"):
        torch.autograd.grad(y, [t["x"], weight], t["dy"], create_graph=True)


def test_under_torch_compile_it_runs_eagerly_or_says_it_is_eager_only() -> None:
    """Eager only (a Python callable kept for backward is nothing the compiler traces): under torch.compile the call
    breaks the graph and runs eagerly, with the same results and one recompute in backward; with fullgraph=True,
    where a graph break is an error, the error carries the reason."""
    t = _tensors(M=9, K=32, N=24, r=4)
    kw = dict(bias=t["bias"], lora_bias=t["lora_bias"], scaling=0.7, backend="torch")
    want = _grads(lk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], **kw), t)
    rec = _Recorder(t["weight"])

    def f(x):
        return lk.lora_linear(x, t["weight"], t["lora_A"], t["lora_B"], recompute_weight=rec, **kw)

    torch._dynamo.reset()
    got = _grads(torch.compile(f)(t["x"]), t)
    assert rec.calls == 1
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="recompute_weight is eager only"):
        torch.compile(f, fullgraph=True)(t["x"])
    torch._dynamo.reset()
