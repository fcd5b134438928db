"""Build configuration of the CUDA extension ``lora_kernels._C``, shared by setup.py and the JIT build.

Standard library only at import time: setup.py loads this file by path, before the package (and
possibly before torch) can be imported. Nothing here compiles; it computes paths and flags.

Environment variables:
    LORA_KERNELS_CUDA_ARCHS: ";"-separated SM versions to compile for, default "80;90". "90"
        is built as ``sm_90a`` (wgmma and TMA need the arch-specific target); PTX of the newest
        arch is embedded for forward compatibility.
    NVCC_THREADS: ``nvcc --threads`` per compile job (default 2).
    CUDA_HOME / CUDA_PATH: the CUDA toolkit (else found from ``nvcc`` on PATH).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source tree (repository root)
CSRC = ROOT / "csrc"
SOURCES = ("bindings.cpp", "lora_ops.cpp", "lowrank.cu", "gemm_sm80.cu", "gemm_sm90.cu")
DEFAULT_ARCHS = "80;90"


def find_cuda_home() -> str | None:
    """The CUDA toolkit directory (containing bin/nvcc), or None.

    Follows an ``nvcc`` on PATH that is a wrapper script (``exec /usr/local/cuda-X/bin/nvcc "$@"``)
    or a symlink, like scripts/find_cuda_home.sh: torch's own guess would take the wrapper's
    directory (e.g. /usr/local) for the toolkit.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        target = None
        try:
            head = Path(nvcc).read_bytes()[:4096].decode("utf-8", "ignore")
            m = re.search(r"^exec\s+(\S*nvcc)\b", head, re.MULTILINE)
            target = m.group(1) if m else None
        except OSError:
            pass
        target = Path(target) if target else Path(nvcc).resolve()
        if target.exists():
            return str(target.parent.parent)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def nvcc_version(cuda_home: str) -> str | None:
    """``major.minor`` of the toolkit's nvcc, or None if it does not run."""
    try:
        out = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_archs(spec: str | None = None) -> list[str]:
    """``"80;90"`` (also ``"8.0;9.0"``, ``"90a"``, commas) -> ``["80", "90"]``, sorted."""
    spec = spec if spec is not None else os.environ.get("LORA_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = set()
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(?:sm_)?(\d+)\.?(\d)?([af])?", tok)
        if not m:
            raise ValueError(f"LORA_KERNELS_CUDA_ARCHS: cannot parse {tok!r} (expected e.g. '80;90')")
        archs.add(m.group(1) + (m.group(2) or ""))
    if not archs:
        raise ValueError("LORA_KERNELS_CUDA_ARCHS is empty")
    bad = [a for a in archs if int(a) < 80]
    if bad:
        raise ValueError(f"LORA_KERNELS_CUDA_ARCHS: sm_80 or newer is required, got {bad}")
    return sorted(archs, key=int)


def arch_flags(archs: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags: a cubin per arch (sm_90 as sm_90a) plus PTX of the newest arch."""
    flags = []
    for a in archs:
        real = a + "a" if a == "90" else a
        flags.append(f"-gencode=arch=compute_{real},code=sm_{real}")
    newest = archs[-1]
    # Arch-specific ("a") PTX does not run on later GPUs: the plain compute_XX PTX does (the sm90
    # CUTLASS kernels compile to nothing there and the runtime dispatch never picks them).
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def torch_arch_list(archs: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST spelling of the archs, e.g. ``"8.0;9.0a"``."""
    return ";".join(f"{a[:-1]}.{a[-1]}" + ("a" if a == "90" else "") for a in archs)


def _site_dirs() -> list[Path]:
    import importlib.util
    import site

    dirs = [Path(p) for p in sys.path if p.endswith("site-packages")]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except AttributeError:  # some virtualenv layouts
        pass
    # Wherever the `nvidia` namespace package (the CUDA wheels torch depends on) lives: also a
    # --target or PYTHONPATH install whose directory is not called site-packages.
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p).parent for p in spec.submodule_search_locations]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


VENDORED_CUTLASS = ROOT / "third_party" / "cutlass"


def cutlass_include_dirs() -> list[str]:
    """CUTLASS/CuTe headers: ``LORA_KERNELS_CUTLASS_DIR`` (a CUTLASS source tree with ``include/`` and
    ``tools/util/include/``), else those of the ``nvidia-cutlass`` package
    (``cutlass_library/source/include``), else ``third_party/cutlass`` (made by scripts/vendor_cutlass.sh
    for a machine without a package registry)."""
    import importlib.util

    def tree(root: Path, what: str) -> list[str]:
        inc, util = root / "include", root / "tools" / "util" / "include"
        if not (inc / "cutlass" / "cutlass.h").exists():
            raise RuntimeError(f"{what}: {inc}/cutlass/cutlass.h is missing")
        return [str(inc), str(util)]

    override = os.environ.get("LORA_KERNELS_CUTLASS_DIR", "").strip()
    if override:
        return tree(Path(override), f"LORA_KERNELS_CUTLASS_DIR={override}")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        if (VENDORED_CUTLASS / "include").is_dir():
            return tree(VENDORED_CUTLASS, "the vendored CUTLASS")
        raise RuntimeError(
            "the CUTLASS headers come from the 'nvidia-cutlass' package (pip install nvidia-cutlass), "
            f"{VENDORED_CUTLASS} (scripts/vendor_cutlass.sh) or LORA_KERNELS_CUTLASS_DIR"
        )
    src = Path(spec.origin).parent / "source"
    inc, util = src / "include", src / "tools" / "util" / "include"
    if not (inc / "cutlass" / "cutlass.h").exists():
        raise RuntimeError(f"nvidia-cutlass is installed but {inc}/cutlass/cutlass.h is missing")
    return [str(inc), str(util)]


def cuda_extra_include_dirs(cuda_home: str | None) -> list[str]:
    """Header dirs of pip-installed CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's headers
    include but a minimal toolkit lacks: ``nvidia/cu13/include`` (CUDA 13 wheels) or the per-library
    ``nvidia/<lib>/include`` dirs (CUDA 12 wheels).

    Beside a toolkit, only what its ``include/`` lacks is added (:func:`missing_headers_dir`): the
    wheels' directory also holds the CUDA runtime's and CCCL's headers of torch's CUDA release, which
    nvcc refuses when its own release differs ("CUDA compiler and CUDA toolkit headers are
    incompatible": torch 2.15's cu132 wheels beside nvcc 13.0)."""
    toolkit_inc = Path(cuda_home) / "include" if cuda_home else None
    if toolkit_inc is not None and (toolkit_inc / "cublas_v2.h").exists():
        return []
    found = []
    for site_dir in _site_dirs():
        nv = site_dir / "nvidia"
        if not nv.is_dir():
            continue
        for inc in sorted(nv.glob("cu*/include")) + sorted(nv.glob("*/include")):
            if any((inc / h).exists() for h in ("cublas_v2.h", "cusparse.h", "cusolverDn.h", "curand.h")):
                found.append(inc)
    found = list(dict.fromkeys(found))
    if toolkit_inc is None or not toolkit_inc.is_dir():
        return [str(inc) for inc in found]
    return [str(missing_headers_dir(inc, toolkit_inc)) for inc in found]


def missing_headers_dir(wheel_inc: Path, toolkit_inc: Path) -> Path:
    """A directory of symlinks to the entries of ``wheel_inc`` that ``toolkit_inc`` lacks (cuBLAS's,
    cuSPARSE's, cuSOLVER's headers...), so that a header both have comes from the toolkit that
    compiles. Kept in the temp dir under a name keyed by both paths and that list, so that the
    compile commands, and ninja's, stay the same from one build to the next."""
    missing = sorted(e.name for e in wheel_inc.iterdir() if not (toolkit_inc / e.name).exists())
    key = hashlib.sha256("\0".join([str(wheel_inc), str(toolkit_inc), *missing]).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"lora_kernels-cuda-headers-{key}"

    def complete() -> bool:
        return out.is_dir() and sorted(e.name for e in out.iterdir()) == missing

    if complete():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    for name in missing:
        (tmp / name).symlink_to(wheel_inc / name)
    try:
        os.replace(tmp, out)  # atomic where out is absent (or empty)
    except OSError:  # another build made it meanwhile, or a broken one is in the way
        if not complete():
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def include_dirs(cuda_home: str | None) -> list[str]:
    return [str(CSRC), *cutlass_include_dirs(), *cuda_extra_include_dirs(cuda_home)]


def sources() -> list[str]:
    return [str(CSRC / s) for s in SOURCES]


def sources_digest() -> str:
    """A hash of what decides the compiled binary: every file of csrc/ and this file (the flags).

    Keys the JIT cache, and tells whether a binary built elsewhere (scripts/device_prebuild.sh)
    still matches the sources it is about to be used with."""
    digest = hashlib.sha256()
    for src in [*sorted(CSRC.glob("*")), Path(__file__)]:
        digest.update(src.name.encode())
        digest.update(src.read_bytes())
    return digest.hexdigest()[:16]


def compile_flags(archs: list[str]) -> dict[str, list[str]]:
    """``extra_compile_args`` of the extension: {"cxx": [...], "nvcc": [...]}."""
    # A bare token (e.g. 80_90, stringified in bindings.cpp): quoted string macros do not survive
    # the shell quoting of both setup.py's and the JIT's ninja files.
    defines = [f"-DLORA_KERNELS_ARCHS={'_'.join(archs)}"]
    if "90" in archs:
        defines.append("-DLORA_KERNELS_SM90A")
    cxx = ["-O3", *defines]
    nvcc = [
        "-O3",
        *defines,
        # torch's default flags disable the half/bfloat16 operators CUTLASS and our kernels use.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "--use_fast_math",
        "-lineinfo",
        "-DNDEBUG",
        # CUTLASS headers warn a lot under C++20; the warnings are upstream's, not actionable here.
        "-diag-suppress=2908,20012,177,550",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        *arch_flags(archs),
    ]
    return {"cxx": cxx, "nvcc": nvcc}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_info(archs: list[str], cuda_home: str | None) -> dict[str, str]:
    """Metadata recorded next to the binary (lora_kernels/_build_info.py)."""
    import torch

    return {
        "torch_version": torch.__version__,
        "torch_cuda_version": str(torch.version.cuda),
        "nvcc_version": str(nvcc_version(cuda_home) if cuda_home else None),
        "cuda_archs": ";".join(archs),
        "git_commit": git_commit(),
        "build_date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_build_info(path: Path, info: dict[str, str]) -> None:
    lines = ['"""Generated by setup.py when lora_kernels._C was built. Do not edit; not in git."""', ""]
    lines += [f"{k.upper()} = {v!r}" for k, v in info.items()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # `python lora_kernels/cuda_ops/_build.py digest`: used by the device scripts
    if sys.argv[1:] != ["digest"]:
        sys.exit("usage: _build.py digest")
    print(sources_digest())
