"""Paged decode attention (split-KV) against paged_attention_ref."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from kernels.paged_decode import MAX_SPLITS, choose_num_splits, paged_decode_attention


# Context lengths per block size: one token, exactly one block, one token into the next block,
# and 150 tokens: past the 64-token tile, and split in two at token 128 when num_splits=2.
def seq_lens_for(block_size: int) -> list[int]:
    return [1, block_size, block_size + 1, 150]


SCALE = 0.125


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    # float16: kernel and reference each round |out| up to ~4 to float16 (ulp 2e-3 there) and the
    # kernel also rounds the softmax weights to float16 for the P @ V tl.dot (as FlashAttention
    # does); against a float64 truth both err ~1e-3, so they may differ by ~2e-3, while the float16
    # default (atol 1e-5, rtol 1e-3) allows only half that: ~5% of elements would fail it.
    return {"atol": 3e-3, "rtol": 2e-3} if dtype == torch.float16 else {}


def check_decode(batch: Any, device: torch.device, window: int | None, **kwargs: int | None) -> None:
    out = paged_decode_attention(
        batch.q, batch.kv_layer, batch.block_tables, batch.seq_lens, SCALE, window, **kwargs
    )
    ref = paged_attention_ref(
        batch.q, batch.kv_layer, batch.block_tables, batch.query_start_loc, batch.seq_lens, SCALE, window
    )
    torch.testing.assert_close(out, ref, **tolerances(batch.q.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_matches_reference(
    make_paged: Callable[..., Any],
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    group: int,
) -> None:
    seq_lens = seq_lens_for(block_size)
    batch = make_paged([1] * len(seq_lens), seq_lens, 2, group, head_dim, block_size, dtype, device)
    for window in (None, 40):
        check_decode(batch, device, window, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 2, 8, MAX_SPLITS])
def test_decode_split_counts(make_paged: Callable[..., Any], device: torch.device, num_splits: int) -> None:
    # 1 split writes the output directly; 32 splits leave most splits of the short sequences empty.
    batch = make_paged([1] * 3, [3, 65, 450], 1, 4, 64, 16, torch.float32, device, seed=1)
    check_decode(batch, device, None, num_splits=num_splits)
    check_decode(batch, device, 100, num_splits=num_splits)


def test_decode_heuristic_splits_and_strided_cache(
    make_paged: Callable[..., Any], device: torch.device
) -> None:
    # kv_layer stored slot-major and viewed through a transpose; num_splits from the heuristic.
    batch = make_paged([1] * 3, [5, 200, 700], 1, 8, 64, 32, torch.float16, device, kv_layout="slot_major")
    assert not batch.kv_layer.is_contiguous()
    check_decode(batch, device, None)
    check_decode(batch, device, 64, max_seq_len=700)


def test_choose_num_splits() -> None:
    # A full GPU needs no split; one long sequence is split until each split has >= 256 tokens.
    assert choose_num_splits(batch=64, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 1
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=32768, num_sms=132) == 32
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=1024, num_sms=132) == 4
    assert choose_num_splits(batch=4, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 16
    assert choose_num_splits(batch=1, num_kv_heads=1, max_seq_len=100, num_sms=132) == 1


def test_decode_errors(make_paged: Callable[..., Any], device: torch.device) -> None:
    b = make_paged([1, 1], [5, 9], 2, 2, 64, 16, torch.float32, device)
    args = (b.q, b.kv_layer, b.block_tables, b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="one query row per sequence"):
        paged_decode_attention(b.q[:1], *args[1:])
    with pytest.raises(ValueError, match="kv_layer dtype"):
        paged_decode_attention(b.q, b.kv_layer.half(), *args[2:])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(b.q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention(b.q[:, :, :32].contiguous(), *args[1:])
    with pytest.raises(ValueError, match="block_tables dtype"):
        paged_decode_attention(b.q, b.kv_layer, b.block_tables.long(), b.seq_lens, SCALE)
    with pytest.raises(ValueError, match="seq_lens must be"):
        paged_decode_attention(b.q, b.kv_layer, b.block_tables, b.seq_lens[:1], SCALE)
    with pytest.raises(ValueError, match="stride 1 on its last dim"):
        paged_decode_attention(b.q.transpose(1, 2).contiguous().transpose(1, 2), *args[1:])
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(*args, sliding_window=0)
    with pytest.raises(ValueError, match="num_splits must be a power of two"):
        paged_decode_attention(*args, num_splits=3)
    with pytest.raises(ValueError, match="expected"):
        paged_decode_attention(b.q, b.kv_layer, b.block_tables, b.seq_lens.to("meta"), SCALE)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 8])
def test_decode_bf16_gpu(make_paged: Callable[..., Any], cuda_device: torch.device, group: int) -> None:
    batch = make_paged([1] * 3, [1, 700, 4100], 8, group, 128, 16, torch.bfloat16, cuda_device)
    out = paged_decode_attention(batch.q, batch.kv_layer, batch.block_tables, batch.seq_lens, SCALE)
    ref = paged_attention_ref(
        batch.q.double(),
        batch.kv_layer.double(),
        batch.block_tables,
        batch.query_start_loc,
        batch.seq_lens,
        SCALE,
    )
    # bfloat16 keeps 8 mantissa bits; the float64 reference sees the same rounded inputs.
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
