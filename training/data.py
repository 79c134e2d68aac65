"""Training text as one token stream, and random fixed-length windows over it.

    collect_text_files(path)         a file, or every .py/.txt file under a directory (sorted)
    tokenize_files(files, tokenizer) -> (N,) int64: each file encoded with the checkpoint's own
                                     framing (BOS where the tokenizer adds it), then one EOS
    WindowSampler(tokens, seq_len, batch_size, seed).next() -> (B, seq_len + 1) int64

Windows start anywhere (they may straddle a file boundary, as pretraining streams do); the sampler's
generator state is part of a training checkpoint, so a resumed run draws the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TEXT_SUFFIXES: tuple[str, ...] = (".py", ".txt")


def collect_text_files(path: str | Path) -> list[Path]:
    """`[path]` for a file; every *.py / *.txt below a directory, in sorted order.

    Raises ValueError if `path` does not exist or a directory holds no such file.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"--data {p} does not exist (give a text file or a directory of .py/.txt files)")
    files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
    if not files:
        raise ValueError(f"--data directory {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
    return files


def _eos_id(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_token is not None:
        eos = tokenizer.token_to_id(tokenizer.eos_token)
        if eos is not None:
            return eos
    if not tokenizer.eos_token_ids:
        raise ValueError("the tokenizer has no EOS token to separate documents with")
    return min(tokenizer.eos_token_ids)


def tokenize_files(files: Sequence[Path], tokenizer: Tokenizer) -> Tensor:
    """Concatenate the files' tokens into one (N,) int64 tensor, each file followed by EOS.

    Unreadable bytes decode as U+FFFD; unreadable files are skipped with a warning.
    Raises ValueError if nothing could be read.
    """
    eos = _eos_id(tokenizer)
    parts: list[Tensor] = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            logger.warning("skipping %s: %s", f, exc)
            continue
        if text.strip():
            parts.append(torch.tensor([*tokenizer.encode(text), eos], dtype=torch.int64))
    if not parts:
        raise ValueError(f"no text in {len(files)} data file(s)")
    tokens = torch.cat(parts)
    logger.info("tokenized %d files: %d tokens", len(parts), tokens.numel())
    return tokens


class WindowSampler:
    """Random (batch_size, seq_len + 1) windows of a token stream: inputs are [:, :-1], targets [:, 1:].

    Deterministic in `seed`; `state()`/`load_state()` save and restore the position in the draw.
    Raises ValueError if the stream is shorter than one window.
    """

    def __init__(self, tokens: Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"the data holds {tokens.numel()} tokens, fewer than one window of "
                             f"--seq-len {seq_len} + 1; give more text or a shorter --seq-len")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Tensor:
        """(batch_size, seq_len + 1) int64."""
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.seq_len + 1)
        return self.tokens[starts[:, None] + offsets[None, :]]

    def state(self) -> Tensor:
        return self.generator.get_state()

    def load_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


def eval_windows(tokens: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Consecutive, non-overlapping (W, seq_len + 1) windows from the start of `tokens` (held-out
    evaluation: every token is a target once). Raises ValueError if not even one window fits."""
    n = (tokens.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"{tokens.numel()} tokens hold no evaluation window of {seq_len} + 1")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return tokens[idx]
