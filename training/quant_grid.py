"""The integer grid every calibration method here rounds onto (as compressed-tensors and GPTQ define it).

For a block of weights ``w (N, G)`` (one group of G inputs per row) and ``bits`` b, maxq = 2**b - 1::

    asymmetric  lo = min(w, 0), hi = max(w, 0)      scale = (hi - lo) / maxq   zero = round(-lo / scale)
    symmetric   amax = max|w|                       scale = 2 amax / maxq      zero = 2**(b-1)
    code q = clamp(round(w / scale) + zero, 0, maxq)   w ~= (q - zero) * scale

Scales are rounded to the dtype they will be stored in *before* the codes are computed, so the written
checkpoint dequantizes to exactly what the calibration measured.

The searched grid (:func:`find_params_mse`, GPTQ's ``mse`` quantizer option) shrinks [lo, hi] (or amax) by
f in 1, 1 - 1/STEPS, ..., 1 - MAX_SHRINK and keeps, per row, the f whose rounding error sum |w - w~|^p is
least: clipping a few outlying weights buys a finer step for all the others. f = 1 is min/max itself, so
the searched grid's error (in that norm) is never larger.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_EPS = 1e-8
MSE_STEPS = 100  # shrink factors 1, 0.99, ...
MSE_MAX_SHRINK = 0.2  # ... down to 0.8
MSE_NORM = 2.4  # the exponent p of the error the search minimises (GPTQ's reference quantizer)


class GridParams(NamedTuple):
    scale: Tensor  # (N,) float32, representable in the storage dtype
    zero: Tensor  # (N,) float32 integers in [0, maxq]


def find_params(w: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, shrink: float = 1.0) -> GridParams:
    """Per-row grid of ``w (N, G)`` over its range times ``shrink``; see the module docstring."""
    maxq = 2**bits - 1
    wf = w.float()
    if symmetric:
        amax = wf.abs().amax(dim=1) * shrink
        scale = (2 * amax / maxq).clamp_min(_EPS).to(scale_dtype).float()
        return GridParams(scale, torch.full_like(scale, 2 ** (bits - 1)))
    lo, hi = wf.amin(dim=1).clamp(max=0) * shrink, wf.amax(dim=1).clamp(min=0) * shrink
    scale = ((hi - lo) / maxq).clamp_min(_EPS).to(scale_dtype).float()
    return GridParams(scale, torch.round(-lo / scale).clamp(0, maxq))


def grid_error(w: Tensor, p: GridParams, bits: int, norm: float = MSE_NORM) -> Tensor:
    """(N,) sum over the row of |w - w~|^norm, w~ = ``w (N, G)`` rounded onto ``p``."""
    return (dequantize(quantize(w, p, bits), p) - w.float()).abs().pow(norm).sum(1)


def find_params_mse(w: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype) -> GridParams:
    """Per-row grid of ``w (N, G)`` with the range shrink of least :func:`grid_error` (module docstring)."""
    best = find_params(w, bits, symmetric, scale_dtype)
    best_err = grid_error(w, best, bits)
    for i in range(1, int(MSE_MAX_SHRINK * MSE_STEPS) + 1):
        p = find_params(w, bits, symmetric, scale_dtype, 1 - i / MSE_STEPS)
        err = grid_error(w, p, bits)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = GridParams(torch.where(better, p.scale, best.scale), torch.where(better, p.zero, best.zero))
    return best


def quantize(w: Tensor, p: GridParams, bits: int) -> Tensor:
    """Codes of ``w (N, G)`` (or ``(N,)``) on the grid ``p``, as float32 integers in [0, 2**bits - 1]."""
    s, z = (p.scale, p.zero) if w.dim() == 1 else (p.scale[:, None], p.zero[:, None])
    return (torch.round(w.float() / s) + z).clamp(0, 2**bits - 1)


def dequantize(q: Tensor, p: GridParams) -> Tensor:
    s, z = (p.scale, p.zero) if q.dim() == 1 else (p.scale[:, None], p.zero[:, None])
    return (q - z) * s


class GridSpec(NamedTuple):
    """How a weight is rounded: bits, inputs per group (<= 0: the whole row), zero points or not, and
    the dtype scales are stored in."""

    bits: int
    group: int
    symmetric: bool
    scale_dtype: torch.dtype

    def group_for(self, k: int) -> int:
        return self.group if 0 < self.group < k else k


class QuantResult(NamedTuple):
    """One weight (N, K) quantized in groups of G inputs (columns in x's order)."""

    codes: Tensor  # (N, K) uint8 in [0, 2**bits - 1]
    scales: Tensor  # (N, ceil(K / G)) in the storage dtype
    zeros: Tensor  # (N, ceil(K / G)) uint8
    g_idx: Tensor | None  # (K,) int32 group of each column (act-order), None for k // G
    group_size: int
    bits: int

    def dequantized(self) -> Tensor:
        """(N, K) float32: what the checkpoint will compute."""
        k = self.codes.shape[1]
        g = self.g_idx.long() if self.g_idx is not None else torch.arange(k) // self.group_size
        return (self.codes.float() - self.zeros.float()[:, g]) * self.scales.float()[:, g]


def rtn_spec(w: Tensor, spec: GridSpec) -> QuantResult:
    """:func:`rtn` with the rounding of ``spec``."""
    return rtn(w, spec.bits, spec.group_for(w.shape[1]), spec.symmetric, spec.scale_dtype)


def rtn(w: Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> QuantResult:
    """Round-to-nearest of ``w (N, K)`` in groups of ``group_size`` columns (the last may be short)."""
    n, k = w.shape
    codes, scales, zeros = [], [], []
    for c in range(0, k, group_size):
        p = find_params(w[:, c : c + group_size], bits, symmetric, scale_dtype)
        codes.append(quantize(w[:, c : c + group_size], p, bits))
        scales.append(p.scale)
        zeros.append(p.zero)
    return QuantResult(torch.cat(codes, 1).to(torch.uint8), torch.stack(scales, 1).to(scale_dtype),
                       torch.stack(zeros, 1).to(torch.uint8), None, group_size, bits)  # fmt: skip
