"""AWQ (Lin et al., 2023): activation-aware scaling before rounding, then clipping.

A few input channels carry large activations; their weights matter most. AWQ multiplies input channel
c of a linear by s_c and divides whatever produces that channel by s_c (the RMSNorm weight before
qkv_proj and gate_up_proj, the up_proj rows before down_proj), which leaves the model's function
unchanged in exact arithmetic but gives the salient channels a finer grid after rounding:

    s = mean|x|^a / mean|w~|^(1-a), normalised so sqrt(max s * min s) = 1, for a on a grid in [0, 1)
        (w~: |w| over its group's max), keeping the a whose rounded layer output is closest (MSE) to
        the unrounded one on calibration inputs;
    then, per (row, group), clip the weights to t * max|w|, t in 1, 0.975, ..., 0.525, keeping the t
    with the least output error (not q's and k's rows, whose errors go through the softmax, as AWQ does).

Rounding is then to nearest on the given grid (training/quant_grid.py: int4 asymmetric in groups, int8
symmetric per row by default). The search compares the MLP's output for
gate_up_proj (as AutoAWQ) but the projection's own output for qkv_proj (AutoAWQ: the attention block's) and
down_proj; v_proj -> o_proj scaling is skipped, as AutoAWQ skips it whenever K/V heads are grouped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from training.quant_grid import GridSpec, QuantResult, dequantize, find_params, quantize, rtn_spec

N_GRID = 20
MAX_SHRINK = 0.5
SEARCH_TOKENS = 4096  # calibration rows used for the searches
CLIP_TOKENS = 512


class AwqScales(NamedTuple):
    qkv: Tensor  # (H,) divides input_layernorm, multiplies qkv_proj's columns
    gate_up: Tensor  # (H,) divides post_attention_layernorm, multiplies gate_up_proj's columns
    down: Tensor  # (I,) divides up_proj's rows, multiplies down_proj's columns


def fake_quant(w: Tensor, spec: GridSpec) -> Tensor:
    return rtn_spec(w, spec).dequantized()


def _linear(x: Tensor, w: Tensor) -> Tensor:
    return x @ w.t()


@torch.no_grad()
def search_scale(
    w: Tensor, x: Tensor, spec: GridSpec, block: Callable[[Tensor, Tensor], Tensor] = _linear,
) -> Tensor:  # fmt: skip
    """The per-input-channel scale s (K,) for ``w (N, K)`` given inputs ``x (T, K)``: the one whose rounded
    weight keeps ``block(x, w)`` (default: the linear's own output) closest to the unrounded one."""
    x = x[:SEARCH_TOKENS].float()
    w = w.float()
    n, k = w.shape
    group = spec.group_for(k)
    x_mean = x.abs().mean(0)
    wg = w.abs().reshape(n, -1, group) if k % group == 0 else w.abs()[:, None, :]
    w_mean = (wg / wg.amax(dim=-1, keepdim=True).clamp_min(1e-8)).reshape(n, k).mean(0)
    ref = block(x, w)
    best, best_s = float("inf"), torch.ones(k)
    for i in range(N_GRID):
        a = i / N_GRID
        s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = float((block(x, fake_quant(w * s, spec) / s) - ref).pow(2).mean())
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(w: Tensor, x: Tensor, spec: GridSpec) -> Tensor:
    """``w (N, K)`` with each (row, group) clipped to the fraction of its max|w| that best keeps the
    output on inputs ``x (T, K)``."""
    n, k = w.shape
    group = spec.group_for(k)
    if k % group:
        return w
    x = x[:CLIP_TOKENS].float().reshape(-1, k // group, group)  # (T, groups, G)
    wg = w.float().reshape(n, k // group, group)
    ref = torch.einsum("tgc,ngc->tng", x, wg)
    org_max = wg.abs().amax(dim=-1, keepdim=True)  # (N, groups, 1)
    best_err = torch.full((n, k // group), float("inf"))
    best_max = org_max.clone()
    for i in range(int(MAX_SHRINK * N_GRID)):
        mx = org_max * (1 - i / N_GRID)
        cur = wg.clamp(-mx, mx).reshape(n * (k // group), group)
        p = find_params(cur, spec.bits, spec.symmetric, spec.scale_dtype)
        q = dequantize(quantize(cur, p, spec.bits), p).reshape(n, k // group, group)
        err = (torch.einsum("tgc,ngc->tng", x, q) - ref).pow(2).mean(0)  # (N, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], mx, best_max)
    return wg.clamp(-best_max, best_max).reshape(n, k)


@torch.no_grad()
def awq_layer(
    weights: dict[str, Tensor], inputs: dict[str, Tensor], inter: int, qk_rows: int, spec: GridSpec,
) -> tuple[AwqScales, dict[str, QuantResult]]:  # fmt: skip
    """AWQ of one decoder layer.

    weights: "qkv_proj", "o_proj", "gate_up_proj", "down_proj" (N, K) float; inputs: each projection's
    calibration inputs (T, K) from the unquantized layer; inter: intermediate_size (gate rows, then up
    rows); qk_rows: q_size + kv_size, the rows of qkv_proj before v's. Returns the scales (for the caller to fold into the norms and up_proj) and each projection
    quantized after scaling and clipping.
    """
    s_qkv = search_scale(weights["qkv_proj"], inputs["qkv_proj"], spec)
    down = weights["down_proj"].float()

    def mlp(x: Tensor, w: Tensor) -> Tensor:  # gate_up's rounding judged by the MLP's output
        gate, up = (x @ w.t()).split(inter, dim=-1)
        return (F.silu(gate) * up) @ down.t()

    s_gu = search_scale(weights["gate_up_proj"], inputs["gate_up_proj"], spec, mlp)
    s_down = search_scale(weights["down_proj"], inputs["down_proj"], spec)
    scaled = {
        "qkv_proj": weights["qkv_proj"].float() * s_qkv,
        "o_proj": weights["o_proj"].float(),
        "gate_up_proj": weights["gate_up_proj"].float() * s_gu,
        "down_proj": weights["down_proj"].float() * s_down,
    }
    scaled["gate_up_proj"][inter:] /= s_down[:, None]  # up_proj's rows produce down_proj's inputs
    xs = {"qkv_proj": inputs["qkv_proj"] / s_qkv, "o_proj": inputs["o_proj"],
          "gate_up_proj": inputs["gate_up_proj"] / s_gu, "down_proj": inputs["down_proj"] / s_down}  # fmt: skip
    results = {}
    for name, w in scaled.items():
        if name == "qkv_proj":  # only v's rows: q and k errors are amplified by the softmax (AutoAWQ)
            w = torch.cat((w[:qk_rows], search_clip(w[qk_rows:], xs[name], spec)))
        else:
            w = search_clip(w, xs[name], spec)
        results[name] = rtn_spec(w, spec)
    return AwqScales(s_qkv, s_gu, s_down), results
