"""Packaging: what setup.py does with the build switches, the sdist's contents, where the build finds
CUTLASS and the CUDA wheels' headers, and what the package says when the extension cannot be had.

CPU only, seconds each: ``python setup.py --name`` runs the build configuration without compiling.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

import pytest
import torch

from lora_kernels import backends, build_info
from lora_kernels.cuda_ops import _build, _ext

ROOT = Path(__file__).resolve().parents[1]


def _setup_py(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORA_KERNELS_")}
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=root,  # setuptools reads the project (pyproject.toml) from the working directory
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tree_with_build_leftovers(tmp_path: Path) -> Path:
    """A copy of the sources plus what an earlier build leaves in the package: _build_info.py and _C."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "*.egg-info", "build",
                                                              "third_party", ".device", "dist"))  # fmt: skip
    (tree / "lora_kernels" / "_build_info.py").write_text("TORCH_VERSION = 'stale'\n")
    (tree / "lora_kernels" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    return tree


def test_isolated_builds_do_not_fetch_torch():
    """An isolated build env with torch would compile _C against whatever torch pip downloads (GBs,
    and a release the user's torch then refuses): the extension is built with --no-build-isolation."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = " ".join(cfg["build-system"]["requires"])
    for name in ("torch", "nvidia-cutlass", "pybind11"):
        assert name not in requires
    assert "dependencies" in cfg["project"]["dynamic"]  # setup.py pins torch for a built _C


def test_skip_and_force_together_are_an_error():
    res = _setup_py(ROOT, "--name", LORA_KERNELS_SKIP_CUDA_BUILD="1", LORA_KERNELS_FORCE_BUILD="1")
    assert res.returncode != 0 and "contradict" in res.stderr


def test_an_arch_list_that_does_not_parse_is_an_error():
    """Not a quiet pure-Python build: the user asked for archs."""
    res = _setup_py(ROOT, "--name", LORA_KERNELS_CUDA_ARCHS="hopper")
    assert res.returncode != 0 and "cannot parse 'hopper'" in res.stderr


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch skips the build before nvcc is asked")
def test_a_toolkit_of_another_cuda_major_skips_the_build(tmp_path):
    """torch's BuildExtension raises on a CUDA major mismatch, failing the whole install; setup.py
    must see it first: a warning and the pure package (an error under FORCE)."""
    other = 12 if torch.version.cuda.split(".")[0] != "12" else 13
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}.8, V{other}.8.93'\n")
    nvcc.chmod(0o755)
    res = _setup_py(ROOT, "--name", CUDA_HOME=str(home))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("lora_kernels")
    assert f"nvcc {other}.8" in res.stderr and "differ in major version" in res.stderr
    forced = _setup_py(ROOT, "--name", CUDA_HOME=str(home), LORA_KERNELS_FORCE_BUILD="1")
    assert forced.returncode != 0 and "differ in major version" in forced.stderr


def test_sdist_holds_sources_docs_and_tests_but_no_build_products(tmp_path):
    """From a copy of this tree with what a build leaves in it (`make setup` writes
    lora_kernels/_build_info.py and _C*.so; pip wheel leaves build/)."""
    tree = _tree_with_build_leftovers(tmp_path)
    (tree / "build" / "lib" / "lora_kernels").mkdir(parents=True)
    res = _setup_py(tree, "-q", "sdist", "-d", str(tmp_path), LORA_KERNELS_SKIP_CUDA_BUILD="1")
    assert res.returncode == 0, res.stderr[-3000:]
    (sdist,) = tmp_path.glob("lora_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read()
    for needed in ("LICENSE", "setup.py", "pyproject.toml", "docs/BUILDING.md", "csrc/lowrank_kernels.cuh",
                   "csrc/bindings.cpp", "lora_kernels/cuda_ops/_build.py", "tests/conftest.py", "tests/_utils.py",
                   "tests/cuda_emu/harness.cpp", "requirements-ci.txt", "scripts/prewarm_triton_cache.py"):  # fmt: skip
        assert needed in names, needed
    built = [n for n in names if n.endswith((".so", ".pyc")) or n.endswith("_build_info.py")]
    assert built == [] and not any(n.startswith(("build/", ".device/", "third_party/")) for n in names)
    assert b"Requires-Dist: torch>=2.6" in pkg_info and b"License-File: LICENSE" in pkg_info


@pytest.mark.skipif(_build.find_cuda_home() is None, reason="without a CUDA toolkit build_wheels.sh stops before")
def test_build_wheels_refuses_to_skip_the_extension(tmp_path):
    env = dict(os.environ, LORA_KERNELS_SKIP_CUDA_BUILD="yes", VENV=str(Path(sys.executable).parents[1]))
    res = subprocess.run(["bash", str(ROOT / "scripts" / "build_wheels.sh"), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode != 0 and "LORA_KERNELS_SKIP_CUDA_BUILD=yes" in res.stderr
    assert list(tmp_path.glob("*.whl")) == []


def test_pure_wheel_packs_the_sources_only(tmp_path):
    """A pure wheel (no extension) from a tree where earlier builds left a stale module in build/lib,
    and _build_info.py and _C in the package: none of them may be packed."""
    tree = _tree_with_build_leftovers(tmp_path)
    stale = tree / "build" / "lib" / "lora_kernels"
    stale.mkdir(parents=True)
    (stale / "removed_from_the_sources.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_KERNELS_")}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-w", str(tmp_path), str(tree)],
                         env={**env, "LORA_KERNELS_SKIP_CUDA_BUILD": "1"}, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = tmp_path.glob("lora_kernels-*-py3-none-any.whl")
    packed = {n for n in zipfile.ZipFile(whl).namelist() if n.startswith("lora_kernels/")}
    sources = {p.relative_to(tree).as_posix() for p in (tree / "lora_kernels").rglob("*.py")}
    assert packed == sources - {"lora_kernels/_build_info.py"}


def test_build_metadata_is_checked_per_torch_minor_series():
    """The wheel is tagged (+cu130torch2.14) and pinned (torch==2.14.*) per series: a patch release of
    torch keeps the C++ ABI and must load it, another minor release must not."""
    v = torch.__version__.split("+")[0].split(".")
    info = dict(torch_version=f"{v[0]}.{v[1]}.{int(v[2]) + 1}+cu999", torch_cuda_version=str(torch.version.cuda),
                nvcc_version="x", cuda_archs="80", git_commit="x", build_date="d")  # fmt: skip
    assert build_info.mismatch_reason(info) is None
    other = dict(info, torch_version=f"{v[0]}.{int(v[1]) + 1}.0")
    reason = build_info.mismatch_reason(other)
    assert reason is not None and f"wheel built for torch {v[0]}.{v[1]}" in reason and "JIT" not in reason


def test_cuda_backend_without_sources_or_binary_says_so(monkeypatch, tmp_path):
    """A wheel or sdist install has no csrc/ to JIT-build from: no 'available' that fails at the call."""
    monkeypatch.setattr(_ext, "_EXT", None)
    monkeypatch.setattr(_ext, "prebuilt_available", lambda: False)
    monkeypatch.delenv("LORA_KERNELS_NO_JIT", raising=False)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: "/usr/local/cuda-13.0")
    monkeypatch.setattr(_build, "CSRC", tmp_path / "csrc")
    reason = _ext.availability(torch.device("cuda", 0))
    assert reason is not None and "sources" in reason and "not here to JIT-build" in reason


def test_cutlass_headers_fall_back_to_the_vendored_copy(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "cutlass_library" else real_find_spec(n, *a)
    )
    monkeypatch.delenv("LORA_KERNELS_CUTLASS_DIR", raising=False)
    monkeypatch.setattr(_build, "VENDORED_CUTLASS", tmp_path / "cutlass")
    with pytest.raises(RuntimeError, match="nvidia-cutlass.*vendor_cutlass.sh"):
        _build.cutlass_include_dirs()
    (tmp_path / "cutlass" / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "cutlass" / "include" / "cutlass" / "cutlass.h").write_text("")
    inc = _build.cutlass_include_dirs()
    assert inc == [str(tmp_path / "cutlass" / "include"), str(tmp_path / "cutlass" / "tools" / "util" / "include")]


def _wheel_headers(monkeypatch, tmp_path: Path, header: str) -> Path:
    """A CUDA wheel's ``nvidia/cu13/include`` holding ``header``, in a directory that is not site-packages
    (a --target / PYTHONPATH install), found through the ``nvidia`` namespace package."""
    inc = tmp_path / "pylibs" / "nvidia" / "cu13" / "include"
    inc.mkdir(parents=True)
    (inc / header).write_text("")
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "pylibs" / "nvidia")])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == "nvidia" else real_find_spec(n, *a))
    return inc


def test_cuda_wheel_headers_are_found_outside_site_packages(monkeypatch, tmp_path):
    """torch's CUDA wheels' headers (nvidia/cu13/include) in a --target / PYTHONPATH directory."""
    inc = _wheel_headers(monkeypatch, tmp_path, "cusparse.h")
    assert str(inc) in _build.cuda_extra_include_dirs(None)


def test_build_configuration_honours_its_environment(monkeypatch, tmp_path):
    """LORA_KERNELS_CUTLASS_DIR (a CUTLASS source tree) comes before the package and the vendored copy, and
    a tree without the headers is an error naming the variable; NVCC_THREADS reaches nvcc; the wheels'
    headers are added where the toolkit lacks cuBLAS's (a minimal toolkit), not where it has them."""
    tree = tmp_path / "cutlass-src"
    monkeypatch.setenv("LORA_KERNELS_CUTLASS_DIR", str(tree))
    with pytest.raises(RuntimeError, match="LORA_KERNELS_CUTLASS_DIR=.*cutlass.h is missing"):
        _build.cutlass_include_dirs()
    (tree / "include" / "cutlass").mkdir(parents=True)
    (tree / "include" / "cutlass" / "cutlass.h").write_text("")
    assert _build.cutlass_include_dirs() == [str(tree / "include"), str(tree / "tools" / "util" / "include")]
    monkeypatch.setenv("NVCC_THREADS", "7")
    assert "--threads=7" in _build.compile_flags(["80"])["nvcc"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the links to the wheels' headers go
    inc = _wheel_headers(monkeypatch, tmp_path, "cublas_v2.h")
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    assert str(inc) not in _build.cuda_extra_include_dirs(str(toolkit))
    _links_to(inc, _build.cuda_extra_include_dirs(str(toolkit)))
    (toolkit / "include" / "cublas_v2.h").write_text("")
    assert _build.cuda_extra_include_dirs(str(toolkit)) == []


def _links_to(inc: Path, dirs: list[str]) -> Path:
    """The one directory of ``dirs`` whose links lead into ``inc``."""
    (shim,) = [Path(d) for d in dirs if (Path(d) / "cublas_v2.h").resolve() == (inc / "cublas_v2.h").resolve()]
    return shim


def test_wheel_headers_beside_a_toolkit_add_only_what_it_lacks(monkeypatch, tmp_path):
    """torch's CUDA wheels carry the runtime's and CCCL's headers of torch's CUDA release too: next to a
    toolkit of another release (torch 2.15's cu132 wheels, nvcc 13.0) nvcc stops at "CUDA compiler and
    CUDA toolkit headers are incompatible". Only the headers the toolkit lacks are added, through a
    directory of links whose path stays the same from one build to the next."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    inc = _wheel_headers(monkeypatch, tmp_path, "cublas_v2.h")
    for name in ("cusparse.h", "cuda_runtime_api.h"):
        (inc / name).write_text("// 13.2")
    (inc / "cccl" / "cuda").mkdir(parents=True)
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include" / "cccl").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime_api.h").write_text("// 13.0")
    dirs = _build.cuda_extra_include_dirs(str(toolkit))  # (this venv's own CUDA wheels' too, if any)
    shim = _links_to(inc, dirs)
    assert shim.parent == tmp_path / "tmp" and str(inc) not in dirs
    assert sorted(p.name for p in shim.iterdir()) == ["cublas_v2.h", "cusparse.h"]
    assert all((shim / n).resolve() == (inc / n).resolve() for n in ("cublas_v2.h", "cusparse.h"))
    assert _build.cuda_extra_include_dirs(str(toolkit)) == dirs  # the same paths again
    (shim / "cusparse.h").unlink()  # a broken one (a half-cleaned temp dir) is made again
    assert _build.cuda_extra_include_dirs(str(toolkit)) == dirs
    assert sorted(p.name for p in shim.iterdir()) == ["cublas_v2.h", "cusparse.h"]
    assert all(re.fullmatch(r"lora_kernels-cuda-headers-[0-9a-f]{16}", p.name) for p in shim.parent.iterdir())
    (toolkit / "include" / "cusparse.h").write_text("")  # what the toolkit has comes from it
    other = _links_to(inc, _build.cuda_extra_include_dirs(str(toolkit)))
    assert other != shim and sorted(p.name for p in other.iterdir()) == ["cublas_v2.h"]


def test_toolkit_is_found_behind_an_nvcc_wrapper(monkeypatch, tmp_path):
    """The `nvcc` on PATH may be a wrapper script that execs the toolkit's (as on CI) or a symlink to it:
    the toolkit is the directory above the real nvcc's bin/, not the wrapper's."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    wrapper = tmp_path / "wrap" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrapper / "nvcc").chmod(0o755)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(wrapper))
    assert _build.find_cuda_home() == str(toolkit)
    (wrapper / "nvcc").unlink()
    (wrapper / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    assert _build.find_cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))  # an explicit toolkit comes first
    monkeypatch.setenv("PATH", "")
    assert _build.find_cuda_home() == str(toolkit)


def test_build_metadata_round_trips_and_names_a_dirty_tree(monkeypatch, tmp_path):
    """What setup.py writes next to the binary loads back as written (quotes included), and its commit
    says "-dirty" when tracked files differ from it."""
    info = {k: f"v'{k}\"" for k in build_info._KEYS}
    path = tmp_path / "_build_info.py"
    _build.write_build_info(path, info)
    spec = importlib.util.spec_from_file_location("lk_test_build_info", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert {k: getattr(mod, k.upper()) for k in build_info._KEYS} == info
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(k, raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "_build_info.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    monkeypatch.setattr(_build, "ROOT", tmp_path)
    clean = _build.git_commit()
    assert len(clean) == 40, clean
    path.write_text("changed\n")
    assert _build.git_commit() == clean + "-dirty"


def test_sources_digest_covers_the_sources_and_the_flags(monkeypatch, tmp_path):
    """The digest keys the JIT cache and tells scripts/device_prebuild.sh's binary from a stale one: a
    change to any file of csrc/ or to the build flags (this module) must change it. The JIT cache lives
    under LORA_KERNELS_CACHE, one directory per torch, CUDA, archs and digest."""
    csrc, flags = tmp_path / "csrc", tmp_path / "_build.py"
    csrc.mkdir()
    (csrc / "a.cu").write_text("int a;")
    flags.write_text("FLAGS = 1")
    monkeypatch.setattr(_build, "CSRC", csrc)
    monkeypatch.setattr(_build, "__file__", str(flags))
    digests = [_build.sources_digest()]
    (csrc / "a.cu").write_text("int a = 1;")
    digests.append(_build.sources_digest())
    flags.write_text("FLAGS = 2")
    digests.append(_build.sources_digest())
    assert len(set(digests)) == 3, digests
    monkeypatch.setenv("LORA_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_ext, "_sources_digest", lambda: "d1g3st")
    where = _ext.jit_cache_dir(["80", "90"])
    assert where.parent == tmp_path / "cache" / "jit" and where.name.endswith("-sm80_90-d1g3st"), where


def test_mismatched_build_is_refused_before_the_binary_loads(monkeypatch):
    """A prebuilt _C whose metadata names another CUDA major (or torch series) is never imported: the
    backend is unavailable with the reason, and get_ext raises it, instead of an undefined-symbol crash."""
    info = dict(torch_version=torch.__version__, torch_cuda_version="11.8", nvcc_version="11.8",
                cuda_archs="80;90", git_commit="x", build_date="d")  # fmt: skip
    reason = build_info.mismatch_reason(info)
    assert reason is not None and "built against CUDA 11.8" in reason, reason
    imported = []
    real_import = _ext.importlib.import_module
    monkeypatch.setattr(_ext.importlib, "import_module", lambda n, *a: imported.append(n) or real_import(n, *a))
    monkeypatch.setattr(build_info, "load", lambda: info)
    monkeypatch.setattr(_ext, "_EXT", None)
    monkeypatch.setattr(_ext, "prebuilt_available", lambda: True)
    with pytest.raises(ImportError, match="built against CUDA 11.8"):
        _ext.get_ext(build=False)
    assert _ext.availability(torch.device("cuda", 0)) == reason
    assert "lora_kernels._C" not in imported


def test_prebuilt_for_other_archs_is_unavailable_on_this_gpu(monkeypatch):
    fake = types.SimpleNamespace(build_metadata=lambda: {"archs": "90"})
    monkeypatch.setattr(_ext, "_EXT", fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    reason = _ext.availability(torch.device("cuda", 0))
    assert reason is not None and "built for sm_90 and cannot run on this sm_80 GPU" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _ext.availability(torch.device("cuda", 0)) is None


def test_a_backend_that_fails_to_import_is_unavailable_with_the_error(monkeypatch, tmp_path):
    """Not only ImportError: a broken Triton install or a too-old torch raise others at import. "auto"
    then falls back; an explicit backend names the error."""
    (tmp_path / "lk_broken_backend.py").write_text("raise RuntimeError('libcuda.so cannot be found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends._MODULES, "cuda", "lk_broken_backend")
    x = torch.empty(2, 8)
    reason = backends.available_backends(x)["cuda"]
    assert reason == "cannot import the cuda backend: RuntimeError: libcuda.so cannot be found"
    with pytest.raises(RuntimeError, match="libcuda.so cannot be found"):
        backends.resolve("cuda", x, x, x)


def test_every_environment_variable_read_is_documented():
    """Each ``LORA_KERNELS_*`` variable the package or setup.py names as a string (what they read from the
    environment) appears in README.md or docs/BUILDING.md, where users look for them; and the check sees the
    ones it should (a few known names)."""
    import re

    sources = [*sorted((ROOT / "lora_kernels").rglob("*.py")), ROOT / "setup.py"]
    named = set()
    for path in sources:
        named |= set(re.findall(r"[\"'](LORA_KERNELS_[A-Z0-9_]+)[\"']", path.read_text()))
    assert {"LORA_KERNELS_CALL_PLANS", "LORA_KERNELS_POINTER_INTS", "LORA_KERNELS_SKIP_CUDA_BUILD"} <= named, named
    docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "BUILDING.md").read_text()
    missing = sorted(v for v in named if not re.search(rf"\b{v}\b", docs))
    assert not missing, f"undocumented environment variables: {missing}"
