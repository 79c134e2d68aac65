"""The `tandem` command: one entry point, one module per subcommand.

Each module in COMMANDS exposes `register(subparsers) -> None`, which adds its parser and sets
`func` (a callable taking the parsed args and returning an exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
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


EPILOG = """quick start:
  tandem up --model SmolLM2-135M-Instruct     serve the packaged model: gRPC on 127.0.0.1:50051, the
                                             OpenAI-compatible HTTP API on http://127.0.0.1:8000/v1
  tandem generate 'The capital of France is'  stream a completion from it
  tandem COMMAND --help                        every command's flags"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated LLM inference.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    parser.add_argument("--log-format", default="text", choices=("text", "json"),
                        help="text lines, or one JSON object a line with structured fields (default: text)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from server.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level, args.log_format)
    except ValueError as exc:
        parser.error(str(exc))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
