"""`tandem quantize --model DIR --out DIR --method gptq|awq|rtn --calib PATHS`: calibrated post-training
quantization, written as a compressed-tensors checkpoint that `tandem up --model OUT` serves as is
(training/quantize.py; docs/quantization.md). Rerunning the same command resumes an interrupted run."""

from __future__ import annotations

import argparse
import logging

from engine.options import add_options, from_args
from training.quantize_config import QuantizeConfig

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `quantize` parser; its `func` is `run`."""
    p = subparsers.add_parser(
        "quantize", help="quantize a checkpoint with GPTQ / AWQ calibration (or RTN) into a compressed-tensors one",
        description="Quantize --model's decoder-layer projections to --bits, one layer at a time, calibrated on "
        "--calib text tokenized with the model's tokenizer, and write a compressed-tensors checkpoint to --out. "
        "Progress is saved after every layer: the same command resumes an interrupted run.",
    )
    add_options(p, QuantizeConfig)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--stop-after", type=int, default=None, help="end this call after N layers (rerun to resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Quantize; return 0 when the checkpoint is written or this call stopped as asked, 2 for bad options
    or unreadable inputs (logged)."""
    from engine.checkpoint import CheckpointError

    try:
        config = from_args(QuantizeConfig, args)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        from training.quantize import quantize_checkpoint

        out = quantize_checkpoint(config, stop_after=args.stop_after, progress=not args.no_progress)
    except (ValueError, CheckpointError) as exc:
        logger.error("quantize: %s", exc)
        return 2
    if out is None:
        logger.info("quantize: stopped after %d layers; rerun the same command to resume", args.stop_after)
    else:
        logger.info("quantize: serve it with `tandem up --model %s`", out)
    return 0
