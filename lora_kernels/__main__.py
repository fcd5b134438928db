"""Command line: ``python -m lora_kernels {verify,demo}`` (console script ``lora-kernels``).

* ``verify``: every available backend × dtype × shape × dropout p against the float64
  reference, mask identity, a summary table, ``--json PATH``; non-zero exit status on failure.
* ``demo``: a quick ``verify`` and, on a GPU, a quick benchmark against ``F.linear``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 = everything passed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="lora-kernels", description="Fused LoRA linear kernels: correctness checks and a demo."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    # verify's module imports torch; parse the command first so `--help` stays cheap to reach.
    from . import verify

    pv = sub.add_parser(
        "verify",
        help="check every backend against the float64 reference",
        description=(verify.__doc__ or "").split("\n\n")[0],
    )
    verify.add_verify_args(pv)
    pd = sub.add_parser("demo", help="quick verify, then (GPU only) a quick benchmark", add_help=False)
    pd.add_argument("demo_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.command == "verify":
        return verify.run_verify(args)
    return verify.run_demo(args.demo_args)


if __name__ == "__main__":
    sys.exit(main())
