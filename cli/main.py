"""The `tandem` command: one entry point, one module per subcommand.

Each module in COMMANDS exposes `register(subparsers) -> None`, which adds its parser and sets
`func` (a callable taking the parsed args and returning an exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: tuple[str, ...] = (
    "cli.make_tiny_model",
    "cli.components",
    "cli.up",
    "cli.generate",
    "cli.keygen",
    "cli.train", "cli.distill", "cli.quantize",
    "cli.health", "cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated LLM inference.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
