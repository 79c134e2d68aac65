"""What an engine says about a request: finish reasons, per-token logprobs, per-step deltas.

Torch-free: the gateway and the proto conversions (server.protoconv) use these types too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from collections.abc import Sequence as Seq
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


@dataclass(slots=True)
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
    # Read-only, as is sibling_tokens: a plain decode's output shares one empty tuple (NONE) for both.
    new_logprobs: Seq[TokenLogprob] = field(default_factory=list)
    seq: Sequence | None = None
    spec: SpecMetrics | None = None  # the request's speculation so far (engines that speculate)
    index: int = 0  # which of the request's n choices (parallel sampling)
    # The first output of choice 0 only, when asked for: prompt tokens 1.. under the model.
    prompt_logprobs: list[TokenLogprob] | None = None
    # A prefill-only sequence of n > 1 choices: the first tokens of choices 1..n-1 (token, logprobs),
    # sampled in the same step as its own; the decode side forks those choices.
    sibling_tokens: Seq[tuple[int, list[TokenLogprob]]] = field(default_factory=list)
    # What ended it with FinishReason.STOP: the stop string (text) or the EOS / stop token id.
    stop_reason: str | int | None = None


@dataclass
class StepOutput:
    """What one engine step gave its requests, as the engine loop delivers it.

    outputs: a RequestOutput for each choice whose step was more than a plain decode (a first token,
        a finish, logprobs, speculation, forks, text made inline).
    seqs, tokens, num_output_tokens: the plain decodes, in step order: seqs[i] gained the one token
        tokens[i], its num_output_tokens[i]-th output, and nothing else happened to it. Their
        RequestOutputs are made where they are delivered (`plain_output`: the text maker, after the step), not on
        the engine thread; only fields fixed since admission are read from the sequence then.
    """

    outputs: list[RequestOutput] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)

    def all(self) -> list[RequestOutput]:
        """Every output: `outputs`, then the plain decodes' (made now)."""
        rows = zip(self.seqs, self.tokens, self.num_output_tokens, strict=True)
        return self.outputs + [plain_output(seq, token, count, "") for seq, token, count in rows]

    @property
    def num_tokens(self) -> int:
        """Tokens the step's requests gained."""
        return len(self.tokens) + sum(len(out.new_token_ids) for out in self.outputs)


NONE: tuple[()] = ()  # a plain decode's logprobs and sibling tokens: one shared empty, not two lists per row


def plain_output(seq: Sequence, token: int, num_output_tokens: int, text: str,
                 new: Callable[..., RequestOutput] = RequestOutput) -> RequestOutput:
    """A plain decode's output: `seq` gained `token`, its `num_output_tokens`-th, and nothing else
    happened to it. Only fields fixed since admission are read from `seq`. Every field positional: a
    keyword call to the 15-field __init__ costs ~1.6x as much (per row of every step). `new`: the class,
    or its fast constructor (kernels.fast_new: the same object, without running __init__, ~2x cheaper)."""
    return new(seq.request_id, [token], text, False, None, len(seq.prompt_token_ids), num_output_tokens,
               seq.num_cached_tokens, NONE, seq, None, seq.index, None, NONE, None)


class EngineDied(RuntimeError):
    """The engine thread of this worker is dead (it raised, or a step stopped making progress)."""


class RequestGone(RuntimeError):
    """A request was aborted or failed before it finished (its RPC is usually gone already)."""


class DuplicateRequest(ValueError):
    """A request id that is already live on this worker (ids are minted by the gateway, never reused)."""
