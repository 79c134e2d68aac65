"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding
error over the columns not yet quantized in proportion to the inverse Hessian of the layer's inputs.

For a linear layer y = x W.T with calibration inputs X (T, K), H = 2/T X.T X (K, K). With
Hinv = upper Cholesky factor of H^-1, column j's error e_j = (w_j - q_j) / Hinv[j, j] is subtracted
from the later columns: W[:, j+1:] -= e_j Hinv[j, j+1:]. Columns go in blocks of ``block`` (lazy batch
updates). Act-order (desc_act) visits columns by decreasing H[j, j], so the columns that matter most
are quantized first, while the most error can still be compensated; groups are then consecutive in
that order, and ``g_idx`` records each column's group (engine/quant/formats/gptq.py loads it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.quant_grid import GridParams, QuantResult, dequantize, find_params, find_params_mse, quantize

DEFAULT_BLOCK = 128


class Hessian:
    """Running H = 2/T sum of x x.T over every calibration row seen (float32, (K, K)); with the unquantized
    model's inputs x_fp for the same tokens also dxx = 2/T sum of (x_fp - x) x.T (asymmetric calibration)."""

    def __init__(self, k: int) -> None:
        self.h = torch.zeros(k, k)
        self.dxx: Tensor | None = None
        self.rows = 0

    def add(self, x: Tensor, x_fp: Tensor | None = None) -> None:
        """x (..., K): the layer's inputs for some calibration tokens; x_fp: the same tokens' inputs in
        the unquantized model (always given, or never)."""
        x2 = x.reshape(-1, x.shape[-1]).float()
        t = x2.shape[0]
        decay = self.rows / (self.rows + t)
        self.h *= decay
        self.rows += t
        c = (2 / self.rows) ** 0.5
        x2 = x2 * c
        self.h += x2.t() @ x2
        if x_fp is not None:
            if self.dxx is None:
                self.dxx = torch.zeros_like(self.h)
            self.dxx *= decay
            self.dxx += (x_fp.reshape(x2.shape).float() * c - x2).t() @ x2


@torch.no_grad()
def gptq_quantize(
    w: Tensor, h: Tensor, bits: int, group_size: int, symmetric: bool, act_order: bool,
    scale_dtype: torch.dtype, damp: float = 0.01, block: int = DEFAULT_BLOCK, mse: bool = False,
    static_groups: bool = False, dxx: Tensor | None = None, alpha: float = 1.0,
) -> QuantResult:  # fmt: skip
    """GPTQ of ``w (N, K)`` given ``h (K, K)``; group_size <= 0 means one group per row (channel).

    Returns codes, scales and zeros in x's column order (plus g_idx under act-order). Raises
    torch.linalg.LinAlgError if H stays singular after damping (increase ``damp``).
    """
    n, k = w.shape
    g = k if group_size <= 0 else group_size
    fit = find_params_mse if mse else find_params
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: any weight works, use 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if dxx is not None:  # aim at the unquantized model's output: W <- W + alpha W dxx (H + damp)^-1
        hd = H + damp * torch.mean(torch.diag(H)) * torch.eye(k)
        W += alpha * torch.cholesky_solve((W @ dxx.float()).t(), torch.linalg.cholesky(hd)).t()
        W[:, dead] = 0
    static = [fit(W[:, c : c + g], bits, symmetric, scale_dtype) for c in range(0, k, g)] if static_groups else []
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # A block holds whole groups, so a group's grid is found on its columns as already corrected.
    blk = max(block // g, 1) * g if g <= block else block
    codes = torch.zeros(n, k)
    scales, zeros = [], []
    params: GridParams | None = None
    for i1 in range(0, k, blk):
        i2 = min(i1 + blk, k)
        w1, err1, hinv1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                params = static[int(perm[col]) // g if perm is not None else col // g]
            elif col % g == 0:
                span = w1[:, i : i + g] if g <= blk else W[:, col : col + g]
                params = fit(span, bits, symmetric, scale_dtype)
                scales.append(params.scale)
                zeros.append(params.zero)
            assert params is not None
            q = quantize(w1[:, i], params, bits)
            codes[:, col] = q
            e = (w1[:, i] - dequantize(q, params)) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if static:
        scales, zeros = [p.scale for p in static], [p.zero for p in static]
    g_idx = None
    if perm is not None:  # back to x's column order; column perm[j] is in group j // g (static: perm[j] // g)
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if not static:
            g_idx = (torch.arange(k) // g)[inv].to(torch.int32)
    return QuantResult(codes.to(torch.uint8), torch.stack(scales, 1).to(scale_dtype),
                       torch.stack(zeros, 1).to(torch.uint8), g_idx, g, bits)  # fmt: skip
