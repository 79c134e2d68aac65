"""Speculative decoding inside one engine: plan, propose, verify, roll back.

The engine calls it at the three points of a step, under the same locking as the step itself:

    schedule (lock)   plan(step):    choose k per decoding sequence (policy), reserve target KV slots
                                     for its drafts; n-gram drafts are looked up here
    execute (no lock) execute(step): draft model proposes (touching only its own pool), then ONE
                                     target forward over every sequence's new tokens + drafts, and
                                     verification; non-speculating sequences are q_len 1 rows in it
    process (lock)    accept(seq):   num_computed_tokens past the accepted drafts, target and draft
                                     block tables truncated past them (`BlockManager.truncate`);
                                     the engine then appends the emitted tokens one by one, applying
                                     stop conditions to each (tokens after a stop are dropped)

    target KV of a sequence verifying k = 3 drafts, a = 1 accepted (block_size 4):
      before:  | t t t t | t t t x1 | x2 x3 . . |      allocated for N + k positions
      after:   | t t t t | t t t x1 | y  . . .  |      computed = N + a; y (the correction) is the
                                                        next step's input; the tail block went back
                                                        only if it held no accepted position
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_runner import ModelRunner, StepInput
from engine.sampling.sampler import SamplerOutput
from engine.sequence import Sequence
from engine.spec.draft import DraftProposer
from engine.spec.metrics import SpecMetrics
from engine.spec.ngram import propose_ngram
from engine.spec.policy import SpecPolicy
from engine.spec.verify import verify
from engine.structured.masks import MaskFiller

logger = logging.getLogger(__name__)


class SpecDecoder:
    def __init__(self, config: EngineConfig, runner: ModelRunner, block_manager: BlockManager,
                 max_model_len: int) -> None:
        """Build the proposer named by `config` (loads a draft model: raises ValueError on a mismatch)."""
        self.k = config.speculative_tokens
        self.runner = runner
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.draft = DraftProposer(config, runner) if config.speculative_model is not None else None
        if self.draft is not None:
            self.max_model_len = min(max_model_len, self.draft.max_model_len + 1)
        self.policy = SpecPolicy(config.max_num_batched_tokens, config.speculative_adaptive, self.draft is not None)
        self.generator = torch.Generator(device=runner.device).manual_seed(config.seed + 2)
        self.metrics = SpecMetrics()
        # per step sequence: drafts the plan reserved KV slots for ([]: none), until the next plan
        self._planned: list[int] = []
        self._probed = -1  # the step sequence a draft-model probe drafted for (-1: none)
        # Costs are compared across sizes measured at different times. On CPU the clock is this
        # process's CPU time, so other processes' load on a shared machine does not make one size
        # look dearer than another; the step overhead is the engine thread's own. On GPU, wall time.
        cpu = runner.device.type == "cpu"
        self._clock = time.process_time if cpu else time.perf_counter
        self._thread_clock = time.thread_time if cpu else time.perf_counter
        if self.draft is not None:
            self.draft.clock = self._clock
        self._last_plan: float | None = None  # _thread_clock at the last plan
        self._last_execute = 0.0  # _thread_clock seconds the last execute took
        logger.info("speculative decoding: %s, k=%d, adaptive %s",
                    f"draft {config.speculative_model}" if self.draft else config.speculative_method, self.k,
                    "on" if config.speculative_adaptive else "off")

    # --------------------------------------------------------------- schedule
    def plan(self, step: StepInput) -> None:
        """Choose each sequence's drafts and reserve their KV slots (out of blocks: it drafts none)."""
        now = self._thread_clock()
        if self._last_plan is not None:  # the last step's time outside its forwards
            self.policy.observe_overhead(max(0.0, now - self._last_plan - self._last_execute))
        self._last_plan = now
        if self.draft is not None:
            self.draft.release_stale()
        cand = [i for i, (s, n, smp) in enumerate(zip(step.seqs, step.num_new_tokens, step.sample, strict=True))
                if smp and n == 1 and not s.prefill_only and not s.pending_forks]
        self._planned, self._probed = [], -1
        if self.policy.skip(len(cand)):  # speculation is off, as the last few steps found
            return
        caps = [max(0, min(self.k, step.seqs[i].params.max_tokens - step.seqs[i].num_output_tokens - 1,
                           self.max_model_len - step.seqs[i].num_tokens - 1)) for i in cand]
        rates = self.policy.acceptance.of([step.seqs[i] for i in cand])
        scheduled, sampling = sum(step.num_new_tokens), sum(step.sample)
        drafts: list[list[int]] = [[] for _ in step.seqs]
        if self.draft is None:
            # n-gram: look up only if drafting could pay even if every sequence found k tokens, then
            # decide on what the lookups found (a sequence without a match has nothing to verify)
            pays = any(self.policy.choose(caps, rates, scheduled, sampling, final=False))
            if not pays and not self.policy.probe_due:
                caps = [0] * len(cand)
            for j, i in enumerate(cand):
                drafts[i] = propose_ngram(step.seqs[i].token_ids, caps[j]) if caps[j] else []
                grammar = step.seqs[i].grammar
                if grammar is not None and drafts[i]:  # from the first token the grammar forbids on, a
                    drafts[i] = drafts[i][:grammar.valid_prefix(drafts[i])]  # draft cannot be accepted
                caps[j] = len(drafts[i])
        ks = self.policy.choose(caps, rates, scheduled, sampling)
        self._probed = cand[self.policy.probed] if self.policy.probed >= 0 else -1
        planned = [0] * len(step.seqs)
        for i, k in zip(cand, ks, strict=True):
            drafts[i] = drafts[i][:k]
            if k and self.bm.allocate_slots(step.seqs[i], 1 + k):
                planned[i] = k
            else:
                drafts[i] = []
        if not any(planned):
            return
        if self.draft is None:
            step.spec_tokens = drafts
        self._planned = planned

    # ---------------------------------------------------------------- execute
    def execute(self, step: StepInput, on_layer_done: Callable[[int], None] | None = None,
                masks: MaskFiller | None = None) -> SamplerOutput | None:
        """Propose (draft model), run the one target forward and verify; sets step.num_accepted.
        `masks`: the engine's grammar mask filler; the masks of every row (drafts included) are
        filled while the target's forward runs."""
        start = self._thread_clock()
        probs: list[torch.Tensor | None] = []
        if self.draft is not None and step.spec_tokens is None and any(self._planned):
            idx = [i for i, k in enumerate(self._planned) if k]
            out = self.draft.propose([step.seqs[i] for i in idx], [self._planned[i] for i in idx])
            drafts: list[list[int]] = [[] for _ in step.seqs]
            probs_by_seq: list[torch.Tensor | None] = [None] * len(step.seqs)
            for i, toks, q in zip(idx, out.tokens, out.probs, strict=True):
                drafts[i], probs_by_seq[i] = toks, q
            step.spec_tokens = drafts
            probs = [probs_by_seq[i] for i, smp in enumerate(step.sample) if smp]
            # the draft prefill of new prompts (catch-up) is not counted
            self.policy.draft_first_cost.observe(len(idx), out.first_seconds)
            self.policy.draft_cost.observe(len(idx), out.seconds_per_forward)
        t0 = self._clock()
        tokens = sum(step.num_new_tokens) + sum(step.num_draft(i) for i in range(len(step.seqs)))
        if step.spec_tokens is not None and not any(step.spec_tokens):
            step.spec_tokens = None
        if masks is not None:
            step.masks = masks.start(step)
        if step.spec_tokens is None:
            result = self.runner.execute(step, on_layer_done)
        else:
            logits = self.runner.forward_logits(step, on_layer_done)
            sampled = [i for i, smp in enumerate(step.sample) if smp]
            drafts_s = [step.spec_tokens[i] for i in sampled]
            runner = self.runner
            got = step.masks.result(runner.device, runner.model_config.vocab_size) if step.masks else None
            verdict = verify(logits, [step.seqs[i] for i in sampled], drafts_s,
                             probs or [None] * len(sampled), runner.sampler, self.generator, got)
            accepted = [0] * len(step.seqs)
            for i, a in zip(sampled, verdict.num_accepted, strict=True):
                accepted[i] = a
            step.num_accepted = accepted
            result = verdict.out
        self.policy.target_cost.observe(tokens, self._clock() - t0)
        self._last_execute = self._thread_clock() - start
        return result

    # ---------------------------------------------------------------- process
    def accept(self, step: StepInput, i: int) -> int:
        """After finish_step: move sequence i past its accepted drafts, free what they did not keep.

        Returns how many tokens it emits this step (accepted + 1); the caller appends them.
        """
        if not self._planned or not self._planned[i]:  # no drafts, no slots reserved for them
            return 1
        seq = step.seqs[i]
        k = step.num_draft(i)
        a = step.num_accepted[i] if step.num_accepted is not None else 0
        n = seq.num_tokens  # tokens before this step's emissions; positions < n + a are now computed
        seq.num_computed_tokens += a
        self.bm.truncate(seq, n + a + 1)  # frees blocks reserved for rejected (or unproposed) drafts
        if k:
            if self.draft is not None:
                self.draft.rollback(seq, min(n + a, n + k - 1))
            seq.num_spec_steps += 1
            seq.num_draft_tokens += k
            seq.num_accepted_tokens += a
            m = self.metrics
            self.metrics = SpecMetrics(m.num_spec_steps + 1, m.num_draft_tokens + k, m.num_accepted_tokens + a)
            self.policy.acceptance.record(seq, k, a)
            if i == self._probed:
                self.policy.probe_outcome(k, a)
        return a + 1

    def after_append(self, seq: Sequence, emitted: int) -> None:
        """The step's `emitted` tokens are appended: name newly full blocks (accepted drafts; one
        token's were named by the scheduler), or let go."""
        if seq.is_finished:
            self.release(seq)
        elif emitted > 1 and seq.block_table:
            self.bm.cache_full_blocks(seq)

    def release(self, seq: Sequence) -> None:
        """`seq` finished or was aborted: drop its draft KV and acceptance history."""
        if self.draft is not None:
            self.draft.release(seq)
        self.policy.acceptance.forget(seq)

    def stats(self) -> dict[str, int]:
        m = self.metrics
        out = {"spec_steps": m.num_spec_steps, "spec_draft_tokens": m.num_draft_tokens,
               "spec_accepted_tokens": m.num_accepted_tokens}
        if self.draft is not None:
            dbm = self.draft.block_manager
            out |= {"draft_kv_blocks_total": dbm.num_blocks, "draft_kv_blocks_free": dbm.num_free_blocks}
        return out
