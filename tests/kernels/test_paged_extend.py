"""Paged extend attention (chunked prefill, prefix hits, verification) against paged_attention_ref."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from kernels.paged_extend import paged_extend_attention

SCALE = 0.125


def batch_shape(block_size: int) -> tuple[list[int], list[int]]:
    """(q_lens, seq_lens): a decode row; a whole prompt of exactly one block; a 70-token chunk after
    a cached prefix ending one token into a block (crosses 64-token query and key tiles); and a
    5-token speculative verification over a 28-token context."""
    return [1, block_size, 70, 5], [9, block_size, block_size + 1 + 70, 33]


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    # float16: kernel and reference each round |out| up to ~4 to float16 (ulp 2e-3 there) and the
    # kernel also rounds the softmax weights to float16 for the P @ V tl.dot (as FlashAttention
    # does); against a float64 truth both err ~1e-3, so they may differ by ~2e-3, while the float16
    # default (atol 1e-5, rtol 1e-3) allows only half that: ~5% of elements would fail it.
    return {"atol": 3e-3, "rtol": 2e-3} if dtype == torch.float16 else {}


def check_extend(batch: Any, window: int | None, max_query_len: int | None = None) -> None:
    args = (batch.q, batch.kv_layer, batch.block_tables, batch.query_start_loc, batch.seq_lens, SCALE, window)
    out = paged_extend_attention(*args, max_query_len=max_query_len)
    torch.testing.assert_close(out, paged_attention_ref(*args), **tolerances(batch.q.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_extend_matches_reference(
    make_paged: Callable[..., Any],
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    group: int,
) -> None:
    q_lens, seq_lens = batch_shape(block_size)
    batch = make_paged(q_lens, seq_lens, 2, group, head_dim, block_size, dtype, device)
    check_extend(batch, None)
    check_extend(batch, 24, max_query_len=70)


def test_extend_odd_group_and_strided_cache(make_paged: Callable[..., Any], device: torch.device) -> None:
    # GROUP = 3 packs 21 tokens x 3 heads into the 64 rows of a tile (one row idle); the cache is
    # stored slot-major and viewed through a transpose.
    batch = make_paged(
        [30, 1, 12], [30, 40, 100], 2, 3, 64, 16, torch.float32, device, kv_layout="slot_major"
    )
    assert not batch.kv_layer.is_contiguous()
    check_extend(batch, None)
    check_extend(batch, 7)


def test_extend_window_of_one(make_paged: Callable[..., Any], device: torch.device) -> None:
    # Each query sees only itself: the output is its own V row.
    batch = make_paged([6, 3], [6, 20], 1, 2, 64, 16, torch.float32, device)
    check_extend(batch, 1)


def test_extend_errors(make_paged: Callable[..., Any], device: torch.device) -> None:
    b = make_paged([2, 1], [5, 9], 2, 2, 64, 16, torch.float32, device)
    args = (b.q, b.kv_layer, b.block_tables, b.query_start_loc, b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        paged_extend_attention(b.q, b.kv_layer, b.block_tables, b.query_start_loc[:2], b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="query_start_loc dtype"):
        paged_extend_attention(b.q, b.kv_layer, b.block_tables, b.query_start_loc.long(), b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="q must have 3 dims"):
        paged_extend_attention(b.q[0], *args[1:])
    with pytest.raises(ValueError, match="kv_layer must be"):
        paged_extend_attention(b.q, b.kv_layer[:, :1], *args[2:])
    with pytest.raises(ValueError, match="max_query_len"):
        paged_extend_attention(*args, max_query_len=0)
    with pytest.raises(ValueError, match="scale"):
        paged_extend_attention(*args[:-1], -1.0)


@pytest.mark.gpu
def test_extend_bf16_gpu(make_paged: Callable[..., Any], cuda_device: torch.device) -> None:
    batch = make_paged([1, 300, 7], [4000, 300, 1000], 8, 4, 128, 16, torch.bfloat16, cuda_device)
    args = (batch.q, batch.kv_layer, batch.block_tables, batch.query_start_loc, batch.seq_lens, SCALE)
    out = paged_extend_attention(*args, sliding_window=512)
    ref = paged_attention_ref(batch.q.double(), batch.kv_layer.double(), *args[2:], sliding_window=512)
    # bfloat16 keeps 8 mantissa bits; the float64 reference sees the same rounded inputs.
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
