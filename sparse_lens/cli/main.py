"""The ``sparse-lens`` command."""

from __future__ import annotations

import argparse
import sys

from sparse_lens.cli import fidelity, trace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-lens", description="Sparse attention tracing for long contexts.")
    commands = parser.add_subparsers(dest="command", required=True)
    trace_parser = commands.add_parser("trace", help="trace a needle-in-a-haystack prompt sparsely")
    trace.add_arguments(trace_parser)
    fidelity_parser = commands.add_parser(
        "fidelity", help="fidelity, needle fidelity and RULER accuracy of a sparse config against dense attention"
    )
    fidelity.add_arguments(fidelity_parser)
    args = parser.parse_args(argv)
    if args.command == "trace":
        trace.check_arguments(trace_parser, args)  # before the model loads
        trace.run(args)
    elif args.command == "fidelity":
        fidelity.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
