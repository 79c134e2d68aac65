"""The engine: a scheduler, a block manager and a model runner stepping together in one process.

`add_request` queues a sequence; each `step()` schedules one batch, runs one forward, samples, applies
stop conditions and returns what every touched request gained. Text (incremental detokenization and
stop strings) is applied here so that every caller (offline API, decode worker) stops the same way.
A request with n > 1 choices is forked here (`fork`) in the step that samples its first tokens, or
by a decode worker when its prompt's KV arrives; on a prefill worker its n first tokens are sampled
and travel with the KV instead (`RequestOutput.sibling_tokens`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.hub import resolve_model
from engine.model_runner import ModelRunner, StepInput
from engine.outputs import FinishReason, RequestOutput, StepOutput, TokenLogprob
from engine.sampling.bad_words import bad_word_ids
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import SamplerOutput
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.spec import SpecDecoder, SpecMetrics
from engine.structured.compiler import Grammar, GrammarCompiler
from engine.structured.masks import MaskFiller
from engine.structured.matcher import GrammarState
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def local_config(config: EngineConfig) -> tuple[EngineConfig, str]:
    """`config` with its model (and draft model) resolved to local paths (engine.hub: a packaged name
    is its file, a Hugging Face id is found in, or downloaded into, the cache), and the model's name.
    Raises CheckpointError."""
    model = resolve_model(config.model, config.revision)
    draft = resolve_model(config.speculative_model).path if config.speculative_model else None
    return dataclasses.replace(config, model=str(model.path), revision=None,
                               speculative_model=str(draft) if draft else None), model.name


class Engine:
    def __init__(self, config: EngineConfig, *, tokenizer: Tokenizer | None = None) -> None:
        """`config.model` may name a packaged model or a Hugging Face id; `self.config` holds the local
        path it resolved to, `self.model_name` the name it goes by."""
        self.config, self.model_name = local_config(config)
        config = self.config
        self.runner = ModelRunner(config)
        self.tokenizer = tokenizer or Tokenizer.from_dir(config.model)
        _ = self.tokenizer.byte_tables  # made now (~3 us per id), not in the first request's step
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        # one sequence may fill the pool alone, never more
        self.max_model_len = min(self.runner.max_model_len, self.runner.num_blocks * config.block_size)
        if self.runner.staging is not None:  # tensor parallelism: a transfer's pages must fit rank 0's staging
            self.max_model_len = min(self.max_model_len, self.runner.staging.num_blocks * config.block_size)
        self.spec = (SpecDecoder(config, self.runner, self.block_manager, self.max_model_len)
                     if config.speculative else None)
        # structured outputs: grammars compile off the engine thread (workers submit before admission),
        # masks fill while each step's forward runs
        self.grammars = GrammarCompiler(self.tokenizer, config.grammar_cache_size)
        self.masks = MaskFiller(self.tokenizer.vocab_size, config.grammar_threads or None)
        self.num_computed_tokens_total = 0
        # Text (detokenization, stop strings) made in append_token (engine.LLM). An EngineLoop turns this
        # off and makes it after each step (engine.text_thread); `stop_by_text` then ends sequences.
        self.inline_text = True

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
        [0, token_id_limit) or without an embedding row, no room left to generate, more choices than
        sequence slots, logit_bias or allowed_token_ids outside the model's vocabulary."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        params.check_vocab(self.vocab_size)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n is {params.n}; this engine runs at most {self.config.max_num_seqs} sequences at once")
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

    def make_sequence(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      priority: int = 0, grammar: Grammar | None = None) -> Sequence:
        """Choice 0 of a new request (it forks the others once its first tokens are sampled).

        A constrained request (`params.structured`) needs its compiled `grammar`: a worker compiles it
        off the engine thread first (`self.grammars.submit`); without one it is compiled here, blocking
        the caller (the offline API). Raises GrammarError (a ValueError) when it does not compile."""
        self.validate_prompt(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params,
                       eos_token_ids=self.tokenizer.eos_token_ids, max_model_len=self.max_model_len,
                       pending_forks=params.n - 1, priority=priority,
                       bad_words_ids=bad_word_ids(self.tokenizer, params.bad_words))
        if params.structured is not None:
            if grammar is None or grammar.key != params.structured.key:
                grammar = self.grammars.compile(params.structured).grammar
            seq.grammar = GrammarState(grammar)
        seq.detokenizer = self._detokenizer(seq)
        return seq

    def _detokenizer(self, seq: Sequence) -> IncrementalDetokenizer:
        p = seq.params
        return IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, skip_special_tokens=p.skip_special_tokens,
                                      stop=p.stop, include_stop=p.include_stop_str_in_output)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0) -> Sequence:
        seq = self.make_sequence(request_id, prompt_token_ids, params, priority)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """End every choice of the request (or only choice `index`); their blocks go back."""
        seqs = self.scheduler.abort(request_id, index)
        if self.spec is not None:
            for seq in seqs:
                self.spec.release(seq)
        return seqs

    def fork(self, parent: Sequence, firsts: list[tuple[int, list[TokenLogprob]]]) -> list[RequestOutput]:
        """`parent` (running, its prompt computed, nothing output yet) becomes choice 0 of len(firsts):
        choices 1.. are forked from it, sharing its blocks (copy on write), and join the running batch;
        then each choice appends its first token, firsts[j] = (token id, its logprobs). Returns each
        choice's output, choice 0 first."""
        parent.pending_forks = 0
        children: list[Sequence] = []
        for j in range(1, len(firsts)):
            child = Sequence(parent.request_id, parent.prompt_token_ids, parent.params.for_choice(j),
                             eos_token_ids=parent.eos_token_ids, max_model_len=parent.max_model_len,
                             num_computed_tokens=parent.num_computed_tokens, num_cached_tokens=parent.num_cached_tokens,
                             index=j, priority=parent.priority, arrival_time=parent.arrival_time,
                             bad_words_ids=parent.bad_words_ids)
            child.detokenizer = self._detokenizer(child)
            if parent.grammar is not None:  # before the parent accepts its first token
                child.grammar = parent.grammar.fork()
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
            children.append(child)
        outs = [self.append_token(parent, *firsts[0])]
        outs += [self.append_token(c, *first) for c, first in zip(children, firsts[1:], strict=True)]
        return outs

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
            step.copies += self.block_manager.take_copies()
        return step

    def execute(
        self, step: StepInput, on_layer_done: Callable[[StepInput, int], None] | None = None
    ) -> SamplerOutput | None:
        """The forward and the sampling; touches no scheduler or block-manager state (a draft model's
        own pool aside). With speculation, sequences' drafts are verified in this one forward."""
        hook = (lambda layer: on_layer_done(step, layer)) if on_layer_done else None
        if self.spec is not None:  # drafts first (a draft model proposes them here), then the masks
            return self.spec.execute(step, hook, self.masks)
        step.masks = self.masks.start(step)  # filled while the forward runs
        return self.runner.execute(step, hook)

    def process(self, step: StepInput, sampled: SamplerOutput | None) -> list[RequestOutput]:
        """`process_step`, every output made (single-threaded callers)."""
        return self.process_step(step, sampled).all()

    def process_step(self, step: StepInput, sampled: SamplerOutput | None) -> StepOutput:
        """Advance counters, append sampled tokens, apply stop conditions, free finished sequences.
        Plain decodes stay rows of the StepOutput while text is made elsewhere (`inline_text` off).
        An overlapped step (engine.overlap) was advanced at launch; its tokens fill their placeholders
        first, so the blocks named for the prefix cache hold only real tokens."""
        self.num_computed_tokens_total += sum(step.num_new_tokens)
        if step.placeholder_at is not None:
            result = self._process(step, sampled)
            self.scheduler.finish_step(step, advance=False)
            return result
        self.scheduler.finish_step(step)
        for i, lps in step.prompt_logprobs.items():
            step.seqs[i].prompt_logprobs.extend(lps)
        return self._process(step, sampled)

    def _process(self, step: StepInput, out: SamplerOutput | None) -> StepOutput:
        result = StepOutput()
        if out is None:
            return result
        outputs = result.outputs
        tokens = out.token_ids.tolist()  # one device->host read for the whole batch
        spec = self.spec
        plain = spec is None and not self.inline_text  # plain decodes may stay rows (StepOutput)
        finished = SequenceStatus.FINISHED
        start = self._plain_decodes(step, tokens, result) if plain else 0
        row = start  # the sequences before `start` sampled one row each
        for i in range(start, len(step.seqs)):
            seq, sample = step.seqs[i], step.sample[i]
            if not sample:
                continue
            rows = step.num_rows(i) if spec is not None or seq.pending_forks else 1
            if seq.status is finished:  # aborted while its step ran
                row += rows
                continue
            if seq.pending_forks:
                firsts = [(t, _logprobs(seq.params, out, row + j, t)) for j, t in enumerate(tokens[row : row + rows])]
                row += rows
                if seq.prefill_only:  # the decode worker forks them: their first tokens go with the KV
                    seq.pending_forks = 0
                    outputs.append(self.append_token(seq, *firsts[0]))
                    outputs[-1].sibling_tokens = firsts[1:]
                else:
                    outputs.extend(self.fork(seq, firsts))
                continue
            if spec is None:  # one token: the common path
                token = tokens[row]
                row += 1
                at = step.placeholder_at[i] if step.placeholder_at is not None else None
                if plain and seq.params.logprobs is None and seq.grammar is None:
                    ids = seq.token_ids
                    end = len(ids) + 1 if at is None else at + 1  # its tokens, this one included
                    num_output = end - len(seq.prompt_token_ids)
                    # not its first token, and nothing that can end it (Sequence.check_stop): a plain decode
                    if num_output > 1 and end < seq.length_limit and token not in seq.stop_ids:
                        if at is None:
                            ids.append(token)
                        else:
                            ids[at] = token
                        result.seqs.append(seq)
                        result.tokens.append(token)
                        result.num_output_tokens.append(num_output)
                        continue
                lp = _logprobs(seq.params, out, row - 1, token) if seq.params.logprobs is not None else None
                outputs.append(self.append_token(seq, token, lp, at))
                continue
            # accepted drafts + the target's own token; stop conditions apply to each in turn
            emit = spec.accept(step, i)
            deltas: list[RequestOutput] = []
            for r in range(row, row + emit):
                token = tokens[r]
                deltas.append(self.append_token(seq, token, _logprobs(seq.params, out, r, token)))
                if seq.is_finished:
                    break
            row += rows
            spec.after_append(seq, emit)
            outputs.append(deltas[0] if len(deltas) == 1 else _merge(deltas))
            outputs[-1].spec = SpecMetrics.of(seq)
        return result

    @staticmethod
    def _plain_decodes(step: StepInput, tokens: list[int], result: StepOutput) -> int:
        """The leading run of plain decodes of `step` (what `_process`'s one-token path keeps as rows:
        one sampled token, no logprobs, grammar or forks, not a first token, nothing that can end the
        sequence), put into `result`'s rows; returns how many sequences it took. The same arithmetic as
        that path, in one tight loop for a steady batch."""
        at = step.placeholder_at
        seqs, samples = step.seqs, step.sample
        running = SequenceStatus.RUNNING
        counts = result.num_output_tokens
        taken = len(tokens)
        for i, token in enumerate(tokens):
            seq = seqs[i]
            if not samples[i] or seq.status is not running or seq.pending_forks:
                taken = i
                break
            ids = seq.token_ids
            end = len(ids) + 1 if at is None else at[i] + 1  # its tokens, this one included
            num_output = end - len(seq.prompt_token_ids)
            if (num_output <= 1 or end >= seq.length_limit or token in seq.stop_ids
                    or seq.params.logprobs is not None or seq.grammar is not None):
                taken = i
                break
            if at is None:
                ids.append(token)
            else:
                ids[at[i]] = token
            counts.append(num_output)
        result.seqs.extend(seqs[:taken])  # a leading run: sequence i sampled row i
        result.tokens.extend(tokens[:taken])
        return taken

    def append_token(self, seq: Sequence, token: int, lp: list[TokenLogprob] | None = None,
                     at: int | None = None) -> RequestOutput:
        """Append a sampled token (and its logprobs), apply stop conditions, finish the sequence if it is done.
        `at`: the token's placeholder in seq.token_ids (an overlapped step, engine.overlap); placeholders
        of later steps behind it are dropped if the sequence finishes here. A sequence with a grammar never
        runs overlapped (its next mask needs this token), so `at` is None for it."""
        pending = 0
        if at is None:
            seq.append_token(token)
        else:
            seq.fill_token(at, token)
            pending = len(seq.token_ids) - at - 1
        if lp:
            seq.logprobs.extend(lp)
        reason = seq.check_stop(token, pending)
        if seq.grammar is not None:  # a complete grammar ends the request (EOS or not): STOP, not LENGTH
            seq.grammar.accept(token)
            if seq.grammar.done and reason is not FinishReason.STOP:
                reason = FinishReason.STOP
        if reason is not None and pending:
            del seq.token_ids[at + 1 :]  # type: ignore[operator]
            pending = 0
        text = ""
        detok: IncrementalDetokenizer | None = seq.detokenizer
        if detok is not None and self.inline_text and not seq.prefill_only:
            text = detok.step((token,))
            if reason is None and detok.stop_reason is not None:
                reason = FinishReason.STOP
                seq.stop_reason = detok.stop_reason
            elif reason is not None and detok.stop_reason is None:
                text += detok.flush()
        if reason is not None:
            if seq.prefill_only:  # a prefill worker keeps the KV until it has been shipped
                self.scheduler.finish(seq, reason, free=False)
            elif seq.status is SequenceStatus.RUNNING:
                self.scheduler.finish(seq, reason)
            elif seq.status is SequenceStatus.WAITING:  # preempted after its overlapped step was launched
                self.scheduler.finish_waiting(seq, reason)
            else:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        elif seq.prefill_only:
            self.scheduler.finish(seq, FinishReason.LENGTH, free=False)
            seq.finish_reason = None
        out = RequestOutput(
            seq.request_id, [token], text, reason is not None, reason, seq.num_prompt_tokens,
            seq.num_output_tokens - pending, seq.num_cached_tokens, lp or [], seq, index=seq.index,
            stop_reason=seq.stop_reason if reason is FinishReason.STOP else None,
        )
        if seq.index == 0 and seq.params.prompt_logprobs is not None and seq.num_output_tokens - pending == 1:
            out.prompt_logprobs = list(seq.prompt_logprobs)
        return out

    def stop_by_text(self, seq: Sequence, num_output_tokens: int, stop_reason: str | int | None) -> bool:
        """A stop string ended `seq` after `num_output_tokens` outputs (found off this thread, while the
        engine went on): it leaves the scheduler if it is still there (its blocks are freed), and the
        tokens (and logprobs) it made since are dropped. Returns whether it was still unfinished."""
        running = not seq.is_finished
        if running:
            self.abort(seq.request_id, seq.index)
        del seq.token_ids[seq.num_prompt_tokens + num_output_tokens :]
        del seq.logprobs[num_output_tokens:]
        seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop_reason
        return running

    def release(self, seq: Sequence) -> None:
        """Free the blocks of a finished sequence that kept them (prefill_only, after its transfer)."""
        self.block_manager.free(seq)

    # ------------------------------------------------------------------ stats
    def close(self) -> None:
        """Stop the grammar threads (the model and its pool go with the object)."""
        self.grammars.close()
        self.masks.close()

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


def _logprobs(params: SamplingParams, out: SamplerOutput, row: int, token: int) -> list[TokenLogprob]:
    """The logprobs of `token`, drawn from sampler row `row`, when the request asks for them."""
    if params.logprobs is None or out.logprobs is None:
        return []
    top: list[tuple[int, float]] = []
    if out.top_ids is not None and params.logprobs > 0:
        k = params.logprobs
        top = list(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist(), strict=True))  # type: ignore[index]
    return [TokenLogprob(token, float(out.logprobs[row]), top)]


def _merge(deltas: list[RequestOutput]) -> RequestOutput:
    """One output for several tokens a choice gained in one step (speculation); the last one's state."""
    last = deltas[-1]
    return RequestOutput(
        last.request_id, [t for d in deltas for t in d.new_token_ids], "".join(d.new_text for d in deltas),
        last.finished, last.finish_reason, last.num_prompt_tokens, last.num_output_tokens,
        last.num_cached_tokens, [lp for d in deltas for lp in d.new_logprobs], last.seq, index=last.index,
        prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
    )
