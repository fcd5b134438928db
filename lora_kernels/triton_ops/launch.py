"""Eager launches of already-compiled Triton kernels without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **kw)`` binds every argument, builds Triton's cache key (a ``str`` of the compile
options among it) and looks the compiled kernel up, on every call: 20–30 µs a launch on a 2-core CPU,
4–5 launches per training step of one layer (bench/NOTES.md, session 38). :func:`launch` does that once
per *specialization* and then calls the compiled kernel directly, as ``JITFunction.run`` itself does
after its lookup (``CompiledKernel[grid](*all_params)``: ``launch_metadata``, then ``run``).

Why a hit launches the kernel Triton would have launched. Triton picks a compiled kernel by (a) the
specialization of each non-constexpr argument, which it computes with ``native_specialize_impl`` (the
dtype and 16-byte alignment of a tensor; the type of an integer, whether it equals 1 and whether 16
divides it; a descriptor's dtype and block shape; the type of a float), (b) the constexprs and compile
options (``num_warps``, ``num_stages``, ...), (c) the device and the debug and instrumentation knobs. The
key here holds (a) as each argument's value where the value determines it (integers Triton specialises on,
floats, bools, constexprs), else as that same function computes it with the parameter's own flags, plus the
arguments' types; every keyword argument of the call (b; Triton's own key holds constexprs by value too, so a
constexpr True and 1 are one key to both); the values of (c). Equal keys give equal Triton keys
(tests/test_fast_launch.py checks the keys against ``native_specialize_impl``). A key is stored only after
Triton itself launched it, so a hit never compiles, never loads a module and never meets a kernel that ran
out of resources. The cache holds compiled kernels and plain values, never a tensor.

Off with ``LORA_KERNELS_FAST_LAUNCH=0`` (every launch through ``JITFunction.run``), and for anything that
is not a plain ``JITFunction`` (the interpreter's kernels, ``wrap_triton``, the compile-only stand-ins):
those take ``kernel[grid]`` as before.
"""

from __future__ import annotations

import operator
import os
import threading

from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:  # Triton 3.4+: the C function both Triton 3.6 and 3.8 bind arguments with
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - older Triton: no fast path
    native_specialize_impl = None

__all__ = ["FAST_LAUNCH", "launch", "clear", "stats"]

FAST_LAUNCH = os.environ.get("LORA_KERNELS_FAST_LAUNCH", "1") != "0" and native_specialize_impl is not None

# Per kernel (kept on the JITFunction: hashing one runs Python under a lock), (device, debug, instrumentation,
# keyword items, argument keys) -> (compiled, tail): ``tail`` the values of the parameters after the positional
# ones (keywords, then defaults).
_CACHES: list[dict] = []  # every kernel's cache, for clear() and the bound
_CACHE_MAX = 4096  # distinct specializations kept in all; past it the caches start over (a miss each, once)
_LOCK = threading.Lock()
_STATS = {"hits": 0, "misses": 0}


def stats() -> dict:
    """Launches that found their compiled kernel here (``hits``) and that went through Triton (``misses``)."""
    return dict(_STATS, entries=sum(map(len, _CACHES)))


def clear() -> None:
    with _LOCK:
        for cache in _CACHES:
            cache.clear()
        _STATS.update(hits=0, misses=0)


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
        get = operator.itemgetter(*by_value) if len(by_value) > 1 else (lambda a, i=by_value: tuple(a[j] for j in i))
        layout = layouts[types] = (get, tuple(by_spec))
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


def launch(kernel, grid: tuple, args: tuple, kw: dict):
    """``kernel[grid](*args, **kw)``, through the cache above where it can be; returns the compiled kernel.
    grid: the launch grid as a tuple (not a callable); kw: constexprs and compile options."""
    if not FAST_LAUNCH or type(kernel) is not JITFunction:
        return kernel[grid](*args, **kw)
    device = driver.active.get_current_device()
    cache = _cache_of(kernel)
    try:
        backend = kernel.device_caches[device][3]  # the binder's backend (created on first use, as run does)
        key = (
            device, knobs.runtime.debug, knobs.compilation.instrumentation_mode, tuple(kw.items()),
            _specs(backend, kernel, args),
        )  # fmt: skip
        hit = cache.get(key)
    except (TypeError, IndexError, AttributeError):  # an unhashable value, or another Triton's layout
        return kernel[grid](*args, **kw)
    if hit is not None:
        _STATS["hits"] += 1
        compiled, tail = hit
        n = len(grid)  # (the compiled kernel's runner indexes three dimensions: JITFunction.run pads them)
        compiled[grid if n == 3 else (grid[0], grid[1] if n > 1 else 1, 1)](*args, *tail)
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
