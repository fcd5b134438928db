"""Fused LoRA linear in Triton: two launches forward, two launches backward.

    y = x Wᵀ + bias + s · (dropout(x) Aᵀ Bᵀ + lora_bias)        x: (M, K), W: (N, K), A: (r, K), B: (N, r)

Forward
  1. ``_shrink_kernel``: T = dropout(x)·Aᵀ / (1-p)  (M, r) fp32, one pass over x; writes the packed
     keep bits (M, ceil(K/8)) uint8 when the mask is kept for backward. Few rows (M below ~3.8 K on
     an H100) split K over SPLIT_K programs per row block, each storing a partial T.
  2. ``_fwd_kernel``: the frozen GEMM x·Wᵀ whose epilogue adds (s·T)·Bᵀ, bias and s·lora_bias
     before the single store of y: no M×N or M×K intermediate is written. With split K the epilogue
     sums the partials in a fixed order (deterministic) and the tiles of the first N block store T.
Backward (deterministic: every sum is added in a fixed order, whichever program finishes first)
  1. ``_bwd_dy_kernel``: programs [0, ⌈M/BM⌉) compute dT = s·dY·B (M, r); the others reduce
     over M for an N-block: dB = s·dYᵀ·T, Σ dY (for dlora_bias and dbias), in fp32 partials over
     row splits when M is long (``_row_splits``). (Opt-in, LORA_KERNELS_DY_PASSES=1: ``_bwd_dy1_kernel``
     computes the same from one read of dY instead of two.)
  2. ``_bwd_dx_kernel``: a few programs first sum launch 1's dB / Σ dY partials; programs for dX tiles
     compute dY·W and add (dT·A) ⊙ mask/(1-p) in the epilogue; the remaining programs reduce over a
     row split for a K-block: dA = dTᵀ·(x ⊙ mask)/(1-p), the last of a K-block's programs to finish
     (an atomic arrival count, the only atomic) summing its partials in split order.
Saved for backward: x (alive anyway), T (M×r fp32) and the bitmask (M·K/8 bytes), or in
"regenerate" mode no mask at all (recomputed from the seed in backward).

The kernels are pointer-based (any strides, any shapes, GPUs without TMA, the CPU interpreter).
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode
from triton.runtime.errors import OutOfResources

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer kernels only
    TensorDescriptor = None

from .. import flops as _flops
from ..backends import device_capability, use_registered_op
from ..reference import dropout_threshold, lora_linear_ref, lora_linear_ref_grads, pack_mask
from . import launch as _plans
from .launch import descriptor as _descriptor
from .launch import launch as _fast_launch
from .philox import computed_once, dropout_mask_bytes, opaque_zero, unpack_bytes

__all__ = [
    "unavailable_reason",
    "lora_linear_2d",
    "lora_fwd",
    "lora_bwd",
    "triton_lora_fwd",
    "triton_lora_bwd",
    "dropout_bitmask",
]

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


# Whether the kernels below are interpreted: fixed when they are defined (triton.jit reads
# TRITON_INTERPRET then), so read once; the launchers ask on every call (tests patch _interpret).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpret() -> bool:
    return _INTERPRET


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are constexpr functions since
# Triton 3.5 and cost ~1-2 µs a call on the host (a dozen calls per forward): plain Python here.
def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b  # also for a SymInt under torch.compile


def _next_pow2(n: int) -> int:
    if isinstance(n, int):
        return 1 << (n - 1).bit_length() if n > 1 else 1
    return triton.next_power_of_2(n)  # a SymInt (torch.compile, dynamic shapes)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

# Elements per tile of the backward's sums of the dB / Σ dY row-split partials (``_sum_db_splits``).
_RED_BLOCK = tl.constexpr(1024)
# The largest (BLOCK_M, BLOCK_K) dX tile whose dropout epilogue runs whole; wider ones run it in column halves
# (``_bwd_dx_tma_kernel``, ``_dx_halves``).
_DX_WHOLE_TILE = tl.constexpr(128 * 128)
# The dA arrival counters (``_sum_when_last``), one per K-block: ⌈K/16⌉ covers every tile width (≥ 16).
_CNT_COLS = 16
# Whether the bitmask store's offsets go through ``_unaligned``: Triton 3.6 (the GPU image's) computed the mask's
# Philox twice without it; 3.8 converts the bytes instead, where ``_unaligned`` makes the store cost more (SASS of
# the shrink's loop at p > 0: 1124 instructions against 1062). 3.7 is unchecked and treated as 3.6.
_UNALIGNED_BITS = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8))


@triton.jit
def _load_cast(ptrs, mask, CDT: tl.constexpr):
    # Loads in the storage dtype, converts to the compute dtype right away (fp32 adapters under a
    # bf16 base, and the interpreter's bf16 upcast, both land here).
    return tl.load(ptrs, mask=mask, other=0.0).to(CDT)


@triton.jit
def _mask_and(mask, cond):
    """``mask & cond`` for a block mask and a scalar condition, as a load or store takes it. The ``!= 0`` (an
    ``i1`` compare with false, which the compiler folds away) is for Triton 3.9's interpreter: its broadcast of a
    scalar bool keeps int32 data, and 3.9's loads refuse an int32 mask (3.6 and 3.8 took it as nonzero)."""
    return (mask & cond) != 0


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-blocks run together and share the W tiles in L2.
    num_in_group = GROUP_M * num_pid_n
    first_m = (tile_id // num_in_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % num_in_group) % group_size
    pid_n = (tile_id % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _first_at_least(pid, start, STEP):
    """The first of pid, pid + STEP, pid + 2·STEP, ... that is ≥ start (0 ≤ pid < STEP and start ≥ 0, so
    the division's numerator is never negative: C's and Python's rounding agree)."""
    return pid + (start - pid + STEP - 1) // STEP * STEP


@triton.jit
def _keep_block(BITS, stride_bm, offs_m, k_start, M, K, seed_lo, seed_hi, threshold,
                LOAD_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONCE: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_K) keep-mask of columns k_start + [0, BLOCK_K): gathered from the saved
    bitmask, or regenerated from the seed (k_start is a multiple of 8), with ONCE through ``computed_once``
    (epilogues, outside any pipelined loop)."""
    G: tl.constexpr = BLOCK_K // 8
    if LOAD_BITS:
        # One load per byte (BLOCK_M, BLOCK_K/8), unpacked in registers as the regenerated bytes are: an
        # element-wise gather of each column's byte took 8× the loads (eight lanes per byte) and, measured
        # on an H200 (bench/NOTES.md, session 28), made the backward's dropout cost ~1 ms at 8192×4096.
        # Bits of columns ≥ K (the last byte's tail) multiply x or dT·A columns that are masked to 0 or
        # never stored.
        offs_g = k_start // 8 + tl.arange(0, G)
        rm = offs_m.to(tl.int64)
        mask = (offs_m < M)[:, None] & (offs_g < tl.cdiv(K, 8))[None, :]
        byte = tl.load(BITS + rm[:, None] * stride_bm + offs_g[None, :], mask=mask, other=0).to(tl.int32)
    else:
        byte = dropout_mask_bytes(seed_lo, seed_hi, offs_m, k_start // 8, threshold, BLOCK_M, G)
        if ONCE:
            byte = computed_once(byte, threshold)
    return unpack_bytes(byte, BLOCK_M, BLOCK_K)


@triton.jit
def _fwd_epilogue(acc, BIAS, T, T_OUT, LB, LBIAS, offs_m, offs_n, M, N, R, stride_tm, stride_ts, stride_lbn,
                  stride_lbr, scaling, store_t,
                  HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    """acc (BM, BN) += (s·T)·Bᵀ + bias + s·lora_bias: one small extra MMA on the accumulator.

    SPLIT_K > 1: T holds SPLIT_K partials (stride_ts apart), summed here in a fixed order; where
    ``store_t`` (the tiles of the first N block) the sum goes to T_OUT, the T saved for backward."""
    rm = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    t_mask = (offs_m < M)[:, None] & (offs_r < R)[None, :]
    t_ptrs = T + rm[:, None] * stride_tm + offs_r[None, :]
    t = tl.load(t_ptrs, mask=t_mask, other=0.0)
    if SPLIT_K > 1:
        ts = tl.cast(stride_ts, tl.int64)  # SPLIT_K·M·r may pass 2³¹ (int32 product otherwise)
        for i in tl.static_range(1, SPLIT_K):
            t += tl.load(t_ptrs + i * ts, mask=t_mask, other=0.0)
        if store_t:
            tl.store(T_OUT + rm[:, None] * stride_tm + offs_r[None, :], t, mask=t_mask)
    return _fwd_epilogue_t(acc, t, BIAS, LB, LBIAS, offs_n, N, R, stride_lbn, stride_lbr, scaling,
                           HAS_BIAS, HAS_LBIAS, CDT, IEEE, BLOCK_R)  # fmt: skip


@triton.jit
def _fwd_epilogue_t(acc, t, BIAS, LB, LBIAS, offs_n, N, R, stride_lbn, stride_lbr, scaling,
                    HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_R: tl.constexpr):  # fmt: skip
    """The epilogue with T (BM, BLOCK_R) fp32 already in registers (the single-pass forward)."""
    rn = offs_n.to(tl.int64)
    n_ok = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    b = _load_cast(LB + rn[None, :] * stride_lbn + offs_r[:, None] * stride_lbr, r_ok[:, None] & n_ok[None, :], CDT)
    acc = _mma((t * scaling).to(CDT), b, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LBIAS:
        acc += scaling * tl.load(LBIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dx_epilogue(acc, DT, A, BITS, offs_m, k_start, M, K, R, stride_dtm, stride_ar, stride_ak, stride_bm,
                 seed_lo, seed_hi, threshold, keep_scale,
                 HAS_DROPOUT: tl.constexpr, LOAD_BITS: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ONCE: tl.constexpr):  # fmt: skip
    """acc (BM, BK) += (dT·A) ⊙ keep · keep_scale: the low-rank part of dX for columns k_start + [0, BK);
    ONCE: a regenerated mask through ``computed_once`` (False where the epilogue is in a flattened loop).

    dT·A runs over the rank in steps of at most 64, each loading its dT columns and A rows: a whole
    (128, 256) fp32 dT tile is 128 registers a thread at 8 warps, and beside the accumulators it spilled
    (0.2–0.7 KB at rank 256). A loop, not unrolled: unrolled, the compiler hoisted every step's loads above
    the dots and spilled again. The steps continue one fp32 accumulator in the dot's own k order; without
    dropout that is ``acc`` itself (no second (BM, BK) accumulator: 2–10 registers fewer up to rank 64)."""
    rm = offs_m.to(tl.int64)
    m_ok = offs_m < M
    offs_k = k_start + tl.arange(0, BLOCK_K)
    rk = offs_k.to(tl.int64)
    k_ok = offs_k < K
    R_STEP: tl.constexpr = 64 if BLOCK_R > 64 else BLOCK_R
    if HAS_DROPOUT:
        lo = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    else:
        lo = acc
    for r0 in range(0, BLOCK_R, R_STEP):
        offs_r = r0 + tl.arange(0, R_STEP)
        r_ok = offs_r < R
        dt = tl.load(DT + rm[:, None] * stride_dtm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        a = _load_cast(A + offs_r[:, None] * stride_ar + rk[None, :] * stride_ak, r_ok[:, None] & k_ok[None, :], CDT)
        lo = _mma(dt.to(CDT), a, lo, IEEE)
    if HAS_DROPOUT:
        return _dx_masked_add(acc, lo, BITS, offs_m, k_start, M, K, stride_bm, seed_lo, seed_hi, threshold,
                              keep_scale, LOAD_BITS, BLOCK_M, BLOCK_K, ONCE)  # fmt: skip
    return lo


@triton.jit
def _dx_masked_add(acc, lo, BITS, offs_m, k_start, M, K, stride_bm, seed_lo, seed_hi, threshold, keep_scale,
                   LOAD_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   ONCE: tl.constexpr):  # fmt: skip
    """acc + lo ⊙ keep · keep_scale, keep being the dropout mask of rows offs_m, columns k_start + [0, BK)."""
    keep = _keep_block(BITS, stride_bm, offs_m, k_start, M, K, seed_lo, seed_hi, threshold,
                       LOAD_BITS, BLOCK_M, BLOCK_K, ONCE)  # fmt: skip
    return acc + tl.where(keep, lo * keep_scale, 0.0)


@triton.jit
def _dx_epilogue_t(acc, dt, A, BITS, offs_m, k_start, M, K, R, stride_ar, stride_ak, stride_bm,
                   seed_lo, seed_hi, threshold, keep_scale,
                   HAS_DROPOUT: tl.constexpr, LOAD_BITS: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   ONCE: tl.constexpr):  # fmt: skip
    """The dX epilogue with dT (BM, BLOCK_R) fp32 already in registers (the single-pass backward)."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    rk = offs_k.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    a = _load_cast(
        A + offs_r[:, None] * stride_ar + rk[None, :] * stride_ak, r_ok[:, None] & (offs_k < K)[None, :], CDT
    )
    if HAS_DROPOUT:
        lo = _mma(dt.to(CDT), a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), IEEE)
        return _dx_masked_add(acc, lo, BITS, offs_m, k_start, M, K, stride_bm, seed_lo, seed_hi, threshold,
                              keep_scale, LOAD_BITS, BLOCK_M, BLOCK_K, ONCE)  # fmt: skip
    return _mma(dt.to(CDT), a, acc, IEEE)


@triton.jit
def _split_rows(pid_s, SPLIT_M, M, BLOCK_M: tl.constexpr):
    """Rows [m_lo, m_hi) of split pid_s of SPLIT_M: ⌈M/SPLIT_M⌉ rounded up to BLOCK_M each, so the last splits
    may be short or empty (m_lo ≥ m_hi)."""
    chunk = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    m_lo = pid_s * chunk
    return m_lo, tl.minimum(m_lo + chunk, M)


@triton.jit
def _da_block(pid_k, pid_s, SPLIT_M, X, DT, BITS, DA, DA_OUT, CNT, M, K, R, stride_xm, stride_xk, stride_dtm,
              stride_bm, stride_dar, stride_das, seed_lo, seed_hi, threshold, keep_scale,
              HAS_DROPOUT: tl.constexpr, LOAD_BITS: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Partial ``pid_s`` of dA[:, K-block] = dTᵀ·(x ⊙ keep)·keep_scale: the rows of split pid_s of SPLIT_M
    (⌈M/SPLIT_M⌉ rounded up to BLOCK_M; an empty split stores zeros), stored at DA + pid_s·stride_das.
    With SPLIT_M > 1 the last of the K-block's programs to finish (counted in CNT[pid_k], zero on entry)
    sums the block's partials into DA_OUT; with one split DA is the output."""
    m_lo, m_hi = _split_rows(pid_s, SPLIT_M, M, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rk = offs_k.to(tl.int64)
    k_ok = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        m_ok = offs_m < M
        x = _load_cast(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk, m_ok[:, None] & k_ok[None, :], CDT)
        if HAS_DROPOUT:  # (ONCE False: a pipelined loop, see computed_once; this layout holds a byte a thread)
            keep = _keep_block(BITS, stride_bm, offs_m, pid_k * BLOCK_K, M, K, seed_lo, seed_hi, threshold,
                               LOAD_BITS, BLOCK_M, BLOCK_K, False)  # fmt: skip
            x = tl.where(keep, x, 0.0)
        # dTᵀ tile loaded directly as (BLOCK_R, BLOCK_M).
        dtt = tl.load(DT + rm[None, :] * stride_dtm + offs_r[:, None], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        acc = _mma(dtt.to(CDT), x, acc, IEEE)
    tile = offs_r[:, None] * stride_dar + rk[None, :]
    tl.store(DA + pid_s * stride_das + tile, acc * keep_scale, mask=r_ok[:, None] & k_ok[None, :])
    if SPLIT_M > 1:
        _sum_when_last(CNT + pid_k, SPLIT_M, DA + tile, stride_das, DA_OUT + tile, r_ok[:, None] & k_ok[None, :],
                       BLOCK_R, BLOCK_K)  # fmt: skip


@triton.jit
def _last_to_arrive(CNT, ARRIVALS):
    """Count this program's arrival at CNT (an int32, zero before the first of ARRIVALS arrivals): whether it is
    the last. The barrier makes the whole program's stores before it visible before the release of its arrival
    (acq_rel, GPU scope); the last program's acquire then sees the others' stores (read them past L1: .cg). The
    last re-arms CNT to zero (``tl.atomic_xchg``) once it has read what it sums."""
    tl.debug_barrier()
    arrived = tl.atomic_add(CNT, 1, sem="acq_rel")
    return arrived == ARRIVALS - 1


@triton.jit
def _sum_when_last(CNT, SPLITS, PART, stride_s, OUT, mask, B0: tl.constexpr, B1: tl.constexpr):
    """Called by each of the SPLITS programs that stored a (B0, B1) partial at PART + s·stride_s: the last
    to arrive (CNT, an int32 that is zero before the first arrival, ``_last_to_arrive``) stores the sum of all
    SPLITS partials at OUT, added in split order whichever program is last (deterministic), and re-arms CNT to
    zero, so a repeated launch (the autotuner's timing runs) finds it as the first one did."""
    if _last_to_arrive(CNT, SPLITS):
        tot = tl.zeros((B0, B1), dtype=tl.float32)
        for s in range(0, SPLITS):
            tot += tl.load(PART + s * stride_s, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(OUT, tot, mask=mask)
        tl.atomic_xchg(CNT, 0, sem="relaxed")


@triton.jit
def _sum_db_splits(tile, DBP, CSP, DB, CS, N, R, SPLITS, BLOCK: tl.constexpr):
    """Tile ``tile`` of the sums over SPLITS row splits of the dY kernel's fp32 partials of dB (contiguous
    (SPLITS, N, r)) and Σ dY ((SPLITS, N)): elements [0, N·r) of the tiles are dB's, the next N Σ dY's; each
    element added in split order (deterministic). The partials come from the previous launch (stream order)."""
    nr = N * R
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    in_db = offs < nr
    in_cs = (offs >= nr) & (offs < nr + N)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(DBP + s * nr + offs, mask=in_db, other=0.0)
        acc += tl.load(CSP + s * N + (offs - nr), mask=in_cs, other=0.0)
    tl.store(DB + offs, acc, mask=in_db)
    tl.store(CS + (offs - nr), acc, mask=in_cs)


@triton.jit
def _unaligned(offs, threshold):
    """``offs`` plus ``opaque_zero(threshold)``: 0, but of no alignment the compiler can prove. Used for the
    bitmask store's byte offsets: proven 16-aligned, Triton's coalescing gives that store 8 bytes a thread, a
    layout other than the one the bytes are unpacked in for the x tile (one byte a thread), and for a value
    wanted in two layouts Triton 3.6 computes its whole chain twice rather than convert it: every Philox round
    ran twice per tile. Unaligned, the store takes one byte a thread, the unpack's layout: one Philox (the
    shrink's loop at p > 0 on sm_90: 1708 → 1092 instructions a K step; bench/NOTES.md, session 34). The store
    was one STG.U8 per byte before too. Under Triton ≥ 3.8 (``_UNALIGNED_BITS``), which converts instead,
    ``offs`` as it is."""
    if _UNALIGNED_BITS:  # (an assignment, not an early return: Triton goes on past a return under a constexpr if)
        offs = offs + opaque_zero(threshold)
    return offs


@triton.jit
def _shrink_step(acc, x, A, BITS, offs_m, k0, M, K, R, stride_ar, stride_ak, stride_bm, seed_lo, seed_hi, threshold,
                 HAS_DROPOUT: tl.constexpr, STORE_BITS: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """acc (BM, BLOCK_R) += (x ⊙ keep)·Aᵀ for the x tile (BM, BK) of columns k0 + [0, BK), storing its
    keep bits when STORE_BITS. Shared by the shrink kernel and the single-pass forward."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    rk = offs_k.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    if HAS_DROPOUT:
        # One Philox call per 8 columns; the same bytes are stored for backward.
        G: tl.constexpr = BLOCK_K // 8
        byte = dropout_mask_bytes(seed_lo, seed_hi, offs_m, k0 // 8, threshold, BLOCK_M, G)
        if STORE_BITS:
            offs_g = k0 // 8 + tl.arange(0, G)
            # Bits of columns past K are stored as 0 (the layout of reference.pack_mask).
            n_valid = tl.minimum(tl.maximum(K - offs_g * 8, 0), 8)
            tl.store(
                BITS + offs_m.to(tl.int64)[:, None] * stride_bm + _unaligned(offs_g, threshold)[None, :],
                (byte & ((1 << n_valid) - 1)[None, :]).to(tl.uint8),
                mask=(offs_m < M)[:, None] & (offs_g < tl.cdiv(K, 8))[None, :],
            )
        x = tl.where(unpack_bytes(byte, BLOCK_M, BLOCK_K), x, 0.0)
    a_mask = (offs_k < K)[:, None] & (offs_r < R)[None, :]
    a = _load_cast(A + offs_r[None, :] * stride_ar + rk[:, None] * stride_ak, a_mask, CDT)  # Aᵀ tile
    return _mma(x, a, acc, IEEE)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _shrink_kernel(
    X, A, T, BITS,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_ts, stride_bm,
    seed_lo, seed_hi, threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, STORE_BITS: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """T[m, :] = (x[m, :] ⊙ keep[m, :]) · Aᵀ · keep_scale for a block of BLOCK_M rows; with SPLIT_K > 1,
    program (i, j) stores the partial over the j-th of SPLIT_K column ranges (whole BLOCK_K steps, so
    each range owns whole bytes of the bitmask) at T + j·stride_ts."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        pid_k = tl.program_id(1)
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
        T += pid_k.to(tl.int64) * stride_ts
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = m_ok[:, None] & (offs_k < K)[None, :]
        x = _load_cast(X + rm[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk, x_mask, CDT)
        acc = _shrink_step(acc, x, A, BITS, offs_m, k0, M, K, R, stride_ar, stride_ak, stride_bm,
                           seed_lo, seed_hi, threshold, HAS_DROPOUT, STORE_BITS, CDT, IEEE,
                           BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
    t_mask = m_ok[:, None] & (offs_r < R)[None, :]
    tl.store(T + rm[:, None] * stride_tm + offs_r[None, :], acc * keep_scale, mask=t_mask)


@triton.jit
def _fwd_kernel(
    X, W, BIAS, T, T_OUT, LB, LBIAS, Y,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_ts, stride_lbn, stride_lbr, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """Pointer path: y = x·Wᵀ + bias + (s·T)·Bᵀ + s·lora_bias for one (BLOCK_M, BLOCK_N) tile."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rk = offs_k.to(tl.int64)
        k_ok = offs_k < K
        x = _load_cast(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk, m_ok[:, None] & k_ok[None, :], CDT)
        w = _load_cast(W + rn[None, :] * stride_wn + rk[:, None] * stride_wk, k_ok[:, None] & n_ok[None, :], CDT)
        acc = _mma(x, w, acc, IEEE)
    acc = _fwd_epilogue(acc, BIAS, T, T_OUT, LB, LBIAS, offs_m, offs_n, M, N, R, stride_tm, stride_ts, stride_lbn,
                        stride_lbr, scaling, pid_n == 0, HAS_BIAS, HAS_LBIAS, CDT, IEEE, BLOCK_R,
                        SPLIT_K)  # fmt: skip
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


@triton.jit
def _x_dot_wt(acc, x, w_desc, off_n, k0, CDT: tl.constexpr, W_KN: tl.constexpr):
    """acc (BM, BN) += x (BM, BK) · W[off_n :, k0 :]ᵀ, the W tile read by TMA in the layout W is stored in:
    (BK, BN) tiles of the (K, N) matrix go to the dot as loaded (wgmma's MN-major operand, no copy)."""
    # if/else, not an early return: Triton's compiler goes on past a return under a constexpr if.
    if W_KN:
        acc = tl.dot(x, w_desc.load([k0, off_n]).to(CDT), acc)
    else:
        acc = tl.dot(x, w_desc.load([off_n, k0]).to(CDT).T, acc)
    return acc


@triton.jit
def _dy_dot_w(acc, dy, w_desc, n0, off_k, CDT: tl.constexpr, W_KN: tl.constexpr):
    """acc (BM, BK) += dY (BM, BN) · W[n0 :, off_k :], W read as stored (see ``_x_dot_wt``)."""
    if W_KN:
        acc = tl.dot(dy, w_desc.load([off_k, n0]).to(CDT).T, acc)
    else:
        acc = tl.dot(dy, w_desc.load([n0, off_k]).to(CDT), acc)
    return acc


@triton.jit
def _w_device_desc(w, N, K, row_stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_KN: tl.constexpr):
    """An in-kernel TMA descriptor of the weight as it is stored: (BLOCK_N, BLOCK_K) tiles of the (N, K)
    matrix, or (BLOCK_K, BLOCK_N) tiles of the (K, N) one (W_KN: GPT-2's Conv1D, PEFT's fan_in_fan_out)."""
    if W_KN:
        desc = tl.make_tensor_descriptor(w, [K, N], [row_stride_w, 1], [BLOCK_K, BLOCK_N])
    else:
        desc = tl.make_tensor_descriptor(w, [N, K], [row_stride_w, 1], [BLOCK_N, BLOCK_K])
    return desc


@triton.jit
def _fwd_tma_kernel(
    x_desc, w_desc, y_desc, BIAS, T, T_OUT, LB, LBIAS,
    M, N, K, R, M_BUCKET,
    stride_tm, stride_ts, stride_lbn, stride_lbr, row_stride_x, row_stride_w, row_stride_y,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, CDT: tl.constexpr, OUT_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, SPLIT_K: tl.constexpr, DEVICE_DESC: tl.constexpr,
    FLATTEN: tl.constexpr, W_KN: tl.constexpr, SPLIT_STORE: tl.constexpr,
):  # fmt: skip
    """Hopper path: persistent grid of NUM_SMS programs walking the output tiles; x and W tiles
    arrive by TMA (tensor descriptors, out-of-bounds zero-filled), y leaves by a TMA store.
    On H100 this GEMM shape measured 0.93–1.04× cuBLAS, the pointer one 1.23–1.28× (ANCHORS.md).

    DEVICE_DESC: x_desc, w_desc, y_desc are plain tensors (row strides row_stride_*) and the
    descriptors are built here: under torch.compile, torch sees the writes through in-kernel
    descriptors but not through host-built ones (it would drop the kernel, bench/NOTES.md).

    FLATTEN: the tile loop and the K loop compiled as one (``tl.range(flatten=True)``), so the next
    tile's first TMA loads are issued before this tile's epilogue (``TMA_FLATTEN``, eager launches).
    The epilogue's T and lora_B loads are then multi-buffered, so y is stored in two
    (BLOCK_M, BLOCK_N / 2) halves (y_desc's block): half the staging buffer, 32 KB at 128×256.
    SPLIT_STORE (a tuning config's; False for the fixed tiles) stores the halves unflattened: room for a
    fourth stage of 128×256×64 tiles (224 KiB at rank 16).

    W_KN: the weight is stored (K, N) row-major (``weight`` an (N, K) view with unit stride along N:
    GPT-2's Conv1D, PEFT's fan_in_fan_out) and w_desc describes that (K, N) matrix with (BLOCK_K,
    BLOCK_N) tiles; wgmma reads either major order of a 16-bit operand from shared memory, so the
    tiles go to the dot as loaded, without a copy of W."""
    HALVES: tl.constexpr = FLATTEN or SPLIT_STORE
    if DEVICE_DESC:
        x_desc = tl.make_tensor_descriptor(x_desc, [M, K], [row_stride_x, 1], [BLOCK_M, BLOCK_K])
        w_desc = _w_device_desc(w_desc, N, K, row_stride_w, BLOCK_N, BLOCK_K, W_KN)
        if HALVES:
            y_desc = tl.make_tensor_descriptor(y_desc, [M, N], [row_stride_y, 1], [BLOCK_M, BLOCK_N // 2])
        else:
            y_desc = tl.make_tensor_descriptor(y_desc, [M, N], [row_stride_y, 1], [BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = _x_dot_wt(acc, x_desc.load([off_m, k0]).to(CDT), w_desc, off_n, k0, CDT, W_KN)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc = _fwd_epilogue(acc, BIAS, T, T_OUT, LB, LBIAS, offs_m, offs_n, M, N, R, stride_tm, stride_ts,
                            stride_lbn, stride_lbr, scaling, pid_n == 0, HAS_BIAS, HAS_LBIAS, CDT, False, BLOCK_R,
                            SPLIT_K)  # fmt: skip
        if HALVES:
            y0, y1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            y_desc.store([off_m, off_n], y0.to(OUT_DT))
            y_desc.store([off_m, off_n + BLOCK_N // 2], y1.to(OUT_DT))
        else:
            y_desc.store([off_m, off_n], acc.to(OUT_DT))


@triton.jit
def _split_n_block(pid_s, SPLIT_M, M, pid_n, N, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):  # fmt: skip
    """The rows [m_lo, m_hi) of row split pid_s (``_split_rows``), the rank columns (offsets, in bounds) and the
    BLOCK_N columns of N-block pid_n (int64 offsets, in bounds) of a program reducing dY down a split."""
    m_lo, m_hi = _split_rows(pid_s, SPLIT_M, M, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return m_lo, m_hi, offs_r, offs_r < R, offs_n.to(tl.int64), offs_n < N


@triton.jit
def _db_block(pid_n, pid_s, SPLIT_M, DY, T, DB, DSUM, M, N, R, stride_dym, stride_dyn, stride_tm, stride_dbn,
              stride_dbs, stride_dss, scaling, CDT: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Partial ``pid_s`` of dB[N-block] = s·dYᵀ·T and of Σ_m dY: the rows of split pid_s of SPLIT_M (as in
    ``_da_block``), stored at DB + pid_s·stride_dbs and DSUM + pid_s·stride_dss."""
    m_lo, m_hi, offs_r, r_ok, rn, n_ok = _split_n_block(pid_s, SPLIT_M, M, pid_n, N, R, BLOCK_M, BLOCK_N, BLOCK_R)
    acc_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        m_ok = offs_m < M
        # dYᵀ tile loaded directly as (BLOCK_N, BLOCK_M).
        dyt = _load_cast(DY + rm[None, :] * stride_dym + rn[:, None] * stride_dyn, n_ok[:, None] & m_ok[None, :], CDT)
        t = tl.load(T + rm[:, None] * stride_tm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc_db = _mma(dyt, t.to(CDT), acc_db, IEEE)
        colsum += tl.sum(dyt.to(tl.float32), axis=1)
    tl.store(
        DB + pid_s * stride_dbs + rn[:, None] * stride_dbn + offs_r[None, :],
        acc_db * scaling,
        mask=n_ok[:, None] & r_ok[None, :],
    )
    tl.store(DSUM + pid_s * stride_dss + rn, colsum, mask=n_ok)


@triton.jit(do_not_specialize=["SPLIT_M", "NUM_CNT"])
def _bwd_dy_kernel(
    DY, LB, T, DT, DB, DSUM, CNT,
    M, N, R, M_BUCKET, SPLIT_M, NUM_CNT,
    stride_dym, stride_dyn, stride_lbn, stride_lbr, stride_tm, stride_dtm, stride_dbn, stride_dbs, stride_dss,
    scaling,
    DO_DT: tl.constexpr, DO_DB: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Role 1 (first ⌈M/BM⌉ programs, if DO_DT): dT = s·dY·B.  Role 2 (the rest, if DO_DB: ⌈N/BN⌉·SPLIT_M
    programs): partials of dB = s·dYᵀ·T and Σ_m dY over SPLIT_M row splits. The grid holds the programs of
    the roles switched on. Program 0 also zeroes the NUM_CNT int32 counters at CNT that the dX kernel's dA
    programs count their arrivals in (``_sum_when_last``): this launch precedes that one on the stream."""
    pid = tl.program_id(0)
    if pid == 0:
        for c0 in range(0, NUM_CNT, 1024):
            offs_c = c0 + tl.arange(0, 1024)
            tl.store(CNT + offs_c, tl.zeros((1024,), dtype=tl.int32), mask=offs_c < NUM_CNT)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    num_pid_m = 0
    if DO_DT:
        num_pid_m = tl.cdiv(M, BLOCK_M)
    if pid < num_pid_m:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rn = offs_n.to(tl.int64)
            n_ok = offs_n < N
            dy = _load_cast(
                DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, m_ok[:, None] & n_ok[None, :], CDT
            )
            b = _load_cast(
                LB + rn[:, None] * stride_lbn + offs_r[None, :] * stride_lbr, n_ok[:, None] & r_ok[None, :], CDT
            )
            acc = _mma(dy, b, acc, IEEE)
        tl.store(DT + rm[:, None] * stride_dtm + offs_r[None, :], acc * scaling, mask=m_ok[:, None] & r_ok[None, :])
    elif DO_DB:  # (a constexpr: without it the dB code is not compiled in, nor its registers)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        _db_block((pid - num_pid_m) % num_pid_n, (pid - num_pid_m) // num_pid_n, SPLIT_M, DY, T, DB, DSUM, M, N, R,
                  stride_dym, stride_dyn, stride_tm, stride_dbn, stride_dbs, stride_dss, scaling,
                  CDT, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _dy1_tiles(DY, T, m0, m_hi, rn, n_ok, offs_r, r_ok, stride_dym, stride_dyn, stride_tm, CDT: tl.constexpr,
               BLOCK_M: tl.constexpr):  # fmt: skip
    """The (BLOCK_M, BLOCK_N) dY tile and (BLOCK_M, BLOCK_R) T tile of rows [m0, m0 + BLOCK_M) ∩ [.., m_hi) (the
    rest zeros: past the split, nothing is read)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rm = offs_m.to(tl.int64)
    m_ok = offs_m < m_hi
    dy = _load_cast(DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, m_ok[:, None] & n_ok[None, :], CDT)
    t = tl.load(T + rm[:, None] * stride_tm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    return dy, t


@triton.jit
def _sum_dt_partials(DTP, DT, tile, ok, PARTS, stride_dtps, scaling, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """DT[tile] = scaling · Σ_j DTP[j][tile] over the PARTS fp32 partials, four loads in flight at a time (from L2:
    .cg, past the L1 that may hold none of them but must not serve a stale line), added in a fixed order."""
    tot = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # In 64 bits: j·stride passes 2**31 once the partials do (⌈N/256⌉·M·r elements: M ≥ 2.4 M rows at N = 14336).
    step = tl.cast(stride_dtps, tl.int64)
    for j in range(0, PARTS, 4):
        ptrs = DTP + j * step + tile
        p0 = tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")
        p1 = tl.load(ptrs + step, mask=_mask_and(ok, j + 1 < PARTS), other=0.0, cache_modifier=".cg")
        p2 = tl.load(ptrs + 2 * step, mask=_mask_and(ok, j + 2 < PARTS), other=0.0, cache_modifier=".cg")
        p3 = tl.load(ptrs + 3 * step, mask=_mask_and(ok, j + 3 < PARTS), other=0.0, cache_modifier=".cg")
        tot += (p0 + p1) + (p2 + p3)
    tl.store(DT + tile, tot * scaling, mask=ok)


@triton.jit(do_not_specialize=["SPLIT_M", "NUM_CNT"])
def _bwd_dy1_kernel(
    DY, LB, T, DTP, DT, DB, DSUM, CNT, CNT_DX,
    M, N, R, M_BUCKET, SPLIT_M, NUM_CNT,
    stride_dym, stride_dyn, stride_lbn, stride_lbr, stride_tm, stride_dtps, stride_dtm, stride_dbn, stride_dbs,
    stride_dss, scaling,
    CDT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """dT = s·dY·B, and the partials of dB = s·dYᵀ·T and Σ_m dY over SPLIT_M row splits, from one read of dY
    (``_bwd_dy_kernel`` reads it twice, once per reduction). Program (pid_s, pid_n), pid_n fastest: the rows of
    split pid_s (``_split_rows``) × the BLOCK_N columns of N-block pid_n. It keeps its block's B tile and dB / Σ dY
    accumulators in registers down its rows, as ``_db_block`` does, and stores the dT of each row block over its
    columns, a partial over N, at DTP + pid_n·stride_dtps (fp32). The last of the ⌈N/BLOCK_N⌉ programs to arrive at
    a row block (counted in CNT[m0 / BLOCK_M], zero on entry, re-armed after) sums its dT partials in N-block order
    (deterministic) into DT, there and then: the sums spread over the programs and the loop, rather than a split's
    all falling to its last program after it (at 8192×4096→14336, 5 splits: 5.9 MB of partials each, on one SM).
    With one N-block the dT goes to DT directly. The arrivals' barrier keeps Triton (3.6, 3.8) from pipelining the
    loop: it loads the next row block's tiles a step ahead by hand.
    Bytes: M·N·2 of dY read once, plus ⌈N/BLOCK_N⌉·M·r·4 of dT partials (written, then read back from L2) and
    SPLIT_M·N·r·4 of dB partials: at r = 16, BLOCK_N = 256, 2r/BLOCK_N = 12 % of the read of dY that it saves.
    Program 0 also zeroes the dX kernel's NUM_CNT counters at CNT_DX, as ``_bwd_dy_kernel`` does."""
    pid = tl.program_id(0)
    if pid == 0:
        for c0 in range(0, NUM_CNT, 1024):
            offs_c = c0 + tl.arange(0, 1024)
            tl.store(CNT_DX + offs_c, tl.zeros((1024,), dtype=tl.int32), mask=offs_c < NUM_CNT)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_pid_n
    pid_s = pid // num_pid_n
    m_lo, m_hi, offs_r, r_ok, rn, n_ok = _split_n_block(pid_s, SPLIT_M, M, pid_n, N, R, BLOCK_M, BLOCK_N, BLOCK_R)
    b = _load_cast(LB + rn[:, None] * stride_lbn + offs_r[None, :] * stride_lbr, n_ok[:, None] & r_ok[None, :], CDT)
    acc_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # The loop holds a barrier and an atomic (the arrivals), which Triton's pipeliner (3.6, 3.8) does not take: the
    # next row block's dY and T are loaded by hand a step ahead, so their reads fly during this step's work.
    dy, t = _dy1_tiles(DY, T, m_lo, m_hi, rn, n_ok, offs_r, r_ok, stride_dym, stride_dyn, stride_tm, CDT, BLOCK_M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        dy_next, t_next = _dy1_tiles(DY, T, m0 + BLOCK_M, m_hi, rn, n_ok, offs_r, r_ok, stride_dym, stride_dyn,
                                     stride_tm, CDT, BLOCK_M)  # fmt: skip
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        m_ok = offs_m < M
        dt = _mma(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), IEEE)
        tile = rm[:, None] * stride_dtm + offs_r[None, :]
        ok = m_ok[:, None] & r_ok[None, :]
        if num_pid_n == 1:
            tl.store(DT + tile, dt * scaling, mask=ok)
        else:
            tl.store(DTP + pid_n.to(tl.int64) * stride_dtps + tile, dt, mask=ok)  # (64 bits: _sum_dt_partials)
            if _last_to_arrive(CNT + m0 // BLOCK_M, num_pid_n):
                _sum_dt_partials(DTP, DT, tile, ok, num_pid_n, stride_dtps, scaling, BLOCK_M, BLOCK_R)
                tl.atomic_xchg(CNT + m0 // BLOCK_M, 0, sem="relaxed")
        acc_db = _mma(tl.trans(dy), t.to(CDT), acc_db, IEEE)
        colsum += tl.sum(dy.to(tl.float32), axis=0)
        dy, t = dy_next, t_next
    tl.store(
        DB + pid_s * stride_dbs + rn[:, None] * stride_dbn + offs_r[None, :],
        acc_db * scaling,
        mask=n_ok[:, None] & r_ok[None, :],
    )
    tl.store(DSUM + pid_s * stride_dss + rn, colsum, mask=n_ok)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold", "SPLIT_M", "DB_SPLITS", "RED_TILES"])
def _bwd_dx_kernel(
    DY, W, DT, A, X, BITS, DX, DA, DA_OUT, CNT, DBP, CSP, DB, CS,
    M, N, K, R, M_BUCKET, SPLIT_M, DB_SPLITS, RED_TILES,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dtm, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_bm, stride_dxm, stride_dxk, stride_dar, stride_das,
    seed_lo, seed_hi, threshold, keep_scale,
    DO_DX: tl.constexpr, DO_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOAD_BITS: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Pointer path. Programs [0, RED_TILES): the sums of the dY kernel's DB_SPLITS partials of dB and Σ dY
    (``_sum_db_splits``); the next ⌈K/BK⌉·SPLIT_M (if DO_DA): a dA partial for a K-block and a row split (long
    reductions first), the last of each K-block summing them (``_da_block``); the rest (if DO_DX): one dX
    tile each, dY·W plus the low-rank epilogue. Two launches in all for the backward, no sums after."""
    pid = tl.program_id(0)
    num_da = 0
    num_pid_k = tl.cdiv(K, BLOCK_K)
    if DO_DA:
        num_da = num_pid_k * SPLIT_M
    if pid < RED_TILES:
        _sum_db_splits(pid, DBP, CSP, DB, CS, N, R, DB_SPLITS, _RED_BLOCK)
    elif pid - RED_TILES < num_da:
        pid_da = pid - RED_TILES
        _da_block(pid_da % num_pid_k, pid_da // num_pid_k, SPLIT_M, X, DT, BITS, DA, DA_OUT, CNT, M, K, R,
                  stride_xm, stride_xk, stride_dtm, stride_bm, stride_dar, stride_das, seed_lo, seed_hi, threshold,
                  keep_scale, HAS_DROPOUT, LOAD_BITS, CDT, IEEE, BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
    elif DO_DX:
        pid_m, pid_k = _tile_ids(pid - RED_TILES - num_da, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rm = offs_m.to(tl.int64)
        rk = offs_k.to(tl.int64)
        m_ok = offs_m < M
        k_ok = offs_k < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rn = offs_n.to(tl.int64)
            n_ok = offs_n < N
            dy = _load_cast(
                DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, m_ok[:, None] & n_ok[None, :], CDT
            )
            w = _load_cast(W + rn[:, None] * stride_wn + rk[None, :] * stride_wk, n_ok[:, None] & k_ok[None, :], CDT)
            acc = _mma(dy, w, acc, IEEE)
        acc = _dx_epilogue(acc, DT, A, BITS, offs_m, pid_k * BLOCK_K, M, K, R,
                           stride_dtm, stride_ar, stride_ak, stride_bm, seed_lo, seed_hi, threshold, keep_scale,
                           HAS_DROPOUT, LOAD_BITS, CDT, IEEE, BLOCK_M, BLOCK_K, BLOCK_R, True)  # fmt: skip
        tl.store(DX + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold", "SPLIT_M", "DB_SPLITS", "RED_TILES"])
def _bwd_dx_tma_kernel(
    dy_desc, w_desc, dx_desc, DT, A, X, BITS, DA, DA_OUT, CNT, DBP, CSP, DB, CS,
    M, N, K, R, M_BUCKET, SPLIT_M, DB_SPLITS, RED_TILES,
    stride_dtm, stride_ar, stride_ak, stride_xm, stride_xk, stride_bm, stride_dar, stride_das,
    row_stride_dy, row_stride_w, row_stride_dx,
    seed_lo, seed_hi, threshold, keep_scale,
    DO_DX: tl.constexpr, DO_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOAD_BITS: tl.constexpr,
    CDT: tl.constexpr, OUT_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, DEVICE_DESC: tl.constexpr, FLATTEN: tl.constexpr,
    W_KN: tl.constexpr, SPLIT_STORE: tl.constexpr,
):  # fmt: skip
    """Hopper path of ``_bwd_dx_kernel``: persistent, dY and W tiles by TMA, dX stored by TMA.
    With DO_DA (the default, ``LORA_KERNELS_BWD_DA=fused``) the dA partials are the first tiles of the walk
    (they are the longest); otherwise dA is a launch of its own. Before them, RED_TILES tiles sum the dB and
    Σ dY partials (as in ``_bwd_dx_kernel``). DEVICE_DESC, FLATTEN, W_KN (w_desc over the (K, N)
    matrix, (BLOCK_K, BLOCK_N) tiles): as in ``_fwd_tma_kernel``.

    HALVES: the epilogue and the store of each dX tile in its two column halves. With dropout the epilogue holds
    dT·A (before the mask) in a second (BLOCK_M, BLOCK_K) fp32 tile beside the accumulator: above 128×128 outputs
    that spilled (0.1–1.1 KB a thread), so those tiles take halves, each with a (BLOCK_M, BLOCK_K / 2) low-rank
    tile. SPLIT_STORE (a tuning config's) takes them at any p: the store's staging buffer is then half the tile
    (32 KB at 128×256), room for a fourth stage of 128×64×256 (224 KiB at rank 16). ``_dx_halves``: dx_desc's block."""
    HALVES: tl.constexpr = SPLIT_STORE or ((BLOCK_M * BLOCK_K > _DX_WHOLE_TILE) if HAS_DROPOUT else False)
    DX_COLS: tl.constexpr = BLOCK_K // 2 if HALVES else BLOCK_K
    if DEVICE_DESC:
        dy_desc = tl.make_tensor_descriptor(dy_desc, [M, N], [row_stride_dy, 1], [BLOCK_M, BLOCK_N])
        w_desc = _w_device_desc(w_desc, N, K, row_stride_w, BLOCK_N, BLOCK_K, W_KN)
        dx_desc = tl.make_tensor_descriptor(dx_desc, [M, K], [row_stride_dx, 1], [BLOCK_M, DX_COLS])
    num_da = 0
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    if DO_DA:
        num_da = num_pid_k * SPLIT_M
    num_dx = 0
    if DO_DX:
        num_dx = num_pid_m * num_pid_k
    # Tiles pid, pid + NUM_SMS, ...: those below num_da are dA blocks, the rest dX tiles. Two loops over
    # the same walk rather than one with a branch: the compiler flattens (FLATTEN) only a loop whose
    # body holds the K loop directly, not inside an if.
    pid = tl.program_id(0)
    for tile_id in tl.range(pid, RED_TILES, NUM_SMS):  # a few short tiles: the walk below starts over at pid
        _sum_db_splits(tile_id, DBP, CSP, DB, CS, N, R, DB_SPLITS, _RED_BLOCK)
    for tile_id in tl.range(pid, num_da, NUM_SMS):
        _da_block(tile_id % num_pid_k, tile_id // num_pid_k, SPLIT_M, X, DT, BITS, DA, DA_OUT, CNT, M, K, R,
                  stride_xm, stride_xk, stride_dtm, stride_bm, stride_dar, stride_das, seed_lo, seed_hi, threshold,
                  keep_scale, HAS_DROPOUT, LOAD_BITS, CDT, False, BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
    for tile_id in tl.range(_first_at_least(pid, num_da, NUM_SMS), num_da + num_dx, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_k = _tile_ids(tile_id - num_da, num_pid_m, num_pid_k, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_k = pid_k * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            acc = _dy_dot_w(acc, dy_desc.load([off_m, n0]).to(CDT), w_desc, n0, off_k, CDT, W_KN)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        if HALVES:  # (the split is a renaming of the accumulator's registers: a column's high bit is a register's)
            d0, d1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, DX_COLS)), (0, 2, 1)))
            d0 = _dx_epilogue(d0, DT, A, BITS, offs_m, off_k, M, K, R, stride_dtm, stride_ar, stride_ak, stride_bm,
                              seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT, LOAD_BITS, CDT, False,
                              BLOCK_M, DX_COLS, BLOCK_R, not FLATTEN)  # fmt: skip
            dx_desc.store([off_m, off_k], d0.to(OUT_DT))
            d1 = _dx_epilogue(d1, DT, A, BITS, offs_m, off_k + DX_COLS, M, K, R, stride_dtm, stride_ar, stride_ak,
                              stride_bm, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT, LOAD_BITS, CDT, False,
                              BLOCK_M, DX_COLS, BLOCK_R, not FLATTEN)  # fmt: skip
            dx_desc.store([off_m, off_k + DX_COLS], d1.to(OUT_DT))
        else:
            acc = _dx_epilogue(acc, DT, A, BITS, offs_m, off_k, M, K, R, stride_dtm, stride_ar, stride_ak, stride_bm,
                               seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT, LOAD_BITS, CDT, False,
                               BLOCK_M, BLOCK_K, BLOCK_R, not FLATTEN)  # fmt: skip
            dx_desc.store([off_m, off_k], acc.to(OUT_DT))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> tuple[tl.dtype, bool]:
    """(tensor-core input dtype, use ieee fp32 dots). bf16 is upcast in the interpreter (whose
    bf16 arithmetic is wrong) and fp32 runs as true fp32 (F.linear's default), not tf32."""
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpret()):
        return tl.float32, True
    return (tl.float16 if x.dtype == torch.float16 else tl.bfloat16), False


def _block_r(R: int) -> int:
    return max(16, _next_pow2(R))


def _cfg(x: torch.Tensor, R: int) -> dict:
    """Fixed tiles of the pointer kernels, used in the interpreter, under torch.compile and with
    LORA_KERNELS_AUTOTUNE=0 (eager GPU calls autotune over ``_CONFIGS``). The interpreter runs one
    numpy op per tile: tiles ≥ 32 keep it fast. GPU: 128×128×64 for 16-bit inputs."""
    if _interpret():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if x.dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    if _block_r(R) >= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _planning_sms(x: torch.Tensor) -> int:
    """The SM count the grid-size rules plan for: x's GPU, or an H100's 132 off-GPU (compile-only checks)."""
    return _num_sms(x.device.index or 0) if x.device.type == "cuda" else 132


def _shrink_cfg(x: torch.Tensor, fixed: dict, lora_A: torch.Tensor | None = None) -> dict:
    """Fixed tiles of the shrink (T = dropout(x)·Aᵀ: memory-bound, one pass over x, one program per
    BLOCK_M rows). 128-row blocks leave SMs idle below M ≈ 128·SMs (64 programs at M = 8192 on an
    H100's 132 SMs, 16 at M = 2048), and with them the bytes in flight that a streaming kernel needs:
    take the largest of 128/64/32 rows that still fills ~90 % of the SMs (32 at least), with 128-wide
    K steps below 128 rows so each stage still moves 8–16 KiB. Below 64 rows the x·Aᵀ dot runs on
    mma.sync rather than wgmma: a few GFLOP, hidden under the x read. At rank 256 the A tile dominates a
    stage (256 × BLOCK_K adapter elements): 64-wide K steps, else 3 stages exceed an H100's 227 KiB (232
    KiB at 64 rows, 280–368 KiB with fp32 adapters; Triton 3.6, sm_90), which under torch.compile (no
    step-down there) is an error."""
    if _interpret() or x.dtype == torch.float32:
        return {**fixed, "num_warps": 4}
    sms = _planning_sms(x)
    M = x.shape[0]
    bm = next((b for b in (128, 64) if _cdiv(M, b) >= 0.9 * sms), 32)
    wide_rank = lora_A is not None and _block_r(lora_A.shape[0]) >= 256
    return {**fixed, "BLOCK_M": bm, "BLOCK_K": 64 if (bm == 128 or wide_rank) else 128, "num_warps": 4}


def _dy_cfg(fixed: dict, lora_B: torch.Tensor) -> dict:
    """Fixed tiles of the dY kernel: ``fixed`` (the pointer GEMMs') without BLOCK_K, with 2 stages where
    its B tile (BLOCK_N × r, the adapter's dtype) makes 3 exceed an H100's 227 KiB: 240 KiB at rank 256,
    256 KiB at rank 128 with fp32 adapters, 368 KiB at rank 256 with fp32 adapters (2 stages: 160 / 160
    / 224 KiB; Triton 3.6, sm_90). Under torch.compile a launch cannot step down, so it must fit."""
    cfg = {k: v for k, v in fixed.items() if k not in ("BLOCK_K", "GROUP_M")}
    if cfg["BLOCK_M"] > 64:  # 64-row dT programs: twice as many (128 at M = 8192) as with the GEMMs' 128
        cfg.update(BLOCK_M=64, num_warps=4)
    br = _block_r(lora_B.shape[1])
    if br >= 256 or (br >= 128 and lora_B.element_size() == 4):
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    if br >= 256:  # the dB programs' (BLOCK_N, 256) fp32 accumulator: at 128 columns it spilled (24–128 bytes)
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)
    return cfg


def _dy_one_pass(x: torch.Tensor, R: int) -> bool:
    """Whether the backward's dT and dB (both asked for) come from one read of dY (``_bwd_dy1_kernel``) rather than
    two (``_bwd_dy_kernel``): with LORA_KERNELS_DY_PASSES=1 (bench row ``triton-dy1``; off until measured on a GPU,
    bench/NOTES.md, session 36), at rank ≤ 16 and for 16-bit x (the interpreter: any x, that is where CI runs it).
    Its fixed tiles spill at rank 32 (255 registers and 56 bytes of stack with fp32 adapters, Triton 3.6, sm_90); its
    fp32 dT partials, ⌈N/256⌉·M·r·4 bytes, grow with the rank; and fp32 x's true-fp32 (FMA) dots spilled 0.6–1.3 KB."""
    return DY_PASSES == "1" and _block_r(R) <= 16 and (x.dtype != torch.float32 or _interpret())


def _dy1_cfg(x: torch.Tensor) -> dict:
    """Fixed tiles of ``_bwd_dy1_kernel``: 64 rows × 256 columns of dY a step (32 KiB in 16 bits), 8 warps: its dY
    tile twice (this step's and the next's, kept in registers for Σ dY and loaded a step ahead), its (256, 16) fp32 dB
    accumulator: 222–230 registers, none spilled (bf16 / fp32 adapters, Triton 3.6, sm_90; one program per SM). The
    wider the columns, the fewer dT partials (one per column block). (16-bit x only on a GPU: ``_dy_one_pass``.)"""
    if _interpret():
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=1)


def _shrink_splits(x: torch.Tensor) -> int:
    """K splits of the shrink. Below M ≈ 3.8 K rows even 32-row blocks leave an H100's SMs idle (64
    programs at M = 2048), and with them the bandwidth and, at p > 0, the Philox throughput that the
    pass needs: split K so the grid reaches ~90 % of the SMs. At most 4 splits (the GEMM epilogue reads
    every partial once per N tile) and at least 512 columns each (4 K steps, so the partial's store
    stays small next to its x reads). The interpreter keeps 1 (tests force more).
    LORA_KERNELS_SHRINK_SPLIT_K=n fixes n (clamped to [1, 8]), e.g. 1 to measure without the split."""
    if SHRINK_SPLIT_K != "auto":
        return min(max(int(SHRINK_SPLIT_K), 1), 8)
    if _interpret() or x.dtype == torch.float32:
        return 1
    sms = _planning_sms(x)
    M, K = x.shape
    target, blocks = int(0.9 * sms), _cdiv(M, 32)
    # min(4, K // 512, ⌈target / blocks⌉) by counting up: under torch.compile with dynamic shapes M is
    # a SymInt, and SPLIT_K is a constexpr, so it must come out a plain int (guarded by inequalities
    # on M) rather than a symbolic expression.
    splits = 1
    while splits < 4 and splits < K // 512 and blocks * splits < target:
        splits += 1
    return splits


def _row_splits(x: torch.Tensor, blocks: int) -> int:
    """Row (M) splits of the backward's long reductions, dA (``blocks`` = K-blocks) and dB (N-blocks), each
    program summing its split into an fp32 partial, the partials then summed in a fixed order (deterministic).
    One program per block, each reducing all of M, left an H200's SMs idle and each program latency-bound:
    32 dA programs at K = 4096 took 485 µs with dropout, the dY kernel's 96 programs 155 µs (bench/NOTES.md,
    session 28). Split until the blocks reach ~2 programs per SM, keeping ≥ 512 rows per split (the partial's
    store, r·128 floats, stays small next to its reads) and at most 16 splits. The interpreter and fp32 keep 1
    unless LORA_KERNELS_BWD_SPLIT_M=n fixes n (clamped to [1, 16]; 1: the old single reduction)."""
    if BWD_SPLIT_M != "auto":
        return min(max(int(BWD_SPLIT_M), 1), 16)
    if _interpret() or x.dtype == torch.float32:
        return 1
    M = x.shape[0]
    # Counted up, not computed, for the same reason as in _shrink_splits (M may be a SymInt).
    splits = 1
    while splits < 16 and splits < M // 512 and blocks * splits < 2 * _planning_sms(x):
        splits += 1
    return splits


def _dx_wide(x: torch.Tensor | None, R: int, regenerate: bool = False) -> bool:
    """Whether the fixed dX tiles of the TMA backward are 128×256 (else 128×128). The 128×128 tile ran at 1.49–1.54×
    cuBLAS's dY·W on an H200 where the forward's 128×256 ran at 1.04–1.08× (bench/NOTES.md, session 28), and in the
    SASS (sm_90a, Triton 3.6 and 3.8) the two main loops are one shape: 4 wgmmas, a wgmma wait, four CTA barriers
    and the TMA issue per 64-wide step, so a 128-wide tile does half the tensor work per step for the same overhead
    (session 35). Where the wide tile's epilogue (with dropout in column halves, ``_dx_halves``) fits in registers:
    rank ≤ 16 in either mask mode, rank ≤ 32 without a ``regenerate``d mask (250–255 registers; regenerating it
    spills 32–64 B there; above rank 32 both spill; sessions 33–35). And only where the wide tiles are more than
    half the SM count: with fewer, the 128×128 tiles (twice as many) still run in one wave while SMs would idle under
    the wide ones; with more, the narrow ones need a wave more, at ≈ 0.7 of a wide tile's time each (1.49 against
    1.05× cuBLAS per FLOP, session 28), and the wide ones win. ``x=None`` (the single-pass backward, whose walk keeps
    its own tiles): 128×128. LORA_KERNELS_DX_WIDE=0 keeps 128×128 everywhere (bench row ``triton-dx128``)."""
    br = _block_r(R)
    if x is None or DX_WIDE == "0" or br > 32 or (br > 16 and regenerate):
        return False
    M, K = x.shape[0], x.shape[-1]
    # (Under torch.compile M may be a SymInt: the comparison becomes a guard, the tile stays a plain int.)
    return 2 * _cdiv(M, 128) * _cdiv(K, 256) > _planning_sms(x)


def _tma_cfg(x: torch.Tensor | None, R: int, backward: bool, regenerate: bool = False) -> dict:
    """Fixed tiles of the persistent TMA kernels: 128×256×64, 8 warps, 3 stages measured best for
    the plain GEMM on H100 (ANCHORS.md); narrower N tiles when the rank makes the epilogue heavy.
    The dX GEMM (``backward``; ``regenerate``: its epilogue regenerates the dropout mask) takes the same
    shape, 128×256 output tiles in 64-wide steps over N, at ranks where its epilogue fits and where there
    are enough of them (``_dx_wide``); else 128×128."""
    if _interpret():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if backward:  # (BM, BK) output tiles, BN is the reduction step over N
        # Rank ≥ 128: 3 stages need 256 KiB (r=128) / 384 KiB (r=256) of shared memory, 2 stages
        # 160 / 224 KiB (triton 3.6, sm_90): start at 2 rather than compile a kernel that cannot load.
        stages = 2 if _block_r(R) >= 128 else 3
        bk = 256 if _dx_wide(x, R, regenerate) else 128
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=stages)
    bn = 256 if _block_r(R) <= 64 else 128
    return dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _empty(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Every kernel output is allocated here, uninitialised: tests replace this with a
    NaN-poisoning allocator so that an element a kernel forgets to write is caught. A call plan being recorded
    (launch.py) notes each: its recipe allocates the same."""
    # (sizes as separate arguments: torch parses them ≈ 0.5 µs faster than one tuple; shape is never 0-d here)
    t = torch.empty(*shape, device=device, dtype=dtype)
    if _plans.RECORDING:
        _plans.note_empty(t)
    return t


def _identity(kernel):
    return kernel


_NOTHING: dict = {}  # (device, dtype) -> a zero-element tensor


def _stand_in(device: torch.device, dtype: torch.dtype, wrap) -> torch.Tensor:
    """A zero-element tensor for a kernel argument that nothing reads or writes: in eager calls one kept per
    (device, dtype), not an allocation each call (1.8 µs on a 2-core CPU, bench/NOTES.md session 40). Traced calls
    (the registered ops) allocate theirs, which their graph then holds as a kernel's operand."""
    if wrap is not _identity:
        return _empty((0,), device, dtype)
    t = _NOTHING.get((device, dtype))
    if t is None:
        t = _NOTHING[(device, dtype)] = torch.empty((0,), device=device, dtype=dtype)
    if _plans.RECORDING:
        _plans.note_kept(t)
    return t


def _tma_operands(traced: bool, fixed: dict, *specs: tuple[torch.Tensor, str, str]) -> tuple:
    """The TMA kernels' operands, one per ``(tensor, row-tile key, column-tile key)``: host descriptors
    with those tiles for eager launches, the plain tensors for traced ones (in-kernel descriptors, see
    ``_tma_ok``). The callers have checked the tensors with ``_tma_ok``: the descriptors skip their own checks."""
    if traced:
        return tuple(t for t, _, _ in specs)
    return tuple([_descriptor(t, [fixed[r], fixed[c]]) for t, r, c in specs])


def _traced(wrap) -> bool:
    """True for the launches of the registered ops (what torch.compile traces), False for eager calls."""
    return wrap is not _identity


def _op_wrap(kernel):
    """``wrap_triton`` for the registered ops. Under TRITON_INTERPRET=1 ``triton.jit`` gives an
    InterpretedFunction, which torch ≤ 2.11 (the GPU image's torch) rejects in wrap_triton while
    newer torch passes it through; pass it through here too so the ops run in the interpreter."""
    if _interpret() and not isinstance(kernel, (triton.runtime.jit.JITFunction, triton.runtime.Autotuner)):
        # Under FakeTensorMode wrap_triton launches nothing (its kernels only mutate outputs the
        # op allocated); do the same, so the interpreter runs the op's host code on fake tensors.
        return _NoLaunch() if isinstance(_get_current_dispatch_mode(), FakeTensorMode) else kernel
    return torch.library.wrap_triton(kernel)


def _op_body_wrap(x: torch.Tensor):
    """How the registered ops launch: traceably (``_op_wrap``) while torch.compile/export traces them
    (fake or functional tensors); as an eager call does (``_identity``: host TMA descriptors, tuning,
    single-pass) when they run on real tensors, e.g. called from a compiled graph at run time, or under
    a dispatch mode such as FlopCounterMode or selective checkpointing, which hand the op real tensors."""
    if torch.compiler.is_compiling() or type(x) not in (torch.Tensor, torch.nn.Parameter):
        return _op_wrap
    return _identity


class _NoLaunch:
    """``kernel[grid](*args)`` that does nothing (see :func:`_op_wrap`)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _seed_parts(seed: int) -> tuple[int, int]:
    """The seed's two 32-bit halves as signed int32 values with the same bits (the kernels cast them
    to uint32). Triton types an int argument ≥ 2³¹ as i64: unsigned halves would compile a second
    variant of every seeded kernel for half of all random seeds, outside the prewarmed cache and
    inside timed or captured regions. Only ``&``, ``>>`` and ``±``: ``seed`` may be a SymInt."""
    return ((seed + 2**31) & 0xFFFFFFFF) - 2**31, (((seed >> 32) + 2**31) & 0xFFFFFFFF) - 2**31


def _m_bucket(M: int) -> int:
    # Autotuning key for M: the next power of two, so varying batch sizes reuse one tuning.
    return _next_pow2(max(M, 1))


# "auto": TMA persistent kernels on sm90+ GPUs; "1": wherever the tensors allow it (the CPU
# interpreter included: that is how CI tests them); "0": never.
TMA_MODE = os.environ.get("LORA_KERNELS_TMA", "auto")
# "single": the one-launch forward of single_pass.py where it applies (Hopper TMA path, eager);
# "two" (default until measured on a GPU, bench/NOTES.md): the shrink launch + the GEMM launch.
FWD_MODE = os.environ.get("LORA_KERNELS_FWD", "two")
# "single": the backward of single_pass.py (dT from the dX GEMM's own dY tiles; dA in a second launch).
BWD_MODE = os.environ.get("LORA_KERNELS_BWD", "two")
# K splits of the shrink: "auto" (by M and the SM count, _shrink_splits) or a fixed count (1 = never
# split) for A/B measurements.
SHRINK_SPLIT_K = os.environ.get("LORA_KERNELS_SHRINK_SPLIT_K", "auto")
# Row splits of the backward's dA and dB reductions: "auto" (_row_splits) or a fixed count (1 = one program
# per block reduces all of M, as before session 28) for A/B measurements.
BWD_SPLIT_M = os.environ.get("LORA_KERNELS_BWD_SPLIT_M", "auto")
# Where the TMA backward computes dA: "fused" (default), the first tiles of the dX kernel's persistent walk
# (memory-bound dA partials beside compute-bound dX tiles, no launch of their own); "separate", a launch of its
# own after the dX GEMM, for an A/B (bench row ``triton-daseparate``). Measured on an H200 (bench/NOTES.md,
# session 28): fused 15–35 µs faster per backward at 8192×4096→4096/14336, and one launch fewer.
BWD_DA = os.environ.get("LORA_KERNELS_BWD_DA", "fused")
# "1": the persistent TMA kernels' tile loop flattened with their K loop (``tl.range(flatten=True)``), so
# the next tile's first TMA loads are issued during this tile's epilogue (one program per SM: nothing
# else hides that gap). Off until measured on a GPU (bench row ``triton-flat``, bench/NOTES.md); eager
# calls only (a flattened kernel that exceeds shared memory steps down to the unflattened one).
TMA_FLATTEN = os.environ.get("LORA_KERNELS_TMA_FLATTEN", "0") not in ("", "0")
# The TMA dX GEMM's fixed output tiles: "auto", 128×256 at rank ≤ 16 (≤ 32 without a regenerated mask) where there are
# more than half an SM count of them (``_dx_wide``); "0", 128×128 everywhere (as before session 35), for an A/B (bench
# row ``triton-dx128``).
DX_WIDE = os.environ.get("LORA_KERNELS_DX_WIDE", "auto")
# The backward's passes over dY for dT and dB: "2" (default), ``_bwd_dy_kernel``; "1", one pass (``_bwd_dy1_kernel``)
# at rank ≤ 16 (``_dy_one_pass``): off until measured on a GPU (bench row ``triton-dy1``, bench/NOTES.md, session 36).
DY_PASSES = os.environ.get("LORA_KERNELS_DY_PASSES", "2")
# Where the eager TMA launches get their descriptors: "host" (default), ``TensorDescriptor``s built per call, which
# Triton's launcher expands into driver tensor maps in Python (+20–27 µs of host time per two-launch step on a 2-core
# CPU, bench/NOTES.md, session 42); "device", built in the kernel from plain tensors, as torch.compile's launches do
# (a global scratch allocation per launch instead). Off until measured on a GPU (bench row ``triton-devdesc``).
TMA_DESC = os.environ.get("LORA_KERNELS_TMA_DESC", "host")
# Eager GPU calls autotune each kernel per (M bucket, N, K, rank, dtype); "0" uses the fixed tiles.
AUTOTUNE = os.environ.get("LORA_KERNELS_AUTOTUNE", "1") not in ("", "0")
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _tma_ok(*tensors: torch.Tensor, traced: bool = False) -> bool:
    """TMA descriptors need 2-D row-major tensors with 16-byte aligned base and row stride.

    ``traced``: inside the torch.library op (what torch.compile traces). There the TMA kernels build
    their descriptors in the kernel (DEVICE_DESC): under torch.compile the op is decomposed into its
    kernel calls and torch keeps a call only if it sees it write a tensor argument, which it does not
    through host-built descriptors (it dropped the whole GEMM: bench/NOTES.md). "auto" keeps the
    pointer kernels there until the in-kernel descriptors are measured on a GPU; "1" takes them. The
    base's alignment is then read from the storage offset (fake tensors have no data pointer; storages
    from torch's allocators are aligned), which torch.compile turns into a guard."""
    if TMA_MODE == "0" or TensorDescriptor is None or (traced and TMA_MODE == "auto"):
        return False
    if tensors[0].dtype not in (torch.float16, torch.bfloat16):
        return False  # fp32 runs true-fp32 dots on the pointer path
    if TMA_MODE == "auto":
        dev = tensors[0].device
        if _interpret() or dev.type != "cuda" or device_capability(dev)[0] < 9:
            return False
    for t in tensors:
        if t.dim() != 2:
            return False
        row, col = t.stride()  # (one call: each ``stride(i)`` costs as much, and this runs on every eager call)
        if col != 1 or (row * t.element_size()) % 16:
            return False
        fake = traced and torch._subclasses.fake_tensor.is_fake(t)
        if (t.storage_offset() * t.element_size()) % 16 if fake else t.data_ptr() % 16:
            return False
        if row < t.shape[1]:  # overlapping rows (e.g. an expanded dY with row stride 0)
            return False
    return True


def _tma_weight(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The weight as the TMA kernels read it, and W_KN: the (N, K) matrix when its rows are the
    contiguous dimension (nn.Linear), else its (K, N) transpose when that one is (GPT-2's Conv1D
    weight passed as ``weight.T``, a view), for which the kernels take the W_KN variant. Either is then
    checked by ``_tma_ok``."""
    if weight.stride(1) == 1 or weight.stride(0) != 1:
        return weight, False
    wt = weight.T
    if _plans.RECORDING:
        _plans.note_view(wt, weight, torch.Tensor.t)
    return wt, True


_W_TILES = {False: ("BLOCK_N", "BLOCK_K"), True: ("BLOCK_K", "BLOCK_N")}  # the weight descriptor's tiles


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid_sms(x: torch.Tensor) -> int:
    return 4 if x.device.type != "cuda" else _num_sms(x.device.index or 0)


# ----------------------------------------------------------------------------------------------
# autotuning (eager GPU calls; the fixed tiles above elsewhere)
# ----------------------------------------------------------------------------------------------


def _c(bm, bn, bk, warps, stages, pre_hook=None, group_m=8, **extra):
    return triton.Config(
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, **extra),
        num_warps=warps,
        num_stages=stages,
        pre_hook=pre_hook,
    )


def _set_fwd_desc_blocks(nargs):
    if isinstance(nargs["x_desc"], torch.Tensor):
        return  # in-kernel descriptors (DEVICE_DESC) take the tiles from the constexprs
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bk, bn] if nargs.get("W_KN") else [bn, bk]
    halves = nargs.get("FLATTEN") or nargs.get("SPLIT_STORE")  # stored in halves
    nargs["y_desc"].block_shape = [bm, bn // 2 if halves else bn]


def _dx_halves(block_m: int, block_k: int, has_dropout: bool, split_store: bool = False) -> bool:
    """Whether ``_bwd_dx_tma_kernel`` stores dX tiles in two (BLOCK_M, BLOCK_K / 2) halves (its HALVES)."""
    return bool(split_store) or (bool(has_dropout) and block_m * block_k > _DX_WHOLE_TILE.value)


def _set_dx_desc_blocks(nargs):
    if isinstance(nargs["dy_desc"], torch.Tensor):
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["dy_desc"].block_shape = [bm, bn]
    nargs["w_desc"].block_shape = [bk, bn] if nargs.get("W_KN") else [bn, bk]
    halves = _dx_halves(bm, bk, nargs.get("HAS_DROPOUT"), nargs.get("SPLIT_STORE"))
    nargs["dx_desc"].block_shape = [bm, bk // 2 if halves else bk]


def _configs() -> dict:
    """Search spaces per kernel. fp32 configs use BLOCK_K = 32 (true-fp32 dots need the smaller
    tiles); 16-bit ones BLOCK_K ≥ 64; ``_prune`` keeps the family matching the call."""
    gemm16 = [_c(128, 128, 64, 8, 3), _c(128, 256, 64, 8, 3), _c(64, 128, 64, 4, 4), _c(128, 64, 64, 4, 4),
              _c(64, 64, 64, 4, 3)]  # fmt: skip
    gemm32 = [_c(64, 64, 32, 4, 2), _c(32, 64, 32, 4, 2), _c(64, 128, 32, 8, 2)]
    return {
        _shrink_kernel: [_c(bm, 32, bk, w, s) for bm, bk, w, s in
                         ((32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2))],
        _fwd_kernel: gemm16 + gemm32,
        # The last: 128×256 with 4 stages (cuBLAS's depth) fits (224 KiB at rank 16) when y is stored in halves.
        _fwd_tma_kernel: [_c(128, 256, 64, 8, 3, _set_fwd_desc_blocks), _c(128, 128, 64, 8, 4, _set_fwd_desc_blocks),
                          _c(128, 128, 64, 4, 3, _set_fwd_desc_blocks), _c(64, 256, 64, 8, 3, _set_fwd_desc_blocks),
                          _c(128, 256, 64, 8, 4, _set_fwd_desc_blocks, SPLIT_STORE=True)],
        _bwd_dy_kernel: [_c(bm, bn, 64, w, s) for bm, bn, w, s in
                         ((64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3))]
                        + [_c(32, 64, 32, 4, 2)],
        # One read of dY (16-bit x, rank ≤ 16): columns as wide as its fixed tiles' (256), which size its dT partials;
        # rows at least 32 (its arrival counters, one per row block). Others spilled: 64 rows with 4 warps (0.6 KB),
        # 128 rows or 512 columns with 8 (0.4–0.5 KB; Triton 3.6, sm_90). Not pipelined by Triton: 1 stage.
        _bwd_dy1_kernel: [_c(64, 256, 64, 8, 1), _c(32, 256, 64, 4, 1), _c(32, 256, 64, 8, 1)],
        _bwd_dx_kernel: [_c(128, 64, 128, 8, 3), _c(128, 128, 64, 8, 3), _c(64, 64, 128, 4, 3), _c(64, 128, 64, 4, 4)]
                        + gemm32,
        # Under Triton 3.6 for sm_90, fp32 adapters (test_tuning_tables_fit_an_h100; _prune drops what does not fit
        # or spills): at rank 16 all fit the 227 KiB of an H100 (128×64×128×3: 128 KiB; the 3-stage 128×256 and
        # 256×128 output tiles 208 KiB), at rank 64 all but those two (256 / 320 KiB), at rank 128 the 128-row ones
        # up to 3 stages of 128×128, at rank 256 (dA in a launch of its own) only 128×64×64×2 (160 KiB). The
        # 256-wide tiles are tuned at rank 16 (at rank 32 the 128×256 ones, without a regenerated mask: 250–255
        # registers, none spilled; session 35), with dropout from a saved bitmask: their masked epilogue runs in
        # column halves (``_dx_halves``; whole, it spilled 0.1–1.1 KB), 233–254 registers and no spill under 3.6 and
        # 3.8 (bf16 and fp32 adapters); regenerating the mask there (Philox in the epilogue), the 128×256 ones take
        # 254–255 registers without spills, the 256×128 one spills 12–20 B (session 34; 0.4–0.9 KB before). At
        # rank 64 they spill with dropout (76–112 B), and without it the 2-stage one takes 254 registers (3.6) or
        # spills (3.8). The last config stores its 128×256 tiles in halves at any p (SPLIT_STORE): half the store's
        # staging buffer, and a fourth stage fits (224 KiB, rank 16, no dropout; with dropout the dA walk's x tiles
        # take it to 280 KiB). At rank ≥ 128 the 4-warp tiles spill too. The 128×256 output tile with 64-wide
        # steps and 3 stages is the forward's measured-best GEMM shape (ANCHORS.md); 256×128 with 4 stages is
        # cuBLAS's for this GEMM on an H200 (session 28, where the fixed 128×128×3 tile ran 1.5× cuBLAS): here 3
        # stages of it, 4 of 128×128 and of 128×256 (in halves).
        _bwd_dx_tma_kernel: [_c(128, 64, 128, 8, 3, _set_dx_desc_blocks), _c(128, 64, 256, 8, 2, _set_dx_desc_blocks),
                             _c(128, 64, 256, 8, 3, _set_dx_desc_blocks), _c(128, 128, 128, 8, 3, _set_dx_desc_blocks),
                             _c(64, 64, 128, 4, 4, _set_dx_desc_blocks), _c(128, 64, 64, 8, 2, _set_dx_desc_blocks),
                             _c(128, 64, 128, 8, 4, _set_dx_desc_blocks), _c(256, 64, 128, 8, 3, _set_dx_desc_blocks),
                             _c(128, 64, 256, 8, 4, _set_dx_desc_blocks, SPLIT_STORE=True)],
    }  # fmt: skip


_default_configs = _configs  # tests swap in one-config tables to run the tuned path in the interpreter


def _fp32_family(config) -> bool:
    # Tagged by _tuning_configs from the table's BLOCK_K (kernels without BLOCK_K, the dY kernel, lose it).
    return getattr(config, "lk_fp32", config.kwargs.get("BLOCK_K", 32) == 32)


def _prune(configs, named_args, **kwargs):
    fp32 = bool(named_args.get("IEEE", kwargs.get("IEEE", False)))
    br = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    keep = [c for c in configs if _fp32_family(c) == fp32]
    if br >= 256:  # a 256-wide rank tile next to a 256-wide N tile does not fit in registers
        keep = [c for c in keep if c.kwargs.get("BLOCK_N", 0) <= 128] or keep
    if br >= 64:  # 4-warp 128×128 tiles: 128 fp32 accumulator registers a thread, and the epilogue's beside it
        keep = [
            c for c in keep if c.num_warps > 4 or c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", 0) < 128 * 128
        ] or keep
        # The 4-stage 128×256 tiles (SPLIT_STORE): at rank 64 the forward's takes 255 registers and spills 20–24 B
        # (3.8); the dX one is a wide tile, dropped above rank 16 below (it is unchecked at rank 32).
        keep = [c for c in keep if not c.kwargs.get("SPLIT_STORE")] or keep
    if "dx_desc" in named_args or "DX" in named_args:  # the dX kernels' (BLOCK_M, BLOCK_K) output tiles: see the
        # TMA kernel's table comment
        wide = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] > _DX_WHOLE_TILE.value]
        has_dropout = bool(named_args.get("HAS_DROPOUT", kwargs.get("HAS_DROPOUT", False)))
        regenerate = has_dropout and not named_args.get("LOAD_BITS", kwargs.get("LOAD_BITS", False))
        # A regenerated mask (Philox in the epilogue) leaves the 128×256 tiles at 254–255 registers without spills
        # since its bytes are computed once (``computed_once``: before, 0.4–0.9 KB spilled), the 256×128 one spills
        # 12–20 B. At rank 32 the 128×256 tiles fit without a regenerated mask (250–255 registers with the bitmask;
        # 32–64 B spilled regenerating it), the 256×128 one spills (188–200 B).
        if br > 32 or (br > 16 and regenerate):
            drop = wide
        elif br > 16:
            drop = [c for c in wide if c.kwargs["BLOCK_M"] > 128 or c.kwargs.get("SPLIT_STORE")]
        else:
            drop = [c for c in wide if c.kwargs["BLOCK_M"] > 128] if regenerate else []
        if has_dropout:  # the 4-stage 128×256 output tile (SPLIT_STORE) needs 280 KiB there (the dA walk's x tiles)
            drop += [c for c in keep if c.kwargs.get("SPLIT_STORE")]
        if br >= 128 and "dx_desc" in named_args:  # (the pointer kernel's dA launch keeps them: at rank 256
            drop += [c for c in keep if c.num_warps == 4]  # only they fit an H100)
        keep = [c for c in keep if c not in drop] or keep
    return keep or configs


# Besides the sizes: the switches that change a kernel's cost (Philox in the loop, the mask stored or loaded or
# regenerated, the dA-only launch of the single-pass backward, split-K partials, the dY kernel's roles, the weight's
# major order), so that p = 0 and p > 0 calls, bitmask and regenerate modes, a frozen lora_B's dT-only launch, or a
# (K, N)-stored weight keep their own tiles (and ``_prune`` sees LOAD_BITS: the wide dX tiles spill regenerating).
_KEYS = ["M_BUCKET", "N", "K", "BLOCK_R", "IEEE", "HAS_DROPOUT", "STORE_BITS", "LOAD_BITS", "DO_DX", "SPLIT_K",
         "DO_DT", "DO_DB", "FLATTEN", "W_KN"]  # fmt: skip
_DESC_HOOKS = {_fwd_tma_kernel: _set_fwd_desc_blocks, _bwd_dx_tma_kernel: _set_dx_desc_blocks}


def _tuning_configs(kernel) -> list:
    """``kernel``'s tuning table, each config reduced to the meta-parameters the kernel takes (SPLIT_STORE, which
    the TMA kernels take without a default, False where a config does not set it)."""
    names = kernel.arg_names
    out = []
    for c in _configs()[kernel]:
        kw = {k: v for k, v in c.kwargs.items() if k in names}
        if "SPLIT_STORE" in names:
            kw.setdefault("SPLIT_STORE", False)
        t = triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=c.pre_hook)
        t.lk_fp32 = _fp32_family(c)  # the family survives the stripping of BLOCK_K (see _prune)
        out.append(t)
    return out


@functools.cache
def _autotuner(kernel):
    return _make_autotuner(kernel)


def _make_autotuner(kernel, prune=_prune):
    keys = [k for k in _KEYS if k in kernel.arg_names]
    tuner = triton.autotune(configs=_tuning_configs(kernel), key=keys, prune_configs_by={"early_config_prune": prune})(
        kernel
    )
    # The configs this tuner chose, by _tuned_key: later calls with a key seen launch the config directly.
    tuner.lk_chosen = {}
    tuner.lk_key_pos = tuple(i for i, name in enumerate(kernel.arg_names) if name in keys)
    return tuner


def _tuned_key(tuner, args: tuple, meta: dict) -> tuple:
    """A key at least as fine as Triton's Autotuner's (the ``key`` arguments' values and every tensor
    argument's dtype): those arguments, all the launch's constexprs, the tensors' dtypes. Two calls with one
    key get one config from the Autotuner, so the config it chose for the first is the second's."""
    n = len(args)
    return (
        tuple(args[i] for i in tuner.lk_key_pos if i < n),
        tuple(meta.items()),
        tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
    )


def _launch_chosen(kernel, grid, args: tuple, meta: dict, chosen: tuple, slot=None, tuner=None, fixed=None) -> None:
    """Launch the config ``(Config.all_kwargs(), pre_hook)`` the Autotuner chose for this key, as its
    ``run`` would after the cache lookup (pre-hook, then the launch), without the rest of ``run``: it
    rebuilds a dict of all the arguments and a key per call (bench/NOTES.md, session 30: 10–35 µs a launch
    on the CPU). No lock: the pre-hook re-points this call's own descriptors through a dict of its own."""
    cfg, pre_hook = chosen
    full = {**meta, **cfg}
    if pre_hook is not None:
        pre_hook({**dict(zip(kernel.arg_names, args, strict=False)), **full})
    g = grid(full)
    _plans.record(slot, kernel, tuner, meta, fixed, args, _fast_launch(kernel, g, args, full), g, full)


# What each tuning timed, in call order: one entry per tuning key (``tuning_log``).
_TUNING_LOG: list[dict] = []


def _log_tuning(kernel, tuner, args: tuple, meta: dict, best) -> None:
    """Record a tuning the Autotuner just ran: the key's values, each config timed (median ms; inf for one
    that failed to load or ran out of resources) and the config chosen."""
    named = {**dict(zip(kernel.arg_names, args, strict=False)), **meta}

    def tiles(config) -> dict:
        return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}

    def median(t) -> float:
        return float(t[0] if isinstance(t, (list, tuple)) else t)

    _TUNING_LOG.append(
        dict(
            kernel=kernel.__name__,
            key={k: named[k] for k in tuner.keys if k in named},
            timings=[(tiles(c), median(t)) for c, t in tuner.configs_timings.items()],
            best=tiles(best) if best is not None else None,
        )
    )


def tuning_log() -> list[dict]:
    """The tunings eager GPU calls ran in this process, in order: ``kernel``, ``key`` (the tuning key's
    arguments: M bucket, N, K, rank tile, dropout, ...), ``timings`` (each config's tiles with its median ms)
    and ``best``. ``bench.lora_linear`` prints and saves it after an autotuned run."""
    return list(_TUNING_LOG)


@functools.cache
def _tune_lock(kernel) -> threading.Lock:
    """Triton's Autotuner keeps a call's arguments on itself from choosing a config to launching (its
    pre-hooks re-point the TMA descriptors through them), so two threads in one tuned kernel (DataParallel
    replicas, per-device backward threads) would swap descriptors or crash: one call at a time."""
    return threading.Lock()


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """In-kernel TMA descriptors live in a global scratch that Triton takes from ``triton.set_allocator``.
    Inductor sets one before each of its launches; for the op's own eager launches set one here, unless
    the user has set theirs. (Triton keeps it in a ContextVar: per thread.)"""
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover - older Triton: no device-side descriptors either
        return
    if _no_allocator_set(_allocation):
        triton.set_allocator(_torch_scratch)


def _no_allocator_set(allocation) -> bool:
    """Whether ``triton.runtime._allocation`` holds no user allocator. Its layout differs by release: a
    ContextVar defaulting to ``_NULL_ALLOCATOR`` (3.6+), a ContextVar without that name (3.5), the
    allocator object itself (3.4): a NullAllocator instance means none was set."""
    current = getattr(allocation, "_allocator", None)
    if hasattr(current, "get"):
        current = current.get()
    null = getattr(allocation, "NullAllocator", None)
    return current is None or (null is not None and isinstance(current, null))


def _step_downs(meta: dict, fixed: dict) -> list[tuple[dict, dict]]:
    """(constexprs, tiles) to try, in order, when ``fixed`` exceeds the GPU's shared memory: a
    flattened loop unflattened first (its epilogue loads are multi-buffered: at rank 64 with fp32
    adapters they no longer fit next to 3 stages of 128×256 tiles, and the stages are worth more), then one stage
    fewer, then (if wide) half-width N tiles."""
    out = []
    if meta.get("FLATTEN"):
        meta = {**meta, "FLATTEN": False}
        out.append((meta, fixed))
    fewer = {**fixed, "num_stages": max(1, fixed["num_stages"] - 1)}
    out.append((meta, fewer))
    if fixed.get("BLOCK_N", 0) > 64:
        out.append((meta, {**fewer, "BLOCK_N": fixed["BLOCK_N"] // 2}))
    return out


class _NotTuned(Exception):
    pass


def _refuse_tuning(*args, **kwargs):
    raise _NotTuned


def _capturing() -> bool:
    # (No capture without an initialised CUDA: this also keeps compile_only's CPU launches off the driver.)
    return not _interpret() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _launch(kernel, grid, args: tuple, meta: dict, fixed: dict, wrap) -> None:
    """Launch ``kernel``: autotuned in eager GPU calls, else with the ``fixed`` tiles.

    grid: META -> grid tuple (META holds BLOCK_M/N/K); meta: the constexprs the caller decides;
    fixed: tile constexprs plus num_warps/num_stages for the untuned launch. The TMA kernels' host
    descriptors arrive built with the ``fixed`` tiles. Every eager call comes through here: it is kept
    short (bench/NOTES.md, "host overhead").
    """
    if meta.get("DEVICE_DESC") and not _interpret():
        _ensure_allocator()  # in-kernel descriptors: Triton's scratch allocator (per thread), for every path below
    tuned = wrap is _identity and AUTOTUNE and (not _interpret() or _configs is not _default_configs)
    tuner = _autotuner(kernel) if tuned else None
    # Within an eager call's launch plan (launch.py): the launch recorded here for this layout, if it matches.
    slot = _plans.plan_slot() if wrap is _identity else None
    if slot is not None and _plans.replay(slot, kernel, tuner, meta, fixed, args):
        return
    if tuned:
        chosen = getattr(tuner, "lk_chosen", None)  # (stand-in tuners in tests have none)
        if chosen:
            hit = chosen.get(_tuned_key(tuner, args, meta))
            if hit is not None:
                return _launch_chosen(kernel, grid, args, meta, hit, slot, tuner, fixed)
        try:
            with _tune_lock(kernel):
                capturing = _capturing()
                if capturing:
                    # Tuning a new key times configs and synchronises, which a CUDA-graph capture forbids,
                    # and the fixed tiles may be a kernel never loaded (a module load fails in a capture):
                    # a key the eager warm-up tuned replays its config (loaded then); any other key raises
                    # _NotTuned here (prune_configs runs first for an uncached key, in Triton 3.6 and 3.8)
                    # and takes the fixed tiles.
                    tuner.prune_configs = _refuse_tuning
                timed = getattr(tuner, "configs_timings", None)
                try:
                    tuner[grid](*args, **meta)
                finally:
                    if capturing:
                        del tuner.prune_configs
                best = getattr(tuner, "best_config", None)
                if best is not None and getattr(tuner, "lk_chosen", None) is not None:
                    tuner.lk_chosen[_tuned_key(tuner, args, meta)] = (best.all_kwargs(), best.pre_hook)
                if getattr(tuner, "configs_timings", None) is not timed:  # this call timed configs: log them
                    _log_tuning(kernel, tuner, args, meta, best)
            return
        except _NotTuned:
            pass
        except OutOfResources:
            pass  # every tuned config exceeds this GPU: the fixed tiles below step down until one fits
        except torch.cuda.OutOfMemoryError:
            pass  # tuning's benchmark buffers (do_bench's 256 MB L2 flush) did not fit next to training
    own = fixed  # (``fixed`` itself stays as the caller gave it: a plan's site compares it)
    if "BLOCK_N" not in kernel.arg_names:
        own = {k: v for k, v in fixed.items() if k not in ("BLOCK_N", "GROUP_M")}
    # Untuned eager launches step down if the fixed tiles exceed this GPU's shared memory (the
    # 128×256 TMA tiles plus the low-rank epilogue sit close to the H100's 227 KiB).
    variants = [(meta, own)]
    i = 0
    while True:
        m, cfg = variants[i]
        tiles = {k: v for k, v in cfg.items() if k != "num_warps" and k != "num_stages"}
        # TMA descriptors carry the block shape: re-point them at the tiles of a step-down, or after the
        # tuner's pre-hooks moved them (they were built with the fixed tiles). (The condition first: looking a
        # JITFunction up hashes it, in Python.)
        hook = (i or tuned or m.get("FLATTEN") or cfg.get("SPLIT_STORE")) and _DESC_HOOKS.get(kernel)
        if hook:
            hook({**dict(zip(kernel.arg_names, args, strict=False)), **m, **tiles})
        try:
            if wrap is _identity:
                g, kw = grid({**m, **tiles}), {**m, **cfg}
                compiled = _fast_launch(kernel, g, args, kw)
                if not tuned:  # (the fixed tiles of a tuned kernel are a fallback: not kept in a plan)
                    _plans.record(slot, kernel, tuner, meta, fixed, args, compiled, g, kw)
            else:
                wrap(kernel)[grid({**m, **tiles})](*args, **m, **cfg)
            return
        except OutOfResources:
            if i == 0 and wrap is _identity:
                variants += _step_downs(meta, own)
            if i == len(variants) - 1:
                raise
        i += 1


_on_tensor_device = _plans.on_tensor_device  # (launch.py: the call plans' replays take it too)
_INT32_MAX = 2**31 - 1


def _rank_offsets_fit(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A (r, K) and lora_B (N, r) as the kernels can index them. They form offsets along the rank in 32 bits
    (``offs_r · stride``, r ≤ 256 lanes: cheaper than 64 in every tile load), along K and N in 64. A rank stride that
    carries that product past 2³¹ (rows or columns 2³¹ / r elements apart: a view no LoRA library makes) would wrap
    to a negative offset, an illegal address; such a tensor is copied, r·K or N·r elements, with the rank innermost
    (tests/test_hostile.py, test_64_bit_offsets_in_the_interpreter)."""
    top = lora_A.shape[0] - 1
    if top * lora_A.stride(0) > _INT32_MAX:
        lora_A = lora_A.t().contiguous().t()
    if top * lora_B.stride(1) > _INT32_MAX:
        lora_B = lora_B.contiguous()
    return lora_A, lora_B


@_on_tensor_device
def lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_bias: torch.Tensor | None,
    scaling: float,
    p: float,
    seed: int,
    store_mask: bool,
    wrap=_identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launches. x: (M, K), weight: (N, K), lora_A: (r, K), lora_B: (N, r).

    Returns ``y (M, N)`` in x's dtype, ``T (M, r)`` fp32 (already divided by 1-p) and the packed
    keep bits ``(M, ceil(K/8))`` uint8 (an empty tensor unless ``p > 0 and store_mask``).
    """
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    lora_A, lora_B = _rank_offsets_fit(lora_A, lora_B)
    single = FWD_MODE == "single" and wrap is _identity and (N * x.element_size()) % 16 == 0
    if single and _tma_ok(x, _tma_weight(weight)[0]):
        from .single_pass import lora_fwd_single_pass, single_pass_reason

        if single_pass_reason(x, weight, lora_A) is None:
            return lora_fwd_single_pass(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, store_mask)
    cdt, ieee = _compute_dtype(x)
    fixed = _cfg(x, R)
    BR = _block_r(R)
    MB = _m_bucket(M)
    y = _empty((M, N), x.device, x.dtype)
    t = _empty((M, R), x.device, torch.float32)
    splits = _shrink_splits(x)
    # Split K: the shrink stores SPLIT_K partials; the GEMM epilogue sums them and writes t.
    t_part = _empty((splits, M, R), x.device, torch.float32) if splits > 1 else t
    stride_ts = t_part.stride(0) if splits > 1 else 0
    has_dropout = p > 0.0
    store_bits = has_dropout and store_mask
    bits = _empty((M, (K + 7) // 8) if store_bits else (0, 0), x.device, torch.uint8)
    lo, hi = _seed_parts(seed)
    _launch(
        _shrink_kernel,
        lambda META: (_cdiv(M, META["BLOCK_M"]), splits),
        (x, lora_A, t_part, bits, M, K, R, MB,
         *x.stride(), *lora_A.stride(), t.stride(0), stride_ts,
         max(bits.stride(0), 1), lo, hi, dropout_threshold(p), 1.0 / (1.0 - p)),
        dict(HAS_DROPOUT=has_dropout, STORE_BITS=store_bits, CDT=cdt, IEEE=ieee, BLOCK_R=BR, SPLIT_K=splits),
        _shrink_cfg(x, fixed, lora_A),
        wrap,
    )  # fmt: skip
    # The epilogue reads the (N,) vectors with unit stride; they are tiny, so copy if strided.
    bias_arg = bias.contiguous() if bias is not None else t  # t: never read when HAS_BIAS is False
    lbias_arg = lora_bias.contiguous() if lora_bias is not None else t
    flags = dict(HAS_BIAS=bias is not None, HAS_LBIAS=lora_bias is not None, CDT=cdt, BLOCK_R=BR, SPLIT_K=splits)
    traced = _traced(wrap)
    w_tma, w_kn = _tma_weight(weight)
    if _tma_ok(x, w_tma, y, traced=traced):
        fixed = {"SPLIT_STORE": False, **_tma_cfg(x, R, backward=False)}  # (not a default argument: see lora_bwd)
        sms = _grid_sms(x)
        device_desc = traced or TMA_DESC == "device"
        x_desc, w_desc, y_desc = _tma_operands(
            device_desc, fixed, (x, "BLOCK_M", "BLOCK_K"), (w_tma, *_W_TILES[w_kn]), (y, "BLOCK_M", "BLOCK_N")
        )
        _launch(
            _fwd_tma_kernel,
            lambda META: (min(sms, _cdiv(M, META["BLOCK_M"]) * _cdiv(N, META["BLOCK_N"])),),
            (x_desc, w_desc, y_desc, bias_arg, t_part, t, lora_B, lbias_arg, M, N, K, R, MB,
             t.stride(0), stride_ts, *lora_B.stride(), x.stride(0), w_tma.stride(0), y.stride(0),
             scaling),
            dict(flags, OUT_DT=_TL_DTYPE[y.dtype], NUM_SMS=sms, DEVICE_DESC=device_desc,
                 FLATTEN=TMA_FLATTEN and not traced, W_KN=w_kn),
            fixed,
            wrap,
        )  # fmt: skip
        return y, t, bits
    _launch(
        _fwd_kernel,
        lambda META: (_cdiv(M, META["BLOCK_M"]) * _cdiv(N, META["BLOCK_N"]),),
        (x, weight, bias_arg, t_part, t, lora_B, lbias_arg, y, M, N, K, R, MB,
         *x.stride(), *weight.stride(), t.stride(0), stride_ts,
         *lora_B.stride(), *y.stride(), scaling),
        dict(flags, IEEE=ieee),
        fixed,
        wrap,
    )  # fmt: skip
    return y, t, bits


@_on_tensor_device
def lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    t: torch.Tensor,
    bits: torch.Tensor,
    scaling: float,
    p: float,
    seed: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool = True,
    wrap=_identity,
    bwd_mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launches. dy: (M, N); x: (M, K); t: (M, r) fp32; bits: packed mask or empty.
    ``bwd_mode``: "single" or "two" (default: ``BWD_MODE``, i.e. LORA_KERNELS_BWD).

    Returns ``dx (M, K)`` in x's dtype (empty unless need_dx), and fp32 ``dA (r, K)``,
    ``dB (N, r)``, ``dy_colsum (N,)`` (= Σ_m dY, for dlora_bias = s·colsum and dbias).
    ``dA`` is unwritten unless need_da. Without ``need_db`` (lora_B frozen) the pass over dY for dB
    and Σ dY is skipped (the single-pass backward leaves its dB tiles out) and both come back empty,
    ``(0, r)`` and ``(0,)``.
    """
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    lora_A, lora_B = _rank_offsets_fit(lora_A, lora_B)
    single = (bwd_mode or BWD_MODE) == "single"
    if single and need_dx and wrap is _identity and (K * x.element_size()) % 16 == 0:
        if _tma_ok(dy, _tma_weight(weight)[0]):
            from .single_pass import lora_bwd_single_pass, single_pass_reason

            if single_pass_reason(x, weight, lora_A) is None:
                return lora_bwd_single_pass(dy, x, weight, lora_A, lora_B, t, bits, scaling, p, seed, need_da, need_db)
    cdt, ieee = _compute_dtype(x)
    fixed = _cfg(x, R)
    BR = _block_r(R)
    MB = _m_bucket(M)
    dev = x.device
    has_dropout = p > 0.0
    # bool(): a constexpr, so a plain bool also when M is a SymInt (torch.compile, dynamic shapes).
    load_bits = has_dropout and bool(bits.numel() > 0)
    do_dt = need_dx or need_da
    dt = _empty((M, R) if do_dt else (0, R), dev, torch.float32)
    # Two launches, no sums after them: the dY kernel's dB / Σ dY partials (row splits) are summed by the first
    # tiles of the dX kernel, and the dA partials of each K-block by the last of its programs to finish, counted
    # in ``cnt`` (zeroed by the dY kernel). Without a dX kernel (x and lora_A both frozen) torch sums dB.
    one_pass = do_dt and need_db and _dy_one_pass(x, R)
    dy1_cfg = _dy1_cfg(x) if one_pass else None
    db_splits = _row_splits(x, _cdiv(N, dy1_cfg["BLOCK_N"] if one_pass else 128)) if need_db else 1
    da_splits = _row_splits(x, _cdiv(K, 128)) if need_da else 1
    db_part = _split_buffer(db_splits, (N, R) if need_db else (0, R), dev)
    colsum_part = _split_buffer(db_splits, (N,) if need_db else (0,), dev)
    n_cnt = _cdiv(K, _CNT_COLS) if da_splits > 1 else 0
    cnt = _empty((n_cnt,), dev, torch.int32) if n_cnt else _stand_in(dev, torch.int32, wrap)
    if one_pass:
        # The dT partials, one per column block: the fixed tiles' count, which no tuning config exceeds (test:
        # test_dy_one_read_rule). Their arrival counters, one per row block of at least 32 rows, zeroed here: a memset
        # launch, nothing of ours running before this kernel to zero them.
        n_part = _cdiv(N, dy1_cfg["BLOCK_N"])
        dt_part = _empty((n_part if n_part > 1 else 0, M, R), dev, torch.float32)
        dt_cnt = torch.zeros((_cdiv(M, 32) if n_part > 1 else 0,), device=dev, dtype=torch.int32)

        def dy1_grid(META):
            if _cdiv(N, META["BLOCK_N"]) > n_part or META["BLOCK_M"] < 32:  # (a table the buffers do not fit)
                raise ValueError(f"_bwd_dy1_kernel: tiles {META['BLOCK_M']}x{META['BLOCK_N']} exceed its buffers")
            return (_cdiv(N, META["BLOCK_N"]) * db_splits,)

        _launch(
            _bwd_dy1_kernel,
            dy1_grid,
            (dy, lora_B, t, dt_part, dt, db_part, colsum_part, dt_cnt, cnt, M, N, R, MB, db_splits, n_cnt,
             *dy.stride(), *lora_B.stride(), t.stride(0), max(dt_part.stride(0), 1),
             max(dt.stride(0), 1), max(db_part.stride(-2), 1), _split_stride(db_part, db_splits),
             _split_stride(colsum_part, db_splits), scaling),
            dict(CDT=cdt, IEEE=ieee, BLOCK_R=BR),
            dy1_cfg,
            wrap,
        )  # fmt: skip
    elif do_dt or need_db:
        _launch(
            _bwd_dy_kernel,
            lambda META: ((_cdiv(M, META["BLOCK_M"]) if do_dt else 0)
                          + (_cdiv(N, META["BLOCK_N"]) * db_splits if need_db else 0),),
            (dy, lora_B, t, dt, db_part, colsum_part, cnt, M, N, R, MB, db_splits, cnt.shape[0],
             *dy.stride(), *lora_B.stride(), t.stride(0), max(dt.stride(0), 1),
             max(db_part.stride(-2), 1), _split_stride(db_part, db_splits), _split_stride(colsum_part, db_splits),
             scaling),
            dict(DO_DT=do_dt, DO_DB=need_db, CDT=cdt, IEEE=ieee, BLOCK_R=BR),
            _dy_cfg(fixed, lora_B),
            wrap,
        )  # fmt: skip
    dx = _empty((M, K) if need_dx else (0, K), dev, x.dtype)
    if not (need_dx or need_da):
        return (
            dx,
            _empty((R, K), dev, torch.float32),
            _sum_splits(db_part, db_splits),
            _sum_splits(colsum_part, db_splits),
        )
    # The sums' operands: partials in, outputs out. With one split the dY kernel wrote the outputs and there is
    # nothing to sum: an empty stand-in takes the four places (and dA's output's, below), so that
    # torch.compile's analysis of what the dX kernel writes names none of the dY kernel's outputs.
    spare = _stand_in(dev, torch.float32, wrap)
    if db_splits == 1:
        db, colsum, sums, red_tiles = db_part, colsum_part, (spare,) * 4, 0
    else:
        db, colsum = _empty((N, R), dev, torch.float32), _empty((N,), dev, torch.float32)
        sums, red_tiles = (db_part, colsum_part, db, colsum), _cdiv(N * R + N, _RED_BLOCK.value)
    lo, hi = _seed_parts(seed)
    bits_stride = max(bits.stride(0), 1)
    seeds = (lo, hi, dropout_threshold(p), 1.0 / (1.0 - p))
    traced = _traced(wrap)
    w_tma, w_kn = _tma_weight(weight)
    if need_dx and _tma_ok(dy, w_tma, dx, traced=traced):
        # Above rank 128 dA takes its own launch: in the dX kernel its (256, BK) fp32 accumulator and dTᵀ tiles
        # spilled registers (up to 0.5 KB a thread under Triton 3.6 / 3.8), whatever the row step.
        fused_da = need_da and BWD_DA == "fused" and BR <= 128
        splits = da_splits if fused_da else 1
        da_part = _split_buffer(splits, (R, K) if fused_da else (0, K), dev)
        da = _split_result(da_part, splits, (R, K) if fused_da else (0, K))
        da_out = da if splits > 1 else spare
        n_da = (lambda META: _cdiv(K, META["BLOCK_K"]) * splits) if fused_da else (lambda META: 0)
        # SPLIT_STORE: a tuning config's (see the kernel), False for the fixed tiles. Not a default argument: torch's
        # analysis of what a traced kernel writes fails on one and takes every tensor argument as written.
        fixed = {"SPLIT_STORE": False, **_tma_cfg(x, R, backward=True, regenerate=has_dropout and not load_bits)}
        sms = _grid_sms(x)
        device_desc = traced or TMA_DESC == "device"
        dy_desc, w_desc, dx_desc = _tma_operands(
            device_desc, fixed, (dy, "BLOCK_M", "BLOCK_N"), (w_tma, *_W_TILES[w_kn]), (dx, "BLOCK_M", "BLOCK_K")
        )
        if not device_desc and _dx_halves(fixed["BLOCK_M"], fixed["BLOCK_K"], has_dropout, fixed.get("SPLIT_STORE")):
            dx_desc.block_shape = [fixed["BLOCK_M"], fixed["BLOCK_K"] // 2]
        _launch(
            _bwd_dx_tma_kernel,
            # At least min(sms, red_tiles) programs: the persistent walk of the sum tiles steps by NUM_SMS.
            lambda META: (min(sms, max(_cdiv(M, META["BLOCK_M"]) * _cdiv(K, META["BLOCK_K"]) + n_da(META),
                                       red_tiles)),),
            (dy_desc, w_desc, dx_desc, dt, lora_A, x, bits, da_part, da_out, cnt, *sums, M, N, K, R, MB, splits,
             db_splits, red_tiles, dt.stride(0), *lora_A.stride(), *x.stride(),
             bits_stride, max(da_part.stride(-2), 1), _split_stride(da_part, splits), dy.stride(0), w_tma.stride(0),
             dx.stride(0), *seeds),
            dict(DO_DA=fused_da, HAS_DROPOUT=has_dropout, LOAD_BITS=load_bits, CDT=cdt, BLOCK_R=BR, DO_DX=True,
                 OUT_DT=_TL_DTYPE[dx.dtype], NUM_SMS=sms, DEVICE_DESC=device_desc, FLATTEN=TMA_FLATTEN and not traced,
                 W_KN=w_kn),
            fixed,
            wrap,
        )  # fmt: skip
        if fused_da or not need_da:
            return dx, da if fused_da else _empty((R, K), dev, torch.float32), db, colsum
        return dx, launch_da(x, lora_A, dt, bits, p, seed, wrap, counters=cnt), db, colsum
    da_part = _split_buffer(da_splits, (R, K), dev)
    da = _split_result(da_part, da_splits, (R, K))
    n_da = (lambda META: _cdiv(K, META["BLOCK_K"]) * da_splits) if need_da else (lambda META: 0)
    n_dx = (lambda META: _cdiv(M, META["BLOCK_M"]) * _cdiv(K, META["BLOCK_K"])) if need_dx else (lambda META: 0)
    _launch(
        _bwd_dx_kernel,
        lambda META: (red_tiles + n_dx(META) + n_da(META),),
        (dy, weight, dt, lora_A, x, bits, dx, da_part, da if da_splits > 1 else spare, cnt, *sums, M, N, K, R, MB,
         da_splits, db_splits,
         red_tiles, *dy.stride(), *weight.stride(), dt.stride(0),
         *lora_A.stride(), *x.stride(), bits_stride,
         max(dx.stride(0), 1), dx.stride(1), da_part.stride(-2), _split_stride(da_part, da_splits), *seeds),
        dict(DO_DA=need_da, HAS_DROPOUT=has_dropout, LOAD_BITS=load_bits, CDT=cdt, BLOCK_R=BR, DO_DX=need_dx,
             IEEE=ieee),
        fixed,
        wrap,
    )  # fmt: skip
    return dx, da, db, colsum


def _split_buffer(splits: int, shape: tuple, device: torch.device) -> torch.Tensor:
    """fp32 partials of a row-split reduction: (splits, *shape), or the result itself when there is one split
    (the kernel then writes the output directly: no sum, and under torch.compile the output is a kernel's)."""
    return _empty(shape if splits == 1 else (splits, *shape), device, torch.float32)


def _split_stride(part: torch.Tensor, splits: int) -> int:
    return 0 if splits == 1 else part.stride(0)


def _sum_splits(part: torch.Tensor, splits: int) -> torch.Tensor:
    """The sum of a row-split reduction's partials, in a fixed order (deterministic), by torch: only where no
    later launch of ours can sum them (dB when neither x nor lora_A takes a gradient)."""
    return part if splits == 1 else part.sum(0)


def _split_result(part: torch.Tensor, splits: int, shape: tuple) -> torch.Tensor:
    """The output a kernel sums a row-split reduction's partials into: the partials' buffer itself when there
    is one split (the kernel writes it directly)."""
    return part if splits == 1 else _empty(shape, part.device, torch.float32)


def launch_da(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    dt: torch.Tensor,
    bits: torch.Tensor,
    p: float,
    seed: int,
    wrap=_identity,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """dA (r, K) fp32 = dTᵀ·(x ⊙ keep)/(1-p), one pass over x (and the bits), as a launch of its own: the dA
    programs of ``_bwd_dx_kernel`` (no dX tiles), split over rows (``_row_splits``), the last of each K-block
    summing its partials. x: (M, K), dt: (M, r) fp32, bits: the packed mask or empty (regenerated from ``seed``
    at p > 0); counters: ⌈K/16⌉ int32 zeros for those arrivals (the dY kernel zeroes them), else allocated
    zeroed here."""
    M, K = x.shape
    R = lora_A.shape[0]
    cdt, ieee = _compute_dtype(x)
    splits = _row_splits(x, _cdiv(K, 128))
    da_part = _split_buffer(splits, (R, K), x.device)
    da = _split_result(da_part, splits, (R, K))
    if counters is None or counters.numel() < _cdiv(K, _CNT_COLS) * (splits > 1):
        counters = torch.zeros(_cdiv(K, _CNT_COLS) if splits > 1 else 0, device=x.device, dtype=torch.int32)
    lo, hi = _seed_parts(seed)
    has_dropout = p > 0.0
    # The dX operands (dY, W, dX) and the dB sums' are compiled out or idle (DO_DX=False, no sum tiles): da_part,
    # which the launch writes anyway, stands in for them, so that torch.compile's analysis of what the kernel
    # writes names no input.
    _launch(
        _bwd_dx_kernel,
        lambda META: (_cdiv(K, META["BLOCK_K"]) * splits,),
        (da_part, da_part, dt, lora_A, x, bits, da_part, da_part, da, counters, da_part, da_part, da_part, da_part,
         M, 0, K, R, _m_bucket(M), splits, 1, 0,
         0, 0, 0, 0, dt.stride(0), *lora_A.stride(), *x.stride(),
         max(bits.stride(0), 1), 0, 0, da_part.stride(-2), _split_stride(da_part, splits),
         lo, hi, dropout_threshold(p), 1.0 / (1.0 - p)),
        dict(DO_DX=False, DO_DA=True, HAS_DROPOUT=has_dropout, LOAD_BITS=has_dropout and bool(bits.numel() > 0),
             CDT=cdt, BLOCK_R=_block_r(R), IEEE=ieee),
        _cfg(x, R),
        wrap,
    )  # fmt: skip
    return da


# ----------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile sees (eager calls skip the dispatcher, see below)
# ----------------------------------------------------------------------------------------------


def _check_op_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_bias: torch.Tensor | None,
    p: float,
    *,
    dy: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    bits: torch.Tensor | None = None,
) -> None:
    """The registered ops' own checks (RuntimeError, as the CUDA ops' TORCH_CHECKs). ``lora_linear``
    checks the user's call once and the autograd Function hands the launchers consistent tensors, so
    eager calls skip these; the ops themselves can be reached directly (``torch.ops.lora_kernels.*``,
    an exported graph replayed on other inputs), and the kernels index by these shapes without bounds
    on every operand, so a wrong size here would be an out-of-bounds read on the GPU."""

    def need(cond, msg) -> None:  # msg: a callable, so the message is built only on failure
        torch._check(cond, lambda: f"lora_kernels triton op: {msg()}")

    dims = (x.dim(), weight.dim(), lora_A.dim(), lora_B.dim())
    need(dims == (2, 2, 2, 2), lambda: f"x, weight, lora_A, lora_B must be 2-D, got {dims}")
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    need(x.dtype in (torch.float16, torch.bfloat16, torch.float32), lambda: f"x must be fp16/bf16/fp32, got {x.dtype}")
    need(weight.dtype == x.dtype, lambda: f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    need(weight.shape[1] == K, lambda: f"weight must be (N, K = {K}), got {tuple(weight.shape)}")
    need(R >= 1 and lora_A.shape[1] == K, lambda: f"lora_A must be (r >= 1, K = {K}), got {tuple(lora_A.shape)}")
    need(tuple(lora_B.shape) == (N, R), lambda: f"lora_B must be (N, r) = ({N}, {R}), got {tuple(lora_B.shape)}")
    need(
        lora_A.dtype == lora_B.dtype and lora_A.dtype in (torch.float16, torch.bfloat16, torch.float32),
        lambda: f"lora_A and lora_B must share one of fp16/bf16/fp32, got {lora_A.dtype}, {lora_B.dtype}",
    )
    for name, v in (("bias", bias), ("lora_bias", lora_bias)):
        if v is not None:
            need(tuple(v.shape) == (N,), lambda name=name, v=v: f"{name} must be (N,) = ({N},), got {tuple(v.shape)}")
    need(0.0 <= p < 1.0, lambda: f"p must be in [0, 1), got {p}")
    if dy is not None:
        need(
            tuple(dy.shape) == (M, N) and dy.dtype == x.dtype,
            lambda: f"dy must be (M, N) = ({M}, {N}) in {x.dtype}, got {tuple(dy.shape)} {dy.dtype}",
        )
    if t is not None:
        need(
            tuple(t.shape) == (M, R) and t.dtype == torch.float32 and (R == 1 or t.stride(1) == 1),
            lambda: f"t must be (M, r) = ({M}, {R}) float32, unit column stride, got {tuple(t.shape)} {t.dtype}",
        )
    if bits is not None:
        G = (K + 7) // 8
        shaped = tuple(bits.shape) == (M, G) and (G == 1 or bits.stride(1) == 1)
        need(
            bits.dtype == torch.uint8 and (bits.numel() == 0 or shaped),
            lambda: f"bits must be empty (regenerate) or uint8 (M, ceil(K/8)) = ({M}, {G}), unit column stride, "
            f"got {tuple(bits.shape)} {bits.dtype}",
        )
    named = (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias), ("lora_bias", lora_bias))
    for name, v in (*named, ("dy", dy), ("t", t), ("bits", bits)):
        if v is not None:
            need(v.device == x.device, lambda name=name, v=v: f"{name} is on {v.device} but x is on {x.device}")


@torch.library.triton_op("lora_kernels::triton_lora_fwd", mutates_args=())
def triton_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_bias: torch.Tensor | None,
    scaling: float,
    p: float,
    seed: int,
    store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Op form of :func:`lora_fwd`: ``(y (M, N), T (M, r) fp32, bits (M, ⌈K/8⌉) uint8 or empty)``."""
    _check_op_args(x, weight, bias, lora_A, lora_B, lora_bias, p)
    wrap = _op_body_wrap(x)
    return lora_fwd(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, store_mask, wrap=wrap)


@torch.library.triton_op("lora_kernels::triton_lora_bwd", mutates_args=())
def triton_lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    t: torch.Tensor,
    bits: torch.Tensor,
    scaling: float,
    p: float,
    seed: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Op form of :func:`lora_bwd`: ``(dx, dA, dB, Σ_m dY)``."""
    _check_op_args(x, weight, None, lora_A, lora_B, None, p, dy=dy, t=t, bits=bits)
    wrap = _op_body_wrap(x)
    return lora_bwd(dy, x, weight, lora_A, lora_B, t, bits, scaling, p, seed, need_dx, need_da, need_db, wrap=wrap)


_flops.register(torch.ops.lora_kernels.triton_lora_fwd, torch.ops.lora_kernels.triton_lora_bwd)


def _opaque_under_functionalization(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


if _interpret():
    # torch.compile's AOTAutograd decomposes a triton_op into its kernels by running the body on
    # functional tensors, which only wrap_triton kernels can take; the interpreter's kernels cannot be
    # wrapped (torch ≤ 2.11) and would read the functional tensors' data. Under the interpreter the ops
    # stay whole in the graph instead (as torch.export keeps them), so a compiled graph calls them on
    # real tensors and they run the interpreted eager kernels. On a GPU the decomposition stands.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for _op in (triton_lora_fwd, triton_lora_bwd):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)


def _fwd(*args):
    # Eager: call the launcher directly (the dispatcher costs µs per call, visible at small M).
    # Under torch.compile or a dispatch mode (fake tensors, FLOP counting): the registered op.
    if use_registered_op():
        _flops.reach_active_counters()
        return triton_lora_fwd(*args)
    # The launches of a layout replay from their plan (launch.py) after the first call, and the whole call from its
    # call plan where it can; the seed (args[8]) varies.
    if TMA_DESC == "device" and not _interpret():
        _ensure_allocator()  # (as _launch does: a call plan's replay does not go through it)
    return _plans.planned(_plans.plan_key("fwd", args, 8), lora_fwd, *args, varying=8, derive=_seed_values)


def _bwd(*args, bwd_mode: str | None = None):
    if use_registered_op():
        _flops.reach_active_counters()
        return triton_lora_bwd(*args)
    if TMA_DESC == "device" and not _interpret():
        _ensure_allocator()
    key = _plans.plan_key(("bwd", bwd_mode), args, 9)  # (args[9]: the seed)
    return _plans.planned(key, lora_bwd, *args, varying=9, derive=_seed_values, bwd_mode=bwd_mode)


def _seed_values(seed: int) -> dict:
    """The values of the VARYING kernel parameters (launch.py) for ``seed``: what a call plan passes."""
    lo, hi = _seed_parts(seed)
    return {"seed_lo": lo, "seed_hi": hi}


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class LoRALinearTriton(torch.autograd.Function):
    """Autograd wrapper: saves x, T and the bitmask (or nothing for the mask in regenerate mode)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode, recompute=None):
        store_mask = mask_mode == "bitmask"
        y, t, bits = _fwd(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, store_mask)
        # With a WeightRecompute the weight is not kept: backward asks for it again.
        ctx.save_for_backward(x, weight if recompute is None else None, lora_A, lora_B, t, bits)
        ctx.scaling, ctx.p, ctx.seed, ctx.recompute = scaling, p, seed, recompute
        ctx.bwd_mode = BWD_MODE  # the backward follows the mode in force when the forward ran
        ctx.has_bias, ctx.has_lbias = bias is not None, lora_bias is not None
        ctx.lbias_dtype = lora_bias.dtype if lora_bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, bits = ctx.saved_tensors
        if ctx.recompute is not None:
            weight = ctx.recompute.get(ctx.needs_input_grad[1])
        nx, nw, nb, na, nB, nlb = ctx.needs_input_grad[:6]
        dy = dy if dy.dtype == x.dtype else dy.to(x.dtype)
        if torch.is_grad_enabled():
            # backward(create_graph=True): the kernels' gradients have no autograd history, so a
            # double backward would silently see constants. The reference's graph gives them one.
            grads = lora_linear_ref_grads(dy, x, weight, lora_A, lora_B, ctx.has_bias, ctx.has_lbias,
                                          ctx.scaling, ctx.p, ctx.seed, ctx.needs_input_grad)  # fmt: skip
            return (*grads, None, None, None, None, None)
        dx, da, db, colsum = _bwd(
            dy, x, weight, lora_A, lora_B, t, bits, ctx.scaling, ctx.p, ctx.seed, nx, na, nB,
            bwd_mode=ctx.bwd_mode,
        )  # fmt: skip
        if not nB and ((nlb and ctx.has_lbias) or (nb and ctx.has_bias)):
            # lora_B frozen: no dB = dYᵀ·T, only Σ_m dY (fp32 accumulation, no fp32 copy of dY).
            colsum = torch.sum(dy, 0, dtype=torch.float32)
        grad_x = dx if nx else None
        grad_A = da.to(lora_A.dtype) if na else None
        grad_B = db.to(lora_B.dtype) if nB else None
        grad_lb = (colsum * ctx.scaling).to(ctx.lbias_dtype) if (nlb and ctx.has_lbias) else None
        grad_b = colsum.to(weight.dtype) if (nb and ctx.has_bias) else None
        # The frozen weight normally needs no gradient; when it does, cuBLAS computes dYᵀ·x in x's
        # dtype (= weight's), accumulating in fp32 as nn.Linear does: no fp32 copies of dY and x, no
        # fp32 (non-tensor-core) GEMM.
        grad_w = dy.t().mm(x) if nw else None
        return grad_x, grad_w, grad_b, grad_A, grad_B, grad_lb, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public (backend contract of lora_kernels/backends.py)
# ----------------------------------------------------------------------------------------------


def unavailable_reason(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> str | None:
    """None if the Triton kernels can run on these tensors, else the reason."""
    if x.device.type == "cpu":
        if not _interpret():
            return "x is on the CPU: Triton kernels need a GPU (or TRITON_INTERPRET=1 for testing)"
    elif x.device.type != "cuda":
        return f"Triton kernels run on CUDA GPUs, x is on {x.device.type}"
    elif torch.bfloat16 in (x.dtype, lora_A.dtype) and device_capability(x.device) < (8, 0):
        return "bfloat16 needs an sm_80 or newer GPU for the Triton kernels (this one is older): use float16"
    return _support_reason(x, lora_A)


def _support_reason(x: torch.Tensor, lora_A: torch.Tensor) -> str | None:
    """None if the kernels support these dtypes and this rank (wherever the tensors are), else why not."""
    if x.dtype not in _SUPPORTED:
        return f"Triton kernels support float16, bfloat16 and float32 activations, got {x.dtype}"
    if lora_A.dtype not in _SUPPORTED:
        return f"Triton kernels support float16, bfloat16 and float32 adapters, got {lora_A.dtype}"
    if lora_A.shape[0] > 256:
        return f"Triton kernels support LoRA ranks up to 256, got r = {lora_A.shape[0]}"
    return None


def dropout_bitmask(seed: int, M: int, K: int, p: float, device: torch.device | str = "cuda") -> torch.Tensor:
    """The packed keep bits ``(M, ceil(K/8))`` uint8 exactly as the forward kernel writes them
    (layout of ``reference.pack_mask``): ``verify`` compares them with the reference bit for bit."""
    if p <= 0.0 or M == 0 or K == 0:  # nothing to launch; p = 0 keeps everything
        return pack_mask(torch.ones((M, K), dtype=torch.bool, device=device))
    x = torch.zeros((M, K), device=device, dtype=torch.float32)
    a = torch.zeros((1, K), device=device, dtype=torch.float32)
    return lora_fwd(x, a, None, a, torch.zeros((1, 1), device=device), None, 1.0, p, seed, True)[2]


def lora_linear_2d(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode, recompute=None):
    """The backend contract (see lora_kernels/backends.py): x (M, K) -> y (M, N)."""
    M, K = x.shape
    if M == 0 or K == 0 or weight.shape[0] == 0:
        # Degenerate sizes: nothing to launch; the reference gives the right (empty/zero) results.
        return lora_linear_ref(x, weight, lora_A, lora_B, bias, lora_bias, scaling, p, True, seed)
    return LoRALinearTriton.apply(x, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, mask_mode, recompute)


_plans.watch(__name__)  # (last: call plans compare this module's generation while it is not rebound, launch.py)
