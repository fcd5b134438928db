"""Before spending device time (`make device-preflight`, no GPU, seconds): is what a device call carries
the code it will test? A device session has 15 minutes in all; a stale `.device/` costs minutes of them
(the extension rebuilt there, Triton kernels compiled there) or tests an old binary.

Checks, each a line of output; exit 1 if any fails:
  - the working tree is committed (the benchmark's CSV names the commit that ran);
  - `.device/prebuilt/SOURCES_DIGEST` equals the digest of csrc/ and the build flags now;
  - `.device/triton-cache.tar.gz` was compiled from these lora_kernels/triton_ops sources, by the GPU image's
    Triton build, for the plan's benchmark and verify arguments (the environment's BENCH_ARGS etc. override
    the short plan's, as in gpu_check.sh);
  - the CUTLASS headers are in third_party/ (the fallback build) and the carried paths fit the 64 MiB limit.
Then it writes `.device/COMMIT` (this commit), which the benchmark's CSV reports on the device (no .git there).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "lora_kernels" / "cuda_ops"))

CARRY_LIMIT = 64 * 1024 * 1024


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()


def _plan() -> tuple[str, str, bool, bool]:
    """The short plan's BENCH_ARGS, VERIFY_ARGS and autotune switches, as gpu_check.sh would source them."""
    out = subprocess.run(
        ["bash", "-c", 'source scripts/gpu_check_short_plan.sh; printf "%s\\0%s\\0%s\\0%s" "$BENCH_ARGS" '
         '"$VERIFY_ARGS" "$BENCH_AUTOTUNE" "$VERIFY_AUTOTUNE"'],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    return out[0], out[1], out[2] == "1", out[3] == "1"


def _prewarm_info(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "PREWARM_INFO"), None)
        if member is None:
            return {}
        text = io.TextIOWrapper(tar.extractfile(member)).read()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def checks() -> list[tuple[bool, str]]:
    import _build  # lora_kernels/cuda_ops/_build.py: stdlib only at import
    import prewarm_triton_cache as prewarm

    out: list[tuple[bool, str]] = []
    dirty = _git("status", "--porcelain", "--untracked-files=normal")
    out.append((not dirty, "working tree committed" if not dirty else f"uncommitted changes:\n{dirty}"))

    digest_file = ROOT / ".device" / "prebuilt" / "SOURCES_DIGEST"
    want = _build.sources_digest()
    have = digest_file.read_text().strip() if digest_file.exists() else "absent"
    out.append((have == want, f"prebuilt _C from these sources ({want})" if have == want else
                f"prebuilt _C built from {have}, sources are {want}: run make device-prebuild"))  # fmt: skip

    cache = ROOT / ".device" / "triton-cache.tar.gz"
    info = _prewarm_info(cache) if cache.exists() else {}
    sources = prewarm.kernel_sources_digest()
    ok = info.get("sources") == sources
    out.append((ok, "Triton cache from these kernel sources" if ok else
                f"Triton cache from sources {info.get('sources', 'absent')[:16]}, now {sources[:16]}: run make "
                "device-prebuild"))  # fmt: skip
    plan = prewarm.plan_digest(*_plan())
    ok = info.get("plan") == plan
    out.append((ok, f"Triton cache for this plan's bench and verify arguments ({plan})" if ok else
                f"Triton cache for plan {info.get('plan', 'unknown')}, this plan is {plan}: run make device-prebuild "
                "with the same BENCH_ARGS / VERIFY_ARGS / *_AUTOTUNE"))  # fmt: skip
    key = info.get("triton_key")
    out.append((bool(key), f"Triton cache for Triton build {key} ({info.get('triton', '?')}, {info.get('kernels')} "
                "kernels)" if key else "Triton cache has no build key"))  # fmt: skip

    cutlass = ROOT / "third_party" / "cutlass" / "include" / "cutlass" / "cutlass.h"
    out.append((cutlass.exists(), "CUTLASS headers in third_party/" if cutlass.exists() else
                "no third_party/cutlass: run make device-prebuild (scripts/vendor_cutlass.sh)"))  # fmt: skip
    tracked = sum(_size(ROOT / f) for f in _git("ls-files").splitlines() if (ROOT / f).exists())
    carried = tracked + _size(ROOT / ".device") + _size(ROOT / "third_party")
    out.append((carried < CARRY_LIMIT, f"tree + .device + third_party = {carried / 2**20:.1f} MiB (limit 64)"))
    return out


def main() -> int:
    results = checks()
    for ok, line in results:
        print(f"device-preflight: {'ok  ' if ok else 'FAIL'} {line}")
    if not all(ok for ok, _ in results):
        print("device-preflight: not ready: fix the above before spending device time")
        return 1
    commit = _git("rev-parse", "--short=12", "HEAD")
    (ROOT / ".device" / "COMMIT").write_text(commit + "\n")
    print(f"device-preflight: ready; .device/COMMIT = {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
