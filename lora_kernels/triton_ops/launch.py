"""Eager launches of already-compiled Triton kernels without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **kw)`` binds every argument, builds Triton's cache key (a ``str`` of the compile
options among it) and looks the compiled kernel up, on every call: 20–30 µs a launch on a 2-core CPU,
4–5 launches per training step of one layer (bench/NOTES.md, session 38). :func:`launch` does that once
per *specialization* and then calls the compiled kernel directly, as ``JITFunction.run`` itself does
after its lookup (``CompiledKernel[grid](*all_params)``: ``launch_metadata``, then ``run``), and while no launch
hook is set goes one step further, to the compiled kernel's launcher itself (:func:`run_compiled`).

Why a hit launches the kernel Triton would have launched. Triton picks a compiled kernel by (a) the
specialization of each non-constexpr argument, which it computes with ``native_specialize_impl`` (the
dtype and 16-byte alignment of a tensor; the type of an integer, whether it equals 1 and whether 16
divides it; a descriptor's dtype and block shape; the type of a float), (b) the constexprs and compile
options (``num_warps``, ``num_stages``, ...), (c) the device, the knobs ``run`` folds into the options (debug,
instrumentation; 3.9: fpsan's casts) and a stage-inspection hook's pipeline. The key here holds (a) as each
argument's value where the value determines it (integers Triton specialises on, floats, bools, constexprs), else
as that same function computes it with the parameter's own flags, plus the arguments' types; every keyword
argument of the call (b; Triton's own key holds constexprs by value too, so a constexpr True and 1 are one key to
both); the values of (c), none of it while an inspection hook is set (:func:`_run_knobs`). Equal keys give equal
Triton keys (tests/test_fast_launch.py checks the keys against ``native_specialize_impl``). A key is stored only after
Triton itself launched it, so a hit never compiles, never loads a module and never meets a kernel that ran
out of resources. The cache holds compiled kernels and plain values, never a tensor. Two checks of
``JITFunction.run`` a hit does not repeat: its pre-run hooks (none is ever registered on these kernels) and its
refusal to launch after a global the kernel reads was rebound (``_RED_BLOCK``, ``_DX_WHOLE_TILE``,
``_UNALIGNED_BITS``: constants nothing rebinds; rebinding one needs :func:`clear` too).

Off with ``LORA_KERNELS_FAST_LAUNCH=0`` (every launch through ``JITFunction.run``), and for anything that
is not a plain ``JITFunction`` (the interpreter's kernels, ``wrap_triton``, the compile-only stand-ins):
those take ``kernel[grid]`` as before.

The second half of the module, launch plans, goes one step further for the eager forward and backward: per input
layout, each launch's compiled kernel and grid as the launchers chose them, replayed after a short check
(``LORA_KERNELS_LAUNCH_PLANS=0`` turns them off; off with the cache too). Its last part, call plans, replays a
whole eager forward or backward from a recipe recorded with its launch plan: the allocations and the launches,
without the launchers' Python (``LORA_KERNELS_CALL_PLANS=0`` turns them off; off with launch plans too).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import os
import sys
import threading
import types

import torch
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:  # Triton 3.4+ (torch 2.8+); before it, no launch cache (below) and no knobs to read
    from triton import knobs
except ImportError:  # pragma: no cover - Triton 3.2/3.3
    knobs = None

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host descriptors
    TensorDescriptor = None

try:  # Triton 3.5+: the launch hooks are chains, called (empty) on every launch unless passed as None
    from triton.knobs import HookChain
except ImportError:  # pragma: no cover - older Triton: hooks are None or a function
    HookChain = None

try:  # Triton 3.4+: the C function both Triton 3.6 and 3.8 bind arguments with
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - older Triton: no fast path
    native_specialize_impl = None

__all__ = [
    "FAST_LAUNCH", "PLANS", "CALLS", "DIRECT_RUN", "launch", "run_compiled", "direct_stream", "descriptor", "planned",
    "plan_slot", "replay", "record", "planned_launch", "note_empty", "note_kept", "note_view", "on_tensor_device",
    "watch", "WatchedModule", "POINTER_INTS", "clear", "stats",
]  # fmt: skip

FAST_LAUNCH = (
    os.environ.get("LORA_KERNELS_FAST_LAUNCH", "1") != "0" and native_specialize_impl is not None and knobs is not None
)
# Launch a compiled kernel through its launcher directly, without ``CompiledKernel.__getitem__``'s runner, while no
# launch hook is set (:func:`run_compiled`); off with the cache.
DIRECT_RUN = True

# Per kernel (kept on the JITFunction: hashing one runs Python under a lock), (device, run knobs,
# keyword items, argument keys) -> (compiled, tail): ``tail`` the values of the parameters after the positional
# ones (keywords, then defaults).
_CACHES: list[dict] = []  # every kernel's cache, for clear() and the bound
_CACHE_MAX = 4096  # distinct specializations kept in all; past it the caches start over (a miss each, once)
_LOCK = threading.Lock()
_STATS = {"hits": 0, "misses": 0, "plan_hits": 0, "call_hits": 0}


def stats() -> dict:
    """Launches that found their compiled kernel here (``hits``), that went through Triton (``misses``) and that a
    launch plan replayed (``plan_hits``, below: a call plan's launches among them); the eager calls a call plan
    replayed whole (``call_hits``); the cache's ``entries``, the ``plans`` and the ``calls`` (call plans) kept."""
    calls = sum(1 for c in _CALLS.values() if c.launches is not None)
    return dict(_STATS, entries=sum(map(len, _CACHES)), plans=len(_PLANS), calls=calls)


def clear() -> None:
    with _LOCK:
        for cache in _CACHES:
            cache.clear()
        _PLANS.clear()
        _CALLS.clear()
        _STATS.update(hits=0, misses=0, plan_hits=0, call_hits=0)


def _cache_of(kernel: JITFunction) -> dict:
    cache = kernel.__dict__.get("_lk_launch_cache")
    if cache is None:
        with _LOCK:
            cache = kernel.__dict__.setdefault("_lk_launch_cache", {})
            if not any(c is cache for c in _CACHES):
                _CACHES.append(cache)
    return cache


def _param_flags(kernel: JITFunction) -> tuple:
    """Per parameter: None for a constexpr (its value is its key), else ``native_specialize_impl``'s flags
    (is_const, specialize the value, specialize the alignment), as Triton's binder passes them."""
    flags = kernel.__dict__.get("_lk_param_flags")
    if flags is None:
        flags = kernel._lk_param_flags = tuple(
            None if p.is_constexpr else (p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
            for p in kernel.params
        )
    return flags


_BY_VALUE = frozenset({int, float, bool})


def _getter(positions: list[int]):
    """The arguments at ``positions`` (C's ``itemgetter``; a tuple for fewer than two)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda a, i=tuple(positions): tuple(a[j] for j in i)


def _layout(kernel: JITFunction, types: tuple) -> tuple:
    """For arguments of these types: a getter of the positions keyed by value, and the positions keyed by
    ``native_specialize_impl`` with their parameter's flags. (Which positions are which depends only on the
    types and the kernel's parameters, so it is worked out once per pair; the types are part of the key.)"""
    layouts = kernel.__dict__.get("_lk_layouts")
    if layouts is None:
        layouts = kernel.__dict__.setdefault("_lk_layouts", {})
    layout = layouts.get(types)
    if layout is None:
        flags = _param_flags(kernel)
        by_value, by_spec = [], []
        for i, (t, f) in enumerate(zip(types, flags, strict=False)):
            # Constexprs, and integers, floats and bools, except the integers Triton does not specialise on.
            if f is None or (t in _BY_VALUE and (f[1] or t is not int)):
                by_value.append(i)
            else:
                by_spec.append((i, *f))
        layout = layouts[types] = (_getter(by_value), tuple(by_spec))
    return layout


def _specs(backend, kernel: JITFunction, args: tuple) -> tuple:
    """The positional arguments' key: finer than or equal to the specialization Triton's binder computes
    from them, and cheap. Constexprs, integers, floats and bools are keyed by their value (which determines
    their specialization; the cache is bounded for values that vary, such as M), except the integers
    Triton does not specialise on (the seed: a new value each step); those and everything else (tensors,
    descriptors) by ``native_specialize_impl`` itself, with the parameter's flags. The types too: 1 == 1.0
    == True as keys, while Triton specialises them as constexpr 1, fp32 and u1."""
    types = tuple(map(type, args))
    get, by_spec = _layout(kernel, types)
    spec = native_specialize_impl
    return types, get(args), tuple([spec(backend, args[i], c, s, a) for i, c, s, a in by_spec])


def _tail(kernel: JITFunction, n_args: int, kw: dict) -> tuple:
    """The values of the parameters after the ``n_args`` positional ones, in signature order: from ``kw``,
    else the default (what Triton's binder fills in; the other keywords are compile options)."""
    return tuple(kw[p.name] if p.name in kw else p.default for p in kernel.params[n_args:])


def _quiet(hook) -> bool:
    """Whether a launch hook would do nothing: None, or an empty chain."""
    return hook is None or (type(hook) is HookChain and not hook.calls)


def direct_stream() -> int | None:
    """The current device's current stream where :func:`run_compiled` may call launchers directly (no launch hook
    set, ``DIRECT_RUN`` on), else None."""
    rt = knobs.runtime if knobs is not None else None
    if DIRECT_RUN and rt is not None and _quiet(rt.launch_enter_hook) and _quiet(rt.launch_exit_hook):
        active = driver.active
        return active.get_current_stream(active.get_current_device())
    return None


def run_compiled(compiled, grid: tuple, args, tail: tuple, stream: int | None) -> None:
    """``compiled[grid](*args, *tail)`` (grid: three dimensions); ``stream``: :func:`direct_stream`'s, taken in this
    call or earlier in the same call of ours on the same device.

    Triton's runner builds the hooks' launch metadata (a ``LazyDict``) on every launch and its launcher then calls
    both hook chains, empty unless a profiler added to them (Triton 3.5+: a chain is never None, so the runner's
    ``is None`` test never skips the metadata). While both chains are empty this calls the launcher itself with
    None for the metadata and both hooks, what the runner passes where hooks are None: the same launch on the
    same stream, the same scratch allocations (the launcher's own), without the runner's Python."""
    if stream is None:
        compiled[grid](*args, *tail)
    else:
        run = compiled.run  # (loads the module first where it is not: ``function`` is set after)
        run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
            *tail)  # fmt: skip


# The knobs ``JITFunction.run`` folds into each launch's compile options, those this Triton has: debug (3.4+), the
# instrumentation mode (3.6+), fpsan's homomorphic casts (3.9+). The stage-inspection hook: 3.6+ (run keys on it: 3.8+).
_KNOB_NAMES = tuple(
    f"{group}.{name}"
    for group, name in (
        ("runtime", "debug"),
        ("compilation", "instrumentation_mode"),
        ("compilation", "fpsan_homomorphic_casts"),
    )
    if knobs is not None and hasattr(getattr(knobs, group), name)
)
if len(_KNOB_NAMES) > 1:
    _knob_values = operator.attrgetter(*_KNOB_NAMES)  # (a tuple of the values)
else:  # (one name: attrgetter would return the bare value)
    _knob_values = (lambda k, get=operator.attrgetter(*_KNOB_NAMES): (get(k),)) if _KNOB_NAMES else (lambda k: ())
_STAGES_HOOK = knobs is not None and hasattr(knobs.runtime, "add_stages_inspection_hook")


def _run_knobs() -> tuple | None:
    """The values of the knobs ``JITFunction.run`` folds into each launch's compile options (``_KNOB_NAMES``), read
    as it reads them. Part of the cache's and the plans' keys, so a knob changed between two launches misses here
    as it does in Triton's key (tests/test_fast_launch.py checks the names against ``JITFunction.run``'s source).
    None while Triton's stage-inspection hook is set: it adds a pipeline of its choosing to Triton's key on every
    launch, so those launches take ``kernel[grid]`` and no plan."""
    if _STAGES_HOOK and knobs.runtime.add_stages_inspection_hook is not None:
        return None
    return _knob_values(knobs)


def launch(kernel, grid: tuple, args: tuple, kw: dict):
    """``kernel[grid](*args, **kw)``, through the cache above where it can be; returns the compiled kernel.
    grid: the launch grid as a tuple (not a callable); kw: constexprs and compile options."""
    if not FAST_LAUNCH or type(kernel) is not JITFunction:
        return kernel[grid](*args, **kw)
    run_knobs = _run_knobs()
    if run_knobs is None:
        return kernel[grid](*args, **kw)
    device = driver.active.get_current_device()
    cache = _cache_of(kernel)
    try:
        backend = kernel.device_caches[device][3]  # the binder's backend (created on first use, as run does)
        key = (device, run_knobs, tuple(kw.items()), _specs(backend, kernel, args))
        hit = cache.get(key)
    except (TypeError, IndexError, AttributeError):  # an unhashable value, or another Triton's layout
        return kernel[grid](*args, **kw)
    if hit is not None:
        _STATS["hits"] += 1
        compiled, tail = hit
        n = len(grid)  # (the compiled kernel's runner indexes three dimensions: JITFunction.run pads them)
        run_compiled(compiled, grid if n == 3 else (grid[0], grid[1] if n > 1 else 1, 1), args, tail, direct_stream())
        return compiled
    _STATS["misses"] += 1
    compiled = kernel[grid](*args, **kw)
    if compiled is None:  # (Triton returns None only where it did not launch: nothing to keep)
        return None
    entry = (compiled, _tail(kernel, len(args), kw))
    with _LOCK:
        if sum(map(len, _CACHES)) >= _CACHE_MAX:
            for c in _CACHES:
                c.clear()
        cache[key] = entry
    return compiled


def _descriptor_defaults() -> dict | None:
    """The values of ``TensorDescriptor``'s fields beyond (base, shape, strides, block_shape) as ``from_tensor``
    fills them (their defaults: Triton 3.6 has ``padding``, 3.8 also ``round_f32_to_tf32``); None where the class
    is not such a dataclass or a further field has no default."""
    if TensorDescriptor is None or not dataclasses.is_dataclass(TensorDescriptor):
        return None
    names = [f.name for f in dataclasses.fields(TensorDescriptor)]
    if names[:4] != ["base", "shape", "strides", "block_shape"]:
        return None
    rest = {}
    for f in dataclasses.fields(TensorDescriptor)[4:]:
        if f.default is dataclasses.MISSING:
            return None
        rest[f.name] = f.default
    return rest


_DESC_REST = _descriptor_defaults()


def descriptor(t: torch.Tensor, block_shape: list[int]):
    """``TensorDescriptor.from_tensor(t, block_shape)`` without ``__post_init__``'s checks, which cost 1.0 of the
    call's 1.6 µs (bench/NOTES.md, session 40). For eager launchers only, on a tensor ``_tma_ok`` accepted (2-D,
    unit column stride, 16-byte aligned base and rows) and tiles from their configs (powers of two, as Triton
    compiles): the checks could not fail. A tensor with an empty dimension still goes through ``from_tensor`` (its
    assertion), and everything does where the launch cache is off or the class's layout is not the one known."""
    if _DESC_REST is None or not FAST_LAUNCH or 0 in t.shape:
        return TensorDescriptor.from_tensor(t, block_shape)
    d = object.__new__(TensorDescriptor)
    d.__dict__ = {"base": t, "shape": t.shape, "strides": t.stride(), "block_shape": block_shape, **_DESC_REST}
    return d


# ----------------------------------------------------------------------------------------------
# Launch plans: one eager call's launches, per input layout
# ----------------------------------------------------------------------------------------------
# A launch through the cache above still costs its caller's decisions (autotuned or fixed tiles, the pre-hooks that
# point TMA descriptors at the tiles, the grid) and the key: 10–18 µs a launch on a 2-core CPU (bench/NOTES.md,
# session 39). Within :func:`planned`, the i-th launch a caller makes (``_launch`` in lora_linear.py) is recorded
# once: the compiled kernel, grid, constexpr tail and each TMA descriptor's block shape as launched. Later calls with
# an equal plan key replay it after a short check, calling the compiled kernel directly.
#
# Why a replay launches what the caller would. The plan key holds every tensor the caller receives by dtype, shape,
# strides and 16-byte alignment (Triton specialises a tensor on its dtype and alignment; the launches' tensors are
# those, views of them, or fresh allocations, which torch aligns), and the caller's other arguments by value, except
# the ones listed as varying (the seed, a new value each step). Each site then checks that its launch is the one
# recorded: the same kernel, whether it is autotuned (and by which tuner), the same constexprs and fixed tiles as the
# caller passed them, the same type at every argument position, and the same value at every non-tensor position
# except the varying ones, whose Triton type (int32) it checks instead. What the caller decides from those (the
# config the autotuner chose, the grid, the descriptors' tiles) is then what it decided when recording. A site that
# does not match launches as before and is recorded again. Only launches that went through :func:`launch`'s fast
# path to a compiled kernel are recorded (not the autotuner's tuning calls, nor the fixed tiles an untuned key
# falls back to during a CUDA-graph capture), so a plan never freezes a choice the caller would revise.

PLANS = os.environ.get("LORA_KERNELS_LAUNCH_PLANS", "1") != "0"
CALLS = os.environ.get("LORA_KERNELS_CALL_PLANS", "1") != "0"  # call plans (the end of this module)
VARYING = frozenset({"seed_lo", "seed_hi"})  # parameters whose value changes from call to call under one plan
_PLANS: dict = {}  # plan key -> list of sites (None where nothing is recorded)
_PLAN_MAX = 1024  # plans kept; past it they start over
_LOCAL = threading.local()


def plan_key(tag: object, args: tuple, varying: int) -> tuple | None:
    """A caller's plan key: ``tag``, then per argument, for a tensor its device, dtype, shape, strides and 16-byte
    alignment, for the ``varying`` position its type only, else its type and value; and :func:`_run_knobs`, as in the
    cache's key. None where a tensor has no data pointer (a subclass, a fake tensor) or a stage-inspection hook is
    set: no plan then."""
    run_knobs = _run_knobs()
    if run_knobs is None:
        return None
    key = [tag, run_knobs]
    try:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                key.append((a.device, a.dtype, a.shape, a.stride(), a.data_ptr() & 15))
            elif i == varying:
                key.append(type(a))
            else:  # (the type too: 2 == 2.0 == True as keys, which a launch takes as three types)
                key.append(type(a))
                key.append(a)
        key = tuple(key)
        hash(key)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return key


def planned(key: tuple | None, fn, *args, varying: int | None = None, derive=None, **kwargs):
    """``fn(*args, **kwargs)`` with the plan of ``key`` active on this thread (none when key is None, plans are
    off, or the launch cache is). With ``derive`` (``args[varying]`` -> the values of the VARYING parameters the
    call's launches take, by name), the call is also kept as a call plan and replayed whole from it (below)."""
    if key is None or not (PLANS and FAST_LAUNCH):
        return fn(*args, **kwargs)
    rec, outer_rec = None, getattr(_LOCAL, "rec", None)
    if outer_rec is not None:  # (its recorder would not see this call's launches: no launcher nests calls today)
        outer_rec.fail = "a planned call inside it"
    elif derive is not None and CALLS:
        call = _CALLS.get(key)
        if call is not None and call.current():
            if call.launches is not None:
                return _run_call(args[0], call, args)
        else:
            rec = _Recorder(fn, args, derive(args[varying]))
    plan = _PLANS.get(key)
    if plan is None:
        with _LOCK:
            if len(_PLANS) >= _PLAN_MAX:
                _PLANS.clear()
            plan = _PLANS.setdefault(key, [])
    outer = getattr(_LOCAL, "cursor", None)
    cursor = _LOCAL.cursor = [plan, 0, rec]
    if rec is not None:
        _recording(rec, 1)
    try:
        out = fn(*args, **kwargs)
    finally:
        _LOCAL.cursor = outer
        if rec is not None:
            _recording(None, -1)
    if rec is not None:
        call = rec.finish(out, cursor[1], varying, derive)
        if call is not None:
            with _LOCK:
                if len(_CALLS) >= _PLAN_MAX:
                    _CALLS.clear()
                _CALLS[key] = call
    return out


class _Site:
    """One recorded launch: what identifies it (kernel, tuner, meta, fixed, argument types, non-tensor values) and
    what replays it (compiled kernel, padded grid, tail of parameters, the descriptors' block shapes)."""

    __slots__ = ("kernel", "tuner", "meta", "fixed", "types", "get", "values", "varying", "descs", "compiled", "grid",
                 "tail")  # fmt: skip

    def matches(self, kernel, tuner, meta: dict, fixed: dict, args: tuple) -> bool:
        if self.kernel is not kernel or self.tuner is not tuner or self.meta != meta or self.fixed != fixed:
            return False
        if tuple(map(type, args)) != self.types or self.get(args) != self.values:
            return False
        for i in self.varying:  # int32, as when recorded (Triton types an int by its range)
            if not -0x80000000 <= args[i] <= 0x7FFFFFFF:
                return False
        return True


def plan_slot() -> list | None:
    """The active plan and this launch's index in it, ``[plan, i, recorder]`` (advancing the cursor; the call plan
    being recorded, or None), or None."""
    cursor = getattr(_LOCAL, "cursor", None)
    if cursor is None:
        return None
    i = cursor[1]
    cursor[1] = i + 1
    return [cursor[0], i, cursor[2]]


def replay(slot: list | None, kernel, tuner, meta: dict, fixed: dict, args: tuple) -> bool:
    """Launch the site recorded at ``slot`` if it matches this launch; False (nothing launched) otherwise."""
    if slot is None:
        return False
    plan, i, rec = slot
    site = plan[i] if i < len(plan) else None
    if site is None or not site.matches(kernel, tuner, meta, fixed, args):
        return False
    for j, block in site.descs:
        args[j].block_shape = list(block)
    _STATS["plan_hits"] += 1
    run_compiled(site.compiled, site.grid, args, site.tail, direct_stream())
    if rec is not None:
        rec.launched(site, args)
    return True


def record(slot: list | None, kernel, tuner, meta: dict, fixed: dict, args: tuple, compiled, grid: tuple,
           kw: dict) -> None:  # fmt: skip
    """Keep at ``slot`` the launch just made through :func:`launch` (``compiled``, its ``grid`` and keywords)."""
    if slot is None or compiled is None or type(kernel) is not JITFunction or not FAST_LAUNCH:
        return
    site = _Site()
    site.kernel, site.tuner, site.meta, site.fixed = kernel, tuner, dict(meta), dict(fixed)
    site.types = tuple(map(type, args))
    names = kernel.arg_names
    scalars, varying, descs = [], [], []
    for j, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            continue
        if type(a) is TensorDescriptor:
            descs.append((j, tuple(a.block_shape)))
        elif names[j] in VARYING and type(a) is int and -0x80000000 <= a <= 0x7FFFFFFF:
            varying.append(j)
        else:
            scalars.append(j)
    site.get = _getter(scalars)
    site.values, site.varying, site.descs = site.get(args), tuple(varying), tuple(descs)
    n = len(grid)
    site.compiled, site.grid = compiled, grid if n == 3 else (grid[0], grid[1] if n > 1 else 1, 1)
    site.tail = _tail(kernel, len(args), kw)
    plan, i, rec = slot
    with _LOCK:
        if i >= len(plan):
            plan.extend([None] * (i + 1 - len(plan)))
        plan[i] = site
    if rec is not None:
        rec.launched(site, args)


_NO_TILES: dict = {}  # the ``fixed`` of a launch whose tiles are all in its keywords


def planned_launch(kernel, grid: tuple, args: tuple, kw: dict) -> None:
    """:func:`launch` as one site of the active plan: replayed where the site recorded for it matches (the same
    kernel, keywords, argument types and non-tensor values), else launched and recorded. For launchers that pick
    their tiles themselves (no autotuner): the single-pass kernels. grid: a tuple; kw: constexprs, tiles and
    compile options."""
    slot = plan_slot()
    if slot is not None and replay(slot, kernel, None, kw, _NO_TILES, args):
        return
    compiled = launch(kernel, grid, args, kw)
    record(slot, kernel, None, kw, _NO_TILES, args, compiled, grid, kw)


def on_tensor_device(fn):
    """Run ``fn(t, ...)`` with ``t``'s GPU current. Triton launches on the current CUDA device (and its
    stream), so a model spread over GPUs (HF ``device_map="auto"``, pipeline stages) that calls a layer
    on cuda:1 while cuda:0 is current would otherwise launch on the wrong GPU. (The CUDA backend takes a
    CUDAGuard in C++.)"""

    @functools.wraps(fn)
    def on_device(t: torch.Tensor, *args, **kwargs):
        index = t.get_device()  # (-1 off the GPU; one call, where ``t.device`` builds a device object each time)
        if index >= 0 and t.is_cuda and index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return on_device


# ----------------------------------------------------------------------------------------------
# Call plans: one eager call, replayed whole
# ----------------------------------------------------------------------------------------------
# With its launch plan replaying, an eager forward or backward still runs its launcher's Python: the tile, split and
# TMA decisions, the argument tuples, each site's check (about half of a step's profiled host time on a 2-core CPU,
# bench/NOTES.md, session 41). A call plan is a recipe recorded with the call's launch plan: its allocations (shape,
# device, dtype), the kept stand-ins and views of inputs it passes, each launch as its recorded site's compiled
# kernel, grid and tail with the arguments as a template (constants; the positions of the call's tensors, of the
# host descriptors built on them with their block shapes, of the VARYING values derived from the call's varying
# argument), and which of those tensors the call returns. A later call with an equal plan key runs the recipe.
#
# Why that launches what the launchers would. The plan key fixes the tensors' metadata and every other argument but
# the varying one (the seed), whose launch values are checked against ``derive`` when recording. What else the
# launchers read is module state: switches (``BWD_SPLIT_M``, ``TMA_FLATTEN``, ...), functions tests swap in, the
# autotuner factory. A recipe keeps a snapshot of the globals of the caller's module and of every launched kernel's
# module (the tuple of their values: 1.7 µs to compare for the launchers' module) and is used only while they are the
# same objects; a rebinding anywhere records again. The launchers' modules are watched (``WatchedModule``): once their
# globals were found the same, the recipe compares their generation (one integer) until an attribute is set on them.
# A recipe is kept only where the whole call was seen: every launch went through a launch plan's site (replayed, or
# launched through the cache and recorded: not a tuning call, not a capture's fallback tiles), every tensor a launch
# takes or the call returns is an input, an allocation through the launchers' ``_empty``, a kept stand-in or a view
# noted with how it was made (``note_*``), and no tensor of the call was written by a torch op in place (their
# version counters). Anything else (a ``torch.zeros`` counter, a copy of a
# strided bias, a sum by torch) marks the layout as not replayable whole, under that snapshot: its launches still
# replay from the launch plan. Off with ``LORA_KERNELS_CALL_PLANS=0``, and with launch plans.

_CALLS: dict = {}  # plan key -> _Call
# A recipe's direct launches (no launch hook) pass its tensors' addresses as ints: Triton's launcher takes an int as
# the device pointer as it is, where for a tensor it calls ``data_ptr()`` and has the driver check the address
# (``cuPointerGetAttribute``), for every pointer of every launch (27–33 a two-launch step). A recipe's tensors are on
# the device its plan key names (inputs) or that it allocates them on, where Triton checked them when it was recorded;
# one ``data_ptr()`` per tensor of the call, not per launch it is passed to. Off: ``LORA_KERNELS_POINTER_INTS=0``.
POINTER_INTS = os.environ.get("LORA_KERNELS_POINTER_INTS", "1") != "0"
_pointer = torch.Tensor.data_ptr  # (tests wrap it to see which tensor each address stands for)
RECORDING = 0  # threads recording a call plan now (the allocators' ``note_*`` calls are skipped while none is)
_KIND_EMPTY, _KIND_KEPT, _KIND_VIEW = 0, 1, 2


def _recording(rec, step: int) -> None:
    global RECORDING
    with _LOCK:
        RECORDING += step
    _LOCAL.rec = rec


class WatchedModule(types.ModuleType):
    """A module whose attribute rebinding (``module.X = v``, ``setattr``, ``monkeypatch``, ``del module.X``) moves
    its generation on. A recipe that found a watched module's globals the same objects as when it was recorded keeps
    the generation it found them under, and while that is still the generation it is current without comparing them
    again: one integer where a comparison of the launchers' module's globals costs 1.7 µs per call on a 2-core CPU. A
    write into the module's ``__dict__`` itself is not seen (a ``global`` statement in the module, ``vars(module)[k] =
    v``): the launchers' modules have none (tests/test_fast_launch.py checks), and their switches are set as
    attributes."""

    def __setattr__(self, name: str, value) -> None:
        _GENERATION[self] = next(_GENERATIONS)  # (before and after: a check between the two sees neither generation)
        super().__setattr__(name, value)
        _GENERATION[self] = next(_GENERATIONS)

    def __delattr__(self, name: str) -> None:
        _GENERATION[self] = next(_GENERATIONS)
        super().__delattr__(name)
        _GENERATION[self] = next(_GENERATIONS)


_GENERATION: dict = {}  # watched module -> its generation (unique across modules and bumps: never seen twice)
_GENERATIONS = itertools.count(1)  # (``next`` is atomic under the GIL)


def watch(name: str) -> None:
    """Watch the module ``name``; called at the end of its own code (a reload, which runs that code again without
    ``__setattr__``, starts a new generation there too)."""
    module = sys.modules[name]
    module.__class__ = WatchedModule
    _GENERATION[module] = next(_GENERATIONS)


def _generations(names) -> tuple | None:
    """(name, module, generation) per module, or None where one of them is not watched."""
    gens = []
    for name in names:
        module = sys.modules[name]
        g = _GENERATION.get(module) if type(module) is WatchedModule else None
        if g is None:
            return None
        gens.append((name, module, g))
    return tuple(gens)


def _snapshot(modules) -> tuple:
    return tuple((m, tuple(sys.modules[m].__dict__.values())) for m in sorted(modules))


def note_empty(t: torch.Tensor) -> None:
    """``t`` is a fresh ``torch.empty`` of its shape, device and dtype (the launchers' ``_empty``)."""
    rec = getattr(_LOCAL, "rec", None)
    if rec is not None:
        if t.dim() == 0:  # (the recipe passes the sizes unpacked, which a 0-d shape has none of)
            rec.fail = "a 0-d allocation"
        rec.made(t, (_KIND_EMPTY, tuple(t.shape), t.device, t.dtype))


def note_kept(t: torch.Tensor) -> None:
    """``t`` is kept across calls (a zero-element stand-in): the recipe passes the same tensor."""
    rec = getattr(_LOCAL, "rec", None)
    if rec is not None:
        rec.made(t, (_KIND_KEPT, t))


def note_view(t: torch.Tensor, base: torch.Tensor, how) -> None:
    """``t`` is ``how(base)``, a view (``torch.Tensor.t`` for ``weight.T``)."""
    rec = getattr(_LOCAL, "rec", None)
    if rec is not None:
        i = rec.source(base)
        if i is None:
            rec.fail = "a view of a tensor of unknown origin"
        else:
            rec.made(t, (_KIND_VIEW, i, how))


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place torch op on it); -1 for an inference tensor, which has none."""
    return -1 if t.is_inference() else t._version


class _Call:
    """A recorded call: the globals snapshot it holds under, and (None where the layout cannot be replayed whole)
    the recipe."""

    __slots__ = ("snapshot", "gens", "extras", "launches", "pointers", "returns", "varying", "derive", "why")

    def current(self) -> bool:
        gens = self.gens
        if gens is not None:  # (watched modules: not rebound since their globals were last found the same)
            for name, module, g in gens:
                if _GENERATION.get(module) != g or sys.modules.get(name) is not module:
                    break
            else:
                return True
        try:
            now = _generations(m for m, _ in self.snapshot)  # (read before the comparison: see WatchedModule)
            same = all(tuple(sys.modules[m].__dict__.values()) == values for m, values in self.snapshot)
        except Exception:  # (a rebound global whose ``==`` raises: not the same object, so not current)
            return False
        if same:
            self.gens = now
        return same


class _Recorder:
    """What one recording call made and launched, by index among the call's values (its arguments first)."""

    def __init__(self, fn, args: tuple, derived: dict):
        self.modules = {fn.__module__}
        self.start = _snapshot(self.modules)
        self.derived = derived
        self.values = list(args)
        self.index = {id(a): i for i, a in reversed(list(enumerate(args))) if isinstance(a, torch.Tensor)}
        self.versions = [(a, _version(a)) for a in args if isinstance(a, torch.Tensor)]
        self.extras: list = []
        self.launches: list = []
        self.fail: str | None = None
        if len(self.index) < sum(isinstance(a, torch.Tensor) for a in args):
            # One tensor at two positions: a recipe would pass the first position's tensor for both in every call,
            # also where they are two tensors (the plan key cannot tell).
            self.fail = "one tensor passed at two positions"

    def made(self, t: torch.Tensor, op: tuple) -> None:
        self.index[id(t)] = len(self.values)
        self.values.append(t)
        self.versions.append((t, _version(t)))
        self.extras.append(op)

    def source(self, t: torch.Tensor) -> int | None:
        i = self.index.get(id(t))
        return i if i is not None and self.values[i] is t else None

    def launched(self, site: _Site, args: tuple) -> None:
        if self.fail is not None:
            return
        names = site.kernel.arg_names
        template, fills, descs, seeds = list(args), [], [], []
        for j, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                i = self.source(a)
                if i is None:
                    self.fail = f"{site.kernel.__name__}'s {names[j]}: a tensor not allocated through _empty"
                    return
                fills.append((j, i))
            elif TensorDescriptor is not None and type(a) is TensorDescriptor:
                i = self.source(a.base)
                if i is None or list(a.shape) != list(a.base.shape) or list(a.strides) != list(a.base.stride()):
                    self.fail = f"{site.kernel.__name__}'s {names[j]}: a descriptor of another tensor"
                    return
                descs.append((j, i, tuple(a.block_shape)))
            elif names[j] in VARYING:
                v = self.derived.get(names[j])
                if j not in site.varying or type(v) is not int or v != a:
                    self.fail = f"{site.kernel.__name__}'s {names[j]}: not derived from the varying argument"
                    return
                seeds.append((j, names[j]))
            else:
                continue
            template[j] = None
        self.launches.append((site.compiled, site.grid, site.tail, tuple(template), tuple(fills), tuple(descs),
                              tuple(seeds)))  # fmt: skip
        module = getattr(getattr(site.kernel, "fn", None), "__module__", None)
        if module is not None:
            self.modules.add(module)

    def finish(self, out, slots: int, varying: int, derive) -> _Call | None:
        """The call plan, a marker that this layout cannot be replayed whole, or None (record again next call:
        a launch went around the launch plan, or module state changed during the call)."""
        if self.fail is None and len(self.launches) != slots:
            return None  # (a tuning call, a capture's fixed tiles: the next call may go through sites only)
        returns = []
        if self.fail is None:
            if any(_version(t) != v for t, v in self.versions):
                self.fail = "a tensor of the call written in place by a torch op"
            elif type(out) is not tuple:
                self.fail = "the call does not return a tuple"
            else:
                for o in out:
                    i = self.source(o) if isinstance(o, torch.Tensor) else None
                    if i is None:
                        self.fail = "it returns what it did not allocate through _empty"
                        break
                    returns.append(i)
        snapshot = _snapshot(self.modules)
        try:
            if any(dict(snapshot)[m] != values for m, values in self.start):
                return None
        except Exception:  # (a global rebound during the call to one whose ``==`` raises)
            return None
        call = _Call()
        call.snapshot, call.why, call.varying, call.derive = snapshot, self.fail, varying, derive
        call.gens = None  # (the first check compares the globals, then keeps their generations)
        call.extras = call.launches = call.pointers = call.returns = None
        if self.fail is None:
            call.extras, call.launches, call.returns = tuple(self.extras), tuple(self.launches), tuple(returns)
            call.pointers = tuple(sorted({i for launch in self.launches for _, i in launch[4]}))  # (the fills' values)
        return call


@on_tensor_device
def _run_call(t: torch.Tensor, call: _Call, args: tuple) -> tuple:
    """Run a recipe: its allocations, then its launches; ``t`` is ``args[0]`` (whose GPU is made current)."""
    vals = list(args)
    add = vals.append
    for op in call.extras:
        kind = op[0]
        if kind == _KIND_EMPTY:
            add(torch.empty(*op[1], device=op[2], dtype=op[3]))  # (sizes unpacked: as ``_empty`` calls it)
        elif kind == _KIND_KEPT:
            add(op[1])
        else:
            add(op[2](vals[op[1]]))
    derived = call.derive(args[call.varying])
    # (one device and stream for the whole call; none to ask for without launches: a backward with only the weight's
    # gradient, which a CPU under TRITON_INTERPRET records too, and whose Triton has no active driver to ask)
    stream = direct_stream() if call.launches else None
    passed = vals
    if stream is not None and POINTER_INTS:  # (see POINTER_INTS; through Triton's runner, hooks see the tensors)
        passed = vals.copy()
        pointer = _pointer
        for i in call.pointers:
            passed[i] = pointer(vals[i])
    for compiled, grid, tail, template, fills, descs, seeds in call.launches:
        a = list(template)
        for j, i in fills:
            a[j] = passed[i]
        for j, i, block in descs:
            a[j] = descriptor(vals[i], list(block))
        for j, name in seeds:
            a[j] = derived[name]
        run_compiled(compiled, grid, a, tail, stream)
    _STATS["plan_hits"] += len(call.launches)
    _STATS["call_hits"] += 1
    return tuple([vals[i] for i in call.returns])
