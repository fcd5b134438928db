"""Compile the Triton kernels for a GPU that is not here: every launch compiles, none runs.

No GPU is needed. Two uses:

* checks on a CPU machine that each kernel variant compiles for Hopper and fits its shared memory
  (``tests/test_lora_linear.py``);
* warming Triton's on-disk cache before a GPU session (``scripts/prewarm_triton_cache.py``, run by
  ``make device-prebuild``): the GPU then loads the cubins instead of compiling them.

Inside :func:`compile_only`:

* Triton's active driver is a stand-in that reports ``GPUTarget("cuda", arch, 32)``, device 0 and
  stream 0, so ``JITFunction.run`` compiles for that GPU;
* the kernels of ``lora_linear.py`` and ``single_pass.py`` are wrapped: ``kernel[grid](...)`` compiles
  (``run(warmup=True)``) and reports to ``on_compile``; a compiled kernel whose shared memory exceeds
  ``max_shared`` raises ``OutOfResources`` as its load on that GPU would, so the launchers step down
  to the tiles the GPU would end up compiling; its host TMA descriptors are expanded as Triton's launcher
  would, each tensor map checked against the driver's requirements (:func:`encode_tiled`);
* the host-side choices are the GPU's: persistent grids of ``num_sms`` programs, the TMA paths on
  sm_90+ (``TMA_MODE`` "1": "auto" would ask the CUDA device), the Triton backend accepting CPU tensors;
* with ``autotune=True`` an eager launch compiles every config of its tuning table that survives the
  table's prune, with the arguments Triton's autotuner passes (``Config.all_kwargs``), as the first
  call of each tuning key does on the GPU; else the fixed tiles (``LORA_KERNELS_AUTOTUNE=0``).

The tensors are CPU tensors and the outputs stay uninitialised. Run it without TRITON_INTERPRET (the
kernels must be JITFunctions, not interpreted ones).

Why a cache written this way is hit on the GPU: Triton keys a compiled kernel on its source (with the
sources and global values it depends on), the specialization of its arguments (dtypes, 16-byte
alignment of pointers, integers divisible by 16 or equal to 1, descriptor block shapes), the
constexprs, the compile options, the target (arch, warp size), the Triton build (its sources and
libtriton) and the ptxas version (Triton's bundled one unless TRITON_PTXAS_PATH is set). Nothing of
this depends on the machine, provided the call sees the same shapes, strides and flags as the GPU run
and ``num_sms`` matches the GPU (a constexpr of the persistent kernels). One catch: Triton's cache
index files record absolute paths; ``scripts/gpu_check.sh`` re-points them when it unpacks a cache
elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime import _allocation
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources

from . import launch as _launch_mod
from . import lora_linear as _ll
from . import single_pass as _sp
from ._build_key import ptxas_version, triton_build_key

__all__ = [
    "Compiled", "Launch", "TensorMap", "compile_only", "encode_tiled", "record_launches", "triton_build_key",
    "ptxas_version", "H100_SMEM", "H100_SMS",
]  # fmt: skip

H100_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 / H200 (227 KiB)
H100_SMS = 132  # multiprocessors of an H100 SXM and an H200

_KERNELS = {
    _ll: (
        "_shrink_kernel", "_fwd_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel", "_bwd_dy1_kernel", "_bwd_dx_kernel",
        "_bwd_dx_tma_kernel",
    ),
    _sp: ("_fwd_single_pass_kernel", "_bwd_single_pass_kernel"),
}  # fmt: skip


@dataclass
class Compiled:
    """One compile: the kernel's name, the keyword arguments it was launched with (constexprs, warps,
    stages), Triton's ``CompiledKernel`` (``.metadata.shared``, ``.asm``, ``.hash``) and, per host descriptor
    among its arguments, the :class:`TensorMap` a launch would have the driver encode (checked)."""

    kernel: str
    kwargs: dict
    compiled: object
    tensor_maps: tuple = ()


class _Driver:
    """Triton's driver interface as far as ``JITFunction.run(warmup=True)`` uses it."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    @property
    def utils(self):
        """The driver utilities Triton's host-descriptor expansion calls: the tensor-map encoder (named
        ``fill_tma_descriptor`` in Triton 3.6, ``fill_tma_descriptor_tiled`` in 3.8), here a check of the
        CUDA driver's requirements (:func:`encode_tiled`)."""
        return _UTILS


class CompileOnly:
    """Stands in for a JITFunction: ``[grid](*args, **kw)`` compiles it and launches nothing. Equal to
    and hashed like the kernel it wraps, so tables keyed by the kernel (tuning configs, descriptor
    hooks) find it."""

    def __init__(self, fn, sink: Callable[[Compiled], None], max_shared: int) -> None:
        self.fn, self.arg_names, self.sink, self.max_shared = fn, fn.arg_names, sink, max_shared
        self.__name__ = fn.__name__

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: object) -> bool:
        return other is self.fn or other is self

    def compile(self, *args, **kwargs):
        compiled = self.fn.run(*args, grid=None, warmup=True, **kwargs)
        # The host descriptors as the GPU's launch would expand them, the tensor maps checked (encode_tiled).
        expand = _descriptor_expansion(compiled)
        bound = tuple(args[i] if i < len(args) else kwargs.get(p.name, p.default) for i, p in enumerate(self.fn.params))
        maps = expand(bound) if expand is not None else ()
        self.sink(Compiled(self.fn.__name__, dict(kwargs), compiled, maps))
        return compiled

    def run(self, *args, grid=None, warmup=False, **kwargs):
        """What Triton's Autotuner calls: compiles, as a launch through ``[grid]`` does."""
        compiled = self.compile(*args, **kwargs)
        shared = compiled.metadata.shared
        if shared > self.max_shared:  # what loading it on that GPU would raise
            raise OutOfResources(shared, self.max_shared, "shared memory")
        return compiled

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.run(*args, **kwargs)

        return launch


class _TuneAll:
    """Stands in for ``triton.autotune(...)(kernel)``: compiles each config of the kernel's tuning table
    that its prune keeps, with the arguments Triton's autotuner passes (``Autotuner._bench``: the
    launch's constexprs plus ``Config.all_kwargs()``, after the config's pre-hook), then raises
    ``OutOfResources`` if none fits (``_launch`` then takes the fixed tiles, as on the GPU)."""

    def __init__(self, kernel: CompileOnly) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **meta):
            nargs = dict(zip(self.kernel.arg_names, args, strict=False))
            fits = False
            for config in _ll._prune(_ll._tuning_configs(self.kernel), nargs, **meta):
                current = dict(meta, **config.all_kwargs())
                if config.pre_hook:
                    config.pre_hook({**nargs, **current})
                fits |= self.kernel.compile(*args, **current).metadata.shared <= self.kernel.max_shared
            if not fits:
                raise OutOfResources(0, self.kernel.max_shared, "shared memory")

        return run


@dataclass
class Launch:
    """One launch that reached the driver's launcher: the compiled kernel's name and hash, the grid, and
    every parameter's value in signature order (what the launcher receives); ``tensor_maps``, per host
    descriptor among them, the :class:`TensorMap` Triton's launcher would have the driver encode; the
    ``stream`` and packed ``metadata`` it was given, and whether it was given launch hooks to call (``hooked``:
    Triton's runner passes its hook chains, :func:`.launch.run_compiled` None while they are empty)."""

    name: str
    hash: str
    grid: tuple
    args: tuple
    tensor_maps: tuple = ()
    stream: int = 0
    metadata: tuple = ()
    hooked: bool = False


class TensorMap(NamedTuple):
    """The arguments Triton's host-descriptor expansion passes to the driver's tensor-map encoder
    (``cuTensorMapEncodeTiled``), in its order: shapes and strides outer dimension first, strides in elements."""

    address: int
    swizzle: int
    elem_size: int
    elem_type: int
    block: tuple
    shape: tuple
    strides: tuple
    padding: int


# CU_TENSOR_MAP_SWIZZLE_* -> the span in bytes the box's inner dimension must fit (None: no swizzle)
_SWIZZLE_SPAN = {0: None, 1: 32, 2: 64, 3: 128, 4: 128, 5: 128, 6: 128}
_ACCEPTED: set = set()  # parameters checked already, the address by its alignment (the check is a function of them)
_MAPS = threading.local()  # .maps: the tensor maps of the launch being expanded on this thread


def encode_tiled(address, swizzle, elem_size, elem_type, block, shape, strides, padding) -> TensorMap:
    """Stands in for the driver's ``cuTensorMapEncodeTiled`` behind Triton's ``fill_tma_descriptor``: raises
    where the CUDA driver documents that it refuses the parameters (cuda.h of CUDA 13.0: a 16-byte aligned
    address; rank 1 to 5; every dimension in 1..2^32; the outer strides a multiple of 16 bytes below 2^40; box
    dimensions in 1..256, the inner one a multiple of 16 bytes and within the swizzle's span), which on a GPU
    is a launch error; else returns the parameters. Triton passes the block as the kernel's metadata has it (a
    descriptor's tile may be loaded as several boxes) and unit inner strides (it asserts that before)."""
    m = TensorMap(address, swizzle, elem_size, elem_type, tuple(block), tuple(shape), tuple(strides), padding)
    key = (address % 16, *m[1:])
    if key not in _ACCEPTED:  # (host-time rows run this per launch: the verdict is kept, as cheap as the C call)
        _check_tensor_map(m)
        _ACCEPTED.add(key)
    sink = getattr(_MAPS, "maps", None)
    if sink is not None:
        sink.append(m)
    return m


def _check_tensor_map(m: TensorMap) -> None:
    address, swizzle, elem_size, _, block, shape, strides, padding = m
    rank = len(block)
    why = []
    if not 1 <= rank <= 5 or len(shape) != rank or len(strides) != rank:
        why.append(f"rank {rank} with {len(shape)} dimensions and {len(strides)} strides")
    if address % 16:
        why.append(f"the address {address:#x} is not 16-byte aligned")
    why += [f"dimension {i} is {d} (1..2^32)" for i, d in enumerate(shape) if not 0 < d <= 2**32]
    for i, st in enumerate(strides[:-1]):
        if (st * elem_size) % 16 or not 0 <= st * elem_size < 2**40:
            why.append(f"stride {i} is {st * elem_size} bytes (a multiple of 16 below 2^40)")
    why += [f"box dimension {i} is {b} (1..256)" for i, b in enumerate(block) if not 0 < b <= 256]
    inner = block[-1] * elem_size if block else 0
    if inner % 16:
        why.append(f"the box's inner dimension is {inner} bytes (a multiple of 16)")
    if swizzle not in _SWIZZLE_SPAN:
        why.append(f"swizzle mode {swizzle}")
    elif _SWIZZLE_SPAN[swizzle] is not None and inner > _SWIZZLE_SPAN[swizzle]:
        why.append(f"the box's inner dimension is {inner} bytes, over the swizzle's {_SWIZZLE_SPAN[swizzle]}")
    if padding not in (0, 1):
        why.append(f"padding {padding}")
    if why:
        raise RuntimeError(
            "Failed to create tensor map descriptor (record_launches' check of cuTensorMapEncodeTiled's "
            f"requirements): {'; '.join(why)} (block {list(block)}, shape {list(shape)}, strides {list(strides)}, "
            f"element size {elem_size}, swizzle {swizzle})"
        )


class _Utils:
    fill_tma_descriptor = fill_tma_descriptor_tiled = staticmethod(encode_tiled)


_UTILS = _Utils()


def _descriptor_expansion(compiled: CompiledKernel) -> Callable[[tuple], tuple] | None:
    """Triton's own expansion of a launch's host descriptors (``wrap_handle_tensordesc``, what its
    ``CudaLauncher`` runs between the runner and the C launcher: per descriptor the driver's tensor map, its
    shape and strides), calling the encoder of the active driver (:func:`encode_tiled` here). Returns a function
    of the kernel's arguments that gives the tensor maps, or None where the kernel takes no host descriptor or
    this Triton's launcher is not one of the two layouts known (3.6: base arguments then the kernel's, 3.8: base
    arguments then a tuple of the kernel's)."""
    signature = dict(compiled.src.signature)
    if not any(isinstance(t, str) and t.startswith("tensordesc") for t in signature.values()):
        return None
    try:
        from triton.backends.nvidia import driver as nv
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return None
    expand = nv.wrap_handle_tensordesc(_discard, signature, getattr(compiled.metadata, "tensordesc_meta", None))
    base = getattr(nv, "_BASE_ARGS_FORMAT_LEN", None)
    pad = (None,) * (base if base is not None else 1)

    def tensor_maps(args: tuple) -> tuple:
        _MAPS.maps = maps = []
        try:
            if base is not None:  # Triton 3.6: the launcher's base arguments, then the kernel's
                expand(*pad, *args)
            else:  # Triton 3.8: the base arguments, then a tuple of the kernel's
                expand(*pad, args)
        finally:
            _MAPS.maps = None
        return tuple(maps)

    return tensor_maps


def _discard(*args) -> None:
    """The C launcher's place behind Triton's descriptor expansion (launching is the recorder's business)."""


def _raise_error(err, *args, **kwargs):
    raise err


@contextlib.contextmanager
def _host_choices(arch: int, num_sms: int, autotune: bool) -> Iterator[Callable[[object, str, object], None]]:
    """The GPU's host-side choices on CPU tensors (see the module docstring), and a stand-in driver."""
    saved: list[tuple[object, str, object]] = []

    def patch(module, name: str, value) -> None:
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    previous = driver._active  # None until something asked for the driver: leave it that way after
    driver.set_active(_Driver(arch))
    try:
        for module in (_ll, _sp):
            patch(module, "_grid_sms", lambda x: num_sms)
        patch(_ll, "_planning_sms", lambda x: num_sms)
        patch(_ll, "TMA_MODE", "1" if arch >= 90 else "0")
        patch(_ll, "AUTOTUNE", autotune)
        # CPU tensors stand in for the GPU's: only the dtype and rank limits apply.
        patch(_ll, "unavailable_reason", lambda x, weight, lora_A: _ll._support_reason(x, lora_A))
        yield patch
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
        driver._active = previous  # (not reset_active(): without a GPU there is no driver to reset to)


@contextlib.contextmanager
def record_launches(
    on_launch: Callable[[Launch], None],
    *,
    arch: int = 90,
    num_sms: int = H100_SMS,
    max_shared: int = H100_SMEM,
) -> Iterator[None]:
    """Within the block, the Triton backend's eager calls run their whole host path as on a GPU, on CPU
    tensors: the kernels stay Triton's JITFunctions, so each launch binds, looks up or compiles for
    ``sm_<arch>`` (``JITFunction.run``), or takes :mod:`.launch`'s cache, and ends at the compiled kernel's
    launcher, which here reports a :class:`Launch` to ``on_launch`` instead of calling the driver. A kernel
    whose shared memory exceeds ``max_shared`` raises ``OutOfResources`` there, as its load would. Before it
    reports, the launcher does what Triton's does in Python: a kernel that needs a global scratch allocation
    raises while no allocator is set (and allocates its size per launch on the CPU), and the host descriptors
    go through Triton's own expansion with the driver's tensor-map encoder replaced by :func:`encode_tiled` (a
    descriptor the driver would refuse raises; the launch reports its tensor maps). Fixed tiles (no
    autotuning: there is nothing to time). What it leaves out of a GPU call: the launcher's C code (argument
    conversion but for each tensor's ``data_ptr()`` call, the driver's check of each address, ``cuLaunchKernel``), the
    driver's encoding of each tensor map and the CUDA caching allocator.

    On exit the compiled kernels it touched lose their stand-in launchers and the launch cache is cleared,
    so nothing recorded here can reach a real launch later in the process."""
    if _ll._interpret():
        raise RuntimeError("record_launches needs the compiler: unset TRITON_INTERPRET before importing lora_kernels")
    touched: list[CompiledKernel] = []
    original = CompiledKernel._init_handles

    def init_handles(self) -> None:
        if self.module is not None:
            return
        touched.append(self)
        if self.metadata.shared > max_shared:
            err = OutOfResources(self.metadata.shared, max_shared, "shared memory")
            self._run = functools.partial(_raise_error, err)
            raise err
        name, digest = self.name, self.hash
        expand = _descriptor_expansion(self)
        pointers = [i for i, t in enumerate(dict(self.src.signature).values()) if isinstance(t, str) and t[:1] == "*"]
        scratch = getattr(self.metadata, "global_scratch_size", 0)

        def launcher(g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
            if scratch:
                if _ll._no_allocator_set(_allocation):  # (what Triton's launcher raises on a GPU)
                    raise RuntimeError(f"{name} requires a runtime memory allocation, but no allocator was set")
                # Its size per program, allocated per launch (the allocator set allocates on the GPU: a CPU
                # allocation of the same size stands in, for the host time).
                torch.empty(g0 * g1 * g2 * scratch, dtype=torch.int8)
            # The host descriptors as Triton's launcher expands them, the tensor maps checked (encode_tiled).
            maps = expand(args) if expand is not None else ()
            # The C launcher asks each pointer argument that is not an int (taken as is) or None for its address;
            # on a GPU the driver then checks that address (cuPointerGetAttribute), which this leaves out.
            for i in pointers:
                a = args[i]
                if a is not None and not isinstance(a, int):
                    a.data_ptr()
            # The C launcher then calls each hook it is given with the launch metadata, around the launch.
            if enter is not None:
                enter(launch_metadata)
            hooked = enter is not None or exit_ is not None
            on_launch(Launch(name, digest, (g0, g1, g2), args, maps, stream, packed_metadata, hooked))
            if exit_ is not None:
                exit_(launch_metadata)

        self.module, self.function, self._run = "recorded", 0, launcher

    CompiledKernel._init_handles = init_handles
    _launch_mod.clear()
    try:
        with _host_choices(arch, num_sms, autotune=False):
            yield
    finally:
        CompiledKernel._init_handles = original
        for compiled in touched:
            compiled.module = compiled.function = compiled._run = None
        _launch_mod.clear()


@contextlib.contextmanager
def compile_only(
    on_compile: Callable[[Compiled], None],
    *,
    arch: int = 90,
    num_sms: int = H100_SMS,
    max_shared: int = H100_SMEM,
    autotune: bool = False,
) -> Iterator[None]:
    """Within the block, the Triton backend's launches compile for ``sm_<arch>`` and report each
    compiled kernel to ``on_compile`` instead of running (see the module docstring)."""
    if _ll._interpret():
        raise RuntimeError("compile_only needs the compiler: unset TRITON_INTERPRET before importing lora_kernels")
    with _host_choices(arch, num_sms, autotune) as patch:
        for module, names in _KERNELS.items():
            for name in names:
                patch(module, name, CompileOnly(getattr(module, name), on_compile, max_shared))
        patch(_ll, "_autotuner", _TuneAll)
        yield
