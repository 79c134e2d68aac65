"""Loading a pre-quantized checkpoint into the model: its projections stay quantized on the device.

``load_prequantized(model, weights, quant, dtype, device, backend)`` takes the model as built on the meta
device and the checkpoint's tensor stream (engine.weights), and:

    1. puts a placeholder where each decoder-layer projection goes, then allocates the rest of the model
       (embeddings, norms, lm_head) on the device in ``dtype``;
    2. streams the checkpoint: tensors of a projection (q_proj.qweight, k_proj.weight_scale, ...) are
       set aside by (layer, fused projection, shard); any other quantized module (a quantized lm_head)
       is dequantized after the stream; everything else goes to ``CausalLM.load_weights`` as usual;
    3. converts each projection's shards (engine/quant/prequantized.py), fuses them, and puts the
       quantized module in place on the device, one projection at a time.

Host memory holds the checkpoint's quantized projection tensors until step 3 (about the checkpoint's
size); the device holds the quantized model. KV-cache scales (k_scale, v_scale) are skipped: Tandem's
fp8 KV cache uses its own static scale (docs/quantization.md).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from engine.model import CausalLM
from engine.parallel.quantized import slice_quantized
from engine.quant.apply import PROJECTIONS, gemm_backend
from engine.quant.formats.gguf import GGUFQuant
from engine.quant.group_linear import GroupQuantLinear, as_int8, choose_group_kernel
from engine.quant.linear import ConcatLinear, Fp8Linear, Int8Linear, choose_kernel
from engine.quant.prequantized import CheckpointQuant, Quantized, dequantize, fusable, fuse
from engine.quant.schemes import Fp8BlockWeight, Fp8Weight, Int8Weight
from kernels.wna16_gemm import GroupWeight

logger = logging.getLogger(__name__)

# checkpoint projection -> (parent, Tandem's fused projection, shard index)
_SHARDS = {
    "q_proj": ("self_attn", "qkv_proj", 0), "k_proj": ("self_attn", "qkv_proj", 1),
    "v_proj": ("self_attn", "qkv_proj", 2), "o_proj": ("self_attn", "o_proj", 0),
    "gate_proj": ("mlp", "gate_up_proj", 0), "up_proj": ("mlp", "gate_up_proj", 1),
    "down_proj": ("mlp", "down_proj", 0),
}
_NUM_SHARDS = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}
_SHARD_NAMES = {fused: [s for s, (_, f, _) in _SHARDS.items() if f == fused] for fused in _NUM_SHARDS}
_PROJECTION = re.compile(r"(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+_proj)\.(\w+)")
_KV_SCALES = ("k_scale", "v_scale", "q_scale", "kv_scale")


class PendingProjection(nn.Module):
    """Stands where a projection goes until its quantized module is built; never runs."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - only a loading bug reaches it
        raise RuntimeError("a projection of a pre-quantized checkpoint was never loaded")


def _to(q: Quantized | Tensor, device: torch.device) -> Quantized | Tensor:
    if isinstance(q, Tensor):
        return q.to(device)
    moved: dict[str, Any] = {f: v.to(device) for f, v in q._asdict().items() if isinstance(v, Tensor)}
    return q._replace(**moved)


def build_linear(
    q: Quantized | Tensor, bias: Tensor | None, backend: str, device: torch.device, dtype: torch.dtype,
    approximate_cpu: bool = False,
) -> nn.Module:  # fmt: skip
    """The module for one (fused) projection's weight, on ``device``; backend "triton" or "torch".
    ``approximate_cpu`` (GGUF): on CPU, a 4-bit grouped weight takes torch's packed kernel whatever the
    dtype (bfloat16 activations inside it), an 8-bit one (Q8_0, Q6_K) the grouped int8 C++ kernel
    (``cpu_int8``, exact), and one that no CPU kernel takes (no C++ compiler) is expanded to a dense
    Linear here rather than dequantized at every forward (80-110x the dense matmul on SmolLM2's shapes)."""
    q = _to(q, device)
    kernel = "dense"
    if isinstance(q, GroupWeight):
        int8 = as_int8(q)
        if int8 is not None:
            q = int8
        else:
            kernel = choose_group_kernel(q, backend, device, dtype, bf16_activations=approximate_cpu)
            if kernel == "dequant" and approximate_cpu and device.type == "cpu":
                q = dequantize(q)
    bias = None if bias is None else bias.to(device, dtype)
    if isinstance(q, Tensor):
        lin = nn.Linear(q.shape[1], q.shape[0], bias=bias is not None, device=device, dtype=dtype)
        lin.weight.data.copy_(q)
        if bias is not None:
            lin.bias.data.copy_(bias)
        return lin
    if isinstance(q, GroupWeight):
        return GroupQuantLinear(q, bias, kernel, dtype)
    n, k = q.qweight.shape
    if isinstance(q, Int8Weight):
        return Int8Linear(q, bias, choose_kernel("int8", backend, device, dtype, n, k), dtype)
    if isinstance(q, Fp8Weight):
        return Fp8Linear(q, bias, choose_kernel("fp8", backend, device, dtype, n, k), dtype)
    assert isinstance(q, Fp8BlockWeight)
    return Fp8Linear(q, bias, "dequant", dtype)


@torch.no_grad()
def load_prequantized(
    model: CausalLM, weights: Iterable[tuple[str, Tensor]], quant: CheckpointQuant | GGUFQuant,
    dtype: torch.dtype, device: torch.device, backend: str = "auto",
) -> CausalLM:  # fmt: skip
    """Load ``weights`` (a pre-quantized checkpoint's tensor stream) into ``model`` (built on the meta
    device) on ``device``; returns the model. backend: the engine's kernel backend (auto|torch|triton).
    A GGUF file (``GGUFQuant``; its stream from engine.weights.iter_gguf with ``raw=quant.keep``) gets
    ``build_linear``'s ``approximate_cpu``: llama.cpp itself rounds activations on CPU (to 8 bits).
    A tensor-parallel model (``model.shard``) keeps its rank's part of each converted projection
    (engine/parallel/quantized.py: refused where a split would cut a quantization group).

    Raises ValueError when a projection is missing a shard or its tensors do not fit its format, and as
    ``CausalLM.load_weights`` does for the dense tensors.
    """
    for layer in model.layers:
        for parent_name, name in PROJECTIONS:
            setattr(getattr(layer, parent_name), name, PendingProjection())
    model = model.to_empty(device=device).to(dtype)
    kind = gemm_backend(backend, device)
    shards: dict[tuple[int, str], dict[int, dict[str, Tensor]]] = defaultdict(lambda: defaultdict(dict))
    others: dict[str, dict[str, Tensor]] = defaultdict(dict)

    def dense() -> Iterator[tuple[str, Tensor]]:
        for name, tensor in weights:
            m = _PROJECTION.fullmatch(name)
            if m is not None and m.group(3) in _SHARDS:
                _, fused, index = _SHARDS[m.group(3)]
                shards[(int(m.group(1)), fused)][index][m.group(4)] = tensor
                continue
            module, _, suffix = name.rpartition(".")
            if suffix in _KV_SCALES:
                logger.debug("skipping %s: Tandem's fp8 KV cache has its own scale", name)
            elif quant.is_member(suffix) or (suffix == "weight" and (tensor.element_size() == 1
                                                                      or not tensor.is_floating_point())):
                others[module][suffix] = tensor
            else:
                yield name, tensor
        for module, tensors in others.items():  # quantized modules Tandem keeps dense (lm_head)
            logger.info("%s is quantized in the checkpoint; dequantized, since Tandem keeps it dense", module)
            yield f"{module}.weight", dequantize(quant.convert(module, tensors))
            if "bias" in tensors:
                yield f"{module}.bias", tensors["bias"]

    model.load_weights(dense())
    kernels: dict[str, int] = defaultdict(int)
    for i, layer in enumerate(model.layers):
        for parent_name, fused in PROJECTIONS:
            got = shards.pop((i, fused), {})
            names = _SHARD_NAMES[fused]
            missing = [names[j] for j in range(_NUM_SHARDS[fused]) if j not in got]
            if missing:
                raise ValueError(f"checkpoint has no tensors for layers.{i}.{parent_name}.{', '.join(missing)}")
            modules = [f"model.layers.{i}.{parent_name}.{names[j]}" for j in range(_NUM_SHARDS[fused])]
            parts = [slice_quantized(quant.convert(modules[j], got[j]), model.shard.slice_for(f"{modules[j]}.weight"),
                                     modules[j]) for j in range(_NUM_SHARDS[fused])]
            biases = [slice_quantized(got[j].get("bias"), model.shard.slice_for(f"{modules[j]}.bias"), modules[j])
                      if got[j].get("bias") is not None else None for j in range(_NUM_SHARDS[fused])]
            bias = torch.cat([b for b in biases if b is not None]) if all(b is not None for b in biases) else None
            gguf = isinstance(quant, GGUFQuant)
            new: nn.Module
            if fusable(parts) or not gguf:
                new = build_linear(fuse(parts, f"layers.{i}.{parent_name}.{fused}"), bias, kind, device, dtype, gguf)
            else:  # a mixed GGUF (Q4_K_M): one module per shard, each in its own format
                new = ConcatLinear([build_linear(p, b, kind, device, dtype, gguf) for p, b in zip(parts, biases, strict=True)])
            setattr(getattr(layer, parent_name), fused, new)
            kernels[f"{type(new).__name__}/{getattr(new, 'kernel', 'dense')}"] += 1
    if shards:
        raise ValueError(f"checkpoint has projection tensors for layers the model does not have: {sorted(shards)[:3]}")
    logger.info("loaded a %s checkpoint: %s", quant.method, ", ".join(f"{n} x {k}" for k, n in sorted(kernels.items())))
    return model
