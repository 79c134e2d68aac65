"""AWQ checkpoints (AutoAWQ's GEMM layout; config.json ``quantization_config.quant_method`` "awq").

Config: ``bits`` / ``w_bit`` (4), ``group_size`` / ``q_group_size``, ``zero_point`` (true), ``version``
("gemm"; "gemv" and the kernels' own layouts are refused). A module's tensors, for W (N, K)::

    qweight (K, N / 8) int32          packed along N, interleaved: nibble i of word (k, c) is q[k, 8c + AWQ_ORDER[i]]
    qzeros  (K / G, N / 8) int32      the same packing
    scales  (K / G, N) float16
    w[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]

The interleaving suits AutoAWQ's CUDA kernel, not ours: the converter unpacks it once, at load, into the
grouped layout of kernels/wna16_gemm.py (exact; nothing is requantized), so AWQ runs on the same W4A16
kernels as everything else rather than on a kernel of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.quant.formats.packing import AWQ_ORDER, unpack_int32
from kernels.wna16_gemm import GroupWeight, pack_int4

MEMBERS = ("qweight", "qzeros", "scales")


def check_config(cfg: dict[str, Any]) -> None:
    """ValueError for an AWQ config Tandem cannot serve."""
    bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
    version = str(cfg.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not cfg.get("zero_point", True):
        raise ValueError(f"AWQ {bits}-bit version {version!r} zero_point={cfg.get('zero_point', True)} is not "
                         "supported (4-bit GEMM with zero points is)")


def convert(cfg: dict[str, Any], t: dict[str, Tensor]) -> GroupWeight:
    """One AWQ module's tensors (``qweight``, ``qzeros``, ``scales``) -> GroupWeight."""
    check_config(cfg)
    codes = unpack_int32(t["qweight"], 4, AWQ_ORDER).t()  # (N, K)
    zeros = unpack_int32(t["qzeros"], 4, AWQ_ORDER).t()  # (N, groups)
    scales = t["scales"].t().contiguous()
    k, groups = codes.shape[1], scales.shape[1]
    group = int(cfg.get("group_size", cfg.get("q_group_size", k // groups)))
    group = k if group <= 0 else group
    return GroupWeight(pack_int4(codes), scales, zeros.to(torch.uint8).contiguous(), group, 4)
