"""Weight formats of the post-training quantization schemes, and their quantize/dequantize functions.

Every scheme quantizes a dense weight ``w (N, K)`` (out_features, in_features) row by row:

    int8  W8A16  per output channel, symmetric:   w ~= q * scale[n]              q int8 in [-127, 127]
    int4  W4A16  per group of G inputs, asymmetric: w ~= (q - zero[n, g]) * scale[n, g]   q in [0, 15]
    fp8   W8A8   per output channel:              w ~= float(q) * scale[n]      q float8_e4m3fn

int4 storage (G = 128 by default; ``group_size_for`` picks a smaller power of two for narrow layers)::

    qweight (N, K // 2) uint8     byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4   (low nibble first)
    scales  (N, K // G)  float     one per (row, group)
    zeros   (N, K // G)  uint8     integer zero points in [0, 15]; zero is exactly representable

Nothing here depends on a device: the functions run wherever their inputs live.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from engine.config import QUANTIZATIONS
from kernels.quant_gemm import unpack_int4

SCHEMES: tuple[str, ...] = QUANTIZATIONS
INT4_GROUP_SIZE = 128
MIN_INT4_GROUP_SIZE = 16
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_EPS = 1e-12  # floor for scales of all-zero rows/groups (their q is 0 either way)


class Int8Weight(NamedTuple):
    qweight: Tensor  # (N, K) int8
    scale: Tensor  # (N,) float32


class Int4Weight(NamedTuple):
    qweight: Tensor  # (N, K // 2) uint8, two values a byte
    scales: Tensor  # (N, K // group_size) float32
    zeros: Tensor  # (N, K // group_size) uint8
    group_size: int


class Fp8Weight(NamedTuple):
    qweight: Tensor  # (N, K) float8_e4m3fn
    scale: Tensor  # (N,) float32


def check_scheme(name: str | None) -> str | None:
    """``name`` if it is a known scheme or None, else ValueError listing the schemes."""
    if name is not None and name not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)} (or None)")
    return name


def group_size_for(in_features: int, preferred: int = INT4_GROUP_SIZE) -> int | None:
    """The int4 group for a layer: ``preferred`` when it divides in_features, else the largest power of
    two dividing both (>= MIN_INT4_GROUP_SIZE); None when there is none (the layer stays dense)."""
    group = math.gcd(in_features, preferred)
    return group if group >= MIN_INT4_GROUP_SIZE and group & (group - 1) == 0 else None


def quantize_int8(w: Tensor) -> Int8Weight:
    """w (N, K) float -> per-row symmetric int8: scale = max|w[n]| / 127, q = round(w / scale)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(_EPS)  # (N,)
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def dequantize_int8(q: Int8Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K) in ``dtype``: q * scale, computed in float32."""
    return (q.qweight.float() * q.scale[:, None]).to(dtype)


def pack_int4(q: Tensor) -> Tensor:
    """q (N, K) integers in [0, 15], K even -> (N, K // 2) uint8, low nibble = even column."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q8 = q.to(torch.uint8)
    return q8[:, 0::2] | (q8[:, 1::2] << 4)


def quantize_int4(w: Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """w (N, K) float -> group-wise asymmetric int4, K a multiple of group_size.

    Per (row, group): the range [min(w, 0), max(w, 0)] is split into 15 steps, scale = range / 15,
    zero = round(-min / scale) in [0, 15], q = clamp(round(w / scale) + zero, 0, 15).
    Raises ValueError when group_size does not divide K or is not an even number.
    """
    n, k = w.shape
    if group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"int4 group size {group_size} must be even and divide in_features {k}")
    wg = w.float().reshape(n, k // group_size, group_size)
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp_min(_EPS)  # (N, G)
    zeros = torch.round(-lo / scales).clamp_(0, 15)  # (N, G)
    q = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp_(0, 15)
    return Int4Weight(pack_int4(q.reshape(n, k)), scales, zeros.to(torch.uint8), group_size)


def dequantize_int4(q: Int4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K) in ``dtype``: (q - zero) * scale per group, computed in float32."""
    vals = unpack_int4(q.qweight).float()  # (N, K)
    n, k = vals.shape
    g = q.group_size
    deq = (vals.reshape(n, k // g, g) - q.zeros.float()[..., None]) * q.scales.float()[..., None]
    return deq.reshape(n, k).to(dtype)


def quantize_fp8(w: Tensor) -> Fp8Weight:
    """w (N, K) float -> float8_e4m3fn with a per-row scale max|w[n]| / 448 (no value saturates)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp_min(_EPS)  # (N,)
    q = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Weight(q, scale)


def dequantize_fp8(q: Fp8Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K) in ``dtype``: float(q) * scale, computed in float32."""
    return (q.qweight.float() * q.scale[:, None]).to(dtype)


class Fp8BlockWeight(NamedTuple):
    """fp8 with one scale per (block_n, block_k) tile, as block-quantized FP8 checkpoints store it."""

    qweight: Tensor  # (N, K) float8_e4m3fn
    scale: Tensor  # (ceil(N / block_n), ceil(K / block_k)) float32
    block: tuple[int, int]  # (block_n, block_k)


def dequantize_fp8_block(q: Fp8BlockWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K) in ``dtype``: float(q) * the scale of its tile, computed in float32."""
    n, k = q.qweight.shape
    bn, bk = q.block
    s = q.scale.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return (q.qweight.float() * s).to(dtype)
