"""Weight-only quantized GEMMs in Triton: W8A16 and W4A16, ``out = x @ dequant(W).T``.

Weights come as the engine's quantized Linear layers hold them (engine/quant/schemes.py)::

    int8  qweight (N, K) int8                       scale  (N,) float32
    int4  qweight (N, K // 2) uint8, low nibble = even k   scales (N, K // G) float, zeros (N, K // G) uint8

Grid (tiles of out (M, N), SPLIT_K). A program walks its K slice BLOCK_K at a time::

    x tile (BLOCK_M, BLOCK_K) ───────────────────────────────┐
    W tile (BLOCK_N, BLOCK_K) ─ dequantize in registers ─────┴─ tl.dot ─► acc (BLOCK_M, BLOCK_N) float32
        int8: q -> x.dtype is exact; the per-channel scale multiplies acc once, after the loop
        int4: BLOCK_K divides G, so a tile has one (scale, zero) per row: w = (q - zero) * scale
    SPLIT_K > 1: each split stores float32 partials (SPLIT_K, M, N) and torch sums them (deterministic)

Configs differ by M: decode (M <= 16) uses 16-row tiles and splits K until the grid fills the SMs, since
it only has to stream the weights once; prefill (M > 64) uses 128x128 tiles in grouped order for reuse.
They are starting points, not tuned on a GPU yet (bench/quant_gpu.py has the sweep to do that).
Each launcher sits beside its dequantize-then-matmul reference (``*_ref``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, tl, triton

DECODE_MAX_M = 16
PREFILL_MIN_M = 65
MAX_SPLIT_K = 8
DEFAULT_NUM_SMS = 132  # H100/H200; used when the tensors are not on a GPU (interpreter)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def choose_config(m: int, n: int, k: int, k_align: int | None = None, num_sms: int = DEFAULT_NUM_SMS) -> GemmConfig:
    """Tile sizes for an (M, K) x (K, N) product; BLOCK_K divides ``k_align`` (the int4 group) when given."""
    if m <= DECODE_MAX_M:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m < PREFILL_MIN_M:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    bk = min(bk, max(16, triton.next_power_of_2(k)), k_align or bk)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    # Memory-bound shapes: split K while the grid is short of one program per SM and every split
    # keeps at least 4 K tiles (fewer would spend more on partial sums than they save).
    while m < PREFILL_MIN_M and split < MAX_SPLIT_K and tiles * split < num_sms and k >= bk * split * 8:
        split *= 2
    return GemmConfig(bm, bn, bk, split, 8, warps, stages)


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 values in [0, 15]; the low nibble is the even column."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


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
    q = unpack_int4(qweight).float()  # (N, K)
    n, k = q.shape
    grouped = q.reshape(n, k // group_size, group_size)
    w = (grouped - zeros.float()[..., None]) * scales.float()[..., None]
    return F.linear(x, w.reshape(n, k).to(x.dtype), bias)


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row-tiles share each column of W tiles while it is still in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


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
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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


@triton.jit
def _w4a16_kernel(
    x_ptr,  # (M, K) float
    w_ptr,  # (N, K // 2) uint8
    scales_ptr,  # (N, K // GROUP_SIZE) float
    zeros_ptr,  # (N, K // GROUP_SIZE) uint8
    out_ptr,  # (SPLIT_K, M, N) float32 partials, or (1, M, N) in x's dtype
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_os, stride_om,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    half = tl.arange(0, BLOCK_K // 2)
    # K, k_per_split and the group are multiples of BLOCK_K: no K masks in the loop.
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :],
                    mask=m_mask[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
        # Each byte holds columns 2j (low nibble) and 2j+1 (high): (BLOCK_N, BLOCK_K // 2) bytes ->
        # interleaved nibbles (BLOCK_N, BLOCK_K) in column order.
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + half)[None, :],
                         mask=n_mask[:, None], other=0)
        q = tl.interleave(packed & 0xF, packed >> 4)
        # One (scale, zero) per row for the whole tile, since BLOCK_K divides GROUP_SIZE.
        g = k0 // GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.float32)
        w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(x.dtype)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    o_ptrs = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _launch(
    kernel: Any, x: Tensor, n: int, k_align: int | None, config: GemmConfig | None,
    bias: Tensor | None, args: tuple[Any, ...], strides: tuple[int, ...], consts: dict[str, Any],
) -> Tensor:  # fmt: skip
    """Shared launch: x (..., K) -> (..., N). ``args`` are the weight tensors, ``strides`` their row strides."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else DEFAULT_NUM_SMS
    cfg = config or choose_config(m, n, k, k_align, sms)
    check(k_align is None or k_align % cfg.block_k == 0, f"BLOCK_K {cfg.block_k} must divide the group {k_align}")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_per_split)
    dst = out[None] if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    kernel[grid](
        x2, *args, dst, m, n, k, k_per_split, x2.stride(0), *strides, dst.stride(0), dst.stride(1), **consts,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        out.copy_(dst.sum(0))
    if bias is not None:
        out += bias
    return out.reshape(*lead, n)


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
    return _launch(kern, x, n, None, config, bias, (qweight, scale), (qweight.stride(0),), {})


def w4a16_gemm(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
    bias: Tensor | None = None, config: GemmConfig | None = None,
) -> Tensor:  # fmt: skip
    """Triton W4A16, same contract as :func:`w4a16_ref`: x (..., K) float -> new (..., N) in x.dtype.

    qweight (N, K // 2) uint8; scales (N, K // G) float and zeros (N, K // G) uint8, unit stride on the
    group; group_size a power of two >= 16 dividing K. Raises ValueError on any mismatch.
    """
    check_tensor("qweight", qweight, 2, (torch.uint8,), x.device)
    kern = launchable(_w4a16_kernel, x.device)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    _check_x(x, k, bias, n)
    check(group_size >= 16 and group_size & (group_size - 1) == 0 and k % group_size == 0,
          f"group_size must be a power of two >= 16 dividing K={k}, got {group_size}")  # fmt: skip
    check_tensor("scales", scales, 2, FLOAT_DTYPES, x.device)
    check_tensor("zeros", zeros, 2, (torch.uint8,), x.device)
    groups = (n, k // group_size)
    check(tuple(scales.shape) == groups and tuple(zeros.shape) == groups,
          f"scales and zeros must be {groups}, got {tuple(scales.shape)} and {tuple(zeros.shape)}")  # fmt: skip
    return _launch(kern, x, n, group_size, config, bias, (qweight, scales, zeros),
                   (qweight.stride(0), scales.stride(0), zeros.stride(0)), {"GROUP_SIZE": group_size})  # fmt: skip
