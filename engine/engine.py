"""The engine: a scheduler, a block manager and a model runner stepping together in one process.

`add_request` queues a sequence; each `step()` schedules one batch, runs one forward, samples, applies
stop conditions and returns what every touched request gained. Text (incremental detokenization and
stop strings) is applied here so that every caller (offline API, decode worker) stops the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model_runner import ModelRunner, StepInput
from engine.outputs import FinishReason, RequestOutput, TokenLogprob
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import SamplerOutput
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.spec import SpecDecoder, SpecMetrics
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig, *, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = tokenizer or Tokenizer.from_dir(config.model)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        # one sequence may fill the pool alone, never more
        self.max_model_len = min(self.runner.max_model_len, self.runner.num_blocks * config.block_size)
        self.spec = (SpecDecoder(config, self.runner, self.block_manager, self.max_model_len)
                     if config.speculative else None)
        self.num_computed_tokens_total = 0

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: its embedding and lm_head rows (may exceed the tokenizer's)."""
        return self.runner.model_config.vocab_size

    @property
    def token_id_limit(self) -> int:
        """One past the largest prompt token id accepted (`Tokenizer.token_id_limit`)."""
        return self.tokenizer.token_id_limit(self.vocab_size)

    # --------------------------------------------------------------- requests
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when a request can never run here: an empty prompt, an id outside
        [0, token_id_limit) or without an embedding row, no room left to generate."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        limit = self.token_id_limit
        bad = next((t for t in prompt_token_ids if not 0 <= t < limit), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {limit})")
        if limit > self.vocab_size:  # a tokenizer larger than the model: its last ids have no embedding row
            bad = next((t for t in prompt_token_ids if t >= self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad} has no embedding row: this model has {self.vocab_size} "
                                 f"rows, its tokenizer {self.tokenizer.vocab_size} tokens")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context holds "
                             f"{self.max_model_len}, leaving no room to generate")

    def make_sequence(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        self.validate_prompt(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params,
                       eos_token_ids=self.tokenizer.eos_token_ids, max_model_len=self.max_model_len)
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop)
        return seq

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        seq = self.make_sequence(request_id, prompt_token_ids, params)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.scheduler.abort(request_id)
        if seq is not None and self.spec is not None:
            self.spec.release(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ steps
    def step(self, on_layer_done: Callable[[StepInput, int], None] | None = None) -> list[RequestOutput]:
        """schedule + execute + process, for single-threaded callers."""
        step = self.schedule()
        if step is None:
            return []
        return self.process(step, self.execute(step, on_layer_done))

    def schedule(self) -> StepInput | None:
        step = self.scheduler.schedule()
        if step is not None and self.spec is not None:
            self.spec.plan(step)  # drafts per sequence; reserves their KV slots
        return step

    def execute(
        self, step: StepInput, on_layer_done: Callable[[StepInput, int], None] | None = None
    ) -> SamplerOutput | None:
        """The forward and the sampling; touches no scheduler or block-manager state (a draft model's
        own pool aside). With speculation, sequences' drafts are verified in this one forward."""
        hook = (lambda layer: on_layer_done(step, layer)) if on_layer_done else None
        if self.spec is not None:
            return self.spec.execute(step, hook)
        return self.runner.execute(step, hook)

    def process(self, step: StepInput, sampled: SamplerOutput | None) -> list[RequestOutput]:
        """Advance counters, append sampled tokens, apply stop conditions, free finished sequences."""
        self.scheduler.finish_step(step)
        self.num_computed_tokens_total += sum(step.num_new_tokens)
        return self._process(step, sampled)

    def _process(self, step: StepInput, out: SamplerOutput | None) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        row = 0
        for i, (seq, sample) in enumerate(zip(step.seqs, step.sample, strict=True)):
            if not sample:
                continue
            assert out is not None
            rows = 1 + step.num_draft(i)  # a speculating sequence owns 1 + k rows
            if seq.is_finished:  # aborted while its step ran
                row += rows
                continue
            # accepted drafts + the target's own token; stop conditions apply to each in turn
            emit = self.spec.accept(step, i) if self.spec is not None else 1
            deltas: list[RequestOutput] = []
            for r in range(row, row + emit):
                token = int(out.token_ids[r])
                deltas.append(self.append_token(seq, token, self._logprobs(seq, out, r, token)))
                if seq.is_finished:
                    break
            row += rows
            if self.spec is not None:
                self.spec.after_append(seq, emit)
            outputs.append(deltas[0] if len(deltas) == 1 else _merge(deltas))
            if self.spec is not None:
                outputs[-1].spec = SpecMetrics.of(seq)
        return outputs

    @staticmethod
    def _logprobs(seq: Sequence, out: SamplerOutput, row: int, token: int) -> list[TokenLogprob]:
        lp: list[TokenLogprob] = []
        if seq.params.logprobs is not None:
            top: list[tuple[int, float]] = []
            if out.top_ids is not None and seq.params.logprobs > 0:
                k = seq.params.logprobs
                top = list(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist(), strict=True))  # type: ignore[index]
            lp.append(TokenLogprob(token, float(out.logprobs[row]), top))
            seq.logprobs.extend(lp)
        return lp

    def append_token(self, seq: Sequence, token: int, lp: list[TokenLogprob] | None = None) -> RequestOutput:
        """Append a sampled token, apply stop conditions, finish the sequence if it is done."""
        seq.append_token(token)
        reason = seq.check_stop(token)
        text = ""
        detok: IncrementalDetokenizer | None = seq.detokenizer
        if detok is not None and not seq.prefill_only:
            text = detok.step([token])
            if reason is None and detok.stop_reason is not None:
                reason = FinishReason.STOP
                seq.stop_reason = detok.stop_reason
            elif reason is not None and detok.stop_reason is None:
                text += detok.flush()
        if seq.prefill_only:  # a prefill worker keeps the KV until it has been shipped
            self.scheduler.finish(seq, reason or FinishReason.LENGTH, free=False)
            seq.finish_reason = reason
        elif reason is not None and seq.status is SequenceStatus.RUNNING:
            self.scheduler.finish(seq, reason)
        elif reason is not None:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        return RequestOutput(
            seq.request_id, [token], text, reason is not None, reason, seq.num_prompt_tokens,
            seq.num_output_tokens, seq.num_cached_tokens, lp or [], seq,
        )

    def release(self, seq: Sequence) -> None:
        """Free the blocks of a finished sequence that kept them (prefill_only, after its transfer)."""
        self.block_manager.free(seq)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_cached": bm.num_cached_blocks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "prefix_query_tokens": bm.prefix_queries,
            "prefix_hit_tokens": bm.prefix_hits,
            "computed_tokens": self.num_computed_tokens_total,
        } | (self.spec.stats() if self.spec is not None else {})


def _merge(deltas: list[RequestOutput]) -> RequestOutput:
    """One output for several tokens a request gained in one step (speculation); the last one's state."""
    last = deltas[-1]
    return RequestOutput(
        last.request_id, [t for d in deltas for t in d.new_token_ids], "".join(d.new_text for d in deltas),
        last.finished, last.finish_reason, last.num_prompt_tokens, last.num_output_tokens,
        last.num_cached_tokens, [lp for d in deltas for lp in d.new_logprobs], last.seq,
    )
