"""Batched token selection on the logits' device.

The pipeline, per row, in this order:

    logits (B, V) --repetition penalty--> --presence/frequency--> --logit_bias--> --allowed_token_ids-->
                  --min_tokens and bad_words bans--> --grammar masks-->  penalised
    penalised --log_softmax--> logprobs reported to the user
    penalised --/temperature--> --top-k--> --top-p--> --min-p--> probabilities --draw--> token

Greedy rows (temperature 0) take the argmax of the penalised logits. Truncation zeroes weights
below per-row thresholds (tokens tied with the last one kept stay in). The draw is an
exponential race: argmax(probs / E) with E ~ Exponential(1) i.i.d. picks token i with
probability probs[i], so the whole batch is sampled with one vectorised argmax (float32 CPU rows
through kernels.layer_ops_cpu.argmax_rows, torch.argmax's answer in one compiled pass). Rows without a
seed share one (B, V) noise draw from the sampler's generator; a seeded row's noise comes from a
generator seeded by `step_seed(seed, len(output))`, so it depends on nothing else in the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from engine.sampling.batch import SamplingBatch
from kernels.layer_ops_cpu import argmax_rows


class SamplerOutput(NamedTuple):
    """One step's choice for each of the B rows.

    logprobs and top_logprobs are log-probabilities of the model's distribution after penalties,
    logit_bias, allowed_token_ids, bans and grammar masks, before temperature and truncation. K is the batch's
    `max_logprobs`; a row that asked for fewer alternatives ignores the extra columns. top_* are None
    when K is 0; logprobs is None when no row asked for logprobs (no log_softmax is computed then).
    """

    token_ids: Tensor  # (B,) int64
    logprobs: Tensor | None  # (B,) float32: the chosen token's
    top_ids: Tensor | None  # (B, K) int64, most likely first
    top_logprobs: Tensor | None  # (B, K) float32, descending


def _check(logits: Tensor, batch: SamplingBatch) -> None:
    if logits.dim() != 2 or tuple(logits.shape) != (batch.size, batch.vocab_size):
        raise ValueError(
            f"logits have shape {tuple(logits.shape)}; the batch expects ({batch.size}, {batch.vocab_size})"
        )
    a, b = logits.device, batch.device
    if a.type != b.type or (a.index is not None and b.index is not None and a.index != b.index):
        raise ValueError(f"logits are on {a} but the sampling batch is on {b}")


def penalized_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """A float32 copy of `logits` (B, V) with penalties, logit_bias, allowed_token_ids and bans applied.

    Repetition penalty (Hugging Face): a token seen in the prompt or output has a positive logit
    divided by the penalty and a negative one multiplied by it. Presence/frequency (OpenAI):
    logit -= frequency * count + presence * (count > 0), over output tokens only. Then logit_bias is
    added, tokens outside a row's allowed_token_ids, banned tokens (min_tokens, bad_words) and tokens a
    row's grammar forbids (structured outputs) get -inf.
    Speculative verification samples through here too, so every one of these shapes the target's
    distribution exactly. `logits` itself is never modified. Raises ValueError on a shape or device
    mismatch.
    """
    _check(logits, batch)
    x = logits.to(torch.float32, copy=True)  # (B, V)
    pen = batch.penalties
    if pen is not None:
        sub = x.index_select(0, pen.rows)  # (P, V)
        rep = pen.repetition[:, None]  # (P, 1)
        sub = torch.where(pen.seen, torch.where(sub < 0, sub * rep, sub / rep), sub)
        counts = pen.output_counts  # (P, V)
        sub = sub - counts * pen.frequency[:, None] - (counts > 0).float() * pen.presence[:, None]
        x.index_copy_(0, pen.rows, sub)
    if batch.bias_rows is not None and batch.bias_cols is not None and batch.bias_values is not None:
        x.index_put_((batch.bias_rows, batch.bias_cols), batch.bias_values, accumulate=True)
    if batch.allowed_rows is not None and batch.allowed is not None:
        sub = x.index_select(0, batch.allowed_rows).masked_fill(~batch.allowed, float("-inf"))  # (A, V)
        x.index_copy_(0, batch.allowed_rows, sub)
    if batch.ban_rows is not None and batch.ban_cols is not None:
        x[batch.ban_rows, batch.ban_cols] = float("-inf")
    if batch.grammar_rows is not None and batch.grammar_forbidden is not None:
        if batch.grammar_rows.numel() == batch.size:  # every row (ascending, distinct): in place
            x.masked_fill_(batch.grammar_forbidden, float("-inf"))
        else:
            sub = x.index_select(0, batch.grammar_rows).masked_fill_(batch.grammar_forbidden, float("-inf"))
            x.index_copy_(0, batch.grammar_rows, sub)  # (M, V) rows back
    return x


def _one_hot(ids: Tensor, vocab_size: int) -> Tensor:
    """(B,) token ids -> (B, V) float32 rows with a single 1."""
    out = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
    return out.scatter_(1, ids[:, None], 1.0)


def _rank_threshold(scaled: Tensor, batch: SamplingBatch) -> Tensor:
    """The lowest scaled logit (B, 1) each row keeps after top-k then top-p; -inf where neither applies.

    Works on the W = `rank_width` largest values only (a top-W, or a full sort when some row has
    top-p without top-k) and returns a value, not a set of positions, so tokens tied with the
    last kept one are kept too and the result does not depend on how a sort orders ties.
    """
    v = batch.vocab_size
    if batch.rank_width < v:
        ranked = scaled.topk(batch.rank_width, dim=-1).values  # (B, W), descending
    else:
        ranked = scaled.sort(dim=-1, descending=True).values  # (B, V)
    rank = torch.arange(ranked.shape[1], device=scaled.device)  # (W,)
    keep = rank < batch.top_k[:, None]  # (B, W), a prefix of each row
    if batch.use_top_p:
        w = (ranked - ranked[:, :1]).exp() * keep  # (B, W): the same weights as in vocab order
        p = w / w.sum(dim=-1, keepdim=True)  # over the top-k survivors
        # Keep a token while the mass strictly above it is below top_p; the top token always stays.
        # Rows at top_p = 1 keep everything, even where float cumsum reaches 1 early.
        above = p.cumsum(dim=-1) - p  # (B, W), non-decreasing: keep stays a prefix
        top_p = batch.top_p[:, None]  # (B, 1)
        keep &= (above < top_p) | (top_p >= 1.0)
    last = keep.sum(dim=-1, keepdim=True) - 1  # (B, 1), >= 0
    threshold = ranked.gather(1, last)  # (B, 1)
    untruncated = (batch.top_k[:, None] >= v) & (batch.top_p[:, None] >= 1.0)  # (B, 1)
    return threshold.masked_fill(untruncated, float("-inf"))


def _weights(penalized: Tensor, batch: SamplingBatch) -> Tensor:
    """Unnormalised sampling weights (B, V) >= 0 from penalised logits (not modified).

    exp(scaled - max) puts each row's top token at exactly 1, so min-p is `w < min_p`. Truncation
    only zeroes weights, by per-row thresholds, so a row's weights come from its own logits alone:
    the same bits whichever stages other rows switch on. Greedy rows are one-hot at their argmax.
    """
    if batch.all_greedy:
        return _one_hot(argmax_rows(penalized), batch.vocab_size)
    scaled = penalized / batch.temperatures[:, None]  # (B, V)
    weights = (scaled - scaled.amax(dim=-1, keepdim=True)).exp()  # (B, V) in [0, 1]
    if batch.rank_width > 0:
        weights = weights.masked_fill(scaled < _rank_threshold(scaled, batch), 0.0)
    if batch.use_min_p:
        # After top-k/top-p, which always keep the top token: weight / top weight = prob / top prob.
        weights = weights.masked_fill(weights < batch.min_p[:, None], 0.0)
    if batch.any_greedy:
        one_hot = _one_hot(argmax_rows(penalized), batch.vocab_size)  # (B, V)
        weights = torch.where(batch.greedy[:, None], one_hot, weights)
    return weights


def probabilities(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """The exact distribution (B, V) float32 each row samples from after all processing.

    Greedy rows get a one-hot of their argmax. The sampler draws from the same weights before
    normalisation, so speculative decoding's rejection sampling can use this as the target.
    Raises ValueError on a shape or device mismatch; `logits` is not modified.
    """
    weights = _weights(penalized_logits(logits, batch), batch)  # (B, V)
    return weights / weights.sum(dim=-1, keepdim=True)


def _exponential(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Exponential(1) float32 noise as -log(U), U uniform in float64.

    float64 keeps the small values, which decide the race, finely spaced (float32 uniforms give
    steps of 6e-8 there), and on CPU it is ~3x faster than `exponential_`. U = 0 gives +inf: that
    token loses this draw, a 2**-53 event. Never 0, so a zero weight never becomes 0/0 = NaN.
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
    return u.log_().neg_().to(torch.float32)


class Sampler:
    """Chooses one token per row. Owns the generator unseeded rows draw from.

    seed: seeds that generator (per device) for reproducible unseeded draws in tests; None seeds
    it from the OS. Seeded requests never touch it. Not thread-safe: one sampler per worker loop.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}  # unseeded rows, per device
        self._per_row: dict[torch.device, torch.Generator] = {}  # reseeded for each seeded row

    def _generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        if device not in self._shared:
            shared = torch.Generator(device=device)
            if self._seed is None:
                shared.seed()
            else:
                shared.manual_seed(self._seed)
            self._shared[device] = shared
            self._per_row[device] = torch.Generator(device=device)
        return self._shared[device], self._per_row[device]

    def _noise(self, batch: SamplingBatch, device: torch.device) -> Tensor:
        """Exponential(1) noise (B, V) float32; rows that need none (greedy) hold 1."""
        shared, per_row = self._generators(device)
        b, v = batch.size, batch.vocab_size
        if batch.any_unseeded:
            noise = _exponential((b, v), shared, device)
        else:
            noise = torch.ones(b, v, dtype=torch.float32, device=device)
        for row, seed in batch.seeded_rows:
            per_row.manual_seed(seed)
            noise[row] = _exponential((v,), per_row, device)
        return noise

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of `logits` (B, V), any float dtype, upcast to float32.

        Does not modify `logits`. Advances the shared generator when some row draws unseeded.
        Raises ValueError when logits do not match the batch's shape or device.
        """
        if batch.all_greedy and batch.keeps_logits and not batch.want_logprobs:
            # Upcasting keeps every row's order and ties: the argmax of `logits` as they are, no copy.
            _check(logits, batch)
            return SamplerOutput(argmax_rows(logits), None, None, None)
        penalized = penalized_logits(logits, batch)  # (B, V)
        if batch.all_greedy:
            token_ids = argmax_rows(penalized)  # (B,)
        else:
            # Scaling a row does not move its argmax, so the unnormalised weights draw the same
            # token as `probabilities` would.
            weights = _weights(penalized, batch)  # (B, V)
            token_ids = argmax_rows(weights / self._noise(batch, penalized.device))  # (B,)
        if not batch.want_logprobs:
            return SamplerOutput(token_ids, None, None, None)
        logprobs = penalized.log_softmax(dim=-1)  # (B, V)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)  # (B,)
        if batch.max_logprobs == 0:
            return SamplerOutput(token_ids, chosen, None, None)
        # A vocabulary smaller than K (only in toy models) yields V columns.
        top = logprobs.topk(min(batch.max_logprobs, batch.vocab_size), dim=-1)  # (B, K), descending
        return SamplerOutput(token_ids, chosen, top.indices, top.values)
