"""The ``sparse-lens`` command."""

from __future__ import annotations

import argparse
import sys

from sparse_lens.cli import fidelity, trace
from sparse_lens.errors import SparseLensError


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``sparse-lens`` parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(prog="sparse-lens", description="Sparse attention tracing for long contexts.")
    commands = parser.add_subparsers(dest="command", required=True)
    trace_parser = commands.add_parser("trace", help="trace a needle-in-a-haystack prompt sparsely")
    trace.add_arguments(trace_parser)
    fidelity_parser = commands.add_parser(
        "fidelity", help="fidelity, needle fidelity and RULER accuracy of a sparse config against dense attention"
    )
    fidelity.add_arguments(fidelity_parser)
    return parser, {"trace": trace_parser, "fidelity": fidelity_parser}


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    command = {"trace": trace, "fidelity": fidelity}[args.command]
    command.check_arguments(commands[args.command], args)  # before the model loads
    try:
        command.run(args)
    except SparseLensError as error:  # a named error says what went wrong and what to do: no traceback
        print(f"sparse-lens {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
