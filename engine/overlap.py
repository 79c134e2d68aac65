"""Overlapped steps (async scheduling): step N+1 is scheduled and its inputs prepared while step N's
forward runs, before step N's tokens are known.

    engine thread:   schedule N+1 | prepare N+1 | launch N+1 | wait N | process N (text, stops) | ...
    forward thread:  ...forward N ........................... | fill N+1's inputs | forward N+1 ...

A step is *launched* with its counters already advanced (`launch`): each of its sequences counts its
new tokens as computed, and each sampling sequence gets a placeholder token (-1) where its sampled
token will go, so the scheduler can give it its next decode at once. The next step's input at a
placeholder is filled on the forward thread from the previous forward's sampled token ids (a tensor
gather, `OverlapRunner.run`), never read on the host. `Engine.process` later writes the real token
into the placeholder and applies stop conditions. What this costs and why it stays exact:

* a sequence that finishes in step N (EOS, stop token, stop string) was already scheduled in N+1: it
  computes one more token there, which is dropped (the engine skips finished sequences, as for an
  abort while a step runs); a sequence that will reach max_tokens is not scheduled again at all.
  Its blocks are freed while N+1 may still write into them; forwards run in order on one thread, so
  a block handed out again is written by its new owner after that stale write, and only positions a
  sequence has written are ever read.
* Greedy and seeded draws depend only on the sequence (its logits and its output count), so the
  tokens equal those of serial steps. Unseeded draws share one generator with the whole batch and
  differ from a serial run's whenever batches differ (as they do between any two runs).
* Steps whose sampling reads output token *values* on the host (penalties, bad_words), or that fork
  choices, compute prompt logprobs, run prefill-only sequences or speculate, are not overlapped
  (`can_overlap`): the loop finishes the step in flight and runs them serially. So are steps with a
  constrained sequence (structured outputs): its next token mask needs the token sampled before it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.model import ForwardContext
from engine.model_runner import ModelRunner, StepInput
from engine.sampling.batch import SamplingBatch
from engine.sampling.sampler import SamplerOutput
from engine.sequence import Sequence

PLACEHOLDER = -1


def can_overlap(step: StepInput) -> bool:
    """Whether `step` may be launched before the previous step's tokens are known (see module doc)."""
    if step.spec_tokens is not None:
        return False
    for seq in step.seqs:
        p = seq.params
        if (seq.pending_forks or seq.prefill_only or seq.bad_words_ids or p.needs_penalties
                or seq.wants_prompt_logprobs or seq.grammar is not None):
            return False
    return True


@dataclass
class Prepared:
    """A step's forward inputs, built on the engine thread. input_ids holds PLACEHOLDER at `fill_rows`,
    filled from rows `fill_from` of the previous forward's sampled token ids."""

    step: StepInput
    input_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    ctx: ForwardContext
    logits_idx: Tensor  # (R,) int64
    batch: SamplingBatch | None  # None: no sequence samples
    fill_rows: Tensor | None  # (F,) int64 rows of input_ids
    fill_from: Tensor | None  # (F,) int64 rows of the previous step's sampled token ids


class OverlapRunner:
    """The engine-thread half (`prepare`, `launch`) and forward-thread half (`run`) of overlapped steps.

    The next step's placeholders are filled from the sampler rows of the last launched step, whose
    sampling sequences (one row each: an overlapped step forks nothing) are its rows in order
    (`_sources`). Only the forward thread calls `run`, in launch order.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._launched: StepInput | None = None  # the last launched step: its samples fill placeholders
        self._last_tokens: Tensor | None = None  # forward thread: the last forward's sampled ids
        self._overlaps: list[Sequence] = []  # the sequences of the last step `can_overlap` allowed

    def can_overlap(self, step: StepInput) -> bool:
        """`can_overlap(step)`; what makes a sequence's step serial never comes back (forks, prompt
        logprobs are done once; the rest is fixed), so a step of the same sequences as the last one
        allowed is allowed without looking at each."""
        if step.spec_tokens is None and len(step.seqs) == len(self._overlaps) and all(
                map(operator.is_, step.seqs, self._overlaps)):
            return True
        ok = can_overlap(step)
        self._overlaps = list(step.seqs) if ok else []
        return ok

    def prepare(self, step: StepInput) -> Prepared:
        """Inputs of `step` (engine thread), its placeholders mapped to the last launched step's rows."""
        runner = self.runner
        arrays = runner.inputs.prepare(step)
        # A placeholder can only be a sequence's last new token, and only the last launched step's.
        fill = np.flatnonzero(arrays.input_ids.numpy() == PLACEHOLDER)  # (F,) rows of input_ids
        sources = None
        if fill.size:
            owners = np.searchsorted(arrays.query_start_loc.numpy()[1:], fill, side="right")  # (F,)
            sources = self._sources(step.seqs, owners)
        input_ids, positions, ctx, logits_idx = runner.upload(arrays)
        sampled = step.seqs if all(step.sample) else [s for s, flag in zip(step.seqs, step.sample, strict=True) if flag]
        batch = runner.sampling_batch(sampled) if sampled else None
        dev = runner.device
        return Prepared(step, input_ids, positions, ctx, logits_idx, batch,
                        torch.from_numpy(fill).to(dev) if sources is not None else None,
                        torch.from_numpy(sources).to(dev) if sources is not None else None)

    def _sources(self, seqs: list[Sequence], owners: np.ndarray) -> np.ndarray:
        """(F,) int64: for each placeholder's sequence `seqs[owners[f]]`, its row in the last launched
        step's sampled token ids. A steady batch (the same sequences, each of which sampled) is its
        own map."""
        last = self._launched
        assert last is not None, "a placeholder without a launched step"
        if len(last.seqs) == len(seqs) and all(last.sample) and all(map(operator.is_, last.seqs, seqs)):
            return owners.astype(np.int64)
        sampled = (s for s, flag in zip(last.seqs, last.sample, strict=True) if flag)
        rows = {id(s): r for r, s in enumerate(sampled)}
        return np.array([rows[id(seqs[b])] for b in owners.tolist()], dtype=np.int64)

    def launch(self, step: StepInput) -> None:
        """Advance `step`'s counters as if it ran and give each sampling sequence a placeholder token
        (engine thread, after `prepare`)."""
        placeholder_at: list[int] = []
        at = placeholder_at.append
        for seq, n, sample in zip(step.seqs, step.num_new_tokens, step.sample, strict=True):
            seq.num_computed_tokens += n
            if sample:
                ids = seq.token_ids
                at(len(ids))
                ids.append(PLACEHOLDER)
            else:
                at(-1)
        step.placeholder_at = placeholder_at
        self._launched = step

    @torch.inference_mode()
    def run(self, prep: Prepared) -> SamplerOutput | None:
        """Forward thread: fill placeholders from the last forward's tokens, run the model, sample."""
        if prep.fill_rows is not None and prep.fill_from is not None:
            assert self._last_tokens is not None
            prep.input_ids[prep.fill_rows] = self._last_tokens[prep.fill_from]
        logits = self.runner._forward(prep.step, prep.input_ids, prep.positions, prep.ctx, prep.logits_idx)
        if prep.batch is None:
            return None
        out = self.runner.sampler(logits, prep.batch)
        self._last_tokens = out.token_ids
        return out

    def forget(self) -> None:
        """No step is in flight any more (a serial step ran): nothing to fill from."""
        self._launched = None


def without_finished(step: StepInput) -> StepInput | None:
    """`step` without the sequences that finished since it was scheduled (None if none is left)."""
    keep = [i for i, seq in enumerate(step.seqs) if not seq.is_finished]
    if len(keep) == len(step.seqs):
        return step
    if not keep:
        return None
    return StepInput([step.seqs[i] for i in keep], [step.num_new_tokens[i] for i in keep],
                     [step.sample[i] for i in keep], copies=step.copies)
