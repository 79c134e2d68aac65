"""Pre-quantized checkpoints: which format a checkpoint is in (its config.json's ``quantization_config``,
no flag needed), each module's tensors -> a quantized weight, and the fusing of q/k/v and gate/up.

    quant_method          converter                           weight it gives
    gptq                  engine/quant/formats/gptq.py        GroupWeight (4/8 bits, act-order perm)
    awq                   engine/quant/formats/awq.py         GroupWeight (4 bits)
    compressed-tensors    engine/quant/formats/compressed.py  GroupWeight, or Fp8Weight / Fp8BlockWeight
    fp8                   engine/quant/formats/fp8.py         Fp8Weight (per tensor -> per row) / Fp8BlockWeight
    (GGUF: engine/quant/formats/gguf.py converts one tensor; its file loader lives elsewhere)

Tandem fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (engine/model.py): quantized
shards fuse by stacking rows, which is exact when they share a layout (bits, group, zero kind, act-order
permutation; GPTQ computes one permutation from the inputs q, k and v share). Shards that do not (a
mixed-precision checkpoint) are dequantized into one dense Linear, with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.quant.formats import awq, compressed, fp8, gptq
from engine.quant.schemes import Fp8BlockWeight, Fp8Weight, Int8Weight, dequantize_fp8, dequantize_fp8_block
from kernels.wna16_gemm import GroupWeight, dequantize_group

logger = logging.getLogger(__name__)

Quantized = GroupWeight | Int8Weight | Fp8Weight | Fp8BlockWeight
METHODS = ("gptq", "awq", "compressed-tensors", "fp8")
_MEMBERS = {"gptq": gptq.MEMBERS, "awq": awq.MEMBERS, "compressed-tensors": compressed.MEMBERS, "fp8": fp8.MEMBERS}
_CHECKS = {"gptq": gptq.check_config, "awq": awq.check_config, "compressed-tensors": compressed.check_config}


@dataclass(frozen=True)
class CheckpointQuant:
    """A checkpoint's quantization: its ``quant_method`` and the whole ``quantization_config``."""

    method: str
    config: dict[str, Any]

    def is_member(self, suffix: str) -> bool:
        """Whether a tensor named ``<module>.<suffix>`` is part of a quantized module (not ``weight``/``bias``)."""
        return suffix in _MEMBERS[self.method]

    def convert(self, module: str, tensors: dict[str, Tensor]) -> Quantized | Tensor:
        """One module's tensors (by suffix: qweight, scales, weight_packed, weight, bias...) -> its
        quantized weight, or its dense ``weight`` when it holds no quantized tensors. Raises ValueError
        (the message names the module) for what its format cannot describe."""
        if not any(self.is_member(s) for s in tensors) and not _is_quantized_dtype(tensors.get("weight")):
            return tensors["weight"]
        try:
            if self.method == "gptq":
                return gptq.convert(self.config, tensors)
            if self.method == "awq":
                return awq.convert(self.config, tensors)
            if self.method == "fp8":
                return fp8.convert(self.config, tensors)
            return compressed.convert(self.config, module, tensors)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{module}: cannot load its {self.method} tensors ({sorted(tensors)}): {exc}") from exc


def _is_quantized_dtype(t: Tensor | None) -> bool:
    return t is not None and (t.element_size() == 1 or not t.is_floating_point())


def detect(hf_config: dict[str, Any], model_dir: str | Path | None = None) -> CheckpointQuant | None:
    """The checkpoint's quantization from config.json (or, for AutoGPTQ checkpoints older than that
    key, ``quantize_config.json`` beside it in ``model_dir``), or None for a dense checkpoint.

    Raises ValueError for a quant_method Tandem does not load (bitsandbytes, hqq, ...) or a config of a
    known method that it cannot serve (say, 3-bit GPTQ), naming the method and what is supported.
    """
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    legacy = Path(model_dir) / "quantize_config.json" if model_dir is not None else None
    if not qc and legacy is not None and legacy.is_file():
        qc = {"quant_method": "gptq", **json.loads(legacy.read_text())}
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        raise ValueError(f"checkpoint quant_method {method!r} is not supported (supported: {', '.join(METHODS)})")
    check = _CHECKS.get(method)
    if check is not None:
        check(qc)
    return CheckpointQuant(method, dict(qc))


def dequantize(q: Quantized | Tensor) -> Tensor:
    """Any weight as a dense float32 (N, K) tensor."""
    if isinstance(q, GroupWeight):
        return dequantize_group(q)
    if isinstance(q, Int8Weight):
        return q.qweight.float() * q.scale.float()[:, None]
    if isinstance(q, Fp8Weight):
        return dequantize_fp8(q)
    if isinstance(q, Fp8BlockWeight):
        return dequantize_fp8_block(q)
    return q.float()


def _same_layout(parts: list[GroupWeight]) -> bool:
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.offset_zeros, p.scales.dtype) != (
                first.bits, first.group_size, first.offset_zeros, first.scales.dtype):  # fmt: skip
            return False
        if p.perm is None or first.perm is None:
            if p.perm is not first.perm:
                return False
        elif not torch.equal(p.perm, first.perm):
            return False
    return True


def fusable(parts: list[Quantized | Tensor]) -> bool:
    """Whether :func:`fuse` stacks ``parts`` into one weight of their kind (rather than a dense one)."""
    kinds = {type(p) for p in parts}
    if len(parts) == 1 or kinds <= {Tensor, torch.nn.Parameter}:
        return True
    if kinds == {GroupWeight}:
        return _same_layout([p for p in parts if isinstance(p, GroupWeight)])
    if kinds == {Fp8Weight}:
        return True
    if kinds == {Fp8BlockWeight}:
        blocks = [p for p in parts if isinstance(p, Fp8BlockWeight)]
        bn = blocks[0].block[0]
        return len({p.block for p in blocks}) == 1 and all(p.qweight.shape[0] % bn == 0 for p in blocks[:-1])
    return False


def fuse(parts: list[Quantized | Tensor], name: str) -> Quantized | Tensor:
    """Stack the shards' rows (q, k, v -> qkv) into one weight of the same kind, or into a dense tensor
    when they are not :func:`fusable` (logged). ``name`` is for the log."""
    if len(parts) == 1:
        return parts[0]
    kinds = {type(p) for p in parts}
    if fusable(parts):
        if kinds == {GroupWeight}:
            groups = [p for p in parts if isinstance(p, GroupWeight)]
            qweight, scales, zeros = (torch.cat([getattr(p, f) for p in groups]) for f in ("qweight", "scales", "zeros"))
            return GroupWeight(qweight, scales, zeros, groups[0].group_size, groups[0].bits, groups[0].perm)
        if kinds == {Fp8Weight}:
            return Fp8Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("qweight", "scale")))
        if kinds == {Fp8BlockWeight}:
            blocks = [p for p in parts if isinstance(p, Fp8BlockWeight)]
            return Fp8BlockWeight(torch.cat([p.qweight for p in blocks]), torch.cat([p.scale for p in blocks]),
                                  blocks[0].block)  # fmt: skip
        return torch.cat([p for p in parts if isinstance(p, Tensor)])
    logger.warning("%s: its shards are quantized differently (%s); loading it dense", name,
                   ", ".join(sorted(k.__name__ for k in kinds)))
    return torch.cat([dequantize(p) for p in parts])
