"""Rotary embedding: the cos/sin cache against transformers, the kernel against rotary_ref."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels.rotary import build_cos_sin_cache, rotary, rotary_ref

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,  # small, so all three frequency bands occur
}
SCALINGS: list[dict[str, Any] | None] = [
    None,
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"type": "linear", "factor": 2.0},  # the older key
    LLAMA3,
]


@pytest.mark.parametrize("rope_scaling", SCALINGS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cache_matches_transformers(rope_scaling: dict[str, Any] | None, head_dim: int) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
    )
    positions = torch.arange(2048)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions)  # (1, 2048, head_dim) each
    cache = build_cos_sin_cache(head_dim, 2048, 500000.0, rope_scaling)
    half = head_dim // 2
    assert torch.equal(cache[:, :half], cos[0, :, :half])
    assert torch.equal(cache[:, half:], sin[0, :, :half])


def test_rotary_ref_matches_transformers() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cache = build_cos_sin_cache(64, 512, 10000.0, LLAMA3)
    positions = torch.tensor([0, 5, 255, 256, 511])
    q, k = torch.randn(5, 4, 64), torch.randn(5, 2, 64)
    cos = torch.cat([cache[positions, :32]] * 2, dim=-1)[None]  # (1, T, D)
    sin = torch.cat([cache[positions, 32:]] * 2, dim=-1)[None]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ref, k_ref = rotary_ref(positions, q, k, cache)
    torch.testing.assert_close(q_ref, q_hf[0].transpose(0, 1))
    torch.testing.assert_close(k_ref, k_hf[0].transpose(0, 1))


def test_cache_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="supported: default, linear, llama3"):
        build_cos_sin_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="even"):
        build_cos_sin_cache(63, 16, 10000.0, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads", [(8, 8), (32, 4), (12, 1)])
def test_rotary_matches_reference(
    device: torch.device, dtype: torch.dtype, head_dim: int, num_heads: tuple[int, int]
) -> None:
    # q and k are head slices of one fused qkv output: strided rows, as the engine passes them.
    hq, hk = num_heads
    gen = torch.Generator().manual_seed(head_dim + hq)
    qkv = torch.randn(9, hq + 2 * hk, head_dim, generator=gen).to(device, dtype)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]
    cache = build_cos_sin_cache(head_dim, 4096, 500000.0, LLAMA3, device=device)
    positions = torch.tensor([0, 1, 17, 255, 256, 1000, 4095, 3, 3], device=device)
    before = qkv.clone()
    q_out, k_out = rotary(positions, q, k, cache)
    q_ref, k_ref = rotary_ref(positions, q, k, cache)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)
    assert torch.equal(qkv, before)  # out of place


def test_rotary_errors(device: torch.device) -> None:
    q, k = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    cache = build_cos_sin_cache(64, 16, 10000.0, None, device=device)
    pos = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        rotary(pos, q, k, cache[:, :32])
    with pytest.raises(ValueError, match="positions dtype"):
        rotary(pos.int(), q, k, cache)
    with pytest.raises(ValueError, match="positions must be"):
        rotary(pos[:2], q, k, cache)
    with pytest.raises(ValueError, match="k must be"):
        rotary(pos, q, k[:2], cache)
    with pytest.raises(ValueError, match="k dtype"):
        rotary(pos, q, k.half(), cache)


@pytest.mark.gpu
def test_rotary_bf16_gpu(cuda_device: torch.device) -> None:
    q = torch.randn(100, 32, 128, device=cuda_device, dtype=torch.bfloat16)
    k = torch.randn(100, 8, 128, device=cuda_device, dtype=torch.bfloat16)
    cache = build_cos_sin_cache(128, 8192, 500000.0, LLAMA3, device=cuda_device)
    pos = torch.randint(0, 8192, (100,), device=cuda_device)
    for out, ref in zip(rotary(pos, q, k, cache), rotary_ref(pos, q, k, cache), strict=True):
        torch.testing.assert_close(out, ref)
