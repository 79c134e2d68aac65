"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum; config.json ``quantization_config.quant_method`` "gptq").

Config: ``bits`` (4 or 8 here), ``group_size`` (-1: one group per row), ``desc_act`` (act-order),
``sym``, ``checkpoint_format`` ("gptq", the default, or "gptq_v2"). A module's tensors, for W (N, K)
and G = group_size::

    qweight (K * bits / 32, N) int32   packed along K: word (r, n) holds q[r*per + i, n] at bits*i
    qzeros  (ceil(K / G), N * bits / 32) int32   packed along N
    scales  (ceil(K / G), N) float16
    g_idx   (K,) int32   the group of each input column (k // G, or any order under desc_act)
    bias    (N,) optional

    w[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])
    z = stored zero + 1 for checkpoint_format "gptq" (AutoGPTQ stores zero - 1), the stored zero for "gptq_v2"

Act-order (desc_act): the columns are sorted by group (perm = argsort(g_idx)), which makes each group
contiguous; the kernel reads x through perm (kernels/wna16_gemm.py). That needs every group to hold
exactly G columns, as GPTQ's act-order assigns them (group of the i-th column in activation order =
i // G); any other g_idx is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.quant.formats.packing import unpack_int32
from kernels.wna16_gemm import GroupWeight, pack_int4

MEMBERS = ("qweight", "qzeros", "scales", "g_idx")
BITS = (4, 8)


def check_config(cfg: dict[str, Any]) -> None:
    """ValueError for a GPTQ config Tandem cannot serve (bits other than 4 and 8, unknown format)."""
    if int(cfg.get("bits", 4)) not in BITS:
        raise ValueError(f"GPTQ with {cfg.get('bits')} bits is not supported (4 and 8 are)")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2 are)")


def sort_groups(codes: Tensor, g_idx: Tensor, group_size: int) -> tuple[Tensor, Tensor | None]:
    """(codes with columns sorted by group, perm) for act-order; (codes, None) when g_idx is k // G.

    codes (N, K); g_idx (K,). Raises ValueError when a group does not hold exactly G columns.
    """
    k = g_idx.shape[0]
    natural = torch.arange(k, device=g_idx.device) // group_size
    g = g_idx.to(torch.int64)
    if torch.equal(g, natural):
        return codes, None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], natural):
        raise ValueError(f"g_idx assigns groups other than {group_size} columns each; not a GPTQ act-order order")
    return codes[:, perm], perm.to(torch.int32)


def convert(cfg: dict[str, Any], t: dict[str, Tensor]) -> GroupWeight:
    """One GPTQ module's tensors (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``) -> GroupWeight.

    Raises ValueError (via check_config) for unsupported configs, KeyError for a missing tensor.
    """
    check_config(cfg)
    bits = int(cfg.get("bits", 4))
    scales = t["scales"].t().contiguous()  # (N, groups)
    n = scales.shape[0]
    codes = unpack_int32(t["qweight"].t().contiguous(), bits)  # (N, K)
    k = codes.shape[1]
    group = int(cfg.get("group_size", -1))
    group = k if group <= 0 else group
    zeros = unpack_int32(t["qzeros"], bits)[:, :n].t()  # (N, groups)
    if cfg.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1  # may reach 2**bits: AutoGPTQ's stored zero - 1 wraps for zero 0
    g_idx = t.get("g_idx")
    perm = None
    if g_idx is not None:
        codes, perm = sort_groups(codes, g_idx, group)
    q = pack_int4(codes) if bits == 4 else codes.to(torch.uint8).contiguous()
    if int(zeros.max()) > 255:  # an 8-bit zero of 256: keep it as a float offset, w = q s - z s
        return GroupWeight(q, scales, (-zeros.float() * scales.float()).contiguous(), group, bits, perm)
    return GroupWeight(q, scales, zeros.to(torch.uint8).contiguous(), group, bits, perm)
