"""How far a quantized model's next-token distributions are from the unquantized model's.

Both models read the same token sequences with teacher forcing (one prefill each, every position's
logits kept), so the comparison is position by position on identical contexts:

    top-1 agreement   fraction of positions whose argmax token is the same
    mean KL           mean over positions of KL(p_ref || p_quant), in nats
    perplexity        exp of the mean next-token negative log-likelihood of the text itself, for both
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.model import ForwardContext
from engine.model_runner import ModelRunner


class Agreement(NamedTuple):
    top1: float  # fraction of positions in [0, 1]
    mean_kl: float  # nats per position
    num_tokens: int
    ref_ppl: float = math.nan  # perplexity of the text under each model (positions with a next token)
    test_ppl: float = math.nan


@torch.inference_mode()
def prompt_logits(runner: ModelRunner, token_ids: Sequence[int]) -> Tensor:
    """(T, V) float32 logits at every position of one sequence, from one forward over it.

    Writes its KV into the first blocks of ``runner``'s pool without asking the block manager, so
    call it only on a runner no engine step is using. Raises ValueError when the pool is too small.
    """
    t, bs = len(token_ids), runner.block_size
    blocks = math.ceil(t / bs)
    if not 0 < blocks <= runner.num_blocks:
        raise ValueError(f"{t} tokens need {blocks} KV blocks; the pool has {runner.num_blocks}")
    dev = runner.device
    ctx = ForwardContext(
        kv=runner.kv,
        slot_mapping=torch.arange(t, dtype=torch.int64, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
        query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
        max_query_len=t,
        ops=runner.ops,
        kv_scale=runner.kv_scale,
    )
    ids = torch.tensor(list(token_ids), dtype=torch.int64, device=dev)
    hidden = runner.model(ids, torch.arange(t, device=dev), ctx)  # (T, H)
    return runner.model.compute_logits(hidden)  # (T, V)


def compare_logits(ref: Tensor, test: Tensor, targets: Tensor | None = None) -> Agreement:
    """ref, test (T, V) logits of the same positions -> top-1 agreement and mean KL(ref || test); with
    ``targets`` (T,) (the next token at each position, -1 where there is none) also both perplexities."""
    if ref.shape != test.shape:
        raise ValueError(f"logits shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
    ref_lp = F.log_softmax(ref.float(), dim=-1)
    test_lp = F.log_softmax(test.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - test_lp)).sum(dim=-1)  # (T,)
    top1 = (ref.argmax(dim=-1) == test.argmax(dim=-1)).float().mean()
    ppl = [math.nan, math.nan]
    if targets is not None:
        keep = targets >= 0
        ppl = [math.exp(float(F.nll_loss(lp[keep], targets[keep]))) for lp in (ref_lp, test_lp)]
    return Agreement(float(top1), float(kl.mean()), ref.shape[0], *ppl)


def agreement(ref: ModelRunner, test: ModelRunner, sequences: Sequence[Sequence[int]]) -> Agreement:
    """Teacher-forced comparison of two runners over ``sequences``, pooled over every position
    (perplexities over every position that has a next token in its sequence)."""
    pairs = [(prompt_logits(ref, s), prompt_logits(test, s)) for s in sequences]
    targets = torch.cat([torch.tensor([*s[1:], -1], dtype=torch.int64) for s in sequences])
    return compare_logits(torch.cat([r for r, _ in pairs]).cpu(), torch.cat([t for _, t in pairs]).cpu(), targets)
