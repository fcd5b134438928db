"""torch.compile: ``lora_linear`` (and ``LoRALinear``) compile with ``fullgraph=True`` — no graph
breaks — and the compiled model matches eager, forward and backward.

On CPU: backends "torch" and "triton" (the interpreter) under ``aot_eager`` (the no-graph-break
check, cheap) plus one inductor graph of "torch" (inductor compiles C++ with gcc: slow, so one graph
only). On a GPU: "triton" and "cuda" under inductor. Ops registered in the ``lora_kernels``
torch.library namespace get ``torch.library.opcheck`` with the arguments they receive in a real
forward/backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_kernels as lk
from lora_kernels import backends
from tests._utils import HAS_CUDA, assert_close_ref, requires_gpu

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _skip_unless_available(backend: str, dtype: torch.dtype = torch.float32) -> None:
    reason = backends.available_backends(torch.empty(1, 16, device=DEVICE, dtype=dtype))[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")


class TinyLoRAModel(nn.Module):
    """``x: (B, T, K)`` -> LoRA linear (K -> H) -> GELU -> LoRA linear (H -> K) + residual.

    Dropout seeds are fixed per layer: a ``seed=None`` call draws one with ``.item()``, which
    is a data-dependent Python int (see test_seed_none_under_fullgraph).
    """

    def __init__(self, K: int = 32, H: int = 48, r: int = 8, p: float = 0.1, backend: str = "torch",
                 dtype: torch.dtype = torch.float32, adapter_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        g = torch.Generator().manual_seed(0)
        ad = adapter_dtype or dtype

        def param(*shape, std, dt, grad=True):
            t = (torch.randn(*shape, generator=g) * std).to(dt)
            return nn.Parameter(t, requires_grad=grad)

        self.w1 = param(H, K, std=K**-0.5, dt=dtype, grad=False)
        self.b1 = param(H, std=0.1, dt=dtype, grad=False)
        self.A1, self.B1 = param(r, K, std=K**-0.5, dt=ad), param(H, r, std=r**-0.5, dt=ad)
        self.lb1 = param(H, std=0.1, dt=ad)
        self.w2 = param(K, H, std=H**-0.5, dt=dtype, grad=False)
        self.A2, self.B2 = param(r, H, std=H**-0.5, dt=ad), param(K, r, std=r**-0.5, dt=ad)
        self.p, self.backend = p, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = lk.lora_linear(x, self.w1, self.A1, self.B1, self.b1, self.lb1, scaling=2.0, dropout_p=self.p,
                           training=self.training, seed=1234, backend=self.backend)  # fmt: skip
        h = torch.nn.functional.gelu(h)
        y = lk.lora_linear(h, self.w2, self.A2, self.B2, scaling=0.5, dropout_p=self.p, training=self.training,
                           seed=2**40 + 5, backend=self.backend, dropout_mask="regenerate")  # fmt: skip
        return x + y


def _fwd_bwd(model: nn.Module, fn, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    y = fn(xg)
    y.backward(torch.cos(torch.arange(y.numel(), device=y.device, dtype=torch.float32)).view_as(y).to(y.dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), xg.grad.clone(), grads


def _assert_compiled_matches_eager(model: nn.Module, x: torch.Tensor, backend: str, dtypes) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y_e, dx_e, g_e = _fwd_bwd(model, model, x)
    y_c, dx_c, g_c = _fwd_bwd(model, compiled, x)
    assert_close_ref(y_c, y_e.double(), dtypes, "output")
    assert_close_ref(dx_c, dx_e.double(), dtypes, "dx")
    assert g_c.keys() == g_e.keys() and g_e
    for name in g_e:
        assert_close_ref(g_c[name], g_e[name].double(), dtypes, f"grad {name}")


def _x(dtype=torch.float32, shape=(2, 5, 32)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fullgraph_no_graph_break_aot_eager(training, backend):
    # "triton" on CPU: the interpreter, with the ops kept whole in the graph (see
    # triton_ops/lora_linear.py, _opaque_under_functionalization); on a GPU AOTAutograd decomposes them
    # into their wrap_triton kernels.
    _skip_unless_available(backend)
    model = TinyLoRAModel(backend=backend).to(DEVICE).train(training)
    _assert_compiled_matches_eager(model, _x(), "aot_eager", [torch.float32])


def test_varying_sequence_lengths_compile_once_dynamic():
    """Batches of varying length (the usual fine-tuning case): torch.compile recompiles once with M
    dynamic (its automatic dynamic shapes) and then serves every length from that graph, matching eager
    (forward, dx, every gradient) at each. The Triton launchers' host code under a symbolic M is checked
    in test_lora_linear.py::test_host_code_under_symbolic_shapes; here they run as the op's fake
    implementation under a symbolic M (in the interpreter, or on a GPU)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    backend = "triton"
    _skip_unless_available(backend)
    model = TinyLoRAModel(K=64, H=96, r=16, backend=backend).to(DEVICE).train()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    frames = []
    for T in (5, 7, 9, 40):
        x = torch.randn(2, T, 64, device=DEVICE)
        y_e, dx_e, g_e = _fwd_bwd(model, model, x)
        y_c, dx_c, g_c = _fwd_bwd(model, compiled, x)
        assert_close_ref(y_c, y_e.double(), [torch.float32], f"output T={T}")
        assert_close_ref(dx_c, dx_e.double(), [torch.float32], f"dx T={T}")
        for name in g_e:
            assert_close_ref(g_c[name], g_e[name].double(), [torch.float32], f"{name} T={T}")
        frames.append(counter.frame_count)
    assert frames == [1, 2, 2, 2], frames


def test_inductor_matches_eager_reference_backend():
    # One inductor graph on CPU (C++ codegen through gcc), with dropout: the mask generator is an
    # opaque custom op (lora_kernels::dropout_keep_mask), so inductor does not inline 10 Philox rounds.
    model = TinyLoRAModel(backend="torch", p=0.1).to(DEVICE).train()
    _assert_compiled_matches_eager(model, _x(), "inductor", [torch.float32])


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_inductor_gpu_backends(backend, dtype):
    _skip_unless_available(backend, dtype)
    model = TinyLoRAModel(K=64, H=96, r=16, backend=backend, dtype=dtype, adapter_dtype=torch.float32)
    _assert_compiled_matches_eager(model.cuda().train(), _x(dtype, (4, 33, 64)), "inductor", [dtype])


@requires_gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reduce_overhead_draws_a_new_mask_per_call(backend):
    """mode="reduce-overhead" replays CUDA graphs: a seed drawn once at capture would give every call
    the same dropout mask (eager capture refuses seed=None for that reason, see api.new_seed). The
    compiled draw must stay per call. (Inductor draws other seeds than eager under manual_seed, its
    own RNG lowering: checked on CPU, so correctness is checked with explicit seeds.)"""
    _skip_unless_available(backend, torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(96, 64, device="cuda", generator=gen).to(torch.bfloat16)
    A = torch.randn(16, 64, device="cuda", generator=gen)
    B = torch.randn(96, 16, device="cuda", generator=gen)
    x = torch.randn(128, 64, device="cuda", generator=gen).to(torch.bfloat16)

    def f(x, seed=None):
        return lk.lora_linear(x, w, A, B, scaling=2.0, dropout_p=0.5, seed=seed, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, mode="reduce-overhead")
    ys = [compiled(x).clone() for _ in range(4)]  # warm-up, capture, replays
    for i in range(1, 4):
        assert not torch.equal(ys[i], ys[i - 1]), f"calls {i - 1} and {i} used the same dropout mask"
    assert all(torch.isfinite(y).all() for y in ys)
    for seed in (5, 6, 7):
        assert_close_ref(compiled(x, seed).clone(), f(x, seed).double(), [torch.bfloat16], f"seed {seed}")
    torch._dynamo.reset()


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_layer_module_compiles(base_kind):
    LoRALinear = lk.LoRALinear
    if base_kind == "conv1d":  # transformers' Conv1D: the (K, N) weight enters the graph as its (N, K) view
        transformers = pytest.importorskip("transformers", reason="Conv1D is transformers'")
        base = transformers.pytorch_utils.Conv1D(24, 32).to(DEVICE)
    else:
        base = nn.Linear(32, 24).to(DEVICE)
    layer = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.0, lora_bias=True, backend="torch")
    with torch.no_grad():  # B starts at zero (PEFT init): make the low-rank path visible
        layer.lora_B.normal_(generator=torch.Generator(device=DEVICE).manual_seed(3))
    for training in (True, False):
        _assert_compiled_matches_eager(layer.train(training), _x(shape=(3, 32)), "aot_eager", [torch.float32])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_seed_none_under_fullgraph(compiler):
    """With dropout and no seed, lora_linear draws one per call (``torch.randint(...).item()``,
    as LoRALinear does in training). Compiled, that must trace (an unbacked scalar), draw a new
    mask per call, and draw the same seeds as eager under ``torch.manual_seed``. Inductor draws random
    numbers its own way (its seeds differ from eager's, as for torch's own dropout) unless
    ``torch._inductor.config.fallback_random = True``, what the README tells users comparing compiled
    with eager: with it, the seeds are eager's."""
    w, A, B = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4)

    def f(x):
        return lk.lora_linear(x, w, A, B, dropout_p=0.5, backend="torch")

    torch._dynamo.reset()
    x = torch.randn(64, 16)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(f, fullgraph=True, backend=compiler)
        torch.manual_seed(3)
        y1, y2 = compiled(x), compiled(x)
    torch.manual_seed(3)
    e1, e2 = f(x), f(x)
    assert not torch.equal(y1, y2), "two calls with seed=None used the same dropout mask"
    assert torch.equal(y1, e1) and torch.equal(y2, e2), "compiled calls drew other seeds than eager"


# ------------------------------------------------------------------------------------------------
# torch.library ops of the lora_kernels namespace


class _RecordLoraOps(TorchDispatchMode):
    """Records (op, args, kwargs) of every op in the ``namespace`` torch.library namespace that runs."""

    def __init__(self, namespace: str = "lora_kernels") -> None:
        super().__init__()
        self.namespace = namespace
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == self.namespace:
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
            self.calls.append((func, tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


# Only the cuda backend calls its torch.library ops in eager mode; the torch and triton backends
# call theirs under torch.compile only, and those ops are opcheck'ed directly (test_reference.py,
# test_lora_linear.py::test_triton_ops_*).
@pytest.mark.parametrize("backend", ["cuda"])
def test_opcheck_registered_ops(backend):
    _skip_unless_available(backend)
    if HAS_CUDA:
        x_dt = torch.bfloat16
    else:
        x_dt = torch.float32  # the interpreter: no bf16
    model = TinyLoRAModel(K=64, H=96, r=16, backend=backend, dtype=x_dt).to(DEVICE).train()
    x = _x(x_dt, (2, 9, 64)).requires_grad_(True)
    rec = _RecordLoraOps()
    with rec:
        model(x).sum().backward()
    if not rec.calls:
        pytest.skip(f"backend {backend!r} registers no torch.library ops in the lora_kernels namespace")
    seen = set()
    for op, args, kwargs in rec.calls:
        if op in seen:
            continue
        seen.add(op)
        torch.library.opcheck(op, args, kwargs)


@torch.library.custom_op("lora_kernels_selftest::scale_rows", mutates_args=())
def _scale_rows(x: torch.Tensor, s: float) -> torch.Tensor:
    return x * s


@_scale_rows.register_fake
def _(x, s):
    return torch.empty_like(x)


def test_op_recorder_sees_custom_ops():
    """The recorder behind test_opcheck_registered_ops really sees custom ops (a self-check)."""
    rec = _RecordLoraOps("lora_kernels_selftest")
    with rec:
        torch.ops.lora_kernels_selftest.scale_rows(torch.randn(3, 4), 2.0)
    assert [op.name() for op, _, _ in rec.calls] == ["lora_kernels_selftest::scale_rows"]
    op, args, kwargs = rec.calls[0]
    torch.library.opcheck(op, args, kwargs)
