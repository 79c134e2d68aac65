"""The training loop shared by `train_lm` (next-token cross-entropy) and `distill` (KL to a teacher).

One run writes into its output directory:

    _train_state.pt      model + AdamW state + step + RNG and sampler state + per-step losses + the
                         run's settings; rewritten (atomically) every `save_every` steps and at the end
    config.json, model.safetensors, tokenizer files    the model as a Hugging Face checkpoint, same times

`resume=True` reloads `_train_state.pt` and continues from its step to `steps`: the batches drawn, the
learning rate and the losses are those the uninterrupted run would have had. AdamW with linear warmup
and cosine decay to `min_lr_ratio * lr`, gradient clipping, optional bfloat16 autocast (faster on CPUs
with AVX-512 BF16 or AMX; master weights stay float32).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from training.config import TrainConfig
from training.data import WindowSampler
from training.model import TrainableLM, save_hf_checkpoint

logger = logging.getLogger(__name__)

STATE_FILE = "_train_state.pt"
# Settings a resumed run may change; any other difference from the saved run is an error.
_RESUMABLE_CHANGES = frozenset({"steps", "save_every", "save_dtype"})

LossFn = Callable[[TrainableLM, Tensor], Tensor]  # (model, batch (B, L+1)) -> scalar loss


@dataclass(frozen=True)
class TrainResult:
    """What a run did: `losses[i]` is the training loss of step i (from step 0, across resumes)."""

    out_dir: Path
    step: int
    losses: list[float]
    seconds: float  # wall time of this call's steps (not of earlier, resumed-from calls)
    tokens_per_second: float


def _optimizer(model: TrainableLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or the embedding table)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _settings(kind: str, cfg: TrainConfig, model: TrainableLM, sampler: WindowSampler) -> dict[str, Any]:
    """What must not change across a resume (bar `_RESUMABLE_CHANGES`); the data by its size and sum."""
    tokens = sampler.tokens
    data = f"{tokens.numel()} tokens, sum {int(tokens.sum())}"
    return {"kind": kind, **dataclasses.asdict(cfg), "model_config": model.hf_config, "data": data}


def _check_resume(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Raise ValueError naming every setting that differs from the saved run (except the resumable)."""
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items()
             if k not in _RESUMABLE_CHANGES and saved.get(k) != v]
    if diffs:
        raise ValueError(f"cannot resume {path}: the run's settings differ ({'; '.join(diffs)}); "
                         "resume with the original options or start a new --out")


def saved_settings(out_dir: str | Path) -> dict[str, Any] | None:
    """The settings of the run saved in `out_dir` (TrainConfig fields, "kind", "model_config", "data"),
    or None when there is none. Raises ValueError for an unreadable state file."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a torn or foreign file
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return dict(state["settings"])


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous state intact


def run_training(
    kind: str,
    model: TrainableLM,
    loss_fn: LossFn,
    sampler: WindowSampler,
    cfg: TrainConfig,
    out_dir: str | Path,
    tokenizer_src_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` in place for `cfg.steps` optimiser steps in all, checkpointing into `out_dir`.

    `stop_after` ends this call after that many steps (checkpointed) without changing the schedule,
    which is laid out over `cfg.steps`; a later `resume=True` call carries on. Changing `steps` on resume
    is allowed (to extend a run) but re-lays the cosine decay from there on.

    `kind` names the run ("train" or "distill") and must match on resume. Without `resume`, `out_dir`
    must not already hold a `_train_state.pt` (ValueError, so a run is never overwritten by accident);
    with it, the state must exist and its settings and model config match `cfg`/`model` except for
    `steps`, `save_every` and `save_dtype` (ValueError otherwise). The model is left in eval mode, its
    final weights also written as a Hugging Face checkpoint (tokenizer copied from `tokenizer_src_dir`).
    """
    out = Path(out_dir)
    state_path = out / STATE_FILE
    settings = _settings(kind, cfg, model, sampler)
    optimizer = _optimizer(model, cfg)
    step, losses = 0, []
    if resume:
        if not state_path.is_file():
            raise ValueError(f"--resume: {state_path} does not exist (nothing to resume; drop --resume)")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        _check_resume(state["settings"], settings, state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state(state["sampler"])
        torch.set_rng_state(state["rng"])
        step, losses = int(state["step"]), list(state["losses"])
        logger.info("resuming %s run in %s at step %d of %d", kind, out, step, cfg.steps)
    elif state_path.is_file():
        raise ValueError(f"{out} already holds a training run ({STATE_FILE}); pass --resume to continue "
                         "it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        _save_state(state_path, {
            "settings": settings, "step": step, "losses": losses, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "sampler": sampler.state(), "rng": torch.get_rng_state(),
        })
        save_hf_checkpoint(model, out, tokenizer_src_dir, dtype=cfg.save_dtype)

    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be a positive integer, got {stop_after}")
    first, started = step, time.perf_counter()
    last = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=kind, unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        while step < last:
            lr = cfg.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler.next()  # (B, L + 1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
            if step % cfg.save_every == 0 or step == last:
                checkpoint()
                logger.info("%s step %d/%d: loss %.4f (mean of last %d: %.4f)", kind, step, cfg.steps,
                            losses[-1], min(cfg.save_every, len(losses)),
                            sum(losses[-cfg.save_every:]) / min(cfg.save_every, len(losses)))
    finally:
        bar.close()
    if step == first:  # nothing left to do (resumed at the end): still leave a checkpoint behind
        checkpoint()
    model.eval()
    seconds = time.perf_counter() - started
    tokens = (step - first) * cfg.batch_size * cfg.seq_len
    return TrainResult(out, step, losses, seconds, tokens / seconds if seconds > 0 else 0.0)
