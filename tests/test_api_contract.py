"""The autograd contract of ``lora_linear`` that PyTorch users rely on beyond one backward pass:
double backward (``create_graph=True``), functorch transforms, autocast's treatment of float64,
``LoRALinear`` under deepcopy and dtype casts.

Run over the reference, the Triton backend (the CPU interpreter without a GPU) and the CUDA
backend's autograd.Function on CPU tensors over a float64 model of the extension (as in
tests/test_dispatch_modes.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels.cuda_ops import _ext
from lora_kernels.cuda_ops import lora_linear as cuda_ll
from lora_kernels.reference import lora_linear_ref

from ._utils import HAS_CUDA, assert_close_ref
from .test_dispatch_modes import _ModelExt

DEVICE = "cuda" if HAS_CUDA else "cpu"
M, K, N, R = 37, 40, 24, 4


@pytest.fixture(params=["torch", "triton", "cuda-model"])
def backend(request, monkeypatch) -> str:
    if request.param == "cuda-model":
        monkeypatch.setattr(_ext, "get_ext", lambda build=True: _ModelExt())
        return request.param
    reason = backends.available_backends(torch.empty(1, 16, device=DEVICE))[request.param]
    if reason is not None:
        pytest.skip(f"backend {request.param!r} cannot run here: {reason}")
    return request.param


def _call(backend, x, w, a, b, bias, lbias, **kw):
    if backend == "cuda-model":  # the CUDA backend's Function on CPU tensors (2-D contract)
        return cuda_ll.lora_linear_2d(x, w, bias, a, b, lbias, kw["scaling"], kw["dropout_p"], kw["seed"], "bitmask")
    return lk.lora_linear(x, w, a, b, bias, lbias, backend=backend, **kw)


def _leaves(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device, dtype)

    x, w = rnd(M, K), rnd(N, K, std=K**-0.5)
    a, b = rnd(R, K, std=K**-0.5), rnd(N, R, std=R**-0.5)
    bias, lbias = rnd(N, std=0.1), rnd(N, std=0.1)
    return x, w, a, b, bias, lbias


@pytest.mark.parametrize("dy_from_y", [True, False], ids=["dy-depends-on-y", "constant-dy"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-x-fp32-adapters"])
def test_double_backward_matches_reference(backend, dy_from_y, x_dtype):
    """Gradients taken with create_graph=True are differentiable and right (a gradient penalty):
    never silently constant. With a constant dY the first-order grads still depend on x, A and B
    through the tensors saved for backward, so that path is checked on its own. With fp16 x, W and
    bias next to fp32 adapters, each stand-in bias of the double-backward graph must take its own
    parameter's dtype."""
    device = "cpu" if backend == "cuda-model" else DEVICE
    kw = dict(scaling=1.5, dropout_p=0.25, seed=11)
    base = _leaves(device)
    c = torch.randn(M, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    dtypes = [x_dtype, torch.float32]

    def to_kernel(t, i):  # x, weight, bias in x's dtype; the adapters fp32
        return t.detach().to(x_dtype if i in (0, 1, 4) else torch.float32)

    def second_order(cast, fn):
        x, w, a, b, bias, lbias = (cast(t, i) for i, t in enumerate(base))
        leaves = [t.requires_grad_(True) for t in (x, a, b, lbias)]
        y = fn(x, w, a, b, bias, lbias)
        loss = (y * cast(c, 0).to(y.dtype)).sum() + (0.5 * (y * y).sum() if dy_from_y else 0.0)
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        # Scaled so that the second-order terms stay within fp16 range (they reach ~5e6 unscaled).
        penalty = 1e-3 * sum((g.float() * g.float()).sum() for g in first)
        return first, torch.autograd.grad(penalty, leaves, allow_unused=True)

    def ref(x, w, a, b, bias, lbias):
        return lora_linear_ref(x, w, a, b, bias, lbias, 1.5, 0.25, True, 11)

    got_first, got = second_order(to_kernel, lambda *t: _call(backend, *t, **kw))
    want_first, want = second_order(lambda t, i: t.detach().double(), ref)
    for name, g, r in zip(("x", "lora_A", "lora_B", "lora_bias"), got_first, want_first, strict=True):
        assert_close_ref(g, r, dtypes, f"d{name}")
    for name, g, r in zip(("x", "lora_A", "lora_B", "lora_bias"), got, want, strict=True):
        if r is None:  # the penalty does not depend on it
            assert g is None or not g.any(), name
            continue
        assert g is not None, f"second-order gradient of {name} missing"
        assert_close_ref(g, r, dtypes, f"d²/d{name}")


def test_backward_without_create_graph_stays_on_the_kernels(monkeypatch):
    """The double-backward path (the reference's graph) is taken only under create_graph=True."""
    reason = backends.available_backends(torch.empty(1, 16, device=DEVICE))["triton"]
    if reason is not None:
        pytest.skip(reason)
    from lora_kernels.triton_ops import lora_linear as tri

    calls = []
    real = tri.lora_bwd
    monkeypatch.setattr(tri, "lora_bwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, a, b, bias, lbias = _leaves(DEVICE)
    a.requires_grad_(True)
    b.requires_grad_(True)
    y = lk.lora_linear(x, w, a, b, bias, lbias, scaling=2.0, backend="triton")
    torch.autograd.grad(y.sum(), (a, b), retain_graph=True)
    assert calls == [1]
    ga, _ = torch.autograd.grad(y.sum(), (a, b), create_graph=True)
    assert calls == [1] and ga.requires_grad  # dA = s·(dY·B)ᵀ·x depends on B


def test_autocast_leaves_float64_alone():
    """Autocast does not cast float64 (F.linear under autocast stays float64): neither does lora_linear."""
    x, w, a, b, bias, lbias = (t.double() for t in _leaves("cpu"))
    want = lk.lora_linear(x, w, a, b, bias, lbias, scaling=2.0, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, w, bias).dtype == torch.float64
        got = lk.lora_linear(x, w, a, b, bias, lbias, scaling=2.0, backend="torch")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_functorch_transforms_on_the_triton_backend_raise():
    """vmap / torch.func.grad / forward-mode AD: the reference runs them; the Triton kernels refuse
    with PyTorch's error, never a silently wrong result."""
    reason = backends.available_backends(torch.empty(1, 16, device=DEVICE))["triton"]
    if reason is not None:
        pytest.skip(reason)
    x, w, a, b, _, _ = _leaves(DEVICE)

    def f(backend):
        return lambda a_: lk.lora_linear(x, w, a_, b, scaling=2.0, backend=backend).sum()

    ga = torch.func.grad(f("torch"))(a)
    a_leaf = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(lk.lora_linear(x, w, a_leaf, b, scaling=2.0, backend="torch").sum(), a_leaf)
    torch.testing.assert_close(ga, want)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(f("triton"))(a)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.vmap(lambda x_: lk.lora_linear(x_, w, a, b, backend="triton"))(x[None])
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        lk.lora_linear(fwAD.make_dual(x, torch.ones_like(x)), w, a, b, backend="triton")


def test_layer_deepcopy_and_dtype_cast_keep_merged_state():
    """A deep copy is independent (its own parameters and merged flag); ``.to(dtype)`` casts the
    adapters with the base and the copy still unmerges to the same layer."""
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(K, N), R, lora_alpha=8, lora_bias=True, backend="torch").eval()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_bias.normal_()
    x = torch.randn(3, K)
    y_unmerged = layer(x)
    layer.merge()
    clone = copy.deepcopy(layer)
    assert clone.merged and clone.lora_A is not layer.lora_A and clone.weight is not layer.weight
    torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)
    clone.unmerge()
    assert layer.merged and not torch.equal(clone.weight, layer.weight)
    torch.testing.assert_close(clone(x), y_unmerged)
    bf = copy.deepcopy(layer).to(torch.bfloat16)
    assert bf.merged and {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    bf.unmerge()
    y = bf(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close_ref(y, y_unmerged.double(), [torch.bfloat16], "bf16 copy")
