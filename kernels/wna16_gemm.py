"""Grouped weight-only GEMM (W4A16 / W8A16 with a scale and zero per group of inputs), the kernel every
imported integer format maps onto (GPTQ, AWQ, compressed-tensors, GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q6_K) and
Tandem's own load-time int4: ``out = x @ dequant(W).T``, beside its reference :func:`wna16_ref`.

The weight (:class:`GroupWeight`), for W (N, K) and groups of G inputs (the last group may be short)::

    qweight  bits 4: (N, K // 2) uint8, byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4 (low nibble first)
             bits 8: (N, K) uint8
    scales   (N, ceil(K / G)) float (any float dtype; the kernel works in float32)
    zeros    (N, ceil(K / G)) uint8 integer zero points:  w = (q - z) * s       GPTQ, AWQ, compressed-tensors
             or float32 offsets:                         w = q * s + z          GGUF's Q4_1 and Q4_K (the
                                                         offset is not a multiple of the scale)
    perm     None, or (K,) int32: column k of W multiplies x[..., perm[k]]    GPTQ act-order (desc_act):
             the converter sorts W's columns by group, so each group is contiguous again, and the kernel
             gathers x's columns through perm instead of reading a g_idx per weight

A program walks K by BLOCK_K, where BLOCK_K divides both K and G (the largest power of two dividing
gcd(G, K), at most 128, at least 16): every weight tile lies in one group, so it has one (scale, zero)
per row. Tiles, split-K and the launch are kernels/gemm_tiles.py's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, tl, triton
from kernels.gemm_tiles import GemmConfig, launch_gemm, tile_of

BITS = (4, 8)
MIN_BLOCK_K = 16  # tl.dot's smallest K


class GroupWeight(NamedTuple):
    """A grouped quantized W (N, K); see the module docstring for each field's layout."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    group_size: int
    bits: int
    perm: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the dense weight."""
        n, cols = self.qweight.shape
        return n, cols * 8 // self.bits

    @property
    def offset_zeros(self) -> bool:
        """Whether ``zeros`` are float offsets (w = q * s + z) rather than integer zero points."""
        return self.zeros.is_floating_point()


def pack_int4(q: Tensor) -> Tensor:
    """q (N, K) integers in [0, 15], K even -> (N, K // 2) uint8, low nibble = even column."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q8 = q.to(torch.uint8)
    return q8[:, 0::2] | (q8[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 values in [0, 15]; the low nibble is the even column."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def codes(w: GroupWeight) -> Tensor:
    """(N, K) uint8: the unpacked integer codes, in W's stored column order."""
    return unpack_int4(w.qweight) if w.bits == 4 else w.qweight


def block_k_align(group_size: int, k: int) -> int:
    """The largest power of two dividing gcd(group_size, K), at most 128; ValueError below 16."""
    g = math.gcd(group_size, k)
    align = min(g & -g, 128)
    check(align >= MIN_BLOCK_K, f"group size {group_size} and K={k} share no power-of-two tile of >= "
          f"{MIN_BLOCK_K} columns (gcd {g})")  # fmt: skip
    return align


def dequantize_group(w: GroupWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense W (N, K) in ``dtype``, columns in x's order (perm undone), computed in float32."""
    q = codes(w).float()
    n, k = q.shape
    g = torch.arange(k, device=q.device) // w.group_size  # (K,) the group of each stored column
    s, z = w.scales.float()[:, g], w.zeros.float()[:, g]
    deq = q * s + z if w.offset_zeros else (q - z) * s
    if w.perm is not None:
        dense = torch.empty_like(deq)
        dense[:, w.perm.long()] = deq
        deq = dense
    return deq.to(dtype)


def wna16_ref(x: Tensor, w: GroupWeight, bias: Tensor | None = None) -> Tensor:
    """Reference: dequantize W to x.dtype, then F.linear. x (..., K) -> (..., N) in x.dtype."""
    return F.linear(x, dequantize_group(w, x.dtype), bias)


@triton.jit
def _wna16_kernel(
    x_ptr,  # (M, K) float
    w_ptr,  # (N, K // 2) uint8 for BITS 4, (N, K) uint8 for BITS 8
    scales_ptr,  # (N, ceil(K / GROUP_SIZE)) float
    zeros_ptr,  # (N, ceil(K / GROUP_SIZE)) uint8 zero points or float32 offsets
    perm_ptr,  # (K,) int32 when HAS_PERM (else unused)
    out_ptr,  # (SPLIT_K, M, N) float32 partials, or (1, M, N) in x's dtype
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_os, stride_om,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, OFFSET_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # K, k_per_split and the group are multiples of BLOCK_K: no K masks in the loop.
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Act-order: W's column k multiplies x's column perm[k], so gather x rather than W's groups.
        if HAS_PERM:
            x_cols = tl.load(perm_ptr + offs_k)
        else:
            x_cols = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :],
                    mask=m_mask[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
        if BITS == 4:
            # (BLOCK_N, BLOCK_K // 2) bytes -> interleaved nibbles (BLOCK_N, BLOCK_K) in column order
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + half[None, :], mask=n_mask[:, None], other=0)
            q = tl.interleave(packed & 0xF, packed >> 4)
        else:
            q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None], other=0)
        # One (scale, zero) per row for the whole tile, since BLOCK_K divides GROUP_SIZE.
        g = k0 // GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.float32)
        if OFFSET_ZEROS:
            w = q.to(tl.float32) * s[:, None] + z[:, None]
        else:
            w = (q.to(tl.float32) - z[:, None]) * s[:, None]
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K) tile
    o_ptrs = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def check_group_weight(w: GroupWeight, device: torch.device) -> int:
    """Validate ``w``'s fields for a launch on ``device``; returns the BLOCK_K alignment. ValueError if bad."""
    check(w.bits in BITS, f"bits must be one of {BITS}, got {w.bits}")
    check_tensor("qweight", w.qweight, 2, (torch.uint8,), device)
    n, k = w.shape
    check(w.group_size >= 1, f"group_size must be positive, got {w.group_size}")
    align = block_k_align(w.group_size, k)
    check_tensor("scales", w.scales, 2, FLOAT_DTYPES, device)
    check_tensor("zeros", w.zeros, 2, (torch.uint8, torch.float32), device)
    groups = (n, -(-k // w.group_size))
    check(tuple(w.scales.shape) == groups and tuple(w.zeros.shape) == groups,
          f"scales and zeros must be {groups}, got {tuple(w.scales.shape)} and {tuple(w.zeros.shape)}")  # fmt: skip
    if w.perm is not None:
        check_tensor("perm", w.perm, 1, (torch.int32,), device)
        check(w.perm.shape[0] == k, f"perm must be ({k},), got {tuple(w.perm.shape)}")
    return align


def wna16_gemm(x: Tensor, w: GroupWeight, bias: Tensor | None = None, config: GemmConfig | None = None) -> Tensor:
    """Triton grouped W4A16 / W8A16, same contract as :func:`wna16_ref`: x (..., K) float -> new (..., N)
    in x.dtype; bias (N,) in x.dtype. Raises ValueError on any shape, stride, dtype or device mismatch."""
    kern = launchable(_wna16_kernel, x.device)
    align = check_group_weight(w, x.device)
    n, k = w.shape
    check(x.dim() >= 1 and x.shape[-1] == k, f"x must be (..., {k}), got {tuple(x.shape)}")
    check_tensor("x", x.reshape(-1, k), 2, FLOAT_DTYPES, x.device)
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,), x.device)
        check(bias.shape[0] == n, f"bias must be ({n},), got {tuple(bias.shape)}")
    perm = w.perm if w.perm is not None else w.zeros  # any pointer: unused without HAS_PERM
    consts = dict(GROUP_SIZE=w.group_size, BITS=w.bits, OFFSET_ZEROS=w.offset_zeros, HAS_PERM=w.perm is not None)
    return launch_gemm(kern, x, n, align, config, bias, (w.qweight, w.scales, w.zeros, perm),
                       (w.qweight.stride(0), w.scales.stride(0), w.zeros.stride(0)), consts)  # fmt: skip
