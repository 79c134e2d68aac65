"""Continuous batching with chunked prefill under a per-step token budget.

Every step gives each scheduled sequence `n` new tokens to compute, n = min(uncomputed, budget left):
a decode is n = 1, a prefill chunk is n > 1, and both share a step. Running sequences go first
(oldest first), then waiting ones are admitted while budget, sequence slots and blocks last. When a
running sequence cannot get a block, the newest running sequence is preempted: its blocks are freed
and it goes back to the front of the queue with num_computed_tokens = 0, to be recomputed (its
prefix-cache entries usually make that cheap).
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.model_runner import StepInput
from engine.outputs import FinishReason
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.bm = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. One arriving with computed KV (prefilled elsewhere) must own its blocks."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def reserve_kv(self, num_blocks: int) -> list[int] | None:
        """Blocks for a KV transfer on its way in (the decode side), or None: not now.

        Same policy as admitting a local prompt: a transfer is admitted only while every running
        sequence keeps a free block to grow into, so arriving KV never forces a preemption. The
        blocks are the caller's until it frees them or a sequence adopts them (`add_running`).
        """
        if self.bm.num_free_blocks - num_blocks < len(self.running):
            return None
        return self.bm.allocate_blocks(num_blocks)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose blocks and KV are already in place (the decode side of a transfer)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.bm.free(seq)

    def finish(self, seq: Sequence, reason: FinishReason, *, free: bool = True) -> None:
        """Take a running sequence out; `free=False` keeps its blocks (the caller owns them now)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if free:
            self.bm.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> StepInput | None:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            cached: list[int] = []
            if seq.num_computed_tokens == 0 and not seq.block_table:
                # leave at least one token to compute: its logits give the next token
                cached = self.bm.lookup(seq.token_ids, seq.num_tokens - 1)
            n = min(seq.num_uncomputed_tokens - len(cached) * self.bm.block_size, budget)
            if not self.bm.allocate_slots(seq, n, cached):
                break
            if cached:
                seq.num_computed_tokens = len(cached) * self.bm.block_size
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        if not seqs:
            return None
        sample = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(seqs, counts, strict=True)]
        return StepInput(seqs, counts, sample)

    def finish_step(self, step: StepInput) -> None:
        """Advance counters after the forward and name newly full blocks for the prefix cache."""
        for seq, n in zip(step.seqs, step.num_new_tokens, strict=True):
            if seq.is_finished:  # aborted while its step ran; its blocks are already free
                continue
            seq.num_computed_tokens += n
            self.bm.cache_full_blocks(seq)
