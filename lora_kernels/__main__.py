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
    from . import verify

    pv = sub.add_parser(
        "verify",
        help="check every backend against the float64 reference",
        description="Check every available backend x dtype x shape x dropout p against the float64 "
        "reference (outputs, gradients of x, lora_A, lora_B, lora_bias (and of a trained base bias in the partial "
        "cases), and the dropout mask bit for bit).",
    )
    verify.add_verify_args(pv)
    # demo's own options (run_demo parses them, so `demo --help` shows them)
    sub.add_parser("demo", help="quick verify, then (GPU only) a quick benchmark", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.command == "verify":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return verify.run_verify(args)
    return verify.run_demo(rest)


if __name__ == "__main__":
    sys.exit(main())
