"""Weight-only quantized GEMMs in Triton: W8A16 and W4A16, ``out = x @ dequant(W).T``.

Weights come as the engine's quantized Linear layers hold them (engine/quant/schemes.py)::

    int8  qweight (N, K) int8                       scale  (N,) float32
    int4  qweight (N, K // 2) uint8, low nibble = even k   scales (N, K // G) float, zeros (N, K // G) uint8

A program computes a (BLOCK_M, BLOCK_N) tile of out, walking K BLOCK_K at a time (tiles, split-K and
the launch: kernels/gemm_tiles.py)::

    x tile (BLOCK_M, BLOCK_K) ───────────────────────────────┐
    W tile (BLOCK_N, BLOCK_K) ─ dequantize in registers ─────┴─ tl.dot ─► acc (BLOCK_M, BLOCK_N) float32
        int8: q -> x.dtype is exact; the per-channel scale multiplies acc once, after the loop
        int4: the grouped kernel of kernels/wna16_gemm.py (4 bits, integer zero points)

Each launcher sits beside its dequantize-then-matmul reference (``*_ref``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, tl, triton
from kernels.gemm_tiles import (
    DECODE_MAX_M,
    PREFILL_MIN_M,
    GemmConfig,
    choose_config,
    launch_gemm,
    tile_of,
)  # fmt: skip
from kernels.wna16_gemm import GroupWeight, unpack_int4, wna16_gemm, wna16_ref

__all__ = [
    "DECODE_MAX_M",
    "PREFILL_MIN_M",
    "GemmConfig",
    "choose_config",
    "unpack_int4",
    "w4a16_gemm",
    "w4a16_ref",
    "w8a16_gemm",
    "w8a16_ref",
]


def w8a16_ref(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: dequantize ``qweight (N, K) int8 * scale (N,)`` to x.dtype, then F.linear.

    x (..., K) -> (..., N) in x.dtype.
    """
    w = (qweight.float() * scale.float()[:, None]).to(x.dtype)
    return F.linear(x, w, bias)


def w4a16_ref(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """Reference: dequantize ``(q - zeros) * scales`` per group of ``group_size`` to x.dtype, then F.linear.

    x (..., K); qweight (N, K // 2) uint8; scales, zeros (N, K // group_size) -> (..., N) in x.dtype.
    """
    return wna16_ref(x, GroupWeight(qweight, scales, zeros, group_size, 4), bias)


@triton.jit
def _w8a16_kernel(
    x_ptr,  # (M, K) float
    w_ptr,  # (N, K) int8
    scale_ptr,  # (N,) float32
    out_ptr,  # (SPLIT_K, M, N) float32 partials, or (1, M, N) in x's dtype
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # This split's K slice [k_lo, k_hi).
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        # int8 -> x.dtype is exact (|q| <= 127), so the scale can wait until after the loop.
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
    # Per-output-channel scale, then store (a partial sum when K is split).
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    o_ptrs = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check_x(x: Tensor, k: int, bias: Tensor | None, n: int) -> None:
    check(x.dim() >= 1 and x.shape[-1] == k, f"x must be (..., {k}), got {tuple(x.shape)}")
    check_tensor("x", x.reshape(-1, k), 2, FLOAT_DTYPES, x.device)
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,), x.device)
        check(bias.shape[0] == n, f"bias must be ({n},), got {tuple(bias.shape)}")


def w8a16_gemm(
    x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, config: GemmConfig | None = None
) -> Tensor:
    """Triton W8A16, same contract as :func:`w8a16_ref`: x (..., K) float -> new (..., N) in x.dtype.

    qweight (N, K) int8 with unit stride on K; scale (N,) float32 contiguous; bias (N,) in x.dtype.
    Raises ValueError on shape, stride, dtype or device mismatches.
    """
    check_tensor("qweight", qweight, 2, (torch.int8,), x.device)
    kern = launchable(_w8a16_kernel, x.device)
    n, k = qweight.shape
    _check_x(x, k, bias, n)
    check_tensor("scale", scale, 1, (torch.float32,), x.device)
    check(scale.shape == (n,), f"scale must be ({n},), got {tuple(scale.shape)}")
    return launch_gemm(kern, x, n, None, config, bias, (qweight, scale), (qweight.stride(0),), {})


def w4a16_gemm(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
    bias: Tensor | None = None, config: GemmConfig | None = None,
) -> Tensor:  # fmt: skip
    """Triton W4A16, same contract as :func:`w4a16_ref`: x (..., K) float -> new (..., N) in x.dtype.

    qweight (N, K // 2) uint8; scales (N, K // G) float and zeros (N, K // G) uint8, unit stride on the
    group; group_size a power of two >= 16 dividing K. Raises ValueError on any mismatch.
    """
    check_tensor("qweight", qweight, 2, (torch.uint8,), x.device)
    k = 2 * qweight.shape[1]
    check(group_size >= 16 and group_size & (group_size - 1) == 0 and k % group_size == 0,
          f"group_size must be a power of two >= 16 dividing K={k}, got {group_size}")  # fmt: skip
    check(zeros.dtype == torch.uint8, f"zeros dtype must be torch.uint8, got {zeros.dtype}")
    return wna16_gemm(x, GroupWeight(qweight, scales, zeros, group_size, 4), bias, config)
