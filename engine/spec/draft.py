"""A draft model: a smaller checkpoint with the target's tokenizer proposes k tokens per sequence.

It runs in the target's process with its own `ModelRunner` (weights and KV pool, as many blocks as
the target's pool) and its own `BlockManager`. Each speculating sequence has a *mirror* here: a
`Sequence` holding the same tokens, whose block table holds the draft's KV of them.

    target seq   [ t0 ............ t(N-1) ]                   target KV: positions < N - 1
    mirror       [ t0 ............ t(N-1) x1 x2 .. xk ]        draft KV after proposing: < N + k - 1
                   ^ caught up first (on a decode worker: the draft prefill of the prompt, chunked)

Proposing: k forwards draw x1..xk. The first feeds every token the mirror has not computed (the
last accepted tokens, or a whole short prompt); a longer prompt is first caught up in budget-sized
chunks (the draft prefill), the later forwards feed one draft token each. After the target accepts
a of them, `rollback` keeps the draft KV of positions < min(N + a, N + k - 1) (what it computed of
accepted tokens) and truncates the rest. Only blocks full of accepted tokens are ever named in the
draft's prefix cache (`sync` names them once the target's tokens are known), so a rolled-back block
is never found by another sequence.

Draws use the draft's own `Sampler` with the rows' sampling options and draft-extended histories:
greedy rows take the argmax; seeded rows reuse the exact noise the target's sampler uses at that
position (the coupled rule in `engine.spec.verify`); other rows draw from q and report q.
Mirrors live while their sequence runs: `release` frees them (finish, abort, preemption).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer as Backend
from torch import Tensor

from engine.block_manager import BlockManager
from engine.checkpoint import load_hf_config
from engine.config import EngineConfig, ModelConfig
from engine.model_runner import ModelRunner, StepInput
from engine.sampling.sampler import probabilities
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

_INLINE = 8  # uncomputed tokens a mirror may bring into its first proposal forward (q_len <= 8)


class DraftOutput(NamedTuple):
    tokens: list[list[int]]  # per requested sequence, up to its k draft tokens ([] if it could not draft)
    probs: list[Tensor | None]  # (len(tokens[i]), V) q rows for the rejection rule, else None
    first_seconds: float  # the first proposal forward (it also feeds the last accepted tokens); 0: none
    seconds_per_forward: float  # mean time of the later proposal forwards (0: none); catch-up excluded


def check_compatible(target_dir: str | Path, draft_dir: str | Path, target_vocab: int, draft_vocab: int) -> None:
    """Raise ValueError unless the draft shares the target's vocabulary and tokenizer."""
    if draft_vocab != target_vocab:
        raise ValueError(f"the draft model {draft_dir} has a vocabulary of {draft_vocab} tokens but the target "
                         f"{target_dir} has {target_vocab}: a draft must use the target's tokenizer")
    files = [Path(target_dir) / "tokenizer.json", Path(draft_dir) / "tokenizer.json"]
    if not files[1].is_file():
        raise ValueError(f"the draft model {draft_dir} has no tokenizer.json; a draft must ship the target's "
                         "tokenizer so that its token ids mean the same text")
    vocabs = [Backend.from_file(str(f)).get_vocab(with_added_tokens=True) for f in files]
    if vocabs[0] != vocabs[1]:
        diff = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()))[:3]
        raise ValueError(f"the draft model {draft_dir} has a different tokenizer from the target {target_dir} "
                         f"(e.g. {diff}); a draft must use the target's tokenizer")


class DraftProposer:
    def __init__(self, config: EngineConfig, target: ModelRunner) -> None:
        """Load the draft named by `config.speculative_model` beside `target` (its KV pool is sized to
        the target's block count). Raises ValueError when the two do not share a tokenizer."""
        assert config.speculative_model is not None
        path = str(config.speculative_model)
        draft_cfg = EngineConfig(
            model=path, dtype=config.dtype, device=config.device, block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len, num_kv_blocks=target.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching, attention_backend=config.attention_backend,
            seed=config.seed + 1,
        )
        draft_vocab = ModelConfig.from_hf(load_hf_config(path)).vocab_size
        check_compatible(config.model, path, target.model_config.vocab_size, draft_vocab)
        self.runner = ModelRunner(draft_cfg)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.max_model_len = self.runner.max_model_len
        self.max_batched_tokens = config.max_num_batched_tokens
        self._mirrors: dict[Sequence, Sequence] = {}
        self.clock: Callable[[], float] = time.perf_counter  # what `seconds_per_forward` is measured in

    # -------------------------------------------------------------- mirrors
    def sync(self, seq: Sequence) -> Sequence:
        """The mirror of `seq`, holding `seq`'s tokens now (created, with prefix hits, if new)."""
        m = self._mirrors.get(seq)
        if m is None:
            m = dataclasses.replace(seq, token_ids=list(seq.token_ids), num_computed_tokens=0, block_table=[],
                                    block_hashes=[], detokenizer=None, logprobs=[], extra={},
                                    prompt_logprobs=[], grammar=None)
            cached = self.block_manager.lookup(m.token_ids, m.num_tokens - 1)
            if cached and self.block_manager.allocate_slots(m, 0, cached):
                m.num_computed_tokens = len(cached) * self.block_manager.block_size
            self._mirrors[seq] = m
        else:
            m.token_ids = list(seq.token_ids)
            self.block_manager.cache_full_blocks(m)
        return m

    def rollback(self, seq: Sequence, num_valid: int) -> None:
        """Keep the draft KV of `seq`'s first `num_valid` positions at most; free blocks past them."""
        m = self._mirrors.get(seq)
        if m is None:
            return
        m.num_computed_tokens = min(m.num_computed_tokens, num_valid)
        self.block_manager.truncate(m, m.num_computed_tokens)

    def release(self, seq: Sequence) -> None:
        m = self._mirrors.pop(seq, None)
        if m is not None:
            self.block_manager.free(m)

    def release_stale(self) -> None:
        """Free the mirrors of sequences that stopped running (finished, aborted or preempted)."""
        for seq in [s for s in self._mirrors if s.status is not SequenceStatus.RUNNING]:
            self.release(seq)

    # ------------------------------------------------------------- proposing
    def propose(self, seqs: list[Sequence], ks: list[int]) -> DraftOutput:
        """Draft up to ks[i] tokens after each of `seqs` (each has num_computed + 1 == num_tokens).

        A sequence the draft's pool or context cannot hold gets fewer tokens (possibly none).
        """
        bm = self.block_manager
        mirrors = [self.sync(s) for s in seqs]
        ks = list(ks)
        self._catch_up(mirrors, ks)
        t0 = self.clock()
        first = 0.0
        forwards = 0
        tokens: list[list[int]] = [[] for _ in seqs]
        qrows: list[list[Tensor]] = [[] for _ in seqs]
        for depth in range(max(ks, default=0)):
            # depth 0 feeds what the catch-up left (the last accepted tokens), later depths one draft
            rows: list[int] = []
            counts: list[int] = []
            for i, k in enumerate(ks):
                n = mirrors[i].num_uncomputed_tokens
                if k > depth and bm.allocate_slots(mirrors[i], n):
                    rows.append(i)
                    counts.append(n)
                elif k > depth:
                    ks[i] = depth  # the draft's pool is full
            if not rows:
                break
            step = StepInput([mirrors[i] for i in rows], counts, [True] * len(rows))
            logits = self.runner.forward_logits(step)  # (len(rows), V)
            if not forwards:
                first = self.clock() - t0
            forwards += 1
            batch = self.runner.sampling_batch(step.seqs)
            drawn = self.runner.sampler(logits, batch).token_ids.tolist()
            need_q = {r for r, i in enumerate(rows) if _draws_from_q(seqs[i])}
            q = probabilities(logits, batch) if need_q else None  # (len(rows), V)
            for r, i in enumerate(rows):
                m = mirrors[i]
                m.num_computed_tokens += counts[r]
                m.token_ids.append(drawn[r])
                tokens[i].append(drawn[r])
                if q is not None and r in need_q:
                    qrows[i].append(q[r])
        probs = [torch.stack(qrows[i]) if qrows[i] and len(qrows[i]) == len(tokens[i]) else None
                 for i in range(len(seqs))]
        later = (self.clock() - t0 - first) / (forwards - 1) if forwards > 1 else 0.0
        return DraftOutput(tokens, probs, first, later)

    def _catch_up(self, mirrors: list[Sequence], ks: list[int]) -> None:
        """Compute the draft KV of every mirror to within `_INLINE` tokens of its end, in budget-sized
        chunks (a prompt's draft prefill); the first proposal forward feeds the rest."""
        bm = self.block_manager
        while True:
            budget = self.max_batched_tokens
            todo: list[Sequence] = []
            counts: list[int] = []
            for i, m in enumerate(mirrors):
                left = m.num_uncomputed_tokens - _INLINE
                if ks[i] == 0 or left <= 0 or budget <= 0:
                    continue
                n = min(left, budget)
                if not bm.allocate_slots(m, n):
                    ks[i] = 0  # the draft pool is full: this sequence does not speculate now
                    continue
                todo.append(m)
                counts.append(n)
                budget -= n
            if not todo:
                return
            self.runner.forward_logits(StepInput(todo, counts, [False] * len(todo)))
            for m, n in zip(todo, counts, strict=True):
                m.num_computed_tokens += n

    @property
    def num_mirrors(self) -> int:
        return len(self._mirrors)


def _draws_from_q(seq: Sequence) -> bool:
    """Rows the rejection rule verifies: sampled (not greedy) and unseeded."""
    return not seq.params.greedy and seq.params.seed is None
