"""The implementations the LoRA-linear benchmark compares, built on one shared set of inputs.

A :class:`Problem` holds the inputs of one configuration (x copies, dY copies, W, bias, A, B);
:func:`build` turns an implementation name into an :class:`Impl` (a forward callable plus the
tensors that belong to it) or raises :class:`Unavailable` with the reason it cannot run here.

Names:
    ``cublas``  frozen ``F.linear(x, W, b)``: the floor (on CPU it is whatever BLAS torch uses).
    ``naive``   PEFT's math in eager with adapters in the activation dtype.
    ``peft``    a real ``peft`` LoRA ``Linear`` with PEFT's defaults (fp32 adapters).
    ``compile`` ``torch.compile`` of ``naive``.
    ``addmm``   Unsloth's LoRA_W algorithm (../shared/ANCHORS.md, the fastest peer measured there):
                ``y = F.linear(x, W, b)`` then ``y.addmm_(x·Aᵀ, Bᵀ, alpha=s)``, three cuBLAS GEMMs, adapters in
                the activation dtype, backward by autograd; no dropout (Unsloth's fast path needs p = 0).
    ``torch``   ``lora_kernels.lora_linear(backend="torch")`` (the reference; a dry-run row).
    ``triton-bitmask``, ``triton-regen``, ``cuda-bitmask``, ``cuda-regen``:
                ``lora_kernels.lora_linear`` with that backend and ``dropout_mask`` mode.
    ``triton-1pass`` ``triton-bitmask`` with the single-pass kernels (forward in one launch, backward
                reading dY once less; Hopper TMA path; opt-in via ``LORA_KERNELS_FWD=single`` and
                ``LORA_KERNELS_BWD=single`` until measured, see bench/NOTES.md).
    ``triton-compile`` ``torch.compile(fullgraph=True)`` of ``triton-bitmask``: what a compiled model runs
                (the registered ops; pointer GEMMs, or with ``LORA_KERNELS_TMA=1`` the TMA kernels with
                in-kernel descriptors).
    ``triton-flat`` ``triton-bitmask`` with the persistent TMA kernels' tile and K loops flattened into one
                (``LORA_KERNELS_TMA_FLATTEN=1``: the next tile's loads overlap this tile's epilogue) for an A/B
                against the default; offered only on the TMA path.
    ``triton-kn`` ``triton-bitmask`` with W stored (K, N), as GPT-2's ``Conv1D`` keeps it (PEFT's
                ``fan_in_fan_out``), passed as its (N, K) view: the TMA kernels' W_KN variant, for an A/B against
                the (N, K) weight of ``triton-bitmask``; offered only on the TMA path.
    ``triton-nosplit`` ``triton-bitmask`` with the shrink's K never split (``LORA_KERNELS_SHRINK_SPLIT_K=1``)
                for an A/B of the split-K shrink; offered only where the default splits (M below ~3.8 K).
    ``triton-daseparate`` ``triton-bitmask`` with dA as a launch of its own after the TMA dX kernel
                (``LORA_KERNELS_BWD_DA=separate``) instead of its first tiles; offered only on the TMA path.
    ``triton-nosplitm`` ``triton-bitmask`` with the backward's dA and dB reductions unsplit over M
                (``LORA_KERNELS_BWD_SPLIT_M=1``); offered only where the default splits.
    ``triton-dx128`` ``triton-bitmask`` with the TMA dX GEMM's fixed tiles at 128×128 (``LORA_KERNELS_DX_WIDE=0``,
                the default before session 35) for an A/B against the 128×256 ones; offered only where the
                default takes 128×256 (rank ≤ 32, more wide tiles than half the SM count, fixed tiles).
    ``triton-dy1`` ``triton-bitmask`` with the backward's dT and dB from one read of dY (``_bwd_dy1_kernel``,
                ``LORA_KERNELS_DY_PASSES=1``, opt-in since session 36) for an A/B against the two reads of
                ``_bwd_dy_kernel``; offered only where it applies (16-bit x, rank ≤ 16). Its counters come from a
                ``torch.zeros`` (a memset launch), so its backward has no call plan and pays the launchers' Python:
                where the step is host-bound its times carry that too; ``bench.kernel_times`` (runbook item 1c)
                gives the kernels' own A/B.
    ``triton-devdesc`` ``triton-bitmask`` with the eager TMA launches' descriptors built in the kernel
                (``LORA_KERNELS_TMA_DESC=device``, opt-in since session 42: no host descriptors for Triton's launcher
                to expand, a global scratch allocation per launch instead) for an A/B of host and kernel time
                against the host descriptors; offered only on the TMA path.
    ``cuda-expand`` ``cuda-bitmask`` without the concatenated-K GEMM (``LORA_KERNELS_CUDA_CONCAT_K=0``:
                an expand kernel writes the low-rank part into y, or dX at p = 0, and the GEMM re-reads
                it) for an A/B against the default on H100.
    ``cuda-scalar`` ``cuda-bitmask`` with the tensor-core low-rank kernels loading x and dY an element at a time
                (``LORA_KERNELS_CUDA_VEC_LOADS=0``, the loads before session 37) for an A/B against their 16-byte
                vector loads; offered only with 16-bit x (fp32 x takes the FMA kernels either way).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora_kernels.flops import backward_flops, forward_flops

__all__ = [
    "ALL_IMPLS",
    "Impl",
    "Problem",
    "Unavailable",
    "build",
    "import_peft",
    "make_problem",
    "num_copies",
]

ALL_IMPLS = (
    "cublas",
    "naive",
    "peft",
    "axolotl",
    "compile",
    "addmm",
    "torch",
    "triton-bitmask",
    "triton-1pass",
    "triton-compile",
    "triton-flat",
    "triton-kn",
    "triton-nosplit",
    "triton-daseparate",
    "triton-nosplitm",
    "triton-dx128",
    "triton-dy1",
    "triton-devdesc",
    "triton-regen",
    "cuda-bitmask",
    "cuda-expand",
    "cuda-scalar",
    "cuda-regen",
)
_MASK_MODES = {"bitmask": "bitmask", "regen": "regenerate"}


class Unavailable(Exception):
    """An implementation cannot run on this machine / these inputs; the message says why."""


@dataclass
class Problem:
    """Inputs of one configuration, shared by every implementation in the run.

    ``xs``: copies of x, each ``(M, K)`` in ``dtype`` with ``requires_grad`` (backward computes
    dX); ``dys``: matching ``(M, N)`` output gradients; ``weight``: ``(N, K)`` frozen; ``bias``:
    ``(N,)`` frozen or None; ``lora_A``: ``(r, K)`` and ``lora_B``: ``(N, r)`` in ``adapter_dtype``,
    trainable unless named in ``frozen`` ("A": LoRA-FA, "B", "AB": a frozen adapter in front of trained
    layers; every implementation freezes the same ones). Everything is random and non-zero (lora_B
    included, unlike PEFT's init, so the low-rank path does real work).
    """

    M: int
    K: int
    N: int
    r: int
    p: float
    scaling: float
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    device: torch.device
    xs: list[torch.Tensor]
    dys: list[torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    frozen: str = ""

    @property
    def lora_flops_fwd(self) -> float:
        """x·Wᵀ plus the shrink x̃·Aᵀ and the expand T·Bᵀ (what FlopCounterMode counts: lora_kernels.flops)."""
        return float(forward_flops(self.M, self.K, self.N, self.r))

    @property
    def lora_flops_fwdbwd(self) -> float:
        """Forward plus dX = dY·W, dT = dY·B, dX += dT·A, and dA = dTᵀ·x̃, dB = dYᵀ·T unless frozen."""
        need_da, need_db = "A" not in self.frozen, "B" not in self.frozen
        return self.lora_flops_fwd + backward_flops(self.M, self.K, self.N, self.r, True, need_da, need_db)

    @property
    def base_flops_fwd(self) -> float:
        return 2.0 * self.M * self.N * self.K

    @property
    def base_flops_fwdbwd(self) -> float:
        """W is frozen, so the floor's backward is dX only."""
        return 4.0 * self.M * self.N * self.K


@dataclass
class Impl:
    """One benchmark row's implementation.

    ``fn(x) -> y`` maps an ``(M, K)`` copy from ``Problem.xs`` to ``(M, N)``; ``owned`` are the
    tensors that are parameters of this implementation (excluded from saved-activation
    accounting, their ``.grad`` reset between timed runs).
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    owned: list[torch.Tensor] = field(default_factory=list)
    flops_fwd: float = 0.0
    flops_fwdbwd: float = 0.0
    # Rows with a cross-program barrier (triton-1pass): the device's count of tiles that gave up
    # waiting and recomputed T / dT so far (single_pass.barrier_fallbacks); the row reports the increase.
    fallbacks: Callable[[], int] | None = None
    # Entered around all of the row's calls, backward passes included (a setting the backward reads
    # when it runs, after ``fn`` has returned).
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def num_copies(per_copy_bytes: int, device: torch.device, max_copies: int = 8) -> int:
    """How many input copies to rotate through so that consecutive calls miss in L2.

    Inputs that fit in L2 would otherwise be served cache-hot; rotate enough copies to cover
    twice the L2, at most ``max_copies`` and at most a quarter of the free device memory.
    """
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
        free = torch.cuda.mem_get_info(device)[0]
    else:
        l2 = 4 * 2**20  # a typical per-core L2/L3 slice: only exercises the rotation on CPU
        free = 2**62
    want = math.ceil(2 * l2 / max(per_copy_bytes, 1))
    fit = max(1, (free // 4) // max(per_copy_bytes, 1))
    return int(max(1, min(want, max_copies, fit)))


def make_problem(
    M: int,
    K: int,
    N: int,
    r: int,
    p: float,
    *,
    dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    device: torch.device | str,
    bias: bool = False,
    scaling: float = 2.0,
    copies: int | None = None,
    seed: int = 0,
    frozen: str = "",
) -> Problem:
    """Random inputs for one configuration (see :class:`Problem`); ``copies`` defaults to
    :func:`num_copies`; ``frozen``: "", "A", "B" or "AB", the adapter matrices that take no gradient."""
    if frozen not in ("", "A", "B", "AB"):
        raise ValueError(f"frozen must be '', 'A', 'B' or 'AB', got {frozen!r}")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    elt = torch.empty((), dtype=dtype).element_size()
    n = copies if copies is not None else num_copies((M * K + M * N) * elt, device)

    def randn(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype, grad: bool = False) -> torch.Tensor:
        # Generated on the CPU generator so every device sees the same numbers for a seed.
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    xs = [randn(M, K, grad=True) for _ in range(n)]
    dys = [randn(M, N) for _ in range(n)]
    return Problem(
        M=M, K=K, N=N, r=r, p=float(p), scaling=float(scaling), dtype=dtype, adapter_dtype=adapter_dtype,
        device=device, xs=xs, dys=dys,
        weight=randn(N, K, scale=K**-0.5),
        bias=randn(N) if bias else None,
        lora_A=randn(r, K, scale=K**-0.5, dt=adapter_dtype, grad="A" not in frozen),
        lora_B=randn(N, r, scale=r**-0.5, dt=adapter_dtype, grad="B" not in frozen),
        frozen=frozen,
    )  # fmt: skip


def _cublas(prob: Problem) -> Impl:
    W, b = prob.weight, prob.bias
    return Impl("cublas", lambda x: F.linear(x, W, b), [W] + ([b] if b is not None else []),
                prob.base_flops_fwd, prob.base_flops_fwdbwd)  # fmt: skip


def _naive_fn(prob: Problem) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """PEFT's forward, written out in eager, with the adapters cast to the activation dtype."""
    W, b, s, p = prob.weight, prob.bias, prob.scaling, prob.p
    A = prob.lora_A.detach().to(prob.dtype).requires_grad_(prob.lora_A.requires_grad)
    B = prob.lora_B.detach().to(prob.dtype).requires_grad_(prob.lora_B.requires_grad)
    # PEFT uses nn.Identity at p = 0, so no dropout kernel runs there.
    drop = (lambda t: t) if p == 0.0 else (lambda t: F.dropout(t, p, training=True))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, W, b) + s * F.linear(F.linear(drop(x), A), B)

    return fn, [W, A, B] + ([b] if b is not None else [])


def _naive(prob: Problem) -> Impl:
    fn, owned = _naive_fn(prob)
    return Impl("naive", fn, owned, prob.lora_flops_fwd, prob.lora_flops_fwdbwd)


def _compile(prob: Problem) -> Impl:
    if not hasattr(torch, "compile"):
        raise Unavailable("torch.compile is not available in this torch")
    fn, owned = _naive_fn(prob)
    # A fresh dynamo cache per configuration: otherwise shape/p guards pile up across the run
    # and past the recompile limit dynamo silently falls back to eager.
    torch._dynamo.reset()
    return Impl("compile", torch.compile(fn, dynamic=False), owned, prob.lora_flops_fwd, prob.lora_flops_fwdbwd)


def _addmm(prob: Problem) -> Impl:
    if prob.p != 0.0:
        raise Unavailable("Unsloth's addmm path has no dropout (its fast path requires p = 0)")
    W, b, s = prob.weight, prob.bias, prob.scaling
    A = prob.lora_A.detach().to(prob.dtype).requires_grad_(prob.lora_A.requires_grad)
    B = prob.lora_B.detach().to(prob.dtype).requires_grad_(prob.lora_B.requires_grad)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, W, b)  # linear's backward does not need y, so the in-place add is safe
        y.addmm_(x2 @ A.t(), B.t(), alpha=s)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return Impl("addmm", fn, [W, A, B] + ([b] if b is not None else []), prob.lora_flops_fwd, prob.lora_flops_fwdbwd)


def import_peft() -> tuple[type, Callable]:
    """PEFT's ``(LoraConfig, get_peft_model)``, ready for a fresh process; ImportError without peft.

    PEFT (0.21 at least) builds each LoRA layer through an ``isinstance(w, torch.distributed.tensor.DTensor)``
    check without importing that submodule: where nothing else did (torch 2.11 with transformers 4.45,
    seen here), every get_peft_model raises AttributeError. Importing it first is what torch 2.14's
    stack does anyway."""
    from peft import LoraConfig, get_peft_model

    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.tensor")

    return LoraConfig, get_peft_model


def _peft(prob: Problem) -> Impl:
    try:
        LoraConfig, get_peft_model = import_peft()
    except ImportError as e:
        raise Unavailable(f"peft is not installed ({e})") from e

    class _OneLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(
                prob.K, prob.N, bias=prob.bias is not None, device=prob.device, dtype=prob.dtype
            )

    model = _OneLinear()
    with torch.no_grad():
        model.proj.weight.copy_(prob.weight)
        if prob.bias is not None:
            model.proj.bias.copy_(prob.bias)
    # lora_alpha = scaling · r gives PEFT's scaling alpha / r = scaling. get_peft_model's default
    # autocast_adapter_dtype=True keeps the adapters in fp32 next to a bf16/fp16 base: PEFT's default.
    config = LoraConfig(r=prob.r, lora_alpha=prob.scaling * prob.r, lora_dropout=prob.p, target_modules=["proj"])
    peft_model = get_peft_model(model, config)
    peft_model.train()
    layer = peft_model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        A.copy_(prob.lora_A)
        B.copy_(prob.lora_B)
    A.requires_grad_(prob.lora_A.requires_grad)
    B.requires_grad_(prob.lora_B.requires_grad)
    owned = [t for t in layer.parameters()]
    return Impl("peft", layer, owned, prob.lora_flops_fwd, prob.lora_flops_fwdbwd)


def _axolotl(prob: Problem) -> Impl:
    """Axolotl's LoRA kernel for one projection (``axolotl.kernels.lora.apply_lora_linear``: ``LoRA_O``, what its
    ``lora_o_kernel`` runs, on by default for LoRA runs) over the ``peft`` row's layer: X·Wᵀ, then
    ``addmm_(X̃·Aᵀ, Bᵀ)`` with the adapters cast to x's dtype, custom backward (dA, dB, dX from dY·B once); at
    p > 0 it keeps the dropped copy of x that PEFT's dropout module makes."""
    try:
        from axolotl.kernels.lora import apply_lora_linear
    except ImportError as e:
        raise Unavailable(f"axolotl is not installed ({e})") from e
    peft = _peft(prob)
    layer = peft.fn

    def fn(x: torch.Tensor) -> torch.Tensor:
        return apply_lora_linear(layer, x.unsqueeze(0)).squeeze(0)  # LoRA_O's backward takes (batch, seq, K)

    return Impl("axolotl", fn, peft.owned, prob.lora_flops_fwd, prob.lora_flops_fwdbwd)


def _ours(prob: Problem, backend: str, mask_mode: str, name: str, weight: torch.Tensor | None = None) -> Impl:
    """``weight``: the frozen weight to pass instead of ``prob.weight`` (same values, another layout)."""
    from lora_kernels import available_backends, lora_linear

    reason = available_backends(x=prob.xs[0]).get(backend, f"unknown backend {backend!r}")
    if reason is not None:
        raise Unavailable(reason)
    W = prob.weight if weight is None else weight
    b, A, B, s, p = prob.bias, prob.lora_A, prob.lora_B, prob.scaling, prob.p

    def fn(x: torch.Tensor) -> torch.Tensor:
        # seed=None: a fresh seed per call, as in training.
        return lora_linear(x, W, A, B, b, None, s, p, training=True, seed=None,
                           backend=backend, dropout_mask=mask_mode)  # fmt: skip

    owned = [W, A, B] + ([b] if b is not None else [])
    return Impl(name, fn, owned, prob.lora_flops_fwd, prob.lora_flops_fwdbwd)


def _ours_single_pass(prob: Problem) -> Impl:
    """``triton-bitmask`` with the single-pass forward and backward switched on for this row's calls
    only (the backward follows the mode in force when its forward ran)."""
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops.single_pass import barrier_fallbacks, single_pass_reason

    base = _ours(prob, "triton", "bitmask", "triton-1pass")
    x, W = prob.xs[0], prob.weight
    if not (tri._tma_ok(x, W) and (prob.N * x.element_size()) % 16 == 0):
        raise Unavailable("the single-pass forward runs on the TMA path only (sm90+, 16-bit x, 16-byte rows)")
    reason = single_pass_reason(x, W, prob.lora_A)
    if reason is not None:
        raise Unavailable(reason)

    def fn(x: torch.Tensor) -> torch.Tensor:
        prev = tri.FWD_MODE, tri.BWD_MODE
        tri.FWD_MODE = tri.BWD_MODE = "single"
        try:
            return base.fn(x)
        finally:
            tri.FWD_MODE, tri.BWD_MODE = prev

    return Impl(base.name, fn, base.owned, base.flops_fwd, base.flops_fwdbwd, lambda: barrier_fallbacks(x.device))


def _ours_compiled(prob: Problem) -> Impl:
    """``triton-bitmask`` under ``torch.compile(fullgraph=True)``: the registered ops' launches."""
    if not hasattr(torch, "compile"):
        raise Unavailable("torch.compile is not available in this torch")
    if prob.device.type != "cuda":
        raise Unavailable("torch.compile of the Triton ops needs a GPU (interpreter kernels cannot be traced)")
    base = _ours(prob, "triton", "bitmask", "triton-compile")
    torch._dynamo.reset()  # as for `compile`: no guards piling up across configurations
    fn = torch.compile(base.fn, fullgraph=True, dynamic=False)
    return Impl(base.name, fn, base.owned, base.flops_fwd, base.flops_fwdbwd)


def _ours_no_split(prob: Problem) -> Impl:
    """``triton-bitmask`` with the shrink's K never split, for this row's calls only."""
    from lora_kernels.triton_ops import lora_linear as tri

    base = _ours(prob, "triton", "bitmask", "triton-nosplit")
    if tri._shrink_splits(prob.xs[0].reshape(-1, prob.K)) == 1:
        raise Unavailable("the shrink does not split K here: identical to triton-bitmask")

    def fn(x: torch.Tensor) -> torch.Tensor:
        prev = tri.SHRINK_SPLIT_K
        tri.SHRINK_SPLIT_K = "1"
        try:
            return base.fn(x)
        finally:
            tri.SHRINK_SPLIT_K = prev

    return Impl(base.name, fn, base.owned, base.flops_fwd, base.flops_fwdbwd)


def _ours_flattened(prob: Problem) -> Impl:
    """``triton-bitmask`` with TMA_FLATTEN set around all of this row's calls (the dX kernel reads it
    when the backward runs)."""
    from lora_kernels.triton_ops import lora_linear as tri

    base = _ours(prob, "triton", "bitmask", "triton-flat")
    x, W = prob.xs[0], prob.weight
    if not (tri._tma_ok(x, W) and (prob.N * x.element_size()) % 16 == 0):
        raise Unavailable("flattening applies to the persistent TMA kernels only (sm90+, 16-bit x, 16-byte rows)")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _setting(tri, "TMA_FLATTEN", True))  # fmt: skip


def _ours_da_separate(prob: Problem) -> Impl:
    """``triton-bitmask`` with dA as a launch of its own after the TMA dX kernel (``LORA_KERNELS_BWD_DA=separate``)
    instead of the first tiles of its walk, for this row's calls."""
    from lora_kernels.triton_ops import lora_linear as tri

    base = _ours(prob, "triton", "bitmask", "triton-daseparate")
    x, W = prob.xs[0], prob.weight
    if not (tri._tma_ok(x, W) and (prob.K * x.element_size()) % 16 == 0):
        raise Unavailable("dA's placement is a choice of the TMA backward only (sm90+, 16-bit x, 16-byte rows)")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _setting(tri, "BWD_DA", "separate"))  # fmt: skip


def _ours_no_split_m(prob: Problem) -> Impl:
    """``triton-bitmask`` with the backward's dA and dB reductions unsplit (``LORA_KERNELS_BWD_SPLIT_M=1``: one
    program per K- or N-block reduces all of M), for this row's calls."""
    from lora_kernels.triton_ops import lora_linear as tri

    base = _ours(prob, "triton", "bitmask", "triton-nosplitm")
    x = prob.xs[0].reshape(-1, prob.K)
    if max(tri._row_splits(x, tri._cdiv(prob.K, 128)), tri._row_splits(x, tri._cdiv(prob.N, 128))) == 1:
        raise Unavailable("the backward does not split M here: identical to triton-bitmask")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _setting(tri, "BWD_SPLIT_M", "1"))  # fmt: skip


def _ours_dx128(prob: Problem) -> Impl:
    """``triton-bitmask`` with the TMA dX GEMM's fixed tiles at 128×128 (``LORA_KERNELS_DX_WIDE=0``) for this
    row's calls: the A/B of session 35's 128×256 default."""
    from lora_kernels.triton_ops import lora_linear as tri

    base = _ours(prob, "triton", "bitmask", "triton-dx128")
    x = prob.xs[0].reshape(-1, prob.K)
    if not (tri._tma_ok(x, prob.weight) and (prob.N * x.element_size()) % 16 == 0):
        raise Unavailable("the dX tiles are the TMA backward's (sm90+, 16-bit x, 16-byte rows)")
    if tri.AUTOTUNE:
        raise Unavailable("autotuned: the tuner picks the dX tiles (LORA_KERNELS_AUTOTUNE=0 compares the fixed ones)")
    if not tri._dx_wide(x, prob.r):
        raise Unavailable("the fixed dX tiles are 128×128 here already (rank > 32 or too few wide tiles)")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _setting(tri, "DX_WIDE", "0"))  # fmt: skip


def _ours_dy1(prob: Problem) -> Impl:
    """``triton-bitmask`` with the backward's dT and dB from one read of dY (``LORA_KERNELS_DY_PASSES=1``) for this
    row's calls: the A/B of session 36's opt-in kernel against the default's two reads."""
    from lora_kernels.triton_ops import lora_linear as tri

    base = _ours(prob, "triton", "bitmask", "triton-dy1")
    with _setting(tri, "DY_PASSES", "1"):
        applies = tri._dy_one_pass(prob.xs[0], prob.r)
    if not applies:
        raise Unavailable("one read of dY is for 16-bit x at rank ≤ 16")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _setting(tri, "DY_PASSES", "1"))  # fmt: skip


def _ours_device_desc(prob: Problem) -> Impl:
    """``triton-bitmask`` with the TMA kernels' descriptors built in the kernel (``LORA_KERNELS_TMA_DESC=device``)
    around all of this row's calls: the A/B of session 42's opt-in against the host descriptors."""
    from lora_kernels.triton_ops import lora_linear as tri

    base = _ours(prob, "triton", "bitmask", "triton-devdesc")
    x = prob.xs[0].reshape(-1, prob.K)
    if not (tri._tma_ok(x, prob.weight) and (prob.N * x.element_size()) % 16 == 0):
        raise Unavailable("in-kernel descriptors are the TMA kernels' (sm90+, 16-bit x, 16-byte rows)")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _setting(tri, "TMA_DESC", "device"))  # fmt: skip


def _ours_w_kn(prob: Problem) -> Impl:
    """``triton-bitmask`` on a copy of W stored (K, N) (one more W in memory, owned by the row), passed as
    its (N, K) view, as lora_kernels.patch passes a GPT-2 Conv1D layer's weight."""
    from lora_kernels.triton_ops import lora_linear as tri

    w_kn = prob.weight.T.contiguous().T
    w_tma, kn = tri._tma_weight(w_kn)
    if not (kn and tri._tma_ok(prob.xs[0], w_tma)):
        raise Unavailable("the (K, N) weight's own kernels are the TMA path's (sm90+, 16-bit x, 16-byte rows)")
    return _ours(prob, "triton", "bitmask", "triton-kn", weight=w_kn)


@contextlib.contextmanager
def _setting(module: object, name: str, value: object) -> Iterator[None]:
    prev = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, prev)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    prev = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = prev


def _ours_cuda_expand(prob: Problem) -> Impl:
    """``cuda-bitmask`` with LORA_KERNELS_CUDA_CONCAT_K=0 for this row's calls, backward included (the
    extension reads it per call, and at p = 0 the dX GEMM takes the concatenated-K path too)."""
    base = _ours(prob, "cuda", "bitmask", "cuda-expand")
    if prob.device.type == "cuda" and torch.cuda.get_device_capability(prob.device) < (9, 0):
        raise Unavailable("the concatenated-K GEMM is an sm90 path: here cuda-bitmask already runs the expand one")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _env("LORA_KERNELS_CUDA_CONCAT_K", "0"))  # fmt: skip


def _ours_cuda_scalar(prob: Problem) -> Impl:
    """``cuda-bitmask`` with LORA_KERNELS_CUDA_VEC_LOADS=0 for this row's calls, backward included (the
    extension reads it at every low-rank launch)."""
    if prob.dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable("the vector loads are for 16-bit x: with fp32 x cuda-bitmask runs the FMA kernels")
    base = _ours(prob, "cuda", "bitmask", "cuda-scalar")
    return Impl(base.name, base.fn, base.owned, base.flops_fwd, base.flops_fwdbwd,
                scope=lambda: _env("LORA_KERNELS_CUDA_VEC_LOADS", "0"))  # fmt: skip


def build(name: str, prob: Problem) -> Impl:
    """The :class:`Impl` called ``name`` on ``prob``; raises :class:`Unavailable` with a reason."""
    if name == "cublas":
        return _cublas(prob)
    if name == "naive":
        return _naive(prob)
    if name == "compile":
        return _compile(prob)
    if name == "addmm":
        return _addmm(prob)
    if name == "peft":
        return _peft(prob)
    if name == "axolotl":
        return _axolotl(prob)
    if name == "torch":
        return _ours(prob, "torch", "bitmask", name)
    if name == "triton-1pass":
        return _ours_single_pass(prob)
    if name == "cuda-expand":
        return _ours_cuda_expand(prob)
    if name == "cuda-scalar":
        return _ours_cuda_scalar(prob)
    if name == "triton-nosplit":
        return _ours_no_split(prob)
    if name == "triton-flat":
        return _ours_flattened(prob)
    if name == "triton-kn":
        return _ours_w_kn(prob)
    if name == "triton-daseparate":
        return _ours_da_separate(prob)
    if name == "triton-nosplitm":
        return _ours_no_split_m(prob)
    if name == "triton-dx128":
        return _ours_dx128(prob)
    if name == "triton-dy1":
        return _ours_dy1(prob)
    if name == "triton-devdesc":
        return _ours_device_desc(prob)
    if name == "triton-compile":
        return _ours_compiled(prob)
    backend, _, mode = name.partition("-")
    if backend in ("triton", "cuda") and mode in _MASK_MODES:
        if mode == "regen" and prob.p == 0.0:
            raise Unavailable("p = 0: no mask, identical to the bitmask row")
        return _ours(prob, backend, _MASK_MODES[mode], name)
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(ALL_IMPLS)}")
