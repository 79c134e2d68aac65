"""compressed-tensors checkpoints (llm-compressor's output; ``quantization_config.quant_method``
"compressed-tensors"), the format ``tandem quantize`` writes.

Config: ``format`` (global, or per config group), ``config_groups`` {name: {targets, weights: {num_bits,
type, symmetric, strategy, group_size, block_structure, actorder}, input_activations}}, ``ignore``.
A module's scheme is the first group whose targets match its name ("Linear" matches every projection,
"re:<regex>" matches by regex, anything else by name or name suffix), unless ``ignore`` matches it.

    pack-quantized (int weights, 1-8 bits; W4A16, W8A16):
        weight_packed      (N, ceil(K * bits / 32)) int32, packed along K; each value stored as q + 2**(bits-1)
        weight_scale       (N, ceil(K / G)) for strategy "group", (N, 1) "channel", (1,) "tensor"
        weight_zero_point  asymmetric only: int32 packed along N, (ceil(N * bits / 32), groups), values
                           zp + 2**(bits-1) (older writers: int8 (N, groups), unpacked)
        weight_shape       (2,) the dense (N, K)
        weight_g_idx       (K,) optional, actorder "group": as GPTQ's g_idx
        w = (q - zp) * scale = (stored - stored_zp) * scale
    int-quantized / naive-quantized: weight int8 (N, K) and weight_scale (and weight_zero_point)
    float-quantized (W8A8-FP8): weight float8_e4m3fn and weight_scale (engine/quant/formats/fp8.py)

Everything integer becomes a GroupWeight (channel and tensor strategies are one group of K); FP8 an
Fp8Weight or Fp8BlockWeight. Activation quantization (the "A8" of W8A8) is not applied: Tandem runs
int8 weights as W8A16 and fp8 weights with dynamic per-token scales.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from engine.quant.formats import fp8
from engine.quant.formats.gptq import sort_groups
from engine.quant.formats.packing import unpack_int32
from engine.quant.schemes import FP8_DTYPE, Fp8BlockWeight, Fp8Weight
from kernels.wna16_gemm import GroupWeight, pack_int4

MEMBERS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
           "input_scale", "input_zero_point", "weight_global_scale", "input_global_scale")  # fmt: skip
FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == "Linear" or name == target or name.endswith("." + target)


def scheme_for(cfg: dict[str, Any], module: str) -> tuple[dict[str, Any], str] | None:
    """(weights args, format) of ``module`` (e.g. "model.layers.0.self_attn.q_proj"), or None when it
    is ignored or no group targets it."""
    if any(_matches(module, t) for t in cfg.get("ignore") or ()):
        return None
    for group in (cfg.get("config_groups") or {}).values():
        if any(_matches(module, t) for t in group.get("targets") or ()) and group.get("weights"):
            return group["weights"], str(group.get("format") or cfg.get("format") or "")
    return None


def check_config(cfg: dict[str, Any]) -> None:
    """ValueError for formats and weight types Tandem cannot serve."""
    for name, group in (cfg.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        fmt = group.get("format") or cfg.get("format")
        if fmt not in FORMATS and fmt != "mixed-precision":
            raise ValueError(f"compressed-tensors format {fmt!r} (group {name}) is not supported "
                             f"(supported: {', '.join(FORMATS)})")
        if w.get("type", "int") == "int" and int(w.get("num_bits", 8)) not in (4, 8):
            raise ValueError(f"compressed-tensors group {name}: {w.get('num_bits')}-bit int weights are not "
                             "supported (4 and 8 are)")
        if w.get("type") == "float" and int(w.get("num_bits", 8)) != 8:
            raise ValueError(f"compressed-tensors group {name}: {w.get('num_bits')}-bit float weights are not "
                             "supported (fp8 is)")


def _group_size(args: dict[str, Any], k: int) -> int:
    return int(args["group_size"]) if args.get("strategy") == "group" else k


def _zero_points(args: dict[str, Any], t: dict[str, Tensor], n: int, groups: int) -> Tensor:
    """(N, groups) unsigned zero points: stored zp + 2**(bits-1); 2**(bits-1) when symmetric."""
    bits = int(args.get("num_bits", 8))
    half = 1 << (bits - 1)
    zp = t.get("weight_zero_point")
    if args.get("symmetric", True) or zp is None:
        return torch.full((n, groups), half, dtype=torch.uint8)
    if zp.dtype == torch.int32 and bits < 32 and zp.shape[0] != n:  # packed along N
        return unpack_int32(zp.t().contiguous(), bits)[:, :n].t().to(torch.uint8).contiguous()
    return (zp.to(torch.int32).reshape(n, groups) + half).to(torch.uint8)


def convert(cfg: dict[str, Any], module: str, t: dict[str, Tensor]) -> GroupWeight | Fp8Weight | Fp8BlockWeight:
    """One module's tensors -> its quantized weight. Raises ValueError when no scheme covers a
    quantized module or its format is unsupported."""
    found = scheme_for(cfg, module)
    if found is None:
        raise ValueError(f"{module} has quantized tensors but no compressed-tensors config group targets it")
    args, fmt = found
    weight = t.get("weight")
    if args.get("type") == "float" or fmt == "float-quantized" or (weight is not None and weight.dtype == FP8_DTYPE):
        return fp8.convert({"block_structure": args.get("block_structure")}, t)
    bits = int(args.get("num_bits", 8))
    if "weight_packed" in t:
        n, k = (int(v) for v in t["weight_shape"].tolist())
        stored = unpack_int32(t["weight_packed"], bits)[:, :k]  # (N, K) q + 2**(bits-1)
    else:  # int-quantized / naive-quantized: signed int8 values
        w = t["weight"]
        n, k = w.shape
        stored = w.to(torch.int32) + (1 << (bits - 1))
    s = t["weight_scale"]
    scale = s.reshape(n, -1) if s.numel() > 1 else s.reshape(1, 1).expand(n, 1)  # (N, groups)
    group = _group_size(args, k)
    zeros = _zero_points(args, t, n, scale.shape[1])
    codes, perm = stored, None
    if "weight_g_idx" in t:
        codes, perm = sort_groups(stored, t["weight_g_idx"], group)
    q = pack_int4(codes) if bits == 4 else codes.to(torch.uint8).contiguous()
    return GroupWeight(q, scale.contiguous(), zeros, group, bits, perm)
