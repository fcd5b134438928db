"""The single-pass forward (lora_kernels/triton_ops/single_pass.py): one launch whose tiles share
the shrink work of their row-block through a cross-program barrier.

On CI (no GPU) the kernel runs in the interpreter in two ways: as the two phased launches the
interpreter uses by default, and with every program of the persistent grid running concurrently in
its own thread (tests/_concurrent_interp.py), which executes the real barrier with real atomics,
including rows that straddle two rounds of the persistent walk and K-slices that are empty.
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels.reference import dropout_keep_mask, lora_linear_ref, pack_mask

from ._concurrent_interp import Deadlock, concurrent_programs
from ._utils import HAS_CUDA, INTERPRET, assert_close_ref, requires_gpu
from .test_lora_linear import (  # noqa: F401 - _poison: autouse fixture
    _poison,
    make_inputs,
    run_and_check,
    run_with_a_weight_stored_k_by_n,
)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
tri = pytest.importorskip("lora_kernels.triton_ops.lora_linear")
sp = pytest.importorskip("lora_kernels.triton_ops.single_pass")

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the interpreter's programs concurrently (CPU)")


@pytest.fixture
def single(monkeypatch):
    """Route lora_fwd and lora_bwd to the single-pass kernels (TMA forced on so the interpreter takes
    them too) and record every call, so a test fails if a launcher silently fell back to two launches."""
    if tri.TensorDescriptor is None:
        pytest.skip("this Triton has no triton.tools.tensor_descriptor")
    if not (HAS_CUDA or INTERPRET):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    monkeypatch.setattr(tri, "FWD_MODE", "single")
    monkeypatch.setattr(tri, "BWD_MODE", "single")
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    calls = []
    fwd, bwd = sp.lora_fwd_single_pass, sp.lora_bwd_single_pass
    monkeypatch.setattr(sp, "lora_fwd_single_pass", lambda *a, **k: calls.append(("fwd", a[0].shape)) or fwd(*a, **k))
    monkeypatch.setattr(sp, "lora_bwd_single_pass", lambda *a, **k: calls.append(("bwd", a[1].shape)) or bwd(*a, **k))
    return calls


def _ref_fwd(x, W, A, B, b, lb, p, seed, scaling=2.0):
    d = lambda t: None if t is None else t.double()
    return lora_linear_ref(d(x), d(W), d(A), d(B), d(b), d(lb), scaling, p, True, seed)


@pytest.mark.parametrize(
    "dts", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)], ids=["fp16", "bf16-fp32A"]
)
@pytest.mark.parametrize("p,mode", [(0.0, "bitmask"), (0.1, "bitmask"), (0.5, "regenerate")])
@pytest.mark.parametrize(
    "shape", [(67, 104, 72, 16), (1, 64, 96, 1), (130, 96, 48, 64), (40, 200, 120, 128), (5, 24, 16, 8)], ids=str
)
def test_single_pass_forward_and_gradients(single, dts, p, mode, shape):
    """Through the public API: output and every gradient (the backward consumes the single-pass T and
    bits) against the float64 reference. (5, 24, 16, 8) is one tile in N and in K (32-wide tiles in the
    interpreter): the only tile of a row-block must itself store T and dT, which other shapes leave
    to tile 0 of several."""
    M, K, N, r = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=dts[0], adt=dts[1], lora_bias=True)
    run_and_check("triton", x, W, A, B, b, lb, p=p, mode=mode)
    assert single == [("fwd", (M, K)), ("bwd", (M, K))], "a launcher did not take the single-pass kernel"


@pytest.mark.parametrize(
    "dts", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)], ids=["fp16", "bf16-fp32A"]
)
@pytest.mark.parametrize("p,mode", [(0.0, "bitmask"), (0.1, "bitmask"), (0.5, "regenerate")])
@pytest.mark.parametrize("shape", [(67, 200, 72, 16), (5, 64, 24, 1)], ids=str)
def test_single_pass_with_a_weight_stored_k_by_n(single, monkeypatch, dts, p, mode, shape):
    """A weight stored (K, N), passed as its (N, K) view (GPT-2's Conv1D), takes the single-pass kernels'
    W_KN variant, forward and backward: the descriptor over the (K, N) matrix with (BLOCK_K, BLOCK_N) tiles.
    Tiles BLOCK_N = 64, BLOCK_K = 32, so a descriptor with its tiles the other way round fails; K = 200 and
    N = 72 / 24 leave partial tiles on both of W's axes."""
    for name in ("_single_cfg", "_single_bwd_cfg"):
        real = getattr(sp, name)
        monkeypatch.setattr(sp, name, lambda R, real=real: {**real(R), "BLOCK_N": 64, "BLOCK_K": 32})
    descs = []
    real_desc = sp._w_desc

    def w_desc(w_tma, w_kn, bn, bk):
        d = real_desc(w_tma, w_kn, bn, bk)
        descs.append((w_kn, tuple(d.shape), list(d.block_shape)))
        return d

    monkeypatch.setattr(sp, "_w_desc", w_desc)
    M, K, N, r = shape
    run_with_a_weight_stored_k_by_n(shape, dts, p, mode)
    assert single == [("fwd", (M, K)), ("bwd", (M, K))], "a launcher did not take the single-pass kernel"
    assert descs == [(True, (K, N), [32, 64])] * 2, descs


def _check_direct(x, W, A, B, b, lb, p, seed, programs, producers=None, store=True):
    y, t, bits = sp.lora_fwd_single_pass(
        x, W, b, A, B, lb, 2.0, p, seed, store, num_programs=programs, num_producers=producers
    )
    dts = (x.dtype, A.dtype)
    assert_close_ref(y, _ref_fwd(x, W, A, B, b, lb, p, seed), dts, "y")
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device).double()
    t_ref = (x.double() * keep / (1 - p)) @ A.double().t()
    assert_close_ref(t, t_ref, dts, "T")
    if p > 0 and store:
        assert torch.equal(bits, pack_mask(dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)))
    return y, t, bits


# (M, K, N, r, programs, producers): 32×32×32 tiles in the interpreter, nt = ⌈N/32⌉ tiles per row-block.
CONCURRENT = [
    (100, 200, 96, 8, 4, 3),  # all 3 tiles produce, 4 programs: producer groups straddle rounds
    (100, 200, 96, 8, 3, 3),  # one whole row-block per round
    (67, 64, 128, 16, 5, 4),  # K has 2 blocks for 4 producers: two producers' slices are empty
    (33, 96, 40, 1, 2, 2),  # r = 1, ragged M and N
    (90, 128, 200, 8, 4, 2),  # 7 tiles, 2 producers, 5 consumers waiting on the flag; nt > programs
    (64, 96, 160, 4, 3, 1),  # a single producer per row-block
]


@needs_interpreter
@pytest.mark.parametrize("levels", [1, 2], ids=["one-level", "two-level"])
@pytest.mark.parametrize("M,K,N,r,programs,producers", CONCURRENT, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_single_pass_barrier_runs_concurrently(monkeypatch, M, K, N, r, programs, producers, p, levels):
    """The real barrier (PHASE 0), every program in its own thread: y, T and the bits match the
    reference, the results are bit-identical run to run, each launch advanced the device-side epoch
    by one, the counts are left at zero and every row-block's flag holds the last launch's epoch.
    Two-level: the producers reduce row slices of the partials into T behind a second barrier."""
    monkeypatch.setattr(sp, "INTERPRETER_PHASES", False)
    monkeypatch.setattr(sp, "REDUCE_LEVELS", levels)
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    rows = (M + 31) // 32
    fallbacks = sp.barrier_fallbacks("cpu")
    sync, _ = sp._sync_buffer(x.device, rows)
    epoch0 = int(sync[0])
    with concurrent_programs(timeout=120):
        first = _check_direct(x, W, A, B, b, lb, p, 99, programs, producers)
        again = sp.lora_fwd_single_pass(
            x, W, b, A, B, lb, 2.0, p, 99, True, num_programs=programs, num_producers=producers
        )
    for u, v in zip(first, again, strict=True):
        assert torch.equal(u, v), "single-pass forward is not deterministic"
    assert sp.barrier_fallbacks("cpu") == fallbacks, "a tile gave up on the barrier and recomputed T"
    assert sp._sync_buffer(x.device, rows)[0] is sync
    assert int(sync[0]) == epoch0 + 2, "each launch must advance the epoch exactly once"
    assert int(sync[1]) == 0, "the exit count was not reset"
    assert int(sync[2::4].abs().sum()) + int(sync[4::4].abs().sum()) == 0, "the barrier left an arrival count behind"
    assert sync[3::4][:rows].tolist() == [epoch0 + 2] * rows, "a row-block's flag misses the last epoch"
    if levels == 2:
        assert sync[5::4][:rows].tolist() == [epoch0 + 2] * rows, "a second-level flag misses the last epoch"


@needs_interpreter
@pytest.mark.parametrize("levels", [1, 2], ids=["one-level", "two-level"])
def test_single_pass_starved_barrier_recomputes(monkeypatch, levels):
    """Producers that are not all resident (4 programs, 4 producers per row-block, but only 2 programs
    may run at once, as under an MPS cap): waiters give up after ``max_spins`` polls and recompute T
    from x. The result is still right, bit-identical to a run whose barriers all opened (the fallback
    sums the same unscaled slices in the same order, then scales once), and the counter says it happened."""
    monkeypatch.setattr(sp, "INTERPRETER_PHASES", False)
    monkeypatch.setattr(sp, "REDUCE_LEVELS", levels)
    x, W, A, B, b, lb = make_inputs(40, 64, 128, 4, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    with pytest.raises(ValueError, match="4 producers per row-block need at least as many programs"):
        sp.lora_fwd_single_pass(x, W, b, A, B, lb, 2.0, 0.1, 1, True, num_programs=2, num_producers=4)
    before = sp.barrier_fallbacks("cpu")
    with concurrent_programs(timeout=120, max_resident=2):
        y, t, bits = sp.lora_fwd_single_pass(
            x, W, b, A, B, lb, 2.0, 0.1, 1, True, num_programs=4, num_producers=4, max_spins=50
        )
    assert sp.barrier_fallbacks("cpu") > before
    assert_close_ref(y, _ref_fwd(x, W, A, B, b, lb, 0.1, 1), (x.dtype, A.dtype), "y")
    assert torch.equal(bits, pack_mask(dropout_keep_mask(1, 40, 64, 0.1)))
    before = sp.barrier_fallbacks("cpu")
    with concurrent_programs(timeout=120):
        resident = sp.lora_fwd_single_pass(x, W, b, A, B, lb, 2.0, 0.1, 1, True, num_programs=4, num_producers=4)
    assert sp.barrier_fallbacks("cpu") == before
    assert torch.equal(resident[0], y) and torch.equal(resident[1], t), "the fallback changed the bits"


@triton.jit
def _handshake_kernel(FLAG, OUT, WAIT_FOR: tl.constexpr):
    # Program 0 waits for a flag only program 1 sets: sequential programs would spin forever.
    pid = tl.program_id(0)
    if pid == 1:
        tl.atomic_xchg(FLAG, 1, sem="release")
    if pid == 0:
        cur = tl.atomic_add(FLAG + WAIT_FOR, 0, sem="acquire")
        while cur == 0:
            cur = tl.atomic_add(FLAG + WAIT_FOR, 0, sem="acquire")
        tl.store(OUT, cur)


@needs_interpreter
def test_concurrent_harness_runs_programs_together_and_reports_deadlocks():
    """The harness is not vacuous: a handshake between two programs completes under it, and a wait
    that nothing satisfies is reported as a deadlock (within the timeout) instead of hanging."""
    flag, out = torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    with concurrent_programs(timeout=60):
        _handshake_kernel[(2,)](flag, out, WAIT_FOR=0)
    assert out.item() == 1
    with pytest.raises(Deadlock), concurrent_programs(timeout=3):
        _handshake_kernel[(2,)](torch.zeros(2, dtype=torch.int32), out, WAIT_FOR=1)  # flag[1]: never set


@triton.jit
def _ticket_kernel(COUNT, OUT):
    # Each program takes the next ticket: the order the programs ran in.
    tl.store(OUT + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.atomic_add(COUNT, 1))


@needs_interpreter
def test_concurrent_harness_runs_programs_in_a_given_order():
    """``order=`` runs a grid's programs one after another in the order given (a 2-D grid: indices (x, y, z)), and
    refuses a list that is not a permutation of them."""
    count, out = torch.zeros(1, dtype=torch.int32), torch.full((6,), -1, dtype=torch.int32)
    with concurrent_programs(order=lambda idx: idx[::-1]):
        _ticket_kernel[(3, 2)](count, out)
    assert out.tolist() == [5, 4, 3, 2, 1, 0]
    with pytest.raises(AssertionError, match="permutation"), concurrent_programs(order=lambda idx: idx[1:]):
        _ticket_kernel[(3, 2)](count, out)


_walk_tile = sp._walk_tile


@triton.jit
def _walk_kernel(OUT, total, num_pid_m, nt, NUM_PROD, GROUP_M: tl.constexpr):
    for t in range(0, total):
        pid_m, pid_n = _walk_tile(t, num_pid_m, nt, NUM_PROD, GROUP_M)
        tl.store(OUT + 2 * t, pid_m)
        tl.store(OUT + 2 * t + 1, pid_n)


@pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    "mt,nt,producers,group",
    [(5, 7, 2, 2), (20, 56, 8, 8), (8, 16, 16, 8), (3, 4, 1, 8), (17, 3, 3, 4), (1, 1, 1, 8)],
    ids=str,
)
def test_single_pass_walk_groups_row_blocks_producers_first(mt, nt, producers, group):
    """The single-pass kernels' walk (``_walk_tile``): every tile once; each row-block's producers at
    consecutive positions before all its consumers (what the deadlock argument needs); and, in each group of
    ``group`` row-blocks, the consumers column by column, so the group's row-blocks read a W tile back to back
    (at N = 14336, nt = 56, the row-major walk read all 117 MB of W in every round of the grid)."""
    out = torch.full((2 * mt * nt,), -1, dtype=torch.int32, device=DEVICE)
    _walk_kernel[(1,)](out, mt * nt, mt, nt, producers, GROUP_M=group)
    walk = [tuple(p) for p in out.view(-1, 2).tolist()]
    assert sorted(walk) == [(m, n) for m in range(mt) for n in range(nt)], "not every tile exactly once"
    pos = {tile: i for i, tile in enumerate(walk)}
    for m in range(mt):
        prod = sorted(pos[(m, n)] for n in range(producers))
        assert prod == list(range(prod[0], prod[0] + producers)), f"row-block {m}'s producers are not consecutive"
        assert all(pos[(m, n)] > prod[-1] for n in range(producers, nt)), f"a consumer of {m} precedes a producer"
    for first in range(0, mt, group):
        rows = range(first, min(first + group, mt))
        lo = first * nt
        members = walk[lo : lo + len(rows) * nt]
        assert {m for m, _ in members} == set(rows), "a group's tiles are not contiguous in the walk"
        consumers = [tile for tile in members if tile[1] >= producers]
        assert consumers == [(m, n) for n in range(producers, nt) for m in rows], "consumers not column by column"


def test_single_pass_plan(monkeypatch):
    """Whole row-blocks per round where that leaves at most ~3 % of the SMs out, else ≤ 8 producers."""
    assert sp._plan(16, 132) == (128, 16)  # N = 4096, BN = 256 on an H100: 8 row-blocks per round
    assert sp._plan(56, 132) == (132, 8)  # N = 14336: 132 % 56 = 20 SMs would idle
    assert sp._plan(33, 132) == (132, 33)  # 132 = 4 · 33: whole row-blocks again
    assert sp._plan(1, 132) == (132, 1)
    assert sp._plan(3, 4) == (4, 3)  # the interpreter's 4 programs: 4 % 3 = 1 > 0 left out
    assert sp._plan(6, 4) == (4, 4)  # never more producers than programs
    monkeypatch.setattr(sp, "FORCE_PRODUCERS", 4)  # LORA_KERNELS_PRODUCERS=4: the full grid, 4 producers
    assert sp._plan(16, 132) == (132, 4) and sp._plan(2, 132) == (132, 2)


@pytest.mark.parametrize("why", ["rank", "fp32", "unaligned"])
def test_single_pass_not_taken_where_it_does_not_apply(single, why):
    """Rank > 128, fp32 activations (no TMA path) and rows that are not 16-byte aligned keep the
    two-launch forward and backward; the results are still right."""
    shape, xdt = {"rank": ((40, 64, 64, 200), torch.float16), "fp32": ((40, 64, 64, 8), torch.float32),
                  "unaligned": ((40, 64, 70, 8), torch.float16)}[why]  # fmt: skip
    x, W, A, B, b, lb = make_inputs(*shape, xdt=xdt, adt=xdt)
    run_and_check("triton", x, W, A, B, b, lb, p=0.1)
    assert single == []


@requires_gpu
@pytest.mark.parametrize("shape", [(4096, 4096, 4096, 16), (2048, 4096, 14336, 64), (1000, 2048, 3000, 128)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_single_pass_gpu_matches_two_launch(single, shape, p):
    """Real sizes on a GPU, the whole grid resident: y and T agree with the two-launch forward, the
    bits are identical, and 20 repeated launches give bit-identical outputs (a barrier race would show
    as run-to-run differences or NaN from an unwritten partial)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the single-pass forward is a Hopper (sm90+) path")
    M, K, N, r = shape
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.bfloat16, adt=torch.float32, lora_bias=True)
    args = (x, W, b, A, B, lb, 2.0, p, 1234, True)
    fallbacks = sp.barrier_fallbacks()
    y, t, bits = tri.lora_fwd(*args)
    assert single == [("fwd", (M, K))]
    tri.FWD_MODE = "two"
    y2, t2, bits2 = tri.lora_fwd(*args)
    tri.FWD_MODE = "single"
    assert_close_ref(t, t2.double(), (torch.bfloat16, torch.float32), "T vs two-launch")
    assert_close_ref(y, y2.double(), (torch.bfloat16,), "y vs two-launch")
    assert torch.equal(bits, bits2)
    for _ in range(20):
        y3, t3, _b = tri.lora_fwd(*args)
        assert torch.equal(y3, y) and torch.equal(t3, t)
    assert sp.barrier_fallbacks() == fallbacks, "with the whole grid resident no tile may time out"


def _bwd_inputs(M, K, N, r, p, store, dt=torch.float16):
    x, W, A, B, _b, _lb = make_inputs(M, K, N, r, xdt=dt, adt=torch.float32)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(x.device, dt)
    _y, t, bits = tri.lora_fwd(x, W, None, A, B, None, 2.0, p, 77, store)
    return dy, x, W, A, B, t, bits


def _bwd_ref(dy, x, W, A, B, t, bits, p):
    """The two-launch backward (itself checked against float64 in test_lora_linear.py)."""
    return tri.lora_bwd(dy, x, W, A, B, t, bits, 2.0, p, 77, True, True)


# (M, K, N, r, programs, producers, p, store the mask)
CONCURRENT_BWD = [
    (100, 200, 96, 8, 4, 4, 0.1, True),  # 7 K-tiles per row-block, 4 producers, dB tiles first in the walk
    (67, 96, 200, 16, 5, 2, 0.5, False),  # regenerated mask, ragged M
    (64, 64, 64, 1, 3, 1, 0.0, True),  # a single producer, r = 1
]


@needs_interpreter
@pytest.mark.parametrize("levels", [1, 2], ids=["one-level", "two-level"])
@pytest.mark.parametrize("M,K,N,r,programs,producers,p,store", CONCURRENT_BWD, ids=str)
def test_single_pass_backward_barrier_runs_concurrently(monkeypatch, M, K, N, r, programs, producers, p, store, levels):
    """The backward's real barrier with every program in its own thread: dX, dA, dB and Σ dY match
    the two-launch backward, bit-identical run to run, no tile fell back (one- and two-level)."""
    monkeypatch.setattr(sp, "INTERPRETER_PHASES", False)
    monkeypatch.setattr(sp, "REDUCE_LEVELS", levels)
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    dy, x, W, A, B, t, bits = _bwd_inputs(M, K, N, r, p, store)
    ref = _bwd_ref(dy, x, W, A, B, t, bits, p)
    fallbacks = sp.barrier_fallbacks("cpu")
    kw = dict(num_programs=programs, num_producers=producers)
    with concurrent_programs(timeout=120):
        out = sp.lora_bwd_single_pass(dy, x, W, A, B, t, bits, 2.0, p, 77, True, **kw)
        again = sp.lora_bwd_single_pass(dy, x, W, A, B, t, bits, 2.0, p, 77, True, **kw)
    assert sp.barrier_fallbacks("cpu") == fallbacks
    for name, o, a, r_ in zip(("dx", "dA", "dB", "colsum"), out, again, ref, strict=True):
        assert torch.equal(o, a), f"{name} differs between two identical calls"
        assert_close_ref(o, r_.double(), (x.dtype, A.dtype), name)


@needs_interpreter
@pytest.mark.parametrize("need_da", [True, False], ids=["dA", "no-dA"])
def test_single_pass_backward_without_db_leaves_out_its_tiles(monkeypatch, need_da):
    """lora_B frozen (need_db=False): the walk holds only the dX tiles (the grid with programs to
    spare is ⌈M/BM⌉·⌈K/BK⌉, not ⌈N/BN⌉ more), dB and Σ dY come back empty as from the two-launch
    path, and dX (and dA) still match it; the real barrier, every program in its own thread."""
    monkeypatch.setattr(sp, "INTERPRETER_PHASES", False)
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    M, K, N, r = 67, 96, 200, 16
    dy, x, W, A, B, t, bits = _bwd_inputs(M, K, N, r, 0.1, True)
    ref = tri.lora_bwd(dy, x, W, A, B, t, bits, 2.0, 0.1, 77, True, need_da, need_db=False, bwd_mode="two")
    grids, kernel = [], sp._bwd_single_pass_kernel

    class _Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sp, "_bwd_single_pass_kernel", _Spy())
    with concurrent_programs(timeout=120):
        out = sp.lora_bwd_single_pass(dy, x, W, A, B, t, bits, 2.0, 0.1, 77, need_da, need_db=False, num_programs=64)
    cfg = sp._single_bwd_cfg(r)
    assert grids == [(-(-M // cfg["BLOCK_M"]) * -(-K // cfg["BLOCK_K"]),)], grids
    assert out[2].shape == ref[2].shape == (0, r) and out[3].shape == ref[3].shape == (0,)
    assert_close_ref(out[0], ref[0].double(), (x.dtype, A.dtype), "dx")
    if need_da:
        assert_close_ref(out[1], ref[1].double(), (x.dtype, A.dtype), "dA")


@needs_interpreter
@pytest.mark.parametrize("levels", [1, 2], ids=["one-level", "two-level"])
def test_single_pass_backward_starved_barrier_recomputes(monkeypatch, levels):
    """Only 2 of 4 programs resident with 4 producers: dT is recomputed by the waiters, still right."""
    monkeypatch.setattr(sp, "INTERPRETER_PHASES", False)
    monkeypatch.setattr(sp, "REDUCE_LEVELS", levels)
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    dy, x, W, A, B, t, bits = _bwd_inputs(40, 128, 96, 4, 0.1, True)
    ref = _bwd_ref(dy, x, W, A, B, t, bits, 0.1)
    before = sp.barrier_fallbacks("cpu")
    with concurrent_programs(timeout=120, max_resident=2):
        out = sp.lora_bwd_single_pass(
            dy, x, W, A, B, t, bits, 2.0, 0.1, 77, True, num_programs=4, num_producers=4, max_spins=50
        )
    assert sp.barrier_fallbacks("cpu") > before
    for name, o, r_ in zip(("dx", "dA", "dB", "colsum"), out, ref, strict=True):
        assert_close_ref(o, r_.double(), (x.dtype, A.dtype), name)
    with concurrent_programs(timeout=120):  # every barrier opens: the same bits as the fallback's
        resident = sp.lora_bwd_single_pass(dy, x, W, A, B, t, bits, 2.0, 0.1, 77, True, num_programs=4, num_producers=4)
    for name, o, r_ in zip(("dx", "dA", "dB", "colsum"), out, resident, strict=True):
        assert torch.equal(o, r_), f"the fallback changed the bits of {name}"


@requires_gpu
@pytest.mark.parametrize("shape", [(4096, 4096, 4096, 16), (2048, 14336, 4096, 64), (1000, 3000, 2048, 128)], ids=str)
@pytest.mark.parametrize("p,store", [(0.0, True), (0.1, True), (0.1, False)])
def test_single_pass_backward_gpu_matches_two_launch(single, shape, p, store):
    """Real sizes, whole grid resident: the single-pass backward agrees with the two-launch one, is
    bit-identical over 10 repeats, and no tile fell back to recomputing dT."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the single-pass backward is a Hopper (sm90+) path")
    M, K, N, r = shape
    tri.FWD_MODE = "two"
    dy, x, W, A, B, t, bits = _bwd_inputs(M, K, N, r, p, store, dt=torch.bfloat16)
    tri.BWD_MODE = "two"
    ref = _bwd_ref(dy, x, W, A, B, t, bits, p)
    tri.BWD_MODE = "single"
    fallbacks = sp.barrier_fallbacks()
    out = tri.lora_bwd(dy, x, W, A, B, t, bits, 2.0, p, 77, True, True)
    assert single == [("bwd", (M, K))]
    for name, o, r_ in zip(("dx", "dA", "dB", "colsum"), out, ref, strict=True):
        assert_close_ref(o, r_.double(), (torch.bfloat16, torch.float32), name)
    for _ in range(10):
        again = tri.lora_bwd(dy, x, W, A, B, t, bits, 2.0, p, 77, True, True)
        assert all(torch.equal(o, a) for o, a in zip(out, again, strict=True))
    assert sp.barrier_fallbacks() == fallbacks


@needs_interpreter
def test_captured_launches_get_barrier_words_of_their_own(monkeypatch):
    """Under a CUDA-graph capture (simulated: ``_capturing`` true) each single-pass launch, forward and
    backward, runs its real barrier on fresh zeroed words (epoch 1 when done), not the stream's: the
    stream's words keep their epoch, and the results equal the eager launch's bit for bit."""
    monkeypatch.setattr(sp, "INTERPRETER_PHASES", False)
    monkeypatch.setattr(tri, "TMA_MODE", "1")
    M, K, N, r = 67, 96, 64, 8
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.float16, adt=torch.float32, lora_bias=True)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(x.dtype)
    fwd_kw = dict(num_programs=4, num_producers=2)

    def both():
        y, t, bits = sp.lora_fwd_single_pass(x, W, b, A, B, lb, 2.0, 0.1, 5, True, **fwd_kw)
        grads = sp.lora_bwd_single_pass(dy, x, W, A, B, t, bits, 2.0, 0.1, 5, True, **fwd_kw)
        return (y, t, bits, *grads)

    with concurrent_programs(timeout=120):
        eager = both()
    stream_words = dict(sp._SYNC)
    epochs = {k: int(v[0]) for k, v in stream_words.items()}
    used = []
    for name in ("_fwd_single_pass_kernel", "_bwd_single_pass_kernel"):
        kernel = getattr(sp, name)

        class _Spy:
            def __getitem__(self, grid, kernel=kernel):
                def launch(*args, **kw):
                    used.append(next(a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int32))
                    return kernel[grid](*args, **kw)

                return launch

        monkeypatch.setattr(sp, name, _Spy())
    monkeypatch.setattr(sp, "_capturing", lambda device: True)
    with concurrent_programs(timeout=120):
        captured = both()
    assert len(used) == 2 and all(w is not v for w in used for v in stream_words.values())
    assert [int(w[0]) for w in used] == [1, 1], "a captured launch must start from epoch 0 on its own words"
    assert sp._SYNC == stream_words and {k: int(v[0]) for k, v in sp._SYNC.items()} == epochs
    for name, u, v in zip(("y", "T", "bits", "dx", "dA", "dB", "colsum"), eager, captured, strict=True):
        assert torch.equal(u, v), name


@requires_gpu
@pytest.mark.parametrize("warm_stream", [True, False], ids=["eager-call-on-stream", "fresh-stream"])
def test_single_pass_replays_in_a_cuda_graph(single, warm_stream):
    """A captured forward and backward have barrier words of their own, zeroed by the graph on every
    replay: with or without an eager call on the capture stream first, replays with new inputs match
    eager calls bit for bit, also with eager single-pass calls on the capture stream in between."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the single-pass forward is a Hopper (sm90+) path")
    M, K, N, r = 2048, 4096, 4096, 16
    x, W, A, B, b, lb = make_inputs(M, K, N, r, xdt=torch.bfloat16, adt=torch.float32, lora_bias=True)
    static_x, static_dy = x.clone(), torch.randn(M, N, device="cuda").to(x.dtype)

    def step(xx, dy):
        y, t, bits = tri.lora_fwd(xx, W, b, A, B, lb, 2.0, 0.1, 1234, True)
        return (y, t, *tri.lora_bwd(dy, xx, W, A, B, t, bits, 2.0, 0.1, 1234, True, True))

    step(static_x, static_dy)  # compile outside the capture (on the default stream)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if warm_stream:
            step(static_x, static_dy)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static_out = step(static_x, static_dy)
    torch.cuda.current_stream().wait_stream(stream)
    assert [c[0] for c in single[-2:]] == ["fwd", "bwd"], "the capture did not take the single-pass kernels"
    fallbacks = sp.barrier_fallbacks()
    for seed in (1, 2, 3):
        gen = torch.Generator("cuda").manual_seed(seed)
        new_x = torch.randn(M, K, device="cuda", generator=gen).to(x.dtype)
        new_dy = torch.randn(M, N, device="cuda", generator=gen).to(x.dtype)
        static_x.copy_(new_x)
        static_dy.copy_(new_dy)
        stream.wait_stream(torch.cuda.current_stream())  # the inputs are written on the default stream
        with torch.cuda.stream(stream):
            step(new_x, new_dy)  # an eager call on the capture stream between replays
            graph.replay()
        torch.cuda.current_stream().wait_stream(stream)
        eager = step(new_x, new_dy)
        torch.cuda.synchronize()
        for name, u, v in zip(("y", "T", "dx", "dA", "dB", "colsum"), static_out, eager, strict=True):
            assert torch.equal(u, v), (seed, name)
    assert sp.barrier_fallbacks() == fallbacks


# LORA_KERNELS_SP_SLICE=fused: the producers' slice inside the GEMM loop, arriving after it (opt-in A/B).
@pytest.mark.parametrize("p,mode", [(0.1, "bitmask"), (0.5, "regenerate")])
@pytest.mark.parametrize("shape", [(67, 104, 72, 16), (130, 96, 48, 64), (5, 24, 16, 8)], ids=str)
def test_single_pass_fused_slice_forward_and_gradients(single, monkeypatch, p, mode, shape):
    """The fused-slice kernels through the public API (the interpreter's phased launches), every gradient
    against float64."""
    monkeypatch.setattr(sp, "FUSED_SLICE", True)
    test_single_pass_forward_and_gradients(single, (torch.bfloat16, torch.float32), p, mode, shape)


@needs_interpreter
@pytest.mark.parametrize("levels", [1, 2], ids=["one-level", "two-level"])
@pytest.mark.parametrize("M,K,N,r,programs,producers", [CONCURRENT[0], CONCURRENT[2], CONCURRENT[4]], ids=str)
def test_single_pass_fused_slice_barrier_runs_concurrently(monkeypatch, M, K, N, r, programs, producers, levels):
    """The fused-slice forward with every program in its own thread (straddling producer groups, empty
    slices, consumers waiting on the flag): the checks of ``test_single_pass_barrier_runs_concurrently``."""
    monkeypatch.setattr(sp, "FUSED_SLICE", True)
    test_single_pass_barrier_runs_concurrently(monkeypatch, M, K, N, r, programs, producers, 0.1, levels)


@needs_interpreter
@pytest.mark.parametrize("levels", [1, 2], ids=["one-level", "two-level"])
@pytest.mark.parametrize("case", CONCURRENT_BWD[:2], ids=str)
def test_single_pass_fused_slice_backward_runs_concurrently(monkeypatch, case, levels):
    """The fused-slice backward with every program in its own thread against the two-launch backward."""
    monkeypatch.setattr(sp, "FUSED_SLICE", True)
    test_single_pass_backward_barrier_runs_concurrently(monkeypatch, *case, levels)


@needs_interpreter
def test_single_pass_fused_slice_starved_barrier_recomputes(monkeypatch):
    """Fused slice, 2 of 4 programs resident: the waiters recompute T and dT, still right and counted."""
    monkeypatch.setattr(sp, "FUSED_SLICE", True)
    test_single_pass_starved_barrier_recomputes(monkeypatch, 1)
    test_single_pass_backward_starved_barrier_recomputes(monkeypatch, 1)
