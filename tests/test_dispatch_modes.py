"""The fused ops under PyTorch's dispatch modes, and eager calls that skip the dispatcher.

* FlopCounterMode: each backend's ops carry FLOP formulas (lora_kernels/flops.py) and count what
  the reference counts through aten, forward and backward, also when the mode was built before the
  backend module registered them.
* FakeTensorMode: forward and backward give fake results of the right shapes and dtypes (the
  registered ops' fake implementations), including a seed drawn inside the mode.
* Eager calls go straight to the launcher / pybind function: no ``lora_kernels::`` op dispatch.
* Selective activation checkpointing's policy sees the op; non-strict torch.export records it;
  torch.compile(fullgraph=True) traces the CUDA backend's ops.

The CUDA backend's Python layer (autograd.Function, op wrappers, dispatch policy) runs here on CPU
tensors with ``_ext.get_ext`` replaced by a float64 model of the extension's contract
(csrc/lora_ops.h), so the layer's gradient plumbing is checked against the reference without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import lora_kernels as lk
from lora_kernels import flops
from lora_kernels.cuda_ops import _ext
from lora_kernels.cuda_ops import lora_linear as cuda_ll
from lora_kernels.reference import dropout_keep_mask, pack_mask

from ._utils import HAS_CUDA, INTERPRET, assert_close_ref

needs_triton_here = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1"
)


class _ModelExt:
    """The extension's contract (csrc/lora_ops.h) in float64 on any device; records its calls."""

    def __init__(self):
        self.calls: list[str] = []

    @staticmethod
    def _keep(seed, M, K, p, device):
        if p > 0.0:
            return dropout_keep_mask(seed, M, K, p, device).double() / (1.0 - p)
        return torch.ones(M, K, dtype=torch.float64, device=device)

    def lora_fwd(self, x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, save_mask):
        self.calls.append("lora_fwd")
        M, K = x.shape
        keep = self._keep(seed, M, K, p, x.device)
        t = (x.double() * keep) @ lora_A.double().t()
        low = t @ lora_B.double().t() + (0.0 if lora_bias is None else lora_bias.double())
        y = x.double() @ weight.double().t() + (0.0 if bias is None else bias.double()) + scaling * low
        bits = pack_mask(keep > 0) if (p > 0.0 and save_mask) else x.new_empty((0,), dtype=torch.uint8)
        return y.to(x.dtype), t.float(), bits

    def lora_bwd(self, dy, x, weight, lora_A, lora_B, t, bits, scaling, p, seed, need_dx, need_da=True, need_db=True):
        self.calls.append("lora_bwd")
        self.bits_seen = bits.numel()
        self.needs = (need_dx, need_da, need_db)
        M, K = x.shape
        keep = self._keep(seed, M, K, p, x.device)
        dy64 = dy.double()
        dt = scaling * dy64 @ lora_B.double()
        dA = dt.t() @ (x.double() * keep)
        dB = scaling * dy64.t() @ t.double()
        dlb = scaling * dy64.sum(0)
        dx = (dy64 @ weight.double() + (dt @ lora_A.double()) * keep).to(x.dtype) if need_dx else x.new_empty((0,))
        dtype = lora_A.dtype
        if not need_da:  # (0,) for a gradient not asked for, as csrc/lora_ops.h says
            dA = dA.new_empty((0,))
        if not need_db:
            dB, dlb = dB.new_empty((0,)), dlb.new_empty((0,))
        return dx, dA.to(dtype), dB.to(dtype), dlb.to(dtype)


@pytest.fixture
def model_ext(monkeypatch) -> _ModelExt:
    ext = _ModelExt()
    monkeypatch.setattr(_ext, "get_ext", lambda build=True: ext)
    return ext


def _inputs(M=37, K=48, N=40, r=8, dtype=torch.float32, device="cpu", biases=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dt).requires_grad_(grad)

    x = rnd(M, K, grad=True)
    w = rnd(N, K)
    a, b = rnd(r, K, dt=torch.float32, grad=True), rnd(N, r, dt=torch.float32, grad=True)
    bias = rnd(N) if biases else None
    lbias = rnd(N, dt=torch.float32, grad=True) if biases else None
    return x, w, bias, a, b, lbias


def _cuda_layer(x, w, bias, a, b, lbias, scaling=2.0, p=0.1, seed=7, mask_mode="bitmask"):
    return cuda_ll.lora_linear_2d(x, w, bias, a, b, lbias, scaling, p, seed, mask_mode)


def _run(backend, x, w, bias, a, b, lbias, scaling=2.0, p=0.1, seed=7):
    if backend == "cuda":
        return _cuda_layer(x, w, bias, a, b, lbias, scaling, p, seed)
    return lk.lora_linear(x, w, a, b, bias, lbias, scaling=scaling, dropout_p=p, seed=seed, backend=backend)


def _device(backend):
    return "cuda" if (backend == "triton" and HAS_CUDA) else "cpu"


BACKENDS = [pytest.param("triton", marks=needs_triton_here), "cuda"]


# ----------------------------------------------------------------------------------------------
# the CUDA backend's Python layer against the reference (no GPU: the extension is modelled)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, mask_mode", [(0.0, "bitmask"), (0.3, "bitmask"), (0.3, "regenerate")])
@pytest.mark.parametrize("biases", [True, False])
def test_cuda_layer_gradients_match_reference(model_ext, p, mask_mode, biases):
    x, w, bias, a, b, lbias = _inputs(biases=biases)
    w.requires_grad_(True)  # the frozen base's gradients come from the layer's own cuBLAS calls
    if bias is not None:
        bias.requires_grad_(True)
    leaves = [t for t in (x, w, bias, a, b, lbias) if t is not None]
    y = _cuda_layer(x, w, bias, a, b, lbias, p=p, mask_mode=mask_mode)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(ref)
    rx, rw = next(it), next(it)
    rbias = next(it) if biases else None
    ra, rb = next(it), next(it)
    rlb = next(it) if biases else None
    y_ref = lk.lora_linear_ref(rx, rw, ra, rb, rbias, rlb, 2.0, p, True, 7)
    want = torch.autograd.grad(y_ref, ref, dy.double())
    assert_close_ref(y, y_ref, [torch.float32], "y")
    names = ["x", "weight", "bias", "lora_A", "lora_B", "lora_bias"] if biases else ["x", "weight", "lora_A", "lora_B"]
    for name, g, r, t in zip(names, got, want, leaves, strict=True):
        assert g.dtype == t.dtype, f"d{name} dtype {g.dtype} != {t.dtype}"
        assert_close_ref(g, r, [torch.float32], f"d{name}")
    # The backward got the forward's bits in bitmask mode with dropout, an empty tensor otherwise.
    assert model_ext.calls == ["lora_fwd", "lora_bwd"]
    M, K = x.shape
    assert model_ext.bits_seen == (M * ((K + 7) // 8) if (p > 0 and mask_mode == "bitmask") else 0)


# Which of (x, lora_A, lora_B, lora_bias) require grad: all, the first layer (x does not), LoRA-FA
# (A frozen), a frozen adapter in front of trained layers (only x), only lora_B, only lora_bias.
TRAINABLE = [(1, 1, 1, 1), (0, 1, 1, 1), (1, 0, 1, 1), (1, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("trainable", TRAINABLE, ids=lambda t: "".join(map(str, t)))
@pytest.mark.parametrize("bias_grad", [False, True], ids=["bias-frozen", "bias-trained"])
def test_backward_computes_only_the_gradients_asked_for(backend, trainable, bias_grad, request, monkeypatch):
    """Any subset of (x, lora_A, lora_B, lora_bias, bias) in training gets exactly its gradients, equal to
    the reference's, and the backward skips the work of the others: a frozen lora_A costs no pass over x
    for dA, a frozen lora_B no dB = dYᵀ·T (a trained lora_bias or bias alone then takes Σ dY from one
    reduction, shared by both biases; with lora_B trained the dB pass's Σ dY serves the base bias too: no
    torch-side read of dY). The CUDA op is told (need_dx, need_da, need_db); the Triton dY kernel's grid
    leaves out the dB programs."""
    if backend == "triton" and not (HAS_CUDA or INTERPRET):
        pytest.skip("the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1")
    if backend == "cuda":
        model = request.getfixturevalue("model_ext")
    M, K, N, r = 37, 48, 40, 8
    x, w, bias, a, b, lbias = _inputs(M, K, N, r, device=_device(backend))
    for t, grad in zip((x, a, b, lbias), trainable, strict=True):
        t.requires_grad_(bool(grad))
    bias.requires_grad_(bias_grad)
    need_dx, need_da = bool(trainable[0]), bool(trainable[1])
    need_db = bool(trainable[2])  # dB = dYᵀ·T; a trained lora_bias or bias alone needs only Σ dY
    leaves = [t for t in (x, a, b, lbias, bias) if t.requires_grad]

    launches = []
    if backend == "triton":
        from lora_kernels.triton_ops import lora_linear as tri

        real_launch = tri._launch

        def launch(kernel, grid, args, meta, fixed, wrap):
            launches.append((kernel.__name__, grid({**meta, **fixed})[0], fixed))
            return real_launch(kernel, grid, args, meta, fixed, wrap)

        monkeypatch.setattr(tri, "_launch", launch)
    y = _run(backend, x, w, bias, a, b, lbias)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype).to(y.device)
    # Reductions of dY done by torch in the backward (the float64 model of _C sums float64 copies: not
    # counted).
    dy_sums, counting = [], [False]

    def count(real):
        def summed(t, *args, **kwargs):
            if counting[0] and isinstance(t, torch.Tensor) and t.shape == (M, N) and t.dtype == dy.dtype:
                dy_sums.append(t.shape)
            return real(t, *args, **kwargs)

        return summed

    monkeypatch.setattr(torch, "sum", count(torch.sum))
    monkeypatch.setattr(torch.Tensor, "sum", count(torch.Tensor.sum))
    counting[0] = True
    got = torch.autograd.grad(y, leaves, dy)
    counting[0] = False
    assert len(dy_sums) == int(not need_db and (lbias.requires_grad or bias_grad)), dy_sums

    ref = {id(t): t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, bias, a, b, lbias)}
    rx, rw, rbias, ra, rb, rlb = (ref[id(t)] for t in (x, w, bias, a, b, lbias))
    want = torch.autograd.grad(lk.lora_linear_ref(rx, rw, ra, rb, rbias, rlb, 2.0, 0.1, True, 7), [
        ref[id(t)] for t in leaves], dy.double())  # fmt: skip
    for g, r_, t in zip(got, want, leaves, strict=True):
        assert g.dtype == t.dtype
        assert_close_ref(g, r_, [torch.float32], f"grad of a {tuple(t.shape)} leaf")

    if backend == "cuda":
        assert model.needs == (need_dx, need_da, need_db)
        return
    bwd = [(name, n, fixed) for name, n, fixed in launches if name.startswith("_bwd")]
    dy_launches = [(n, fixed) for name, n, fixed in bwd if name == "_bwd_dy_kernel"]
    if need_dx or need_da or need_db:
        ((n_dy, tiles),) = dy_launches
        dt_programs = -(-M // tiles["BLOCK_M"]) if (need_dx or need_da) else 0
        db_programs = -(-N // tiles["BLOCK_N"]) if need_db else 0
        assert n_dy == dt_programs + db_programs, (n_dy, need_dx, need_da, need_db)
    else:  # only lora_bias / bias: Σ dY alone, no kernel
        assert not bwd, bwd
    assert any(name.startswith("_bwd_dx") for name, *_ in bwd) == (need_dx or need_da), bwd


@pytest.mark.parametrize(
    "adapter_dtype,scaling,reads_dy",
    [(torch.float32, 2.0, False), (torch.float32, -0.125, False), (torch.bfloat16, 2.0, True),
     (torch.float32, 1e-9, True)],
    ids=["fp32-adapters", "negative-s", "bf16-adapters", "tiny-s"],
)  # fmt: skip
def test_cuda_base_bias_grad_reuses_the_db_pass(model_ext, monkeypatch, adapter_dtype, scaling, reads_dy):
    """A trained base bias with lora_B trained: Σ dY comes from the dB pass's ones column (dlb / s)
    when dlb is fp32 and s an ordinary scaling, else from one fp32-accumulating torch.sum of dY; the
    gradient equals the reference's either way."""
    x, w, bias, a, b, lbias = _inputs(dtype=torch.float32)
    a, b = (t.detach().to(adapter_dtype).requires_grad_() for t in (a, b))
    bias.requires_grad_(True)
    sums = []
    real_sum = torch.sum
    monkeypatch.setattr(torch, "sum", lambda t, *args, **kw: sums.append(t.shape) or real_sum(t, *args, **kw))
    y = _cuda_layer(x, w, bias, a, b, None, scaling=scaling)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (db,) = torch.autograd.grad(y, [bias], dy, retain_graph=True)
    assert sums == ([y.shape] if reads_dy else []), sums
    assert model_ext.needs == (True, True, True)
    assert db.dtype == bias.dtype
    assert_close_ref(db, dy.double().sum(0), [torch.float32], "dbias")


# ----------------------------------------------------------------------------------------------
# eager calls skip the dispatcher; dispatch modes see the ops
# ----------------------------------------------------------------------------------------------


def _dispatched_lora_ops(fn) -> list[str]:
    """Names of ``lora_kernels::`` ops that went through the dispatcher while ``fn`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("lora_kernels::")})


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_skip_the_dispatcher(backend, request):
    if backend == "cuda":
        request.getfixturevalue("model_ext")
    args = _inputs(device=_device(backend))

    def step():
        _run(backend, *args).sum().backward()

    assert _dispatched_lora_ops(step) == []
    with FlopCounterMode(display=False):  # a dispatch mode: the registered ops must be used
        ops = _dispatched_lora_ops(step)
    assert ops == [f"lora_kernels::{backend}_lora_bwd", f"lora_kernels::{backend}_lora_fwd"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", TRAINABLE, ids=lambda t: "".join(map(str, t)))
@pytest.mark.parametrize("built_before_import", [False, True])
def test_flop_counter_counts_what_the_reference_counts(backend, trainable, built_before_import, request):
    if backend == "cuda":
        request.getfixturevalue("model_ext")
    M, K, N, r = 37, 48, 40, 8
    args = _inputs(M, K, N, r, device=_device(backend))
    for i, grad in zip((0, 3, 4, 5), trainable, strict=True):
        args[i].requires_grad_(bool(grad))
    need_dx, need_da, need_db = bool(trainable[0]), bool(trainable[1]), bool(trainable[2])

    def count(run_backend) -> tuple[int, int]:
        fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
        if built_before_import:
            # As if the modes were built before the backend module registered its formulas.
            for mode in (fwd, bwd):
                for op in list(mode.flop_registry):
                    if str(op).startswith("lora_kernels."):
                        del mode.flop_registry[op]
        with fwd:
            y = _run(run_backend, *args)
        with bwd:
            y.sum().backward()
        return fwd.get_total_flops(), bwd.get_total_flops()

    got = count(backend)
    want = count("torch")
    assert got == want, f"{backend}: (fwd, bwd) FLOPs {got}, reference {want}"
    assert got == (flops.forward_flops(M, K, N, r), flops.backward_flops(M, K, N, r, need_dx, need_da, need_db))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [None, 11])
def test_fake_tensor_mode_forward_and_backward(backend, seed, request):
    if backend == "cuda":
        ext = request.getfixturevalue("model_ext")
    device = _device(backend)
    M, K, N, r = 67, 40, 24, 4
    with FakeTensorMode():
        x = torch.randn(2, M, K, device=device, requires_grad=True)
        w = torch.randn(N, K, device=device)
        a = torch.randn(r, K, device=device, requires_grad=True)
        b = torch.randn(N, r, device=device, requires_grad=True)
        lb = torch.randn(N, device=device, requires_grad=True)
        if backend == "cuda":
            y = _cuda_layer(x.reshape(-1, K), w, None, a, b, lb, seed=0 if seed is None else seed)
        else:
            y = lk.lora_linear(x, w, a, b, None, lb, scaling=2.0, dropout_p=0.1, seed=seed, backend=backend)
        y.sum().backward()
    assert isinstance(y, FakeTensor) and y.shape[-1] == N and y.numel() == 2 * M * N
    for t in (x, a, b, lb):
        assert isinstance(t.grad, FakeTensor) and t.grad.shape == t.shape and t.grad.dtype == t.dtype
    if backend == "cuda":
        assert ext.calls == [], "the real extension ran on fake tensors"


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_activation_checkpointing_sees_the_op(backend, request):
    """SAC's policy (a dispatch mode) is asked about the fused op, and saving it gives the same grads."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    if backend == "cuda":
        request.getfixturevalue("model_ext")
    x, w, bias, a, b, lbias = _inputs(device=_device(backend))
    asked = set()

    def policy(ctx, op, *args, **kwargs):
        asked.add(str(op))
        return CheckpointPolicy.MUST_SAVE if str(op).startswith("lora_kernels.") else CheckpointPolicy.PREFER_RECOMPUTE

    def f(x, a, b, lbias, w=w, bias=bias, backend=backend):
        return torch.tanh(_run(backend, x, w, bias, a, b, lbias))

    leaves = (x, a, b, lbias)
    ctx = functools.partial(create_selective_checkpoint_contexts, policy)
    got = torch.autograd.grad(checkpoint(f, *leaves, use_reentrant=False, context_fn=ctx).sum(), leaves)
    assert f"lora_kernels.{backend}_lora_fwd.default" in asked
    # Against the float64 reference: on a GPU the op path (as under torch.compile) takes the pointer
    # kernels where an eager call may take TMA ones, so the two need not agree bit for bit.
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    want = torch.autograd.grad(f(*ref_leaves, w=w.double(), bias=bias.double(), backend="torch").sum(), ref_leaves)
    for name, g, ref in zip(("x", "lora_A", "lora_B", "lora_bias"), got, want, strict=True):
        assert_close_ref(g, ref, [torch.float32], f"d{name}")


@needs_triton_here
def test_non_strict_export_records_the_op():
    x, w, bias, a, b, lbias = (t.detach() for t in _inputs(device=_device("triton")))

    class Layer(torch.nn.Module):
        def forward(self, x):
            return lk.lora_linear(x, w, a, b, bias, lbias, scaling=2.0, backend="triton")

    ep = torch.export.export(Layer(), (x,), strict=False)
    assert "torch.ops.lora_kernels.triton_lora_fwd.default" in ep.graph_module.code
    want = lk.lora_linear_ref(*(t.double() for t in (x, w, a, b, bias, lbias)), 2.0, 0.0, True, 0)
    assert_close_ref(ep.module()(x), want, [torch.float32], "exported output")


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_layer_under_torch_compile_fullgraph(model_ext, p):
    """torch.compile(fullgraph=True) traces the CUDA backend's ops (fake implementations) and runs
    them (here the modelled extension): one graph, the eager results, forward and gradients."""
    x, w, bias, a, b, lbias = _inputs()

    def f(x, a, b, lbias):
        return torch.nn.functional.gelu(_cuda_layer(x, w, bias, a, b, lbias, p=p))

    leaves = (x, a, b, lbias)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend=counter)(*leaves)
    got = torch.autograd.grad(y.sum(), leaves)
    y_eager = f(*leaves)
    want = torch.autograd.grad(y_eager.sum(), leaves)
    assert counter.frame_count == 1
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)
    assert model_ext.calls.count("lora_fwd") == 2 and model_ext.calls.count("lora_bwd") == 2


@needs_triton_here
def test_triton_op_on_real_tensors_launches_as_eager_calls_do(monkeypatch):
    """Under a dispatch mode that hands the op real tensors (FlopCounterMode, selective checkpointing)
    the op launches the eager kernels (host TMA descriptors, tuning, single-pass) instead of the
    traceable ones that torch.compile needs; under FakeTensorMode it takes the traceable launches."""
    from lora_kernels.triton_ops import lora_linear as tri

    seen = []
    real_fwd, real_bwd = tri.lora_fwd, tri.lora_bwd

    def spy(real):
        def f(*args, wrap=tri._identity, **kwargs):
            seen.append(wrap is tri._identity)
            return real(*args, wrap=wrap, **kwargs)

        return f

    monkeypatch.setattr(tri, "lora_fwd", spy(real_fwd))
    monkeypatch.setattr(tri, "lora_bwd", spy(real_bwd))
    args = _inputs(device=_device("triton"))
    with FlopCounterMode(display=False):
        _run("triton", *args).sum().backward()
    assert seen == [True, True]
    seen.clear()
    with FakeTensorMode():
        x, w, _, a, b, _ = _inputs(device=_device("triton"))
        lk.lora_linear(x, w, a, b, scaling=2.0, dropout_p=0.1, seed=3, backend="triton").sum().backward()
    assert seen == [False, False]
