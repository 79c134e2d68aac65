"""Adaptive speculation length: verify drafts only where they pay for themselves, as measured.

Sequence i's draft at depth j is emitted with probability r_i * c_2 * ... * c_j (`Acceptance`:
its depth-1 rate, and the engine's rates at deeper depths given the earlier drafts were kept).
Verifying it costs a row in the target's forward (and, for a draft model, a share of the draft's
forwards). Each step the policy sorts all candidate draft tokens by that expected gain and takes
the prefix that maximises

    (tokens the step emits)  /  (predicted seconds of the step)
    = (sampling sequences + sum of gains)
      / (overhead + t_target(scheduled + drafts) + t_first(width) + (depth - 1) * t_draft(width))

with t_target, t_first (a proposal's first draft forward, which also feeds the tokens accepted last
step, so it costs more than the later ones) and t_draft learned online from measured forwards
(`CostModel`), and the step's
overhead outside them (scheduling, bookkeeping) measured too. While a forward's
cost barely depends on its token count (small batches; memory-bound), drafts are nearly free and k
stays high; when the batch is large enough to be compute-bound, each extra row costs about as much
as the tokens it may yield and k shrinks, down to 0 (no speculation: exactly the plain engine's
step). It speculates only when that beats not speculating by `margin` (15%): near break-even the
estimates' own errors would decide, and the point is never to be slower than not speculating.
Whatever the policy, the verify forward never exceeds `max_num_batched_tokens`.

Unmeasured sizes are predicted flat (optimistically) from their measured neighbours, so each is
tried, then known; every `probe_every` steps that stopped short of the most drafts, more drafts are
tried (n-gram: one more per sequence; draft model: one more for the best sequence, since every
sequence it drafts for must first have the draft's KV of its context), which keeps the estimates
fresh when load or acceptance changes (while the probes keep finding speculation off, they back
off to one in 512 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.sequence import Sequence

_BUCKETS_PER_OCTAVE = 4
_NUM_BUCKETS = 24 * _BUCKETS_PER_OCTAVE  # token counts up to 2**24


def _robust_update(estimate: float, value: float, decay: float) -> float:
    """A moving average that lets a value count for at most twice the estimate: a slow outlier of a
    shared machine (another process, a GC pause) moves it a little, a sustained change within a few
    updates, an improvement at once."""
    return estimate + decay * (min(value, 2.0 * estimate) - estimate)


_MAX_WEIGHT = 32  # a bucket's weight in the fit: its measurements, up to this many


def _nondecreasing(values: list[float], weights: list[int]) -> list[float]:
    """The nondecreasing sequence closest to `values` in weighted least squares (pool adjacent
    violators: a run that decreases is replaced by its weighted mean)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks[-1]
            blocks[-1] = [(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    return [mean for mean, _, n in blocks for _ in range(int(n))]


class CostModel:
    """Seconds per forward as a function of its token count, learned from measured forwards.

    Forwards are bucketed by token count, four buckets per doubling; each bucket keeps robust moving
    averages of its token count and seconds, and how often it was measured. The curve through the
    buckets is then made physical: a forward over more tokens never costs less (a fit weighted by
    those counts, so one slow measurement of a rarely seen size is outvoted by the sizes seen every
    step, not copied up the curve), nor more per token (batching only amortises). That keeps a noisy
    estimate of a rarely measured size from shutting speculation off for long.
    `predict` interpolates linearly between buckets and extrapolates flat beyond them (optimistic:
    an unmeasured size gets tried, then known); it returns zeros while nothing has been measured.
    """

    def __init__(self, decay: float = 0.1) -> None:
        self.decay = decay
        self._tokens = [0.0] * _NUM_BUCKETS
        self._seconds = [0.0] * _NUM_BUCKETS
        self._count = [0] * _NUM_BUCKETS
        self._curve: tuple[np.ndarray, np.ndarray] | None = None  # (tokens, seconds) per measured bucket

    @property
    def measured(self) -> bool:
        return any(self._seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or seconds <= 0:
            return
        b = min(int(_BUCKETS_PER_OCTAVE * math.log2(tokens)), _NUM_BUCKETS - 1)
        if self._seconds[b] == 0.0:
            self._tokens[b], self._seconds[b] = float(tokens), seconds
        else:
            self._tokens[b] += self.decay * (tokens - self._tokens[b])
            self._seconds[b] = _robust_update(self._seconds[b], seconds, self.decay)
        self._count[b] = min(self._count[b] + 1, _MAX_WEIGHT)
        self._curve = None

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        """Predicted seconds (same shape as `tokens`) of forwards of these token counts."""
        if self._curve is None:
            seen = [b for b, y in enumerate(self._seconds) if y > 0]
            xs = [self._tokens[b] for b in seen]
            ys = _nondecreasing([self._seconds[b] for b in seen], [self._count[b] for b in seen])
            for i in range(1, len(ys)):  # nor more per token
                ys[i] = min(ys[i], ys[i - 1] * xs[i] / xs[i - 1])
            self._curve = (np.asarray(xs), np.asarray(ys))
        if not len(self._curve[0]):
            return np.zeros(np.shape(tokens))
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
    prior_weight: float = 6.0  # a few early rejections must not switch a sequence off for good
    # a prior of 0.6 worth 8 tries per depth: a few unlucky first verifications do not end speculation
    kept: np.ndarray = field(default_factory=lambda: np.full(_MAX_DEPTH, 4.8))
    tried: np.ndarray = field(default_factory=lambda: np.full(_MAX_DEPTH, 8.0))
    _per_seq: dict[Sequence, tuple[int, int]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """The engine's depth-1 rate c_1."""
        return float(self.kept[0] / self.tried[0])

    def of(self, seqs: list[Sequence]) -> list[float]:
        """r_i for each of `seqs`: its depth-1 rate, smoothed toward the engine's."""
        w, prior = self.prior_weight, self.prior_weight * self.rate
        return [(a + prior) / (t + w) for a, t in (self._per_seq.get(s, (0, 0)) for s in seqs)]

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
                 probe_every: int = 32, margin: float = 0.15) -> None:
        self.max_batched_tokens = max_batched_tokens
        self.adaptive = adaptive
        self.has_draft_model = has_draft_model
        self.probe_every = probe_every
        self._probe_interval = probe_every
        self.margin = margin
        self.target_cost = CostModel()
        self.draft_first_cost = CostModel()  # a proposal's first draft forward (feeds accepted tokens too)
        self.draft_cost = CostModel()  # each later one
        self.acceptance = Acceptance()
        self.overhead = 0.0  # seconds per step outside the forwards (scheduling, bookkeeping)
        self._steps = 0
        self.recheck = 8  # steps a choice of no drafts stands before it is made again (`skip`)
        self._off: tuple[int, int] | None = None  # (candidates, step) of the last choice of no drafts
        self.probed = -1  # the candidate the last final choice probed with a draft model (-1: none)
        self._best_ratio = 0.0  # the last evaluation's best predicted tokens/s with drafts over without

    def observe_overhead(self, seconds: float) -> None:
        """A step's time outside the forwards: it does not grow with drafts, so drafts amortise it."""
        self.overhead = _robust_update(self.overhead, seconds, 0.1) if self.overhead else seconds

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
            self.probed = -1
        budget = max(0, self.max_batched_tokens - scheduled_tokens)
        if budget == 0 or not any(caps):
            return [0] * len(caps)
        # candidate draft tokens (sequence i, depth j) by expected gain, deepest last
        cap = np.asarray(caps)
        seq_idx = np.repeat(np.arange(len(caps)), cap)
        depth = np.arange(len(seq_idx)) - np.repeat(np.cumsum(cap) - cap, cap) + 1
        factors = self.acceptance.depth_factors(max(caps))  # (max k,)
        gain = np.asarray(rates, dtype=np.float64)[seq_idx] * factors[depth - 1]
        order = np.lexsort((depth, -gain))[:budget]
        probed = -1
        if not self.adaptive or not self.target_cost.measured:
            m = len(order)
        else:
            m = self._best_prefix(gain[order], depth[order], scheduled_tokens, num_sampling)
            if final and m < len(order) and self._steps % self._probe_interval == 0:
                # back off while probes keep finding speculation off: they cost a draft forward
                self._probe_interval = min(2 * self._probe_interval, 512) if m == 0 else self.probe_every
                if self.has_draft_model:
                    # the next-best sequence alone, with every draft it may take: each sequence a
                    # draft model drafts for first needs the draft's KV of its whole context (no
                    # later step repays that while drafting is off), and its deeper depths are
                    # what the estimates of c_2.. need
                    probed = int(seq_idx[order[m]])
                else:  # n-gram drafts are free to look up: one more on every sequence
                    m = min(len(order), m + max(1, int(np.count_nonzero(depth == 1))))
        ks = np.bincount(seq_idx[order[:m]], minlength=len(caps))
        if probed >= 0:
            ks[probed] = np.count_nonzero(seq_idx[order] == probed)
        if final:
            self.probed = probed
            self._off = (len(caps), self._steps) if not ks.any() else None
        return [int(k) for k in ks]

    def probe_outcome(self, proposed: int, accepted: int) -> None:
        """The verification of a draft-model probe: when it kept most of its drafts and drafting was
        already predicted to break even (only the margin held it off), the next probe comes at the
        usual interval (no back-off): acceptance may be turning up (a sequence that starts to repeat
        itself), and the estimates should see it soon. Where drafting is far from paying (a large
        batch), the back-off stands: probes there cost more than they could find."""
        if 2 * accepted >= proposed and self._best_ratio >= 1.0:
            self._probe_interval = self.probe_every

    def skip(self, num_candidates: int) -> bool:
        """Whether a step may skip choosing (and count as a step that drafts nothing): the last
        choice, fewer than `recheck` steps ago and for as many candidates, drafted nothing, and no
        probe is due. Saves the per-step cost of the policy while speculation is off."""
        if (self._off is None or self._off[0] != num_candidates or self._steps - self._off[1] >= self.recheck
                or self.probe_due):
            return False
        self._steps += 1
        return True

    @property
    def probe_due(self) -> bool:
        """Whether the next final `choose` may probe."""
        return self.adaptive and (self._steps + 1) % self._probe_interval == 0

    def _best_prefix(self, gain: np.ndarray, depth: np.ndarray, scheduled: int, sampling: int) -> int:
        """How many of the sorted candidates to take: the prefix with the best predicted tokens/s."""
        total = len(gain)
        m = np.arange(total + 1)
        emitted = sampling + np.concatenate([[0.0], np.cumsum(gain)])
        seconds = self.target_cost.predict(scheduled + m) + self.overhead
        if self.has_draft_model:
            deepest = np.concatenate([[0], np.maximum.accumulate(depth)])
            width = np.concatenate([[0], np.cumsum(depth == 1)])
            w = np.maximum(width, 1)
            seconds = (seconds + (deepest > 0) * self.draft_first_cost.predict(w)
                       + np.maximum(deepest - 1, 0) * self.draft_cost.predict(w))
        value = emitted / np.maximum(seconds, 1e-9)
        best = int(np.argmax(value))  # ties: fewer drafts
        self._best_ratio = float(value[1:].max(initial=0.0) / max(value[0], 1e-12))  # best with drafts
        # near break-even the estimates' errors decide the sign: only speculate for a clear win
        return best if value[best] > value[0] * (1.0 + self.margin) else 0
