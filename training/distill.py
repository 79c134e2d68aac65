"""Teacher training and knowledge distillation into a smaller draft model.

    train_lm(model, out_dir, tokens, config, tokenizer_src_dir)     next-token cross-entropy
    distill(teacher_dir, out_dir, data, shape, config)              forward KL to the teacher's logits

The student of `distill` shares the teacher's tokenizer (its files are copied) and, by default, its
shape with a quarter of the layers; every student tensor whose name and shape match the teacher's
(embeddings, the first layers, the final norm, lm_head) starts as the teacher's copy, the rest random.
The loss is Hinton's: T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over positions.
Both write a Hugging Face checkpoint that the engine loads (as a model, or as a draft beside the teacher).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.tokenizer import Tokenizer
from training.config import StudentShape, TrainConfig
from training.data import WindowSampler, collect_text_files, tokenize_files
from training.loop import LossFn, TrainResult, run_training
from training.model import TrainableLM

logger = logging.getLogger(__name__)


def init_student(teacher: TrainableLM, student_config: dict[str, Any], seed: int) -> TrainableLM:
    """A fresh student: random init (`TrainableLM.init_weights(seed)`), then every tensor whose name
    and shape match the teacher's copied from it. The teacher is not modified."""
    student = TrainableLM(student_config)
    student.init_weights(seed)
    source = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for name, param in student.state_dict().items():
            if name in source and source[name].shape == param.shape:
                param.copy_(source[name])
                copied.append(name)
    logger.info("student: %.2fM parameters, %d of %d tensors copied from the teacher",
                student.num_parameters / 1e6, len(copied), len(student.state_dict()))
    return student


def lm_loss(model: TrainableLM, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) of batch (B, L + 1)."""
    logits = model(batch[:, :-1])  # (B, L, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T, averaged over positions.

    Logits (..., V), any leading shape, same for both; computed in float32.
    """
    t = F.log_softmax(teacher_logits.float().reshape(-1, teacher_logits.shape[-1]) / temperature, dim=-1)
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def kl_loss(teacher: TrainableLM, temperature: float) -> LossFn:
    """The distillation loss of a student on batch (B, L + 1), against the frozen `teacher`."""

    def loss(student: TrainableLM, batch: Tensor) -> Tensor:
        inputs = batch[:, :-1]
        with torch.no_grad():
            target = teacher(inputs)
        return distillation_kl(student(inputs), target, temperature)

    return loss


def load_tokens(data: str | Path | Tensor, model_dir: str | Path) -> Tensor:
    """`data` as a token stream: a tensor is used as is; a path is read with `collect_text_files` and
    tokenized with `model_dir`'s tokenizer. Raises ValueError for a missing path or no text."""
    if isinstance(data, Tensor):
        return data
    return tokenize_files(collect_text_files(data), Tokenizer.from_dir(model_dir))


def _check_tokens(tokens: Tensor, vocab_size: int) -> None:
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(f"the data holds token id {int(tokens.max())}, outside the model's vocabulary "
                         f"of {vocab_size} (was it tokenized with another tokenizer?)")


def train_lm(
    model: TrainableLM,
    out_dir: str | Path,
    tokens: Tensor,
    config: TrainConfig,
    tokenizer_src_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` (in place) on next-token cross-entropy over `tokens` (N,) and write it to `out_dir`
    with `tokenizer_src_dir`'s tokenizer. Raises ValueError as `run_training` does, or for token ids
    outside the vocabulary. `resume` and `stop_after` are `run_training`'s."""
    _check_tokens(tokens, model.cfg.vocab_size)
    sampler = WindowSampler(tokens, config.seq_len, config.batch_size, config.seed)
    logger.info("training %s (%.2fM parameters) for %d steps", model.cfg.architecture,
                model.num_parameters / 1e6, config.steps)
    return run_training("train", model, lm_loss, sampler, config, out_dir, tokenizer_src_dir, resume,
                        stop_after)


def distill(
    teacher_dir: str | Path,
    out_dir: str | Path,
    data: str | Path | Tensor,
    shape: StudentShape | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Distill the checkpoint in `teacher_dir` into a student of `shape`, written to `out_dir`.

    `data` is a text file, a directory of .py/.txt files, or an already tokenized (N,) tensor;
    `resume` and `stop_after` are `run_training`'s.
    Raises CheckpointError for an unreadable teacher, ValueError for bad options, an `out_dir` equal to
    `teacher_dir`, data that does not fit, or a resume that does not match (see `run_training`).
    """
    config = config or TrainConfig()
    if Path(out_dir).resolve() == Path(teacher_dir).resolve():
        raise ValueError(f"--out {out_dir} is the teacher's directory; the student needs its own")
    teacher = TrainableLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    student_cfg = (shape or StudentShape()).config_for(teacher.hf_config)
    tokens = load_tokens(data, teacher_dir)
    _check_tokens(tokens, teacher.cfg.vocab_size)
    student = init_student(teacher, student_cfg, config.seed)
    sampler = WindowSampler(tokens, config.seq_len, config.batch_size, config.seed)
    logger.info("distilling %s (%d layers, %.2fM) into %d layers (%.2fM) for %d steps at T=%g",
                teacher_dir, teacher.cfg.num_layers, teacher.num_parameters / 1e6, student.cfg.num_layers,
                student.num_parameters / 1e6, config.steps, config.temperature)
    loss = kl_loss(teacher, config.temperature)
    return run_training("distill", student, loss, sampler, config, out_dir, teacher_dir, resume, stop_after)
