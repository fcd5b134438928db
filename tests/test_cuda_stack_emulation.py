"""backend="cuda" end to end on the CPU: the CUDA backend's Python layer over its real host code.

``lora_linear(..., backend="cuda")``, ``LoRALinear`` and a patched PEFT model run here through
``cuda_ops/lora_linear.py`` (autograd.Function, the ``torch.library`` ops and their fake
implementations, the eager shortcut) into ``csrc/lora_ops.cpp`` compiled for the CPU over the emulated
kernels (``tests/conftest.py``'s ``cuda_ops_emu``; what that emulates and what it cannot: see
``tests/test_cuda_ops_emulation.py``).

The two halves are tested apart elsewhere: ``test_dispatch_modes.py`` runs the Python layer over a
float64 model of the extension's contract, ``test_cuda_ops_emulation.py`` calls lora_ops.cpp's entry
points directly. Here they meet, so a disagreement between what the Python layer passes or expects and
what lora_ops.cpp takes or returns (argument order, which gradients come back empty, the gradients'
dtypes, the saved mask, Σ dY recovered from dlora_bias, output strides the fake implementations must
match) fails without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.cuda_ops import _ext
from lora_kernels.reference import lora_linear_ref

from . import _big_offsets_worker as big
from ._utils import assert_close_ref

H100, A100 = (9, 0), (8, 0)
AUTO = 0  # lora_ops.h's GemmBackend::kAuto


def _rnd(g, *shape, dt, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)


def _make(lead, K, N, r, xdt, adt, bias, lora_bias, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # x (M, K) column-major
        x = _rnd(g, K, *lead, dt=xdt).t()
    elif layout == "sliced":  # every other column of a wider tensor
        x = _rnd(g, *lead, 2 * K, dt=xdt)[..., ::2]
    else:
        x = _rnd(g, *lead, K, dt=xdt)
    return {
        "x": x,
        "weight": _rnd(g, N, K, dt=xdt, scale=max(K, 1) ** -0.5),
        "lora_A": _rnd(g, r, K, dt=adt, scale=max(K, 1) ** -0.5),
        "lora_B": _rnd(g, N, r, dt=adt, scale=r**-0.5),
        "bias": _rnd(g, N, dt=xdt) if bias else None,
        "lora_bias": _rnd(g, N, dt=adt) if lora_bias else None,
        "dy": _rnd(g, *lead, N, dt=xdt),
    }


NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "lora_bias")


def _check_against_reference(t, trainable, scaling, p, seed, mask_mode, dtypes):
    """lora_linear(backend="cuda") and its gradients for ``trainable`` against the float64 reference."""
    leaves = {n: (t[n].requires_grad_() if n in trainable and t[n] is not None else t[n]) for n in NAMES}
    y = lk.lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], leaves["bias"],
                       leaves["lora_bias"], scaling=scaling, dropout_p=p, seed=seed, backend="cuda",
                       dropout_mask=mask_mode)  # fmt: skip
    ref_leaves = {n: (None if v is None else v.detach().double().requires_grad_(n in trainable)) for n, v in t.items()}
    y_ref = lora_linear_ref(ref_leaves["x"], ref_leaves["weight"], ref_leaves["lora_A"], ref_leaves["lora_B"],
                            ref_leaves["bias"], ref_leaves["lora_bias"], scaling, p, True, seed)  # fmt: skip
    assert y.dtype == t["x"].dtype and y.shape == y_ref.shape
    assert_close_ref(y, y_ref, dtypes, "y")
    want = [n for n in NAMES if n in trainable and t[n] is not None]
    grads = torch.autograd.grad(y, [leaves[n] for n in want], t["dy"])
    refs = torch.autograd.grad(y_ref, [ref_leaves[n] for n in want], t["dy"].double())
    for n, g, ref in zip(want, grads, refs, strict=True):
        assert g.dtype == t[n].dtype, f"d{n} came back as {g.dtype}, its parameter is {t[n].dtype}"
        assert_close_ref(g, ref, dtypes, f"d{n}")


# (leading dims, K, N, r, x dtype, adapter dtype, p, mask mode, bias, lora_bias, x layout, emulated GPU)
CASES = [
    ((2, 5), 24, 40, 5, torch.bfloat16, torch.float32, 0.3, "bitmask", True, True, "contiguous", H100),
    ((2, 5), 24, 40, 5, torch.bfloat16, torch.float32, 0.3, "regenerate", True, True, "contiguous", A100),
    ((9,), 32, 16, 4, torch.float16, torch.float16, 0.1, "bitmask", False, True, "transposed", H100),
    ((3, 4), 16, 24, 8, torch.bfloat16, torch.bfloat16, 0.0, "bitmask", True, False, "sliced", H100),
    ((7,), 20, 13, 3, torch.float16, torch.float32, 0.5, "bitmask", True, True, "contiguous", H100),  # unaligned
    ((6,), 19, 11, 2, torch.float32, torch.float32, 0.3, "regenerate", False, False, "contiguous", A100),
    ((1,), 8, 8, 1, torch.bfloat16, torch.float32, 0.5, "bitmask", True, True, "contiguous", H100),
    ((0, 3), 16, 8, 2, torch.bfloat16, torch.float32, 0.1, "bitmask", True, True, "contiguous", H100),
    # p next to 1 (threshold 65535, scale 2¹⁶): only elements whose draw is 65535 are kept (seed 4321 + 71: one)
    ((8,), 40, 71, 2, torch.float32, torch.float32, 1 - 2**-16, "bitmask", True, True, "contiguous", A100),
]


def _case_id(c):
    lead, K, N, r, xdt, adt, p, mode, b, lb, layout, gpu = c
    dts = str(xdt).split(".")[1] + ("" if adt == xdt else "+" + str(adt).split(".")[1])
    return f"{'x'.join(map(str, lead))}x{K}x{N}-r{r}-{dts}-p{p}-{mode}-b{int(b)}{int(lb)}-{layout}-sm{gpu[0]}{gpu[1]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_backend_matches_reference_end_to_end(emu_cuda, cuda_ops_emu, case):
    lead, K, N, r, xdt, adt, p, mode, b, lb, layout, gpu = case
    cuda_ops_emu.set_device(*gpu, True)
    t = _make(lead, K, N, r, xdt, adt, b, lb, layout, seed=K + N)
    _check_against_reference(t, ("x", "lora_A", "lora_B", "lora_bias"), 1.7, p, 4321 + N, mode, [xdt, adt])
    assert emu_cuda.calls == ["lora_fwd", "lora_bwd"], "the call did not run the extension's forward and backward"
    assert emu_cuda.fwd_save_mask == (p > 0 and mode == "bitmask"), "the mask kept for backward is not the mode's"


@pytest.mark.parametrize(
    "trainable",
    [("x", "weight", "bias", "lora_A", "lora_B", "lora_bias"), ("x", "lora_B", "lora_bias", "bias"),
     ("lora_A", "bias", "lora_bias"), ("x",), ("lora_B",)],
    ids=["everything", "lora_A-frozen", "lora_B-frozen", "x-only", "lora_B-only"],
)  # fmt: skip
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"])
def test_partial_backward_end_to_end(emu_cuda, trainable, adt):
    """Frozen parts and a trained base layer: lora_bwd is asked for only what autograd needs, and the
    Python layer's own pieces (dW, db from Σ dY, which it recovers from the fp32 dlora_bias the dB pass
    returns, or sums itself for 16-bit adapters or a frozen lora_B) agree with the reference."""
    t = _make((2, 6), 24, 16, 4, torch.bfloat16, adt, True, True, seed=5)
    _check_against_reference(t, trainable, 0.5, 0.25, 77, "bitmask", [torch.bfloat16, adt])
    need = tuple(n in trainable for n in ("x", "lora_A", "lora_B"))
    assert emu_cuda.bwd_needs == need, f"lora_bwd was asked for (dx, dA, dB) = {emu_cuda.bwd_needs}, needs {need}"


def test_layer_trains_like_the_reference_backend(emu_cuda):
    """A few optimizer steps of LoRALinear(backend="cuda") against the same layer on backend="torch"."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True).to(torch.bfloat16)
    layers = {}
    for backend in ("cuda", "torch"):
        layer = lk.LoRALinear(nn.Linear(24, 40).to(torch.bfloat16), r=4, lora_alpha=8, lora_dropout=0.2,
                              lora_bias=True, backend=backend)  # fmt: skip
        layer.base_layer.load_state_dict(base.state_dict())
        with torch.no_grad():
            layer.lora_A.copy_(torch.linspace(-0.3, 0.3, layer.lora_A.numel()).view_as(layer.lora_A))
        layers[backend] = layer
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for layer in layers.values():
        opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
        torch.manual_seed(11)  # the same dropout seeds, drawn per call
        for _ in range(3):
            opt.zero_grad()
            (layer(x).float() ** 2).mean().backward()
            opt.step()
    cuda, ref = layers["cuda"], layers["torch"]
    for name in ("lora_A", "lora_B", "lora_bias"):
        got, want = getattr(cuda, name), getattr(ref, name)
        assert want.detach().abs().max() > 0, name
        assert_close_ref(got.detach(), want.detach().double(), [torch.bfloat16, torch.float32], name)
    assert emu_cuda.calls.count("lora_fwd") == 3 and emu_cuda.calls.count("lora_bwd") == 3


def test_patched_peft_model_matches_peft(emu_cuda):
    """lora_kernels.patch(model, backend="cuda") on a PEFT model: outputs and adapter gradients as PEFT's."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(32, 24)
            self.v = nn.Linear(24, 16)

        def forward(self, x):
            return self.v(torch.relu(self.q(x)))

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(Net().to(torch.bfloat16), cfg)
    x = torch.randn(2, 5, 32).to(torch.bfloat16)

    def run():
        model.zero_grad()
        y = model(x)
        y.float().square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return y.detach(), grads

    y_peft, g_peft = run()
    report = lk.patch(model, backend="cuda", log=False)
    assert len(report.accelerated) == 2, str(report)
    y, g = run()
    assert emu_cuda.calls.count("lora_fwd") == 2 and emu_cuda.calls.count("lora_bwd") == 2
    dts = [torch.bfloat16, torch.float32]
    assert_close_ref(y, y_peft.double(), dts, "y")
    assert g.keys() == g_peft.keys() and len(g) == 4
    for n in g:
        assert_close_ref(g[n], g_peft[n].double(), dts, n)


def test_opcheck_on_the_host_code(cuda_ops_emu, monkeypatch):
    """torch.library.opcheck of cuda_lora_fwd / cuda_lora_bwd with lora_ops.cpp behind them: schema,
    autograd registration, and the fake implementations against the real outputs' shapes, dtypes and
    strides (what torch.compile plans memory with)."""
    monkeypatch.setattr(_ext, "get_ext", lambda build=True: cuda_ops_emu)
    t = _make((9,), 24, 16, 4, torch.bfloat16, torch.float32, True, True, seed=3)
    fwd = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_bias"])
    for p, save in ((0.2, True), (0.2, False), (0.0, False)):
        torch.library.opcheck(torch.ops.lora_kernels.cuda_lora_fwd.default, (*fwd, 2.0, p, 5, save))
    y, T, bits = torch.ops.lora_kernels.cuda_lora_fwd(*fwd, 2.0, 0.2, 5, True)
    dy = t["dy"]
    for b, needs in ((bits, (True, True, True)), (bits[:0].reshape(0), (False, True, False)),
                     (bits, (True, False, False)), (bits, (False, False, True))):  # fmt: skip
        args = (dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], T, b.contiguous(), 2.0, 0.2, 5, *needs)
        torch.library.opcheck(torch.ops.lora_kernels.cuda_lora_bwd.default, args)


def test_compiled_call_matches_eager(emu_cuda):
    """torch.compile(fullgraph=True) of a backend="cuda" call traces the ops (their fake implementations
    stand in for lora_ops.cpp) and then runs lora_ops.cpp: the same output and gradients as eager."""
    t = _make((3, 5), 24, 16, 4, torch.bfloat16, torch.float32, True, True, seed=9)

    def f(x, w, a, b, lb):
        return lk.lora_linear(x, w, a, b, None, lb, scaling=2.0, dropout_p=0.2, seed=13, backend="cuda") * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (compiled, f):
        leaves = [t[n].clone().requires_grad_() for n in ("x", "lora_A", "lora_B", "lora_bias")]
        x, a, b, lb = leaves
        y = fn(x, t["weight"], a, b, lb)
        y.backward(t["dy"])
        outs.append((y.detach(), [v.grad for v in leaves]))
    (y_c, g_c), (y_e, g_e) = outs
    assert torch.equal(y_c, y_e)
    for g1, g2 in zip(g_c, g_e, strict=True):
        assert torch.equal(g1, g2)
    assert emu_cuda.calls.count("lora_fwd") == 2 and emu_cuda.calls.count("lora_bwd") == 2


# backend="cuda" with inputs whose row or column index times its stride passes 2**31 (tests/_big_offsets_worker.py)
BIG_CUDA_LAUNCHES = {  # (entry point, the base GEMM's path: lora_ops.h's GemmBackend) per call
    "cuda-emu-rows": [["lora_fwd", 4], ["lora_bwd", 3]],  # concatenated-K sm90, then the accumulating sm90 GEMM
    "cuda-emu-cols": [["lora_fwd", 1], ["lora_bwd", 1]],  # column-major x and dY: cuBLAS
    "cuda-emu-rows-wkn": [["lora_fwd", 4], ["lora_bwd", 3]],
}


@pytest.fixture(scope="module")
def big_offsets_cuda(_cuda_ops_emu_build) -> dict:
    """tests/_big_offsets_worker.py's CUDA cases over this session's emulated extension, in a process of its own
    (a 32-bit offset segfaults it)."""
    run = big.run_worker(["--cuda-emu", _cuda_ops_emu_build.__file__])
    if "skip" in run:
        pytest.skip(run["skip"])
    return run


@pytest.mark.parametrize("case", list(big.CUDA_EMU_CASES))
def test_64_bit_offsets_end_to_end(big_offsets_cuda, case):
    """x, weight, lora_A, lora_B and dY each a view into one storage of 2**32 elements, their rows or columns 2**25
    to 2**30 elements apart, so that index times stride passes 2**31 in every one: lora_ops.cpp's strides and the
    low-rank kernels' offsets are 64-bit (the CUTLASS GEMMs are modelled here: their strides are CuTe's int64)."""
    big.check_case(big_offsets_cuda, case, big.CUDA_EMU_CASES[case][0], BIG_CUDA_LAUNCHES[case])
