"""Adaptive speculation length: verify drafts only where they pay for themselves, as measured.

A draft token at depth j of sequence i is emitted with probability a_i^j (a_i: that sequence's
acceptance rate per draft token, estimated from its history and the engine's). Verifying it costs a
row in the target's forward (and, for a draft model, a share of the draft's forwards). Each step the
policy sorts all candidate draft tokens by that expected gain and takes the prefix that maximises

    (tokens the step emits)  /  (predicted seconds of the step)
    = (sampling sequences + sum of gains)  /  (t_target(scheduled + drafts) + depth * t_draft(width))

with t_target and t_draft learned online from measured forwards (`CostModel`). At batch 1 a forward's
cost barely depends on its token count, so drafts are nearly free and k stays high; when the batch is
large enough to be compute-bound, each extra row costs about as much as the tokens it may yield and
k shrinks, down to 0 (no speculation: exactly the plain engine's step). Whatever the policy, the
verify forward never exceeds `max_num_batched_tokens`.

Unmeasured sizes are predicted flat (optimistically) from their measured neighbours, so each is
tried, then known; every `probe_every` steps that stopped short of the most drafts, one more draft
per sequence is tried, which keeps the estimates fresh when load or acceptance changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.sequence import Sequence

_NUM_BUCKETS = 24  # token counts up to 2**23


class CostModel:
    """Seconds per forward as a function of its token count, learned from measured forwards.

    Bucket b holds forwards of 2**(b-1) <= tokens < 2**b; each keeps exponential moving averages of
    their token count and seconds. `predict` interpolates linearly between measured buckets and
    extrapolates flat beyond them; it returns zeros while nothing has been measured.
    """

    def __init__(self, decay: float = 0.2) -> None:
        self.decay = decay
        self._tokens = np.zeros(_NUM_BUCKETS)
        self._seconds = np.zeros(_NUM_BUCKETS)
        self._seen = np.zeros(_NUM_BUCKETS, dtype=bool)

    @property
    def measured(self) -> bool:
        return bool(self._seen.any())

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or seconds <= 0:
            return
        b = min(int(tokens).bit_length(), _NUM_BUCKETS - 1)
        if not self._seen[b]:
            self._tokens[b], self._seconds[b], self._seen[b] = tokens, seconds, True
            return
        d = self.decay
        self._tokens[b] += d * (tokens - self._tokens[b])
        self._seconds[b] += d * (seconds - self._seconds[b])

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        """Predicted seconds (same shape as `tokens`) of forwards of these token counts."""
        if not self.measured:
            return np.zeros(np.shape(tokens))
        xs, ys = self._tokens[self._seen], self._seconds[self._seen]  # ascending: buckets are ordered
        return np.interp(tokens, xs, ys)


@dataclass
class Acceptance:
    """Per-draft-token acceptance rates: the engine's (decayed) and each sequence's (smoothed to it)."""

    decay: float = 0.995
    prior_weight: float = 2.0
    accepted: float = 1.2  # a prior of 0.6: optimistic enough to try speculating at all
    trials: float = 2.0
    _per_seq: dict[Sequence, tuple[int, int]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.accepted / self.trials

    def of(self, seq: Sequence) -> float:
        a, t = self._per_seq.get(seq, (0, 0))
        return (a + self.prior_weight * self.rate) / (t + self.prior_weight)

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """A verification: `accepted` of `proposed` drafts; positions after a rejection were not tried."""
        if proposed < 1:
            return
        tried = min(accepted + 1, proposed)
        self.accepted = self.accepted * self.decay + accepted
        self.trials = self.trials * self.decay + tried
        a, t = self._per_seq.get(seq, (0, 0))
        self._per_seq[seq] = (a + accepted, t + tried)

    def forget(self, seq: Sequence) -> None:
        self._per_seq.pop(seq, None)


class SpecPolicy:
    def __init__(self, max_batched_tokens: int, adaptive: bool, has_draft_model: bool,
                 probe_every: int = 64) -> None:
        self.max_batched_tokens = max_batched_tokens
        self.adaptive = adaptive
        self.has_draft_model = has_draft_model
        self.probe_every = probe_every
        self.target_cost = CostModel()
        self.draft_cost = CostModel()
        self.acceptance = Acceptance()
        self._steps = 0

    def choose(self, caps: list[int], rates: list[float], scheduled_tokens: int, num_sampling: int) -> list[int]:
        """Draft tokens to verify per candidate: 0 <= ks[i] <= caps[i].

        caps[i]: the most drafts candidate i may verify; rates[i]: its acceptance estimate;
        scheduled_tokens: tokens the step computes without drafts; num_sampling: sequences sampling.
        """
        budget = max(0, self.max_batched_tokens - scheduled_tokens)
        if budget == 0 or not any(caps):
            return [0] * len(caps)
        # candidate draft tokens (sequence i, depth j) by expected gain rates[i]**j, deepest last
        seq_idx = np.repeat(np.arange(len(caps)), caps)
        depth = np.concatenate([np.arange(1, c + 1) for c in caps])
        gain = np.asarray(rates, dtype=np.float64)[seq_idx] ** depth
        order = np.lexsort((depth, -gain))[:budget]
        if not self.adaptive or not self.target_cost.measured:
            m = len(order)
        else:
            m = self._best_prefix(gain[order], depth[order], scheduled_tokens, num_sampling)
        ks = np.bincount(seq_idx[order[:m]], minlength=len(caps))
        return [int(k) for k in ks]

    def _best_prefix(self, gain: np.ndarray, depth: np.ndarray, scheduled: int, sampling: int) -> int:
        """How many of the sorted candidates to take: the prefix with the best predicted tokens/s."""
        total = len(gain)
        m = np.arange(total + 1)
        emitted = sampling + np.concatenate([[0.0], np.cumsum(gain)])
        seconds = self.target_cost.predict(scheduled + m)
        if self.has_draft_model:
            deepest = np.concatenate([[0], np.maximum.accumulate(depth)])
            width = np.concatenate([[0], np.cumsum(depth == 1)])
            seconds = seconds + deepest * self.draft_cost.predict(np.maximum(width, 1))
        best = int(np.argmax(emitted / np.maximum(seconds, 1e-9)))  # ties: fewer drafts
        self._steps += 1
        if best < total and self._steps % self.probe_every == 0:
            best = min(total, best + max(1, int(np.count_nonzero(depth == 1))))
        return best
