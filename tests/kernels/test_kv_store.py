"""KV cache store against store_kv_ref."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_kv, store_kv_ref


def make(
    num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v as slices of a fused qkv output, a 2-layer pool and slots in shuffled blocks + padding."""
    gen = torch.Generator().manual_seed(head_dim + block_size)
    num_tokens = 2 * block_size + 3
    qkv = torch.randn(num_tokens, 4 * num_kv_heads, head_dim, generator=gen).to(device, dtype)
    k, v = qkv[:, 2 * num_kv_heads : 3 * num_kv_heads], qkv[:, 3 * num_kv_heads :]
    pool = torch.zeros(2, 8, 2, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    slots = torch.randperm(8 * block_size, generator=gen)[:num_tokens]
    slots[[1, 5]] = -1  # padding tokens
    return k, v, pool, slots.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads", [1, 8])
def test_store_kv_matches_reference(
    device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int, num_kv_heads: int
) -> None:
    k, v, pool, slots = make(num_kv_heads, head_dim, block_size, dtype, device)
    expected = pool.clone()
    store_kv(k, v, pool[1], slots)
    store_kv_ref(k, v, expected[1], slots)
    assert torch.equal(pool, expected)  # a copy: bit-exact, layer 0 untouched
    assert pool[0].count_nonzero() == 0


def test_store_kv_strided_cache(device: torch.device) -> None:
    # Slot-major memory (num_blocks, bs, 2, Hk, D) viewed as (num_blocks, 2, bs, Hk, D).
    k, v, _, slots = make(2, 64, 16, torch.float32, device)
    cache = torch.zeros(8, 16, 2, 2, 64, device=device).transpose(1, 2)
    expected = cache.clone()
    store_kv(k, v, cache, slots)
    store_kv_ref(k, v, expected, slots)
    assert torch.equal(cache, expected)


def test_store_kv_errors(device: torch.device) -> None:
    k, v, pool, slots = make(2, 64, 16, torch.float32, device)
    with pytest.raises(ValueError, match="k must be"):
        store_kv(k[:, :1], v, pool[1], slots)
    with pytest.raises(ValueError, match="v dtype"):
        store_kv(k, v.half(), pool[1], slots)
    with pytest.raises(ValueError, match="slot_mapping dtype"):
        store_kv(k, v, pool[1], slots.int())
    with pytest.raises(ValueError, match="slot_mapping must be"):
        store_kv(k, v, pool[1], slots[:3])
    with pytest.raises(ValueError, match="kv_layer must have 5 dims"):
        store_kv(k, v, pool, slots)


@pytest.mark.gpu
def test_store_kv_bf16_gpu(cuda_device: torch.device) -> None:
    k, v, pool, slots = make(8, 128, 16, torch.bfloat16, cuda_device)
    expected = pool.clone()
    store_kv(k, v, pool[1], slots)
    store_kv_ref(k, v, expected[1], slots)
    assert torch.equal(pool, expected)
