"""SiLU-and-mul, the gated activation of Llama/Qwen MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, tl, triton


def silu_and_mul_ref(x: Tensor) -> Tensor:
    """PyTorch reference: x (T, 2*I) holding ``[gate | up]`` -> (T, I) = ``silu(gate) * up``."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # (T, 2*I)
    out_ptr,  # (T, I) contiguous
    stride_x,
    inter,
    BLOCK: tl.constexpr,
):
    # Grid (T, cdiv(I, BLOCK)): one program per row chunk.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    # silu in float32, rounded to the input dtype before the product, as the reference rounds.
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * inter + cols, act * up, mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """Triton SiLU-and-mul, same contract as :func:`silu_and_mul_ref`: x (T, 2*I) -> new (T, I).

    x needs unit stride on its last dim; raises ValueError on bad rank, dtype, odd width or device.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES, x.device)
    kern = launchable(_silu_and_mul_kernel, x.device)
    num_tokens, width = x.shape
    check(width % 2 == 0, f"x must be (T, 2*I) with an even last dim, got {tuple(x.shape)}")
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(max(inter, 1)))
    if num_tokens > 0 and inter > 0:
        grid = (num_tokens, triton.cdiv(inter, block))
        kern[grid](x, out, x.stride(0), inter, BLOCK=block, num_warps=4)
    return out
