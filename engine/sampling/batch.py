"""One step's sampling options as padded device tensors.

`SamplingBatch.build` runs once per engine step on the host: it reads each row's `SamplingParams`
and token history once and uploads a handful of tensors, so that `Sampler` does no per-row Python
work on its common paths. Rows are the batch's sequences in the order of the logits' rows.

Penalty state is built only for the P rows that have an active penalty, allowed-token masks only for
the rows that restrict them, and logit biases and bans (min_tokens, bad_words) are flat lists of
(row, token) pairs, so a batch without those features carries no (B, V) tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from engine.sampling.bad_words import banned_now
from engine.sampling.params import SamplingParams
from engine.sampling.seeds import step_seed
from engine.structured.masks import StepMasks


@dataclass(frozen=True)
class PenaltyTensors:
    """Penalty state for the P rows of the batch that have an active penalty."""

    rows: Tensor  # (P,) int64: their row indices in the batch
    repetition: Tensor  # (P,) float32; 1 = off
    presence: Tensor  # (P,) float32; 0 = off
    frequency: Tensor  # (P,) float32; 0 = off
    output_counts: Tensor  # (P, V) float32: occurrences of each token in the row's output
    seen: Tensor  # (P, V) bool: token occurs in the prompt or the output (repetition penalty)


@dataclass(frozen=True)
class SamplingBatch:
    """Sampling options for a batch of B rows over a vocabulary of V logits, on `device`.

    Greedy rows carry temperature 1.0 (so dividing is safe) and are replaced by a one-hot of the
    argmax downstream. `top_k` holds V for rows without a top-k; `top_p` 1.0 and `min_p` 0.0 are
    off. `rank_width` is the largest top-k among rows that truncate by rank (V when one of them
    has top-p without top-k), so the sampler takes a top-W instead of a full sort when it can;
    it and the `use_*` flags let the sampler skip stages no row needs.
    """

    size: int
    vocab_size: int
    device: torch.device
    temperatures: Tensor  # (B,) float32
    greedy: Tensor  # (B,) bool
    top_k: Tensor  # (B,) int64 in [1, V]
    top_p: Tensor  # (B,) float32 in (0, 1]
    min_p: Tensor  # (B,) float32 in [0, 1]
    all_greedy: bool
    any_greedy: bool
    rank_width: int  # W: how many top logits top-k/top-p look at (0: no row truncates by rank)
    use_top_p: bool
    use_min_p: bool
    penalties: PenaltyTensors | None
    ban_rows: Tensor | None  # (N,) int64: with ban_cols, the (row, token) pairs min_tokens and bad_words ban
    ban_cols: Tensor | None  # (N,) int64
    bias_rows: Tensor | None  # (M,) int64: with bias_cols and bias_values, logit_bias as (row, token, bias)
    bias_cols: Tensor | None  # (M,) int64
    bias_values: Tensor | None  # (M,) float32
    allowed_rows: Tensor | None  # (A,) int64: rows with allowed_token_ids
    allowed: Tensor | None  # (A, V) bool: the tokens each of them may sample
    grammar_rows: Tensor | None  # (M,) int64, ascending: rows constrained by a grammar (engine.structured)
    grammar_forbidden: Tensor | None  # (M, V) bool: the tokens each row's grammar forbids
    seeded_rows: tuple[tuple[int, int], ...]  # (row, step_seed) for each seeded non-greedy row
    any_unseeded: bool  # some non-greedy row draws from the sampler's own generator
    max_logprobs: int  # K: the most top alternatives any row asked for (0 = none)
    want_logprobs: bool = True  # some row asked for logprobs: the sampler computes log_softmax only then

    @property
    def keeps_logits(self) -> bool:
        """No row's logits change before the draw: no penalty, bias, allowed ids, ban or grammar mask."""
        return (self.penalties is None and self.bias_rows is None and self.allowed_rows is None
                and self.ban_rows is None and self.grammar_rows is None)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        eos_ids: Sequence[frozenset[int]] | frozenset[int],
        device: torch.device | str,
        vocab_size: int,
        bad_words: Sequence[Sequence[Sequence[int]]] | None = None,
        masks: StepMasks | None = None,
    ) -> SamplingBatch:
        """Build the batch for one step.

        params, prompt_ids, output_ids: one entry per row. prompt_ids is read only for rows whose
        params `needs_history`; output_ids' length counts the tokens generated so far (seeded
        draws, min_tokens) and its contents feed presence/frequency penalties and bad_words. eos_ids:
        one set shared by every row, or one set per row. bad_words: per row, the token sequences of
        its bad words (`engine.sampling.bad_words.bad_word_ids`), or None for none. Ids >= vocab_size
        are ignored (they cannot be sampled). masks: the grammar masks of the constrained rows
        (engine.structured.masks), kept as they are. Nothing else passed in is kept; the tensors are new and live
        on `device`.

        Raises ValueError when the row counts disagree, the batch is empty or vocab_size < 1.
        """
        b = len(params)
        if b == 0:
            raise ValueError("a sampling batch needs at least one row")
        if len(prompt_ids) != b or len(output_ids) != b:
            raise ValueError(f"got {b} params, {len(prompt_ids)} prompts and {len(output_ids)} outputs")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if isinstance(eos_ids, frozenset | set):
            eos_rows: Sequence[frozenset[int]] = [frozenset(eos_ids)] * b
        else:
            eos_rows = eos_ids
            if len(eos_rows) != b:
                raise ValueError(f"eos_ids has {len(eos_rows)} rows for a batch of {b}")
        dev = torch.device(device)
        v = vocab_size
        n_out = [len(o) for o in output_ids]
        greedy = [p.greedy for p in params]

        if bad_words is not None and len(bad_words) != b:
            raise ValueError(f"bad_words has {len(bad_words)} rows for a batch of {b}")
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for i, p in enumerate(params):
            banned: set[int] = set()
            if n_out[i] < p.min_tokens:
                banned = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | eos_rows[i]
            if bad_words is not None and bad_words[i]:
                banned |= banned_now(output_ids[i], bad_words[i])
            cols = sorted(t for t in banned if 0 <= t < v)
            ban_rows += [i] * len(cols)
            ban_cols += cols
        has_bans = len(ban_rows) > 0
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if t < v]
        allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]

        return cls(
            size=b,
            vocab_size=v,
            device=dev,
            temperatures=torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                dtype=torch.float32,
                device=dev,
            ),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=dev),
            top_k=torch.tensor(
                [p.top_k if 0 < p.top_k < v else v for p in params], dtype=torch.int64, device=dev
            ),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            rank_width=max(
                (
                    p.top_k if 0 < p.top_k < v else v
                    for p in params
                    if not p.greedy and (p.top_k > 0 or p.top_p < 1.0)
                ),
                default=0,
            ),
            use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            penalties=_build_penalties(params, prompt_ids, output_ids, dev, v),
            ban_rows=torch.tensor(ban_rows, dtype=torch.int64, device=dev) if has_bans else None,
            ban_cols=torch.tensor(ban_cols, dtype=torch.int64, device=dev) if has_bans else None,
            bias_rows=torch.tensor([r for r, _, _ in bias], dtype=torch.int64, device=dev) if bias else None,
            bias_cols=torch.tensor([t for _, t, _ in bias], dtype=torch.int64, device=dev) if bias else None,
            bias_values=torch.tensor([x for _, _, x in bias], dtype=torch.float32, device=dev) if bias else None,
            allowed_rows=torch.tensor(allowed_rows, dtype=torch.int64, device=dev) if allowed_rows else None,
            allowed=_allowed_mask([params[i].allowed_token_ids or () for i in allowed_rows], dev, v)
            if allowed_rows else None,
            grammar_rows=masks.rows if masks is not None else None,
            grammar_forbidden=masks.forbidden if masks is not None else None,
            seeded_rows=tuple(
                (i, step_seed(p.seed, n_out[i]))
                for i, p in enumerate(params)
                if p.seed is not None and not p.greedy
            ),
            any_unseeded=any(p.seed is None and not p.greedy for p in params),
            max_logprobs=max(p.logprobs or 0 for p in params),
            want_logprobs=any(p.logprobs is not None for p in params),
        )


def _allowed_mask(rows: Sequence[Sequence[int]], device: torch.device, vocab_size: int) -> Tensor:
    """(A, V) bool: True at each row's allowed ids (ids >= V are dropped)."""
    mask = torch.zeros(len(rows), vocab_size + 1, dtype=torch.bool, device=device)  # (A, V + 1)
    row_index, ids = _flat_pairs(rows, device, vocab_size)
    mask[row_index, ids] = True
    return mask[:, :vocab_size]


def _flat_pairs(
    rows: Sequence[Sequence[int]], device: torch.device, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Flat (row index, token id) pairs for `rows`, out-of-vocabulary ids sent to column V."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)  # (R,)
    ids = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.int64, device=device)  # (T,)
    row_index = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)  # (T,)
    ids = torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
    return row_index, ids


def _build_penalties(
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    device: torch.device,
    vocab_size: int,
) -> PenaltyTensors | None:
    rows = [i for i, p in enumerate(params) if p.needs_penalties]
    if not rows:
        return None
    p_rows = len(rows)
    # One spare column (V) absorbs out-of-vocabulary ids; it is dropped at the end.
    counts = torch.zeros(p_rows, vocab_size + 1, dtype=torch.float32, device=device)  # (P, V + 1)
    row_index, ids = _flat_pairs([output_ids[i] for i in rows], device, vocab_size)
    counts.index_put_((row_index, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    seen = counts > 0  # (P, V + 1)
    # The prompt only matters to the repetition penalty; other rows contribute no prompt ids.
    row_index, ids = _flat_pairs(
        [prompt_ids[i] if params[i].needs_history else () for i in rows], device, vocab_size
    )
    seen.index_put_((row_index, ids), torch.ones_like(ids, dtype=torch.bool))

    def column(name: str) -> Tensor:
        return torch.tensor([getattr(params[i], name) for i in rows], dtype=torch.float32, device=device)

    return PenaltyTensors(
        rows=torch.tensor(rows, dtype=torch.int64, device=device),
        repetition=column("repetition_penalty"),
        presence=column("presence_penalty"),
        frequency=column("frequency_penalty"),
        output_counts=counts[:, :vocab_size],
        seen=seen[:, :vocab_size],
    )
