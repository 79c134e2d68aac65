"""fp8 KV cache: the Triton store and attention kernels against the references on a float8_e4m3fn pool,
and the reference against a full-precision pool (how much attention output fp8 pages cost)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernels.kv_store import FP8_KV_DTYPE, quantize_kv, store_kv, store_kv_ref
from kernels.paged_attention import paged_attention_ref
from kernels.paged_decode import paged_decode_attention
from kernels.paged_extend import paged_extend_attention

SCALE = 0.125


def test_quantize_kv_saturates_instead_of_nan() -> None:
    x = torch.tensor([1000.0, -1000.0, 0.3, 7.97])
    got = quantize_kv(x, 1.0).float()
    assert got.tolist() == [448.0, -448.0, 0.3125, 8.0]
    assert quantize_kv(x, 4.0).float()[0] == 256.0  # 1000 / 4 = 250: e4m3 steps by 16 in [128, 256)


@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
def test_store_kv_fp8_matches_reference(device: torch.device, kv_scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    qkv = (torch.randn(19, 8, 64, generator=gen) * 3).to(device)
    k, v = qkv[:, 4:6], qkv[:, 6:8]  # strided views of a fused qkv output
    slots = torch.randperm(8 * 16, generator=gen)[:19].to(device)
    slots[[2, 7]] = -1
    pool = torch.zeros(2, 8, 2, 16, 2, 64, dtype=FP8_KV_DTYPE, device=device)
    expected = pool.clone()
    store_kv(k, v, pool[1], slots, kv_scale=kv_scale)
    store_kv_ref(k, v, expected[1], slots, kv_scale=kv_scale)
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))  # the same bytes
    valid = slots >= 0
    got_k = pool[1][slots[valid] // 16, 0, slots[valid] % 16].float() * kv_scale
    torch.testing.assert_close(got_k, k[valid].float(), rtol=2**-4, atol=2**-9 * kv_scale)  # e4m3: 3 bits
    with pytest.raises(ValueError, match="kv_scale"):
        store_kv(k, v, pool[1], slots)
    with pytest.raises(ValueError, match="kv_scale"):
        store_kv_ref(k, v, pool[1], slots)


def fp8_batch(batch: Any, kv_scale: float) -> tuple[Any, torch.Tensor]:
    """The batch with its pages quantized to fp8, and those pages dequantized (the exact K/V seen)."""
    kv8 = quantize_kv(batch.kv_layer, kv_scale)
    return batch._replace(kv_layer=kv8), (kv8.float() * kv_scale).to(batch.q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_attention_reads_fp8_pages(
    make_paged: Callable[..., Any], device: torch.device, dtype: torch.dtype
) -> None:
    kv_scale = 0.5
    tol = {"atol": 3e-3, "rtol": 2e-3} if dtype == torch.float16 else {}  # see test_paged_extend.py
    # decode: one query per sequence
    batch = make_paged([1, 1, 1], [5, 40, 77], 2, 4, 64, 16, dtype, device)
    b8, kv_deq = fp8_batch(batch, kv_scale)
    args8 = (b8.q, b8.kv_layer, b8.block_tables, b8.query_start_loc, b8.seq_lens, SCALE, None)
    want = paged_attention_ref(*args8, kv_scale=kv_scale)
    # the fp8 reference is the full-precision reference on the dequantized pages
    torch.testing.assert_close(want, paged_attention_ref(b8.q, kv_deq, *args8[2:]), **tol)
    got = paged_decode_attention(b8.q, b8.kv_layer, b8.block_tables, b8.seq_lens, SCALE, kv_scale=kv_scale)
    torch.testing.assert_close(got, want, **tol)
    # extend: chunks, a prefix hit, a sliding window
    batch = make_paged([1, 16, 30, 5], [9, 16, 47, 33], 2, 2, 64, 16, dtype, device)
    b8, _ = fp8_batch(batch, kv_scale)
    args8 = (b8.q, b8.kv_layer, b8.block_tables, b8.query_start_loc, b8.seq_lens, SCALE, 24)
    torch.testing.assert_close(paged_extend_attention(*args8, kv_scale=kv_scale),
                               paged_attention_ref(*args8, kv_scale=kv_scale), **tol)
    with pytest.raises(ValueError, match="kv_scale"):
        paged_extend_attention(*args8)


def test_fp8_pages_cost_little_attention_accuracy(make_paged: Callable[..., Any]) -> None:
    # Unit-variance K/V (as in the tiny models): the attention output moves by ~1% of its scale.
    batch = make_paged([1, 1, 20], [30, 200, 120], 2, 4, 64, 16, torch.float32, torch.device("cpu"))
    b8, _ = fp8_batch(batch, 1.0)
    args = (batch.block_tables, batch.query_start_loc, batch.seq_lens, SCALE)
    exact = paged_attention_ref(batch.q, batch.kv_layer, *args)
    approx = paged_attention_ref(b8.q, b8.kv_layer, *args, kv_scale=1.0)
    rel = (approx - exact).norm() / exact.norm()
    assert rel < 0.05, rel
