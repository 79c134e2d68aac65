"""How good a model is on held-out text, and how well a draft predicts its teacher.

    mean_loss(model, tokens)                         next-token cross-entropy (nats; exp() = perplexity)
    greedy_agreement(teacher, draft, tokens)         fraction of positions whose argmaxes agree
    speculative_acceptance(teacher, draft, prompts)  greedy speculative decoding with k proposals,
                                                     simulated exactly on the dense models

In greedy speculative decoding the draft proposes k tokens one by one, the teacher scores all k + 1
positions at once, the longest prefix on which the two argmaxes agree is accepted and the teacher's own
token follows it, so every teacher forward yields accepted + 1 tokens, and the output is exactly the
teacher's greedy output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.data import eval_windows
from training.model import TrainableLM


@torch.inference_mode()
def mean_loss(model: TrainableLM, tokens: Tensor, seq_len: int = 256, max_windows: int = 64,
              batch_size: int = 8) -> float:
    """Mean next-token cross-entropy in nats over consecutive held-out windows of `tokens` (N,)."""
    windows = eval_windows(tokens, seq_len, max_windows)  # (W, L + 1)
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


@torch.inference_mode()
def greedy_agreement(teacher: TrainableLM, draft: TrainableLM, tokens: Tensor, seq_len: int = 256,
                     max_windows: int = 64, batch_size: int = 8) -> float:
    """Fraction of held-out positions where argmax(draft) == argmax(teacher), both fed the true text."""
    windows = eval_windows(tokens, seq_len, max_windows)
    same, count = 0, 0
    for batch in windows.split(batch_size):
        inputs = batch[:, :-1]
        same += int((teacher(inputs).argmax(-1) == draft(inputs).argmax(-1)).sum())
        count += inputs.numel()
    return same / count


@dataclass(frozen=True)
class AcceptanceStats:
    """Greedy speculative decoding of `num_prompts` prompts with `k` proposals per teacher forward."""

    k: int
    num_prompts: int
    num_steps: int  # teacher forwards (verification steps)
    num_accepted: int  # proposed tokens accepted, over all steps
    num_generated: int  # tokens produced: accepted + one teacher token per step

    @property
    def mean_accepted_length(self) -> float:
        """Accepted proposals per step, in [0, k]."""
        return self.num_accepted / self.num_steps

    @property
    def tokens_per_step(self) -> float:
        """Tokens per teacher forward, in [1, k + 1] (1 without speculation)."""
        return self.num_generated / self.num_steps

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals over proposed ones, in [0, 1]."""
        return self.num_accepted / (self.num_steps * self.k)


@torch.inference_mode()
def speculative_acceptance(teacher: TrainableLM, draft: TrainableLM, prompts: Sequence[Sequence[int]],
                           k: int = 4, max_new_tokens: int = 64) -> AcceptanceStats:
    """Run greedy speculative decoding for each prompt until `max_new_tokens` tokens (the last step may
    overshoot by up to k) or the context limit. Raises ValueError for k < 1, no prompts, an empty prompt,
    or models with different vocabularies."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, none empty")
    if teacher.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"vocabularies differ: teacher {teacher.cfg.vocab_size}, draft {draft.cfg.vocab_size}")
    limit = min(teacher.cfg.max_position_embeddings, draft.cfg.max_position_embeddings)
    steps = accepted = generated = 0
    for prompt in prompts:
        ctx = [int(t) for t in prompt]
        produced = 0
        while produced < max_new_tokens and len(ctx) + k + 1 <= limit:
            proposal: list[int] = []
            for _ in range(k):  # the draft proposes greedily, one token at a time
                proposal.append(int(draft(torch.tensor([ctx + proposal]))[0, -1].argmax()))
            # (k + 1,) teacher argmaxes after ctx, ctx + p0, ..., ctx + p0..p(k-1)
            verdict = teacher(torch.tensor([ctx + proposal]))[0, len(ctx) - 1:].argmax(-1).tolist()
            n = 0
            while n < k and proposal[n] == verdict[n]:
                n += 1
            ctx += proposal[:n] + [verdict[n]]
            steps, accepted, generated, produced = steps + 1, accepted + n, generated + n + 1, produced + n + 1
    if steps == 0:
        raise ValueError(f"no prompt left room for {k} + 1 tokens within {limit} positions")
    return AcceptanceStats(k, len(prompts), steps, accepted, generated)
