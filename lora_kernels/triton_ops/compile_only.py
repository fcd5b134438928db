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
  to the tiles the GPU would end up compiling;
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources

from . import launch as _launch_mod
from . import lora_linear as _ll
from . import single_pass as _sp
from ._build_key import ptxas_version, triton_build_key

__all__ = [
    "Compiled", "Launch", "compile_only", "record_launches", "triton_build_key", "ptxas_version", "H100_SMEM",
    "H100_SMS",
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
    stages) and Triton's ``CompiledKernel`` (``.metadata.shared``, ``.asm``, ``.hash``)."""

    kernel: str
    kwargs: dict
    compiled: object


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
        self.sink(Compiled(self.fn.__name__, dict(kwargs), compiled))
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
    every parameter's value in signature order (what the launcher receives)."""

    name: str
    hash: str
    grid: tuple
    args: tuple


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
    whose shared memory exceeds ``max_shared`` raises ``OutOfResources`` there, as its load would. Fixed
    tiles (no autotuning: there is nothing to time). What it leaves out of a GPU call: the launcher's own C
    code (argument conversion, ``cuLaunchKernel``) and the CUDA caching allocator.

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

        def launcher(g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
            on_launch(Launch(name, digest, (g0, g1, g2), args))

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
