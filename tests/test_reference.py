"""The reference defines the semantics: Philox known answers, mask layout, gradcheck, PEFT math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_kernels.reference import (
    dropout_keep_mask,
    dropout_threshold,
    lora_linear_ref,
    pack_mask,
    philox4x32_10,
    unpack_mask,
)


@pytest.mark.parametrize(
    "ctr, key, expected",
    [  # Known-answer vectors of Random123 (kat_vectors, philox4x32 10 rounds).
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    out = philox4x32_10(*c, *key)
    assert tuple(int(o.item()) for o in out) == expected


def test_mask_layout_matches_definition():
    """Column 8g+j uses 16-bit half j//4 of lane j%4 of Philox((g, m, 0, 0), seed)."""
    seed, M, K, p = (7 << 32) | 11, 5, 29, 0.3
    keep = dropout_keep_mask(seed, M, K, p)
    thr = dropout_threshold(p)
    for m in range(M):
        for k in range(K):
            g, j = divmod(k, 8)
            lanes = philox4x32_10(*(torch.tensor([v]) for v in (g, m, 0, 0)), seed & 0xFFFFFFFF, seed >> 32)
            u = (int(lanes[j % 4].item()) >> (16 * (j // 4))) & 0xFFFF
            assert bool(keep[m, k]) == (u >= thr), (m, k)


@pytest.mark.parametrize(
    "p, threshold", [(0.0, 0), (0.1, 6554), (0.3, 19661), (0.5, 32768), (1e-5, 1), (0.99999, 65535)]
)
def test_threshold_rounds_to_nearest(p, threshold):
    """threshold = round(p · 65536), the definition the CUDA backend implements on its own (csrc/lowrank.cu):
    p = 0.1 is 6553.6, so truncation would keep one more draw value than the other backends."""
    assert dropout_threshold(p) == threshold


def test_mask_rows_past_2_32_use_high_counter_word():
    g = torch.tensor([3])
    lo = philox4x32_10(g, torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), 1, 2)
    hi = philox4x32_10(g, torch.tensor([5]), torch.tensor([1]), torch.tensor([0]), 1, 2)
    assert [int(a) for a in lo] != [int(b) for b in hi]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_mask_statistics(p):
    keep = dropout_keep_mask(1234, 256, 1000, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    if p == 0.0:
        assert keep.all()


def test_mask_depends_on_seed_and_is_deterministic():
    a = dropout_keep_mask(1, 64, 64, 0.5)
    assert torch.equal(a, dropout_keep_mask(1, 64, 64, 0.5))
    assert not torch.equal(a, dropout_keep_mask(2, 64, 64, 0.5))
    # A prefix of rows/columns is the same mask: it depends on (m, k), not on the shape.
    assert torch.equal(dropout_keep_mask(1, 70, 90, 0.5)[:64, :64], a)


def test_the_reference_checks_its_seed():
    """Called directly (users checking numerics do), the reference names a bad seed: it takes the full
    64-bit key range (both Philox key words), the API's 2**63 cap aside."""
    for seed in (True, 1.5, "3", None):
        with pytest.raises(TypeError, match="^seed must be an int, got"):
            dropout_keep_mask(seed, 4, 8, 0.5)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"^seed must be in \[0, 2\*\*64\), got"):
            dropout_keep_mask(seed, 4, 8, 0.5)
    top = dropout_keep_mask(2**64 - 1, 16, 16, 0.5)
    assert not torch.equal(top, dropout_keep_mask(2**63 - 1, 16, 16, 0.5))
    assert not torch.equal(top, dropout_keep_mask(2**32 - 1, 16, 16, 0.5))
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="^seed is required when training with dropout_p > 0"):
        lora_linear_ref(x, w, a, b, None, None, 1.0, 0.1, True, None)
    assert torch.equal(lora_linear_ref(x, w, a, b, None, None, 1.0, 0.1, False, None),
                       lora_linear_ref(x, w, a, b, None, None, 1.0, 0.0, True, None))  # fmt: skip


@pytest.mark.parametrize("K", [1, 7, 8, 9, 67])
def test_pack_unpack_roundtrip(K):
    keep = dropout_keep_mask(99, 13, K, 0.4)
    bits = pack_mask(keep)
    assert bits.shape == (13, (K + 7) // 8) and bits.dtype == torch.uint8
    assert torch.equal(unpack_mask(bits, K), keep)
    if K % 8:  # padding bits past K are zero
        assert (bits[:, -1] >> (K % 8)).eq(0).all()


def _inputs(M=6, K=12, N=10, r=3, lead=(2,), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return mk(*lead, M, K), mk(N, K), mk(r, K), mk(N, r), mk(N), mk(N)


def test_gradcheck_all_inputs_with_dropout():
    x, W, A, B, b, lb = (t.requires_grad_() for t in _inputs())
    fn = lambda x, W, A, B, b, lb: lora_linear_ref(x, W, A, B, b, lb, 1.7, 0.3, True, 42)
    assert torch.autograd.gradcheck(fn, (x, W, A, B, b, lb))


def test_matches_peft_math():
    x, W, A, B, b, lb = _inputs()
    p, s, seed = 0.25, 2.0, 5
    keep = dropout_keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p).reshape(x.shape)
    dropped = x * keep / (1 - p)
    expected = F.linear(x, W, b) + s * F.linear(F.linear(dropped, A), B, lb)
    torch.testing.assert_close(lora_linear_ref(x, W, A, B, b, lb, s, p, True, seed), expected)
    # eval: no dropout at all
    torch.testing.assert_close(
        lora_linear_ref(x, W, A, B, b, lb, s, p, False, seed), F.linear(x, W, b) + s * F.linear(x @ A.T, B, lb)
    )


def test_fp32_adapters_under_bf16_follow_peft_casting():
    x, W, A, B, _, _ = _inputs(dtype=torch.float32)
    xb, Wb = x.bfloat16(), W.bfloat16()
    y = lora_linear_ref(xb, Wb, A, B, scaling=2.0)
    assert y.dtype == torch.bfloat16
    expected = F.linear(xb, Wb) + (2.0 * F.linear(F.linear(xb.float(), A), B)).bfloat16()
    torch.testing.assert_close(y, expected)


def test_keep_mask_custom_op_opcheck_and_equality():
    """The compile-time form of the mask generator is a real torch.library op, equal to the eager one."""
    op = torch.ops.lora_kernels.dropout_keep_mask.default
    args = (12345, 7, 29, 0.3, torch.device("cpu"))
    torch.library.opcheck(op, args)
    assert torch.equal(op(*args), dropout_keep_mask(12345, 7, 29, 0.3))
