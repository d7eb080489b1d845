"""The ``flopwise`` command: parses the arguments and dispatches to the command's module.

Each command module adds its own parser (``add_parser(sub)``) and sets ``run(args, rest)``; commands that
pass other options on to vLLM (serve, batch) set ``passes_through``. Bad input gets one line naming the
problem and exit code 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flopwise_serve.common import PROG

COMMANDS = (
    "flopwise_serve.flops",
    "flopwise_serve.serve",
    "flopwise_serve.batch",
    "flopwise_serve.demo",
    "flopwise_bench.cli",
    "flopwise_serve.convert",
    "flopwise_serve.model",
    "flopwise_serve.train_prm",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="FLOP-aware inference middleware for vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args, rest)


if __name__ == "__main__":
    sys.exit(main())
