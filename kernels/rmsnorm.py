"""RMSNorm with an optional fused residual add (Llama, Qwen3 incl. its per-head q/k norm)."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_ref(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """PyTorch reference RMSNorm, Hugging Face ``LlamaRMSNorm`` semantics.

    x: (T, H); weight: (H,); residual: (T, H) or None.
    Without residual returns ``weight * normalize(x)``. With residual returns
    ``(weight * normalize(r), r)`` where ``r = x + residual`` in x.dtype (the new residual stream).
    The normalisation runs in float32 and is cast back to x.dtype before the weight multiply.
    Nothing is modified in place.
    """
    if residual is not None:
        x = (x + residual).to(x.dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, x)
