"""Writing a calibrated model as a compressed-tensors "pack-quantized" checkpoint (the format llm-compressor
writes and vLLM, SGLang and Tandem load; engine/quant/formats/compressed.py reads it back).

    config.json   the source's, plus quantization_config: quant_method "compressed-tensors", format
                  "pack-quantized", one config group targeting Linear with weights {num_bits, type "int",
                  symmetric, strategy "group" | "channel", group_size, actorder}, ignore ["lm_head"];
                  actorder: None, "weight" (act-order with static groups: the usual layout, nothing to
                  permute) or "group" (act-order with g_idx; compressed-tensors 0.20 no longer reads it)
    model.safetensors, per projection (Hugging Face names: q_proj, k_proj, ... split from Tandem's fused ones)
        weight_packed      (N, K * bits / 32) int32, each code (q + 2**(bits-1)) packed along K
        weight_scale       (N, groups) in the checkpoint's dtype
        weight_zero_point  asymmetric only: (ceil(N * bits / 32), groups) int32, packed along N
        weight_shape       (2,) int64
        weight_g_idx       act-order without static groups only: (K,) int32
      and everything else dense in the checkpoint's dtype (embeddings, norms, lm_head, biases)
    every other file of the source (tokenizer, generation config) copied
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import Tensor

from engine.model import CausalLM, DecoderLayer
from engine.quant.formats.packing import pack_int32
from training.quant_grid import QuantResult
from training.quantize_config import QuantizeConfig

# Tandem's fused projection -> (parent, Hugging Face shards)
SPLITS = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
          "gate_up_proj": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}  # fmt: skip


def _actorder(cfg: QuantizeConfig) -> str | None:
    if not cfg.gptq_act_order:
        return None
    return "weight" if cfg.gptq_static_groups else "group"


def quantization_config(cfg: QuantizeConfig) -> dict[str, Any]:
    group = cfg.group
    weights = {"num_bits": cfg.bits, "type": "int", "symmetric": cfg.sym, "dynamic": False,
               "strategy": "channel" if group <= 0 else "group", "group_size": None if group <= 0 else group,
               "actorder": _actorder(cfg), "observer": "mse" if cfg.gptq_mse_grid else "minmax"}  # fmt: skip
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}  # fmt: skip


def pack_module(r: QuantResult, symmetric: bool) -> dict[str, Tensor]:
    """One (unfused) projection's compressed-tensors tensors."""
    n, k = r.codes.shape
    per = 32 // r.bits
    codes = torch.nn.functional.pad(r.codes.long(), (0, -k % per))
    out = {"weight_packed": pack_int32(codes, r.bits), "weight_scale": r.scales.contiguous(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}  # fmt: skip
    if not symmetric:
        zeros = torch.nn.functional.pad(r.zeros.long().t(), (0, -n % per))  # (groups, N)
        out["weight_zero_point"] = pack_int32(zeros, r.bits).t().contiguous()
    if r.g_idx is not None:
        out["weight_g_idx"] = r.g_idx.to(torch.int32)
    return out


def split_rows(r: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """A fused projection's result -> one per shard (rows are independent)."""
    parts = zip(r.codes.split(sizes), r.scales.split(sizes), r.zeros.split(sizes), strict=True)
    return [QuantResult(c, s, z, r.g_idx, r.group_size, r.bits) for c, s, z in parts]


def write_checkpoint(
    model: CausalLM, results: dict[tuple[int, str], QuantResult], cfg: QuantizeConfig, dtype: torch.dtype,
    out: Path,
) -> Path:  # fmt: skip
    """Write ``model``'s dense parts and the quantized projections ``results[(layer, fused name)]`` to ``out``."""
    src = Path(cfg.model)
    mc = model.cfg
    sizes = {"qkv_proj": [mc.q_size, mc.kv_size, mc.kv_size], "gate_up_proj": [mc.intermediate_size] * 2}
    tensors: dict[str, Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight,
                                  "model.norm.weight": model.norm}  # fmt: skip
    if not mc.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight
    for i, module in enumerate(model.layers):
        layer = cast(DecoderLayer, module)
        pre = f"model.layers.{i}"
        tensors[f"{pre}.input_layernorm.weight"] = layer.input_layernorm
        tensors[f"{pre}.post_attention_layernorm.weight"] = layer.post_attention_layernorm
        if mc.qk_norm:
            tensors[f"{pre}.self_attn.q_norm.weight"] = layer.self_attn.q_norm
            tensors[f"{pre}.self_attn.k_norm.weight"] = layer.self_attn.k_norm
        for fused, (parent, shards) in SPLITS.items():
            linear = getattr(getattr(layer, parent), fused)
            parts = split_rows(results[(i, fused)], sizes.get(fused, [linear.out_features]))
            biases = linear.bias.split(sizes.get(fused, [linear.out_features])) if linear.bias is not None else None
            for j, (shard, part) in enumerate(zip(shards, parts, strict=True)):
                for suffix, t in pack_module(part, cfg.sym).items():
                    tensors[f"{pre}.{parent}.{shard}.{suffix}"] = t
                if biases is not None:
                    tensors[f"{pre}.{parent}.{shard}.bias"] = biases[j]
    out.mkdir(parents=True, exist_ok=True)
    dense = {k: (v.detach().to(dtype) if v.is_floating_point() and not k.endswith("weight_scale") else v.detach())
             for k, v in tensors.items()}  # fmt: skip
    save_file({k: v.contiguous().clone() for k, v in dense.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "producer": f"tandem quantize --method {cfg.method}"})  # fmt: skip
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(cfg)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
