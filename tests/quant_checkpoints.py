"""Pre-quantized checkpoints for tests, written here in each format's own layout from a dense tiny
checkpoint (the producing libraries, auto-gptq and autoawq, need CUDA builds), each with its *twin*: the
same checkpoint, dense, holding exactly the weights the quantized one dequantizes to.

Projections are rounded to nearest, 4-bit asymmetric with groups of ``group`` inputs (GPTQ act-order:
groups of columns in a random activation order shared by the layers reading the same input) or fp8
per tensor; the point is the layout, not the rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.quant.formats.packing import AWQ_ORDER, pack_int32

_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
          "up_proj": "mlp", "down_proj": "down"}  # fmt: skip
FORMATS = ("gptq", "gptq-act-order", "awq", "compressed-tensors", "fp8")


def _rtn(w: torch.Tensor, g_idx: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """(codes (N, K), zeros (N, groups), scales (N, groups) fp16, dequantized (N, K)) for 4-bit groups."""
    n = w.shape[0]
    lo, hi = torch.zeros(n, groups), torch.zeros(n, groups)
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo[:, g], hi[:, g] = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp_min(1e-6).half()
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    codes = (torch.round(w / s[:, g_idx]) + zeros[:, g_idx]).clamp(0, 15)
    return codes.long(), zeros.long(), scales, (codes - zeros[:, g_idx]) * s[:, g_idx]


def _awq_pack(v: torch.Tensor) -> torch.Tensor:
    """(R, C) nibbles -> (R, C / 8) int32 in AutoAWQ's interleaved order."""
    order = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
    return pack_int32(v.reshape(v.shape[0], -1, 8)[..., torch.argsort(order)].reshape(v.shape), 4)


def write_quantized(src: Path, out: Path, fmt: str, group: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write ``src`` (a single-file dense checkpoint) as ``fmt`` (one of FORMATS) to ``out / fmt`` and its
    twin to ``out / (fmt + '-twin')``; returns both directories."""
    cfg = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    quant: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}
    orders: dict[tuple[str, str], torch.Tensor] = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        short = module.rsplit(".", 1)[-1]
        if short not in _INPUT or kind != "weight":
            quant[name] = twin[name] = t
            continue
        w = t.float()
        n, k = w.shape
        if fmt == "fp8":
            scale = w.abs().max() / 448
            q = (w / scale).to(torch.float8_e4m3fn)
            quant[name], quant[f"{module}.weight_scale"] = q, scale.reshape(())
            twin[name] = q.float() * scale
            continue
        key = (module.rsplit(".", 2)[0], _INPUT[short])  # one activation order per layer input
        if key not in orders:
            perm = torch.randperm(k, generator=g) if fmt == "gptq-act-order" else torch.arange(k)
            orders[key] = torch.empty(k, dtype=torch.long).scatter_(0, perm, torch.arange(k) // group)
        g_idx = orders[key]
        codes, zeros, scales, deq = _rtn(w, g_idx, k // group)
        twin[name] = deq
        if fmt.startswith("gptq"):
            # packed along K: word (r, n) holds rows 8r..8r+7 of codes.T (K, N)
            quant[f"{module}.qweight"] = pack_int32(codes.t().reshape(k // 8, 8, n).transpose(1, 2).reshape(k // 8, -1), 4)
            quant[f"{module}.qzeros"] = pack_int32(zeros.t() - 1, 4)  # AutoGPTQ stores zero - 1
            quant[f"{module}.scales"] = scales.t().contiguous()
            quant[f"{module}.g_idx"] = g_idx.to(torch.int32)
        elif fmt == "awq":
            quant[f"{module}.qweight"] = _awq_pack(codes.t().contiguous())
            quant[f"{module}.qzeros"] = _awq_pack(zeros.t().contiguous())
            quant[f"{module}.scales"] = scales.t().contiguous()
        else:  # compressed-tensors pack-quantized, asymmetric: values stored as q + 8 = codes
            quant[f"{module}.weight_packed"] = pack_int32(codes, 4)
            quant[f"{module}.weight_scale"] = scales
            quant[f"{module}.weight_zero_point"] = pack_int32(zeros.t().contiguous(), 4).t().contiguous()
            quant[f"{module}.weight_shape"] = torch.tensor([n, k])
    qc: dict[str, Any] = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False},
        "gptq-act-order": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                               "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                   "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                   "group_size": group}}}},
        "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    }[fmt]
    dirs = []
    for name, weights, extra in ((fmt, quant, {"quantization_config": qc}), (fmt + "-twin", twin, {})):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy(f, d / f.name)
        (d / "config.json").write_text(json.dumps({**cfg, **extra}, indent=2))
        save_file({k: v.contiguous() for k, v in weights.items()}, d / "model.safetensors")
        dirs.append(d)
    return dirs[0], dirs[1]
