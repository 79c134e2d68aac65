"""Continuous batching with chunked prefill under a per-step token budget.

Every step gives each scheduled sequence `n` new tokens to compute, n = min(uncomputed, budget left):
a decode is n = 1, a prefill chunk is n > 1, and both share a step. Running sequences go first
(oldest first), then waiting ones are admitted while budget, sequence slots and blocks last. When a
running sequence cannot get a block, the newest running sequence is preempted: its blocks are freed
and it goes back to the front of the queue with num_computed_tokens = 0, to be recomputed (its
prefix-cache entries usually make that cheap).

Priority (lower first, 0 by default): the waiting queue is kept in priority order (first come, first
served within a priority; a preempted sequence goes first among its equals), the running batch is
ordered by priority before each step, so the preempted one is the newest of the lowest priority.
A sequence that forks n - 1 siblings when its prompt is done is admitted only while n sequence slots
are free; KV for a transfer only while each of its n choices and every running sequence keeps a free
block to grow into.
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
        self._mixed_priorities = False  # the running batch holds more than one priority (`_run`)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. One arriving with computed KV (prefilled elsewhere) must own its blocks."""
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, first=False)

    def _enqueue(self, seq: Sequence, first: bool) -> None:
        """Into the waiting queue after every sequence of a higher priority and, unless `first`,
        after those of its own."""
        if not self.waiting or (self.waiting[-1].priority <= seq.priority and not first):
            self.waiting.append(seq)
            return
        for i, other in enumerate(self.waiting):
            if other.priority > seq.priority or (first and other.priority == seq.priority):
                self.waiting.insert(i, seq)
                return
        self.waiting.append(seq)

    def reserve_kv(self, num_blocks: int, num_seqs: int = 1) -> list[int] | None:
        """Blocks for a KV transfer on its way in (the decode side), or None: not now.

        Same policy as admitting a local prompt: a transfer is admitted only while every running
        sequence, and each of the `num_seqs` choices the transfer will start, keeps a free block to
        grow into (or to copy a shared partial block into), so arriving KV never forces a
        preemption. The blocks are the caller's until it frees them or a sequence adopts them
        (`add_running`).
        """
        if self.bm.num_free_blocks - num_blocks < len(self.running) + num_seqs - 1:
            return None
        return self.bm.allocate_blocks(num_blocks)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose blocks and KV are already in place (the decode side of a transfer)."""
        seq.status = SequenceStatus.RUNNING
        self._run(seq)

    def _run(self, seq: Sequence) -> None:
        """Into the running batch (last). The batch is sorted by priority before each step only once
        two priorities met in it; that lasts until it empties (a sort of a sorted batch is cheap)."""
        if not self.running:
            self._mixed_priorities = False
        elif seq.priority != self.running[0].priority:
            self._mixed_priorities = True
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """End the request's sequences (every choice, or only choice `index`), freeing their blocks."""
        def hit(seq: Sequence) -> bool:
            return seq.request_id == request_id and (index is None or seq.index == index)

        found = [s for s in self.running if hit(s)] + [s for s in self.waiting if hit(s)]
        if found:
            self.running = [s for s in self.running if not hit(s)]
            self.waiting = deque(s for s in self.waiting if not hit(s))
        for seq in found:
            self._finish(seq, FinishReason.ABORT)
        return found

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.bm.free(seq)

    def finish_waiting(self, seq: Sequence, reason: FinishReason) -> None:
        """Take a waiting sequence out (it was preempted after an overlapped step sampled its last token)."""
        self.waiting.remove(seq)
        self._finish(seq, reason)

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
        self._enqueue(seq, first=True)

    def schedule(self) -> StepInput | None:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        sample: list[bool] = []  # it reaches num_tokens in this step and samples a token
        preempted = False
        running = self.running
        if self._mixed_priorities:
            running.sort(key=lambda s: s.priority)  # stable: admission order within a priority
        allocate = self.bm.allocate_slots
        fits_decode = self.bm.decode_fits
        # The leading run of plain decodes (one token inside a block of their own; a steady batch is all
        # of it) is taken by counting alone: the rows the loop below would add one at a time, through
        # an allocation that has nothing to do. That loop takes the rest (later decodes included).
        i, limit = 0, min(len(running), budget)
        while i < limit:
            seq = running[i]
            num_tokens, computed = len(seq.token_ids), seq.num_computed_tokens
            if (num_tokens - computed != 1 or num_tokens >= seq.length_limit
                    or not fits_decode(seq.block_table, computed)):
                break
            i += 1
        if i:
            seqs, counts, sample = running[:i], [1] * i, [True] * i
            budget -= i
        while i < len(running) and budget > 0:
            seq = running[i]
            num_tokens = len(seq.token_ids)
            if num_tokens >= seq.length_limit:  # its last token is scheduled: an overlapped step samples it (engine.overlap)
                i += 1
                continue
            computed = seq.num_computed_tokens
            n = min(num_tokens - computed, budget)
            while not allocate(seq, n):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                sample.append(seq.num_computed_tokens + n == num_tokens)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if len(self.running) + seq.num_sample_rows > self.max_num_seqs:
                break
            cached: list[int] = []
            if seq.num_computed_tokens == 0 and not seq.block_table and not seq.wants_prompt_logprobs:
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
            self._run(seq)
            seqs.append(seq)
            counts.append(n)
            sample.append(seq.num_computed_tokens + n == seq.num_tokens)
            budget -= n
        if not seqs:
            return None
        return StepInput(seqs, counts, sample, copies=self.bm.take_copies())

    def finish_step(self, step: StepInput, advance: bool = True) -> None:
        """Advance counters after the forward (unless an overlapped launch did) and name newly full
        blocks for the prefix cache."""
        bs = self.bm.block_size
        finished = SequenceStatus.FINISHED
        filled: list[Sequence] = []  # a block of theirs filled up: name it for the prefix cache
        for seq, n in zip(step.seqs, step.num_new_tokens, strict=True):
            if seq.status is finished:  # aborted while its step ran; its blocks are already free
                continue
            computed = seq.num_computed_tokens + n if advance else seq.num_computed_tokens
            seq.num_computed_tokens = computed
            if computed // bs > len(seq.block_hashes):
                filled.append(seq)
        for seq in filled:
            self.bm.cache_full_blocks(seq)
