"""`tandem distill --teacher DIR --out DIR --data PATH`: distill a smaller draft model from a teacher."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from cli.train import add_train_options, apply_threads, log_result, resume_settings, train_config
from engine.options import add_options
from training.config import StudentShape

logger = logging.getLogger(__name__)

# --option -> the student config.json key a resumed run reads it back from
_SHAPE_KEYS: dict[str, str] = {
    "layers": "num_hidden_layers", "hidden_size": "hidden_size", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `distill` parser; its `func` is `run`."""
    p = subparsers.add_parser(
        "distill", help="train a small draft model on a teacher's output distribution",
        description="Distill --teacher into a student (default: the teacher's shape with a quarter of "
        "its layers, started from the teacher's embeddings and first layers) by forward KL on the "
        "logits at --temperature, over --data tokenized with the teacher's tokenizer. Writes a Hugging "
        "Face checkpoint with the teacher's tokenizer, usable as a speculative-decoding draft.",
    )
    p.add_argument("--teacher", required=True, help="the teacher's checkpoint directory")
    add_options(p.add_argument_group("student shape"), StudentShape)
    add_train_options(p)
    p.set_defaults(func=run)


def _shape(args: argparse.Namespace, saved: dict[str, Any] | None) -> StudentShape:
    """The given shape options; on --resume, those not given come from the saved student's config."""
    saved_cfg = (saved or {}).get("model_config") or {}
    values = {name: getattr(args, name) if getattr(args, name) is not None else saved_cfg.get(key)
              for name, key in _SHAPE_KEYS.items()}
    return StudentShape(**values)


def run(args: argparse.Namespace) -> int:
    """Distill; return 0, or 2 after logging the error for bad options or unreadable inputs."""
    from engine.checkpoint import CheckpointError
    from training.distill import distill

    try:
        apply_threads(args)
        saved = resume_settings(args)
        result = distill(args.teacher, args.out, args.data, _shape(args, saved), train_config(args, saved),
                         resume=args.resume, stop_after=args.stop_after)
    except (ValueError, CheckpointError) as exc:
        logger.error("distill: %s", exc)
        return 2
    log_result("distill", result)
    return 0
