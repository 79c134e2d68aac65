"""Per-request sampling options, validated once at the door.

`SamplingParams` is frozen and checks every field in `__post_init__`. A bad value raises `ValueError`
whose message names the field, the value and the allowed range; the gateway forwards that text as
the details of a gRPC INVALID_ARGUMENT, so it is written for a person. The limits are module
constants so the gateway can validate (and document) the same bounds without building the object.
Checks that need the model's vocabulary (token ids in logit_bias and allowed_token_ids) are
`check_vocab`, which the gateway and the engine both call with their bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.sampling.checks import flag, integer, logit_bias, number, strings, token_ids
from engine.sampling.seeds import sibling_seed
from engine.structured.spec import StructuredOutput

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256  # characters per stop string (and per bad word)
MAX_LOGPROBS = 20  # top alternatives returned per token (sampled or prompt)
MAX_SEED = 2**63  # exclusive: seeds are non-negative signed 64-bit integers
MIN_PENALTY, MAX_PENALTY = -2.0, 2.0  # presence and frequency penalties (OpenAI range)
MAX_N = 128  # choices per request (parallel sampling)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it
MAX_ALLOWED_TOKEN_IDS = 16384
MAX_BAD_WORDS = 64
# Below this a temperature is treated as greedy: the scaled logits would overflow float32, and the
# distribution is already one-hot up to exact ties.
GREEDY_TEMPERATURE_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each token of one request, and when to stop.

    temperature: >= 0; 0 (anything below `GREEDY_TEMPERATURE_EPS`) means greedy argmax.
    top_p: nucleus mass in (0, 1]; 1 = off.       top_k: 0 or -1 = off, else >= 1.
    min_p: [0, 1], keeps tokens with prob >= min_p * the top prob; 0 = off.
    repetition_penalty: > 0 (Hugging Face semantics, over prompt and output tokens); 1 = off.
    presence_penalty, frequency_penalty: [-2, 2] (OpenAI semantics, output tokens only); 0 = off.
    seed: [0, 2**63) or None. A seeded request draws the same tokens whatever shares its batch;
        choice i of n draws with `sibling_seed(seed, i)` (engine.sampling.seeds).
    max_tokens: >= 1 output tokens.  min_tokens: [0, max_tokens]; EOS and stop token ids are
        banned until this many tokens exist (EOS is not banned when ignore_eos is set).
    stop: up to MAX_STOP_STRINGS strings of 1..MAX_STOP_LEN characters; a str or a list is
        normalised to a tuple. stop_token_ids: token ids that end the request (kept in the output).
    include_stop_str_in_output: keep the stop string that matched at the end of the text.
    ignore_eos: keep generating past EOS (the engine's stop check honours it; the sampler does not
        ban EOS).
    logprobs: None = off; 0..MAX_LOGPROBS = return the chosen token's logprob and that many top
        alternatives.
    prompt_logprobs: None = off; 0..MAX_LOGPROBS = every prompt token after the first gets its
        logprob (and rank) under the model, with that many top alternatives, computed in the prefill
        (a request that asks for them skips the prefix cache).
    n: 1..MAX_N choices: sibling sequences that share the prompt's KV (one prefill).
    logit_bias: {token id: bias in [-100, 100]} added to the logits (a dict, or (id, bias) pairs;
        normalised to sorted pairs); at most MAX_LOGIT_BIAS entries.
    allowed_token_ids: None = all; else only these ids may be sampled (non-empty).
    bad_words: strings never to generate: a word's last token is banned when the output ends with
        its other tokens (each word is tokenized with and without a leading space).
    skip_special_tokens: drop special tokens from the detokenized text.
    structured: None = free text; else the output is constrained to a JSON Schema, a regex, a grammar,
        a choice or structural tags (engine.structured; the request stops with STOP once the grammar
        is complete, EOS or not).

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
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None

    if TYPE_CHECKING:
        # What type checkers see: construction takes a str or any sequence for stop, stop_token_ids,
        # allowed_token_ids and bad_words, and a mapping for logit_bias (the generated __init__ does at
        # run time); the fields are tuples after.
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
            include_stop_str_in_output: bool = False,
            ignore_eos: bool = False,
            logprobs: int | None = None,
            prompt_logprobs: int | None = None,
            n: int = 1,
            logit_bias: Mapping[int, float] | Mapping[str, float] | Sequence[tuple[int, float]] = (),
            allowed_token_ids: Sequence[int] | None = None,
            bad_words: str | Sequence[str] = (),
            skip_special_tokens: bool = True,
            structured: StructuredOutput | None = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        # Frozen: normalised values are written back with object.__setattr__.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        t = number("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t!r}")
        put("temperature", t)

        p = number("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        put("top_p", p)

        k = integer("top_k", self.top_k)
        if k < -1:
            raise ValueError(f"top_k must be 0 or -1 (off) or >= 1, got {k!r}")
        put("top_k", 0 if k == -1 else k)

        m = number("min_p", self.min_p)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {m!r}")
        put("min_p", m)

        r = number("repetition_penalty", self.repetition_penalty)
        if r <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {r!r}")
        put("repetition_penalty", r)

        for name in ("presence_penalty", "frequency_penalty"):
            v = number(name, getattr(self, name))
            if not MIN_PENALTY <= v <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (0 = off), got {v!r}")
            put(name, v)

        if self.seed is not None:
            s = integer("seed", self.seed)
            if not 0 <= s < MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63), got {s!r}")

        n = integer("max_tokens", self.max_tokens)
        if n < 1:
            raise ValueError(f"max_tokens must be >= 1, got {n!r}")
        mn = integer("min_tokens", self.min_tokens)
        if not 0 <= mn <= n:
            raise ValueError(f"min_tokens must be in [0, max_tokens={n}], got {mn!r}")

        put("stop", strings("stop", self.stop, MAX_STOP_STRINGS, MAX_STOP_LEN))
        put("stop_token_ids", token_ids("stop_token_ids", self.stop_token_ids))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            flag(name, getattr(self, name))

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= integer(name, value) <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] or unset, got {value!r}")

        choices = integer("n", self.n)
        if not 1 <= choices <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {choices!r}")
        put("logit_bias", logit_bias(self.logit_bias, MAX_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS))
        if self.allowed_token_ids is not None:
            allowed = token_ids("allowed_token_ids", self.allowed_token_ids, MAX_ALLOWED_TOKEN_IDS)
            if not allowed:
                raise ValueError("allowed_token_ids must not be empty (leave it unset to allow every token)")
            put("allowed_token_ids", allowed)
        put("bad_words", strings("bad_words", self.bad_words, MAX_BAD_WORDS, MAX_STOP_LEN))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")

    def check_vocab(self, limit: int) -> None:
        """Raise ValueError when logit_bias or allowed_token_ids name an id outside [0, limit)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]),
                          ("allowed_token_ids", self.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= limit), None)
            if bad is not None:
                raise ValueError(f"{name} names token id {bad}, outside the vocabulary [0, {limit})")

    def for_choice(self, index: int) -> SamplingParams:
        """The options of choice `index` of n: one choice, drawing with `sibling_seed(seed, index)`."""
        if index == 0 and self.n == 1:
            return self
        seed = None if self.seed is None else sibling_seed(self.seed, index)
        return dataclasses.replace(self, n=1, seed=seed)

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
