"""Adaptive speculation length: verify drafts only where they pay for themselves, as measured.

Sequence i's draft at depth j is emitted with probability r_i * c_2 * ... * c_j (`Acceptance`:
its depth-1 rate, and the engine's rates at deeper depths given the earlier drafts were kept).
Verifying it costs a row in the target's forward (and, for a draft model, a share of the draft's
forwards). Each step the policy sorts all candidate draft tokens by that expected gain and takes
the prefix that maximises

    (tokens the step emits)  /  (predicted seconds of the step)
    = (sampling sequences + sum of gains)  /  (overhead + t_target(scheduled + drafts) + depth * t_draft(width))

with t_target and t_draft learned online from measured forwards (`CostModel`), and the step's
overhead outside them (scheduling, bookkeeping) measured too. While a forward's
cost barely depends on its token count (small batches; memory-bound), drafts are nearly free and k
stays high; when the batch is large enough to be compute-bound, each extra row costs about as much
as the tokens it may yield and k shrinks, down to 0 (no speculation: exactly the plain engine's
step). Whatever the policy, the verify forward never exceeds `max_num_batched_tokens`.

Unmeasured sizes are predicted flat (optimistically) from their measured neighbours, so each is
tried, then known; every `probe_every` steps that stopped short of the most drafts, one more draft
per sequence is tried, which keeps the estimates fresh when load or acceptance changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.sequence import Sequence

_BUCKETS_PER_OCTAVE = 4
_NUM_BUCKETS = 24 * _BUCKETS_PER_OCTAVE  # token counts up to 2**24
_WINDOW = 8


class CostModel:
    """Seconds per forward as a function of its token count, learned from measured forwards.

    Forwards are bucketed by token count, four buckets per doubling; each bucket keeps its last
    `window` measurements and is represented by their medians (token count, seconds). The median
    ignores the occasional slow outlier of a shared machine (another process, a GC pause), which
    would make a rarely measured size look expensive for long, and, unlike a minimum, does not favour
    the sizes measured most often. `predict` interpolates linearly between buckets and extrapolates
    flat beyond them (optimistic: an unmeasured size gets tried, then known); it returns zeros while
    nothing has been measured.
    """

    def __init__(self, window: int = _WINDOW) -> None:
        self._tokens = np.full((_NUM_BUCKETS, window), np.nan)
        self._seconds = np.full((_NUM_BUCKETS, window), np.nan)
        self._count = np.zeros(_NUM_BUCKETS, dtype=np.int64)
        self._curve: tuple[np.ndarray, np.ndarray] | None = None  # (tokens, seconds) per measured bucket

    @property
    def measured(self) -> bool:
        return bool(self._count.any())

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or seconds <= 0:
            return
        b = min(int(_BUCKETS_PER_OCTAVE * np.log2(tokens)), _NUM_BUCKETS - 1)
        slot = self._count[b] % self._tokens.shape[1]
        self._tokens[b, slot], self._seconds[b, slot] = tokens, seconds
        self._count[b] += 1
        self._curve = None

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        """Predicted seconds (same shape as `tokens`) of forwards of these token counts."""
        if not self.measured:
            return np.zeros(np.shape(tokens))
        if self._curve is None:
            seen = np.flatnonzero(self._count)  # ascending buckets: ascending token counts
            self._curve = (np.nanmedian(self._tokens[seen], axis=1), np.nanmedian(self._seconds[seen], axis=1))
        return np.interp(tokens, *self._curve)


_MAX_DEPTH = 16


@dataclass
class Acceptance:
    """How likely a draft token is to be kept, by depth and by sequence.

    A draft at depth j is only tried when drafts 1..j-1 were kept, so the engine keeps decayed counts
    per depth of drafts tried and kept: c_j = kept_j / tried_j is the rate at depth j *given* the
    drafts before it were kept (an n-gram copy that starts right tends to stay right, so c_j grows
    with j; a draft model's is flatter). Each sequence keeps its own depth-1 counts, smoothed toward
    c_1, since that is where sequences differ most (a prompt that repeats itself, or not). The
    chance that sequence i's draft at depth j is emitted is then r_i * c_2 * ... * c_j.
    """

    decay: float = 0.995
    prior_weight: float = 2.0
    prior: float = 0.6  # optimistic enough to try speculating at all
    kept: np.ndarray = field(default_factory=lambda: np.full(_MAX_DEPTH, 1.2))  # prior * prior_weight
    tried: np.ndarray = field(default_factory=lambda: np.full(_MAX_DEPTH, 2.0))
    _per_seq: dict[Sequence, tuple[int, int]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """The engine's depth-1 rate c_1."""
        return float(self.kept[0] / self.tried[0])

    def of(self, seq: Sequence) -> float:
        """r_i: `seq`'s depth-1 rate, smoothed toward the engine's."""
        a, t = self._per_seq.get(seq, (0, 0))
        return (a + self.prior_weight * self.rate) / (t + self.prior_weight)

    def depth_factors(self, k: int) -> np.ndarray:
        """(k,) float64: [1, c_2, c_2 c_3, ...], what depth j adds to a sequence's depth-1 rate."""
        c = self.kept[:k] / self.tried[:k]
        return np.concatenate([[1.0], np.cumprod(c[1:])])

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """A verification: `accepted` of `proposed` drafts; depths after a rejection were not tried."""
        if proposed < 1:
            return
        tried = min(accepted + 1, proposed)
        self.kept *= self.decay
        self.tried *= self.decay
        self.kept[:accepted] += 1
        self.tried[:tried] += 1
        a, t = self._per_seq.get(seq, (0, 0))
        self._per_seq[seq] = (a + (accepted > 0), t + 1)

    def forget(self, seq: Sequence) -> None:
        self._per_seq.pop(seq, None)


class SpecPolicy:
    def __init__(self, max_batched_tokens: int, adaptive: bool, has_draft_model: bool,
                 probe_every: int = 32) -> None:
        self.max_batched_tokens = max_batched_tokens
        self.adaptive = adaptive
        self.has_draft_model = has_draft_model
        self.probe_every = probe_every
        self.target_cost = CostModel()
        self.draft_cost = CostModel()
        self.acceptance = Acceptance()
        self._overhead = np.full(16, np.nan)  # recent seconds per step outside execute (schedule, process)
        self._overheads = 0
        self._steps = 0

    def observe_overhead(self, seconds: float) -> None:
        """A step's time outside the forwards: it does not grow with drafts, so drafts amortise it."""
        self._overhead[self._overheads % len(self._overhead)] = seconds
        self._overheads += 1

    def choose(self, caps: list[int], rates: list[float], scheduled_tokens: int, num_sampling: int,
               *, final: bool = True) -> list[int]:
        """Draft tokens to verify per candidate: 0 <= ks[i] <= caps[i].

        caps[i]: the most drafts candidate i may verify; rates[i]: its depth-1 rate (`Acceptance.of`);
        scheduled_tokens: tokens the step computes without drafts; num_sampling: sequences sampling.
        final=False: a preliminary question (would drafting pay at these caps?) that does not count
        as a step; every `probe_every`-th final step that stops short of the most drafts takes one
        more draft per sequence.
        """
        if final:
            self._steps += 1
        budget = max(0, self.max_batched_tokens - scheduled_tokens)
        if budget == 0 or not any(caps):
            return [0] * len(caps)
        # candidate draft tokens (sequence i, depth j) by expected gain, deepest last
        seq_idx = np.repeat(np.arange(len(caps)), caps)
        depth = np.concatenate([np.arange(1, c + 1) for c in caps])
        factors = self.acceptance.depth_factors(max(caps))  # (max k,)
        gain = np.asarray(rates, dtype=np.float64)[seq_idx] * factors[depth - 1]
        order = np.lexsort((depth, -gain))[:budget]
        if not self.adaptive or not self.target_cost.measured:
            m = len(order)
        else:
            m = self._best_prefix(gain[order], depth[order], scheduled_tokens, num_sampling)
            if final and m < len(order) and self._steps % self.probe_every == 0:
                m = min(len(order), m + max(1, int(np.count_nonzero(depth == 1))))
        ks = np.bincount(seq_idx[order[:m]], minlength=len(caps))
        return [int(k) for k in ks]

    @property
    def probe_due(self) -> bool:
        """Whether the next final `choose` may probe."""
        return self.adaptive and (self._steps + 1) % self.probe_every == 0

    def _best_prefix(self, gain: np.ndarray, depth: np.ndarray, scheduled: int, sampling: int) -> int:
        """How many of the sorted candidates to take: the prefix with the best predicted tokens/s."""
        total = len(gain)
        m = np.arange(total + 1)
        emitted = sampling + np.concatenate([[0.0], np.cumsum(gain)])
        seconds = self.target_cost.predict(scheduled + m)
        if self._overheads:  # median: an idle gap between steps now and then is not overhead
            seconds = seconds + float(np.nanmedian(self._overhead))
        if self.has_draft_model:
            deepest = np.concatenate([[0], np.maximum.accumulate(depth)])
            width = np.concatenate([[0], np.cumsum(depth == 1)])
            seconds = seconds + deepest * self.draft_cost.predict(np.maximum(width, 1))
        return int(np.argmax(emitted / np.maximum(seconds, 1e-9)))  # ties: fewer drafts
