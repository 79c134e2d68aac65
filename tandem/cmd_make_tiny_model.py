"""`tandem make-tiny-model OUT_DIR --arch ...`: write a small random Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import logging

from engine.tiny import ARCHITECTURES, DTYPES, llama3_rope_scaling, make_tiny_model

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `make-tiny-model` parser; its `func` is `run`."""
    p = subparsers.add_parser(
        "make-tiny-model",
        help="write a small random checkpoint with a trained tokenizer (for tests and demos)",
        description="Write a random checkpoint in Hugging Face format (config.json, safetensors, "
        "tokenizer.json trained on this machine's Python sources) that transformers can load.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama", help="model family")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden size / heads")
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--shards", type=int, default=1, help="number of safetensors files (>1 writes an index)")
    p.add_argument("--tie-word-embeddings", action="store_true", help="share lm_head with the embeddings")
    p.add_argument(
        "--llama3-rope-scaling", action="store_true",
        help="add Llama-3.1 rope_scaling (factor 8, original context = max positions / 8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint; return 0, or 2 after logging the error for bad options."""
    rope_scaling = None
    if args.llama3_rope_scaling:
        if args.arch != "llama":
            logger.error("--llama3-rope-scaling is only for --arch llama")
            return 2
        rope_scaling = llama3_rope_scaling(max(args.max_position_embeddings // 8, 1))
    try:
        path = make_tiny_model(
            args.out_dir,
            args.arch,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            intermediate_size=args.intermediate_size,
            vocab_size=args.vocab_size,
            max_position_embeddings=args.max_position_embeddings,
            tie_word_embeddings=args.tie_word_embeddings,
            rope_scaling=rope_scaling,
            num_shards=args.shards,
            dtype=args.dtype,
            seed=args.seed,
        )
    except ValueError as exc:
        logger.error("make-tiny-model: %s", exc)
        return 2
    logger.info("tiny %s checkpoint ready at %s", args.arch, path)
    return 0
