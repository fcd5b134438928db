"""Every backend against the float64 reference: outputs and all gradients, odd shapes, dropout,
mixed dtypes, strided/3-D inputs, both mask modes, NaN-poisoned outputs.

On a machine without a GPU the Triton kernels run in the interpreter (tests/conftest.py); the
same tests run on CUDA (and add bf16-native and larger shapes) when a GPU is present.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels.backends import available_backends
from lora_kernels.reference import dropout_keep_mask, lora_linear_ref, pack_mask

from ._utils import HAS_CUDA, INTERPRET, assert_close_ref, poison_cuda_allocator, record_meta, requires_gpu

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton", "cuda"]


def _skip_unavailable(backend: str, dtype: torch.dtype = torch.float32) -> None:
    reason = available_backends(dtype=dtype, device=DEVICE)[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def _tma_forced(monkeypatch, dtype: torch.dtype = torch.float16, force: bool = True):
    """The Triton module with its TMA kernels taken wherever the tensors allow (``TMA_MODE`` "1": in the interpreter
    on CI, on any GPU); skips where the backend or Triton's host descriptors are unavailable."""
    _skip_unavailable("triton", dtype)
    from lora_kernels.triton_ops import lora_linear as tri

    if tri.TensorDescriptor is None:
        pytest.skip("this Triton has no triton.tools.tensor_descriptor")
    if force:
        monkeypatch.setattr(tri, "TMA_MODE", "1")
    return tri


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Kernel outputs start as NaN (floats) or 0xAA (bytes): unwritten elements fail the checks."""
    import importlib

    def nan_empty(shape, device, dtype):
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(0xAA)

    for name in ("lora_kernels.triton_ops.lora_linear", "lora_kernels.cuda_ops.lora_linear"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "_empty"):
            monkeypatch.setattr(mod, "_empty", nan_empty)
    if HAS_CUDA:
        # The CUDA extension allocates its outputs in C++: poison the caching allocator before each call.
        from lora_kernels.cuda_ops import lora_linear as cuda_ll

        for name in ("_fwd", "_bwd"):
            real = getattr(cuda_ll, name)
            monkeypatch.setattr(cuda_ll, name, lambda *a, _real=real: (poison_cuda_allocator(), _real(*a))[1])


def make_inputs(M, K, N, r, *, xdt, adt, bias=True, lora_bias=False, lead=(), device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(*lead, M, K).to(device, xdt)
    W = (rnd(N, K) / K**0.5).to(device, xdt)
    A = (rnd(r, K) / K**0.5).to(device, adt)
    B = rnd(N, r).to(device, adt)  # non-zero, unlike a fresh adapter, so every path is exercised
    b = rnd(N).to(device, xdt) if bias else None
    lb = rnd(N).to(device, adt) if lora_bias else None
    return x, W, A, B, b, lb


def run_and_check(backend, x, W, A, B, b, lb, *, scaling=2.0, p=0.0, seed=1234, mode="bitmask"):
    """Forward + backward through ``backend`` and the float64 reference; compare everything."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, A, B, lb)]
    xg, Ag, Bg, lbg = leaves
    y = lk.lora_linear(xg, W, Ag, Bg, b, lbg, scaling, p, True, seed, backend=backend, dropout_mask=mode)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], W.shape[0])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(dy)

    d = lambda t: None if t is None else t.detach().double().requires_grad_()
    rx, rA, rB, rlb = d(x), d(A), d(B), d(lb)
    rW, rb = W.double(), None if b is None else b.double()
    yr = lora_linear_ref(rx, rW, rA, rB, rb, rlb, scaling, p, True, seed)
    yr.backward(dy.double())
    dts = (x.dtype, A.dtype)
    assert_close_ref(y, yr, dts, "y")
    assert_close_ref(xg.grad, rx.grad, dts, "dx")
    assert_close_ref(Ag.grad, rA.grad, dts, "dA")
    assert_close_ref(Bg.grad, rB.grad, dts, "dB")
    assert Ag.grad.dtype == A.dtype and Bg.grad.dtype == B.dtype and xg.grad.dtype == x.dtype
    if lb is not None:
        assert_close_ref(lbg.grad, rlb.grad, dts, "dlora_bias")
        assert lbg.grad.dtype == lb.dtype


SHAPES = [  # M, K, N, r: M ∈ {1, 3, 67, 300}; K, N not multiples of 16; r from 1 to 256
    (1, 40, 24, 1),
    (3, 33, 50, 8),
    (67, 72, 45, 16),
    (300, 100, 70, 64),
    (67, 40, 33, 256),
]
DTYPES = [  # (x/weight dtype, adapter dtype)
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
_ids = lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_shapes_and_dropout_fp32(backend, shape, p):
    _skip_unavailable(backend)
    M, K, N, r = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.float32, adt=torch.float32, lora_bias=r % 2 == 0)
    run_and_check(backend, x, W, A, B, b, lb, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dts", DTYPES, ids=_ids)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dtypes(backend, dts, p):
    xdt, adt = dts
    _skip_unavailable(backend, xdt)
    x, W, A, B, b, lb = make_inputs(67, 72, 45, 16, xdt=xdt, adt=adt, lora_bias=True)
    run_and_check(backend, x, W, A, B, b, lb, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,lora_bias", [(False, False), (True, True), (False, True)])
def test_bias_flags(backend, bias, lora_bias):
    _skip_unavailable(backend)
    x, W, A, B, b, lb = make_inputs(33, 48, 40, 4, xdt=torch.float32, adt=torch.float32, bias=bias, lora_bias=lora_bias)
    run_and_check(backend, x, W, A, B, b, lb, p=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_and_noncontiguous_x(backend):
    _skip_unavailable(backend)
    x, W, A, B, b, lb = make_inputs(21, 40, 36, 8, xdt=torch.float32, adt=torch.float32, lead=(2, 3))
    run_and_check(backend, x, W, A, B, b, lb, p=0.1)  # (2, 3, 21, 40)
    base = torch.randn(50, 90, device=DEVICE)
    run_and_check(backend, base[:, 3:83:2], W, A, B, b, lb, p=0.1)  # (50, 40), strides (90, 2)
    xt = torch.randn(40, 50, device=DEVICE).t()  # (50, 40), column-major: stride (1, 50)
    run_and_check(backend, xt, W, A, B, b, lb, p=0.5)
    x3 = torch.randn(3, 40, 5, device=DEVICE).transpose(1, 2)  # (3, 5, 40) non-contiguous 3-D
    run_and_check(backend, x3, W, A, B, b, lb, p=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bitmask", "regenerate"])
def test_mask_modes(backend, mode):
    _skip_unavailable(backend)
    x, W, A, B, b, lb = make_inputs(67, 100, 45, 8, xdt=torch.float32, adt=torch.float32, lora_bias=True)
    run_and_check(backend, x, W, A, B, b, lb, p=0.5, mode=mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_disables_dropout(backend):
    _skip_unavailable(backend)
    x, W, A, B, b, lb = make_inputs(9, 40, 20, 4, xdt=torch.float32, adt=torch.float32)
    y_eval = lk.lora_linear(x, W, A, B, b, scaling=2.0, dropout_p=0.5, training=False, seed=3, backend=backend)
    y_p0 = lk.lora_linear(x, W, A, B, b, scaling=2.0, dropout_p=0.0, backend=backend)
    torch.testing.assert_close(y_eval, y_p0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_frozen_weight_gradients_when_requested(backend, xdt):
    """If weight/bias require grad, their gradients are computed, never silently None, in their own
    dtype (16-bit x and weight with fp32 adapters, PEFT's default: dW = dYᵀ·x on the GEMM's dtype)."""
    _skip_unavailable(backend, xdt)
    x, W, A, B, b, lb = make_inputs(67, 40, 24, 4, xdt=xdt, adt=torch.float32)
    Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
    y = lk.lora_linear(x, Wg, A, B, bg, scaling=2.0, dropout_p=0.1, seed=1, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    rW, rb = W.double().requires_grad_(), b.double().requires_grad_()
    lora_linear_ref(x.double(), rW, A.double(), B.double(), rb, None, 2.0, 0.1, True, 1).backward(dy.double())
    assert Wg.grad.dtype == bg.grad.dtype == xdt
    assert_close_ref(Wg.grad, rW.grad, (xdt, torch.float32), "dW")
    assert_close_ref(bg.grad, rb.grad, (xdt, torch.float32), "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_run_to_run(backend):
    _skip_unavailable(backend)
    x, W, A, B, b, lb = make_inputs(67, 72, 45, 16, xdt=torch.float32, adt=torch.float32, lora_bias=True)
    outs = []
    for _ in range(2):
        xg, Ag = x.clone().requires_grad_(), A.clone().requires_grad_()
        y = lk.lora_linear(xg, W, Ag, B, b, lb, 2.0, 0.1, True, 77, backend=backend)
        y.sum().backward()
        outs.append((y, xg.grad, Ag.grad))
    for a, c in zip(*outs, strict=False):
        assert torch.equal(a, c)


def test_seed_none_draws_from_torch_generator():
    x, W, A, B, b, lb = make_inputs(8, 16, 8, 2, xdt=torch.float32, adt=torch.float32)
    torch.manual_seed(0)
    y1 = lk.lora_linear(x, W, A, B, scaling=1.0, dropout_p=0.5, backend="torch")
    y2 = lk.lora_linear(x, W, A, B, scaling=1.0, dropout_p=0.5, backend="torch")
    torch.manual_seed(0)
    y3 = lk.lora_linear(x, W, A, B, scaling=1.0, dropout_p=0.5, backend="torch")
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)


def test_triton_mask_bits_identical_to_reference():
    _skip_unavailable("triton")
    from lora_kernels.triton_ops.lora_linear import lora_fwd

    cases = [(67, 100, 0.1, 1), (5, 33, 0.5, (1 << 40) + 3), (300, 64, 0.9, 2**63 - 1), (40, 48, 0.3, 2**31 + 5)]
    for M, K, p, seed in cases:
        x, W, A, B, b, _ = make_inputs(M, K, 16, 4, xdt=torch.float32, adt=torch.float32)
        _, _, bits = lora_fwd(x, W, b, A, B, None, 2.0, p, seed, True)
        assert torch.equal(bits.cpu(), pack_mask(dropout_keep_mask(seed, M, K, p))), (M, K, p)


def test_triton_dropout_bitmask_helper_is_the_forward_bits():
    """``dropout_bitmask`` (what verify compares bit for bit) at p > 0 runs the forward kernel; at p = 0
    or on an empty x it launches nothing: every bit kept, in ``pack_mask``'s layout (padding bits too)."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops.lora_linear import dropout_bitmask

    for seed, M, K, p in [(9, 37, 45, 0.3), (9, 37, 45, 0.0), (9, 0, 45, 0.3), (9, 5, 0, 0.3)]:
        bits = dropout_bitmask(seed, M, K, p, device=DEVICE)
        assert bits.dtype == torch.uint8 and bits.shape == (M, (K + 7) // 8), (M, K, p)
        assert torch.equal(bits.cpu(), pack_mask(dropout_keep_mask(seed, M, K, p))), (M, K, p)


def test_triton_mask_keeps_draws_equal_to_the_threshold():
    """u == threshold is kept (u >= threshold). Random cases meet such a draw with probability 2⁻¹⁶ per
    element, so `>` instead of `>=` passes them by luck: here p puts the threshold on a real draw, once
    for each of the 8 (lane, half) slots of a Philox group, in the stored bits and in the backward's
    regenerated mask."""
    _skip_unavailable("triton")
    from lora_kernels.reference import dropout_draws, dropout_threshold
    from lora_kernels.triton_ops.lora_linear import lora_fwd

    seed, M, K = (1 << 40) + 77, 40, 36
    u = dropout_draws(seed, M, K)
    x, W, A, B, b, _ = make_inputs(M, K, 32, 4, xdt=torch.float32, adt=torch.float32)
    ps = [int(u[0, j]) / 65536 for j in range(8) if u[0, j] > 0]
    assert len(ps) >= 7
    for p in ps:
        keep = dropout_keep_mask(seed, M, K, p)
        assert (u == dropout_threshold(p)).any() and keep[u == dropout_threshold(p)].all()
        _, _, bits = lora_fwd(x, W, b, A, B, None, 2.0, p, seed, True)
        assert torch.equal(bits.cpu(), pack_mask(keep)), p
    # The backward's regenerated mask at the first of them: dx against the reference's.
    grads = []
    for backend, mode in (("triton", "regenerate"), ("torch", "bitmask")):
        xg = x.detach().clone().requires_grad_(True)
        y = lk.lora_linear(xg, W, A, B, bias=b, scaling=2.0, dropout_p=ps[0], training=True, seed=seed,
                           backend=backend, dropout_mask=mode)  # fmt: skip
        y.backward(torch.ones_like(y))
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_triton_seed_halves_are_int32():
    """The kernels get the seed as two int32 arguments with the seed's bits: Triton types an int
    ≥ 2³¹ as i64, so unsigned halves would compile a second variant of every seeded kernel for half
    of all random seeds (outside the prewarmed cache, inside timed or captured regions)."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops.lora_linear import _seed_parts

    for seed in [0, 5, 2**31 - 1, 2**31, 2**31 + 5, 2**32 - 1, 2**32, (2**31 + 3) << 32 | 0x80000001, 2**63 - 1]:
        lo, hi = _seed_parts(seed)
        assert -(2**31) <= lo < 2**31 and -(2**31) <= hi < 2**31, seed
        assert (lo & 0xFFFFFFFF) | (hi & 0xFFFFFFFF) << 32 == seed, seed


def test_autocast_cpu_reference():
    x, W, A, B, b, _ = make_inputs(9, 32, 16, 4, xdt=torch.float32, adt=torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lk.lora_linear(x, W, A, B, b, scaling=2.0, backend="torch")
    assert y.dtype == torch.bfloat16
    # Autocast's linear rule for the base path only: the fp32 adapters stay fp32 (bit for bit the
    # reference on bf16 x, W, b with fp32 adapters; within tolerance would not tell the two apart).
    expected = lora_linear_ref(x.bfloat16(), W.bfloat16(), A, B, b.bfloat16(), None, 2.0)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_backend(backend):
    _skip_unavailable(backend, torch.bfloat16)
    x, W, A, B, b, lb = make_inputs(33, 40, 24, 4, xdt=torch.float32, adt=torch.float32)
    xg, Ag = x.clone().requires_grad_(), A.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lk.lora_linear(xg, W, Ag, B, b, scaling=2.0, dropout_p=0.1, seed=4, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xg.grad.dtype == torch.float32 and Ag.grad.dtype == torch.float32
    yr = lora_linear_ref(x.bfloat16().double(), W.bfloat16().double(), A.double(), B.double(),
                         b.bfloat16().double(), None, 2.0, 0.1, True, 4)  # fmt: skip
    assert_close_ref(y, yr, (torch.bfloat16,), "y")


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(1024, 4096, 4096, 16), (2048, 4096, 1000, 64), (777, 1000, 3000, 128)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_real_sizes_bf16(backend, shape, p):
    _skip_unavailable(backend, torch.bfloat16)
    M, K, N, r = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.bfloat16, adt=torch.float32, lora_bias=True)
    run_and_check(backend, x, W, A, B, b, lb, p=p)


@pytest.mark.parametrize("dts", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)], ids=_ids)
@pytest.mark.parametrize("p,mode", [(0.0, "bitmask"), (0.1, "bitmask"), (0.5, "regenerate")])
@pytest.mark.parametrize("shape", [(67, 104, 72, 16), (3, 64, 200, 1), (130, 96, 48, 64)], ids=str)
def test_triton_tma_persistent_path(monkeypatch, dts, p, mode, shape):
    """The Hopper kernels (persistent, TMA descriptors) forced on: in the interpreter on CI, on any GPU."""
    tri = _tma_forced(monkeypatch, dts[0])
    taken = []
    real = tri._tma_ok
    monkeypatch.setattr(tri, "_tma_ok", lambda *ts, **kw: taken.append(real(*ts, **kw)) or taken[-1])
    M, K, N, r = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=dts[0], adt=dts[1], lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=p, mode=mode)
    assert taken == [True, True], "both the forward and the dX kernel must take the TMA path"


@pytest.mark.parametrize("p,mode", [(0.0, "bitmask"), (0.1, "bitmask"), (0.1, "regenerate")])
@pytest.mark.parametrize("r", [128, 130])
def test_tma_backward_wide_ranks(monkeypatch, r, p, mode):
    """The dX epilogue steps over the rank 64 columns at a time (2 steps at rank 128; 4 at rank 130, a 256-wide
    rank tile whose last steps are partly or wholly masked), and above rank 128 dA leaves the dX kernel for a
    launch of its own (its accumulator spilled there): gradients vs float64, and the launches."""
    tri = _tma_forced(monkeypatch)
    launched = []
    real_launch = tri._launch
    monkeypatch.setattr(
        tri, "_launch", lambda kernel, *a, **k: launched.append(kernel.__name__) or real_launch(kernel, *a, **k)
    )
    x, W, A, B, b, lb = make_inputs(67, 104, 72, r, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=p, mode=mode)
    dx = ["_bwd_dx_tma_kernel", "_bwd_dx_kernel"] if r > 128 else ["_bwd_dx_tma_kernel"]
    assert launched[2:] == ["_bwd_dy_kernel", *dx], launched


@pytest.mark.parametrize("p,mode", [(0.0, "bitmask"), (0.1, "bitmask"), (0.5, "regenerate")])
@pytest.mark.parametrize("tiles", [(128, 256), (256, 128)], ids=["128x256", "256x128"])
@pytest.mark.parametrize("path", ["fixed", "tuned", "tuned-split-store", "in-kernel"])
def test_tma_dx_wide_tiles_take_the_dropout_epilogue_in_halves(monkeypatch, tiles, p, mode, path):
    """dX output tiles wider than 128×128 (the tuning table's 128×256 and 256×128) run the dropout epilogue and
    the store in two column halves, each with its own (BLOCK_M, BLOCK_K / 2) dT·A tile (whole, it spilled 1 KB a
    thread); a config with SPLIT_STORE does so at any p (its store's staging buffer is half: room for a 4th
    stage). K = 296: the last K tile's first half is partly in bounds, its second half wholly out. The dX
    descriptor's block is the half (fixed tiles: the launcher; tuned: the config's pre-hook; in-kernel
    descriptors, the registered op's traceable launch: the kernel), otherwise the whole tile. Gradients vs
    float64; the in-kernel descriptors' results equal the host descriptors' bit for bit."""
    tri = _tma_forced(monkeypatch, force=False)
    bm, bk = tiles
    split = path == "tuned-split-store"
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    if path.startswith("tuned"):
        table = _one_config_tables(tri)()
        extra = {"SPLIT_STORE": True} if split else {}
        table[tri._bwd_dx_tma_kernel] = [tri._c(bm, 64, bk, 8, 1, tri._set_dx_desc_blocks, group_m=4, **extra)]
        monkeypatch.setattr(tri, "_configs", lambda: table)
        monkeypatch.setattr(tri, "AUTOTUNE", True)
        tri._autotuner.cache_clear()
    else:
        real_cfg = tri._tma_cfg
        wide = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk)
        cfg = lambda x, R, backward, regenerate=False: {  # noqa: E731
            **real_cfg(x, R, backward, regenerate),
            **(wide if backward else {}),
        }
        monkeypatch.setattr(tri, "_tma_cfg", cfg)
    blocks = []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        real_launch(kernel, grid, args, meta, fixed, wrap)
        if kernel is tri._bwd_dx_tma_kernel and not meta["DEVICE_DESC"]:
            blocks.append(list(args[2].block_shape))  # after the launch: the pre-hook set the tuned one

    monkeypatch.setattr(tri, "_launch", launch)
    x, W, A, B, b, lb = make_inputs(67, 296, 72, 16, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    try:
        if path == "in-kernel":
            fwd_args = (x, W, b, A, B, lb, 2.0, p, 5, mode == "bitmask")
            y, t, bits = tri.lora_fwd(*fwd_args)
            bwd_args = (torch.randn(67, 72).to(x.device, x.dtype), x, W, A, B, t, bits, 2.0, p, 5, True, True)
            got = tri.lora_bwd(*bwd_args, wrap=tri._op_wrap)
            want = tri.lora_bwd(*bwd_args)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)
        else:
            run_and_check("triton", x, W, A, B, b, lb, p=p, mode=mode)
    finally:
        tri._autotuner.cache_clear()
    halves = p > 0 or split
    assert tri._dx_halves(bm, bk, p > 0, split) == halves
    assert blocks == [[bm, bk // 2 if halves else bk]], blocks


@pytest.mark.parametrize("p,mode", [(0.0, "bitmask"), (0.1, "bitmask"), (0.1, "regenerate")])
@pytest.mark.parametrize("w_kn", [False, True], ids=["W(N,K)", "W(K,N)"])
def test_eager_in_kernel_descriptors_match_host_ones(monkeypatch, p, mode, w_kn):
    """``LORA_KERNELS_TMA_DESC=device``: the eager TMA launches build their descriptors in the kernel (DEVICE_DESC,
    as torch.compile's launches do) instead of taking host descriptors. Through the public call: both TMA kernels
    take plain tensors, the output and every gradient match float64, and equal the host descriptors' bit for bit,
    also for a (K, N)-stored weight (W_KN) and with the mask regenerated."""
    tri = _tma_forced(monkeypatch)
    kinds = []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        if kernel in (tri._fwd_tma_kernel, tri._bwd_dx_tma_kernel):
            kinds.append((kernel.__name__, meta["DEVICE_DESC"], type(args[0]).__name__))
        real_launch(kernel, grid, args, meta, fixed, wrap)

    monkeypatch.setattr(tri, "_launch", launch)
    x, W, A, B, b, lb = make_inputs(67, 296, 72, 16, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    if w_kn:
        W = W.T.contiguous().T  # stored (K, N), passed as its (N, K) view
    results = {}
    for desc in ("host", "device"):
        monkeypatch.setattr(tri, "TMA_DESC", desc)
        kinds.clear()
        xg, Ag, Bg, lbg = (t.detach().clone().requires_grad_() for t in (x, A, B, lb))
        y = lk.lora_linear(xg, W, Ag, Bg, b, lbg, 2.0, p, True, 1234, backend="triton", dropout_mask=mode)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype))
        results[desc] = [y, xg.grad, Ag.grad, Bg.grad, lbg.grad]
        device = desc == "device"
        want = "Tensor" if device else "TensorDescriptor"
        assert kinds == [("_fwd_tma_kernel", device, want), ("_bwd_dx_tma_kernel", device, want)], kinds
    for g, h in zip(results["device"], results["host"], strict=True):
        assert torch.equal(g, h)
    monkeypatch.setattr(tri, "TMA_DESC", "device")
    run_and_check("triton", x, W, A, B, b, lb, p=p, mode=mode)


@pytest.mark.parametrize("w_kn", [False, True], ids=["W(N,K)", "W(K,N)"])
def test_tma_forward_split_store_config(monkeypatch, w_kn):
    """The forward's tuning config with SPLIT_STORE (128×256 with 4 stages on a GPU) stores y in two (BLOCK_M,
    BLOCK_N / 2) halves without flattening the loop: its pre-hook gives y's descriptor the half block, the kernel
    stores the halves (here BLOCK_N = 64 with an N of 72: the second N tile's second half wholly out of bounds),
    also when a second call launches the chosen config without the Autotuner. Output and gradients vs float64."""
    tri = _tma_forced(monkeypatch, force=False)
    table = _one_config_tables(tri, block_n=64)()
    table[tri._fwd_tma_kernel] = [tri._c(32, 64, 32, 4, 1, tri._set_fwd_desc_blocks, group_m=4, SPLIT_STORE=True)]
    monkeypatch.setattr(tri, "_configs", lambda: table)
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    monkeypatch.setattr(tri, "AUTOTUNE", True)
    blocks = []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        real_launch(kernel, grid, args, meta, fixed, wrap)
        if kernel is tri._fwd_tma_kernel:
            assert meta["FLATTEN"] is False and fixed["SPLIT_STORE"] is False  # the fixed tiles' value
            blocks.append(list(args[2].block_shape))

    monkeypatch.setattr(tri, "_launch", launch)
    tri._autotuner.cache_clear()
    try:
        run_and_check("triton", *_tuned_path_inputs(w_kn), p=0.1)
        run_and_check("triton", *_tuned_path_inputs(w_kn), p=0.1, seed=99)  # the chosen config, launched directly
    finally:
        tri._autotuner.cache_clear()
    assert blocks == [[32, 32], [32, 32]], blocks


def run_with_a_weight_stored_k_by_n(shape, dts, p, mode):
    """``run_and_check`` on the Triton backend with W stored (K, N), passed as its (N, K) view."""
    M, K, N, r = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=dts[0], adt=dts[1], lora_bias=True)
    W_kn = W.T.contiguous().T  # same values, stored (K, N)
    assert W_kn.stride() == (1, N)
    run_and_check("triton", x, W_kn, A, B, b, lb, p=p, mode=mode)


@pytest.mark.parametrize("dts", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)], ids=_ids)
@pytest.mark.parametrize("p,mode", [(0.0, "bitmask"), (0.1, "bitmask"), (0.5, "regenerate")])
@pytest.mark.parametrize("shape", [(67, 104, 72, 16), (130, 200, 48, 64), (5, 64, 24, 1)], ids=str)
def test_triton_tma_path_with_a_weight_stored_k_by_n(monkeypatch, dts, p, mode, shape):
    """A weight stored (K, N) and passed as its (N, K) transposed view (GPT-2's Conv1D, PEFT's fan_in_fan_out)
    takes the TMA kernels' W_KN variant, forward and dX: the descriptor over the (K, N) matrix, its tiles
    (BLOCK_K, BLOCK_N) fed to the dot as loaded. K = 200 and N = 24: partial tiles on both of W's axes.
    BLOCK_N = 64, BLOCK_K = 32: a descriptor built with its tiles the other way round fails."""
    tri = _tma_forced(monkeypatch, dts[0])
    real_cfg = tri._tma_cfg
    monkeypatch.setattr(tri, "_tma_cfg", lambda *a, **k: {**real_cfg(*a, **k), "BLOCK_N": 64, "BLOCK_K": 32})
    seen = []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        if "W_KN" in meta:
            w_desc = args[1]
            seen.append((kernel.__name__, meta["W_KN"], tuple(w_desc.shape), list(w_desc.block_shape)))
        real_launch(kernel, grid, args, meta, fixed, wrap)

    monkeypatch.setattr(tri, "_launch", launch)
    M, K, N, r = shape
    run_with_a_weight_stored_k_by_n(shape, dts, p, mode)
    assert seen == [("_fwd_tma_kernel", True, (K, N), [32, 64]), ("_bwd_dx_tma_kernel", True, (K, N), [32, 64])], seen


def test_tma_weight_layouts():
    """Which weights the TMA kernels read directly, and as which matrix: (N, K) row-major as stored by nn.Linear
    (also when N = 1 or K = 1, where both strides may be 1), its (K, N) transpose for a weight stored (K, N), and
    neither for other strides, which ``_tma_ok`` then sends to the pointer kernels."""
    from lora_kernels.triton_ops import lora_linear as tri

    W = torch.randn(48, 64)
    got, kn = tri._tma_weight(W)
    assert got is W and not kn
    got, kn = tri._tma_weight(W.T.contiguous().T)
    assert kn and got.shape == (64, 48) and got.stride() == (48, 1)
    for w in (torch.randn(1, 64), torch.randn(48, 1), torch.randn(64, 1).T, torch.randn(1, 48).T):
        got, kn = tri._tma_weight(w)
        assert got.shape[1] == 1 or got.stride(1) == 1, w.stride()
    strided = torch.randn(48, 128)[:, ::2]  # neither dimension contiguous
    got, kn = tri._tma_weight(strided)
    assert got is strided and not kn
    x = torch.randn(8, 64, dtype=torch.float16)
    assert not tri._tma_ok(x, strided.half())


@pytest.mark.parametrize("p,mode", [(0.1, "bitmask"), (0.5, "regenerate")])
@pytest.mark.parametrize("shape", [(67, 104, 72, 16), (130, 200, 48, 64)], ids=str)
def test_triton_tma_flattened_path(monkeypatch, p, mode, shape):
    """LORA_KERNELS_TMA_FLATTEN=1 reaches both persistent TMA kernels (the interpreter runs the loops as
    written: the flattening itself is compiled and checked by test_flattened_tma_kernels_pipeline_across_tiles).
    K = 200: 7 dA blocks over 4 programs, so the dX kernel's second loop starts mid-round."""
    tri = _tma_forced(monkeypatch)
    monkeypatch.setattr(tri, "TMA_FLATTEN", True)
    seen = record_meta(monkeypatch, tri, "FLATTEN")
    M, K, N, r = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=p, mode=mode)
    assert seen == [("_fwd_tma_kernel", True), ("_bwd_dx_tma_kernel", True)], seen


def test_dx_tma_kernel_walks_every_tile_once_in_the_single_loops_order():
    """The dX TMA kernel walks its dA blocks, then its dX tiles from ``_first_at_least(pid, num_da, NUM_SMS)``:
    the ids pid, pid + NUM_SMS, ... of the single loop it replaced, split at num_da. Any other start that
    still covers every tile once (num_da + pid) computes the same dX but loads some programs with a dA
    block and as many dX tiles as the rest; one a round early adds a tile outside the output."""
    _skip_unavailable("triton")
    from ._triton_probes import first_at_least_probe as probe

    for step in (4, 132):
        for start in (0, 1, 3, 4, 7, 131, 132, 133, 200):
            got = torch.empty(step, dtype=torch.int32, device=DEVICE)
            probe[(step,)](got, start, step)
            want = [min(i for i in range(pid, start + step + 1, step) if i >= start) for pid in range(step)]
            assert got.tolist() == want, (step, start)


def test_tma_ok_refuses_what_a_descriptor_cannot_describe(monkeypatch):
    """A TMA descriptor describes a 2-D row-major tensor with a 16-byte aligned base and row stride whose rows do
    not overlap. A base 2 bytes off, an expanded tensor (row stride 0), overlapping windows, a 3-D or column-major
    tensor and fp32 each send the launch to the pointer kernels (on a GPU the driver refuses such a tensor map,
    or the kernel reads other rows); the aligned view of the same buffer is taken."""
    tri = _tma_forced(monkeypatch)
    buf = torch.randn(64, 72, dtype=torch.float16, device=DEVICE)  # rows of 144 bytes
    assert buf.data_ptr() % 16 == 0 and tri._tma_ok(buf[:, :64]) and tri._tma_ok(buf[1:, 8:])
    flat = torch.randn(64 * 8 + 64, dtype=torch.float16, device=DEVICE)
    refused = {
        "base 2 bytes off": buf[:, 1:65],
        "expanded rows": buf[0].expand(64, 72),
        "overlapping rows": flat.as_strided((64, 64), (8, 1)),
        "3-D": buf.view(2, 32, 72),
        "column-major": buf[:, :64].t(),
        "fp32": buf.float(),
    }
    for why, t in refused.items():
        assert not tri._tma_ok(t), why
        # (the launchers pass tensors of one dtype: the first one's decides)
        assert why == "fp32" or not tri._tma_ok(buf[:, :64], t), f"{why}, second tensor"


@pytest.mark.parametrize("case", ["x-base-2-bytes-off", "dy-expanded"])
def test_triton_tma_sends_a_misaligned_x_or_an_expanded_dy_to_the_pointer_kernels(monkeypatch, case):
    """x a view 2 bytes into its buffer: the forward takes the pointer kernels, the dX kernel (on autograd's dY)
    the TMA one. dY expanded from one row (the gradient of ``y.sum(0)``, strides (0, 1)): the forward takes TMA,
    the dX kernel the pointer one. Outputs and every gradient against float64 either way."""
    tri = _tma_forced(monkeypatch)
    taken = []
    real = tri._tma_ok
    monkeypatch.setattr(tri, "_tma_ok", lambda *ts, **kw: taken.append(real(*ts, **kw)) or taken[-1])
    M, K, N, r, p, seed = 67, 64, 48, 8, 0.1, 99
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    leaves = [t.detach().clone().requires_grad_() for t in (A, B, lb)]
    if case == "x-base-2-bytes-off":
        buf = torch.zeros(M, K + 8, dtype=x.dtype, device=x.device)
        buf[:, 1 : K + 1] = x
        buf.requires_grad_()
        xin = buf[:, 1 : K + 1]
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).to(x.device, x.dtype)
    else:
        xin = x.detach().clone().requires_grad_()
        dy = torch.randn(N, generator=torch.Generator().manual_seed(7)).to(x.device, x.dtype).expand(M, N)
    y = lk.lora_linear(xin, W, *leaves[:2], b, leaves[2], 2.0, p, True, seed, backend="triton")
    y.backward(dy)
    assert taken == ([False, True] if case == "x-base-2-bytes-off" else [True, False]), taken
    dx = buf.grad[:, 1 : K + 1] if case == "x-base-2-bytes-off" else xin.grad
    if case == "x-base-2-bytes-off":
        assert not buf.grad[:, 0].any() and not buf.grad[:, K + 1 :].any()
    ref = [t.detach().double().requires_grad_() for t in (x, A, B, lb)]
    yr = lora_linear_ref(ref[0], W.double(), ref[1], ref[2], b.double(), ref[3], 2.0, p, True, seed)
    yr.backward(dy.double())
    dts = (x.dtype, A.dtype)
    assert_close_ref(y, yr, dts, "y")
    for name, got, want in zip(("dx", "dA", "dB", "dlora_bias"), (dx, *(t.grad for t in leaves)),
                               (t.grad for t in ref), strict=True):  # fmt: skip
        assert_close_ref(got, want, dts, name)


@pytest.mark.parametrize("shape", [(67, 100, 72), (67, 104, 70)], ids=str)
def test_triton_tma_falls_back_on_unaligned_rows(monkeypatch, shape):
    """Rows that are not 16-byte aligned (K or N not a multiple of 8 in fp16) use the pointer kernels."""
    _skip_unavailable("triton", torch.float16)
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "TMA_MODE", "1")
    M, K, N = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, 8, xdt=torch.float16, adt=torch.float16)
    assert not tri._tma_ok(x, W, torch.empty(M, N, dtype=x.dtype, device=x.device))
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)


def test_triton_tma_falls_back_for_a_k_by_n_weight_with_unaligned_rows(monkeypatch):
    """A weight stored (K, N) in a padded buffer (row stride N + 1: not 16-byte aligned) while x, y and dX are
    aligned: its own rows decide, so both GEMMs take the pointer kernels, and compute the right thing."""
    _skip_unavailable("triton", torch.float16)
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "TMA_MODE", "1")
    M, K, N = 67, 64, 48
    x, W, A, B, b, lb = make_inputs(M, K, N, 8, xdt=torch.float16, adt=torch.float32)
    padded = torch.zeros(K, N + 1, dtype=W.dtype, device=W.device)
    padded[:, :N] = W.T
    W_kn = padded[:, :N].T  # (N, K), strides (1, N + 1)
    assert torch.equal(W_kn, W) and W_kn.stride() == (1, N + 1)
    taken = []
    real = tri._tma_ok
    monkeypatch.setattr(tri, "_tma_ok", lambda *ts, **kw: taken.append(real(*ts, **kw)) or taken[-1])
    run_and_check("triton", x, W_kn, A, B, b, lb, p=0.1)
    assert taken == [False, False], taken
    assert tri._tma_ok(x, tri._tma_weight(W.T.contiguous().T)[0]) and not tri._tma_ok(x, tri._tma_weight(W_kn)[0])


def _triton_op_args(device):
    x, W, A, B, b, lb = make_inputs(67, 72, 48, 16, xdt=torch.float32, adt=torch.float32, lora_bias=True, device=device)
    return (x, W, b, A, B, lb, 2.0, 0.1, 5, True)


def test_triton_ops_registered_schema():
    """The Triton kernels are torch.library ops (what torch.compile traces); their schema checks here.
    (Fake-tensor and autograd checks need a GPU: the CPU interpreter cannot run on fake tensors.)"""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    args = _triton_op_args(DEVICE)
    torch.library.opcheck(torch.ops.lora_kernels.triton_lora_fwd.default, args, test_utils=["test_schema"])
    for got, want in zip(torch.ops.lora_kernels.triton_lora_fwd(*args), tri.lora_fwd(*args), strict=True):
        assert torch.equal(got, want)


def test_allocator_check_reads_every_triton_layout():
    """The in-kernel TMA path sets a scratch allocator unless the user set one; Triton keeps it as a
    ContextVar defaulting to _NULL_ALLOCATOR (3.6+), a ContextVar without that name (3.5), or the
    allocator object itself (3.4). Reading only the first layout raised on the others."""
    import contextvars
    import types

    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    class NullAllocator:
        pass

    def user(size, alignment, stream):
        return None

    def layout(kind, value):
        mod = types.SimpleNamespace(NullAllocator=NullAllocator)
        if kind == "object":  # 3.4
            mod._allocator = value
        else:
            var = contextvars.ContextVar("_allocator")
            var.set(value if value is not None else NullAllocator())
            mod._allocator = var
            if kind == "named":  # 3.6+
                mod._NULL_ALLOCATOR = NullAllocator()
        return mod

    for kind in ("object", "contextvar", "named"):
        assert tri._no_allocator_set(layout(kind, None if kind != "object" else NullAllocator())), kind
        assert not tri._no_allocator_set(layout(kind, user)), kind
    from triton.runtime import _allocation

    tri._no_allocator_set(_allocation)  # the installed Triton's own layout: no exception


@pytest.mark.parametrize("w_kn", [False, True], ids=["W(N,K)", "W(K,N)"])
def test_triton_ops_in_kernel_tma_descriptors(monkeypatch, w_kn):
    """LORA_KERNELS_TMA=1 in the registered ops' traceable launches (what torch.compile traces; run here
    on real tensors through ``wrap=_op_wrap``, as the op does on fake ones): the TMA kernels take plain
    tensors and build their descriptors in the kernel (DEVICE_DESC), and compute exactly what the eager
    launches with host-built descriptors compute: odd M, split-K, p > 0 with the stored mask; a weight
    stored (N, K) and one stored (K, N) (W_KN: the in-kernel descriptor over the (K, N) matrix)."""
    _skip_unavailable("triton", torch.float16)
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "TMA_MODE", "1")
    monkeypatch.setattr(tri, "_shrink_splits", lambda x: 2)
    # LORA_KERNELS_TMA_FLATTEN applies to eager launches only: a traced launch cannot step down, and the
    # flattened forward exceeds an H100's shared memory at rank 64 with fp32 adapters.
    monkeypatch.setattr(tri, "TMA_FLATTEN", True)
    seen = []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        seen.append((kernel.__name__, meta.get("DEVICE_DESC")))
        if "FLATTEN" in meta:
            assert meta["FLATTEN"] == (not meta["DEVICE_DESC"]), (kernel.__name__, meta)
            assert meta["W_KN"] == w_kn
            if meta["DEVICE_DESC"]:  # the plain (K, N) matrix, contiguous: the kernel describes it
                assert args[1].shape == ((200, 72) if w_kn else (72, 200)) and args[1].stride(1) == 1
        real_launch(kernel, grid, args, meta, fixed, wrap)

    monkeypatch.setattr(tri, "_launch", launch)
    x, W, A, B, b, lb = make_inputs(67, 200, 72, 8, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    if w_kn:
        W = W.T.contiguous().T
    fwd_args = (x, W, b, A, B, lb, 2.0, 0.1, 5, True)
    got = tri.lora_fwd(*fwd_args, wrap=tri._op_wrap)
    want = tri.lora_fwd(*fwd_args)
    dy = torch.randn(67, 72).to(x.device, x.dtype)
    bwd_args = (dy, x, W, A, B, want[1], want[2], 2.0, 0.1, 5, True, True)
    got += tri.lora_bwd(*bwd_args, wrap=tri._op_wrap)
    want += tri.lora_bwd(*bwd_args)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    tma = [s for s in seen if "tma" in s[0]]
    assert tma == [("_fwd_tma_kernel", True), ("_fwd_tma_kernel", False), ("_bwd_dx_tma_kernel", True),
                   ("_bwd_dx_tma_kernel", False)], seen  # fmt: skip


@requires_gpu
def test_triton_ops_opcheck_gpu():
    _skip_unavailable("triton", torch.bfloat16)
    from lora_kernels.triton_ops import lora_linear as tri

    args = _triton_op_args("cuda")
    torch.library.opcheck(torch.ops.lora_kernels.triton_lora_fwd.default, args)
    y, t, bits = tri.lora_fwd(*args)
    x, W, _, A, B = args[:5]
    bwd_args = (torch.randn_like(y), x, W, A, B, t, bits, 2.0, 0.1, 5, True, True)
    torch.library.opcheck(torch.ops.lora_kernels.triton_lora_bwd.default, bwd_args)


def _tuned_path_inputs(w_kn: bool) -> tuple:
    """67×64→72, rank 16, fp16 with fp32 adapters and a lora_bias; W stored (K, N) when ``w_kn``."""
    x, W, A, B, b, lb = make_inputs(67, 64, 72, 16, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    return x, (W.T.contiguous().T if w_kn else W), A, B, b, lb


def _one_config_tables(tri, block_n=32):
    """One interpreter-sized config per kernel, for running the tuned launch path in the interpreter."""

    def c(hook=None):
        return tri._c(32, block_n, 32, 4, 1, hook, group_m=4)

    return lambda: {
        tri._shrink_kernel: [c()],
        tri._fwd_kernel: [c()],
        tri._fwd_tma_kernel: [c(tri._set_fwd_desc_blocks)],
        tri._bwd_dy_kernel: [c()],
        tri._bwd_dy1_kernel: [c()],
        tri._bwd_dx_kernel: [c()],
        tri._bwd_dx_tma_kernel: [c(tri._set_dx_desc_blocks)],
    }


@pytest.mark.parametrize("tma,w_kn", [("0", False), ("1", False), ("1", True)], ids=["ptr", "tma", "tma-W(K,N)"])
def test_triton_autotuned_launch_path(monkeypatch, tma, w_kn):
    """The autotuned launches (grid lambdas, per-kernel config filtering, TMA descriptor pre-hooks)
    with one interpreter-sized config per kernel, so the interpreter can run them (GPU calls tune over
    the real tables). With a weight stored (K, N) the pre-hooks give its descriptor (BLOCK_K, BLOCK_N)
    tiles: BLOCK_N = 64 there, so tiles set the other way round would not fit the dots. A second call
    with the same tuning key launches the config the Autotuner chose without its ``run`` (host time),
    pre-hooks included; a call with another key (p = 0: HAS_DROPOUT) goes through the Autotuner."""
    _skip_unavailable("triton", torch.float16)
    from triton.runtime.autotuner import Autotuner

    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "_configs", _one_config_tables(tri, block_n=64 if w_kn else 32))
    monkeypatch.setattr(tri, "TMA_MODE", tma)
    monkeypatch.setattr(tri, "AUTOTUNE", True)
    tri._autotuner.cache_clear()
    try:
        x, W, A, B, b, lb = _tuned_path_inputs(w_kn)
        run_and_check("triton", x, W, A, B, b, lb, p=0.1)
        assert tri._autotuner.cache_info().currsize == 4  # shrink, fwd, bwd-dy, bwd-dx kernels were tuned
        runs, real_run = [], Autotuner.run
        spy = lambda self, *a, **k: runs.append(self.base_fn.__name__) or real_run(self, *a, **k)  # noqa: E731
        monkeypatch.setattr(Autotuner, "run", spy)
        run_and_check("triton", x, W, A, B, b, lb, p=0.1, seed=99)  # the seed is not a tuning key
        assert runs == []
        run_and_check("triton", x, W, A, B, b, lb, p=0.0)  # the GEMM and the dY kernel do not key on dropout
        assert sorted(runs) == sorted(["_shrink_kernel", "_bwd_dx_tma_kernel" if tma == "1" else "_bwd_dx_kernel"])
    finally:
        tri._autotuner.cache_clear()


def test_tuning_log_records_every_config_timed(monkeypatch, tmp_path, capsys):
    """What the autotuner timed is kept per tuning key (``tuning_log``: each config's median, the chosen one)
    and ``bench.lora_linear`` prints it and appends it as JSON lines next to its CSV: an autotuned GPU run then
    says which tiles its rows ran and what the others cost. Two interpreter-sized configs per kernel, timed by
    a stand-in (2 stages: 1 ms, 1 stage: 2 ms); a second call of the same keys times nothing."""
    _skip_unavailable("triton", torch.float16)
    from triton.runtime.autotuner import Autotuner

    from bench import _report
    from bench import lora_linear as bench_ll
    from lora_kernels.triton_ops import lora_linear as tri

    one = _one_config_tables(tri)()
    two = {k: [*v, tri._c(32, 32, 32, 4, 2, v[0].pre_hook, group_m=4)] for k, v in one.items()}
    monkeypatch.setattr(tri, "_configs", lambda: two)
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    monkeypatch.setattr(tri, "AUTOTUNE", True)
    monkeypatch.setattr(tri, "_TUNING_LOG", [])
    monkeypatch.setattr(Autotuner, "_bench", lambda self, *a, config, **k: [1.0 if config.num_stages == 2 else 2.0] * 3)
    tri._autotuner.cache_clear()
    try:
        x, W, A, B, b, lb = make_inputs(67, 64, 72, 16, xdt=torch.float16, adt=torch.float32, lora_bias=True)
        run_and_check("triton", x, W, A, B, b, lb, p=0.1)
        log = tri.tuning_log()
        assert [e["kernel"] for e in log] == ["_shrink_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel",
                                              "_bwd_dx_tma_kernel"], log  # fmt: skip
        for e in log:
            assert sorted(ms for _, ms in e["timings"]) == [1.0, 2.0] and e["best"]["num_stages"] == 2, e
            assert e["key"]["BLOCK_R"] == 16 and e["key"].get("K", 64) == 64 and e["key"]["M_BUCKET"] == 128, e
        assert log[0]["key"]["HAS_DROPOUT"] is True and log[-1]["key"]["HAS_DROPOUT"] is True
        run_and_check("triton", x, W, A, B, b, lb, p=0.1, seed=5)
        assert len(tri.tuning_log()) == 4
    finally:
        tri._autotuner.cache_clear()
    lines = _report.tuning_lines(log).splitlines()
    assert len(lines) == 5 and lines[4].startswith("  _bwd_dx_tma_kernel [M_BUCKET=128 N=72 K=64 BLOCK_R=16"), lines
    assert lines[4].endswith(": 32x32x32/4w/2s 1000*, 32x32x32/4w/1s 2000"), lines
    split = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=256, SPLIT_STORE=True, num_warps=8, num_stages=4)
    assert _report._tiles(split) == "128x64x256/8w/4s/split"  # the dX config that stores in halves at any p
    args = bench_ll.parse_args(["--dry", "--no-plot"])
    bench_ll._report_tuning(tmp_path / "gpu-tuning.jsonl", args, {"run_id": "R1", "commit": "abc", "gpu": "G"})
    assert "tuned tiles" in capsys.readouterr().out
    saved = [json.loads(line) for line in (tmp_path / "gpu-tuning.jsonl").read_text().splitlines()]
    assert [(e["run_id"], e["kernel"], e["best"]["num_stages"]) for e in saved] == [("R1", e["kernel"], 2) for e in log]


def test_tuning_tables_prune_to_the_call_family_and_key_on_cost_switches():
    """_prune keeps the fp32 (BLOCK_K = 32) or the 16-bit family of each table, also for the dY kernel,
    which takes no BLOCK_K (its family is tagged before the stripping); the tuning key includes the
    switches that change a kernel's cost, so p = 0 and p > 0 calls do not share one tuning."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    for kernel in (tri._shrink_kernel, tri._fwd_kernel, tri._bwd_dy_kernel, tri._bwd_dx_kernel):
        table = tri._tuning_configs(kernel)
        fp32 = tri._prune(table, {"IEEE": True, "BLOCK_R": 16})
        half = tri._prune(table, {"IEEE": False, "BLOCK_R": 16})
        assert fp32 and half and len(fp32) + len(half) == len(table), kernel.__name__
        assert all(c.lk_fp32 for c in fp32) and not any(c.lk_fp32 for c in half), kernel.__name__
    assert len(tri._prune(tri._tuning_configs(tri._bwd_dy_kernel), {"IEEE": True})) == 1
    # The 256-row dX tile only at rank ≤ 16 (it needs 320 KiB of shared memory at rank 64).
    rows = lambda br: {
        c.kwargs["BLOCK_M"]
        for c in tri._prune(tri._tuning_configs(tri._bwd_dx_tma_kernel), {"BLOCK_R": br, "dx_desc": 0})
    }  # noqa: E731
    assert 256 in rows(16) and 256 not in rows(32) and 128 in rows(64)
    # The wide (128×256, 256×128) dX output tiles at rank ≤ 16, without dropout or with it from a saved bitmask
    # (regenerating the mask in their epilogue, the 128×256 ones only); at rank 32 the 128×256 ones with 2 and 3
    # stages, unless the mask is regenerated; the 4-warp 128×128 ones not from rank 64 (forward) / 128 (dX) on: they
    # spill there (sessions 32, 33, 35).
    dx = tri._tuning_configs(tri._bwd_dx_tma_kernel)
    wide = lambda cs: [c for c in cs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] > 128 * 128]  # noqa: E731
    split = lambda cs: [c for c in cs if c.kwargs.get("SPLIT_STORE")]  # noqa: E731
    assert len(wide(tri._prune(dx, {"BLOCK_R": 16, "HAS_DROPOUT": False, "dx_desc": None}))) == 4
    assert len(split(tri._prune(dx, {"BLOCK_R": 16, "HAS_DROPOUT": False, "dx_desc": None}))) == 1
    bitmask = {"BLOCK_R": 16, "HAS_DROPOUT": True, "LOAD_BITS": True, "dx_desc": None}
    assert len(wide(tri._prune(dx, bitmask))) == 3 and split(tri._prune(dx, bitmask)) == []  # 4 stages: 280 KiB
    # Regenerating the mask (Philox in the epilogue): the 128×256 tiles, not 256×128 (12–20 B spilled; session 34).
    assert [c.kwargs["BLOCK_M"] for c in wide(tri._prune(dx, {**bitmask, "LOAD_BITS": False}))] == [128, 128]
    rank32 = [(c.kwargs["BLOCK_M"], c.num_stages) for c in wide(tri._prune(dx, {**bitmask, "BLOCK_R": 32}))]
    assert rank32 == [(128, 2), (128, 3)], rank32
    p0 = {"BLOCK_R": 32, "HAS_DROPOUT": False, "dx_desc": None}
    assert [(c.kwargs["BLOCK_M"], c.num_stages) for c in wide(tri._prune(dx, p0))] == rank32
    assert wide(tri._prune(dx, {**bitmask, "BLOCK_R": 32, "LOAD_BITS": False})) == []
    assert wide(tri._prune(dx, {"BLOCK_R": 64, "HAS_DROPOUT": False, "dx_desc": None})) == []
    assert all(c.num_warps == 8 for c in tri._prune(dx, {"BLOCK_R": 128, "dx_desc": None}))
    fwd = tri._tuning_configs(tri._fwd_tma_kernel)
    four = lambda cs: [c for c in cs if c.num_warps == 4 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 2**14]  # noqa: E731
    assert len(four(tri._prune(fwd, {"BLOCK_R": 32}))) == 1 and four(tri._prune(fwd, {"BLOCK_R": 64})) == []
    # The forward's 4-stage 128×256 tile (y stored in halves) up to rank 32: at rank 64 it spills (3.8).
    assert len(split(tri._prune(fwd, {"BLOCK_R": 32}))) == 1 and split(tri._prune(fwd, {"BLOCK_R": 64})) == []
    assert [c.kwargs["SPLIT_STORE"] for c in fwd] == [False] * 4 + [True]  # _tuning_configs: False where unset
    assert "HAS_DROPOUT" in tri._autotuner(tri._bwd_dx_kernel).keys
    for kernel in (tri._bwd_dx_kernel, tri._bwd_dx_tma_kernel):  # bitmask and regenerate: each its own tiles
        assert "LOAD_BITS" in tri._autotuner(kernel).keys
    assert {"HAS_DROPOUT", "SPLIT_K", "STORE_BITS"} <= set(tri._autotuner(tri._shrink_kernel).keys)
    assert {"DO_DT", "DO_DB"} <= set(tri._autotuner(tri._bwd_dy_kernel).keys)  # a frozen lora_B: dT role only
    for kernel in (tri._fwd_tma_kernel, tri._bwd_dx_tma_kernel):  # a weight stored (K, N): its own tiles
        assert "W_KN" in tri._autotuner(kernel).keys
    for kernel in (tri._fwd_tma_kernel, tri._bwd_dx_tma_kernel):  # flattened and not: each its own tiles
        assert "FLATTEN" in tri._autotuner(kernel).keys


def test_tuned_launches_of_one_kernel_are_serialised(monkeypatch):
    """Threads launching one tuned kernel at once (DataParallel replicas, per-device backward threads):
    Triton's Autotuner keeps a call's arguments on itself while its pre-hook re-points that call's TMA
    descriptors, so overlapping calls crash or launch with another call's tiles. (The interpreter itself
    cannot run two kernels at once, so a stand-in tuner measures the overlap.)"""
    _skip_unavailable("triton")
    import threading
    import time

    from lora_kernels.triton_ops import lora_linear as tri

    inside, overlaps, calls = [0], [], []

    class SlowTuner:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                inside[0] += 1
                overlaps.append(inside[0] > 1)
                time.sleep(0.02)  # many GIL switch intervals: unserialised calls would overlap here
                calls.append(args)
                inside[0] -= 1

            return launch

    monkeypatch.setattr(tri, "_configs", lambda: {})  # the tuned branch also runs in the interpreter
    monkeypatch.setattr(tri, "_autotuner", lambda kernel: SlowTuner())
    monkeypatch.setattr(tri, "AUTOTUNE", True)
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        for _ in range(3):
            tri._launch(tri._fwd_kernel, lambda META: (1,), (i,), {}, {}, tri._identity)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 12 and not any(overlaps)


def test_triton_refuses_bfloat16_before_sm80(monkeypatch):
    """Triton cannot compile bf16 dots for a pre-Ampere GPU (V100, T4): the backend says so (and "auto"
    takes another), fp16 stays available."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with FakeTensorMode():
        x16, xb = (torch.empty(4, 16, dtype=dt, device="cuda") for dt in (torch.float16, torch.bfloat16))
        a32 = torch.empty(2, 16, dtype=torch.float32, device="cuda")
        assert tri.unavailable_reason(x16, x16, a32) is None
        assert "sm_80" in tri.unavailable_reason(xb, xb, a32)
        assert "sm_80" in tri.unavailable_reason(x16, x16, a32.to(torch.bfloat16))


def test_no_tuning_inside_a_cuda_graph_capture(monkeypatch):
    """Tuning a new key times configs and synchronises, which a CUDA-graph capture forbids: inside a
    capture a key the eager warm-up tuned replays its tuned config (the kernel it loaded then; the
    fixed tiles may never have been loaded, and a module load fails in a capture), any other key
    takes the fixed tiles. The tuner below follows Triton's Autotuner.run: prune_configs, then the
    benchmark, only for a key not in its cache. Also: tuning that runs out of GPU memory (its
    benchmark buffers) falls back to the fixed tiles."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    launched = []

    class Recorder:
        arg_names = ["x", "BLOCK_M"]

        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(("fixed", args[0]))

    class Tuner:
        cache: dict = {}
        oom = False

        def prune_configs(self, kwargs):
            return ["config"]

        def __getitem__(self, grid):
            def run(key, **kw):
                if key not in self.cache:
                    self.prune_configs(kw)
                    if self.oom:
                        raise torch.cuda.OutOfMemoryError("do_bench's L2 flush buffer")
                    self.cache[key] = "tuned"
                launched.append((self.cache[key], key))

            return run

    tuner = Tuner()
    monkeypatch.setattr(tri, "_autotuner", lambda kernel: tuner)
    monkeypatch.setattr(tri, "AUTOTUNE", True)
    monkeypatch.setattr(tri, "_interpret", lambda: False)  # as on a GPU
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    fixed = dict(BLOCK_M=64, num_warps=4, num_stages=2)
    for capturing, key in ((True, "a"), (False, "a"), (True, "a"), (True, "b")):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda c=capturing: c)
        tri._launch(Recorder(), lambda META: (1,), (key,), {}, fixed, tri._identity)
        assert "prune_configs" not in vars(tuner)  # the capture's refusal is removed again
    assert launched == [("fixed", "a"), ("tuned", "a"), ("tuned", "a"), ("fixed", "b")]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuner.oom, launched[:] = True, []
    tri._launch(Recorder(), lambda META: (1,), ("c",), {}, fixed, tri._identity)
    assert launched == [("fixed", "c")]


@requires_gpu
def test_triton_autotune_gpu(monkeypatch):
    """The real autotuning tables on a GPU (the suite otherwise runs the fixed tiles, see conftest)."""
    _skip_unavailable("triton", torch.bfloat16)
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "AUTOTUNE", True)
    x, W, A, B, b, lb = make_inputs(1024, 1024, 2048, 16, xdt=torch.bfloat16, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1, mode="regenerate")


def test_shrink_tiles_fill_the_gpu(monkeypatch):
    """The untuned shrink (torch.compile, LORA_KERNELS_AUTOTUNE=0) picks row blocks by M so its one-pass
    grid covers ~90 % of an H100's 132 SMs: 128 rows only from M ≈ 15 K, then 64, then 32."""
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "_interpret", lambda: False)
    fixed = tri._cfg(torch.empty(1, 8, dtype=torch.bfloat16), 16)
    got = {M: tri._shrink_cfg(torch.empty(M, 8, dtype=torch.bfloat16), fixed) for M in (1, 2048, 8192, 16384, 65536)}
    assert {M: (c["BLOCK_M"], c["BLOCK_K"]) for M, c in got.items()} == {
        1: (32, 128),
        2048: (32, 128),
        8192: (64, 128),
        16384: (128, 64),
        65536: (128, 64),
    }
    assert all(c["num_warps"] == 4 and c["num_stages"] == fixed["num_stages"] for c in got.values())
    fp32 = tri._cfg(torch.empty(1, 8), 16)
    assert tri._shrink_cfg(torch.empty(8192, 8), fp32) == {**fp32, "num_warps": 4}  # fp32: its own tiles


def test_dx_tiles_fill_the_gpu(monkeypatch):
    """The untuned TMA dX GEMM takes the forward's measured-best shape, 128×256 output tiles (64-wide steps over N),
    at rank ≤ 16 (≤ 32 unless it regenerates the mask) where there are more than 66 of them (half an H100's 132 SMs:
    fewer, and twice as many 128×128 tiles still run in one wave), else 128×128 (bench/NOTES.md, session 35); the
    single-pass backward (no x given) and LORA_KERNELS_DX_WIDE=0 keep 128×128; the forward's tiles are unchanged."""
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops import single_pass as sp

    monkeypatch.setattr(tri, "_interpret", lambda: False)
    x = lambda M, K=4096: torch.empty(M, K, dtype=torch.bfloat16)  # noqa: E731
    # (M, K, r) -> (BLOCK_K, stages): 1024 wide tiles at M = 8192, 256 at 2048, 128 at 1024, 64 at 512 (K = 4096);
    # K = 2816 has 11 column tiles: 77 at M = 769, 66 at 768; K = 14336 has 56: 112 at M = 256, 56 at 128.
    # Rank 17-32: wide unless the epilogue regenerates the mask (it spills there).
    cases = {(8192, 4096, 16): (256, 3), (8192, 4096, 1): (256, 3), (2048, 4096, 16): (256, 3),
             (1024, 4096, 16): (256, 3), (769, 2816, 16): (256, 3), (768, 2816, 16): (128, 3),
             (512, 4096, 16): (128, 3), (1, 4096, 16): (128, 3), (256, 14336, 16): (256, 3),
             (128, 14336, 16): (128, 3), (8192, 4096, 17): (256, 3), (8192, 4096, 32): (256, 3),
             (8192, 4096, 33): (128, 3), (8192, 4096, 64): (128, 3), (8192, 4096, 256): (128, 2)}  # fmt: skip
    for regenerate in (False, True):
        got = {}
        for M, K, r in cases:
            c = tri._tma_cfg(x(M, K), r, backward=True, regenerate=regenerate)
            assert (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) == (128, 64, 8), c
            got[M, K, r] = (c["BLOCK_K"], c["num_stages"])
        want = {k: (128, v[1]) if regenerate and k[2] > 16 else v for k, v in cases.items()}
        assert got == want, regenerate
    assert sp._single_bwd_cfg(16)["BLOCK_K"] == 128
    fwd = tri._tma_cfg(x(8192), 16, backward=False)
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["BLOCK_K"], fwd["num_stages"]) == (128, 256, 64, 3)
    monkeypatch.setattr(tri, "DX_WIDE", "0")  # LORA_KERNELS_DX_WIDE=0: the A/B row triton-dx128
    assert tri._tma_cfg(x(8192), 16, backward=True)["BLOCK_K"] == 128
    monkeypatch.setattr(tri, "DX_WIDE", "auto")
    monkeypatch.setattr(tri, "_interpret", lambda: True)  # the interpreter's small tiles
    assert tri._tma_cfg(x(8192), 16, backward=True)["BLOCK_K"] == 32


@pytest.mark.skipif(
    not INTERPRET,
    reason="the interpreter's 32-column tiles and fp32 x (test_backward_split_sums_under_load[one-read-dY] on a GPU)",
)
@pytest.mark.parametrize(
    "M,N,r,splits,xdt",
    [(67, 130, 16, 1, torch.float16), (300, 257, 8, 3, torch.float32), (67, 130, 16, 4, torch.float16),
     (96, 30, 1, 2, torch.float32), (1, 70, 16, 1, torch.float32)],
    ids=["5-blocks", "splits", "empty-split", "one-block", "M=1"],
)  # fmt: skip
def test_dy_one_read_kernel(monkeypatch, M, N, r, splits, xdt):
    """dT, dB and Σ dY from one read of dY (``_bwd_dy1_kernel``, LORA_KERNELS_DY_PASSES=1): programs of a row split ×
    a 32-column block (the interpreter's tiles), dT stored as a partial per column block, the last program to arrive
    at a row block summing its partials. N = 130: five partials, the last block partly out of bounds; N = 30: one
    block, dT stored directly; row splits forced (M = 67 in four 32-row splits: the last is empty). Against float64
    with p > 0 and against ``_bwd_dy_kernel`` (the default, two reads); relaunched on the same counters (the
    autotuner's timing runs): each is re-armed to zero by its last arrival, and the second launch gives the same dT.
    Outputs start NaN-poisoned (the reference comparison) or are NaN-filled before the relaunch."""
    _skip_unavailable("triton", xdt)
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "BWD_SPLIT_M", str(splits))
    monkeypatch.setattr(tri, "DY_PASSES", "1")
    launched, relaunched = [], []
    real_launch = tri._launch

    def launch(kernel, grid, args, meta, fixed, wrap):
        launched.append(kernel.__name__)
        real_launch(kernel, grid, args, meta, fixed, wrap)
        if kernel is tri._bwd_dy1_kernel:
            dt_part, dt, cnt = args[3], args[4], args[7]
            assert dt_part.shape[0] == (-(-N // 32) if N > 32 else 0), dt_part.shape
            assert cnt.numel() == (-(-M // 32) if N > 32 else 0) and not cnt.any(), cnt  # re-armed
            first = dt.clone()
            dt.fill_(float("nan"))
            real_launch(kernel, grid, args, meta, fixed, wrap)
            assert torch.equal(dt, first) and not cnt.any()
            relaunched.append(True)

    monkeypatch.setattr(tri, "_launch", launch)
    x, W, A, B, b, lb = make_inputs(M, 64, N, r, xdt=xdt, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)
    assert launched[2] == "_bwd_dy1_kernel" and relaunched == [True], launched
    # The two kernels agree (fp32 partials summed in another order: not bit for bit).
    y, t, bits = tri.lora_fwd(x, W, b, A, B, lb, 2.0, 0.1, 5, True)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    one = tri.lora_bwd(dy, x, W, A, B, t, bits, 2.0, 0.1, 5, True, True)
    monkeypatch.setattr(tri, "DY_PASSES", "2")
    launched.clear()
    two = tri.lora_bwd(dy, x, W, A, B, t, bits, 2.0, 0.1, 5, True, True)
    assert launched[0] == "_bwd_dy_kernel", launched
    for a, b_ in zip(one, two, strict=True):
        torch.testing.assert_close(a, b_, rtol=2e-3 if xdt == torch.float16 else 1e-5, atol=1e-4)


def test_dy_one_read_rule(monkeypatch):
    """One read of dY only when asked for (LORA_KERNELS_DY_PASSES=1, until measured on a GPU), where dT and dB are
    both needed, at rank ≤ 16 (its tiles spill at 32), for 16-bit x on a GPU (fp32's true-fp32 dots spilled) and any
    x in the interpreter. Its fixed tiles are 64 × 256 with 8 warps; no tuning config has narrower columns (the dT
    partials are sized for the fixed tiles' count) or fewer than 32 rows (the counters, one per row block)."""
    from lora_kernels.triton_ops import lora_linear as tri

    bf16, fp32 = torch.empty(8, 8, dtype=torch.bfloat16), torch.empty(8, 8)
    monkeypatch.setattr(tri, "_interpret", lambda: False)
    assert tri.DY_PASSES == "2" and not tri._dy_one_pass(bf16, 16)
    monkeypatch.setattr(tri, "DY_PASSES", "1")
    assert [tri._dy_one_pass(bf16, r) for r in (1, 8, 16, 17, 32, 64, 256)] == [True] * 3 + [False] * 4
    assert not tri._dy_one_pass(fp32, 16)
    fixed = tri._dy1_cfg(bf16)
    assert (fixed["BLOCK_M"], fixed["BLOCK_N"], fixed["num_warps"]) == (64, 256, 8)
    table = tri._tuning_configs(tri._bwd_dy1_kernel)
    assert table and all(c.kwargs["BLOCK_N"] >= fixed["BLOCK_N"] and c.kwargs["BLOCK_M"] >= 32 for c in table)
    assert not any(c.lk_fp32 for c in table) and tri._prune(table, {"BLOCK_R": 16}) == table
    monkeypatch.setattr(tri, "_interpret", lambda: True)
    assert tri._dy_one_pass(fp32, 16) and tri._dy1_cfg(fp32)["BLOCK_N"] == 32


@pytest.mark.parametrize("bm", [32, 64])
def test_shrink_gpu_tiles_match_reference(monkeypatch, bm):
    """The shrink with the row blocks _shrink_cfg picks on a GPU (32/64 rows, 128-wide K steps), run in
    the interpreter: odd shapes, p > 0, stored and regenerated masks, every gradient vs float64."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    real = tri._shrink_cfg
    monkeypatch.setattr(
        tri, "_shrink_cfg", lambda x, fixed, a=None: {**real(x, fixed, a), "BLOCK_M": bm, "BLOCK_K": 128}
    )
    x, W, A, B, b, lb = make_inputs(67, 200, 72, 8, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)
    run_and_check("triton", x, W, A, B, b, lb, p=0.5, mode="regenerate")


def test_shrink_splits_fill_the_gpu(monkeypatch):
    """Below M ≈ 3.8 K rows the shrink splits K (at most 4 ways, at least 512 columns each) so its grid
    of 32-row blocks reaches ~90 % of an H100's 132 SMs; fp32 and the interpreter never split."""
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "_interpret", lambda: False)
    shapes = [(1, 4096), (512, 4096), (2048, 4096), (2048, 14336), (3800, 4096), (4096, 4096), (2048, 1000), (1, 256)]
    got = {(M, K): tri._shrink_splits(torch.empty(M, K, dtype=torch.bfloat16)) for M, K in shapes}
    assert got == {(1, 4096): 4, (512, 4096): 4, (2048, 4096): 2, (2048, 14336): 2, (3800, 4096): 1,
                   (4096, 4096): 1, (2048, 1000): 1, (1, 256): 1}  # fmt: skip
    assert tri._shrink_splits(torch.empty(512, 4096)) == 1  # fp32
    monkeypatch.setattr(tri, "_interpret", lambda: True)
    assert tri._shrink_splits(torch.empty(512, 4096, dtype=torch.float16)) == 1
    monkeypatch.setattr(tri, "SHRINK_SPLIT_K", "3")  # LORA_KERNELS_SHRINK_SPLIT_K: A/B measurements
    assert tri._shrink_splits(torch.empty(512, 4096, dtype=torch.float16)) == 3
    monkeypatch.setattr(tri, "SHRINK_SPLIT_K", "0")
    assert tri._shrink_splits(torch.empty(512, 4096, dtype=torch.float16)) == 1


@pytest.mark.parametrize("splits,tma", [(2, "0"), (3, "1"), (4, "0")])
def test_shrink_split_k_matches_reference(monkeypatch, splits, tma):
    """Split-K shrink (partials summed in the GEMM epilogue, which also writes the T saved for backward):
    ranges of unequal length, an empty last range (K = 40 in 4 splits of 32 columns), the pointer and TMA
    GEMMs, p > 0 with stored and regenerated masks, every gradient vs float64. T starts NaN-poisoned, so
    a row the epilogue failed to write shows in the gradients."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "_shrink_splits", lambda x: splits)
    monkeypatch.setattr(tri, "TMA_MODE", tma)
    x, W, A, B, b, lb = make_inputs(67, 200, 72, 8, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)
    run_and_check("triton", x, W, A, B, b, lb, p=0.5, mode="regenerate")
    x, W, A, B, b, lb = make_inputs(33, 40, 48, 3, xdt=torch.float32, adt=torch.float32, lead=(2,))
    run_and_check("triton", x, W, A, B, b, lb, p=0.25)
    # The mask the split shrink stores is the reference's, bit for bit.
    bits = tri.lora_fwd(x.reshape(-1, 40), W, b, A, B, lb, 2.0, 0.25, 77, True)[2]
    ref = pack_mask(dropout_keep_mask(77, 66, 40, 0.25, device=x.device))
    assert torch.equal(bits, ref)


def test_backward_row_splits_fill_the_gpu(monkeypatch):
    """The backward's dA and dB reductions split M until their blocks reach ~2 programs per SM of an H100/H200
    (132), at most 16 splits and at least 512 rows each; fp32 and the interpreter keep 1 unless
    LORA_KERNELS_BWD_SPLIT_M fixes a count."""
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "_interpret", lambda: False)
    x = lambda M: torch.empty(M, 8, dtype=torch.bfloat16)  # noqa: E731
    # (M, blocks) -> splits: K = 4096 (32 blocks of 128), N = 14336 (112), K = 1024 (8), M too short to split
    cases = {(8192, 32): 9, (8192, 112): 3, (8192, 8): 16, (16384, 8): 16, (2048, 32): 4, (1000, 32): 1, (1, 8): 1,
             (8192, 300): 1}  # fmt: skip
    assert {c: tri._row_splits(x(c[0]), c[1]) for c in cases} == cases
    assert tri._row_splits(torch.empty(8192, 8), 32) == 1  # fp32
    monkeypatch.setattr(tri, "_interpret", lambda: True)
    assert tri._row_splits(x(8192), 32) == 1
    monkeypatch.setattr(tri, "BWD_SPLIT_M", "40")
    assert tri._row_splits(x(8192), 32) == 16
    monkeypatch.setattr(tri, "BWD_SPLIT_M", "0")
    assert tri._row_splits(x(8192), 32) == 1


@pytest.mark.parametrize("splits,tma,da", [(3, "0", "separate"), (4, "1", "separate"), (4, "1", "fused"),
                                           (2, "1", "separate")])  # fmt: skip
def test_backward_row_splits_match_reference(monkeypatch, splits, tma, da):
    """dA and dB (and Σ dY for the lora_bias gradient) reduced over row splits into fp32 partials, summed
    after: splits of 32 rows at M = 67 leave the last one short and, in 4 splits, one empty (its partial must
    be zeros); the pointer kernel's dA programs, the TMA path's own dA launch and its fused variant
    (``LORA_KERNELS_BWD_DA=fused``); stored and regenerated masks; every gradient vs float64. Outputs start
    NaN-poisoned, so a partial left unwritten shows."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "BWD_SPLIT_M", str(splits))
    monkeypatch.setattr(tri, "TMA_MODE", tma)
    monkeypatch.setattr(tri, "BWD_DA", da)
    launched = []
    real = tri._launch
    monkeypatch.setattr(
        tri, "_launch", lambda kernel, *a, **k: (launched.append(kernel.__name__), real(kernel, *a, **k))
    )
    x, W, A, B, b, lb = make_inputs(67, 200, 72, 8, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)
    gemm = "_bwd_dx_tma_kernel" if tma == "1" else "_bwd_dx_kernel"
    own_da = ["_bwd_dx_kernel"] if (tma == "1" and da == "separate") else []
    assert launched == ["_shrink_kernel", launched[1], "_bwd_dy_kernel", gemm, *own_da], launched
    run_and_check("triton", x, W, A, B, b, lb, p=0.5, mode="regenerate")
    run_and_check("triton", x, W, A, B, b, lb, p=0.0)


@pytest.mark.parametrize("tma,da", [("0", "fused"), ("1", "fused"), ("1", "separate")])
def test_backward_split_sums_stay_in_the_two_launches(monkeypatch, tma, da):
    """With row splits the backward is still two launches: the dX kernel's first tiles sum the dY kernel's dB /
    Σ dY partials, and the last dA program of each K-block to finish sums that block's partials (arrivals
    counted in int32 counters that the dY kernel zeroes). No torch sum follows. Each launch of the dX kernel
    runs twice here, as the autotuner's timing runs do: the last arrival re-arms its counter, so the repeat
    finds zeros too and sums again (counters poisoned at allocation; all zero after). Gradients vs float64,
    including the partial cases (x frozen: dA programs alone; lora_A frozen: dX and the dB sums)."""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "BWD_SPLIT_M", "3")
    monkeypatch.setattr(tri, "TMA_MODE", tma)
    monkeypatch.setattr(tri, "BWD_DA", da)
    monkeypatch.setattr(tri, "_sum_splits", lambda part, splits: pytest.fail(f"a torch sum of {splits} partials"))
    launched, counters = [], []
    real_launch, real_empty = tri._launch, tri._empty

    def launch(kernel, *a, **k):
        launched.append(kernel.__name__)
        for _ in range(2 if kernel.__name__.startswith("_bwd_dx") else 1):
            real_launch(kernel, *a, **k)

    def empty(shape, device, dtype):
        t = real_empty(shape, device, dtype)
        if dtype == torch.int32:
            counters.append(t.fill_(0x5A5A))
        return t

    monkeypatch.setattr(tri, "_launch", launch)
    monkeypatch.setattr(tri, "_empty", empty)
    x, W, A, B, b, lb = make_inputs(67, 200, 72, 8, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)
    bwd = launched[2:]
    assert bwd[0] == "_bwd_dy_kernel" and len(bwd) == (3 if da == "separate" else 2), launched
    assert len(counters) == 1 and counters[0].numel() == tri._cdiv(200, tri._CNT_COLS)
    assert not counters[0].any(), counters[0]
    for frozen in ("x", "lora_A"):
        xg = x.detach().clone().requires_grad_(frozen != "x")
        Ag, Bg = A.detach().clone().requires_grad_(frozen != "lora_A"), B.detach().clone().requires_grad_()
        y = lk.lora_linear(xg, W, Ag, Bg, b, None, 2.0, 0.1, True, 1234, backend="triton")
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
        y.backward(dy)
        rx, rA, rB = (t.detach().double().requires_grad_() for t in (x, A, B))
        y_ref = lora_linear_ref(rx, W.double(), rA, rB, b.double(), None, 2.0, 0.1, True, 1234)
        y_ref.backward(dy.double())
        dts = (x.dtype, A.dtype)
        assert_close_ref(Bg.grad, rB.grad, dts, f"dB ({frozen} frozen)")
        if frozen == "x":
            assert xg.grad is None
            assert_close_ref(Ag.grad, rA.grad, dts, "dA (x frozen)")
        else:
            assert Ag.grad is None
            assert_close_ref(xg.grad, rx.grad, dts, "dx (lora_A frozen)")
    assert all(not c.any() for c in counters), counters


# Program schedules for the interpreter (tests/_concurrent_interp.py): the grid's programs in reverse or shuffled
# order, one after another, or all at once in threads switching every few microseconds.
_SCHEDULES = {
    "reverse": lambda idx: idx[::-1],
    "shuffled": lambda idx: random.Random(5).sample(idx, len(idx)),
    "threads": None,
}


@pytest.mark.skipif(not INTERPRET, reason="schedules the interpreter's programs (CPU)")
@pytest.mark.parametrize("schedule", list(_SCHEDULES))
@pytest.mark.parametrize(
    "tma, da, dy_passes",
    [("0", "fused", "2"), ("1", "separate", "2"), ("1", "fused", "1")],
    ids=["pointer-dA-fused", "tma-dA-separate", "tma-one-read-dY"],
)
def test_backward_arrivals_in_any_order(monkeypatch, schedule, tma, da, dy_passes):
    """The backward's sums across programs are made by whichever program arrives last at a counter: the last of a dA
    K-block's row splits (``_sum_when_last``) and, with one read of dY, the last of a row block's column blocks
    (``_sum_dt_partials``). Each adds the partials in split / block order, so the gradients must be the same bits
    whatever order the programs finish in. The interpreter runs a grid's programs in index order, where the last to
    arrive is always the highest index (other orders were checked only on a GPU: test_backward_split_sums_under_load).
    Here the same backward runs in reverse order (split 0 last), in a shuffled order, and with every program in its
    own thread at once (real atomics, threads switching every 10 µs). Each must give the bits of the index-order run,
    within the table of float64, with every counter re-armed to zero. (A mutant whose last program adds its own dA
    partial first passes the index-order split-sum test and fails here; one that does so in the dT sums fails the
    shuffled schedule.)"""
    _skip_unavailable("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    from ._concurrent_interp import concurrent_programs

    if tma == "1":
        _tma_forced(monkeypatch)
    monkeypatch.setattr(tri, "BWD_SPLIT_M", "3")
    monkeypatch.setattr(tri, "BWD_DA", da)
    monkeypatch.setattr(tri, "DY_PASSES", dy_passes)
    launched, counters = [], []
    real_launch, real_empty, real_zeros = tri._launch, tri._empty, torch.zeros

    def launch(kernel, *a, **k):
        launched.append(kernel.__name__)
        real_launch(kernel, *a, **k)

    def empty(shape, device, dtype):
        t = real_empty(shape, device, dtype)
        if dtype == torch.int32:
            counters.append(t.fill_(0x5A5A))  # (the dY kernel zeroes the dX kernel's counters)
        return t

    def zeros(*a, **k):
        t = real_zeros(*a, **k)
        if t.dtype == torch.int32:
            counters.append(t)  # (the one-read dY kernel's own counters)
        return t

    monkeypatch.setattr(tri, "_launch", launch)
    monkeypatch.setattr(tri, "_empty", empty)
    monkeypatch.setattr(tri.torch, "zeros", zeros)
    # N = 136: five 32-column blocks of dY (dT partials), rows 16-byte aligned (TMA); K = 200: seven 32-column dA
    # K-blocks, three row splits each.
    x, W, A, B, b, lb = make_inputs(67, 200, 136, 8, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, lb)]
    y = lk.lora_linear(leaves[0], W, *leaves[1:3], b, leaves[3], 2.0, 0.1, True, 1234, backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    launched.clear()
    in_order = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    dy_kernel = "_bwd_dy1_kernel" if dy_passes == "1" else "_bwd_dy_kernel"
    gemm = "_bwd_dx_tma_kernel" if tma == "1" else "_bwd_dx_kernel"
    assert launched == [dy_kernel, gemm, *(["_bwd_dx_kernel"] if da == "separate" else [])], launched
    counters.clear()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with concurrent_programs(timeout=300, order=_SCHEDULES[schedule]):
            scheduled = torch.autograd.grad(y, leaves, dy)
    finally:
        sys.setswitchinterval(switch)
    assert counters and all(not c.any() for c in counters), counters
    for name, u, v in zip(("dx", "dA", "dB", "dlora_bias"), in_order, scheduled, strict=True):
        assert torch.equal(u, v), f"{name}: other bits when the programs run {schedule}"
    rx, rA, rB, rlb = (t.detach().double().requires_grad_() for t in (x, A, B, lb))
    y_ref = lora_linear_ref(rx, W.double(), rA, rB, b.double(), rlb, 2.0, 0.1, True, 1234)
    ref = torch.autograd.grad(y_ref, (rx, rA, rB, rlb), dy.double())
    for name, u, v in zip(("dx", "dA", "dB", "dlora_bias"), scheduled, ref, strict=True):
        assert_close_ref(u, v, (x.dtype, A.dtype), name)


@requires_gpu
@pytest.mark.parametrize("mode", ["fixed", "tuned", "one-read-dY"])
def test_backward_split_sums_under_load(monkeypatch, mode):
    """The in-kernel sums of the backward's row splits at a real size (8192×4096→4096, bf16 x, fp32 adapters,
    p = 0.1): 9 splits per dA K-block on an H100/H200, every SM busy, so the dA programs of a K-block finish in
    any order and the last one sums. Ten backwards bit-identical (a race in the arrival count or a partial read
    before it landed would differ run to run) and equal to float64 within the table; "tuned" lets the autotuner
    time its configs first (repeated launches on the same counters); "one-read-dY" (LORA_KERNELS_DY_PASSES=1) adds
    the dT sums of ``_bwd_dy1_kernel``, 16 column blocks arriving at each row block."""
    _skip_unavailable("triton", torch.bfloat16)
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "AUTOTUNE", mode == "tuned")
    if mode == "one-read-dY":
        monkeypatch.setattr(tri, "DY_PASSES", "1")
    launched, real_launch = [], tri._launch
    monkeypatch.setattr(tri, "_launch", lambda kernel, *a, **k: (launched.append(kernel), real_launch(kernel, *a, **k)))
    x, W, A, B, b, lb = make_inputs(8192, 4096, 4096, 16, xdt=torch.bfloat16, adt=torch.float32, lora_bias=True)
    assert tri._row_splits(x, tri._cdiv(4096, 128)) > 1, "this GPU does not split the reductions"
    dy = torch.randn(8192, 4096, device=DEVICE).to(torch.bfloat16)
    runs = []
    for _ in range(10):
        xg, Ag, Bg, lbg = (t.detach().clone().requires_grad_() for t in (x, A, B, lb))
        lk.lora_linear(xg, W, Ag, Bg, b, lbg, 2.0, 0.1, True, 99, backend="triton").backward(dy)
        runs.append((xg.grad, Ag.grad, Bg.grad, lbg.grad))
    dy_kernel = tri._bwd_dy1_kernel if mode == "one-read-dY" else tri._bwd_dy_kernel
    assert dy_kernel in launched, [k.__name__ for k in launched]
    for run in runs[1:]:
        for name, u, v in zip(("dx", "dA", "dB", "dlora_bias"), runs[0], run, strict=True):
            assert torch.equal(u, v), f"{name} differs run to run"
    rx, rA, rB, rlb = (t.detach().double().requires_grad_() for t in (x, A, B, lb))
    lora_linear_ref(rx, W.double(), rA, rB, b.double(), rlb, 2.0, 0.1, True, 99).backward(dy.double())
    dts = (torch.bfloat16, torch.float32)
    wants = (rx.grad, rA.grad, rB.grad, rlb.grad)
    for name, got, want in zip(("dx", "dA", "dB", "dlora_bias"), runs[0], wants, strict=True):
        assert_close_ref(got, want, dts, name)


@requires_gpu
@pytest.mark.parametrize("K,desc", [(4096, "host"), (4096, "device"), (4090, "host")],
                         ids=["tma", "tma-in-kernel-descriptors", "pointer"])  # fmt: skip
def test_launch_cache_matches_tritons_launch_bitwise(monkeypatch, K, desc):
    """The launch cache, launch plans and call plans (``lora_kernels.triton_ops.launch``, sessions 38–41) on a
    GPU: a forward+backward step at 2048×K→4096, bf16 x, fp32 adapters, p = 0.1, fixed tiles, comes out
    bit-identical with every launch through Triton's ``JITFunction.run`` (cache off), through the cache (its
    misses, then its hits), replayed from a launch plan (recorded, then replayed) and each call replayed whole
    from a call plan. K = 4090 takes the pointer kernels (rows not 16-byte aligned). With
    ``LORA_KERNELS_TMA_DESC=device`` the TMA kernels build their descriptors (a global scratch per launch from the
    allocator lora_kernels sets) and give the host descriptors' results bit for bit. The CPU tests compare what
    reaches the launcher."""
    _skip_unavailable("triton", torch.bfloat16)
    from lora_kernels.triton_ops import launch
    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "AUTOTUNE", False)
    x, W, A, B, b, lb = make_inputs(2048, K, 4096, 16, xdt=torch.bfloat16, adt=torch.float32, lora_bias=True)
    dy = torch.randn(2048, 4096, device=DEVICE).to(torch.bfloat16)

    def step(fast: bool, plans: bool, calls: bool = False) -> tuple:
        monkeypatch.setattr(launch, "FAST_LAUNCH", fast)
        monkeypatch.setattr(launch, "PLANS", plans)
        monkeypatch.setattr(launch, "CALLS", calls)
        xg, Ag, Bg, lbg = (t.detach().clone().requires_grad_() for t in (x, A, B, lb))
        y = lk.lora_linear(xg, W, Ag, Bg, b, lbg, 2.0, 0.1, True, 7, backend="triton")
        y.backward(dy)
        return y, xg.grad, Ag.grad, Bg.grad, lbg.grad

    want = step(False, False)
    if desc == "device":
        monkeypatch.setattr(tri, "TMA_DESC", "device")
        for name, u, v in zip(("y", "dx", "dA", "dB", "dlora_bias"), want, step(False, False), strict=True):
            assert torch.equal(u, v), f"{name} differs between host and in-kernel descriptors"
    for plans, calls, counter, per_step in ((False, False, "hits", 4), (True, False, "plan_hits", 4),
                                            (True, True, "call_hits", 2)):  # fmt: skip
        before = launch.stats()[counter]
        for _ in range(3):
            got = step(True, plans, calls)
            for name, u, v in zip(("y", "dx", "dA", "dB", "dlora_bias"), want, got, strict=True):
                assert torch.equal(u, v), f"{name} differs between Triton's launch and the cache's ({counter})"
        # The last two steps: every launch a hit of the cache, then a replay of the launch plan, then the forward
        # and the backward each replayed whole from its call plan.
        assert launch.stats()[counter] - before >= 2 * per_step, (counter, launch.stats())


@pytest.mark.parametrize("tma", ["auto", "1"])
@pytest.mark.parametrize("M,dtype", [(2048, torch.bfloat16), (8192, torch.float16), (300, torch.float32)])
def test_host_code_under_symbolic_shapes(monkeypatch, M, dtype, tma):
    """torch.compile with dynamic shapes (its automatic dynamic, after a batch of another length) runs
    the launchers with M as a SymInt. Traced here with make_fx(tracing_mode="symbolic") and the GPU's
    host-side choices (tiles, K splits): every constexpr and launch option must come out a plain value,
    never a symbolic expression (Triton specialises on constexprs); grids and int arguments may stay
    symbolic. No GPU: launches are recorded, not run."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lora_kernels.triton_ops import lora_linear as tri

    monkeypatch.setattr(tri, "_interpret", lambda: False)
    # LORA_KERNELS_TMA=1: the TMA kernels with in-kernel descriptors (alignment from the storage offset).
    monkeypatch.setattr(tri, "TMA_MODE", tma)
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((self.kernel.__name__, grid, args, kwargs))

            return run

    K, N, R = 4096, 512, 16

    def fwd_bwd(x, w, b, a, bb, dy):
        y, t, bits = tri.lora_fwd(x, w, b, a, bb, None, 2.0, 0.1, 5, True, wrap=Recorder)
        dx, da, db, colsum = tri.lora_bwd(dy, x, w, a, bb, t, bits, 2.0, 0.1, 5, True, True, wrap=Recorder)
        return y, dx, da, db, colsum

    rnd = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    make_fx(fwd_bwd, tracing_mode="symbolic")(rnd(M, K), rnd(N, K), rnd(N), rnd(R, K), rnd(N, R), rnd(M, N))
    names = [name for name, *_ in launches]
    tma_ = tma == "1" and dtype != torch.float32
    gemms = ["_fwd_tma_kernel", "_bwd_dx_tma_kernel"] if tma_ else ["_fwd_kernel", "_bwd_dx_kernel"]
    assert names == ["_shrink_kernel", gemms[0], "_bwd_dy_kernel", gemms[1]], names
    if tma_:  # plain tensors where the host path passes descriptors
        assert all(launches[i][3]["DEVICE_DESC"] is True for i in (1, 3))
        assert all(isinstance(launches[i][2][j], torch.Tensor) for i in (1, 3) for j in range(3))
    assert any(isinstance(a, torch.SymInt) for a in launches[0][2]), "M was not symbolic: nothing tested"
    for name, _grid, _, kwargs in launches:
        symbolic = {k: v for k, v in kwargs.items() if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))}
        assert not symbolic, (name, symbolic)
    split = launches[0][3]["SPLIT_K"]
    assert split == (2 if M == 2048 and dtype != torch.float32 else 1) == launches[1][3]["SPLIT_K"]
    assert launches[0][1][1] == split  # the shrink's grid: (row blocks, splits)


def test_untuned_launch_steps_down_on_out_of_resources(monkeypatch):
    """Fixed tiles too big for a GPU's shared memory: one stage fewer, then half the N tile."""
    _skip_unavailable("triton")
    from triton.runtime.errors import OutOfResources

    from lora_kernels.triton_ops import lora_linear as tri

    tried = []

    class FakeKernel:
        arg_names = ["X", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]

        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append((kw["BLOCK_N"], kw["num_stages"], grid))
                if kw["BLOCK_N"] > 128:
                    raise OutOfResources(232448, 227000, "shared memory")

            return launch

    fixed = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    grid = lambda META: (META["BLOCK_N"],)  # noqa: E731
    tri._launch(FakeKernel(), grid, ("x",), {}, fixed, tri._identity)
    assert tried == [(256, 3, (256,)), (256, 2, (256,)), (128, 2, (128,))]
    tried.clear()
    with pytest.raises(OutOfResources):
        tri._launch(FakeKernel(), grid, ("x",), {}, {**fixed, "BLOCK_N": 512}, tri._identity)

    # A flattened loop (FLATTEN) that does not fit is unflattened first, at the same tiles and stages; the
    # other constexprs go along unchanged, and the tile step-downs that follow stay unflattened.
    class FlatKernel:
        arg_names = ["X", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "FLATTEN", "HAS_BIAS"]

        def __init__(self, max_stages=3):
            self.max_stages = max_stages

        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append((kw["FLATTEN"], kw["HAS_BIAS"], kw["BLOCK_N"], kw["num_stages"]))
                if kw["FLATTEN"] or kw["num_stages"] > self.max_stages:
                    raise OutOfResources(232448, 227000, "shared memory")

            return launch

    for limit, want in (
        (3, [(True, 1, 256, 3), (False, 1, 256, 3)]),
        (1, [(True, 1, 256, 3), (False, 1, 256, 3), (False, 1, 256, 2), (False, 1, 128, 2)]),
    ):
        tried.clear()
        with contextlib.suppress(OutOfResources):
            tri._launch(FlatKernel(limit), grid, ("x",), {"FLATTEN": True, "HAS_BIAS": 1}, fixed, tri._identity)
        assert tried == want, tried
    # Traced launches (torch.compile's ops) never step down: the tiles they were given must fit.
    tried.clear()
    with pytest.raises(OutOfResources):
        tri._launch(FlatKernel(), grid, ("x",), {"FLATTEN": True, "HAS_BIAS": 1}, fixed, lambda k: k)
    assert tried == [(True, 1, 256, 3)]


def test_tuned_launch_falls_back_to_fixed_tiles_on_out_of_resources(monkeypatch):
    """If no autotuning config fits the GPU's shared memory the launcher uses (and steps down) the
    fixed tiles instead of failing: the autotuner benchmarks the misfits as inf and then runs one."""
    _skip_unavailable("triton")
    from triton.runtime.errors import OutOfResources

    from lora_kernels.triton_ops import lora_linear as tri

    tried = []

    class OversizedTuner:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append("tuned")
                raise OutOfResources(393216, 232448, "shared memory")

            return launch

    class FakeKernel:
        arg_names = ["X", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]

        def __getitem__(self, grid):
            return lambda *args, **kw: tried.append(("fixed", kw["BLOCK_N"], kw["num_stages"]))

    monkeypatch.setattr(tri, "AUTOTUNE", True)
    monkeypatch.setattr(tri, "_configs", lambda: {})  # the tuned branch also runs in the interpreter
    monkeypatch.setattr(tri, "_autotuner", lambda kernel: OversizedTuner())
    fixed = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=2)
    tri._launch(FakeKernel(), lambda META: (1,), ("x",), {}, fixed, tri._identity)
    assert tried == ["tuned", ("fixed", 64, 2)]


# Compiles (does not run) every kernel the launchers pick, for an H100 (sm_90), through Triton's real
# compiler with a stand-in driver: catches what the interpreter cannot (constexpr globals, a name
# bound with two types across a runtime `if`, layouts, shared memory over the 227 KiB of an H100).
# The launches go through the real `_launch`, so its step-down on OutOfResources is exercised too.
# Scripts run in a subprocess without TRITON_INTERPRET (so the kernels are JITFunctions) against a
# compile-only sm_90 driver: nothing is launched, no GPU is needed.
_SM90_DRIVER = r"""
import json, os, re, shutil, subprocess, sys, tempfile
import torch
import triton
from triton.runtime.driver import driver
from lora_kernels.triton_ops.compile_only import _Driver

driver.set_active(_Driver(90))
"""


_SM90_CACHE: str | None = None


def _run_sm90_script(script: str, cases: list[dict]) -> list:
    """Run ``_SM90_DRIVER + script`` on ``cases`` in a fresh interpreter without TRITON_INTERPRET
    (compile only, also on a GPU machine) and return what it printed after RESULTS."""
    import atexit
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    global _SM90_CACHE
    # A cache of these scripts' own, storing the PTX too: a shared one may hold the same kernels stored as
    # cubins alone (scripts/prewarm_triton_cache.py writes them that way, gpu_check.sh seeds with them). One
    # for the session: the scripts compile some of the same kernels (measured, the six sm_90 tests: 703 s
    # with one cache, 774 s with one each).
    if _SM90_CACHE is None:
        _SM90_CACHE = tempfile.mkdtemp(prefix="lora-kernels-sm90-")
        atexit.register(shutil.rmtree, _SM90_CACHE, True)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_STORE_BINARY_ONLY")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TRITON_CACHE_DIR"] = _SM90_CACHE
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_DRIVER + script, json.dumps(cases)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.split("RESULTS", 1)[1])


_SM90_COMPILE = r"""
from lora_kernels.triton_ops.compile_only import compile_only
import lora_kernels.triton_ops.lora_linear as tri
import lora_kernels.triton_ops.single_pass as sp

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
CUOBJDUMP = CUOBJDUMP if os.path.exists(CUOBJDUMP) else shutil.which("cuobjdump")
from triton.backends.nvidia.compiler import get_ptxas
PTXAS = get_ptxas(90).path
results = []

def record(c):
    k, kw = c.compiled, c.kwargs
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "SPLIT_K", "DEVICE_DESC", "DO_DB", "W_KN", "FLATTEN")
    cfg = {n: kw[n] for n in keys if n in kw}
    # The instruction mix of the compiled kernel: Hopper tensor-core MMAs (wgmma) or not, and local
    # memory from the cubin's resource usage: the stack frame (where the ABI puts register spills) plus
    # LOCAL (local arrays; LOCAL alone stays 0 when a kernel spills, and read alone it missed 1 KB spills).
    local = None
    if CUOBJDUMP:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        local = sum(int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", res))
    ptx = k.asm["ptx"]
    # ptxas's own verdict on the wgmma pipeline: C7515 ("wgmma.mma_async instructions are serialized ...")
    # means every wgmma of the kernel waits for the previous one (the single-pass kernels under Triton 3.6,
    # until session 31: bench/NOTES.md).
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", "-o", os.devnull, f.name], capture_output=True, text=True)
    serialized = "C7515" in info.stderr
    # The cross-program barrier's memory operations as emitted (single-pass kernels): their scopes and
    # orderings, and the loads of the other programs' partials.
    sync = sorted({m[1] for m in re.finditer(r"(atom\.global\.\w+\.\w+\.\w+|ld\.global\.gpu\.acquire)", ptx)})
    results.append(dict(kernel=c.kernel, case=CASE, cfg=cfg, smem=k.metadata.shared,
                        wgmma=ptx.count("wgmma.mma_async"), local=local, sync=sync,
                        cg_loads=ptx.count("ld.global.cg"), coop=bool(k.metadata.launch_cooperative_grid),
                        serialized=serialized))

# compile_only: an H100's target, SM count and shared memory (a kernel over it raises OutOfResources, so
# the launchers step down as on the GPU), fixed tiles; "launch" marks where each launch's tries begin.
ctx = compile_only(record)
ctx.__enter__()
real_launch = tri._launch
def launch(kernel, *a):
    results.append("launch")
    real_launch(kernel, *a)
tri._launch = launch
# The single-pass forward launches its kernel itself (one launch, stepping down on OutOfResources).
real_single = sp.lora_fwd_single_pass
def single(*a, **k):
    results.append("launch")
    return real_single(*a, **k)
sp.lora_fwd_single_pass = single
real_single_bwd = sp.lora_bwd_single_pass
def single_bwd(*a, **k):
    results.append("launch")
    return real_single_bwd(*a, **k)
sp.lora_bwd_single_pass = single_bwd
real_traced = tri._traced
for CASE in json.loads(sys.argv[1]):
    # "op": the launches of the registered ops (torch.compile's path): in-kernel TMA descriptors.
    tri._traced = (lambda wrap: True) if CASE.get("op") else real_traced
    dt = getattr(torch, CASE["dtype"])
    R, p, store, tri.TMA_MODE = CASE["r"], 0.1, CASE["mode"] == "bitmask", CASE["tma"]
    tri.FWD_MODE = tri.BWD_MODE = CASE.get("fwd", "two")
    tri.TMA_FLATTEN = CASE.get("flatten", False)
    sp.REDUCE_LEVELS = CASE.get("levels", 1)
    sp.COOPERATIVE = CASE.get("coop", False)
    sp.FUSED_SLICE = CASE.get("slice") == "fused"
    tri.DY_PASSES = CASE.get("dy", "2")
    M, N, K = CASE.get("M", 96), CASE.get("N", 160), CASE.get("K", 128)
    x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
    if CASE.get("w_kn"):  # the weight stored (K, N), passed as its (N, K) view
        w = w.T.contiguous().T
    a, b, bias = torch.randn(R, K, dtype=dt), torch.randn(N, R, dtype=dt), torch.randn(N, dtype=dt)
    y, t, bits = tri.lora_fwd(x, w, bias, a, b, bias, 2.0, p, 2**40 + 3, store)
    need = CASE.get("need", [True, True, True])  # need_dx, need_da, need_db
    tri.lora_bwd(torch.randn(M, N, dtype=dt), x, w, a, b, t, bits, 2.0, p, 2**40 + 3, *need)
print("RESULTS" + json.dumps(results))
"""


def test_w_kn_tma_kernels_compile_for_sm90_as_the_n_k_ones_do():
    """The TMA kernels' W_KN variant (a weight stored (K, N): GPT-2's Conv1D) compiles for sm_90 to the same
    tiles, stages, shared memory and wgmma count as the (N, K) one, without spills, both with host descriptors
    and with in-kernel ones (the compile path), flattened (``LORA_KERNELS_TMA_FLATTEN=1``), and so do the
    single-pass kernels' (forward and backward, here with the two-level reduction and cooperative launch):
    the (K, N) tiles go to wgmma as its MN-major operand, with no staging copy in shared memory. Its speed
    waits for a GPU (bench/NOTES.md)."""
    pytest.importorskip("triton")
    variants = [
        dict(dtype="bfloat16", r=16, mode="bitmask"),
        dict(dtype="float16", r=256, mode="regenerate"),
        dict(dtype="bfloat16", r=64, mode="bitmask", op=True),  # in-kernel descriptors
        dict(dtype="bfloat16", r=64, mode="bitmask", flatten=True),  # LORA_KERNELS_TMA_FLATTEN=1
        dict(dtype="bfloat16", r=16, mode="bitmask", fwd="single", levels=2, coop=True),
        dict(dtype="float16", r=128, mode="regenerate", fwd="single"),
    ]
    cases = [dict(v, tma="1", w_kn=kn) for v in variants for kn in (False, True)]
    results = _run_sm90_script(_SM90_COMPILE, cases)
    tma = {}
    for r in results:
        if r != "launch" and ("tma" in r["kernel"] or "single_pass" in r["kernel"]):
            tma.setdefault((r["kernel"], json.dumps({k: v for k, v in r["case"].items() if k != "w_kn"})), []).append(r)
    assert len(tma) == 2 * len(cases) // 2, tma.keys()  # 2 kernels per case pair
    for (kernel, case), (nk, kn) in tma.items():
        assert (nk["case"]["w_kn"], kn["case"]["w_kn"]) == (False, True), case
        assert nk["cfg"].pop("W_KN") is False and kn["cfg"].pop("W_KN") is True, (kernel, case)
        assert nk["cfg"] == kn["cfg"] and nk["smem"] == kn["smem"] and nk["wgmma"] == kn["wgmma"] > 0, (nk, kn)
        assert kn["smem"] <= 232448, kn
        # No spills where the compile test asks for none (two-launch kernels up to rank 128, single-pass at rank
        # 16 within its 64-byte budget): see test_triton_kernels_compile_for_sm90.
        r = json.loads(case)["r"]
        if "single_pass" not in kernel and r <= 128 or r == 16:
            assert kn["local"] in (0, None) or "single_pass" in kernel and kn["local"] <= 64, kn
        assert kn["cfg"].get("FLATTEN", False) == json.loads(case).get("flatten", False), kn  # no step-down


_SM90_TRACE = r"""
import operator
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
import lora_kernels.triton_ops.lora_linear as tri

tri._interpret = lambda: False  # the GPU's host-side choices (tiles, K splits, TMA in "1" mode)
HOP = torch.ops.higher_order.triton_kernel_wrapper_functional

class Traced(Exception):
    pass

def sources(gm, inputs):
    # Where each graph output comes from: (kernel, argument) when a kernel call produced it.
    out = []
    for node in next(n for n in gm.graph.nodes if n.op == "output").args[0]:
        if node.target is operator.getitem and node.args[0].target is HOP:
            kernel = kernel_side_table.get_kernel(node.args[0].kwargs["kernel_idx"])
            out.append([kernel.fn.__name__, node.args[1]])
        else:
            out.append(str(node.target))
    raise Traced(out)

results = []
for case in json.loads(sys.argv[1]):
    tri.TMA_MODE = case["tma"]
    M, K, N, R = case["shape"]
    dt = torch.bfloat16
    x, w, b = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt), torch.randn(N, dtype=dt)
    if case.get("w_kn"):  # stored (K, N), passed as its (N, K) view
        w = w.T.contiguous().T
    a, bb, dy = torch.randn(R, K, dtype=dt), torch.randn(N, R, dtype=dt), torch.randn(M, N, dtype=dt)
    t = torch.randn(M, R)
    bits = torch.randint(0, 255, (M, (K + 7) // 8), dtype=torch.uint8)
    if case.get("regenerate"):
        bits = bits[:0, :0]
    fwd = lambda x, w, b, a, bb: tri.triton_lora_fwd(x, w, b, a, bb, None, 2.0, 0.1, 5, True)
    bwd = lambda dy, x, w, a, bb, t, bits: tri.triton_lora_bwd(dy, x, w, a, bb, t, bits, 2.0, 0.1, 5, True, True)
    for name, fn, args in (("fwd", fwd, (x, w, b, a, bb)), ("bwd", bwd, (dy, x, w, a, bb, t, bits))):
        try:
            aot_function(fn, fw_compiler=sources, dynamic=True)(*args)
        except Traced as e:
            results.append(dict(case=case, op=name, outputs=e.args[0]))
print("RESULTS" + json.dumps(results))
"""


def test_compiled_graph_outputs_come_from_the_kernels():
    """Under torch.compile the registered ops are decomposed into their kernel calls (AOTAutograd's
    functional trace, here with dynamic shapes); torch keeps a call only if it sees the call write a
    tensor argument. Each output of the traced graph must be written by a kernel, never an unwritten
    ``empty``, and no input may show up as written (torch clones what it thinks a kernel writes: torch
    2.11 thought the shrink wrote x, its analysis having failed on ``seed_lo.to(...)``). Found this way:
    with TMA descriptors built on the host (LORA_KERNELS_TMA=1) torch saw no write to y, dropped the
    whole GEMM, and the compiled forward returned uninitialised memory; traced calls now build the
    descriptors in the kernel ("1") or take the pointer kernels ("auto"). The
    split-K case checks that the T saved for backward is the one the GEMM's epilogue writes.
    Compile-only sm_90 driver: nothing runs, no GPU needed."""

    pytest.importorskip("triton")
    cases = [
        dict(tma="auto", shape=[256, 512, 256, 16]),
        dict(tma="1", shape=[256, 512, 256, 16]),
        dict(tma="1", shape=[96, 1024, 160, 32]),  # M = 96, K = 1024: the shrink splits K in 2
        dict(tma="auto", shape=[256, 512, 256, 16], regenerate=True),  # the dX kernel regenerates the mask
        dict(tma="1", shape=[256, 512, 384, 16], w_kn=True),  # W stored (K, N): a transposed view reaches the kernel
    ]
    results = _run_sm90_script(_SM90_TRACE, cases)
    assert len(results) == 2 * len(cases), results
    for r in results:
        # "1": the TMA kernels, with descriptors built in the kernel from plain tensors (y_desc, dx_desc).
        tma = r["case"]["tma"] == "1"
        if r["op"] == "fwd":
            # (y, T, bits): y and, with a split shrink, T from the GEMM; else T and bits from the shrink.
            gemm, y = ("_fwd_tma_kernel", "y_desc") if tma else ("_fwd_kernel", "Y")
            split = r["case"]["shape"][0] == 96
            want = [[gemm, y], [gemm, "T_OUT"] if split else ["_shrink_kernel", "T"], ["_shrink_kernel", "BITS"]]
        else:
            gemm, dx = ("_bwd_dx_tma_kernel", "dx_desc") if tma else ("_bwd_dx_kernel", "DX")
            want = [[gemm, dx], [gemm, "DA"], ["_bwd_dy_kernel", "DB"], ["_bwd_dy_kernel", "DSUM"]]
        assert r["outputs"] == want, r


_SM90_TRACED_FIT = r"""
from lora_kernels.triton_ops.compile_only import compile_only
import lora_kernels.triton_ops.lora_linear as tri

results = []
wrap = lambda kernel: kernel  # any wrapper but _identity: the torch.compile path, which cannot step down
for CASE in json.loads(sys.argv[1]):
    dt, at = getattr(torch, CASE["dtype"]), getattr(torch, CASE["adapters"])
    M, N, K, R = CASE["M"], 512, 512, CASE["r"]
    x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
    a, b = torch.randn(R, K, dtype=at), torch.randn(N, R, dtype=at)
    tri.TMA_MODE = CASE["tma"]
    with compile_only(lambda c: results.append(dict(case=CASE, kernel=c.kernel, smem=c.compiled.metadata.shared))):
        y, t, bits = tri.lora_fwd(x, w, None, a, b, None, 2.0, 0.1, 5, True, wrap=wrap)
        tri.lora_bwd(torch.randn(M, N, dtype=dt), x, w, a, b, t, bits, 2.0, 0.1, 5, True, True, wrap=wrap)
print("RESULTS" + json.dumps(results))
"""


def test_traced_launches_fit_an_h100_without_stepping_down():
    """Under torch.compile the fixed tiles are what runs (no step-down: Inductor loads the kernel and
    fails if it does not fit). The ranks and adapter dtypes whose first tiles exceeded an H100's 227 KiB
    (rank 256; rank 128 with fp32 adapters: the shrink's and the dY kernel's adapter tiles) compile
    within it for sm_90 on both launch paths, with every kernel of the forward and backward."""
    pytest.importorskip("triton")
    cases = [dict(dtype="bfloat16", adapters=a, r=r, M=m, tma=tma)
             for r, a in ((256, "bfloat16"), (256, "float32"), (128, "float32"))
             for m in (67, 8192) for tma in ("0", "1")]  # fmt: skip
    results = _run_sm90_script(_SM90_TRACED_FIT, cases)
    for case in cases:
        kernels = [r for r in results if r["case"] == case]
        assert {r["kernel"].removesuffix("_tma_kernel").removesuffix("_kernel") for r in kernels} == {
            "_shrink", "_fwd", "_bwd_dy", "_bwd_dx"}, (case, kernels)  # fmt: skip
        assert all(r["smem"] <= 232448 for r in kernels), kernels


def test_triton_kernels_compile_for_sm90(tmp_path):
    """Every kernel variant of a representative set compiles for sm_90 and the launcher finds
    tiles within the H100's shared memory (fixed tiles, stepping down like on a real GPU)."""

    pytest.importorskip("triton")
    cases = [
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1"),  # TMA forward/backward, stored mask
        dict(dtype="float16", r=64, mode="regenerate", tma="0"),  # pointer kernels, regenerated mask
        dict(dtype="bfloat16", r=256, mode="regenerate", tma="1"),  # widest rank: BM != BN, big epilogue
        dict(dtype="float32", r=16, mode="bitmask", tma="1"),  # ieee fp32 dots (never TMA)
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1", fwd="single"),  # single-pass forward, 128×256
        dict(dtype="float16", r=128, mode="regenerate", tma="1", fwd="single"),  # single-pass, 128×128 tiles
        # two-level reduction, launched as cooperative grids (LORA_KERNELS_SP_COOPERATIVE=1)
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1", fwd="single", levels=2, coop=True),
        dict(dtype="bfloat16", r=32, mode="bitmask", tma="1", K=1024),  # few rows: split-K shrink (2 splits)
        dict(dtype="float16", r=32, mode="regenerate", tma="0", K=1024),  # ... and the pointer GEMM's partial sums
        dict(dtype="bfloat16", r=64, mode="bitmask", tma="1", op=True),  # in-kernel TMA descriptors (compile path)
        # partial backward: a frozen adapter (dT-only dY kernel, dX without dA), the first layer (dA only)
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1", need=[True, False, False]),
        dict(dtype="bfloat16", r=16, mode="regenerate", tma="1", need=[False, True, True]),
        # ... and the single-pass backward with lora_B frozen (no dB tiles: DO_DB=False)
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1", fwd="single", need=[True, True, False]),
        # the single-pass kernels with the producers' slice inside the GEMM loop (LORA_KERNELS_SP_SLICE=fused)
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1", fwd="single", slice="fused"),
        # enough rows for the dX GEMM's 128×256 fixed tiles (64 × 4 of them, over half of 132 SMs), both mask modes
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1", M=8192, K=1024),
        dict(dtype="float16", r=16, mode="regenerate", tma="1", M=8192, K=1024),
        dict(dtype="bfloat16", r=32, mode="bitmask", tma="1", M=8192, K=1024),  # ... and rank 32 with the bitmask
        # dT and dB from one read of dY (LORA_KERNELS_DY_PASSES=1), five column blocks
        dict(dtype="bfloat16", r=16, mode="bitmask", tma="1", M=8192, N=1200, K=1024, dy="1"),
    ]
    results = _run_sm90_script(_SM90_COMPILE, cases)
    # One list of compiles per launch: more than one means the launcher stepped down (_launch
    # re-raises when its last variant does not fit, so a zero exit means every launch fit).
    launches = []
    for r in results:
        if r == "launch":
            launches.append([])
        else:
            launches[-1].append(r)
    # Four launches per case (shrink, GEMM, dY, dX); five above rank 128 on the TMA path (dA in a launch of its
    # own); three with the single-pass kernels (forward, dX with dT and dB, dA).
    want = sum(3 if c.get("fwd") == "single" else 5 if c["r"] > 128 and c["tma"] == "1" else 4 for c in cases)
    assert len(launches) == want and all(launches), launches
    assert {c["kernel"] for tries in launches for c in tries} == {
        "_shrink_kernel", "_fwd_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel", "_bwd_dy1_kernel", "_bwd_dx_kernel",
        "_bwd_dx_tma_kernel", "_fwd_single_pass_kernel", "_bwd_single_pass_kernel",
    }  # fmt: skip
    assert all(tries[-1]["smem"] <= 232448 for tries in launches)
    # The op path's TMA kernels built their descriptors in the kernel.
    dev = sorted(t[-1]["kernel"] for t in launches if t[-1]["cfg"].get("DEVICE_DESC"))
    assert dev == ["_bwd_dx_tma_kernel", "_fwd_tma_kernel"], dev
    # The split-K shrink and the GEMMs that sum its partials compiled (K = 1024 at M = 96: 2 splits).
    split = sorted((t[-1]["kernel"], t[-1]["cfg"].get("SPLIT_K")) for t in launches if t[-1]["case"].get("K"))
    assert [k for k in split if k[1] == 2] == [("_fwd_kernel", 2), ("_fwd_tma_kernel", 2), ("_shrink_kernel", 2),
                                              ("_shrink_kernel", 2)], split  # fmt: skip
    # The measured-best 128x256 forward tile (ANCHORS.md) fits as it is at rank 16.
    fwd_tma = [t for t in launches if t[0]["kernel"] == "_fwd_tma_kernel" and t[0]["case"] == cases[0]]
    assert [(t[0]["cfg"]["BLOCK_N"], len(t)) for t in fwd_tma] == [(256, 1)], fwd_tma
    # So does the single-pass forward's with its partial-T tile (223 KiB under Triton 3.6, 158 under 3.8;
    # at rank 64, 3.6 needs 254 KiB and steps down to 2 stages).
    single = [t for t in launches if t[0]["kernel"] == "_fwd_single_pass_kernel"]
    got = [(t[0]["case"]["r"], t[0]["case"].get("levels", 1), t[0]["cfg"]["BLOCK_N"], len(t)) for t in single]
    assert got == [(16, 1, 256, 1), (128, 1, 128, 1), (16, 2, 256, 1), (16, 1, 256, 1), (16, 1, 256, 1)], single
    # The dX GEMM's fixed tiles: 128×256 where there are enough (M = 8192, K = 1024), fitting as they are with the
    # stored and the regenerated mask (the none-spills check below covers them); 128×128 at M = 96.
    dx_tma = [t for t in launches if t[0]["kernel"] == "_bwd_dx_tma_kernel" and t[0]["case"]["r"] <= 32]
    got = sorted({(t[0]["case"].get("M", 96), t[0]["cfg"]["BLOCK_K"], len(t)) for t in dx_tma})
    assert got == [(96, 128, 1), (8192, 256, 1)], got
    # The single-pass backward's dX tiles fit without stepping down (rank 128 starts at 2 stages).
    single_bwd = [t for t in launches if t[0]["kernel"] == "_bwd_single_pass_kernel"]
    got = [(t[0]["case"]["r"], len(t), t[-1]["cfg"]["num_stages"], t[-1]["cfg"]["DO_DB"]) for t in single_bwd]
    want = [(16, 1, 3, True), (128, 1, 2, True), (16, 1, 3, True), (16, 1, 3, False), (16, 1, 3, True)]
    assert got == want, single_bwd
    # Performance guards a GPU run would otherwise find first: with 16-bit operands every kernel issues
    # Hopper wgmma rather than Ampere mma.sync, except two memory-bound skinny products whose dot is too
    # short for wgmma's 64 rows: a dA-only launch below rank 64 (r rows: the single-pass mode's, and the
    # two-launch one when x needs no gradient), and the shrink with fewer than 64 rows per program
    # (_shrink_cfg: at M = 96 it takes 32-row blocks). And
    # no two-launch kernel that fits spills registers at ranks up to 128. The opt-in single-pass kernels do: at
    # rank 16 up to 16 bytes (Triton 3.8; none under 3.6), with the fused slice 40–56; above rank 16 0.1–0.8 KB
    # (their partial T or dT tile beside the GEMM's accumulator; bench/NOTES.md, session 32): a budget of 64
    # bytes at rank 16, none checked above.
    fits = [t[-1] for t in launches]
    half = [c for c in fits if c["case"]["dtype"] != "float32"]
    no_wgmma = [(c["kernel"], c["case"]) for c in half if c["wgmma"] == 0]
    short = [(c["kernel"], c["case"]) for c in half if c["kernel"] == "_shrink_kernel" and c["cfg"]["BLOCK_M"] < 64]
    short += [
        (c["kernel"], c["case"])
        for c in half
        if c["kernel"] == "_bwd_dx_kernel"
        and (c["case"].get("fwd") == "single" or not c["case"].get("need", [True])[0])
        and c["case"]["r"] < 64
    ]
    assert len(short) >= 3 and sorted(map(str, no_wgmma)) == sorted(map(str, short)), (no_wgmma, short)
    if half[0]["local"] is not None:  # cuobjdump found (Triton bundles it)
        two = [(c["kernel"], c["case"], c["local"]) for c in half if c["local"] and "single_pass" not in c["kernel"]]
        assert not [s for s in two if s[1]["r"] <= 128], two
        single = [(c["kernel"], c["case"], c["local"]) for c in half if "single_pass" in c["kernel"]]
        assert len(single) == 10 and all(s[2] <= 64 for s in single if s[1]["r"] == 16), single
    # ... and ptxas keeps every kernel's wgmmas asynchronous here (p = 0.1; no C7515 serialisation: the
    # single-pass kernels' slice-then-rest pair of GEMM loops had it under Triton 3.6, the GPU image's).
    # One exception, seen under Triton 3.8 only: the shrink on 64-row blocks (M = 8192) storing the bitmask with
    # 16-bit adapters (bench/NOTES.md, session 35). Its dot is 64×16 per 128 columns, beside ~1000 integer
    # instructions of Philox a K step, and with fp32 adapters Triton itself waits on each (pendings = 0).
    serialized = [(c["kernel"], c["case"]) for c in fits if c["serialized"]]
    shrink_8192 = [
        s for s in serialized if s[0] == "_shrink_kernel" and s[1].get("M") == 8192 and s[1]["mode"] == "bitmask"
    ]
    assert serialized == shrink_8192, serialized
    # The single-pass barrier compiles to what its proof assumes (single_pass.py's docstring): GPU-scope
    # acq_rel arrivals, a release publish and acquire polls (each issued by thread 0 alone and broadcast
    # through shared memory: read off the PTX of Triton 3.6 and 3.8, not asserted, as the predicate's
    # form varies), and the other programs' partials read at L2 (.cg), never from a stale L1 line.
    for c in fits:
        if "single_pass" in c["kernel"]:
            assert c["sync"] == [
                "atom.global.gpu.acq_rel.add", "atom.global.gpu.relaxed.exch", "atom.global.gpu.release.exch",
                "ld.global.gpu.acquire",
            ], c["sync"]  # fmt: skip
            assert c["cg_loads"] > 0, c
    # Cooperative launches where asked, and only for the single-pass kernels (the dA launch is ordinary).
    coop = sorted((c["kernel"], c["case"].get("coop", False)) for c in fits if c["coop"])
    assert coop == [("_bwd_single_pass_kernel", True), ("_fwd_single_pass_kernel", True)], coop


_SM90_PHILOX = r"""
from lora_kernels.triton_ops.compile_only import compile_only
import lora_kernels.triton_ops.lora_linear as tri

results = []
for CASE in json.loads(sys.argv[1]):
    M, K, N, R = CASE["M"], 4096, 4096, 16
    x, w = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(N, K, dtype=torch.bfloat16)
    a, b = torch.randn(R, K, dtype=torch.float32), torch.randn(N, R, dtype=torch.float32)
    dy = torch.randn(M, N, dtype=torch.bfloat16)

    def record(c):
        flags = {n: bool(c.kwargs[n]) for n in ("STORE_BITS", "LOAD_BITS") if n in c.kwargs}
        results.append(dict(case=CASE, mode=MODE, kernel=c.kernel, tiles=[c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_K")],
                            mulhi=c.compiled.asm["ptx"].count("mul.hi.u32"), **flags))

    with compile_only(record, autotune=CASE.get("tuned", False)):
        # The two-launch shrink without the store first (the unit: a Philox call per 8 columns, 8 a thread), then
        # the case's kernels in the bitmask mode and in the regenerate mode, forward and backward ("tuned": every
        # config of the tuning tables, the forward only).
        tri.FWD_MODE = tri.BWD_MODE = "two"
        MODE = "unit"
        tri.lora_fwd(x, w, None, a, b, None, 2.0, 0.1, 5, False)
        tri.FWD_MODE = tri.BWD_MODE = "single" if CASE["single"] else "two"
        tri.DX_WIDE = CASE.get("dx_wide", "auto")
        for MODE, store in (("bitmask", True), ("regenerate", False)):
            y, t, bits = tri.lora_fwd(x, w, None, a, b, None, 2.0, 0.1, 5, store)
            if not CASE.get("tuned"):
                tri.lora_bwd(dy, x, w, a, b, t, bits, 2.0, 0.1, 5, True, True)
print("RESULTS" + json.dumps(results))
"""


def test_dropout_mask_philox_runs_once_per_tile_compile_for_sm90():
    """No kernel computes a tile's dropout mask more than once. Triton's layout pass recomputes a value's chain in
    each layout its users want, and the mask's Philox rounds ran (PTX ``mul.hi.u32`` under Triton 3.6, the GPU
    image's, at M = 8192; bench/NOTES.md, session 34):

    * twice in the forward that stored the bitmask: the byte store, given 8 bytes a thread by coalescing, wanted
      the bytes in another layout than the x tile's unpack (shrink 277 against 132 without the store; single-pass
      forward 204 against 131). The store's offsets now carry no provable alignment (``_unaligned``): one layout.
    * four times in the dX epilogue with a regenerated mask (3.6 and 3.8), where the wgmma accumulator's layout
      spreads a byte's 8 columns over 4 threads (the two-launch dX kernel 663 against 2 × 132 for its two
      masks, the epilogue's and the dA walk's). The bytes now pass a while loop (``computed_once``) that the
      pass cannot recompute through: one Philox, then a conversion of the bytes.

    M = 8192 (64-row shrink blocks, 8 bytes a thread as in the dX kernels' 128 × 128 tiles at 8 warps; the two-launch
    dX kernel's fixed tiles are 128 × 256 there, 16 bytes a thread) and 2048 (32-row blocks, split K; the two-launch
    dX kernel with 128 × 128 tiles, LORA_KERNELS_DX_WIDE=0), and every tile of the shrink's tuning table. (Where x's
    rows are not 16-byte aligned, K = 4104, Triton 3.6 replicates the shrink's Philox over the 8 lanes of a byte's
    columns, with or without the store; 3.8 does not.)"""
    pytest.importorskip("triton")
    cases = [dict(M=m, single=single) for m in (8192, 2048) for single in (False, True)]
    cases[2]["dx_wide"] = "0"  # M = 2048, two launches
    cases.append(dict(M=8192, single=False, tuned=True))  # the shrink's tuning configs: 32- to 128-row tiles
    results = _run_sm90_script(_SM90_PHILOX, cases)
    tuned = [r for r in results if r["case"].get("tuned") and r["kernel"] == "_shrink_kernel" and r["mode"] != "unit"]
    by_tiles = {}
    for r in tuned:
        by_tiles.setdefault((tuple(r["tiles"]), r["STORE_BITS"]), set()).add(r["mulhi"])
    assert len(by_tiles) >= 8, by_tiles  # ≥ 4 distinct tiles (BM, BK), with and without the store
    for (tiles, store), counts in by_tiles.items():
        assert counts == by_tiles[(tiles, not store)] and min(counts) > 0, (tiles, by_tiles)
    cases.pop()
    # The unit of the dX kernels: the 64-row shrink's, 8 bytes a thread (M = 8192), as a 128-column dX tile's.
    (dx_unit,) = [r["mulhi"] for r in results if r["case"] == cases[0] and r["mode"] == "unit" and
                  r["kernel"] == "_shrink_kernel"]  # fmt: skip
    for case in cases:
        got = [r for r in results if r["case"] == case]
        (unit,) = [r["mulhi"] for r in got if r["mode"] == "unit" and r["kernel"] == "_shrink_kernel"]
        fwd = "_fwd_single_pass_kernel" if case["single"] else "_shrink_kernel"
        (stored,) = [r for r in got if r["mode"] == "bitmask" and r["kernel"] == fwd]
        (regenerated,) = [r for r in got if r["mode"] == "regenerate" and r["kernel"] == fwd]
        assert stored["STORE_BITS"] and not regenerated["STORE_BITS"]
        assert stored["tiles"] == regenerated["tiles"], (stored, regenerated)
        assert stored["mulhi"] == regenerated["mulhi"] > 0, (case, stored, regenerated)
        if case["M"] == 8192 or case.get("dx_wide") == "0":
            bwd = "_bwd_single_pass_kernel" if case["single"] else "_bwd_dx_tma_kernel"
            (dx,) = [r for r in got if r["mode"] == "regenerate" and r["kernel"] == bwd]
            wide = not case["single"] and case.get("dx_wide") != "0"
            assert dx["tiles"] == [128, 256 if wide else 128] and not dx["LOAD_BITS"], dx
            # The two-launch dX kernel holds two masks (its epilogue's and its dA walk's), the single-pass one the
            # epilogue's (its dA runs in a launch of its own): a unit each per 128 columns of the tile. The wide
            # tile's two column halves and 256-column dA walk share a little of the key setup (515 against 4 × 132
            # under 3.6 and 3.8); a replicated Philox would at least double the count.
            if wide:
                assert 3 * dx_unit < dx["mulhi"] <= 4 * dx_unit, (case, dx, dx_unit)
            else:
                assert dx["mulhi"] == (1 if case["single"] else 2) * dx_unit, (case, dx, dx_unit)
            (loaded,) = [r for r in got if r["mode"] == "bitmask" and r["kernel"] == bwd]
            assert loaded["LOAD_BITS"] and loaded["mulhi"] == 0, loaded


_SM90_FLATTEN = r"""
from lora_kernels.triton_ops.compile_only import compile_only
import lora_kernels.triton_ops.lora_linear as tri

def pipelined_across_tiles(ttgir):
    # Is the tile's TMA store inside the loop that waits on the main loop's wgmma (pendings = 1)? Only when
    # the tile loop and the K loop are one loop: unflattened, the store follows the K loop in the tile loop.
    stack, serial, loop_of = [], 0, []
    waits, stores = set(), set()
    for line in ttgir.splitlines():
        loops = [n for kind, n in stack if kind == "for"]
        if "ttng.warp_group_dot_wait" in line and "pendings = 1" in line and loops:
            waits.add(loops[-1])
        if "ttng.async_tma_copy_local_to_global" in line and loops:
            stores.add(loops[-1])
        net = line.count("{") - line.count("}")
        for _ in range(net):
            serial += 1
            stack.append(("for" if "scf.for" in line else "other", serial))
        for _ in range(-net):
            stack.pop()
    return bool(waits & stores)

results = []
for CASE in json.loads(sys.argv[1]):
    dt, at = torch.bfloat16, getattr(torch, CASE["adapters"])
    M, K, N, R = 8192, 4096, 4096, CASE["r"]
    x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
    a, b = torch.randn(R, K, dtype=at), torch.randn(N, R, dtype=at)
    tri.TMA_FLATTEN = CASE["flatten"]

    def record(c):
        if "tma" in c.kernel:
            kw = c.kwargs
            results.append(dict(case=CASE, kernel=c.kernel, flatten=kw["FLATTEN"], tiles=[kw["BLOCK_M"],
                                kw["BLOCK_N"], kw["BLOCK_K"], kw["num_stages"]], smem=c.compiled.metadata.shared,
                                pipelined=pipelined_across_tiles(c.compiled.asm["ttgir"])))

    with compile_only(record):
        y, t, bits = tri.lora_fwd(x, w, None, a, b, None, 2.0, 0.1, 5, True)
        tri.lora_bwd(torch.randn(M, N, dtype=dt), x, w, a, b, t, bits, 2.0, 0.1, 5, True, True)
print("RESULTS" + json.dumps(results))
"""


def test_flattened_tma_kernels_pipeline_across_tiles():
    """LORA_KERNELS_TMA_FLATTEN=1: the persistent TMA kernels' tile loop flattened with their K loop, so that
    the next tile's loads are issued during this tile's epilogue. Compiled for sm_90 at a headline shape
    (8192 × 4096 → 4096, bf16, PEFT's fp32 adapters and bf16 ones): at rank 16 both kernels flatten (read off
    the TTGIR: the tile's TMA store sits in the loop that waits on the main wgmma) with the fixed tiles and
    fit an H100, and so does the forward at rank 64 with bf16 adapters (y stored in halves); where the
    flattened forward's multi-buffered epilogue loads exceed its shared memory (rank 64 with fp32 adapters
    under Triton 3.6) the launch steps down to the unflattened kernel at the same tiles and stages rather
    than to fewer stages; unflattened (the default) nothing is pipelined across tiles."""
    pytest.importorskip("triton")
    cases = [dict(r=r, adapters=a, flatten=f) for r in (16, 64) for a in ("float32", "bfloat16") for f in (True, False)]
    results = _run_sm90_script(_SM90_FLATTEN, cases)
    for case in cases:
        for kernel in ("_fwd_tma_kernel", "_bwd_dx_tma_kernel"):
            tries = [r for r in results if r["case"] == case and r["kernel"] == kernel]
            assert tries and tries[-1]["smem"] <= 232448, (case, kernel, tries)
            if not case["flatten"]:
                assert [(t["flatten"], t["pipelined"]) for t in tries] == [(False, False)], (case, kernel, tries)
                continue
            first = tries[0]
            assert first["flatten"] and first["pipelined"], (case, kernel, first)
            if first["smem"] > 232448:  # the step-down keeps the tiles and stages, drops the flattening
                assert [(t["flatten"], t["pipelined"], t["tiles"]) for t in tries[1:]] == [
                    (False, False, first["tiles"])], (case, kernel, tries)  # fmt: skip
            else:
                assert len(tries) == 1, tries
            if case["r"] == 16:  # the measured-best forward tiles (ANCHORS.md) keep their 3 stages, flattened
                assert len(tries) == 1, tries
                if kernel == "_fwd_tma_kernel":
                    assert first["tiles"] == [128, 256, 64, 3], first
            if kernel == "_fwd_tma_kernel" and case["adapters"] == "bfloat16":  # the benchmark's default adapters
                assert len(tries) == 1, tries  # r = 64 too: y stored in halves leaves room for the epilogue loads
    # Flattened, the forward stores y in two halves: at rank 16 the halved staging buffer (32 KB less) more
    # than pays for the epilogue's multi-buffered T and lora_B tiles.
    fwd16 = [r for r in results if r["kernel"] == "_fwd_tma_kernel" and r["case"]["r"] == 16]
    smem = {(r["case"]["adapters"], r["flatten"]): r["smem"] for r in fwd16 if r["case"]["flatten"] == r["flatten"]}
    for a in ("float32", "bfloat16"):
        assert smem[(a, True)] < smem[(a, False)], smem


_SM90_TUNING = r"""
from lora_kernels.triton_ops.compile_only import compile_only
import lora_kernels.triton_ops.lora_linear as tri

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
CUOBJDUMP = CUOBJDUMP if os.path.exists(CUOBJDUMP) else shutil.which("cuobjdump")
from triton.backends.nvidia.compiler import get_ptxas
PTXAS = get_ptxas(90).path
results = []

def record(c):
    local = None
    if CUOBJDUMP:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.compiled.asm["cubin"])
            f.flush()
            res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        local = sum(int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", res))  # spills: STACK
    cfg = [c.kwargs.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")]
    results.append(dict(r=R, p=P, adapters=ADT + "".join("+" + m for m in MODE), kernel=c.kernel, cfg=cfg,
                        smem=c.compiled.metadata.shared, local=local, maps=len(c.tensor_maps)))

for R, P, ADT, *MODE in json.loads(sys.argv[1]):
    STORE = "regenerate" not in MODE
    tri.DY_PASSES = "1" if "dy1" in MODE else "2"
    M, N, K, dt = 8192, 4096, 4096, torch.bfloat16
    x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
    a, b = torch.randn(R, K, dtype=getattr(torch, ADT)), torch.randn(N, R, dtype=getattr(torch, ADT))
    with compile_only(record, autotune=True):  # every config of each tuning table, as the first GPU call
        y, t, bits = tri.lora_fwd(x, w, None, a, b, None, 2.0, P, 5, STORE)
        tri.lora_bwd(torch.randn(M, N, dtype=dt), x, w, a, b, t, bits, 2.0, P, 5, True, True)
print("RESULTS" + json.dumps(results))
"""


def test_tuning_tables_fit_an_h100():
    """Eager GPU calls tune each kernel over its table (lora_linear._configs), compiling every config that
    ``_prune`` keeps on the first call of a tuning key. At the common ranks, with bf16 adapters and with fp32
    ones (PEFT's default), with and without dropout, every such config must load on an H100/H200 (227 KiB of
    shared memory) without register spills, or it costs compile and tuning time for nothing (the 256-wide dX
    tiles spilled 1 KB with dropout until session 32, unseen: this test read the cubin's LOCAL, which stays 0
    when a kernel spills to its stack). At rank 256 each kernel keeps at least one config that loads (the
    launcher would otherwise fall back to the fixed tiles). Each TMA config's three host descriptors, as
    Triton's launcher would expand them, pass the driver's tensor-map requirements (``compile_only``)."""
    pytest.importorskip("triton")
    cases = [[16, 0.1, "bfloat16"], [64, 0.1, "bfloat16"], [256, 0.1, "bfloat16"], [16, 0.0, "float32"],
             [64, 0.0, "float32"], [16, 0.1, "float32"], [16, 0.1, "float32", "regenerate"], [32, 0.1, "float32"],
             [32, 0.0, "bfloat16"], [16, 0.1, "float32", "dy1"]]  # fmt: skip
    results = _run_sm90_script(_SM90_TUNING, cases)
    kernels = {"_shrink_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel", "_bwd_dx_tma_kernel"}
    for r, p, adapters, *mode in cases:
        adapters += "".join("+" + m for m in mode)
        got = {c["kernel"] for c in results if [c["r"], c["p"], c["adapters"]] == [r, p, adapters]}
        # Above rank 128 dA is a launch of its own (the pointer kernel's dA programs), tuned over that table; with
        # LORA_KERNELS_DY_PASSES=1 one read of dY gives dT and dB (rank ≤ 16).
        want = kernels | ({"_bwd_dx_kernel"} if r > 128 else set())
        if "dy1" in mode:
            want = want - {"_bwd_dy_kernel"} | {"_bwd_dy1_kernel"}
        assert got == want, (r, p, adapters, results)
    dy1 = [c["cfg"] for c in results if c["kernel"] == "_bwd_dy1_kernel"]
    assert len(dy1) == 3, dy1  # its whole table, none spilled (below)
    results = [c for c in results if not c["adapters"].endswith("+dy1") or c["kernel"] == "_bwd_dy1_kernel"]
    common = [c for c in results if c["r"] <= 64]
    assert len(common) >= 60, common
    # The wide dX tiles are tuned where they fit and do not spill, at rank 16 (with dropout their epilogue runs in
    # column halves): all three of them (the forward's measured-best 128×256×64×3 GEMM shape among them), and
    # without dropout a fourth, 128×256 with 4 stages, which fits by storing in halves (SPLIT_STORE); regenerating
    # the mask, the two 128×256 ones. At rank 32 the two 128×256 ones, with the bitmask and without dropout.
    wide = [
        (c["r"], c["p"], c["adapters"], c["cfg"])
        for c in common
        if c["kernel"] == "_bwd_dx_tma_kernel" and c["cfg"][0] * c["cfg"][2] > 2**14
    ]
    tiles = [[128, 64, 256, 8, 2], [128, 64, 256, 8, 3], [256, 64, 128, 8, 3]]
    cases16 = [(0.0, "float32"), (0.1, "bfloat16"), (0.1, "float32")]
    want = [(16, p, a, t) for p, a in cases16 for t in tiles] + [(16, 0.0, "float32", [128, 64, 256, 8, 4])]
    want += [(16, 0.1, "float32+regenerate", t) for t in tiles[:2]]
    want += [(32, p, a, t) for p, a in ((0.1, "float32"), (0.0, "bfloat16")) for t in tiles[:2]]
    assert sorted(wide) == sorted(want), wide
    over = [(c["r"], c["kernel"], c["cfg"], c["smem"]) for c in common if c["smem"] > 232448]
    assert not over, over
    spills = [(c["r"], c["kernel"], c["cfg"], c["local"]) for c in common if c["local"]]
    assert not spills, spills
    maps = {c["kernel"]: c["maps"] for c in results}  # (compile_only raised on a map the driver would refuse)
    assert {c["maps"] for c in results if c["kernel"] in ("_fwd_tma_kernel", "_bwd_dx_tma_kernel")} == {3}, maps
    assert {c["maps"] for c in results if "tma" not in c["kernel"]} == {0}, maps
    for k in kernels | {"_bwd_dx_kernel"}:
        assert any(c["smem"] <= 232448 for c in results if c["r"] == 256 and c["kernel"] == k), k


def test_host_integer_helpers_match_triton():
    """The launchers' plain-Python cdiv / next power of two (Triton's are constexpr functions, slow on the
    host) give Triton's results."""
    triton = pytest.importorskip("triton")
    from lora_kernels.triton_ops import lora_linear as tri

    for n in range(1, 1100):
        assert tri._next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 7, 16, 32, 64, 128, 256):
            assert tri._cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert tri._next_pow2(2**40 + 1) == 2**41
