"""Rotary position embedding (NeoX / Hugging Face rotate-half style), incl. Llama-3 scaling.

The cos/sin cache is one (max_position, head_dim) tensor, row p = ``[cos(p*f) | sin(p*f)]``
for the head_dim // 2 frequencies f, so a kernel reads one row per token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, tl, triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> Tensor:
    """(head_dim // 2,) float32 inverse frequencies, op for op as transformers computes them."""
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def build_cos_sin_cache(
    head_dim: int,
    max_position: int,
    theta: float,
    rope_scaling: dict[str, Any] | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """(max_position, head_dim) cache laid out ``[cos(half) | sin(half)]``, half = head_dim // 2.

    rope_scaling: None, ``{"rope_type": "default"}``, ``{"rope_type": "linear", "factor": f}`` or
    Llama-3 ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``; the older key "type" is accepted for "rope_type".
    Raises ValueError for an odd head_dim or any other rope type.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    inv_freq = _inv_freq(head_dim, theta, rope_scaling)  # (half,)
    positions = torch.arange(max_position, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]  # (max_position, half)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=device)


def rotary_ref(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch reference: rotate q (T, Hq, D) and k (T, Hk, D) by positions (T,) int64.

    Returns new tensors in the inputs' dtypes; the math runs in float32. Rotate-half pairs
    dimension i with i + D/2: ``out1 = x1*cos - x2*sin``, ``out2 = x2*cos + x1*sin``.
    """
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions].float()  # (T, D)
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # (T, 1, half)

    def rotate(x: Tensor) -> Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotary_kernel(
    pos_ptr,  # (T,) int64
    q_ptr,  # (T, Hq, D)
    k_ptr,  # (T, Hk, D)
    cache_ptr,  # (max_position, D) [cos | sin]
    q_out_ptr,  # (T, Hq, D) contiguous
    k_out_ptr,  # (T, Hk, D) contiguous
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    # One program per token: its cos/sin row is read once and reused by every q and k head.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    dtype = q_out_ptr.dtype.element_ty
    # Query heads: both halves in float32, (BLOCK_HQ, BLOCK_HALF) each; dim i pairs with i + D/2.
    heads = tl.arange(0, BLOCK_HQ)[:, None]
    mask = (heads < num_q_heads) & (dims < HALF)
    src = q_ptr + t * stride_qt + heads * stride_qh + dims
    dst = q_out_ptr + (t * num_q_heads + heads) * (2 * HALF) + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)
    # Key heads, the same way (a separate stanza: kernels here call no jit helpers, see _triton).
    heads = tl.arange(0, BLOCK_HK)[:, None]
    mask = (heads < num_k_heads) & (dims < HALF)
    src = k_ptr + t * stride_kt + heads * stride_kh + dims
    dst = k_out_ptr + (t * num_k_heads + heads) * (2 * HALF) + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


def rotary(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Triton rotary embedding, same contract as :func:`rotary_ref`: out of place.

    Returns new contiguous (T, Hq, D) and (T, Hk, D) tensors; q and k are left untouched, so
    they may be strided views of a fused qkv projection (unit stride on D required).
    positions (T,) int64 must lie in [0, max_position): they are not checked (that would sync).
    Raises ValueError on shape, stride, dtype or device mismatches.
    """
    check_tensor("q", q, 3, FLOAT_DTYPES, q.device)
    kern = launchable(_rotary_kernel, q.device)
    num_tokens, num_q_heads, head_dim = q.shape
    check_tensor("k", k, 3, (q.dtype,), q.device)
    check_tensor("positions", positions, 1, (torch.int64,), q.device, contiguous_last=False)
    check_tensor("cos_sin_cache", cos_sin_cache, 2, FLOAT_DTYPES, q.device)
    check(k.shape[0] == num_tokens and k.shape[2] == head_dim,
          f"k must be ({num_tokens}, Hk, {head_dim}), got {tuple(k.shape)}")  # fmt: skip
    check(
        positions.shape[0] == num_tokens, f"positions must be ({num_tokens},), got {tuple(positions.shape)}"
    )
    check(head_dim % 2 == 0, f"head_dim must be even, got {head_dim}")
    check(cos_sin_cache.shape[1] == head_dim,
          f"cos_sin_cache must be (max_position, {head_dim}), got {tuple(cos_sin_cache.shape)}")  # fmt: skip
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        kern[(num_tokens,)](
            positions, q, k, cos_sin_cache, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            num_q_heads, k.shape[1],
            HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            num_warps=4,
        )  # fmt: skip
    return q_out, k_out
