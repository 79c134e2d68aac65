"""Per-request sampling options, validated once at the door.

`SamplingParams` is frozen and checks every field in `__post_init__`. A bad value raises `ValueError`
whose message names the field, the value and the allowed range; the gateway forwards that text as
the details of a gRPC INVALID_ARGUMENT, so it is written for a person. The limits are module
constants so the gateway can validate (and document) the same bounds without building the object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256  # characters per stop string
MAX_LOGPROBS = 20  # top alternatives returned per token
MAX_SEED = 2**63  # exclusive: seeds are non-negative signed 64-bit integers
MIN_PENALTY, MAX_PENALTY = -2.0, 2.0  # presence and frequency penalties (OpenAI range)
# Below this a temperature is treated as greedy: the scaled logits would overflow float32, and the
# distribution is already one-hot up to exact ties.
GREEDY_TEMPERATURE_EPS = 1e-5


def _number(name: str, value: object) -> float:
    """`value` as a finite float; bools, strings, NaN and infinities are rejected."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _stop_strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(value)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for s in value:
        if not isinstance(s, str):
            raise ValueError(f"stop strings must be strings, got {s!r}")
        if not 1 <= len(s) <= MAX_STOP_LEN:
            raise ValueError(
                f"each stop string must be 1 to {MAX_STOP_LEN} characters long, got {len(s)}: {s[:40]!r}"
            )
    return tuple(value)


def _token_ids(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ValueError(f"{name} must be a list of token ids, got {value!r}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{name} must hold non-negative integer token ids, got {t!r}")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each token of one request, and when to stop.

    temperature: >= 0; 0 (anything below `GREEDY_TEMPERATURE_EPS`) means greedy argmax.
    top_p: nucleus mass in (0, 1]; 1 = off.       top_k: 0 or -1 = off, else >= 1.
    min_p: [0, 1], keeps tokens with prob >= min_p * the top prob; 0 = off.
    repetition_penalty: > 0 (Hugging Face semantics, over prompt and output tokens); 1 = off.
    presence_penalty, frequency_penalty: [-2, 2] (OpenAI semantics, output tokens only); 0 = off.
    seed: [0, 2**63) or None. A seeded request draws the same tokens whatever shares its batch.
    max_tokens: >= 1 output tokens.  min_tokens: [0, max_tokens]; EOS and stop token ids are
        banned until this many tokens exist (EOS is not banned when ignore_eos is set).
    stop: up to MAX_STOP_STRINGS strings of 1..MAX_STOP_LEN characters; a str or a list is
        normalised to a tuple. stop_token_ids: token ids that end the request (kept in the output).
    ignore_eos: keep generating past EOS (the engine's stop check honours it; the sampler does not
        ban EOS).
    logprobs: None = off; 0..MAX_LOGPROBS = return the chosen token's logprob and that many top
        alternatives.
    skip_special_tokens: drop special tokens from the detokenized text.

    Raises ValueError naming the field, the value and the allowed range.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    if TYPE_CHECKING:
        # What type checkers see: construction takes a str or any sequence for stop and
        # stop_token_ids (the generated __init__ does at run time); the fields are tuples after.
        def __init__(
            self,
            *,
            temperature: float = 1.0,
            top_p: float = 1.0,
            top_k: int = 0,
            min_p: float = 0.0,
            repetition_penalty: float = 1.0,
            presence_penalty: float = 0.0,
            frequency_penalty: float = 0.0,
            seed: int | None = None,
            max_tokens: int = 16,
            min_tokens: int = 0,
            stop: str | Sequence[str] = (),
            stop_token_ids: Sequence[int] = (),
            ignore_eos: bool = False,
            logprobs: int | None = None,
            skip_special_tokens: bool = True,
        ) -> None: ...

    def __post_init__(self) -> None:
        # Frozen: normalised values are written back with object.__setattr__.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        t = _number("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t!r}")
        put("temperature", t)

        p = _number("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        put("top_p", p)

        k = _integer("top_k", self.top_k)
        if k < -1:
            raise ValueError(f"top_k must be 0 or -1 (off) or >= 1, got {k!r}")
        put("top_k", 0 if k == -1 else k)

        m = _number("min_p", self.min_p)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {m!r}")
        put("min_p", m)

        r = _number("repetition_penalty", self.repetition_penalty)
        if r <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {r!r}")
        put("repetition_penalty", r)

        for name in ("presence_penalty", "frequency_penalty"):
            v = _number(name, getattr(self, name))
            if not MIN_PENALTY <= v <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (0 = off), got {v!r}")
            put(name, v)

        if self.seed is not None:
            s = _integer("seed", self.seed)
            if not 0 <= s < MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63), got {s!r}")

        n = _integer("max_tokens", self.max_tokens)
        if n < 1:
            raise ValueError(f"max_tokens must be >= 1, got {n!r}")
        mn = _integer("min_tokens", self.min_tokens)
        if not 0 <= mn <= n:
            raise ValueError(f"min_tokens must be in [0, max_tokens={n}], got {mn!r}")

        put("stop", _stop_strings(self.stop))
        put("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        _flag("ignore_eos", self.ignore_eos)
        _flag("skip_special_tokens", self.skip_special_tokens)

        if self.logprobs is not None:
            lp = _integer("logprobs", self.logprobs)
            if not 0 <= lp <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] or unset, got {lp!r}")

    @property
    def greedy(self) -> bool:
        """Argmax instead of a draw (temperature 0, or below `GREEDY_TEMPERATURE_EPS`)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def needs_penalties(self) -> bool:
        """Some penalty is active, so the sampler builds token-count tensors for this row."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_history(self) -> bool:
        """The sampler reads this row's prompt token ids (the repetition penalty counts them).

        When False, `SamplingBatch.build` ignores the row's prompt ids, so a worker that no longer
        holds the prompt may pass an empty sequence. Output ids are always needed: their count
        drives min_tokens and the seeded draw, their contents the presence/frequency penalties.
        """
        return self.repetition_penalty != 1.0
