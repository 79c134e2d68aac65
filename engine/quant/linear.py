"""Quantized drop-in replacements for ``nn.Linear``: y = x @ dequant(W).T + b, x (..., K) -> (..., N).

Each module stores its weight in one scheme's format (engine/quant/schemes.py) as buffers, and runs
one GEMM path, its ``kernel``, fixed when it is built for a device and activation dtype:

    kernel      int8                      int4                          fp8
    triton      W8A16 Triton              W4A16 Triton                  -
    packed      torch._weight_int8pack_mm torch._weight_int4pack_mm_for_cpu (own layout)  -
    scaled_mm   -                         -                             torch._scaled_mm (W8A8)
    dequant     dequantize, then F.linear (the references; CPU float32/float16, or no better path)

``choose_kernel`` picks: Triton when the engine's kernel backend is Triton (CUDA, or the interpreter);
on the torch backend the packed ops for bfloat16 CPU models (the only dtype where they are fast),
``_scaled_mm`` for fp8 on compute capability >= 8.9, else dequant.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.quant.schemes import (
    Fp8BlockWeight,
    Fp8Weight,
    Int8Weight,
    dequantize_fp8_block,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)  # fmt: skip
from kernels.quant_cpu import (
    CPU_INT4_N_MULTIPLE,
    CpuInt4Weight,
    fp8_ref,
    fp8_scaled_mm,
    int4_pack_for_cpu,
    int4_packed_mm,
    int8_packed_mm,
    supports_scaled_mm,
)  # fmt: skip
from kernels.quant_gemm import w4a16_gemm, w4a16_ref, w8a16_gemm, w8a16_ref

KERNELS = ("triton", "packed", "cpu_int8", "scaled_mm", "dequant")  # cpu_int8: engine/quant/group_linear.py
_CPU_INT4_GROUPS = (32, 64, 128, 256)


def choose_kernel(
    scheme: str, backend: str, device: torch.device, dtype: torch.dtype, n: int, k: int, group_size: int = 0
) -> str:
    """The GEMM path for one layer. backend: "triton" or "torch" (engine/quant/apply.py ``gemm_backend``)."""
    if scheme == "fp8":
        return "scaled_mm" if supports_scaled_mm(device) and n % 16 == 0 and k % 16 == 0 else "dequant"
    if backend == "triton":
        return "triton"
    if device.type == "cpu" and dtype == torch.bfloat16:
        if scheme == "int8" or (n % CPU_INT4_N_MULTIPLE == 0 and group_size in _CPU_INT4_GROUPS):
            return "packed"
    return "dequant"


class QuantLinear(nn.Module):
    """Base class: in/out features, an optional bias (a buffer in the activation dtype) and the kernel."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, kernel: str, bias: Tensor | None) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown quantized GEMM kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.bias: Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight and its scales / zero points on the device (bias excluded)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8Linear(QuantLinear):
    """W8A16, per-output-channel symmetric. Buffers: qweight (N, K) int8, scale (N,) float32
    (in the activation dtype for the packed kernel, which wants it so). Built from a dense weight
    (quantized here) or an Int8Weight (a pre-quantized checkpoint's)."""

    scheme = "int8"
    qweight: Tensor
    scale: Tensor

    def __init__(self, weight: Tensor | Int8Weight, bias: Tensor | None, kernel: str, dtype: torch.dtype) -> None:
        q = weight if isinstance(weight, Int8Weight) else quantize_int8(weight)
        n, k = q.qweight.shape
        super().__init__(k, n, kernel, bias)
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("scale", q.scale.to(dtype) if kernel == "packed" else q.scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "triton":
            return w8a16_gemm(x, self.qweight, self.scale, self.bias)
        if self.kernel == "packed":
            return int8_packed_mm(x, self.qweight, self.scale, self.bias)
        return w8a16_ref(x, self.qweight, self.scale, self.bias)


class Int4Linear(QuantLinear):
    """W4A16, group-wise asymmetric. Buffers: qweight (N, K // 2) uint8, scales (N, K // G) in the
    activation dtype, zeros (N, K // G) uint8; or, for the packed kernel, torch's CPU layout
    (qweight (N, K // 2) uint8 and scale_and_zeros (K // G, N, 2))."""

    scheme = "int4"
    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    scale_and_zeros: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None, kernel: str, dtype: torch.dtype, group_size: int) -> None:
        n, k = weight.shape
        super().__init__(k, n, kernel, bias)
        self.group_size = group_size
        q = quantize_int4(weight, group_size)
        if kernel == "packed":
            cpu = int4_pack_for_cpu(q.qweight, q.scales, q.zeros, dtype)
            self.register_buffer("qweight", cpu.packed)
            self.register_buffer("scale_and_zeros", cpu.scale_and_zeros)
        else:
            self.register_buffer("qweight", q.qweight)
            self.register_buffer("scales", q.scales.to(dtype))
            self.register_buffer("zeros", q.zeros)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "packed":
            return int4_packed_mm(x, CpuInt4Weight(self.qweight, self.scale_and_zeros), self.group_size, self.bias)
        if self.kernel == "triton":
            return w4a16_gemm(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        return w4a16_ref(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Fp8Linear(QuantLinear):
    """fp8 e4m3. Buffers: qweight (N, K) float8_e4m3fn, scale (N,) float32 per output channel, or, from
    a block-quantized checkpoint (Fp8BlockWeight), scale (ceil(N / bn), ceil(K / bk)) per tile, which
    only the dequant kernel runs."""

    scheme = "fp8"
    qweight: Tensor
    scale: Tensor

    def __init__(
        self, weight: Tensor | Fp8Weight | Fp8BlockWeight, bias: Tensor | None, kernel: str, dtype: torch.dtype
    ) -> None:
        q = weight if isinstance(weight, Fp8Weight | Fp8BlockWeight) else quantize_fp8(weight)
        n, k = q.qweight.shape
        super().__init__(k, n, kernel, bias)
        self.block = q.block if isinstance(q, Fp8BlockWeight) else None
        if self.block is not None and kernel != "dequant":
            raise ValueError(f"block-scaled fp8 runs on the dequant kernel only, not {kernel!r}")
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("scale", q.scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.block is not None:
            w = dequantize_fp8_block(Fp8BlockWeight(self.qweight, self.scale, self.block), x.dtype)
            return torch.nn.functional.linear(x, w, self.bias)
        if self.kernel == "scaled_mm":
            return fp8_scaled_mm(x, self.qweight, self.scale, self.bias)
        return fp8_ref(x, self.qweight, self.scale, self.bias)


class ConcatLinear(nn.Module):
    """One fused projection (qkv, gate_up) whose shards are quantized differently, kept as one module
    per shard: y = cat([shard(x) for shard in shards], -1), (..., K) -> (..., sum of the shards' N).
    llama.cpp's mixed files need it (Q4_K_M stores v_proj as Q6_K beside a Q4_K q_proj and k_proj)."""

    def __init__(self, shards: list[nn.Module]) -> None:
        super().__init__()
        self.shards = nn.ModuleList(shards)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([m(x) for m in self.shards], dim=-1)
