"""Optimisation settings of `tandem train` and `tandem distill`. Torch-free: the command's flags are
generated from these fields (engine.options)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.options import check_options, option

SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Validated on construction (ValueError naming the option)."""

    steps: int = option(1000, "optimiser steps in all", min=1)
    batch_size: int = option(8, "sequences per step", min=1)
    seq_len: int = option(256, "tokens per sequence", min=1)
    lr: float = option(1e-3, "peak learning rate", above=0)
    min_lr_ratio: float = option(0.1, "final learning rate / peak (cosine decay)", min=0, max=1)
    warmup_steps: int = option(50, "steps of linear warmup", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", min=0)
    grad_clip: float = option(1.0, "gradient norm clip", above=0)
    temperature: float = option(1.0, "softmax temperature of the distillation KL", above=0)
    seed: int = option(0, "seed of the init and the batch order", min=0)
    save_every: int = option(200, "checkpoint period in steps", min=1)
    bf16: bool = option(False, "bfloat16 autocast (faster on CPUs with AVX-512 BF16 / AMX)")
    save_dtype: str = option("float32", "dtype of the written weights", choices=SAVE_DTYPES)

    def __post_init__(self) -> None:
        check_options(self)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based): linear warmup, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class StudentShape:
    """The student's size; None keeps the teacher's value (layers: a quarter of the teacher's, >= 1).

    Changing hidden_size without heads keeps the teacher's head_dim; without intermediate_size,
    keeps the teacher's MLP ratio.
    """

    layers: int | None = option(None, "student decoder layers (default: the teacher's / 4, at least 1)")
    hidden_size: int | None = option(None, "student width (default: the teacher's)")
    heads: int | None = option(None, "attention heads (default: the teacher's, or width / head dim)")
    kv_heads: int | None = option(None, "key/value heads (default: the teacher's)")
    intermediate_size: int | None = option(None, "MLP width (default: the teacher's ratio)")

    def config_for(self, teacher: dict[str, Any]) -> dict[str, Any]:
        """The student's config.json dict: the teacher's with the shape fields replaced.

        Raises ValueError for a non-positive size or sizes that do not fit together.
        """
        for name in ("layers", "hidden_size", "heads", "kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        t_hidden, t_heads = int(teacher["hidden_size"]), int(teacher["num_attention_heads"])
        t_kv = int(teacher.get("num_key_value_heads") or t_heads)
        t_head_dim = int(teacher.get("head_dim") or t_hidden // t_heads)
        hidden = self.hidden_size or t_hidden
        same_width = hidden == t_hidden
        heads = self.heads or (t_heads if same_width else max(hidden // t_head_dim, 1))
        kv_heads = self.kv_heads or (t_kv if heads % t_kv == 0 else heads)
        inter = self.intermediate_size or (int(teacher["intermediate_size"]) if same_width else
                                           round(hidden * int(teacher["intermediate_size"]) / t_hidden))
        layers = self.layers or max(int(teacher["num_hidden_layers"]) // 4, 1)
        keep_head_dim = same_width and heads == t_heads
        head_dim = t_head_dim if keep_head_dim else hidden // heads
        if not keep_head_dim and hidden % heads:
            raise ValueError(f"--hidden-size {hidden} must be divisible by --heads {heads}")
        if heads % kv_heads:
            raise ValueError(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head dim {head_dim} (hidden size / heads) must be even for rotary embeddings")
        cfg = dict(teacher, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, intermediate_size=inter)
        if "head_dim" in teacher or teacher.get("model_type") == "qwen3":
            cfg["head_dim"] = head_dim
        if "max_window_layers" in teacher:
            cfg["max_window_layers"] = layers
        if isinstance(teacher.get("layer_types"), list) and teacher["layer_types"]:
            types = teacher["layer_types"]
            cfg["layer_types"] = [types[min(i, len(types) - 1)] for i in range(layers)]
        return cfg
