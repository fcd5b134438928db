"""The CUDA backend's host code, ``csrc/lora_ops.cpp`` itself, run on the CPU against float64.

``tests/test_cuda_emulation.py`` checks the device kernels along a launch sequence the harness writes
out by hand. This compiles the real ``lora_ops.cpp`` — argument checks, output allocation, strides and
leading dimensions handed to each kernel, the concatenated-K pack, the split plans, which GEMM path
runs, the dtype conversions of the returned gradients — into a CPU extension (``tests/cuda_emu/
ops_emu.cpp``) and calls its ``lora_fwd`` / ``lora_bwd`` on CPU tensors. The kernels run under the host
emulation of ``tests/cuda_emu/emu_runtime.h``; the CUTLASS GEMMs are fp32-accumulating matmuls behind
the same eligibility rules as the real build (``gemm_aligned`` / ``concat_k_aligned`` in gemm.h), so
an emulated H100 takes the concatenated-K path and an emulated A100 the expand + accumulate path,
as on the GPUs. Outputs start NaN-filled (deterministic mode fills ``at::empty``), so an element no
kernel writes fails. What stays for a GPU: CUTLASS itself, real concurrency, the CUDA runtime.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_kernels.reference import dropout_keep_mask, lora_linear_ref, pack_mask
from tests._utils import assert_close_ref

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
# lora_ops.h's GemmBackend
AUTO, CUBLAS, SM80, SM90, SM90_FUSED = range(5)
H100, A100 = (9, 0), (8, 0)


@pytest.fixture
def ops(cuda_ops_emu):
    return cuda_ops_emu  # tests/conftest.py: built once per session, reset to an H100 for each test


def _inputs(M, K, N, r, xdt, adt, bias, lora_bias, x_layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    if x_layout == "transposed":  # column-major x: strides (1, M)
        x = rnd(K, M, dt=xdt).t()
    elif x_layout == "sliced":  # every other column of a wider tensor: strides (2K, 2)
        x = rnd(M, 2 * K, dt=xdt)[:, ::2]
    else:
        x = rnd(M, K, dt=xdt)
    W = rnd(N, K, dt=xdt, scale=max(K, 1) ** -0.5)
    A = rnd(r, K, dt=adt, scale=max(K, 1) ** -0.5)
    B = rnd(N, r, dt=adt, scale=r**-0.5)
    b = rnd(N, dt=xdt) if bias else None
    lb = rnd(N, dt=adt) if lora_bias else None
    dy = rnd(M, N, dt=xdt)
    return x, W, A, B, b, lb, dy


def _expected_path(arch, mode, xdt, K, N, x_layout, fused_ok):
    """Which GEMM path lora_ops.cpp should take (lora_ops.cpp's base_gemm_accumulate / run_concat_k)."""
    half = xdt in (torch.float16, torch.bfloat16)
    aligned = half and K % 8 == 0 and N % 8 == 0 and x_layout == "contiguous"
    if arch == H100 and mode in (AUTO, SM90) and aligned and fused_ok:
        return SM90_FUSED
    if aligned and arch == H100 and mode in (AUTO, SM90):
        return SM90
    if aligned and mode in (AUTO, SM80):
        return SM80
    return CUBLAS


# (M, K, N, r, x dtype, adapter dtype, p, save_mask, bias, lora_bias, x layout)
CASES = [
    (5, 16, 24, 3, torch.bfloat16, torch.float32, 0.3, True, True, True, "contiguous"),
    (6, 16, 24, 7, torch.float16, torch.float16, 0.3, False, True, False, "contiguous"),  # pack R = 8 exactly
    (7, 40, 16, 16, torch.bfloat16, torch.bfloat16, 0.0, True, False, True, "contiguous"),
    (67, 24, 40, 5, torch.float16, torch.float32, 0.1, True, True, True, "contiguous"),
    (9, 20, 13, 2, torch.bfloat16, torch.float32, 0.3, True, True, True, "contiguous"),  # unaligned: cuBLAS
    (8, 32, 16, 4, torch.float16, torch.float16, 0.3, True, False, False, "transposed"),
    (8, 32, 16, 4, torch.bfloat16, torch.float32, 0.0, False, True, True, "sliced"),
    (6, 19, 11, 3, torch.float32, torch.float32, 0.3, False, True, True, "contiguous"),
    (1, 8, 8, 1, torch.bfloat16, torch.float32, 0.5, True, True, False, "contiguous"),
]


def _ids(case):
    M, K, N, r, xdt, adt, p, save, b, lb, layout = case
    dts = str(xdt).split(".")[1] + ("" if adt == xdt else "+" + str(adt).split(".")[1])
    return f"{M}x{K}x{N}-r{r}-{dts}-p{p}-{'bits' if save else 'regen'}-b{int(b)}{int(lb)}-{layout}"


@pytest.mark.parametrize("arch, mode", [(H100, AUTO), (A100, AUTO), (H100, SM80), (H100, CUBLAS)],
                         ids=["h100", "a100", "h100-sm80-pinned", "h100-cublas-pinned"])  # fmt: skip
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_lora_ops_forward_and_backward_match_float64(ops, arch, mode, case):
    M, K, N, r, xdt, adt, p, save_mask, has_b, has_lb, layout = case
    ops.set_device(*arch, True)
    ops.set_gemm_backend(mode)
    x, W, A, B, b, lb, dy = _inputs(M, K, N, r, xdt, adt, has_b, has_lb, layout)
    s, seed = 1.7, 12345 + M
    fails0 = ops.stats()[0]

    y, T, bits = ops.lora_fwd(x, W, b, A, B, lb, s, p, seed, save_mask)
    assert ops.stats()[0] == fails0, "the emulation flagged a WMMA misuse or a bad split plan"
    fwd_path = ops.last_gemm_path()
    assert fwd_path == _expected_path(arch, mode, xdt, K, N, layout, fused_ok=True), fwd_path
    assert y.dtype == xdt and T.dtype == torch.float32 and T.shape == (M, r)

    leaves = [t.double().requires_grad_() for t in (x, W, A, B)]
    xd, Wd, Ad, Bd = leaves
    bd = b.double() if b is not None else None
    lbd = (lb.double() if lb is not None else torch.zeros(N, dtype=torch.float64)).requires_grad_()
    y_ref = lora_linear_ref(xd, Wd, Ad, Bd, bd, lbd, s, p, True, seed if p > 0 else None)
    assert_close_ref(y, y_ref, [xdt, adt], "y")
    keep = dropout_keep_mask(seed, M, K, p) if p > 0 else torch.ones(M, K, dtype=torch.bool)
    T_ref = (x.double() * keep / (1 - p)) @ A.double().t()
    assert_close_ref(T, T_ref, [xdt, adt], "T")
    if p > 0 and save_mask:
        assert torch.equal(bits, pack_mask(keep)), "saved mask bits differ from the reference"
    else:
        assert bits.numel() == 0

    dx, dA, dB, dlb = ops.lora_bwd(dy, x, W, A, B, T, bits, s, p, seed, True, True, True)
    assert ops.stats()[0] == fails0
    assert ops.last_gemm_path() == _expected_path(arch, mode, xdt, K, N, "contiguous", fused_ok=p == 0)
    g_ref = torch.autograd.grad(y_ref, [xd, Ad, Bd, lbd], dy.double())
    assert (dx.dtype, dA.dtype, dB.dtype, dlb.dtype) == (xdt, adt, adt, adt)
    for name, got, ref in zip(("dx", "dA", "dB", "dlora_bias"), (dx, dA, dB, dlb), g_ref, strict=True):
        assert_close_ref(got, ref, [xdt, adt], name)


@pytest.mark.parametrize("arch, mode", [(H100, AUTO), (A100, AUTO), (H100, SM80)], ids=["h100", "a100", "h100-sm80"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_a_weight_stored_k_by_n_takes_the_cutlass_paths(ops, arch, mode, p, bias):
    """W stored (K, N) and passed as its (N, K) view (GPT-2's Conv1D): the GEMMs take its row-major
    transpose with the layout flag flipped (and the concatenated-K pack its l in the matching order), so
    the forward and dX run the CUTLASS paths an (N, K) weight runs, not cuBLAS. N != K, both biases: the
    pack's bias rows in the flipped order too. Forward and every gradient against float64."""
    ops.set_device(*arch, True)
    ops.set_gemm_backend(mode)
    M, K, N, r, s, seed = 9, 40, 24, 5, 1.3, 321
    dts = [torch.bfloat16, torch.float32]
    x, W, A, B, b, lb, dy = _inputs(M, K, N, r, *dts, bias, bias)
    W = W.t().contiguous().t()
    assert W.stride() == (1, N)
    y, T, bits = ops.lora_fwd(x, W, b, A, B, lb, s, p, seed, True)
    assert ops.last_gemm_path() == _expected_path(arch, mode, torch.bfloat16, K, N, "contiguous", fused_ok=True)
    leaves = [t.double().requires_grad_() for t in (x, A, B)]
    lbd = (lb.double() if lb is not None else torch.zeros(N, dtype=torch.float64)).requires_grad_()
    bd = b.double() if b is not None else None
    y_ref = lora_linear_ref(leaves[0], W.double(), leaves[1], leaves[2], bd, lbd, s, p, True, seed)
    assert_close_ref(y, y_ref, dts, "y")
    got = ops.lora_bwd(dy, x, W, A, B, T, bits, s, p, seed, True, True, True)
    assert ops.last_gemm_path() == _expected_path(arch, mode, torch.bfloat16, K, N, "contiguous", fused_ok=p == 0)
    refs = torch.autograd.grad(y_ref, [*leaves, lbd], dy.double())
    for name, g, ref in zip(("dx", "dA", "dB", "dlora_bias"), got, refs, strict=True):
        assert_close_ref(g, ref, dts, name)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dx-only", "dA-only", "dB-only"])  # fmt: skip
def test_lora_bwd_computes_only_what_is_asked(ops, need):
    """The partial backward (a frozen lora_A, lora_B, or an x that needs no gradient): what is asked for
    matches float64, the rest comes back empty, and a regenerated mask serves dX and dA alike."""
    ops.set_device(*H100, True)
    ops.set_gemm_backend(AUTO)
    M, K, N, r, p, s, seed = 10, 24, 16, 4, 0.3, 0.5, 99
    x, W, A, B, _, _, dy = _inputs(M, K, N, r, torch.bfloat16, torch.float32, False, False)
    y, T, bits = ops.lora_fwd(x, W, None, A, B, None, s, p, seed, False)
    got = ops.lora_bwd(dy, x, W, A, B, T, bits, s, p, seed, *need)
    leaves = [t.double().requires_grad_() for t in (x, A, B)]
    y_ref = lora_linear_ref(leaves[0], W.double(), leaves[1], leaves[2], None, None, s, p, True, seed)
    refs = torch.autograd.grad(y_ref, leaves, dy.double())
    for name, asked, g, ref in zip(("dx", "dA", "dB"), need, got[:3], refs, strict=True):
        if asked:
            assert_close_ref(g, ref, [torch.bfloat16, torch.float32], name)
        else:
            assert g.numel() == 0, f"{name} was computed though not asked for"


def test_lora_ops_refuse_what_the_kernels_cannot_take(ops):
    """lora_ops.cpp's own checks, as a direct torch.ops caller meets them (the ops are public)."""
    x, W, A, B, b, lb, dy = _inputs(4, 16, 8, 2, torch.bfloat16, torch.float32, True, True)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ops.lora_fwd(x, W[:, :8], b, A, B, lb, 1.0, 0.0, 0, True)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.lora_fwd(x, W, b[:4], A, B, lb, 1.0, 0.0, 0, True)
    with pytest.raises(RuntimeError, match="p must be in"):
        ops.lora_fwd(x, W, b, A, B, lb, 1.0, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.lora_fwd(x.double(), W.double(), None, A.double(), B.double(), None, 1.0, 0.0, 0, True)
    y, T, bits = ops.lora_fwd(x, W, b, A, B, lb, 1.0, 0.2, 7, True)
    with pytest.raises(RuntimeError, match="T must be a contiguous float32"):
        ops.lora_bwd(dy, x, W, A, B, T.t().contiguous().t(), bits, 1.0, 0.2, 7, True, True, True)
    with pytest.raises(RuntimeError, match=r"bits must be empty \(regenerate\) or a contiguous uint8 \(M, ceil"):
        ops.lora_bwd(dy, x, W, A, B, T, bits.t().contiguous().t(), 1.0, 0.2, 7, True, True, True)
    # A non-empty mask of the wrong size is a caller's bug, never a cue to regenerate over it.
    for wrong in (bits[:-1], bits.reshape(-1), torch.cat([bits, bits[:1]])):
        with pytest.raises(RuntimeError, match=r"bits must be empty \(regenerate\) or a contiguous uint8"):
            ops.lora_bwd(dy, x, W, A, B, T, wrong.contiguous(), 1.0, 0.2, 7, True, True, True)
    with pytest.raises(RuntimeError, match="dy must be"):
        ops.lora_bwd(dy[:, :4], x, W, A, B, T, bits, 1.0, 0.2, 7, True, True, True)


def test_lora_ops_empty_problems(ops):
    """M = 0, N = 0 and K = 0: right-shaped outputs; gradients that are empty sums come back as zeros
    (not the NaN at::empty leaves here), lora_bias's as s·Σ dY."""
    ops.set_device(*H100, True)
    ops.set_gemm_backend(AUTO)
    dts = [torch.bfloat16, torch.float32]
    for M, K, N in [(0, 16, 8), (4, 16, 0), (4, 0, 8)]:
        x, W, A, B, b, lb, dy = _inputs(M, K, N, 3, *dts, True, True)
        y, T, bits = ops.lora_fwd(x, W, b, A, B, lb, 2.0, 0.25, 5, True)
        assert y.shape == (M, N) and T.shape == (M, 3)
        leaves = [t.double().requires_grad_() for t in (x, A, B, lb)]
        y_ref = lora_linear_ref(leaves[0], W.double(), leaves[1], leaves[2], b.double(), leaves[3], 2.0, 0.25,
                                True, 5)  # fmt: skip
        assert_close_ref(y, y_ref, dts, f"y {M}x{K}x{N}")
        got = ops.lora_bwd(dy, x, W, A, B, T, bits, 2.0, 0.25, 5, True, True, True)
        refs = torch.autograd.grad(y_ref, leaves, dy.double(), allow_unused=True)
        for name, g, ref in zip(("dx", "dA", "dB", "dlora_bias"), got, refs, strict=True):
            assert_close_ref(g, torch.zeros_like(leaves[0]) if ref is None else ref, dts, f"{name} {M}x{K}x{N}")
