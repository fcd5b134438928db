"""Compile, here and without a GPU, the Triton kernels that a gpu-check run will launch on the device,
into a Triton cache that the device then loads instead of compiling (``make device-prebuild``).

    python scripts/prewarm_triton_cache.py --out .device/triton-cache.tar.gz \\
        --bench-args "<BENCH_ARGS of the plan>" --verify-args "<VERIFY_ARGS of the plan>"

It replays the benchmark's Triton rows (one forward and backward per configuration and row, on CPU
tensors of the real shapes) and the verify sweep (its cases and mask probes, the float64 reference
replaced by a stand-in) under ``lora_kernels.triton_ops.compile_only``: each launch compiles for
sm_90 with the host-side choices of a 132-SM H100/H200 and runs nothing. The cache is written with
``TRITON_STORE_BINARY_ONLY=1`` (cubins and metadata, ~40 KB per kernel compressed) into ``--cache-dir``
and packed into ``--out`` with a ``PREWARM_INFO`` file: the cache path (Triton's index files name their
members by absolute path; gpu_check.sh re-points them when it unpacks elsewhere) and the Triton build key
(``compile_only.triton_build_key``). Only that build (the device image's Triton 3.6 wheel, so run this with
that Triton: ``scripts/device_prebuild.sh`` does) and the kernel sources must match for the device to hit
the cache; gpu_check.sh says whether the build matches and how many kernels each step still compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shlex
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = "/tmp/lora-kernels-triton-cache"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the .tar.gz to write (the cache, relative paths)")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE, help="absolute cache path, the same as on the device")
    ap.add_argument("--bench-args", default="", help="arguments of `python -m bench.lora_linear` to replay")
    ap.add_argument("--verify-args", default="", help="arguments of `python -m lora_kernels verify` to replay")
    ap.add_argument("--keep", action="store_true", help="add to the cache directory instead of starting it afresh")
    ap.add_argument("--bench-autotune", action="store_true", help="the bench tunes (BENCH_AUTOTUNE=1): every config")
    ap.add_argument("--verify-autotune", action="store_true", help="verify tunes (VERIFY_AUTOTUNE=1): every config")
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 of the device (default 90)")
    ap.add_argument("--sms", type=int, default=132, help="its multiprocessor count (default 132: H100, H200)")
    return ap.parse_args(argv)


def bench_calls(bench_args: str) -> list[tuple[str, object]]:
    """(label, thunk) per benchmark configuration and Triton row: one forward and backward each."""
    from bench import _impls
    from bench import lora_linear as bl

    args = bl.parse_args(shlex.split(bench_args))
    # As bench.lora_linear.main on a GPU: its default rows and dtype.
    names = [n for n in (args.impls or bl.GPU_IMPLS) if n.startswith("triton") and n != "triton-compile"]
    dtype = bl._DTYPES[args.dtype or "bf16"]
    adapter_dtype = dtype if args.adapter_dtype == "same" else bl._DTYPES[args.adapter_dtype]
    calls = []
    for cfg in bl.build_configs(args):
        for name in names:

            def call(cfg=cfg, name=name):
                prob = _impls.make_problem(
                    cfg.M, cfg.K, cfg.N, cfg.r, cfg.p, dtype=dtype, adapter_dtype=adapter_dtype, device="cpu",
                    bias=args.bias, scaling=args.scaling, copies=1, seed=args.seed,
                    frozen="" if args.frozen == "none" else args.frozen,
                )  # fmt: skip
                try:
                    impl = _impls.build(name, prob)
                except _impls.Unavailable as e:
                    return f"unavailable: {e}"
                with impl.scope():  # a setting the row's backward reads as well (triton-flat)
                    impl.fn(prob.xs[0]).backward(prob.dys[0])
                return "ok"

            calls.append((f"bench {name} {cfg}", call))
    return calls


def verify_call(verify_args: str):
    """The verify sweep on CPU tensors: its Triton cases and mask probes launch as on the device."""
    import torch

    from lora_kernels import verify

    def reference_stand_in(x, weight, *_, **__):  # the float64 reference is not needed to compile
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, requires_grad=True)

    def call():
        ap = argparse.ArgumentParser()
        verify.add_verify_args(ap)
        args = ap.parse_args([*shlex.split(verify_args), "--device", "cpu", "--no-progress"])
        if "triton" not in (args.backend or ["triton"]):  # the device's verify launches no Triton kernel
            return "skipped: no triton backend in the verify arguments"
        args.backend = ["triton"]  # (the cuda cases' kernels are the extension's, not Triton's)
        saved = verify._reference_impl, verify.probe_size
        verify._reference_impl = reference_stand_in
        verify.probe_size = lambda device_type: saved[1]("cuda")  # the device's probe size
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                verify.run_verify(args)  # fails (outputs are left uninitialised): only the compiles count
        finally:
            verify._reference_impl, verify.probe_size = saved
        return "ok"

    return call


def kernel_sources_digest() -> str:
    """sha256 of lora_kernels/triton_ops/*.py in name order (gpu_check.sh computes the same with
    sha256sum): a prewarmed cache from other kernel sources misses where they changed."""
    files = sorted((ROOT / "lora_kernels" / "triton_ops").glob("*.py"), key=lambda p: p.name.encode())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def plan_digest(bench_args: str, verify_args: str, bench_autotune: bool, verify_autotune: bool) -> str:
    """Which benchmark and verify calls a cache was compiled for (scripts/device_preflight.py compares it
    with the plan a device call would run): arguments compared as parsed words, not as text."""
    words = [shlex.split(bench_args), shlex.split(verify_args), [str(int(bench_autotune)), str(int(verify_autotune))]]
    return hashlib.sha256(repr(words).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("prewarm: unset TRITON_INTERPRET (the kernels must compile)", file=sys.stderr)
        return 2
    if not os.path.isabs(a.cache_dir):
        print("prewarm: --cache-dir must be absolute (Triton's index files record absolute paths)", file=sys.stderr)
        return 2
    if not a.keep:
        shutil.rmtree(a.cache_dir, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = a.cache_dir
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    from lora_kernels.triton_ops.compile_only import compile_only, ptxas_version, triton_build_key

    torch.manual_seed(0)
    # (label, call, whether Triton tunes in it, as LORA_KERNELS_AUTOTUNE would say on the device)
    calls = [(*c, a.bench_autotune) for c in bench_calls(a.bench_args)] if a.bench_args else []
    if a.verify_args:
        calls.append(("verify (triton cases and mask probes)", verify_call(a.verify_args), a.verify_autotune))
    cache = Path(a.cache_dir)
    before = len(list(cache.glob("*/__grp__*.json")))
    compiled: list = []
    t0 = time.perf_counter()
    for label, call, tune in calls:
        launches = len(compiled)
        with compile_only(compiled.append, arch=a.arch, num_sms=a.sms, autotune=tune):
            status = call()
        tuned = ", every tuning config" if tune else ""
        print(f"prewarm: {label}: {status}, {len(compiled) - launches} launches{tuned}", flush=True)
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []
    kernels = len(list(cache.glob("*/__grp__*.json")))
    # What gpu_check.sh reads back: where the index files point (it re-points them if its cache sits
    # elsewhere) and the Triton build the cubins belong to (a different build misses every kernel).
    info = dict(cache_dir=a.cache_dir, triton_key=triton_build_key(), triton=triton.__version__,
                ptxas=ptxas_version(), arch=a.arch, sms=a.sms, bench_autotune=int(a.bench_autotune),
                verify_autotune=int(a.verify_autotune), kernels=kernels, sources=kernel_sources_digest(),
                plan=plan_digest(a.bench_args, a.verify_args, a.bench_autotune, a.verify_autotune))  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "PREWARM_INFO").write_text("".join(f"{k}={v}\n" for k, v in info.items()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(a.out, "w:gz") as tar:
        for name in [*entries, "PREWARM_INFO"]:
            tar.add(cache / name, arcname=name)
    print(
        f"prewarm: {kernels - before} kernels compiled, {kernels} kernels in {a.out} "
        f"({a.out.stat().st_size / 2**20:.1f} MiB) for sm_{a.arch}, "
        f"{a.sms} SMs, Triton {info['triton']} (build key {info['triton_key']}), {info['ptxas']}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
