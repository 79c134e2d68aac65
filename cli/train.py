"""`tandem train --model DIR --out DIR --data PATH`: train a language model on text (next-token loss).

Also the optimisation options shared with `tandem distill` (`add_train_options`, `train_config`): each
defaults to None so that `--resume` can fill the ones not given from the saved run.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from engine.options import add_options
from training.config import TrainConfig

if TYPE_CHECKING:
    from training.loop import TrainResult

logger = logging.getLogger(__name__)


def add_train_options(p: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """The options that build a TrainConfig (unset ones stay out of the namespace, so --resume can
    fill them from the saved run), plus --data, --out, --threads, --stop-after and --resume."""
    p.add_argument("--data", required=True, help="a text file, or a directory of .py/.txt files")
    p.add_argument("--out", required=True, help="output directory (checkpoint + _train_state.pt)")
    add_options(p, TrainConfig, passthrough=True, exclude=exclude)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this call after N steps (the schedule still spans --steps); --resume carries on")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out; options not given are taken from it")


def train_config(args: argparse.Namespace, saved: dict[str, Any] | None) -> TrainConfig:
    """A TrainConfig from the given options, else the saved run's values, else the defaults.

    Raises ValueError for invalid values (TrainConfig's own checks).
    """
    saved = saved or {}
    values = {n: getattr(args, n) if hasattr(args, n) else saved[n] for n in TrainConfig.__dataclass_fields__
              if hasattr(args, n) or n in saved}
    return TrainConfig(**values)


def resume_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The saved run's settings when --resume is given (ValueError if there is none), else None."""
    from training.loop import saved_settings

    if not args.resume:
        return None
    saved = saved_settings(args.out)
    if saved is None:
        raise ValueError(f"--resume: no saved run in {args.out} (drop --resume to start one)")
    return saved


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def log_result(name: str, result: TrainResult) -> None:
    tail = result.losses[-min(20, len(result.losses)):]
    logger.info("%s: step %d, loss %.4f (mean of the last %d steps), %.0f tokens/s; checkpoint in %s",
                name, result.step, sum(tail) / max(len(tail), 1), len(tail), result.tokens_per_second,
                result.out_dir)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `train` parser; its `func` is `run`."""
    p = subparsers.add_parser(
        "train", help="train a language model on text (next-token cross-entropy)",
        description="Train the checkpoint in --model (its config and tokenizer; weights re-initialised "
        "unless --keep-weights) on --data and write it to --out, with resumable checkpoints.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory: config.json + tokenizer")
    p.add_argument("--keep-weights", action="store_true", help="start from --model's weights (fine-tune)")
    add_train_options(p, exclude=("temperature",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; return 0, or 2 after logging the error for bad options or unreadable inputs."""
    from engine.checkpoint import CheckpointError, load_hf_config
    from training.distill import load_tokens, train_lm
    from training.model import TrainableLM

    try:
        apply_threads(args)
        config = train_config(args, resume_settings(args))
        if args.keep_weights:
            model = TrainableLM.from_pretrained(args.model)
        else:
            model = TrainableLM(load_hf_config(args.model))
            model.init_weights(config.seed)
        tokens = load_tokens(args.data, args.model)
        result = train_lm(model, args.out, tokens, config, tokenizer_src_dir=args.model, resume=args.resume,
                          stop_after=args.stop_after)
    except (ValueError, CheckpointError) as exc:
        logger.error("train: %s", exc)
        return 2
    log_result("train", result)
    return 0
