"""Triton building blocks for the dropout mask defined in ``lora_kernels/reference.py``.

Philox4x32-10 is written out here (rather than calling ``tl.randint4x``) because the counter
carries the row in ``c1``/``c2``: that keeps the stream identical for any M·K, past 2³² elements,
and identical to the C++ and PyTorch implementations. The arithmetic equals ``tl.randint4x``'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Module-level constants must be ``tl.constexpr`` *instances* for the compiler (an annotation alone
# is rejected: "Cannot access global variable ... from within @jit'ed function"); the interpreter
# accepts either, so only a GPU compile catches it.
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; ``k0``/``k1`` are uint32 scalars (the seed)."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = PHILOX_ROUND_B * _c2
        c3 = PHILOX_ROUND_A * _c0
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def dropout_mask_bytes(seed_lo, seed_hi, offs_m, g_start, threshold, BLOCK_M: tl.constexpr, G: tl.constexpr):
    """Packed keep bits for rows ``offs_m`` (BLOCK_M,) and column groups ``g_start + [0, G)``.

    Returns an int32 tensor (BLOCK_M, G) whose bit j is 1 iff column 8·g + j is kept: one Philox
    call yields the 8 decisions of a group (16-bit halves of its 4 lanes).
    """
    # tl.cast, not .to: the scalars may arrive as Python ints (torch 2.11's analysis of which tensors
    # a kernel writes compiles it with every scalar argument a constant; .to fails there and torch
    # then assumes every input is written, cloning x under torch.compile).
    k0 = tl.cast(seed_lo, tl.uint32)
    k1 = tl.cast(seed_hi, tl.uint32)
    thr = tl.cast(threshold, tl.uint32)
    rows = offs_m.to(tl.int64)
    zero = tl.zeros((BLOCK_M, G), dtype=tl.uint32)
    g = (g_start + tl.arange(0, G)).to(tl.uint32)
    c0 = zero + g[None, :]
    c1 = zero + (rows & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = zero + (rows >> 32).to(tl.uint32)[:, None]
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, zero, k0, k1)
    byte = ((r0 & 0xFFFF) >= thr).to(tl.int32)
    byte |= ((r1 & 0xFFFF) >= thr).to(tl.int32) << 1
    byte |= ((r2 & 0xFFFF) >= thr).to(tl.int32) << 2
    byte |= ((r3 & 0xFFFF) >= thr).to(tl.int32) << 3
    byte |= ((r0 >> 16) >= thr).to(tl.int32) << 4
    byte |= ((r1 >> 16) >= thr).to(tl.int32) << 5
    byte |= ((r2 >> 16) >= thr).to(tl.int32) << 6
    byte |= ((r3 >> 16) >= thr).to(tl.int32) << 7
    return byte


@triton.jit
def opaque_zero(threshold):
    """int32 ``threshold >> 17``: 0 for any keep threshold (≤ 65536), but neither a constant nor of any alignment
    the compiler can prove (the threshold is a kernel argument it does not specialise)."""
    return (tl.cast(threshold, tl.uint32) >> 17).to(tl.int32)


@triton.jit
def computed_once(value, threshold):
    """``value``, passed through a while loop that runs once (its bound, ``threshold >> 17``, is 0 for any
    threshold ≤ 65536 but not a constant to the compiler). Triton's layout pass recomputes a value's whole chain
    in each layout a user wants rather than convert it, but cannot recompute a while loop's result: after it,
    the Philox rounds that made ``value`` run once, in their own layout (one byte a thread), and a user that
    wants another layout gets a conversion of the bytes through shared memory. Needed in the dX epilogue with
    a regenerated mask, where the wgmma accumulator's layout spreads a byte's 8 columns over 4 threads and each
    computed the byte's Philox (4 times the rounds; bench/NOTES.md, session 34). Not for a loop that Triton
    pipelines or flattens: a loop nested in it stops both."""
    i = opaque_zero(threshold)
    while i < 1:
        value += i
        i += 1
    return value


@triton.jit
def unpack_bytes(byte, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K // 8) int32 bytes -> (BLOCK_M, BLOCK_K) bool keep-mask (bit j = column 8g+j)."""
    bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_K)) != 0
