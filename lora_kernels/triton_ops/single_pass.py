"""Single-pass fused LoRA forward and backward (Hopper, opt-in): x streamed once forward, dY once less backward.

    y = x Wᵀ + bias + s · (dropout(x) Aᵀ Bᵀ + lora_bias)        x: (M, K), W: (N, K), A: (r, K), B: (N, r)

The two-launch forward (``lora_linear.py``) pays a separate pass over x for T = dropout(x)·Aᵀ: 10–15 %
of the GEMM at N = 4096 (bench/NOTES.md). Here T and the mask bits come from the x tiles that the
persistent TMA GEMM loads anyway. Every output tile (m, n) needs all of T[m] (a sum over all of K) in
its epilogue, so the shrink work of row-block m is split across its first S tiles, the producers:

  1. producer (m, n < S) first runs the shrink over its K-slice n = K-blocks [n·kt/S, (n+1)·kt/S):
     it generates the Philox mask there (storing the bits), accumulates the partial
     T_n[m] = (x ⊙ keep)·Aᵀ, stores it (fp32) and arrives at row m's barrier (the last to arrive
     publishes), without waiting;
  2. every tile (producer or consumer) runs the plain pipelined GEMM loop over all of K;
  3. then waits for row m's barrier, sums the S partials in a fixed order (deterministic), tile (m, 0)
     stores T[m] for backward, and the epilogue adds (s·T)·Bᵀ, bias and s·lora_bias before the TMA
     store of y.
``LORA_KERNELS_SP_SLICE=fused`` (``FUSED_SLICE``) instead runs a producer's slice steps inside its GEMM
loop over all of K, the GEMM's wgmma in flight while the mask is made, and arrives after the loop (an
A/B for a GPU). In the default, a producer's slice is read twice, once by its shrink and once by its
GEMM (from L2: 1/S of a row-block of x per producer), and arriving before the GEMM means no tile waits
for a producer's GEMM or Philox. The first version ran the slice's shrink and GEMM steps in one loop and
the rest of K in a second loop that continued the accumulator: from that pair, Triton 3.6's PTX (the GPU
image's) made ptxas serialise every wgmma of the kernel (C7515; the likely cause of the 1.5–1.9× cuBLAS
measured in session 28, bench/NOTES.md session 31); neither loop structure here does. No M×K or M×N
intermediate exists; the extra traffic is S partials (S·BM·r·4 bytes read per tile, from L2). S and the
grid come from ``_plan``: S = all nt tiles of a row-block when the grid can hold whole row-blocks per
round (nt = 16 at N = 4096: 128 of 132 SMs), else S = min(nt, MAX_PRODUCERS). With ``REDUCE_LEVELS = 2``
(LORA_KERNELS_SP_REDUCE=2) producer j instead sums rows [j·BM/S, (j+1)·BM/S) of all S partials into T
after its GEMM, the producers meet at a second barrier, and every tile reads T (BM·r·4 bytes): fewer L2
reads for one more barrier latency, an A/B for a GPU measurement.

The walk (``_walk_tile``). Program p of the persistent grid of P programs takes tiles p, p + P,
p + 2P, … of a walk that goes through groups of GROUP_M row-blocks: in each group first the S
producers of every row-block (row by row), then its consumers column by column, so the group's
row-blocks read each W tile back to back, as the two-launch GEMM's grouped order does. (A row-major
walk reads all of W once per round of the grid: at N = 14336 that is 117 MB a round, past the L2.)

Deadlock freedom. The walk puts each row-block's S producers at consecutive positions [a, a + S) and
all its consumers after them. Arrivals never wait; the only wait (after the GEMM) is for the S
producers of the tile's own row-block. If every program is resident (persistent grid P ≤ #SMs, one
CTA per SM) and S ≤ P, by induction on the position t: suppose every tile before t completes; tile t's
program has reached it (its earlier tiles are before t). A consumer's producers are all before t:
arrived. A producer's fellow producers after it, at u < a + S, were preceded on their programs only
by tiles at u − P, u − 2P, … < a + S − P ≤ a ≤ t, all complete, so they run and arrive. Either way
the barrier opens and t completes (in the backward, the dB tiles at the head of the walk never wait,
so they do not change the argument; the two-level reduction's second barrier follows the first, whose
arrivals all happen). A producer group that straddles two rounds costs its early members a
wait, not a deadlock. Where residency does not hold (MPS or green contexts that cap a process below
its grid, a GPU shared with long-running kernels), a wait is still bounded: after ``max_spins`` polls
a tile recomputes T from x itself (slice by slice, in the producers' order) and counts it
(``barrier_fallbacks``) — correct and slower, never a hang.

The barrier lives in a small int32 buffer owned by this module (per device and stream, zeroed once):
per row-block an arrival count, which the last producer resets, and a flag into which it writes the
launch's epoch, which everyone waits for. The epoch lives on the device, in the same buffer: every
program reads it when the launch starts and the last program to exit advances it, so each launch (an
autotuner's repeated call with the same arguments) waits for its own epoch, and no memset or host
bookkeeping is needed per call. A launch captured into a CUDA graph gets words of its own instead,
zeroed by a memset node just before it in the graph: every replay starts from epoch 0, and neither
eager calls on the capture stream nor the graph replayed on another stream share them.
Ordering: all warps' partial stores, ``debug_barrier`` (CTA), then an acq_rel arrival / release
publish at GPU scope; waiters acquire, then ``debug_barrier`` again before any warp reads partials.

The backward (``_bwd_single_pass_kernel``) applies the same scheme to dT = s·dY·B inside the dX GEMM dX
= dY·W + (dT·A) ⊙ keep/(1-p): the first tiles of each row-block of dX first compute N-slices of dT from
dY (read again by their GEMM, from L2) and arrive at the same kind of barrier, and every tile sums the
partials for its epilogue after its GEMM; the dB = s·dYᵀ·T and Σ dY reductions are tiles at the head of
the walk (they never wait); dA = dTᵀ·(x ⊙ keep)/(1-p) follows in a second launch, since x is not an
operand of the dX GEMM.

The CPU interpreter runs the programs of a grid one after another, where any barrier would spin
forever. There the kernel runs as two launches of the same code (PHASE 1: the shrink slices and
partials; PHASE 2: the GEMM, the fixed-order sum and the epilogue), unless ``INTERPRETER_PHASES`` is
False, which tests set while running the programs concurrently (tests/_concurrent_interp.py):
then the real barrier runs, with real atomics, on the CPU.
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..reference import dropout_threshold
from . import lora_linear as _ll  # _ll._empty: tests swap in a NaN-poisoning allocator
from .launch import planned_launch as _planned_launch
from .launch import watch as _watch
from .lora_linear import (
    _TL_DTYPE,
    TensorDescriptor,
    _block_r,
    _cdiv,
    _compute_dtype,
    _db_block,
    _dx_epilogue_t,
    _dy_dot_w,
    _fwd_epilogue_t,
    _grid_sms,
    _interpret,
    _load_cast,
    _m_bucket,
    _mask_and,
    _seed_parts,
    _shrink_step,
    _x_dot_wt,
)

__all__ = ["single_pass_reason", "lora_fwd_single_pass", "lora_bwd_single_pass", "barrier_fallbacks"]

# The interpreter runs the kernel as two phased launches (see the module docstring); tests that
# execute the programs concurrently set this to False to run the real barrier.
INTERPRETER_PHASES = True


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


# SYNC layout (int32): [0] the epoch of the last completed launch, [1] programs exited in this launch,
# then 4 words per row-block from 2 + 4·row: (producer arrivals, flag) of the barrier after the
# partials, and (arrivals, flag) of the second barrier of the two-level reduction (REDUCE_LEVELS = 2).
@triton.jit
def _launch_epoch(SYNC):
    """This launch's epoch: one past the last completed launch's. Every program reads the same value:
    the word only changes once every program of this launch has exited (``_exit_launch``)."""
    return tl.atomic_add(SYNC, 0, sem="acquire") + 1


@triton.jit
def _exit_launch(SYNC, epoch):
    """Count this program out; the last one resets the count and publishes the epoch as completed."""
    tl.debug_barrier()
    exited = tl.atomic_add(SYNC + 1, 1, sem="acq_rel")
    if exited == tl.num_programs(0) - 1:
        tl.atomic_xchg(SYNC + 1, 0, sem="relaxed")
        tl.atomic_xchg(SYNC, epoch, sem="release")


@triton.jit
def _arrive(WORDS, n_producers, epoch):
    """A producer's arrival at its row-block's barrier (after storing its partial); the last of the
    n_producers resets the count for the next launch and publishes ``epoch`` in the flag. Does not wait:
    a producer arrives before its own GEMM loop, so nobody waits for its GEMM (see the kernel)."""
    count_ptr = WORDS
    tl.debug_barrier()  # every warp's partial stores precede this CTA's arrival
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == n_producers - 1:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")  # every producer of this launch has arrived
        tl.atomic_xchg(count_ptr + 1, epoch, sem="release")


@triton.jit
def _publish(P, j, stride_pn, p_off, p, p_mask, WORDS, NUM_PROD, epoch, PHASE: tl.constexpr):
    """Producer j's partial stored (unscaled: see ``_sum_partials``) and, in the one-launch mode, its arrival."""
    tl.store(P + j.to(tl.int64) * stride_pn + p_off, p, mask=p_mask)
    if PHASE == 0:
        _arrive(WORDS, NUM_PROD, epoch)


@triton.jit
def _wait_open(WORDS, epoch, max_spins):
    """Wait until the row-block's flag holds ``epoch``; False if that did not happen within ``max_spins``
    polls (the caller then recomputes). The flag holds the epoch of the last launch whose producers all
    arrived, so a value left by an earlier launch never opens this one."""
    flag_ptr = WORDS + 1
    cur = tl.atomic_add(flag_ptr, 0, sem="acquire")
    spins = 0
    while (cur != epoch) & (spins < max_spins):
        cur = tl.atomic_add(flag_ptr, 0, sem="acquire")
        spins += 1
    tl.debug_barrier()  # no warp reads the partials before the acquire
    return cur == epoch


@triton.jit
def _row_barrier(WORDS, n_producers, epoch, max_spins, IS_PRODUCER):
    """Producers arrive, everyone waits until the last producer has published (``_arrive``, ``_wait_open``)."""
    if IS_PRODUCER:
        _arrive(WORDS, n_producers, epoch)
    else:
        tl.debug_barrier()
    return _wait_open(WORDS, epoch, max_spins)


@triton.jit
def _producer_slice(pid_in_row, n_blocks, NUM_PROD):
    """(is_producer, first block, end block) of this tile's share of the reduction dimension: the first
    NUM_PROD tiles of a row-block split the n_blocks blocks evenly; consumers get an empty slice."""
    is_producer = pid_in_row < NUM_PROD
    lo = tl.where(is_producer, pid_in_row * n_blocks // NUM_PROD, 0)
    hi = tl.where(is_producer, (pid_in_row + 1) * n_blocks // NUM_PROD, 0)
    return is_producer, lo, hi


@triton.jit
def _walk_tile(t, num_pid_m, nt, NUM_PROD, GROUP_M: tl.constexpr):
    """(row-block, column tile) of the t-th tile of the persistent walk over num_pid_m × nt tiles. Groups of
    GROUP_M row-blocks, one after another; in each, first the NUM_PROD producers of every row-block (row by
    row: a row-block's producers are consecutive), then the consumers column by column, so that the group's
    row-blocks read each W tile back to back (from L2) — a row-major walk reads all of W once per round of
    the grid, 117 MB at N = 14336: more than the L2. Every row-block's producers precede its consumers."""
    per_group = GROUP_M * nt
    g = t // per_group
    first_m = g * GROUP_M
    gm = tl.minimum(num_pid_m - first_m, GROUP_M)
    local = t - g * per_group
    n_prod = gm * NUM_PROD
    is_prod = local < n_prod
    c = tl.maximum(local - n_prod, 0)
    pid_m = first_m + tl.where(is_prod, local // NUM_PROD, c % gm)
    pid_n = tl.where(is_prod, local % NUM_PROD, NUM_PROD + c // gm)
    return pid_m, pid_n


@triton.jit
def _fused_range(n_blocks, lo, hi, PHASE: tl.constexpr):
    """The blocks a fused-slice loop walks: all n_blocks (the GEMM), or in the interpreter's first launch
    (PHASE 1, the shrink alone) the producer's slice [lo, hi) only."""
    first, end = 0, n_blocks
    if PHASE == 1:  # (an assignment, not an early return: Triton goes on past a return under a constexpr if)
        first, end = lo, hi
    return first, end


@triton.jit
def _sum_partials(P, stride_pn, p_off, p_mask, NUM_PROD, scale, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """scale · Σ_j P[j] over the NUM_PROD (unscaled) partials of one (BM, BLOCK_R) tile, in a fixed order
    (deterministic). The fallback recomputations (_recompute_t, _recompute_dt) do exactly these
    operations: adds in the same order, then one multiply. (Scaling each partial before its store
    instead would let the compiler fuse the fallback's multiply and add into an FMA, one rounding fewer:
    other bits than the partials' path.)"""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # U partials' loads in flight at a time (one after another, each waited out, they were S L2 round trips
    # per tile: 16 at N = 4096), then added one by one in the same order: the same sum, bit for bit. U·BLOCK_R
    # ≤ 64 keeps the loads in flight at ≤ 32 registers a thread next to the live accumulator tile.
    # .cg: read at L2, where the other SMs' stores are (never a stale L1 line).
    U: tl.constexpr = 4 if BLOCK_R <= 16 else (2 if BLOCK_R <= 32 else 1)
    # In 64 bits: j·stride and 2·stride, 3·stride pass 2**31 once the partials do (NUM_PROD·M·r elements).
    step = tl.cast(stride_pn, tl.int64)
    for j0 in range(0, NUM_PROD, U):
        ptrs = P + j0 * step + p_off
        p0 = tl.load(ptrs, mask=p_mask, other=0.0, cache_modifier=".cg")
        if U > 1:
            p1 = tl.load(ptrs + step, mask=_mask_and(p_mask, j0 + 1 < NUM_PROD), other=0.0, cache_modifier=".cg")
        if U > 2:
            p2 = tl.load(ptrs + 2 * step, mask=_mask_and(p_mask, j0 + 2 < NUM_PROD), other=0.0, cache_modifier=".cg")
            p3 = tl.load(ptrs + 3 * step, mask=_mask_and(p_mask, j0 + 3 < NUM_PROD), other=0.0, cache_modifier=".cg")
        acc += p0
        if U > 1:
            if j0 + 1 < NUM_PROD:
                acc += p1
        if U > 2:
            if j0 + 2 < NUM_PROD:
                acc += p2
            if j0 + 3 < NUM_PROD:
                acc += p3
    return acc * scale


@triton.jit
def _slice_rows(p_mask, pid_in_row, NUM_PROD, BLOCK_M: tl.constexpr):
    """p_mask restricted to this producer's rows of the tile for the two-level reduction: producer j
    sums rows [j·BM/S, (j+1)·BM/S) of all S partials (the slices partition the BM rows)."""
    rows = tl.arange(0, BLOCK_M)
    lo = pid_in_row * BLOCK_M // NUM_PROD
    hi = (pid_in_row + 1) * BLOCK_M // NUM_PROD
    return p_mask & ((rows >= lo) & (rows < hi))[:, None]


@triton.jit
def _recompute_t(x_desc, A, BITS, offs_m, off_m, M, K, R, k_tiles, NUM_PROD, stride_ar, stride_ak, stride_bm,
                 seed_lo, seed_hi, threshold, keep_scale,
                 HAS_DROPOUT: tl.constexpr, CDT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """T for one row-block from x, slice by slice in the producers' order: the fallback when a wait
    timed out (programs not all resident: MPS, green contexts, a GPU shared with long kernels)."""
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(0, NUM_PROD):
        pj = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kb in range(j * k_tiles // NUM_PROD, (j + 1) * k_tiles // NUM_PROD):
            k0 = kb * BLOCK_K
            pj = _shrink_step(pj, x_desc.load([off_m, k0]).to(CDT), A, BITS, offs_m, k0, M, K, R,
                              stride_ar, stride_ak, stride_bm, seed_lo, seed_hi, threshold,
                              HAS_DROPOUT, False, CDT, False, BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
        t += pj
    return t * keep_scale  # as _sum_partials: the same bits as the partials' path


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold", "max_spins"])
def _fwd_single_pass_kernel(
    x_desc, w_desc, y_desc, A, BIAS, T, PART, BITS, LB, LBIAS, SYNC,
    M, N, K, R, M_BUCKET, NUM_PROD, max_spins, FALLBACKS,
    stride_ar, stride_ak, stride_tm, stride_pn, stride_pm, stride_bm, stride_lbn, stride_lbr,
    seed_lo, seed_hi, threshold, keep_scale, scaling,
    PHASE: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, CDT: tl.constexpr, OUT_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_SMS: tl.constexpr, TWO_LEVEL: tl.constexpr, W_KN: tl.constexpr, GROUP_M: tl.constexpr,
    FUSED_SLICE: tl.constexpr,
):  # fmt: skip
    """Persistent grid of NUM_SMS programs; PHASE 0 = everything (GPU), 1 = shrink slices only,
    2 = GEMM + sum + epilogue only (1 then 2: the interpreter's sequential stand-in for 0).

    The first NUM_PROD tiles of each row-block are its producers (K-slice n of NUM_PROD each).
    PART: (NUM_PROD, M, r) fp32 partials; BITS: (M, ⌈K/8⌉) uint8; SYNC: (2 + 4·⌈M/BM⌉,) int32.
    W_KN: w_desc describes the weight stored (K, N) with (BLOCK_K, BLOCK_N) tiles (GPT-2's Conv1D), as in
    lora_linear.py's ``_fwd_tma_kernel``."""
    epoch = 0
    if PHASE == 0:
        epoch = _launch_epoch(SYNC)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        # Grouped walk, producers first (the barrier needs a row-block's producers consecutive, see above).
        pid_m, pid_n = _walk_tile(tile_id, num_pid_m, num_pid_n, NUM_PROD, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        m_ok = offs_m < M
        p_mask = m_ok[:, None] & r_ok[None, :]
        p_off = rm[:, None] * stride_pm + offs_r[None, :]  # (row, rank) offset inside one partial (int64)
        # Consumers get an empty slice (no shrink work) and run the GEMM over all of K below.
        is_producer, kb_lo, kb_hi = _producer_slice(pid_n, k_tiles, NUM_PROD)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        words = SYNC + 2 + 4 * pid_m
        if FUSED_SLICE:
            # The producer's shrink steps inside the GEMM loop: the GEMM's wgmma stays in flight while the
            # mask is generated; consumers skip the branch. The arrival follows the loop.
            k_lo, k_hi = _fused_range(k_tiles, kb_lo, kb_hi, PHASE)
            for kb in range(k_lo, k_hi):
                k0 = kb * BLOCK_K
                x = x_desc.load([off_m, k0]).to(CDT)
                if PHASE != 1:
                    acc = _x_dot_wt(acc, x, w_desc, off_n, k0, CDT, W_KN)
                if PHASE != 2:
                    if (kb >= kb_lo) & (kb < kb_hi):
                        part = _shrink_step(part, x, A, BITS, offs_m, k0, M, K, R, stride_ar, stride_ak, stride_bm,
                                            seed_lo, seed_hi, threshold, HAS_DROPOUT, STORE_BITS, CDT, False,
                                            BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
            if PHASE != 2:
                if is_producer:
                    _publish(PART, pid_n, stride_pn, p_off, part, p_mask, words, NUM_PROD, epoch, PHASE)
        else:
            if PHASE != 2:
                # The producer's K-slice of the shrink first, in a loop of its own: its partial is stored and
                # its arrival counted before its GEMM, so no tile waits for a producer's GEMM or Philox; the
                # slice's x tiles are read again by the GEMM, from L2.
                for kb in range(kb_lo, kb_hi):
                    k0 = kb * BLOCK_K
                    part = _shrink_step(part, x_desc.load([off_m, k0]).to(CDT), A, BITS, offs_m, k0, M, K, R,
                                        stride_ar, stride_ak, stride_bm, seed_lo, seed_hi, threshold, HAS_DROPOUT,
                                        STORE_BITS, CDT, False, BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
                if is_producer:
                    _publish(PART, pid_n, stride_pn, p_off, part, p_mask, words, NUM_PROD, epoch, PHASE)
            if PHASE != 1:
                for kb in range(0, k_tiles):  # the GEMM over all of K: the two-launch forward's loop
                    k0 = kb * BLOCK_K
                    acc = _x_dot_wt(acc, x_desc.load([off_m, k0]).to(CDT), w_desc, off_n, k0, CDT, W_KN)
        if PHASE != 1:
            t_ptrs = T + rm[:, None] * stride_tm + offs_r[None, :]
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            opened = True
            if PHASE == 2:  # the interpreter's second launch: the partials are all there
                t = _sum_partials(PART, stride_pn, p_off, p_mask, NUM_PROD, keep_scale, BLOCK_M, BLOCK_R)
                if pid_n == 0:
                    tl.store(t_ptrs, t, mask=p_mask)
            elif TWO_LEVEL:
                # Producer j sums its rows of all partials into T, a second barrier, then every tile
                # reads T (BM·r·4 bytes) instead of all S partials.
                if is_producer:
                    s_mask = _slice_rows(p_mask, pid_n, NUM_PROD, BLOCK_M)
                    if _wait_open(words, epoch, max_spins):
                        ts = _sum_partials(PART, stride_pn, p_off, s_mask, NUM_PROD, keep_scale, BLOCK_M, BLOCK_R)
                    else:
                        tl.atomic_add(FALLBACKS, 1)
                        ts = _recompute_t(x_desc, A, BITS, offs_m, off_m, M, K, R, k_tiles, NUM_PROD, stride_ar,
                                          stride_ak, stride_bm, seed_lo, seed_hi, threshold, keep_scale,
                                          HAS_DROPOUT, CDT, BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
                    tl.store(t_ptrs, ts, mask=s_mask)
                opened = _row_barrier(words + 2, NUM_PROD, epoch, max_spins, is_producer)
                if opened:
                    t = tl.load(t_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg")
            else:
                opened = _wait_open(words, epoch, max_spins)  # (every producer has arrived: _publish)
                if opened:  # every tile of the row-block sums the same partials in the same order: same bits
                    t = _sum_partials(PART, stride_pn, p_off, p_mask, NUM_PROD, keep_scale, BLOCK_M, BLOCK_R)
                    if pid_n == 0:
                        tl.store(t_ptrs, t, mask=p_mask)
            if not opened:  # counted in ``barrier_fallbacks``; T itself is written by the producers
                tl.atomic_add(FALLBACKS, 1)
                t = _recompute_t(x_desc, A, BITS, offs_m, off_m, M, K, R, k_tiles, NUM_PROD, stride_ar, stride_ak,
                                 stride_bm, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT, CDT,
                                 BLOCK_M, BLOCK_K, BLOCK_R)  # fmt: skip
                if not TWO_LEVEL:
                    if pid_n == 0:
                        tl.store(t_ptrs, t, mask=p_mask)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc = _fwd_epilogue_t(acc, t, BIAS, LB, LBIAS, offs_n, N, R, stride_lbn, stride_lbr, scaling,
                                  HAS_BIAS, HAS_LBIAS, CDT, False, BLOCK_R)  # fmt: skip
            y_desc.store([off_m, off_n], acc.to(OUT_DT))
    if PHASE == 0:
        _exit_launch(SYNC, epoch)


@triton.jit
def _dt_step(acc, dy, LB, n0, N, R, stride_lbn, stride_lbr, CDT: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_R: tl.constexpr):  # fmt: skip
    """acc (BM, BLOCK_R) += dY tile (BM, BN) · B[n0 : n0 + BN, :]: one N-step of dT = dY·B."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    b_mask = (offs_n < N)[:, None] & (offs_r < R)[None, :]
    b = _load_cast(LB + offs_n.to(tl.int64)[:, None] * stride_lbn + offs_r[None, :] * stride_lbr, b_mask, CDT)
    return tl.dot(dy, b, acc)


@triton.jit
def _recompute_dt(dy_desc, LB, off_m, N, R, n_tiles, NUM_PROD, stride_lbn, stride_lbr, scaling, CDT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """dT for one row-block from dY, slice by slice in the producers' order (the timed-out fallback)."""
    dt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(0, NUM_PROD):
        pj = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for nb in range(j * n_tiles // NUM_PROD, (j + 1) * n_tiles // NUM_PROD):
            n0 = nb * BLOCK_N
            pj = _dt_step(pj, dy_desc.load([off_m, n0]).to(CDT), LB, n0, N, R, stride_lbn, stride_lbr, CDT, BLOCK_N,
                          BLOCK_R)  # fmt: skip
        dt += pj
    return dt * scaling  # as _sum_partials: the same bits as the partials' path


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold", "max_spins"])
def _bwd_single_pass_kernel(
    dy_desc, w_desc, dx_desc, DY, LB, T, A, BITS, DT, DB, DSUM, DTP, SYNC,
    M, N, K, R, M_BUCKET, NUM_PROD, max_spins, FALLBACKS,
    stride_dym, stride_dyn, stride_lbn, stride_lbr, stride_tm, stride_ar, stride_ak, stride_bm, stride_dtm,
    stride_dbn, stride_pn, stride_pm,
    seed_lo, seed_hi, threshold, keep_scale, scaling,
    PHASE: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOAD_BITS: tl.constexpr, CDT: tl.constexpr,
    OUT_DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, NUM_SMS: tl.constexpr, TWO_LEVEL: tl.constexpr, DO_DB: tl.constexpr,
    W_KN: tl.constexpr, GROUP_M: tl.constexpr, FUSED_SLICE: tl.constexpr,
):  # fmt: skip
    """dX = dY·W + (dT·A) ⊙ keep/(1-p) with dT = s·dY·B computed from the dY tiles of this GEMM, plus
    (DO_DB) dB = s·dYᵀ·T and Σ_m dY. Persistent walk: first the ⌈N/BN⌉ dB tiles (each reduces over all
    of M; they never wait; none without DO_DB), then the dX tiles (m, k) in ``_walk_tile``'s order; the
    first NUM_PROD tiles of a row-block produce dT partials over their N-slice and arrive at the row
    barrier before their GEMM (after it with FUSED_SLICE), and everyone sums them after theirs. PHASE, W_KN as in
    ``_fwd_single_pass_kernel``. DTP: (NUM_PROD, M, r) fp32; DT: (M, r) fp32 out."""
    epoch = 0
    if PHASE == 0:
        epoch = _launch_epoch(SYNC)
    num_db = 0
    if DO_DB:  # lora_B frozen: no dB tiles, dY is read by the GEMM only
        num_db = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    for tile_id in tl.range(tl.program_id(0), num_db + num_pid_m * num_pid_k, NUM_SMS):
        if tile_id < num_db:
            if PHASE != 2:
                _db_block(tile_id, 0, 1, DY, T, DB, DSUM, M, N, R, stride_dym, stride_dyn, stride_tm, stride_dbn, 0, 0,
                          scaling, CDT, False, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
        else:
            pid_m, pid_k = _walk_tile(tile_id - num_db, num_pid_m, num_pid_k, NUM_PROD, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_k = pid_k * BLOCK_K
            offs_m = off_m + tl.arange(0, BLOCK_M)
            rm = offs_m.to(tl.int64)
            p_mask = (offs_m < M)[:, None] & r_ok[None, :]
            p_off = rm[:, None] * stride_pm + offs_r[None, :]  # (row, rank) offset inside one partial (int64)
            is_producer, nb_lo, nb_hi = _producer_slice(pid_k, n_tiles, NUM_PROD)
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            dtp = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            words = SYNC + 2 + 4 * pid_m
            if FUSED_SLICE:  # the producer's dT steps inside the GEMM loop (as the forward's shrink)
                n_lo, n_hi = _fused_range(n_tiles, nb_lo, nb_hi, PHASE)
                for nb in range(n_lo, n_hi):
                    n0 = nb * BLOCK_N
                    dy = dy_desc.load([off_m, n0]).to(CDT)
                    if PHASE != 1:
                        acc = _dy_dot_w(acc, dy, w_desc, n0, off_k, CDT, W_KN)
                    if PHASE != 2:
                        if (nb >= nb_lo) & (nb < nb_hi):
                            dtp = _dt_step(dtp, dy, LB, n0, N, R, stride_lbn, stride_lbr, CDT, BLOCK_N, BLOCK_R)
                if PHASE != 2:
                    if is_producer:
                        _publish(DTP, pid_k, stride_pn, p_off, dtp, p_mask, words, NUM_PROD, epoch, PHASE)
            else:
                if PHASE != 2:
                    # The producer's N-slice of dT first, in a loop of its own, stored and counted before its
                    # GEMM (as the forward's separate shrink slice).
                    for nb in range(nb_lo, nb_hi):
                        n0 = nb * BLOCK_N
                        dtp = _dt_step(dtp, dy_desc.load([off_m, n0]).to(CDT), LB, n0, N, R, stride_lbn,
                                       stride_lbr, CDT, BLOCK_N, BLOCK_R)  # fmt: skip
                    if is_producer:
                        _publish(DTP, pid_k, stride_pn, p_off, dtp, p_mask, words, NUM_PROD, epoch, PHASE)
                if PHASE != 1:
                    for nb in range(0, n_tiles):  # the dX GEMM over all of N: the two-launch backward's loop
                        n0 = nb * BLOCK_N
                        acc = _dy_dot_w(acc, dy_desc.load([off_m, n0]).to(CDT), w_desc, n0, off_k, CDT, W_KN)
            if PHASE != 1:
                dt_ptrs = DT + rm[:, None] * stride_dtm + offs_r[None, :]
                dt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                opened = True
                if PHASE == 2:  # the interpreter's second launch: the partials are all there
                    dt = _sum_partials(DTP, stride_pn, p_off, p_mask, NUM_PROD, scaling, BLOCK_M, BLOCK_R)
                    if pid_k == 0:
                        tl.store(dt_ptrs, dt, mask=p_mask)
                elif TWO_LEVEL:  # as in the forward: producers reduce row slices into DT, then all read DT
                    if is_producer:
                        s_mask = _slice_rows(p_mask, pid_k, NUM_PROD, BLOCK_M)
                        if _wait_open(words, epoch, max_spins):
                            ds = _sum_partials(DTP, stride_pn, p_off, s_mask, NUM_PROD, scaling, BLOCK_M, BLOCK_R)
                        else:
                            tl.atomic_add(FALLBACKS, 1)
                            ds = _recompute_dt(dy_desc, LB, off_m, N, R, n_tiles, NUM_PROD, stride_lbn, stride_lbr,
                                               scaling, CDT, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
                        tl.store(dt_ptrs, ds, mask=s_mask)
                    opened = _row_barrier(words + 2, NUM_PROD, epoch, max_spins, is_producer)
                    if opened:
                        dt = tl.load(dt_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg")
                else:
                    opened = _wait_open(words, epoch, max_spins)  # (every producer has arrived: _publish)
                    if opened:
                        dt = _sum_partials(DTP, stride_pn, p_off, p_mask, NUM_PROD, scaling, BLOCK_M, BLOCK_R)
                        if pid_k == 0:
                            tl.store(dt_ptrs, dt, mask=p_mask)
                if not opened:  # producers not resident in time: recompute dT (see the forward kernel)
                    tl.atomic_add(FALLBACKS, 1)
                    dt = _recompute_dt(dy_desc, LB, off_m, N, R, n_tiles, NUM_PROD, stride_lbn, stride_lbr, scaling,
                                       CDT, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
                    if not TWO_LEVEL:
                        if pid_k == 0:
                            tl.store(dt_ptrs, dt, mask=p_mask)
                acc = _dx_epilogue_t(acc, dt, A, BITS, offs_m, off_k, M, K, R, stride_ar, stride_ak, stride_bm,
                                     seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT, LOAD_BITS, CDT, False,
                                     BLOCK_M, BLOCK_K, BLOCK_R, True)  # fmt: skip
                dx_desc.store([off_m, off_k], acc.to(OUT_DT))
    if PHASE == 0:
        _exit_launch(SYNC, epoch)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

_SYNC_LOCK = threading.Lock()
_SYNC: dict[tuple, torch.Tensor] = {}  # (device type, index, stream) -> barrier words (eager launches)
_FALLBACKS: dict[tuple, torch.Tensor] = {}  # (device type, index) -> fallback counter (int32)
# Producers per row-block when the grid cannot hold whole row-blocks per round (see _plan).
MAX_PRODUCERS = 8
# LORA_KERNELS_SP_REDUCE=2: the two-level reduction of the partials (producers reduce row slices into
# T / dT behind a second barrier; every tile then reads BM·r·4 bytes instead of S partials). A GPU
# measurement decides the default (bench/NOTES.md).
REDUCE_LEVELS = int(os.environ.get("LORA_KERNELS_SP_REDUCE", "1") or 1)
# LORA_KERNELS_PRODUCERS=k: always the full grid with min(nt, k) producers (for measuring _plan's choice).
FORCE_PRODUCERS = int(os.environ.get("LORA_KERNELS_PRODUCERS", "0") or 0)
# Where a producer computes its shrink (dT) slice. Default: in a loop of its own before its GEMM loop, arriving
# before its GEMM (nobody waits for it). LORA_KERNELS_SP_SLICE=fused: the slice's steps inside the GEMM loop
# (the GEMM's wgmma in flight while the mask is made, x read once), arriving after it; 16–28 more bytes of
# spills at rank 16 with dropout under Triton 3.6. Both keep ptxas's wgmma pipelining under Triton 3.6 (the
# earlier slice-then-rest pair of GEMM loops did not: C7515); which is faster is a GPU measurement (NOTES.md).
FUSED_SLICE = os.environ.get("LORA_KERNELS_SP_SLICE", "separate") == "fused"
# LORA_KERNELS_SP_COOPERATIVE=1: launch both kernels as cooperative grids (Triton's
# launch_cooperative_grid), so CUDA starts every program at once and no barrier waits on a program not
# yet resident, e.g. while NCCL kernels hold SMs under DDP/FSDP. Without it the waits are bounded (then
# recompute); whether the cooperative launch costs anything is a GPU measurement (bench/NOTES.md).
COOPERATIVE = os.environ.get("LORA_KERNELS_SP_COOPERATIVE", "0") not in ("", "0")


def _launch_opts() -> dict:
    # Only when asked: the option is part of Triton's compile key (a prewarmed cache holds one variant).
    return {"launch_cooperative_grid": True} if COOPERATIVE else {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _sync_buffer(device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The barrier words for ``rows`` row-blocks (layout above ``_launch_epoch``) and the device's
    fallback counter.

    Eager launches: one zeroed buffer per (device, stream): launches in flight on different streams
    must not share it, and launches on one stream run in order. Every launch leaves it consistent
    (counts at 0, the epoch advanced), so it is never cleared again; it is replaced by a zeroed one
    when it must grow (stream-ordered: a launch still running on the old one finishes first).
    A launch being captured into a CUDA graph: fresh words, zeroed inside the graph (a memset node
    before the kernel, replayed with it), so the graph needs no eager call on its stream beforehand and
    shares its words with nothing; the graph's memory pool holds them. The counter takes atomic adds
    from any stream; one made during a capture (no eager launch on this device yet) belongs to that
    graph and is not seen by ``barrier_fallbacks``."""
    dev_key = (device.type, device.index)
    if _capturing(device):
        words = torch.zeros(2 + 4 * rows, dtype=torch.int32, device=device)
        counter = _FALLBACKS.get(dev_key)
        return words, counter if counter is not None else torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (*dev_key, stream)
    with _SYNC_LOCK:
        counter = _FALLBACKS.get(dev_key)
        if counter is None:
            counter = _FALLBACKS[dev_key] = torch.zeros(1, dtype=torch.int32, device=device)
        words = _SYNC.get(key)
        if words is None or words.numel() < 2 + 4 * rows:
            words = _SYNC[key] = torch.zeros(2 + 4 * max(rows, 64), dtype=torch.int32, device=device)
        return words, counter


def barrier_fallbacks(device: torch.device | str = "cuda") -> int:
    """How many waits, summed over the single-pass launches on this device, timed out so that the tile
    recomputed T (dT) itself: one per such tile, two for a two-level producer that timed out at both of
    its barriers (0 when every program was resident, as it should be). Synchronises with the device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counter = _FALLBACKS.get((device.type, device.index))
    return 0 if counter is None else int(counter.item())


def _plan(nt: int, sms: int) -> tuple[int, int]:
    """(programs, producers per row-block) for nt N-tiles per row-block on ``sms`` SMs.

    All nt tiles produce (each a 1/nt slice of the shrink: the least skew) when the grid can hold
    whole row-blocks per round with at most ~3 % of the SMs left out (nt = 16 on 132 SMs: 128
    programs); then no row-block straddles two rounds. Otherwise (nt = 56 at N = 14336) the first
    min(nt, MAX_PRODUCERS) tiles produce: only they wait for each other, the rest wait on earlier
    tiles only, so a straddling row-block idles at most MAX_PRODUCERS − 1 programs for a tile.
    Which one wins is a GPU measurement (bench/NOTES.md); ``FORCE_PRODUCERS`` overrides."""
    if FORCE_PRODUCERS > 0:
        return sms, min(nt, FORCE_PRODUCERS, sms)
    if nt <= sms and sms % nt <= max(sms // 32, 0):
        return sms - sms % nt, nt
    return sms, min(nt, MAX_PRODUCERS, sms)


def _max_spins() -> int:
    # A poll is an L2 round trip (~1 µs on a GPU): 2^18 ≈ 0.1–0.3 s, far beyond a normal wait (one
    # tile, ~50 µs). The interpreter's threads poll slowly and may wait for whole interpreted tiles.
    return (1 << 30) if _interpret() else (1 << 18)


def _single_cfg(R: int) -> dict:
    """128×256×64, 8 warps, 3 stages (the plain GEMM's measured best on H100, ANCHORS.md) while the
    rank tile is small; 128-wide N tiles when the partial-T and epilogue tiles grow with the rank."""
    if _interpret():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=256 if _block_r(R) <= 64 else 128, BLOCK_K=64, num_warps=8, num_stages=3)


def single_pass_reason(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> str | None:
    """None if the single-pass kernels can run on these (2-D) tensors, else why not."""
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if _block_r(lora_A.shape[0]) > 128:
        return f"rank {lora_A.shape[0]} > 128: the partial-T tile would not fit next to the accumulator"
    return None


def _w_desc(w_tma: torch.Tensor, w_kn: bool, bn: int, bk: int):
    """The weight's host descriptor: over (N, K) with (bn, bk) tiles, or over the (K, N) matrix a weight
    stored that way is (``_tma_weight``) with (bk, bn) tiles."""
    return TensorDescriptor.from_tensor(w_tma, [bk, bn] if w_kn else [bn, bk])


@_ll._on_tensor_device  # public: callers may pass tensors of a GPU that is not the current one
def lora_fwd_single_pass(
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
    num_programs: int | None = None,
    num_producers: int | None = None,
    max_spins: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`lora_linear.lora_fwd` (``y (M, N)``, ``T (M, r)`` fp32, bits), in one
    launch. The caller checks :func:`single_pass_reason` and TMA eligibility (16-bit x, 16-byte rows; the
    weight as ``_tma_weight`` reads it: (N, K) rows, or (K, N) ones for a weight stored that way).
    ``num_programs`` / ``num_producers``: override :func:`_plan` (tests use small grids);
    ``max_spins``: polls of the barrier flag before a tile recomputes T itself (see the kernel)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    w_tma, w_kn = _ll._tma_weight(weight)
    cdt, _ = _compute_dtype(x)
    BR = _block_r(R)
    y = _ll._empty((M, N), x.device, x.dtype)
    t = _ll._empty((M, R), x.device, torch.float32)
    has_dropout = p > 0.0
    store_bits = has_dropout and store_mask
    bits = _ll._empty((M, (K + 7) // 8) if store_bits else (0, 0), x.device, torch.uint8)
    bias_arg = bias.contiguous() if bias is not None else t  # t: never read when HAS_BIAS is False
    lbias_arg = lora_bias.contiguous() if lora_bias is not None else t
    lo, hi = _seed_parts(seed)
    fixed = _single_cfg(R)
    # Step down (fewer stages, then half-width N tiles) if the tiles exceed this GPU's shared memory.
    variants = [fixed, *(cfg for _, cfg in _ll._step_downs({}, fixed))]
    for i, cfg in enumerate(variants):
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        nt, mt = _cdiv(N, bn), _cdiv(M, bm)
        programs, producers = _plan(nt, _grid_sms(x))
        programs, producers = num_programs or programs, min(num_producers or producers, nt)
        if producers > programs:  # the producers of a row-block must be resident together
            raise ValueError(f"{producers} producers per row-block need at least as many programs, got {programs}")
        part = _ll._empty((producers, M, R), x.device, torch.float32)
        sync, fallbacks = _sync_buffer(x.device, mt)
        grid = (min(programs, nt * mt),)
        args = (
            TensorDescriptor.from_tensor(x, [bm, bk]), _w_desc(w_tma, w_kn, bn, bk),
            TensorDescriptor.from_tensor(y, [bm, bn]), lora_A, bias_arg, t, part, bits, lora_B, lbias_arg, sync,
            M, N, K, R, _m_bucket(M), producers, max_spins or _max_spins(), fallbacks,
            lora_A.stride(0), lora_A.stride(1), t.stride(0), part.stride(0), part.stride(1), max(bits.stride(0), 1),
            lora_B.stride(0), lora_B.stride(1),
            lo, hi, dropout_threshold(p), 1.0 / (1.0 - p), scaling,
        )  # fmt: skip
        meta = dict(
            HAS_DROPOUT=has_dropout,
            STORE_BITS=store_bits,
            HAS_BIAS=bias is not None,
            HAS_LBIAS=lora_bias is not None,
            CDT=cdt,
            OUT_DT=_TL_DTYPE[y.dtype],
            BLOCK_R=BR,
            NUM_SMS=programs,  # the walk's stride; fewer programs when tiles < programs
            GROUP_M=_group_m(),
            FUSED_SLICE=FUSED_SLICE,
            TWO_LEVEL=REDUCE_LEVELS == 2,
            W_KN=w_kn,
            **cfg,
            **_launch_opts(),
        )
        phases = (1, 2) if (_interpret() and INTERPRETER_PHASES) else (0,)
        try:
            for phase in phases:
                _planned_launch(_fwd_single_pass_kernel, grid, args, dict(meta, PHASE=phase))
            return y, t, bits
        except OutOfResources:
            if i == len(variants) - 1:
                raise
    raise AssertionError("unreachable")


def _group_m() -> int:
    """Row-blocks per group of the single-pass walk (``_walk_tile``): the two-launch GEMMs' 8 on a GPU; 2 in
    the interpreter, whose tests have a handful of row-blocks, so that they walk several groups."""
    return 2 if _interpret() else 8


def _single_bwd_cfg(R: int) -> dict:
    """The dX GEMM's tiles of the two-launch TMA kernel (``_tma_cfg``): (BM, BK) output tiles, BN the step
    over N; the single-pass walk groups row-blocks by ``_group_m`` instead of the tile's GROUP_M."""
    return {k: v for k, v in _ll._tma_cfg(None, R, backward=True).items() if k != "GROUP_M"}


@_ll._on_tensor_device  # public: callers may pass tensors of a GPU that is not the current one
def lora_bwd_single_pass(
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
    need_da: bool,
    need_db: bool = True,
    num_programs: int | None = None,
    num_producers: int | None = None,
    max_spins: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`lora_linear.lora_bwd` with ``need_dx=True``: ``dx (M, K)``, fp32
    ``dA (r, K)``, ``dB (N, r)``, ``Σ_m dY (N,)``. Launch 1: the dX GEMM with dT from its own dY
    tiles, and the dB reductions; launch 2 (if need_da): dA = dTᵀ·(x ⊙ keep)/(1-p), one pass over x.
    dY is read by the GEMM and by the dB tiles: once fewer than the two-launch path's dT launch.
    Without ``need_db`` (lora_B frozen) there are no dB tiles (dY read once) and dB, Σ dY come back
    empty, ``(0, r)`` and ``(0,)``, as from the two-launch path.
    The caller checks TMA eligibility of dy, weight (as ``_tma_weight`` reads it) and dx (16-bit,
    16-byte rows) and the rank."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    w_tma, w_kn = _ll._tma_weight(weight)
    dev = x.device
    cdt, _ = _compute_dtype(x)
    BR = _block_r(R)
    has_dropout = p > 0.0
    load_bits = has_dropout and bits.numel() > 0
    lo, hi = _seed_parts(seed)
    thr, keep_scale = dropout_threshold(p), 1.0 / (1.0 - p)
    bits_stride = max(bits.stride(0), 1)
    dx = _ll._empty((M, K), dev, x.dtype)
    dt = _ll._empty((M, R), dev, torch.float32)
    db = _ll._empty((N, R) if need_db else (0, R), dev, torch.float32)
    colsum = _ll._empty((N,) if need_db else (0,), dev, torch.float32)
    fixed = _single_bwd_cfg(R)
    fewer = {**fixed, "num_stages": max(1, fixed["num_stages"] - 1)}
    for i, cfg in enumerate([fixed, fewer]):
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        kt, mt = _cdiv(K, bk), _cdiv(M, bm)
        # dB tiles come first in the walk, so row-blocks never align with rounds: the full grid with
        # at most MAX_PRODUCERS producers (see _plan).
        programs = num_programs or _grid_sms(x)
        producers = min(num_producers or min(MAX_PRODUCERS, programs), kt)
        if producers > programs:
            raise ValueError(f"{producers} producers per row-block need at least as many programs, got {programs}")
        dtp = _ll._empty((producers, M, R), dev, torch.float32)
        sync, fallbacks = _sync_buffer(dev, mt)
        args = (
            TensorDescriptor.from_tensor(dy, [bm, bn]), _w_desc(w_tma, w_kn, bn, bk),
            TensorDescriptor.from_tensor(dx, [bm, bk]), dy, lora_B, t, lora_A, bits, dt, db, colsum, dtp, sync,
            M, N, K, R, _m_bucket(M), producers, max_spins or _max_spins(), fallbacks,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), t.stride(0), lora_A.stride(0),
            lora_A.stride(1), bits_stride, dt.stride(0), db.stride(0), dtp.stride(0), dtp.stride(1),
            lo, hi, thr, keep_scale, scaling,
        )  # fmt: skip
        meta = dict(HAS_DROPOUT=has_dropout, LOAD_BITS=load_bits, CDT=cdt, OUT_DT=_TL_DTYPE[dx.dtype], BLOCK_R=BR,
                    NUM_SMS=programs, TWO_LEVEL=REDUCE_LEVELS == 2, DO_DB=need_db, W_KN=w_kn, GROUP_M=_group_m(),
                    FUSED_SLICE=FUSED_SLICE, **cfg,
                    **_launch_opts())  # fmt: skip
        grid = (min(programs, (_cdiv(N, bn) if need_db else 0) + mt * kt),)
        try:
            for phase in (1, 2) if (_interpret() and INTERPRETER_PHASES) else (0,):
                _planned_launch(_bwd_single_pass_kernel, grid, args, dict(meta, PHASE=phase))
            break
        except OutOfResources:
            if i == 1:
                raise
    # dA: the dA programs of the pointer kernel (no dX tiles), reading x (and the bits) once.
    da = _ll.launch_da(x, lora_A, dt, bits, p, seed) if need_da else _ll._empty((R, K), dev, torch.float32)
    return dx, da, db, colsum


_watch(__name__)  # (last: call plans compare this module's generation while it is not rebound, launch.py)
