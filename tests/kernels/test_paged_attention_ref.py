"""paged_attention_ref batches sequences of different query lengths: same rows as one at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernels import paged_attention
from kernels.paged_attention import paged_attention_ref


@pytest.mark.parametrize("window", [None, 6])
def test_mixed_query_lengths_match_one_sequence_at_a_time(make_paged: Callable[..., Any], window: int | None) -> None:
    # decodes, verifications of 1 + k rows (one whose whole context is its query, so its padding
    # rows sit before position 0), a 17-row query and a 40-row prefill chunk, in one call
    q_lens, seq_lens = [1, 3, 5, 2, 17, 1, 40], [9, 3, 33, 20, 60, 1, 90]
    b = make_paged(q_lens, seq_lens, 2, 4, 32, 8, torch.float32, torch.device("cpu"))
    out = paged_attention_ref(b.q, b.kv_layer, b.block_tables, b.query_start_loc, b.seq_lens, 0.125, window)
    starts = b.query_start_loc.tolist()
    for i, q_len in enumerate(q_lens):
        rows = slice(starts[i], starts[i + 1])
        alone = paged_attention_ref(b.q[rows], b.kv_layer, b.block_tables[i : i + 1],
                                    torch.tensor([0, q_len], dtype=torch.int32), b.seq_lens[i : i + 1], 0.125, window)
        # the batched call pads and gathers differently: float32 summation order only
        torch.testing.assert_close(out[rows], alone, atol=1e-5, rtol=1e-5)


def _dense(b: Any, i: int, scale: float, window: int | None) -> torch.Tensor:
    """Sequence i's attention the plain way: its keys read one position at a time, one softmax."""
    starts, lens = b.query_start_loc.tolist(), b.seq_lens.tolist()
    q = b.q[starts[i] : starts[i + 1]].float()  # (L_q, Hq, D)
    bs, hk = b.kv_layer.shape[2], b.kv_layer.shape[3]
    keys = torch.stack([b.kv_layer[b.block_tables[i, p // bs], 0, p % bs] for p in range(lens[i])]).float()
    vals = torch.stack([b.kv_layer[b.block_tables[i, p // bs], 1, p % bs] for p in range(lens[i])]).float()
    group = q.shape[1] // hk
    keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)  # (L, Hq, D)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    q_pos = torch.arange(lens[i] - q.shape[0], lens[i])[:, None]
    k_pos = torch.arange(lens[i])[None, :]
    allowed = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, vals)


@pytest.mark.parametrize("group_bytes", [1, 40_000, 1 << 30])
@pytest.mark.parametrize("window", [None, 5])
def test_cache_sized_groups_give_the_dense_answer(make_paged: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                                   group_bytes: int, window: int | None) -> None:
    # group_bytes 1: every sequence alone; 40 kB: runs of similar context length; 1 GiB: one call per kind
    monkeypatch.setattr(paged_attention, "_GROUP_BYTES", group_bytes)
    q_lens, seq_lens = [1, 1, 4, 1, 2, 1, 33, 1, 5], [70, 3, 40, 129, 2, 18, 33, 64, 77]
    b = make_paged(q_lens, seq_lens, 2, 3, 32, 8, torch.float32, torch.device("cpu"))
    out = paged_attention_ref(b.q, b.kv_layer, b.block_tables, b.query_start_loc, b.seq_lens, 0.2, window)
    starts = b.query_start_loc.tolist()
    for i in range(len(q_lens)):
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], _dense(b, i, 0.2, window), atol=1e-5, rtol=1e-5)


def test_grouping_sorts_by_context_and_caps_the_gathered_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paged_attention, "_GROUP_BYTES", 4000)
    lens = [300, 10, 200, 12, 11, 290]
    assert paged_attention._groups([0, 1, 2, 3, 4, 5], lens, 100) == [[1, 4, 3], [2], [5], [0]]
    assert paged_attention._groups([1, 3], lens, 1) == [[1, 3]]
    assert paged_attention._groups([], lens, 100) == []
