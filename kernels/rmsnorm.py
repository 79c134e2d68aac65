"""RMSNorm with an optional fused residual add (Llama, Qwen3 incl. its per-head q/k norm)."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, num_warps_for, tl, triton


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


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # (T, H)
    res_ptr,  # (T, H) or unused
    w_ptr,  # (H,)
    out_ptr,  # (T, H)
    res_out_ptr,  # (T, H) or unused
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per row; the whole row sits in registers (BLOCK_H >= H).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    # Fused residual add in the input dtype, written out as the new residual stream.
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    # Mean of squares and the scaling in float32, cast back before the weight (HF semantics).
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, normed * w, mask=mask)


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton RMSNorm, same contract as :func:`rms_norm_ref` (out of place; new tensors returned).

    x, residual: (T, H) with unit stride on H (rows may be strided); weight: (H,) contiguous,
    all one dtype and device. Raises ValueError on any mismatch.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES, x.device)
    kern = launchable(_rms_norm_kernel, x.device)
    num_tokens, hidden = x.shape
    check_tensor("weight", weight, 1, (x.dtype,), x.device)
    check(weight.shape[0] == hidden, f"weight must be ({hidden},), got {tuple(weight.shape)}")
    check(eps > 0, f"eps must be > 0, got {eps}")
    if residual is not None:
        check_tensor("residual", residual, 2, (x.dtype,), x.device)
        check(
            residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
        )
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    res_in = residual if residual is not None else x
    block = triton.next_power_of_2(hidden)
    if num_tokens > 0:
        kern[(num_tokens,)](
            x, res_in, weight, out, res_out,
            x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=num_warps_for(block),
        )  # fmt: skip
    return out if residual is None else (out, res_out)
