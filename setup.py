"""Build lora_kernels: the pure-Python package, plus the CUDA extension ``lora_kernels._C`` when a
CUDA toolkit and a CUDA build of torch are present (otherwise a warning, not a failure).

    pip install --no-build-isolation .              # with lora_kernels._C, against the installed torch
    pip install -e . --no-build-isolation           # editable, likewise
    pip install .                                   # isolated: no torch in the build env, so no _C

Environment variables (flash-attention style):
    LORA_KERNELS_CUDA_ARCHS       SM versions, default "80;90" (90 -> sm_90a; PTX for the newest);
                                  the only arch setting (TORCH_CUDA_ARCH_LIST is not read)
    LORA_KERNELS_SKIP_CUDA_BUILD  =1: install without the extension
    LORA_KERNELS_FORCE_BUILD      =1: not building the extension is an error, not a warning
    LORA_KERNELS_LOCAL_VERSION    local version tag, e.g. "cu130torch2.14" (scripts/build_wheels.sh)
    MAX_JOBS, NVCC_THREADS        parallel compile jobs (ninja) and nvcc --threads per job
See docs/BUILDING.md.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
# Without the extension: any torch with torch.library.triton_op (2.6). With it, see _extension_kwargs.
BASE_REQUIRES = ["torch>=2.6", "numpy"]


def _load_build_helper():
    # By path: importing the lora_kernels package here would need its dependencies.
    spec = importlib.util.spec_from_file_location("_lk_build", ROOT / "lora_kernels" / "cuda_ops" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


class _LocalVersionDistribution(Distribution):
    """Appends LORA_KERNELS_LOCAL_VERSION (e.g. "cu130torch2.14") to the version.

    pyproject.toml reads the version from lora_kernels/version.py (tool.setuptools.dynamic), which
    overrides a ``version=`` passed to setup(); so the tag is added after the config is parsed.
    """

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        local = os.environ.get("LORA_KERNELS_LOCAL_VERSION", "").strip()
        if local:
            if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", local):
                sys.exit(f"LORA_KERNELS_LOCAL_VERSION={local!r} is not a valid local version label")
            self.metadata.version = f"{self.metadata.version.split('+')[0]}+{local}"


class _BuildPy(build_py):
    """The wheel's Python files are the source tree's, nothing left from an earlier build.

    ``build/lib.*`` is reused between builds (pip wheel builds in the tree): a module deleted from
    the sources, or the ``_build_info.py``/``_C`` of an earlier CUDA build in a pure build, would
    otherwise be packed. The tree's own ``_build_info.py`` (written by an editable build) is never
    packed: a CUDA build writes the one that belongs to its binary into build_lib after this.
    """

    def run(self):
        stale = Path(self.build_lib) / "lora_kernels"
        if stale.is_dir():
            shutil.rmtree(stale)
        super().run()

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("lora_kernels", "_build_info")]


def _skip(reason: str) -> dict:
    if _flag("LORA_KERNELS_FORCE_BUILD"):
        sys.exit(f"lora_kernels: LORA_KERNELS_FORCE_BUILD=1 but the CUDA extension cannot be built: {reason}")
    warnings.warn(
        f"lora_kernels: building WITHOUT the CUDA extension: {reason}. backend='triton' and 'torch' are "
        "unaffected; backend='cuda' JIT-builds it at first use only from a source tree (an editable "
        "install), else it is unavailable with this reason. See docs/BUILDING.md.",
        stacklevel=1,
    )
    return {}


def _extension_kwargs() -> dict:
    if _flag("LORA_KERNELS_SKIP_CUDA_BUILD"):
        if _flag("LORA_KERNELS_FORCE_BUILD"):
            sys.exit(
                "lora_kernels: LORA_KERNELS_SKIP_CUDA_BUILD=1 and LORA_KERNELS_FORCE_BUILD=1 contradict each other"
            )
        print("lora_kernels: LORA_KERNELS_SKIP_CUDA_BUILD=1: pure-Python install")
        return {}
    build = _load_build_helper()
    try:  # a value the user set that does not parse is an error, never a quiet pure-Python build
        archs = build.parse_archs()
    except ValueError as e:
        sys.exit(f"lora_kernels: {e}")
    cuda_home = build.find_cuda_home()
    if cuda_home is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
    except ImportError:
        return _skip(
            "torch is not importable in the build environment (an isolated build: use "
            "pip install --no-build-isolation to build against the installed torch)"
        )
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    nvcc = build.nvcc_version(cuda_home)
    if nvcc is None:
        return _skip(f"{cuda_home}/bin/nvcc does not run")
    if nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        return _skip(
            f"nvcc {nvcc} ({cuda_home}) and torch's CUDA {torch.version.cuda} differ in major version "
            "(point CUDA_HOME at a matching toolkit)"
        )
    try:
        includes = build.include_dirs(cuda_home)
    except RuntimeError as e:
        return _skip(str(e))
    # torch checks TORCH_CUDA_ARCH_LIST even though our -gencode flags take precedence; without a
    # GPU it would otherwise warn and guess.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.torch_arch_list(archs))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    print(f"lora_kernels: building lora_kernels._C for sm_{', sm_'.join(archs)} with CUDA_HOME={cuda_home}")
    ext = CUDAExtension(
        name="lora_kernels._C",
        sources=[os.path.relpath(s, ROOT) for s in build.sources()],
        include_dirs=includes,
        extra_compile_args=build.compile_flags(archs),
    )

    class BuildExtWithInfo(BuildExtension):
        """Also writes lora_kernels/_build_info.py, checked when _C is imported (build_info.py)."""

        def finalize_options(self):
            super().finalize_options()
            # A fixed object directory instead of pip's per-build temp dir: the editable install
            # and a later wheel build (scripts/build_wheels.sh) share ninja's objects, so the
            # wheel after `make setup` only relinks instead of recompiling CUTLASS for minutes.
            tag = (
                f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}"
                f"-cu{torch.version.cuda}-sm{'_'.join(archs)}"
            )
            self.build_temp = str(ROOT / "build" / f"temp-{tag}")

        def run(self):
            super().run()
            info = build.build_info(archs, cuda_home)
            # Next to the binary: in the tree for in-place and editable builds (setuptools' editable
            # mode copies _C into the tree), in build_lib for a wheel, which must leave the tree's
            # file alone (it describes the tree's own _C, perhaps for another torch).
            in_tree = self.inplace or getattr(self, "editable_mode", False)
            targets = set()
            if in_tree:
                targets.add(ROOT / "lora_kernels" / "_build_info.py")
            if not self.inplace:
                targets.add(Path(self.build_lib) / "lora_kernels" / "_build_info.py")
            for path in targets:
                path.parent.mkdir(parents=True, exist_ok=True)
                build.write_build_info(path, info)

    # The binary runs only with the torch release series it was compiled against (build_info.py
    # checks major.minor at run time): pin it, or pip would pair the wheel with any newer torch.
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtWithInfo.with_options(use_ninja=True)},
        "install_requires": [f"torch=={major}.{minor}.*", "numpy"],
    }


kwargs = {"install_requires": BASE_REQUIRES, **_extension_kwargs()}
kwargs["cmdclass"] = {"build_py": _BuildPy, **kwargs.get("cmdclass", {})}
setup(distclass=_LocalVersionDistribution, **kwargs)
