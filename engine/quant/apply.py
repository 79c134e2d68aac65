"""Post-training quantization of a loaded model, one decoder layer at a time.

What is quantized: the four projections of every decoder layer (``qkv_proj``, ``o_proj``,
``gate_up_proj``, ``down_proj``), which hold nearly all of a model's weights. What is not: the
embeddings, ``lm_head`` (tied or not), the norms and biases; they set the logits directly, are
cheap in bytes for all but the smallest models, and quantizing them costs the most quality.
int4 layers whose in_features have no power-of-two group >= 16 (see ``group_size_for``) stay dense.

Memory: ``load_model`` stages the dense checkpoint in host memory; this module then moves one
projection at a time to the device, quantizes it there and drops both dense copies, so the device
never holds more than the quantized model plus one dense projection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from engine.model import CausalLM
from engine.quant.linear import ConcatLinear, Fp8Linear, Int4Linear, Int8Linear, QuantLinear, choose_kernel
from engine.quant.schemes import check_scheme, group_size_for
from kernels.ops import TRITON_OPS, select_ops

logger = logging.getLogger(__name__)

PROJECTIONS: tuple[tuple[str, str], ...] = (
    ("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"),
)


def gemm_backend(backend: str, device: torch.device) -> str:
    """"triton" when ``select_ops(backend, device)`` picks Triton (CUDA, or the interpreter), else "torch".

    Raises ValueError as select_ops does (unknown backend, Triton on CPU without TRITON_INTERPRET=1).
    """
    return "triton" if select_ops(backend, device) is TRITON_OPS else "torch"


def quantize_linear(
    linear: nn.Linear, scheme: str, backend: str, device: torch.device, dtype: torch.dtype
) -> QuantLinear | nn.Linear:
    """A quantized copy of ``linear`` on ``device`` (or a dense copy there when int4 cannot group it)."""
    weight = linear.weight.detach().to(device)  # (N, K)
    bias = None if linear.bias is None else linear.bias.detach().to(device)
    n, k = weight.shape
    if scheme == "int4":
        group = group_size_for(k)
        if group is None:
            logger.warning("int4: in_features %d has no power-of-two group >= 16; layer stays dense", k)
            return linear.to(device)
        return Int4Linear(weight, bias, choose_kernel(scheme, backend, device, dtype, n, k, group), dtype, group)
    kernel = choose_kernel(scheme, backend, device, dtype, n, k)
    cls = Int8Linear if scheme == "int8" else Fp8Linear
    return cls(weight, bias, kernel, dtype)


@torch.no_grad()
def quantize_model(model: CausalLM, scheme: str, device: torch.device | str, backend: str = "auto") -> CausalLM:
    """Replace every decoder layer's projections of ``model`` (a CausalLM, anywhere) with quantized
    modules on ``device``, then move the rest of the model there; returns ``model``, changed in place.

    backend is the engine's kernel backend (auto | torch | triton). Raises ValueError for an unknown
    scheme or backend. Call once, after the weights are loaded; do not ``.to(dtype)`` the model
    afterwards (that would cast the fp8 weights and the scales).
    """
    check_scheme(scheme)
    dev = torch.device(device)
    kind = gemm_backend(backend, dev)
    dtype = model.norm.dtype  # the activation dtype
    kernels: dict[str, int] = {}
    for layer in model.layers:
        for parent_name, name in PROJECTIONS:
            parent = getattr(layer, parent_name)
            new = quantize_linear(getattr(parent, name), scheme, kind, dev, dtype)
            setattr(parent, name, new)  # the dense weight (host and device copies) is freed here
            key = getattr(new, "kernel", "dense")
            kernels[key] = kernels.get(key, 0) + 1
    model.to(dev)
    logger.info("quantized %s: %s", scheme, ", ".join(f"{n} layers {k}" for k, n in sorted(kernels.items())))
    return model


def projection_modules(model: CausalLM) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every decoder-layer projection, dense or quantized."""
    for i, layer in enumerate(model.layers):
        for parent_name, name in PROJECTIONS:
            yield f"layers.{i}.{parent_name}.{name}", getattr(getattr(layer, parent_name), name)


def linear_weight_bytes(model: CausalLM) -> int:
    """Bytes the decoder layers' projection weights take on the device (quantized: with scales and
    zero points; biases excluded in both cases)."""
    return sum(_weight_bytes(m) for _, m in projection_modules(model))


def _weight_bytes(m: nn.Module) -> int:
    if isinstance(m, QuantLinear):
        return m.weight_bytes()
    if isinstance(m, nn.Linear):
        return m.weight.numel() * m.weight.element_size()
    if isinstance(m, ConcatLinear):
        return sum(_weight_bytes(s) for s in m.shards)
    return 0
