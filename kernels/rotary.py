"""Rotary position embedding (NeoX / Hugging Face rotate-half style), incl. Llama-3 scaling.

The cos/sin cache is one (max_position, head_dim) tensor, row p = ``[cos(p*f) | sin(p*f)]``
for the head_dim // 2 frequencies f, so a kernel reads one row per token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

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
