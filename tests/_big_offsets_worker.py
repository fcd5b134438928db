"""The Triton kernels' 64-bit offsets, checked in the CPU interpreter (tests/test_hostile.py runs this).

    python -m tests._big_offsets_worker [CASE ...]

More than 2³¹ elements of x need a GPU with ~13 GB (test_more_than_2_pow_31_elements). The offsets can be
checked without that: every input here is a view with a stride of 2²⁵–2³⁰ elements into one fp16 storage of
2³² elements (8 GiB of address space, of which the few rows touched are ever backed by memory), so a row or
column index times its stride passes 2³¹ although each tensor has a few hundred elements. A kernel that
formed such an offset in 32 bits would wrap it to a negative one and read outside the storage: a segfault
in the interpreter (an illegal address on a GPU), or wrong values. The interpreter computes in numpy's
types, with Triton's: an int32 stride argument times an int32 index wraps there as on a GPU.

Each case runs the forward and backward of ``lora_linear(backend="triton")`` on such views (x, weight,
lora_A, lora_B and dY: their rows, or their columns, far apart), with the launchers' own buffers (y, T, the
bitmask, dT, dX, split partials) placed far apart likewise in a second 8 GiB storage (:class:`FarBuffers`), and
prints one JSON line: the launches made, the strides the kernels were given, the buffers placed far, and each
result's error against the float64 reference of the same values. "start <case>" goes to stderr first, so a
crash names the case. Run in a process of its own, with TRITON_INTERPRET=1 in its environment, so a segfault
fails a test instead of pytest. (Importing this module imports nothing of lora_kernels or Triton: the test
reads CASES from it.)
"""

from __future__ import annotations

import json
import os
import sys

import torch

DT = torch.float16
STORE = 2**32 + 2**16  # elements of the one fp16 storage (8 GiB of address space)
M_ROWS, M_COLS, K, N, R = 4, 67, 72, 40, 9

# layout -> tensor -> (shape, strides, storage offset). Every row (or column) of every view starts at a
# multiple of 2**25 plus the view's own offset below 2**16, and spans fewer than 2**12 elements: no two
# views share an element. The last index of each strided dimension lies past element 2**31.
LAYOUTS = {
    # rows far apart: x's and dY's row 2 (of 4) starts at element 2**31, weight's and lora_B's row 32 (of
    # 40), lora_A's row 8 (of 9)
    "rows": {
        "x": ((M_ROWS, K), (2**30, 1), 0),
        "dy": ((M_ROWS, N), (2**30, 1), 4096),
        "weight": ((N, K), (2**26, 1), 8192),
        "lora_A": ((R, K), (2**28, 1), 12288),
        "lora_B": ((N, R), (2**26, 1), 16384),
    },
    # columns far apart: x, weight (then stored (K, N), as GPT-2's Conv1D keeps it) and lora_A from column
    # 64 of 72, dY from column 32 of 40, lora_B's column 8 of 9
    "cols": {
        "x": ((M_COLS, K), (1, 2**25), 20480),
        "dy": ((M_COLS, N), (1, 2**26), 24576),
        "weight": ((N, K), (1, 2**25), 28672),
        "lora_A": ((R, K), (1, 2**25), 32768),
        "lora_B": ((N, R), (1, 2**28), 36864),
    },
    # the TMA kernels' layout (rows of unit stride, 16-byte aligned): x and dY rows far apart, the weight
    # stored (K, N) with its K rows far apart (its descriptor's), lora_A's columns far apart, lora_B as "rows".
    # ("rows" has lora_A's rows far apart: the launchers copy it, see _rank_offsets_fit.)
    "rows_wkn": {
        "x": ((M_ROWS, K), (2**30, 1), 40960),
        "dy": ((M_ROWS, N), (2**30, 1), 45056),
        "weight": ((N, K), (1, 2**25), 49152),
        "lora_A": ((R, K), (1, 2**25), 53248),
        "lora_B": ((N, R), (2**26, 1), 57344),
    },
}


def _dy1_cfg_16(x) -> dict:
    """The one-read dY kernel's tiles with 16 columns (the interpreter's are 32: two partials at N = 40)."""
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)


# case -> (layout, module switches, dropout mask mode)
CASES = {
    "pointer-rows-bitmask": ("rows", {"TMA_MODE": "0"}, "bitmask"),
    "pointer-rows-regenerate": ("rows", {"TMA_MODE": "0"}, "regenerate"),
    "pointer-cols-bitmask": ("cols", {"TMA_MODE": "0"}, "bitmask"),
    "pointer-cols-split": ("cols", {"TMA_MODE": "0", "SHRINK_SPLIT_K": "3", "BWD_SPLIT_M": "2"}, "bitmask"),
    "pointer-rows-dy1": ("rows", {"TMA_MODE": "0", "DY_PASSES": "1"}, "bitmask"),
    # three dT partials (N = 40 in 16-column blocks), the third past 2**31 (FAR_LEAD)
    "pointer-rows-dy1-parts": ("rows", {"TMA_MODE": "0", "DY_PASSES": "1", "_dy1_cfg": _dy1_cfg_16}, "bitmask"),
    "tma-rows-bitmask": ("rows", {"TMA_MODE": "1"}, "bitmask"),
    "tma-rows-regenerate": ("rows", {"TMA_MODE": "1"}, "regenerate"),
    "tma-rows-wkn": ("rows_wkn", {"TMA_MODE": "1"}, "bitmask"),
    "tma-rows-da-separate": ("rows", {"TMA_MODE": "1", "BWD_DA": "separate"}, "bitmask"),
    "single-rows-bitmask": ("rows", {"TMA_MODE": "1", "FWD_MODE": "single", "BWD_MODE": "single"}, "bitmask"),
    "single-rows-wkn": ("rows_wkn", {"TMA_MODE": "1", "FWD_MODE": "single", "BWD_MODE": "single"}, "regenerate"),
}

# cases whose buffers have the partials' leading dim far apart, not the rows (FarBuffers)
FAR_LEAD = {"pointer-cols-split", "pointer-rows-dy1-parts", "single-rows-wkn"}

# backend="cuda" over the emulated extension (tests/test_cuda_stack_emulation.py): case -> (layout, mask mode)
CUDA_EMU_CASES = {
    "cuda-emu-rows": ("rows", "bitmask"),
    "cuda-emu-cols": ("cols", "regenerate"),
    "cuda-emu-rows-wkn": ("rows_wkn", "bitmask"),
}


def _views(store: torch.Tensor, layout: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, (shape, stride, offset) in LAYOUTS[layout].items():
        v = store.as_strided(shape, stride, offset)
        std = {"weight": K**-0.5, "lora_A": K**-0.5, "lora_B": R**-0.5}.get(name, 1.0)
        with torch.no_grad():
            v.copy_(torch.randn(shape, generator=gen) * std)
        out[name] = v
    return out


def _inputs(store: torch.Tensor, layout: str, seed: int) -> dict[str, torch.Tensor]:
    t = _views(store, layout, torch.Generator().manual_seed(seed))
    t["x"].requires_grad_(True)
    t["lora_A"].requires_grad_(True)
    t["lora_B"].requires_grad_(True)
    t["bias"] = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(DT)
    t["lora_bias"] = (0.1 * torch.randn(N, generator=torch.Generator().manual_seed(2))).to(DT).requires_grad_(True)
    return t


KW = {"scaling": 2.0, "dropout_p": 0.1, "training": True, "seed": 2**33 + 5}
LEAVES = ("x", "lora_A", "lora_B", "lora_bias")


def _step(t: dict, backend: str, mask_mode: str) -> tuple[torch.Tensor, ...]:
    from lora_kernels import lora_linear

    args = (t[k] for k in ("x", "weight", "lora_A", "lora_B", "bias", "lora_bias"))
    y = lora_linear(*args, backend=backend, dropout_mask=mask_mode, **KW)
    return (y, *torch.autograd.grad(y, [t[k] for k in LEAVES], t["dy"]))


def _errors(t: dict, out: tuple[torch.Tensor, ...]) -> dict:
    """label -> (max abs error, max |reference|), tests/_utils.py's assert_close_ref measure (None: non-finite)."""
    from lora_kernels.reference import lora_linear_ref

    leaves64 = [t[k].detach().double().requires_grad_(True) for k in LEAVES]
    x64, A64, B64, lb64 = leaves64
    y64 = lora_linear_ref(x64, t["weight"].double(), A64, B64, t["bias"].double(), lb64, **KW)
    ref = (y64, *torch.autograd.grad(y64, leaves64, t["dy"].double()))
    errs = {}
    for label, got, want in zip(("y", "dx", "dA", "dB", "dlora_bias"), out, ref, strict=True):
        finite = bool(torch.isfinite(got).all())
        errs[label] = ((got.double() - want).abs().max().item() if finite else None, want.abs().max().item())
    return errs


class FarBuffers:
    """The launchers' allocator (``lora_linear._empty``) for a case: every buffer whose rows are x's rows (shape
    ``(M, C)`` or ``(L, M, C)``: y, T and its split partials, the bitmask, dT and its partials, dX) comes back as a
    view into one byte storage, placed so that the kernels' offsets into their own M-sized buffers pass 2³¹, as
    they do with more than 2³¹ elements (test_more_than_2_pow_31_elements, GPU):

    * ``"rows"``: rows ``S`` elements apart, ``(M - 1)·S`` past 2³¹; the leading dim of a partial (splits,
      producers) interleaves within a row's band, so the extent stays one band per row;
    * ``"lead"``: a leading dim of three or more (partials of T or dT) with its index ``L - 1`` past 2³¹ on a
      stride below 2³¹ (an int32 argument, as on a GPU), rows near (the kernels index a partial's rows with T's
      row stride: T's rows are near too).

    8 GiB of address space in either, of which the elements written are backed. Each buffer is NaN-filled
    (integers: 0xA5), so an element a kernel forgets to write is caught. Other shapes (dA, dB, 1-D counters) are
    allocated as usual."""

    SLOT = 2**14  # bytes between two buffers' first elements in a band: more than a row ("rows"), a slab ("lead")
    FAR = 2**31 + 1  # elements: an index times its stride reaches this

    BYTES = 4 * (FAR + 64 * 128) + 64 * SLOT  # the storage: room for fp32 rows up to M = 128

    def __init__(self, store: torch.Tensor, m: int, mode: str, real) -> None:
        assert store.dtype == torch.uint8 and store.numel() >= self.BYTES and 2 <= m <= 128
        self.bytes, self.m, self.mode, self.real, self.next = store, m, mode, real, 0
        # a multiple of 64 elements (TMA wants 16-byte row strides) with (m - 1)·S ≥ 2**31 + 1
        self.row_stride = -(-self.FAR // (m - 1) // 64) * 64
        self.far: list[str] = []

    def __call__(self, shape: tuple[int, ...], device, dtype: torch.dtype) -> torch.Tensor:
        if len(shape) not in (2, 3) or shape[-2] != self.m or 0 in shape:
            return self.real(shape, device, dtype)
        size = torch.empty((), dtype=dtype).element_size()
        width = -(-shape[-1] // 16) * 16  # elements
        lead = shape[0] if len(shape) == 3 else 1
        if self.mode == "rows":
            strides, far, slab = [self.row_stride, 1], True, lead * width * size  # slab: one band's share
            if len(shape) == 3:
                strides.insert(0, width)
        else:  # an int32 stride (below 2**31) whose index L - 1 ≥ 2 reaches past 2**31; two partials stay near
            far = len(shape) == 3 and lead >= 3
            strides, slab = [width, 1], (1 if far else lead) * self.m * width * size
            if len(shape) == 3:
                strides.insert(0, -(-self.FAR // (lead - 1) // 64) * 64 if far else self.m * width)
        assert slab <= self.SLOT and self.next < 64, (shape, self.next)
        base = self.next * self.SLOT // size
        self.next += 1
        # set_ rather than a view: the buffers share the storage, not one autograd base (a view of a base that
        # another buffer's fill_ modified could not be returned from the custom Function)
        v = torch.empty(0, dtype=dtype).set_(self.bytes.untyped_storage(), base, shape, strides)
        with torch.no_grad():
            v.fill_(float("nan") if dtype.is_floating_point else 0xA5)
        if far:
            self.far.append(f"{tuple(shape)}:{str(dtype).removeprefix('torch.')}")
        return v


def _strides(t: dict) -> dict:
    return {k: list(t[k].stride()) for k in LAYOUTS["rows"]}


def run_case(store: torch.Tensor, name: str, out_store: torch.Tensor) -> dict:
    """A Triton case: the kernels in the interpreter, the module's switches set for the case."""
    from lora_kernels.triton_ops import lora_linear as tri
    from lora_kernels.triton_ops import single_pass as sp

    layout, switches, mask_mode = CASES[name]
    saved = {k: getattr(tri, k) for k in switches}
    launched, seen = [], {}
    real_launch, real_planned, real_bwd = tri._launch, sp._planned_launch, tri._bwd

    def launch(kernel, *a, **k):
        launched.append(kernel.__name__)
        return real_launch(kernel, *a, **k)

    def planned(kernel, *a, **k):
        launched.append(kernel.__name__)
        return real_planned(kernel, *a, **k)

    def bwd(dy, *a, **k):
        seen["dy"] = list(dy.stride())
        return real_bwd(dy, *a, **k)

    t = _inputs(store, layout, len(name))
    real_empty = tri._empty
    far = FarBuffers(out_store, t["x"].shape[0], "lead" if name in FAR_LEAD else "rows", real_empty)
    try:
        for k, v in switches.items():
            setattr(tri, k, v)
        tri._launch, sp._planned_launch, tri._bwd, tri._empty = launch, planned, bwd, far
        out = _step(t, "triton", mask_mode)
    finally:
        for k, v in saved.items():
            setattr(tri, k, v)
        tri._launch, sp._planned_launch, tri._bwd, tri._empty = real_launch, real_planned, real_bwd, real_empty
    strides = _strides(t) | seen  # (dY: as the backward's launcher received it)
    return {"case": name, "launched": launched, "strides": strides, "far_outputs": far.far, "errors": _errors(t, out)}


def run_cuda_emu_case(store: torch.Tensor, name: str, ext) -> dict:
    """A CUDA case: backend="cuda" through its Python layer into csrc/lora_ops.cpp compiled for the CPU over the
    emulated kernels (``ext``: tests/conftest.py's ``_cuda_ops_emu_build``, set up as its ``emu_cuda`` fixture)."""
    from lora_kernels.cuda_ops import _ext
    from lora_kernels.cuda_ops import lora_linear as cuda_ll

    layout, mask_mode = CUDA_EMU_CASES[name]
    calls, seen = [], {}

    class Spy:  # which entry points ran, the GEMM path each ended on, the dY strides lora_bwd received
        def lora_fwd(self, *args):
            try:
                return ext.lora_fwd(*args)
            finally:
                calls.append(("lora_fwd", ext.last_gemm_path()))

        def lora_bwd(self, *args):
            seen["dy"] = list(args[0].stride())
            try:
                return ext.lora_bwd(*args)
            finally:
                calls.append(("lora_bwd", ext.last_gemm_path()))

    def unavailable_reason(x, weight, lora_A):  # the real one needs CUDA tensors; its dtype rule stays
        bad = [n for n, v in (("x", x), ("weight", weight), ("lora_A", lora_A)) if v.dtype not in cuda_ll._DTYPES]
        return f"{bad[0]} dtype is not supported by the cuda backend" if bad else None

    real_get, real_reason = _ext.get_ext, cuda_ll.unavailable_reason
    t = _inputs(store, layout, len(name))
    try:
        _ext.get_ext, cuda_ll.unavailable_reason = (lambda build=True: Spy()), unavailable_reason
        out = _step(t, "cuda", mask_mode)
    finally:
        _ext.get_ext, cuda_ll.unavailable_reason = real_get, real_reason
    return {"case": name, "launched": calls, "strides": _strides(t) | seen, "errors": _errors(t, out)}


def _load_emulated_extension(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_ops_emu", path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    ext.set_schedule(2)
    ext.set_split_min_c(32)
    ext.set_device(9, 0, True)  # an H100 with the sm90a kernels: the GEMM path chosen as on the GPU
    ext.set_gemm_backend(0)
    torch.use_deterministic_algorithms(True)  # at::empty comes back NaN-filled: unwritten outputs fail
    return ext


def main(argv: list[str]) -> None:
    emu = None
    if argv[:1] == ["--cuda-emu"]:
        emu, argv = argv[1], argv[2:]
    elif os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 in the environment (the Triton kernels in the CPU interpreter)")
    try:
        store = torch.empty(STORE, dtype=DT)
        out_store = None if emu else torch.empty(FarBuffers.BYTES, dtype=torch.uint8)  # (the Triton cases' buffers)
    except (RuntimeError, MemoryError) as e:  # an address-space limit (ulimit -v, strict overcommit)
        print(json.dumps({"skip": f"cannot reserve 8 GiB (twice) of address space for the strided views: {e}"}))
        return
    ext = _load_emulated_extension(emu) if emu else None
    for name in argv or list(CUDA_EMU_CASES if emu else CASES):
        print(f"start {name}", file=sys.stderr, flush=True)
        res = run_cuda_emu_case(store, name, ext) if emu else run_case(store, name, out_store)
        print(json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------
# for the tests that run this (tests/test_hostile.py, tests/test_cuda_stack_emulation.py)


def run_worker(args: list[str], env: dict | None = None) -> dict:
    """This module in a process of its own: {"results": case -> result, "rc", "last" (the last case started),
    "stderr"}; {"skip": reason} where it could not reserve the address space."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "tests._big_offsets_worker", *args], cwd=root,
                          env=os.environ | {"PYTHONPATH": path} | (env or {}), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    results = {}
    for line in proc.stdout.splitlines():
        res = json.loads(line)
        if "skip" in res:
            return res
        results[res["case"]] = res
    started = [line.split(" ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("start ")]
    return {"results": results, "rc": proc.returncode, "last": started[-1] if started else None,
            "stderr": proc.stderr[-4000:]}  # fmt: skip


def check_case(run: dict, case: str, layout: str, launched: list) -> None:
    """One case of ``run_worker``'s run: it ran to the end, launched what it names, took the views as they were
    made (nothing upstream copied them) and matches float64 within the fp16 tolerance."""
    import pytest

    from tests._utils import TOL

    res = run["results"].get(case)
    if res is None:
        where = "in this case" if run["last"] == case else f"before this case, in {run['last']!r}"
        pytest.fail(f"the worker ended (exit {run['rc']}) {where}: a 32-bit offset read outside the tensors?\n"
                    f"{run['stderr']}")  # fmt: skip
    assert res["launched"] == launched, res["launched"]
    if "far_outputs" in res:  # a Triton case: the kernels' own buffers were placed far apart (FarBuffers)
        m = M_COLS if layout == "cols" else M_ROWS
        if case in FAR_LEAD:  # three partials of T or dT (the shrink's splits, dY's column blocks, the producers')
            want = {f"(3, {m}, {R}):float32"}
        else:  # y, T, dX and the bitmask
            want = {f"({m}, {N}):float16", f"({m}, {R}):float32", f"({m}, {K}):float16"}
            if CASES[case][2] == "bitmask":
                want.add(f"({m}, {(K + 7) // 8}):uint8")
        assert want <= set(res["far_outputs"]), res["far_outputs"]
    assert res["strides"] == {k: list(v[1]) for k, v in LAYOUTS[layout].items()}, res["strides"]
    atol, rtol = TOL[DT]
    for label, (err, scale) in res["errors"].items():
        assert err is not None, f"{case}: {label} has non-finite values"
        bound = atol * max(scale, 1.0) + rtol * scale
        assert err <= bound, f"{case}: {label}: max abs err {err:.3e}, scale {scale:.3e}"


if __name__ == "__main__":
    main(sys.argv[1:])
