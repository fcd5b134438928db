"""``python -m lora_kernels verify`` / ``demo``: check every backend against the float64 reference.

For each available backend × dtype configuration × shape ``(M, K, N, r)`` × dropout ``p`` (× mask
mode for kernel backends) a *case* runs ``lora_linear`` forward and backward and compares

* the output ``y: (M, N)`` and the gradients ``dx: (M, K)``, ``dA: (r, K)``, ``dB: (N, r)``,
  ``dlora_bias: (N,)`` with :func:`lora_kernels.reference.lora_linear_ref` evaluated in float64 on
  the same (already rounded) inputs and the same seed, against :data:`TOLERANCES`; besides, per
  backend × dtype (under ``--only-shapes`` only with ``--partial``), four cases with only some leaves
  trained (:data:`TRAIN_SETS`: the backward's partial paths, and ``dbias: (N,)`` of a trained base bias)
  and one with the weight stored ``(K, N)`` (passed as its ``(N, K)`` view, as GPT-2's Conv1D layers
  are: on Hopper the Triton TMA kernels' W_KN variant);
* the dropout mask, bit for bit, with :func:`lora_kernels.reference.dropout_keep_mask` through a
  *mask probe* (see :func:`mask_probe`): a call whose output and input gradient *are* the mask, so
  a backend cannot hide a few flipped mask bits inside a loose bf16 tolerance. When a backend
  module also exposes ``dropout_bitmask(seed, M, K, p, device) -> uint8 (M, ceil(K/8))`` or
  ``dropout_keep_mask(seed, M, K, p, device) -> bool (M, K)``, those bits are compared directly.

Without a GPU it checks the reference itself (float64/float32 vs float64) and, with
``--interpret``, the Triton kernels in the Triton CPU interpreter (bf16 included: the kernels upcast
bf16 right after each load there, as the interpreter's own bf16 arithmetic is wrong). The exit status
is non-zero when any case fails.

A sweep that cannot finish still reports: after an error that leaves the CUDA context unusable (an
illegal address, a device-side assert: every later CUDA call fails) the remaining cases are not run
and are reported as failed "not run: CUDA context lost (...)"; on SIGTERM or Ctrl-C the cases done
are reported and the rest marked "not run: interrupted". The table and ``--json`` are written
either way, and every case is logged to stderr as it starts, so even a killed run leaves a log.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import platform
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "TOLERANCES",
    "DTYPE_CONFIGS",
    "tol_for",
    "Comparison",
    "compare",
    "Case",
    "CaseResult",
    "make_inputs",
    "run_case",
    "context_lost",
    "mask_probe",
    "default_shapes",
    "default_dtypes",
    "run_verify",
    "run_demo",
    "add_verify_args",
    "parse_shape",
]

# The one tolerance table (tests/_utils.py uses the same numbers): (atol, rtol) of a result
# computed in this dtype against the float64 reference, relative to the reference's scale.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# name -> (dtype of x / weight / bias, dtype of lora_A / lora_B / lora_bias).
# "bf16+fp32a" is PEFT's default: a bf16 base with adapters kept in float32.
DTYPE_CONFIGS: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "fp64": (torch.float64, torch.float64),
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16+fp32a": (torch.bfloat16, torch.float32),
    "fp16+fp32a": (torch.float16, torch.float32),
}

_GPU_DTYPES = ("fp32", "fp16", "bf16", "bf16+fp32a")
# The interpreter's own bf16 arithmetic is wrong (numpy has no bfloat16), but the Triton kernels upcast
# bf16 to fp32 right after each load in interpreter mode, so bf16 cases run there too.
_INTERPRETER_BF16 = "the Triton interpreter's bfloat16 arithmetic is wrong (numpy has no bfloat16)"
# Seeds with bits above 2**32 so both Philox key words are exercised.
_SEED = 0x5DEECE66D_1234
_PROBE_SEED = 0x2545F491_4F6CDD1D
SCALING = 2.0
GRAD_NAMES = ("dx", "dA", "dB", "dlora_bias", "dbias")
_GRAD_OF = {"dx": "x", "dA": "lora_A", "dB": "lora_B", "dlora_bias": "lora_bias", "dbias": "bias"}

# Which leaves require grad. "all" is the ordinary LoRA layer (weight and bias frozen); the others are
# the backward's partial paths, checked once per backend × dtype: a frozen adapter in front of trained
# layers (dX only, no dB), the first layer (x needs nothing: no dX GEMM), LoRA-FA with a trained base
# bias (no dA; dbias from the dB pass's Σ dY), and only the two biases (no dT, no dB: Σ dY alone).
TRAIN_SETS: dict[str, tuple[str, ...]] = {
    "all": ("x", "lora_A", "lora_B", "lora_bias"),
    "x-only": ("x",),
    "no-dx": ("lora_A", "lora_B", "lora_bias"),
    "fa+bias": ("x", "lora_B", "lora_bias", "bias"),
    "biases": ("lora_bias", "bias"),
}


def tol_for(*dtypes: torch.dtype) -> tuple[float, float]:
    """The loosest tolerance among the dtypes that took part in a computation."""
    return max((TOLERANCES[d] for d in dtypes), key=lambda t: t[0])


@dataclass
class Comparison:
    """Max abs error of a result against the float64 reference, and the bound it must stay within.

    ``bound = atol · max(scale, 1) + rtol · scale`` with ``scale = max |ref|`` (LoRA outputs and
    gradients are sums whose entries can cancel to ~0, so errors are measured against the scale).
    """

    err: float
    scale: float
    bound: float
    ok: bool

    @property
    def rel(self) -> float:
        """Error relative to the reference's scale."""
        return self.err / self.scale if self.scale > 0 else self.err

    @property
    def frac(self) -> float:
        """Fraction of the tolerance used (> 1 fails)."""
        return self.err / self.bound if self.bound > 0 else (0.0 if self.err == 0 else math.inf)

    def to_dict(self) -> dict[str, float | bool]:
        d = asdict(self)
        d.update(rel=self.rel, frac=self.frac)
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in d.items()}


def compare(out: torch.Tensor, ref: torch.Tensor, dtypes: Sequence[torch.dtype]) -> Comparison:
    """Compare ``out`` (any dtype) with the float64 ``ref`` under :func:`tol_for` of ``dtypes``."""
    atol, rtol = tol_for(*dtypes)
    if tuple(out.shape) != tuple(ref.shape):
        return Comparison(math.inf, math.nan, 0.0, False)
    if ref.numel() == 0:
        return Comparison(0.0, 0.0, atol, True)
    out64, ref64 = out.detach().double(), ref.detach().double()
    scale = ref64.abs().max().item()
    bound = atol * max(scale, 1.0) + rtol * scale
    if not torch.isfinite(out64).all():
        return Comparison(math.inf, scale, bound, False)
    err = (out64 - ref64).abs().max().item()
    return Comparison(err, scale, bound, err <= bound)


@dataclass
class Case:
    """One verification case: ``backend`` on ``x: (M, K)``, ``weight: (N, K)``, rank ``r``."""

    backend: str
    dtype: str
    M: int
    K: int
    N: int
    r: int
    p: float
    mask_mode: str = "bitmask"
    seed: int = _SEED
    train: str = "all"  # a key of TRAIN_SETS: which leaves require grad
    # "kn": the weight stored (K, N) and passed as its (N, K) view, as GPT-2's Conv1D layers pass theirs
    weight_layout: str = "nk"

    @property
    def label(self) -> str:
        mode = f" {self.mask_mode}" if self.p > 0 and self.backend != "torch" else ""
        train = f" train={self.train}" if self.train != "all" else ""
        layout = " W(K,N)" if self.weight_layout == "kn" else ""
        return f"{self.backend} {self.dtype} {self.M}x{self.K}->{self.N} r={self.r} p={self.p:g}{mode}{train}{layout}"


@dataclass
class CaseResult:
    """Outcome of a :class:`Case` (``status``: "pass", "fail", "error" or "skip")."""

    case: Case
    status: str
    reason: str = ""
    checks: dict[str, Comparison] = field(default_factory=dict)
    seconds: float = 0.0
    # True when the error left the CUDA context unusable (see context_lost): the sweep stops there.
    context_lost: bool = False

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = asdict(self.case)
        d.update(
            kind="case",
            status=self.status,
            reason=self.reason,
            seconds=round(self.seconds, 4),
            checks={k: v.to_dict() for k, v in self.checks.items()},
            context_lost=self.context_lost,
        )
        return d


def make_inputs(
    M: int,
    K: int,
    N: int,
    r: int,
    x_dtype: torch.dtype,
    a_dtype: torch.dtype,
    device: torch.device | str,
    gen_seed: int = 0,
    weight_layout: str = "nk",
) -> dict[str, torch.Tensor]:
    """Random inputs at sizes where the base and low-rank paths contribute comparably.

    ``x: (M, K)``, ``weight: (N, K)``, ``bias: (N,)`` in ``x_dtype``; ``lora_A: (r, K)``,
    ``lora_B: (N, r)`` (non-zero, unlike PEFT's init, so the low-rank path is tested),
    ``lora_bias: (N,)`` in ``a_dtype``; ``dy: (M, N)`` in ``x_dtype``. ``weight_layout="kn"``: the same
    weight values stored (K, N) (the (N, K) view of GPT-2's Conv1D weight).
    """
    g = torch.Generator(device=device).manual_seed(gen_seed)

    def rnd(*shape: int, std: float, dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    weight = rnd(N, K, std=K**-0.5, dtype=x_dtype)
    return {
        "x": rnd(M, K, std=1.0, dtype=x_dtype),
        "weight": weight.t().contiguous().t() if weight_layout == "kn" else weight,
        "bias": rnd(N, std=0.1, dtype=x_dtype),
        "lora_A": rnd(r, K, std=K**-0.5, dtype=a_dtype),
        "lora_B": rnd(N, r, std=r**-0.5, dtype=a_dtype),
        "lora_bias": rnd(N, std=0.1, dtype=a_dtype),
        "dy": rnd(M, N, std=1.0, dtype=x_dtype),
    }


Impl = Callable[..., torch.Tensor]


def _forward_backward(
    impl: Impl,
    inp: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    p: float,
    seed: int,
    train: str = "all",
    **kw,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``impl`` on (optionally upcast) copies of ``inp``; returns ``(y, grads)``: the gradients of
    the leaves that ``TRAIN_SETS[train]`` trains (zeros where one came back None)."""
    trained = TRAIN_SETS[train]
    leaves = {}
    for name in ("x", "weight", "bias", "lora_A", "lora_B", "lora_bias"):
        t = inp[name].detach()
        t = t.to(dtype) if dtype is not None else t.clone()
        leaves[name] = t.requires_grad_(name in trained)
    y = impl(
        leaves["x"],
        leaves["weight"],
        leaves["lora_A"],
        leaves["lora_B"],
        leaves["bias"],
        leaves["lora_bias"],
        scaling=SCALING,
        dropout_p=p,
        training=True,
        seed=seed,
        **kw,
    )
    dy = inp["dy"] if dtype is None else inp["dy"].to(dtype)
    y.backward(dy)
    grads = {}
    for g, leaf in _GRAD_OF.items():
        if leaf in trained:
            grad = leaves[leaf].grad
            grads[g] = grad if grad is not None else torch.zeros_like(leaves[leaf])
    return y.detach(), grads


def _reference_impl(x, weight, lora_A, lora_B, bias, lora_bias, *, scaling, dropout_p, training, seed, **_):
    from .reference import lora_linear_ref

    return lora_linear_ref(x, weight, lora_A, lora_B, bias, lora_bias, scaling, dropout_p, training, seed)


def backend_impl(name: str) -> Impl:
    """The public ``lora_linear`` pinned to one backend."""
    from .api import lora_linear

    return functools.partial(lora_linear, backend=name)


# Text of errors that may mean the CUDA context is gone. A sticky error (illegal address, misaligned
# address, device-side assert, launch failure) fails every later CUDA call in the process, so running
# more cases only produces misleading errors. Triton's launcher reports driver errors as
# "Triton Error [CUDA]: ...", torch as "CUDA error: ..." (torch.AcceleratorError in newer torch).
_CONTEXT_LOST_MARKERS = (
    "CUDA error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "Triton Error [CUDA]",
)
_NOT_RUN = "not run: "


def _error_text(e: BaseException) -> str:
    """``module.Type: message`` (like traceback's last line, but never an exception note)."""
    name = type(e).__qualname__
    if type(e).__module__ not in ("builtins", "__main__"):
        name = f"{type(e).__module__}.{name}"
    msg = str(e).strip()
    return f"{name}: {msg}" if msg else name


def _device_works(device: torch.device | str) -> bool:
    """Whether a trivial kernel still runs on the CUDA ``device``."""
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:
        return False


def _looks_fatal(e: BaseException) -> bool:
    accel = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 only
    if accel is not None and isinstance(e, accel):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _CONTEXT_LOST_MARKERS)


def context_lost(e: BaseException, device: torch.device | str) -> bool:
    """Whether ``e`` left the CUDA context of ``device`` unusable, so no further case can run.

    An error looks fatal if it is a ``torch.AcceleratorError`` (absent in older torch) or a
    RuntimeError naming a CUDA failure. On a CUDA device a trivial kernel then decides: a sticky
    error fails it too, while a non-sticky one (say "CUDA error: invalid argument" from one bad
    launch) does not and the sweep goes on. Elsewhere (a simulated fault in CPU tests) the text decides.
    """
    if not _looks_fatal(e):
        return False
    if torch.device(device).type != "cuda":
        return True
    return not _device_works(device)


def unavailable(name: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> str | None:
    """Why ``name`` cannot run these tensors (None if it can), including interpreter limits."""
    from . import backends

    try:
        backends.resolve(name, x, weight, lora_A)
    except (RuntimeError, ValueError, ImportError) as e:
        if _looks_fatal(e):  # a CUDA failure is no reason to skip: the caller must see it
            raise
        return str(e)
    return None


def run_case(case: Case, device: torch.device | str, impl: Impl | None = None) -> CaseResult:
    """Run one case against the float64 reference; exceptions become an "error" result.

    All of the case runs inside the ``try``, making the inputs and the availability check too: after
    a CUDA fault those are where the next case fails first. ``context_lost`` is set when the error
    left the CUDA context unusable (see :func:`context_lost`).
    """
    t0 = time.perf_counter()
    try:
        return _run_case(case, device, impl, t0)
    except Exception as e:  # a crashing backend is a failed case, reported with its cause
        return CaseResult(
            case, "error", _error_text(e), seconds=time.perf_counter() - t0, context_lost=context_lost(e, device)
        )


def _run_case(case: Case, device: torch.device | str, impl: Impl | None, t0: float) -> CaseResult:
    x_dt, a_dt = DTYPE_CONFIGS[case.dtype]
    inp = make_inputs(case.M, case.K, case.N, case.r, x_dt, a_dt, device, gen_seed=zlib.crc32(case.label.encode()),
                      weight_layout=case.weight_layout)  # fmt: skip
    reason = unavailable(case.backend, inp["x"], inp["weight"], inp["lora_A"])
    if reason is not None:
        return CaseResult(case, "skip", reason)
    impl = impl or backend_impl(case.backend)
    y_ref, g_ref = _forward_backward(_reference_impl, inp, torch.float64, case.p, case.seed, case.train)
    y, grads = _forward_backward(impl, inp, None, case.p, case.seed, case.train, dropout_mask=case.mask_mode)
    dts = (x_dt, a_dt)
    checks = {"out": compare(y, y_ref, dts)}
    for name in GRAD_NAMES:
        if name in g_ref:
            checks[name] = compare(grads[name], g_ref[name], dts)
    if y.dtype != x_dt:
        return CaseResult(case, "fail", f"output dtype {y.dtype} != x dtype {x_dt}", checks)
    bad = [k for k, c in checks.items() if not c.ok]
    status = "fail" if bad else "pass"
    reason = ", ".join(f"{k} err {checks[k].err:.2e} > {checks[k].bound:.2e}" for k in bad)
    return CaseResult(case, status, reason, checks, time.perf_counter() - t0)


def _mask_hook(name: str) -> Callable[..., torch.Tensor] | None:
    """A backend module's own mask generator, if it exposes one (returns a packed bitmask)."""
    from . import backends

    if name == "torch":
        return None
    try:
        mod = importlib.import_module(backends._MODULES[name])
    except ImportError:
        return None
    fn = getattr(mod, "dropout_bitmask", None)
    if fn is not None:
        return fn
    keep_fn = getattr(mod, "dropout_keep_mask", None)
    if keep_fn is not None:
        from .reference import pack_mask

        return lambda seed, M, K, p, device: pack_mask(keep_fn(seed, M, K, p, device))
    return None


def mask_probe(
    impl: Impl,
    M: int,
    K: int,
    p: float,
    seed: int,
    dtype: torch.dtype,
    device: torch.device | str,
    mask_mode: str = "bitmask",
    adapter_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Number of mask bits where the backend's forward and backward masks differ from the reference.

    With ``x = 1``, ``weight = 0``, ``lora_A = I``, ``lora_B = I`` (``r = N = K``) and
    ``scaling = 1 - p``, the output is ``y = keep`` and, for ``dy = 1``, ``dx = keep``: the
    backend's mask can be read off exactly in any dtype (values are 0 or ≈1). The adapters take
    ``adapter_dtype`` (default ``dtype``): fp32 adapters next to a 16-bit x are other kernel variants.
    """
    from .reference import dropout_keep_mask

    eye = torch.eye(K, device=device, dtype=adapter_dtype or dtype)
    x = torch.ones(M, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.zeros(K, K, device=device, dtype=dtype)
    A = eye.clone().requires_grad_(True)
    B = eye.clone().requires_grad_(True)
    y = impl(x, w, A, B, None, None, scaling=1.0 - p, dropout_p=p, training=True, seed=seed, dropout_mask=mask_mode)
    y.backward(torch.ones_like(y))
    keep = dropout_keep_mask(seed, M, K, p, device=device)
    return {
        "forward": int(((y.detach().float() > 0.5) != keep).sum().item()),
        "backward": int(((x.grad.float() > 0.5) != keep).sum().item()),
    }


@dataclass
class MaskResult:
    backend: str
    dtype: str
    mask_mode: str
    M: int
    K: int
    p: float
    status: str
    reason: str = ""
    mismatches: dict[str, int] = field(default_factory=dict)
    context_lost: bool = False  # as in CaseResult

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["kind"] = "mask"
        return d


def run_mask_check(
    backend: str,
    dtype: str,
    device: torch.device | str,
    p: float,
    mask_mode: str,
    impl: Impl | None = None,
    M: int | None = None,
    K: int | None = None,
) -> MaskResult:
    """Mask identity of one backend (probe + the module's own mask function when it has one)."""
    from .reference import dropout_keep_mask, pack_mask

    x_dt, a_dt = DTYPE_CONFIGS[dtype]
    M, K = (M, K) if M is not None and K is not None else probe_size(torch.device(device).type)
    res = MaskResult(backend, dtype, mask_mode, M, K, p, "pass")
    try:  # all of it, allocations and the availability check included (as in run_case)
        probe_x = torch.empty(M, K, dtype=x_dt, device=device)
        probe_a = torch.empty(K, K, dtype=a_dt, device=device)
        reason = unavailable(backend, probe_x, torch.empty(K, K, dtype=x_dt, device=device), probe_a)
        if reason is not None:
            res.status, res.reason = "skip", reason
            return res
        probe = functools.partial(mask_probe, impl or backend_impl(backend), M, K, seed=_PROBE_SEED, dtype=x_dt,
                                  device=device, mask_mode=mask_mode, adapter_dtype=a_dt)  # fmt: skip
        res.mismatches = probe(p=p)
        hook = _mask_hook(backend) if impl is None else None
        if hook is not None:
            bits = hook(_PROBE_SEED, M, K, p, device)
            ref_bits = pack_mask(dropout_keep_mask(_PROBE_SEED, M, K, p, device=device))
            res.mismatches["module_bitmask"] = int((bits.to(ref_bits.device) != ref_bits).sum().item())
        if p > 0:
            # Once more with the threshold on one of the probe's own draws (u == threshold is kept):
            # at p itself such elements are rare (none in the CPU probe), so `>` for `>=` would pass.
            pb = boundary_p(_PROBE_SEED, M, K, p, device)
            if hook is not None:
                bits = hook(_PROBE_SEED, M, K, pb, device)
                ref_bits = pack_mask(dropout_keep_mask(_PROBE_SEED, M, K, pb, device=device))
                res.mismatches[f"threshold p={pb:.6f}"] = int((bits.to(ref_bits.device) != ref_bits).sum().item())
            else:
                got = probe(p=pb)
                res.mismatches[f"threshold p={pb:.6f}"] = sum(got.values())
    except Exception as e:
        res.status, res.reason, res.context_lost = "error", _error_text(e), context_lost(e, device)
        return res
    bad = {k: v for k, v in res.mismatches.items() if v}
    if bad:
        res.status = "fail"
        res.reason = ", ".join(f"{k}: {v} of {M * K} mask bits differ" for k, v in bad.items())
    return res


def boundary_p(seed: int, M: int, K: int, p: float, device: torch.device | str = "cpu") -> float:
    """The p nearest to ``p`` whose 16-bit threshold equals one of the probe's draws (a draw > 0, so
    0 < result < 1): at that p the mask has elements with ``u == threshold``, which must be kept."""
    from .reference import dropout_draws, dropout_threshold

    u = dropout_draws(seed, M, K, device).flatten()
    u = u[u > 0]
    if u.numel() == 0:  # an empty probe: nothing to place
        return p
    return int(u[(u - dropout_threshold(p)).abs().argmin()]) / 65536.0


def probe_size(device_type: str) -> tuple[int, int]:
    """``(M, K)`` of the mask probe: K is not a multiple of 8 (a partial Philox group) and spans
    several column tiles; the interpreter gets a smaller one (it runs each program in Python)."""
    return (1000, 203) if device_type == "cuda" else (96, 52)


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal; otherwise one line per step.

    In line mode (not a terminal, or ``enabled=False``, which only drops the bar) a step's label is
    written and flushed when it starts and its status appended when it ends, so a run killed or
    crashed mid-step (a CUDA fault, a timeout) leaves a log naming the step it was in.
    """

    def __init__(self, total: int, stream=None, enabled: bool = True, width: int = 28) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self.t_step = time.perf_counter()
        self._open = False  # a line-mode label written, its status not yet

    def _bar(self, n: int | None = None) -> str:
        n = self.done if n is None else n
        if not self.enabled:
            return f"{n}/{self.total}"
        filled = int(self.width * n / self.total)
        pct = 100 * n // self.total
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {n}/{self.total} {pct:3d}%"

    def _redraw(self, label: str) -> None:
        line = f"{self._bar()} {time.perf_counter() - self.t0:5.0f}s  {label}"
        self.stream.write("\r" + line[:118].ljust(118))
        self.stream.flush()

    def start(self, label: str) -> None:
        self.t_step = time.perf_counter()
        if self.enabled and self.tty:
            self._redraw(label)
        else:
            self.stream.write(f"{self._bar(self.done + 1)} {label}: ")
            self.stream.flush()
            self._open = True

    def step(self, label: str, status: str) -> None:
        self.done += 1
        if self.enabled and self.tty:
            self._redraw(label)
            return
        if not self._open:
            self.stream.write(f"{self._bar()} {label}: ")
        self.stream.write(f"{status} ({time.perf_counter() - self.t_step:.1f}s)\n")
        self.stream.flush()
        self._open = False

    def close(self, note: str = "not finished") -> None:
        """End the display; a line-mode step still open (the sweep was stopped) gets ``note``."""
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 118 + "\r")
        elif self._open:
            self.stream.write(f"{note}\n")
            self._open = False
        self.stream.flush()


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"M,K,N,r"`` -> ``(M, K, N, r)``; raises argparse.ArgumentTypeError on bad input."""
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or vals[0] < 0 or min(vals[1:]) < 1:
        raise argparse.ArgumentTypeError(f"--shape wants M,K,N,r with M >= 0 and K, N, r >= 1; got {text!r}")
    return vals  # type: ignore[return-value]


def default_shapes(device_type: str, backend: str) -> list[tuple[int, int, int, int]]:
    """The shape sweep ``(M, K, N, r)``: odd sizes, every rank class, real model sizes on a GPU."""
    if device_type == "cuda":
        return [
            (1, 64, 64, 8),
            (67, 200, 136, 1),
            (300, 1000, 520, 16),
            (1024, 4096, 4096, 64),
            (2048, 4096, 14336, 16),
            (512, 14336, 4096, 256),
        ]
    if backend == "torch":
        return [(1, 16, 16, 1), (33, 72, 40, 8), (67, 300, 136, 16), (256, 512, 384, 64)]
    # The Triton interpreter runs every program in Python: keep it to a few tiles.
    return [(1, 16, 16, 1), (33, 72, 40, 8), (64, 96, 80, 16)]


def default_dtypes(device_type: str, backend: str) -> list[str]:
    """fp32/fp16/bf16/bf16+fp32a on a GPU; on CPU the reference in fp64/fp32 (the interpreter: as on GPU)."""
    if device_type == "cuda":
        return list(_GPU_DTYPES)
    if backend == "torch":
        return ["fp64", "fp32"]
    return list(_GPU_DTYPES)  # bf16 configurations are reported as skipped in the interpreter


def _versions() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    from .version import __version__

    info["lora_kernels"] = __version__
    info["cuda_extension"] = _extension_note()
    return info


def _extension_note() -> str:
    """What the cuda backend would load: pip hides setup.py's "built without the extension" warning,
    so this line is where a user sees that _C is missing or built for another torch."""
    from . import build_info
    from .cuda_ops import _ext

    if not _ext.prebuilt_available():
        return "not installed (a JIT build from the sources, if any: docs/BUILDING.md)"
    meta = build_info.load()
    if meta is None:
        return "installed, no build metadata"
    reason = build_info.mismatch_reason(meta)
    note = f"built for torch {meta['torch_version']}, sm {meta['cuda_archs']}"
    return f"{note}, REFUSED: {reason}" if reason else note


def _fmt_frac(results: list[CaseResult], keys: Sequence[str]) -> str:
    fracs = [r.checks[k].frac for r in results for k in keys if k in r.checks]
    return f"{max(fracs):.2f}" if fracs else "-"


def _fmt_rel(results: list[CaseResult], keys: Sequence[str]) -> str:
    rels = [r.checks[k].rel for r in results for k in keys if k in r.checks]
    return f"{max(rels):.1e}" if rels else "-"


def summary_table(results: list[CaseResult], masks: list[MaskResult]) -> str:
    """Markdown table: one row per (backend, dtype) with pass/fail counts and worst errors."""
    groups: dict[tuple[str, str], list[CaseResult]] = {}
    for r in results:
        groups.setdefault((r.case.backend, r.case.dtype), []).append(r)
    mgroups: dict[tuple[str, str], list[MaskResult]] = {}
    for m in masks:
        mgroups.setdefault((m.backend, m.dtype), []).append(m)
    head = (
        "| backend | dtype | cases | pass | fail | skip | worst rel err out | worst rel err grads "
        "| worst err/tol | mask bits |"
    )
    lines = [head, "|" + "---|" * 10]
    for key in sorted(set(groups) | set(mgroups), key=lambda k: (k[0], list(DTYPE_CONFIGS).index(k[1]))):
        rs = groups.get(key, [])
        ms = mgroups.get(key, [])
        n_pass = sum(r.status == "pass" for r in rs)
        n_fail = sum(r.status in ("fail", "error") for r in rs)
        n_skip = sum(r.status == "skip" for r in rs)
        if not ms:
            mask = "-"
        elif all(m.status == "skip" for m in ms):
            mask = "skip"
        elif all(m.status in ("pass", "skip") for m in ms):
            mask = "identical"
        elif all(m.status in ("pass", "skip") or m.reason.startswith(_NOT_RUN) for m in ms):
            mask = "not run"  # the sweep stopped before them: no evidence either way
        else:
            mask = "DIFFER"
        lines.append(
            f"| {key[0]} | {key[1]} | {len(rs)} | {n_pass} | {n_fail} | {n_skip} | {_fmt_rel(rs, ['out'])} "
            f"| {_fmt_rel(rs, GRAD_NAMES)} | {_fmt_frac(rs, ['out', *GRAD_NAMES])} | {mask} |"
        )
    return "\n".join(lines)


def _resolve_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if args.interpret:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _enable_interpreter() -> str | None:
    """Set TRITON_INTERPRET=1 before the Triton backend is imported (kernels are built at import)."""
    os.environ["TRITON_INTERPRET"] = "1"
    if "lora_kernels.triton_ops.lora_linear" in sys.modules:
        return (
            "the Triton backend was imported before --interpret took effect; its kernels may be compiled "
            "for a GPU: set TRITON_INTERPRET=1 in the environment instead"
        )
    return None


@contextlib.contextmanager
def _sigterm_raises_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises KeyboardInterrupt("SIGTERM"), so a sweep stopped by ``timeout`` or
    a job scheduler still reports what it did; the previous handler comes back afterwards."""

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        prev = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: only the main thread can handle signals
        yield
        return
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be reinstalled from here.
        signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def add_verify_args(ap: argparse.ArgumentParser) -> None:
    """The ``verify`` command-line options."""
    from .backends import BACKENDS

    ap.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="backend to check (repeatable; "
        "default: every backend, those that cannot run here are reported as skipped)",
    )
    ap.add_argument(
        "--dtype",
        action="append",
        choices=list(DTYPE_CONFIGS),
        help="dtype configuration (repeatable); 'bf16+fp32a' = bf16 base with float32 adapters (PEFT's default)",
    )
    ap.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        default=[],
        metavar="M,K,N,r",
        help="extra shape to check (repeatable), added to the default sweep",
    )
    ap.add_argument("--only-shapes", action="store_true", help="check only the --shape shapes")
    ap.add_argument(
        "--partial",
        action="store_true",
        help="with --only-shapes: run the partial-gradient cases and the (K, N)-stored weight case too (always "
        "run otherwise), at the second --shape (or the only one)",
    )
    ap.add_argument(
        "-p",
        "--dropout",
        action="append",
        type=float,
        metavar="P",
        help="dropout probability (repeatable; default 0 and 0.1)",
    )
    ap.add_argument(
        "--mask-mode",
        action="append",
        choices=("bitmask", "regenerate"),
        help="dropout mask mode for p > 0 (repeatable; default both)",
    )
    ap.add_argument("--seed", type=int, default=_SEED, help="dropout seed of every case")
    ap.add_argument("--device", help="device to run on (default: cuda if available, else cpu)")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="run the Triton kernels in the Triton CPU interpreter (sets TRITON_INTERPRET=1)",
    )
    ap.add_argument("--json", metavar="PATH", help="write every result as JSON to PATH")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_verify(args: argparse.Namespace, out=None, err=None) -> int:
    """Run the sweep described by ``args`` (see :func:`add_verify_args`); 0 iff nothing failed."""
    from .backends import BACKENDS

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if args.interpret:
        warning = _enable_interpreter()
        if warning:
            print(f"warning: {warning}", file=err)
    device = _resolve_device(args)
    names = list(dict.fromkeys(args.backend or BACKENDS))
    explicit = bool(args.backend)
    ps = list(dict.fromkeys(args.dropout if args.dropout is not None else [0.0, 0.1]))
    modes = list(dict.fromkeys(args.mask_mode or ["bitmask", "regenerate"]))
    for p in ps:
        if not 0.0 <= p < 1.0:
            print(f"error: dropout p must be in [0, 1), got {p}", file=err)
            return 2

    cases: list[Case] = []
    mask_jobs: list[tuple[str, str, float, str]] = []
    results: list[CaseResult] = []
    masks: list[MaskResult] = []
    for name in names:
        shapes = [] if args.only_shapes else default_shapes(device.type, name)
        shapes += [s for s in args.shape if s not in shapes]
        for dt in args.dtype or default_dtypes(device.type, name):
            # A backend that cannot run this device/dtype at all is reported once per group, not run.
            x_dt, a_dt = DTYPE_CONFIGS[dt]
            # (status, reason) of every case of the group when it cannot run: "skip" when the backend
            # says it cannot run here, "error" when its check itself crashes (a broken backend, say a
            # Triton API mismatch at import, must fail the sweep rather than stop it or be skipped).
            group: tuple[str, str] | None = None
            try:
                probe = torch.empty(1, 16, dtype=x_dt, device=device)
                a_probe = torch.empty(8, 16, dtype=a_dt, device=device)
                why = unavailable(name, probe, probe.expand(16, 16), a_probe)
                group = ("skip", why) if why is not None else None
            except Exception as e:
                group = ("error", f"the availability check raised {_error_text(e)}")
            mode_list = modes if name != "torch" else modes[:1]  # the reference has one mask path
            for shape in shapes:
                for p in ps:
                    for mode in mode_list if p > 0 else modes[:1]:
                        case = Case(name, dt, *shape, p=p, mask_mode=mode, seed=args.seed)
                        if group is None:
                            cases.append(case)
                        else:
                            results.append(CaseResult(case, *group))
            # The partial-gradient paths and a weight stored (K, N) (GPT-2's layers), once per group: the
            # second shape, the largest p.
            if shapes and (args.partial or not args.only_shapes):
                shape = shapes[min(1, len(shapes) - 1)]
                extra = [dict(train=t) for t in TRAIN_SETS if t != "all"] + [dict(weight_layout="kn")]
                for kw in extra:
                    case = Case(name, dt, *shape, p=max(ps), mask_mode=mode_list[0], seed=args.seed, **kw)
                    if group is None:
                        cases.append(case)
                    else:
                        results.append(CaseResult(case, *group))
            for p in (p for p in ps if p > 0):
                for mode in mode_list:
                    if group is None:
                        mask_jobs.append((name, dt, p, mode))
                    else:
                        masks.append(MaskResult(name, dt, mode, *probe_size(device.type), p, *group))

    info = _versions()
    # Before any kernel runs: after a CUDA fault even this query may fail.
    try:
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    except Exception as e:
        dev_name = f"unknown ({_error_text(e)})"

    progress = Progress(len(cases) + len(mask_jobs), stream=err, enabled=not args.no_progress)
    t0 = time.perf_counter()
    n_planned, n_planned_masks = len(results), len(masks)
    aborted: str | None = None  # why the sweep stopped early
    with _sigterm_raises_interrupt():
        try:
            for case in cases:
                progress.start(case.label)
                res = run_case(case, device)
                results.append(res)
                progress.step(case.label, res.status)
                if res.context_lost:
                    aborted = f"CUDA context lost ({res.reason.splitlines()[0]})"
                    break
            for name, dt, p, mode in mask_jobs if aborted is None else ():
                label = f"{name} {dt} mask probe p={p:g} {mode}"
                progress.start(label)
                m = run_mask_check(name, dt, device, p, mode)
                masks.append(m)
                progress.step(label, m.status)
                if m.context_lost:
                    aborted = f"CUDA context lost ({m.reason.splitlines()[0]})"
                    break
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through the handler above
            aborted = f"interrupted ({str(e) or 'SIGINT'})"
            progress.close("interrupted")
    progress.close()
    if aborted is not None:
        # Everything not finished is reported, as failed: a sweep that stopped early is no pass.
        for case in cases[len(results) - n_planned :]:
            results.append(CaseResult(case, "error", _NOT_RUN + aborted))
        for name, dt, p, mode in mask_jobs[len(masks) - n_planned_masks :]:
            masks.append(MaskResult(name, dt, mode, *probe_size(device.type), p, "error", _NOT_RUN + aborted))

    failed = [r for r in results if r.status in ("fail", "error")]
    mask_failed = [m for m in masks if m.status in ("fail", "error")]
    ran = {r.case.backend for r in results if r.status != "skip"}
    missing = [n for n in names if n not in ran] if explicit else []

    interp = "on" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "off"
    modes_note = ""
    if "triton" in names:
        try:
            from .triton_ops import lora_linear as _tri

            # LORA_KERNELS_FWD / _BWD=single route eligible Triton cases through the single-pass kernels.
            tuned = "off (fixed tiles)" if not _tri.AUTOTUNE else "on" if not _tri._interpret() else "off (interpreter)"
            modes_note = f", triton forward={_tri.FWD_MODE} backward={_tri.BWD_MODE} autotune={tuned}"
        except Exception:  # a note only: a broken Triton backend is reported by its cases
            pass
    print(
        f"lora_kernels verify: device={device} ({dev_name}), triton interpreter {interp}{modes_note}, "
        f"torch {info['torch']}, triton {info['triton']}, {time.perf_counter() - t0:.1f}s\n"
        f"lora_kernels._C: {info['cuda_extension']}",
        file=out,
    )
    print(summary_table(results, masks), file=out)
    print(
        "errors are relative to max|float64 reference|; err/tol > 1 fails (tolerances: "
        + ", ".join(f"{str(d).split('.')[-1]} {a:g}" for d, (a, _) in TOLERANCES.items())
        + ")",
        file=out,
    )
    skips: dict[tuple[str, str], str] = {}
    for r in results:
        if r.status == "skip":
            skips.setdefault((r.case.backend, r.reason), r.case.dtype)
    for (name, reason), _ in skips.items():
        dts = sorted({r.case.dtype for r in results if r.case.backend == name and r.reason == reason})
        hint = (
            " (use --interpret to run it in the Triton interpreter)"
            if (name == "triton" and device.type == "cpu" and not args.interpret and reason != _INTERPRETER_BF16)
            else ""
        )
        print(f"skipped {name} [{', '.join(dts)}]: {reason}{hint}", file=out)
    ran_failed = [r for r in failed if not r.reason.startswith(_NOT_RUN)]
    for r in ran_failed[:30]:
        print(f"FAILED {r.case.label}: {r.status}: {r.reason}", file=out)
    if len(ran_failed) > 30:
        print(f"... and {len(ran_failed) - 30} more failed cases (see --json)", file=out)
    for m in mask_failed:
        if not m.reason.startswith(_NOT_RUN):
            print(f"FAILED mask {m.backend} {m.dtype} p={m.p:g} {m.mask_mode}: {m.reason}", file=out)
    n_not_run = len(failed) - len(ran_failed)
    masks_not_run = sum(m.reason.startswith(_NOT_RUN) for m in mask_failed)
    if aborted is not None:
        print(
            f"ABORTED: {n_not_run} cases and {masks_not_run} mask checks not run (counted as failed): {aborted}",
            file=out,
        )
    for n in missing:
        print(f"FAILED backend {n} was requested but no case could run: see the skip reasons", file=out)
    ok = not failed and not mask_failed and not missing and aborted is None
    n_pass = sum(r.status == "pass" for r in results)
    print(
        f"{'PASS' if ok else 'FAIL'}: {n_pass} passed, {len(failed)} failed"
        + (f" ({n_not_run} not run)" if n_not_run else "")
        + f", {sum(r.status == 'skip' for r in results)} skipped cases; "
        f"mask checks: {sum(m.status == 'pass' for m in masks)} identical, {len(mask_failed) - masks_not_run} differ, "
        + (f"{masks_not_run} not run, " if masks_not_run else "")
        + f"{sum(m.status == 'skip' for m in masks)} skipped",
        file=out,
    )

    if args.json:
        doc = {
            "ok": ok,
            "aborted": aborted,
            "device": str(device),
            "device_name": dev_name,
            "interpret": interp == "on",
            "versions": info,
            "tolerances": {str(d).split(".")[-1]: list(t) for d, t in TOLERANCES.items()},
            "dtype_configs": {k: [str(a).split(".")[-1], str(b).split(".")[-1]] for k, (a, b) in DTYPE_CONFIGS.items()},
            "results": [r.to_dict() for r in results],
            "mask_checks": [m.to_dict() for m in masks],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}", file=out)
    if hasattr(out, "flush"):
        out.flush()  # a pipe is block-buffered: the report must not wait for a clean exit
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# demo


def _bench_shape(M: int, K: int, N: int, r: int, backends_: Sequence[str], out) -> None:
    """Timing rows of one shape: F.linear (frozen W) vs lora_linear per backend, bf16, s = 2, p ∈ {0, 0.1}."""
    from triton.testing import do_bench

    from .api import lora_linear

    inp = make_inputs(M, K, N, r, torch.bfloat16, torch.bfloat16, "cuda", gen_seed=1)
    x, w, dy = inp["x"], inp["weight"], inp["dy"]
    xg = x.clone().requires_grad_(True)
    A = inp["lora_A"].clone().requires_grad_(True)
    B = inp["lora_B"].clone().requires_grad_(True)
    t_lin = do_bench(lambda: F.linear(x, w))
    t_lin_fb = do_bench(lambda: F.linear(xg, w).backward(dy), grad_to_none=[xg])
    for p in (0.0, 0.1):
        for name in backends_:
            kw = dict(scaling=SCALING, dropout_p=p, seed=7, backend=name)
            t_f = do_bench(lambda kw=kw: lora_linear(x, w, A, B, **kw))
            t_fb = do_bench(lambda kw=kw: lora_linear(xg, w, A, B, **kw).backward(dy), grad_to_none=[xg, A, B])
            print(
                f"| {M} x {K} -> {N}, {r} | {p:g} | {name} | {t_lin:.3f} / {t_f:.3f} | {t_f / t_lin:.2f}x "
                f"| {t_lin_fb:.3f} / {t_fb:.3f} | {t_fb / t_lin_fb:.2f}x |",
                file=out,
            )


# Small shapes for the CPU demo (reference + Triton interpreter): about half a minute on 2 cores.
DEMO_SHAPES_CPU: list[tuple[int, int, int, int]] = [(33, 72, 40, 8), (64, 96, 80, 16)]


def run_demo(argv: Sequence[str] = (), out=None, err=None) -> int:
    """Quick numerics check of every backend, then (GPU only) a quick benchmark."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    ap = argparse.ArgumentParser(
        prog="lora-kernels demo",
        description="A quick verify of every backend (small shapes; on CPU the reference and the Triton "
        "interpreter), then on a GPU a do_bench timing of F.linear vs lora_linear, forward and forward+backward.",
    )
    ap.add_argument("--no-bench", action="store_true", help="skip the GPU benchmark")
    ap.add_argument("--no-progress", action="store_true")
    dargs = ap.parse_args(list(argv))
    gpu = torch.cuda.is_available()
    vap = argparse.ArgumentParser()
    add_verify_args(vap)
    if gpu:
        print("== numerics: every backend vs the float64 reference (GPU, quick sweep) ==", file=out)
        vargv = ["--only-shapes", "--shape", "67,200,136,16", "--shape", "1024,4096,4096,64"]
    else:
        print(
            "== numerics: reference and Triton interpreter vs float64 (no CUDA GPU, small shapes) ==",
            file=out,
        )
        vargv = ["--interpret", "--only-shapes"]
        vargv += [a for shape in DEMO_SHAPES_CPU for a in ("--shape", ",".join(map(str, shape)))]
    vargv += ["--no-progress"] if dargs.no_progress else []
    rc = run_verify(vap.parse_args(vargv), out=out, err=err)
    if not gpu:
        print(
            "\n== timing: skipped: no CUDA GPU on this machine. The Triton interpreter and CPU torch say "
            "nothing about kernel speed; run `make demo` on a GPU (or `python -m bench.lora_linear`). ==",
            file=out,
        )
        return rc
    if dargs.no_bench:
        return rc
    from .backends import available_backends

    avail = [n for n, why in available_backends(dtype=torch.bfloat16).items() if why is None and n != "torch"]
    if not avail:
        print("\n== timing: skipped: no kernel backend can run here (see the skip reasons above) ==", file=out)
        return rc
    print(f"\n== timing (triton.testing.do_bench, bf16, {torch.cuda.get_device_name()}) ==", file=out)
    print("| M x K -> N, r | p | backend | fwd ms (F.linear / lora) | ratio | fwd+bwd ms | ratio |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    for shape in [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16)]:
        _bench_shape(*shape, avail, out)
        torch.cuda.empty_cache()
    print("fwd+bwd: F.linear's backward is dX only (W frozen); lora_linear's is dX, dA, dB.", file=out)
    return rc
