"""FP8 checkpoints (config.json ``quantization_config.quant_method`` "fp8": AutoFP8 / vLLM-style and
transformers' fine-grained FP8), and the fp8 weights of compressed-tensors' "float-quantized" format.

A module stores ``weight`` (N, K) float8_e4m3fn and one of::

    weight_scale      () or (1,)            per tensor          w = float(q) * s
                      (N,) or (N, 1)        per output channel  w = float(q) * s[n]
    weight_scale_inv  (ceil(N/bn), ceil(K/bk)) with config ``weight_block_size`` [bn, bk]
                                            per tile            w = float(q) * s[n // bn, k // bk]
                                            (named "inv" by DeepSeek, but it multiplies)

``input_scale`` (a static activation scale) is read and ignored: Tandem's W8A8 path scales each token
dynamically, which is at least as accurate. Per-tensor scales become per-row ones (exact), so q, k and
v with different scales still fuse into one qkv_proj.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from engine.quant.schemes import FP8_DTYPE, Fp8BlockWeight, Fp8Weight

MEMBERS = ("weight_scale", "weight_scale_inv", "input_scale")


def convert(cfg: dict[str, Any], t: dict[str, Tensor]) -> Fp8Weight | Fp8BlockWeight:
    """One module's ``weight`` and scale -> Fp8Weight (per-row scales) or Fp8BlockWeight.

    Raises ValueError for a weight that is not float8_e4m3fn or a scale of another shape.
    """
    w = t["weight"]
    if w.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 checkpoint weight has dtype {w.dtype}; expected {FP8_DTYPE}")
    n, k = w.shape
    if "weight_scale_inv" in t:
        bn, bk = (int(b) for b in cfg.get("weight_block_size") or (128, 128))
        s = t["weight_scale_inv"].float()
        if tuple(s.shape) != (-(-n // bn), -(-k // bk)):
            raise ValueError(f"weight_scale_inv {tuple(s.shape)} does not tile {(n, k)} by {(bn, bk)}")
        return Fp8BlockWeight(w, s.contiguous(), (bn, bk))
    s = t["weight_scale"].float().reshape(-1)
    if s.numel() == 1:
        return Fp8Weight(w, s.expand(n).contiguous())
    if s.numel() == n:
        return Fp8Weight(w, s.contiguous())
    if s.numel() > n:  # a 2-D block scale under a compressed-tensors "block" strategy
        bn, bk = (int(b) for b in cfg.get("block_structure") or (128, 128))
        return Fp8BlockWeight(w, t["weight_scale"].float().reshape(-(-n // bn), -(-k // bk)), (bn, bk))
    raise ValueError(f"weight_scale of {s.numel()} values fits neither a tensor nor {n} rows")


def dense_weight(cfg: dict[str, Any], t: dict[str, Tensor]) -> Tensor:
    """The module's weight dequantized to float32 (for modules Tandem keeps dense, e.g. lm_head)."""
    from engine.quant.schemes import dequantize_fp8, dequantize_fp8_block

    q = convert(cfg, t)
    return dequantize_fp8_block(q) if isinstance(q, Fp8BlockWeight) else dequantize_fp8(q)

