"""The requests a benchmark sends: synthetic token-id prompts with lognormal lengths, or a JSONL file.

Output lengths are exact: every request sets `ignore_eos` and `max_tokens`, so each system produces
the same number of tokens whatever its model says. Arrivals are a Poisson process (exponential gaps
with mean 1/rate) or all at once (rate = inf).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    """One request. Exactly one of `prompt` (text) and `prompt_token_ids` is set."""

    max_tokens: int
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("set exactly one of prompt and prompt_token_ids")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class LengthSpec:
    """Lognormal lengths with the given mean; sigma is the log-space spread (0: every length = mean)."""

    mean: int
    sigma: float = 0.5
    maximum: int = 1 << 20

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.mean < 1:
            raise ValueError(f"a mean length must be >= 1, got {self.mean}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        mu = math.log(self.mean) - self.sigma**2 / 2  # so that E[length] = mean
        raw = rng.lognormal(mu, self.sigma, n) if self.sigma > 0 else np.full(n, float(self.mean))
        return np.clip(np.rint(raw), 1, self.maximum).astype(np.int64)


def synthetic(n: int, prompt_len: LengthSpec, output_len: LengthSpec, vocab_size: int, *, seed: int = 0,
              max_model_len: int | None = None) -> list[BenchRequest]:
    """`n` requests of random token ids in [0, vocab_size); prompt + output fit `max_model_len`."""
    if n < 1 or vocab_size < 2:
        raise ValueError(f"need n >= 1 and vocab_size >= 2, got {n}, {vocab_size}")
    rng = np.random.default_rng(seed)
    ins, outs = prompt_len.sample(rng, n), output_len.sample(rng, n)
    reqs = []
    for p, o in zip(ins.tolist(), outs.tolist(), strict=True):
        if max_model_len is not None:
            p = min(p, max_model_len - 1)
            o = max(1, min(o, max_model_len - p))
        reqs.append(BenchRequest(max_tokens=o, prompt_token_ids=tuple(rng.integers(0, vocab_size, p).tolist())))
    return reqs


def from_jsonl(path: str | Path, n: int, output_len: LengthSpec, *, seed: int = 0) -> list[BenchRequest]:
    """The first `n` lines of a JSONL file (cycled if it has fewer), each `{"prompt": str}` or
    `{"prompt_token_ids": [int]}`, with an optional `"max_tokens"` (else drawn from `output_len`).
    Raises ValueError naming the line for anything else."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or
                                             isinstance(row.get("prompt_token_ids"), list)):
            raise ValueError(f'{path}:{i}: expected {{"prompt": str}} or {{"prompt_token_ids": [int]}}')
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    outs = output_len.sample(np.random.default_rng(seed), n)
    reqs = []
    for k in range(n):
        row = rows[k % len(rows)]
        max_tokens = int(row.get("max_tokens") or outs[k])
        ids = row.get("prompt_token_ids")
        reqs.append(BenchRequest(max_tokens=max_tokens, prompt=row.get("prompt") if ids is None else None,
                                 prompt_token_ids=tuple(ids) if ids is not None else None))
    return reqs


def arrival_offsets(n: int, rate: float, *, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of `n` requests is sent: Poisson at `rate` req/s,
    or all at 0 when rate is inf."""
    if rate <= 0:
        raise ValueError(f"the request rate must be > 0 (inf: all at once), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()
