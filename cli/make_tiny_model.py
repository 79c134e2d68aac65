"""`tandem make-tiny-model OUT_DIR --arch ...`: write a small random Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import logging

from engine.options import add_options, from_args
from training.tiny_shape import TinyShape

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `make-tiny-model` parser; its `func` is `run`."""
    p = subparsers.add_parser(
        "make-tiny-model",
        help="write a small random checkpoint with a trained tokenizer (for tests and demos)",
        description="Write a random checkpoint in Hugging Face format (config.json, safetensors, "
        "tokenizer.json trained on this machine's Python sources) that transformers can load.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing; one that already "
                   "holds a config.json is refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint files already in OUT_DIR")
    add_options(p, TinyShape)
    p.add_argument(
        "--llama3-rope-scaling", action="store_true",
        help="add Llama-3.1 rope_scaling (factor 8, original context = max positions / 8)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint; return 0, or 2 after logging the error for bad options."""
    from pathlib import Path

    from training.tiny import llama3_rope_scaling, write_tiny_model

    if (Path(args.out_dir) / "config.json").exists() and not args.overwrite:
        logger.error("make-tiny-model: %s already holds a checkpoint (config.json); pass --overwrite to replace it "
                     "with a random one", args.out_dir)
        return 2
    rope_scaling = None
    if args.llama3_rope_scaling:
        if args.arch != "llama":
            logger.error("--llama3-rope-scaling is only for --arch llama")
            return 2
        rope_scaling = llama3_rope_scaling(max(args.max_position_embeddings // 8, 1))
    try:
        path = write_tiny_model(args.out_dir, from_args(TinyShape, args, rope_scaling=rope_scaling))
    except ValueError as exc:
        logger.error("make-tiny-model: %s", exc)
        return 2
    logger.info("tiny %s checkpoint ready at %s", args.arch, path)
    return 0
