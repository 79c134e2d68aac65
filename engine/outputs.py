"""What an engine says about a request: finish reasons, per-token logprobs, per-step deltas.

Torch-free: the gateway and the proto conversions (server.protoconv) use these types too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sequence import Sequence
    from engine.spec.metrics import SpecMetrics


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_tokens or the context limit
    STOP = "stop"  # EOS, a stop token or a stop string
    ABORT = "abort"  # cancelled


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # 1 = the most likely token; set for prompt logprobs


@dataclass
class RequestOutput:
    """What one request gained in one step (a delta), and its state."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    seq: Sequence | None = None
    spec: SpecMetrics | None = None  # the request's speculation so far (engines that speculate)
    index: int = 0  # which of the request's n choices (parallel sampling)
    # The first output of choice 0 only, when asked for: prompt tokens 1.. under the model.
    prompt_logprobs: list[TokenLogprob] | None = None
    # A prefill-only sequence of n > 1 choices: the first tokens of choices 1..n-1 (token, logprobs),
    # sampled in the same step as its own; the decode side forks those choices.
    sibling_tokens: list[tuple[int, list[TokenLogprob]]] = field(default_factory=list)
    # What ended it with FinishReason.STOP: the stop string (text) or the EOS / stop token id.
    stop_reason: str | int | None = None


class EngineDied(RuntimeError):
    """The engine thread of this worker is dead (it raised, or a step stopped making progress)."""


class RequestGone(RuntimeError):
    """A request was aborted or failed before it finished (its RPC is usually gone already)."""


class DuplicateRequest(ValueError):
    """A request id that is already live on this worker (ids are minted by the gateway, never reused)."""
