"""backend="cuda" on a GPU: outputs and every gradient against the float64 reference, masks
bit-identical to the reference, both mask modes, odd shapes, and opcheck of the custom ops.

Every test here needs a CUDA GPU and skips without one; on a GPU a missing or unloadable extension
(not built, JIT build impossible or refused with LORA_KERNELS_NO_JIT=1) is an error, not a skip.
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels import lora_linear, reference
from tests._utils import assert_close_ref, poison_cuda_allocator, requires_gpu

pytestmark = requires_gpu

DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def ext():
    from lora_kernels.cuda_ops import _ext

    return _ext.get_ext()


@pytest.fixture
def gemm(ext, request):
    """Pin the base GEMM implementation for one test, restoring "auto" afterwards."""
    name = getattr(request, "param", "auto")
    ext.set_gemm_backend(name)
    yield name
    ext.set_gemm_backend("auto")


_poison_allocator = poison_cuda_allocator


def _make(M, K, N, r, dtype, adapter_dtype=None, bias=True, lora_bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    adt = adapter_dtype or dtype

    def rnd(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(dt)

    t = {
        "x": rnd(M, K, dt=dtype),
        "weight": rnd(N, K, dt=dtype, scale=K**-0.5),
        "lora_A": rnd(r, K, dt=adt, scale=K**-0.5),
        "lora_B": rnd(N, r, dt=adt, scale=r**-0.5),
        "bias": rnd(N, dt=dtype) if bias else None,
        "lora_bias": rnd(N, dt=adt) if lora_bias else None,
    }
    return t


def _run(t, backend, scaling, p, seed, mask_mode, dy, grads=("x", "lora_A", "lora_B", "lora_bias")):
    # Inputs without a gradient are passed as they are (clone() would densify a strided x); leaves keep
    # their input's strides (a strided lora_bias stays strided).
    leaves = {k: (_strided_leaf(v) if k in grads and v is not None else v) for k, v in t.items()}
    y = lora_linear(
        leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], leaves["bias"], leaves["lora_bias"],
        scaling=scaling, dropout_p=p, training=True, seed=seed, backend=backend, dropout_mask=mask_mode,
    )  # fmt: skip
    y.backward(dy.to(y.dtype))
    return y, {k: leaves[k].grad for k in grads if leaves[k] is not None}


def _strided_leaf(v: torch.Tensor) -> torch.Tensor:
    """A leaf with ``v``'s values and strides (clone() densifies a non-dense view such as ``t[::2]``);
    a layout whose elements share memory (stride 0, overlapping) cannot be a leaf: a dense clone."""
    leaf = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
    try:
        leaf.copy_(v.detach())
    except RuntimeError:  # "more than one element of the written-to tensor refers to a single memory location"
        leaf = v.detach().clone()
    return leaf.requires_grad_()


def _check_against_ref(t, scaling, p, seed, mask_mode, grads=("x", "lora_A", "lora_B", "lora_bias")):
    M, N = t["x"].shape[0], t["weight"].shape[0]
    # Rounded to x's dtype once: the kernels and the float64 reference see the same dY.
    dy = torch.randn(M, N, device="cuda", dtype=torch.float32).to(t["x"].dtype)
    _poison_allocator()
    y, g = _run(t, "cuda", scaling, p, seed, mask_mode, dy, grads)
    t64 = {k: (v.double() if v is not None else None) for k, v in t.items()}
    y64, g64 = _run(t64, "torch", scaling, p, seed, mask_mode, dy, grads)
    dts = (t["x"].dtype, t["lora_A"].dtype)
    assert y.dtype == t["x"].dtype
    assert_close_ref(y, y64, dts, "y")
    for k in g64:
        assert g[k].dtype == t[k].dtype, k
        assert_close_ref(g[k], g64[k], dts, f"d{k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 67, 300])
@pytest.mark.parametrize("K, N", [(72, 40), (33, 50)])  # 8-aligned (CUTLASS) and odd (cuBLAS fallback)
@pytest.mark.parametrize("r", [1, 16, 64, 256])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("mask_mode", ["bitmask", "regenerate"])
def test_matches_reference(dtype, M, K, N, r, p, mask_mode):
    if p == 0.0 and mask_mode == "regenerate":
        pytest.skip("identical to bitmask at p = 0 (no mask)")
    t = _make(M, K, N, r, dtype, seed=M * 1000 + r)
    _check_against_ref(t, scaling=2.0, p=p, seed=1234 + M, mask_mode=mask_mode)


def _expected_gemm_path(ext, pinned: str, fused: bool) -> str:
    """The implementation an aligned fp16/bf16 problem must run on when ``pinned`` is requested;
    ``fused``: a GEMM that takes the concatenated-K kernel on H100 (the forward, dX at p = 0)."""
    hopper = torch.cuda.get_device_capability() == (9, 0) and ext.build_metadata()["sm90_kernels"]
    sm90 = "sm90-fused" if fused else "sm90"
    if pinned == "auto":
        return sm90 if hopper else "sm80"
    if pinned == "sm90":
        return sm90 if hopper else "cublas"
    return pinned  # "sm80" runs on every sm_80+ GPU; "cublas"


@pytest.mark.parametrize("fwd_mode", ["fused", "expand"])
@pytest.mark.parametrize("gemm", ["auto", "sm80", "sm90", "cublas"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_base_gemm_paths(ext, monkeypatch, gemm, dtype, p, fwd_mode):
    """Each base GEMM implementation on aligned shapes larger than one 128×256 tile, with the
    concatenated-K GEMM on (H100: the forward, and dX at p = 0) and off (LORA_KERNELS_CUDA_CONCAT_K=0).

    The CUTLASS paths fall back to cuBLAS silently when can_implement() refuses a problem, so
    the test also checks which implementation actually ran (forward GEMM, then the dX GEMM)."""
    if fwd_mode == "expand":
        monkeypatch.setenv("LORA_KERNELS_CUDA_CONCAT_K", "0")
    else:
        monkeypatch.delenv("LORA_KERNELS_CUDA_CONCAT_K", raising=False)
    t = _make(300, 264, 520, 16, dtype)
    torch.ops.lora_kernels.cuda_lora_fwd(
        t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_bias"], 0.5, p, 7, True
    )
    on = fwd_mode == "fused"
    assert ext.last_gemm_path() == _expected_gemm_path(ext, gemm, fused=on), "forward base GEMM"
    _check_against_ref(t, scaling=0.5, p=p, seed=7, mask_mode="bitmask")
    assert ext.last_gemm_path() == _expected_gemm_path(ext, gemm, fused=on and p == 0.0), "dX base GEMM"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, N", [(1, 64, 8), (200, 4104, 392), (513, 256, 264)])
@pytest.mark.parametrize("r", [1, 8, 62, 63, 64, 200])
@pytest.mark.parametrize("biases", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_forward_tiles(ext, monkeypatch, dtype, M, K, N, r, biases):
    """The fused forward's walk over K tiles then low-rank tiles: K with a ragged last tile (4104),
    r + biases just under, at and over one 64-wide tile (62, 63, 64 with 0–2 bias columns), r = 200
    (four tiles), M and N ragged against the 128×256 output tile. Forward only, against float64."""
    monkeypatch.delenv("LORA_KERNELS_CUDA_CONCAT_K", raising=False)
    bias, lora_bias = biases
    t = _make(M, K, N, r, dtype, bias=bias, lora_bias=lora_bias, seed=M + r)
    _poison_allocator()
    y, T, bits = torch.ops.lora_kernels.cuda_lora_fwd(
        t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_bias"], 0.75, 0.0, 0, False
    )
    if torch.cuda.get_device_capability() == (9, 0) and ext.build_metadata()["sm90_kernels"]:
        assert ext.last_gemm_path() == "sm90-fused"
    t64 = {k: (v.double() if v is not None else None) for k, v in t.items()}
    y64 = reference.lora_linear_ref(
        t64["x"], t64["weight"], t64["lora_A"], t64["lora_B"], t64["bias"], t64["lora_bias"], 0.75, 0.0, True, 0
    )
    assert_close_ref(y, y64, (dtype, dtype), "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, N", [(1, 8, 64), (200, 392, 4104), (513, 264, 256)])
@pytest.mark.parametrize("r", [1, 8, 63, 64, 200])
def test_fused_dx_tiles(ext, monkeypatch, dtype, M, K, N, r):
    """dX at p = 0 as one concatenated-K GEMM, [dY | dT]·[W ; A]: the walk over N's tiles (ragged at
    4104) then r's (one to four tiles), K ragged against the 256-wide output tile. All gradients."""
    monkeypatch.delenv("LORA_KERNELS_CUDA_CONCAT_K", raising=False)
    t = _make(M, K, N, r, dtype, seed=M * 7 + r)
    _check_against_ref(t, scaling=1.5, p=0.0, seed=0, mask_mode="bitmask")
    if torch.cuda.get_device_capability() == (9, 0) and ext.build_metadata()["sm90_kernels"]:
        assert ext.last_gemm_path() == "sm90-fused", "the dX GEMM should have been the concatenated-K kernel"


def test_unaligned_and_fp32_problems_use_cublas(ext):
    for t in (_make(67, 33, 50, 16, torch.bfloat16), _make(67, 72, 40, 16, torch.float32)):
        torch.ops.lora_kernels.cuda_lora_fwd(
            t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_bias"], 2.0, 0.0, 0, False
        )
        assert ext.last_gemm_path() == "cublas"


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_bias_and_lora_bias(dtype):
    """bias / lora_bias as strided views (stride != 1): the expand kernel must honour the stride
    (it once read them as contiguous). Aligned shapes, so the CUTLASS epilogue path runs too."""
    t = _make(67, 72, 40, 16, dtype)
    t["bias"] = torch.randn(40, 3, device="cuda", dtype=dtype)[:, 1]  # stride 3
    t["lora_bias"] = torch.randn(80, device="cuda", dtype=dtype)[::2]  # stride 2
    _check_against_ref(t, scaling=2.0, p=0.1, seed=5, mask_mode="bitmask")


def test_hostile_layouts():
    """tests/test_hostile.py's layout cases (run there for torch/triton) on the cuda backend:
    stride-0 rows of x, weight and lora_A; overlapping rows; transposed parameters; strided
    biases; a frozen weight and bias that require grad."""
    from tests import test_hostile as hostile

    hostile.test_expanded_and_overlapping_strides("cuda")
    # 16-bit: the CUTLASS paths' leading-dimension checks must send stride-0 and overlapping rows to cuBLAS.
    hostile.test_expanded_and_overlapping_strides("cuda", torch.bfloat16)
    hostile.test_non_contiguous_everything("cuda")
    hostile.test_frozen_weight_and_bias_that_require_grad("cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_runs_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the op must set the device (CUDAGuard) for its
    launches, its workspace and the device properties it reads."""
    t = {k: (v.to("cuda:1") if v is not None else None) for k, v in _make(67, 72, 40, 16, torch.bfloat16).items()}
    dy = torch.randn(67, 40, device="cuda:1")
    with torch.cuda.device(0):
        y, g = _run(t, "cuda", 2.0, 0.1, 3, "bitmask", dy)
    t64 = {k: (v.double() if v is not None else None) for k, v in t.items()}
    y64, g64 = _run(t64, "torch", 2.0, 0.1, 3, "bitmask", dy)
    assert y.device == torch.device("cuda:1")
    assert_close_ref(y, y64, (torch.bfloat16,), "y on cuda:1")
    for k in g64:
        assert_close_ref(g[k], g64[k], (torch.bfloat16,), f"d{k} on cuda:1")


def test_seed_none_under_fullgraph():
    """seed=None under torch.compile(fullgraph=True): the seed is an unbacked int from .item(),
    which lora_linear_2d must pass through (int() on it cannot be traced)."""
    t = _make(64, 72, 40, 16, torch.bfloat16)

    def f(x):
        return lora_linear(x, t["weight"], t["lora_A"], t["lora_B"], dropout_p=0.5, backend="cuda")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    y1, y2 = compiled(t["x"]), compiled(t["x"])
    torch.manual_seed(3)
    e1, e2 = f(t["x"]), f(t["x"])
    assert not torch.equal(y1, y2), "two calls with seed=None used the same dropout mask"
    assert torch.equal(y1, e1) and torch.equal(y2, e2), "compiled calls drew other seeds than eager"


# M·K > 2³¹ for backend="cuda": tests/test_hostile.py::test_more_than_2_pow_31_elements.


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp32_adapters(dtype):
    """PEFT's default: bf16/fp16 base with float32 adapters, converted in-kernel."""
    t = _make(67, 72, 40, 16, dtype, adapter_dtype=torch.float32)
    _check_against_ref(t, scaling=2.0, p=0.1, seed=3, mask_mode="bitmask")


def test_single_output_column_with_fp32_adapters():
    """N = 1 (a score/regression head) with fp32 adapters: dB and dlora_bias must not come back as views
    of one buffer (torch.library rejects aliasing outputs on every call)."""
    t = _make(67, 72, 1, 16, torch.bfloat16, adapter_dtype=torch.float32)
    _check_against_ref(t, scaling=2.0, p=0.1, seed=3, mask_mode="bitmask")


def test_backward_op_checks_its_inputs():
    """Direct calls of the public op with inconsistent inputs raise instead of reading out of bounds."""
    t = _make(67, 72, 40, 16, torch.bfloat16)
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    y, T, bits = torch.ops.lora_kernels.cuda_lora_fwd(x, W, None, A, B, None, 2.0, 0.1, 5, True)
    dy = torch.randn_like(y)
    op = torch.ops.lora_kernels.cuda_lora_bwd
    bad = {
        "shape mismatch": (dy, x, W, A[:, :40], B, T, bits, 2.0, 0.1, 5, True),
        "shape mismatch ": (dy, x, W, A, B[:, :8], T, bits, 2.0, 0.1, 5, True),
        "p must be in": (dy, x, W, A, B, T, bits, 2.0, -0.5, 5, True),
        "must be a CUDA tensor": (dy, x, W, A, B, T, bits.cpu(), 2.0, 0.1, 5, True),
        "expected 2-D": (dy, x, W, A[None], B, T, bits, 2.0, 0.1, 5, True),
    }
    for msg, args in bad.items():
        with pytest.raises(RuntimeError, match=msg.strip()):
            op(*args)


def test_fp32_everything():
    t = _make(67, 33, 40, 8, torch.float32)
    _check_against_ref(t, scaling=2.0, p=0.1, seed=3, mask_mode="regenerate")


def test_no_biases_and_frozen_base_grads():
    """Without bias/lora_bias; then with weight and bias requiring grad (cuBLAS dW, db)."""
    t = _make(67, 72, 40, 16, torch.bfloat16, bias=False, lora_bias=False)
    _check_against_ref(t, scaling=2.0, p=0.1, seed=5, mask_mode="bitmask", grads=("x", "lora_A", "lora_B"))
    t = _make(67, 72, 40, 16, torch.bfloat16)
    _check_against_ref(
        t, scaling=2.0, p=0.1, seed=5, mask_mode="bitmask", grads=("x", "weight", "bias", "lora_A", "lora_B")
    )


def test_strided_and_3d_x():
    t = _make(64, 72, 40, 16, torch.float16)
    big = torch.randn(64, 2 * 72, device="cuda", dtype=torch.float16)
    t["x"] = big[:, ::2]  # inner stride 2: the kernels read it in place, the GEMM via cuBLAS
    _check_against_ref(t, scaling=2.0, p=0.1, seed=9, mask_mode="bitmask", grads=("lora_A", "lora_B"))
    t["x"] = torch.randn(72, 64, device="cuda", dtype=torch.float16).t()  # column-major x
    _check_against_ref(t, scaling=2.0, p=0.1, seed=9, mask_mode="regenerate")
    x3 = torch.randn(2, 5, 72, device="cuda", dtype=torch.float16)
    y = lora_linear(x3, t["weight"], t["lora_A"], t["lora_B"], scaling=2.0, dropout_p=0.1, seed=4, backend="cuda")
    y_ref = lora_linear(
        x3.double(), t["weight"].double(), t["lora_A"].double(), t["lora_B"].double(),
        scaling=2.0, dropout_p=0.1, seed=4, backend="torch",
    )  # fmt: skip
    assert y.shape == (2, 5, 40)
    assert_close_ref(y, y_ref, (torch.float16,), "y 3-D")


def test_empty_batch():
    t = _make(0, 72, 40, 16, torch.bfloat16)
    dy = torch.randn(0, 40, device="cuda")
    y, g = _run(t, "cuda", 2.0, 0.1, 1, "bitmask", dy)
    assert y.shape == (0, 40) and g["x"].shape == (0, 72)
    assert torch.count_nonzero(g["lora_A"]) == 0 and torch.count_nonzero(g["lora_B"]) == 0
    assert torch.count_nonzero(g["lora_bias"]) == 0


@pytest.mark.parametrize("M, K", [(1, 1), (67, 33), (300, 72), (5, 1000)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_saved_mask_and_T_match_reference(M, K, p):
    t = _make(M, K, 24, 16, torch.float16)
    seed = 2**40 + 17
    y, T, bits = torch.ops.lora_kernels.cuda_lora_fwd(
        t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_bias"], 2.0, p, seed, True
    )
    keep = reference.dropout_keep_mask(seed, M, K, p, device="cuda")
    assert torch.equal(bits, reference.pack_mask(keep))
    h = t["x"].double() * keep.double() / (1 - p)
    assert_close_ref(T, h @ t["lora_A"].double().t(), (torch.float16,), "T")


def test_backward_is_deterministic():
    t = _make(300, 72, 40, 64, torch.bfloat16)
    dy = torch.randn(300, 40, device="cuda")
    _, g1 = _run(t, "cuda", 2.0, 0.1, 11, "regenerate", dy)
    _, g2 = _run(t, "cuda", 2.0, 0.1, 11, "regenerate", dy)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_vector_and_element_loads_agree_bitwise(monkeypatch, p):
    """The tensor-core low-rank kernels' 16-byte loads of x and dY (contiguous, K and N multiples of 8: along
    the rows for T and dT, along the columns for dB and dA) against their element loads
    (LORA_KERNELS_CUDA_VEC_LOADS=0): the same values staged, the same WMMA products in the same order, so the
    same bits in y and in every gradient. M = 300 and K = 200 end in partial row blocks."""
    t = _make(300, 200, 136, 16, torch.bfloat16, adapter_dtype=torch.float32)
    dy = torch.randn(300, 136, device="cuda")
    monkeypatch.delenv("LORA_KERNELS_CUDA_VEC_LOADS", raising=False)
    y1, g1 = _run(t, "cuda", 2.0, p, 11, "bitmask", dy)
    monkeypatch.setenv("LORA_KERNELS_CUDA_VEC_LOADS", "0")
    y2, g2 = _run(t, "cuda", 2.0, p, 11, "bitmask", dy)
    assert torch.equal(y1, y2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_mask_modes_agree_bitwise():
    t = _make(67, 72, 40, 16, torch.float16)
    dy = torch.randn(67, 40, device="cuda")
    y1, g1 = _run(t, "cuda", 2.0, 0.1, 11, "bitmask", dy)
    y2, g2 = _run(t, "cuda", 2.0, 0.1, 11, "regenerate", dy)
    assert torch.equal(y1, y2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_opcheck_forward_and_backward():
    t = _make(67, 72, 40, 16, torch.bfloat16)
    fwd_args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_bias"], 2.0, 0.1, 5, True)
    torch.library.opcheck(torch.ops.lora_kernels.cuda_lora_fwd.default, fwd_args)
    torch.library.opcheck(torch.ops.lora_kernels.cuda_lora_fwd.default, fwd_args[:6] + (2.0, 0.0, 0, False))
    y, T, bits = torch.ops.lora_kernels.cuda_lora_fwd(*fwd_args)
    dy = torch.randn_like(y)
    for b, need_dx in ((bits, True), (torch.empty(0, dtype=torch.uint8, device="cuda"), False)):
        bwd_args = (dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], T, b, 2.0, 0.1, 5, need_dx)
        torch.library.opcheck(torch.ops.lora_kernels.cuda_lora_bwd.default, bwd_args)


def test_torch_compile_traces_the_ops():
    t = _make(67, 72, 40, 16, torch.bfloat16)

    def f(x, w, a, b):
        return lora_linear(x, w, a, b, scaling=2.0, dropout_p=0.1, seed=3, backend="cuda") * 2

    x = t["x"].clone().requires_grad_()
    y = torch.compile(f, fullgraph=False)(x, t["weight"], t["lora_A"], t["lora_B"])
    y_eager = f(t["x"], t["weight"], t["lora_A"], t["lora_B"])
    assert torch.equal(y, y_eager)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
