"""Verification: which draft tokens the target keeps, and the token it adds, for every speculating row.

The target scored k + 1 positions of a sequence in one forward: row r of its logits is the
distribution after the sequence's tokens plus drafts x_1..x_r. Each row is sampled as if those
drafts were already output (penalties, min_tokens and the seeded draw's position count them), so
row r is exactly the distribution the non-speculative engine would sample at that position.

Two exact ways to decide, per sequence:

* coupled (greedy rows, seeded rows, n-gram drafts): draw y_r from row r with the sampler's own
  noise for that position, accept x_{r+1} while it equals y_r, and emit y at the first mismatch (or
  y_k, the bonus, when all match). Every emitted token IS the target's draw, so the output equals
  decoding without speculation, seeded draws included, whatever k was. For a deterministic draft
  (q one-hot) this is modified rejection sampling itself: P(accept x) = p(x), and a rejection
  leaves y ~ p restricted to y != x, which is norm(max(0, p - q)).
* rejection (a draft model sampling an unseeded row): accept x_{r+1} with probability
  min(1, p_r(x) / q_r(x)); on the first rejection emit a draw from norm(max(0, p_r - q_r)); if all
  k are accepted, emit the bonus y_k ~ p_k. The output follows p exactly (Leviathan et al. 2023).

Rows of a step: sequence i owns rows [start_i, start_i + 1 + k_i); sequences that do not speculate
own one row (one per choice for a sequence forking its n choices) and are sampled exactly as the
plain engine samples them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import NamedTuple

import torch
from torch import Tensor

from engine.sampling.batch import SamplingBatch
from engine.sampling.sampler import Sampler, SamplerOutput, penalized_logits, probabilities
from engine.sequence import Sequence
from engine.structured.masks import StepMasks


class Verdict(NamedTuple):
    """out: R rows; sequence i emits rows [start_i, start_i + num_accepted[i] + 1) of it."""

    out: SamplerOutput
    num_accepted: list[int]  # per sampling sequence, in step order


def _num_rows(seq: Sequence, draft: Seq[int]) -> int:
    return 1 + len(draft) if draft else seq.num_sample_rows


def verify_batch(seqs: Seq[Sequence], drafts: Seq[Seq[int]], device: torch.device,
                 vocab_size: int, masks: StepMasks | None = None) -> SamplingBatch:
    """One sampling row per verified position: sequence i's row r sees drafts[i][:r] as output (a
    sequence forking its choices: one row per choice). `masks`: the grammar masks of the constrained
    rows, row r of a sequence masked by its grammar after drafts[i][:r] (engine.structured.masks)."""
    params, prompts, outputs, eos, bad = [], [], [], [], []
    for seq, draft in zip(seqs, drafts, strict=True):
        out = seq.output_token_ids
        for r in range(_num_rows(seq, draft)):
            params.append(seq.params.for_choice(r) if seq.pending_forks else seq.params)
            prompts.append(seq.prompt_token_ids)
            outputs.append(out + list(draft[:r]))
            eos.append(seq.eos_token_ids)
            bad.append(seq.bad_words_ids)
    return SamplingBatch.build(params, prompts, outputs, eos, device=device, vocab_size=vocab_size,
                               bad_words=bad if any(bad) else None, masks=masks)


def verify(
    logits: Tensor,
    seqs: Seq[Sequence],
    drafts: Seq[Seq[int]],
    draft_probs: Seq[Tensor | None],
    sampler: Sampler,
    generator: torch.Generator,
    masks: StepMasks | None = None,
) -> Verdict:
    """Decide every sampling sequence's tokens for this step.

    logits: (R, V) float32, R = sum(1 + len(d) for d in drafts), rows in sequence order.
    drafts[i]: sequence i's draft tokens ([] when it does not speculate).
    draft_probs[i]: (len(drafts[i]), V) float32, the draft's distribution q at each draft token
    (rejection rule), or None (coupled rule). `sampler` is the target's (its generator advances);
    `generator` draws the rejection rule's uniforms and residual samples. `masks`: grammar masks
    (structured outputs): a draft the grammar forbids has p = 0 at its row, so it is rejected there
    (coupled: the target's draw cannot equal it; rejection rule: accepted with probability 0, and the
    residual max(0, p - q) is itself masked), and every emitted token is one the grammar allows.
    Nothing is mutated besides the generators.
    """
    batch = verify_batch(seqs, drafts, logits.device, logits.shape[1], masks)
    out = sampler(logits, batch)  # y_r for every row, with logprobs
    tokens = out.token_ids.tolist()
    accepted: list[int] = []
    starts: list[int] = []
    row = 0
    for seq, draft in zip(seqs, drafts, strict=True):
        starts.append(row)
        row += _num_rows(seq, draft)
    rejecting = {i for i, q in enumerate(draft_probs) if q is not None and drafts[i]}
    chosen = out.logprobs
    if rejecting:
        token_t, chosen = out.token_ids.clone(), out.logprobs.clone()
        p = probabilities(logits, batch)  # (R, V)
        want_lp = any(seqs[i].params.logprobs is not None for i in rejecting)
        logp = penalized_logits(logits, batch).log_softmax(dim=-1) if want_lp else None  # (R, V)
    for i, draft in enumerate(drafts):
        s = starts[i]
        if i in rejecting:
            q = draft_probs[i]
            assert q is not None
            a, tok = _reject(p[s : s + len(draft) + 1], q, list(draft), generator)
            for r in range(a):
                token_t[s + r] = draft[r]
            if tok is not None:
                token_t[s + a] = tok
            if logp is not None:
                rows = torch.arange(s, s + a + 1, device=logits.device)
                chosen[rows] = logp[rows, token_t[rows]]
        else:
            a = 0
            while a < len(draft) and draft[a] == tokens[s + a]:
                a += 1
        accepted.append(a)
    if rejecting:
        out = out._replace(token_ids=token_t, logprobs=chosen)
    return Verdict(out, accepted)


def _reject(p: Tensor, q: Tensor, draft: list[int], generator: torch.Generator) -> tuple[int, int | None]:
    """Modified rejection sampling for one sequence.

    p: (k + 1, V) target rows, q: (k, V) draft rows, draft: the k tokens x_1..x_k (x_j ~ q[j-1]).
    Returns (a, token): a accepted drafts, then the residual draw at row a, or None when all k were
    accepted (the caller keeps the target's own draw from p[k] as the bonus).
    """
    k = len(draft)
    idx = torch.tensor(draft, device=p.device)
    rows = torch.arange(k, device=p.device)
    ratio = (p[rows, idx] / q[rows, idx]).clamp(max=1.0)  # (k,); q(x) > 0: x was drawn from q
    u = torch.rand(k, generator=generator, dtype=torch.float64, device=p.device)
    rejected = (u >= ratio.double()).nonzero()
    if rejected.numel() == 0:
        return k, None
    a = int(rejected[0, 0])
    residual = (p[a] - q[a]).clamp(min=0.0)  # (V,)
    total = float(residual.sum())
    if total <= 0.0:  # p == q up to rounding: a rejection has probability ~0; fall back to p
        residual = p[a]
    tok = int(torch.multinomial(residual, 1, generator=generator))
    return a, tok
