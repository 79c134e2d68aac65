"""One request's progress inside an engine, as counters.

    token_ids:  [ prompt ........................ | output ...... ]
                 <------ num_computed_tokens ------>                  KV written to the cache
                 <---------------------- num_tokens ------------->
    next step computes token_ids[num_computed_tokens : num_tokens] (possibly a chunk of it) and, when
    that reaches num_tokens, samples one more token.

Chunked prefill, prefix-cache hits (num_computed_tokens jumps), preemption (num_computed_tokens back
to 0) and the prefill -> decode hand-off (arrives with num_computed_tokens = prompt length) are all
arithmetic on these two numbers.

Parallel sampling (n > 1): one request's choices are sibling sequences with the same request_id and
their own `index`. Choice 0 is created with the request and carries `pending_forks` = n - 1 until
its prompt is computed: the step that samples its first token samples n rows (choice j with
`params.for_choice(j)`), and the engine forks choices 1..n-1 from it, sharing its prompt blocks
(`BlockManager.fork`; a shared partial block is copied when a sibling first writes into it).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import FinishReason
from engine.sampling.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at first admission (reported in usage)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    table_version: int = 0  # the BlockManager bumps it whenever block_table changes (engine.input_batch)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    prefill_only: bool = False  # finish after the first sampled token, keeping the blocks
    index: int = 0  # which of the request's n choices this is
    pending_forks: int = 0  # choices still to fork from this one when its first token is sampled
    priority: int = 0  # lower runs first (the scheduler's waiting order and preemption)
    prompt_logprobs: list[Any] = field(default_factory=list)  # TokenLogprob of prompt tokens 1.. so far
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # params.bad_words as token ids (sampling.bad_words)
    # speculative decoding (engine.spec): verification steps, draft tokens proposed, of those accepted
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    logprobs: list[Any] = field(default_factory=list)
    detokenizer: Any = None  # engine.detokenizer.IncrementalDetokenizer, when text is wanted
    grammar: Any = None  # engine.structured.matcher.GrammarState of a constrained request (params.structured)
    extra: dict[str, Any] = field(default_factory=dict)
    # What a decode checks before `check_stop` (from the fixed params): only a token in `stop_ids`, or
    # reaching `length_limit` tokens, can end the sequence at a token.
    stop_ids: frozenset[int] = field(init=False, repr=False)
    length_limit: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        p = self.params
        self.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        self.length_limit = min(len(self.prompt_token_ids) + p.max_tokens, self.max_model_len)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_sample_rows(self) -> int:
        """Logit rows this sequence samples when it samples without drafts: one per choice it forks."""
        return 1 + self.pending_forks

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prefill must compute prompt logprobs (asked for, and no token was sampled yet)."""
        return self.params.prompt_logprobs is not None and self.num_output_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids.append(token_id)

    def fill_token(self, index: int, token_id: int) -> None:
        """Write a sampled token into its placeholder (engine.overlap) at token_ids[index]."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids[index] = token_id

    def check_stop(self, token_id: int, pending: int = 0) -> FinishReason | None:
        """Token-level stop conditions after `token_id` was appended (stop strings: the detokenizer);
        `pending`: placeholders of later steps after it, not counted."""
        num_tokens = len(self.token_ids) - pending
        if token_id in self.stop_ids and num_tokens - len(self.prompt_token_ids) >= self.params.min_tokens:
            self.stop_reason = token_id  # EOS (unless ignore_eos) or a stop token id
            return FinishReason.STOP
        if num_tokens >= self.length_limit:  # max_tokens or the context limit
            return FinishReason.LENGTH
        return None
