"""Draft checkpoints for speculative-decoding tests, derived from a target checkpoint.

A random tiny target has no natural small sibling, so a draft is the target itself, optionally with
its last layers dropped and Gaussian noise added to every weight (relative to that weight's std):
the tokenizer and vocabulary are the target's by construction, and the noise sets how often the
draft agrees with the target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def make_draft(target: Path, out: Path, *, drop_layers: int = 0, noise: float = 0.0, seed: int = 0) -> Path:
    """Write a draft of `target` to `out` and return it (a single-file safetensors target)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in target.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    cfg = json.loads((target / "config.json").read_text())
    keep = cfg["num_hidden_layers"] - drop_layers
    cfg["num_hidden_layers"] = keep
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, w in load_file(target / "model.safetensors").items():
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= keep:
            continue
        if noise > 0 and w.numel() > 1:
            w = w + torch.randn(w.shape, generator=g, dtype=w.dtype) * w.float().std().to(w.dtype) * noise
        weights[name] = w.contiguous()
    save_file(weights, out / "model.safetensors")
    return out
