"""``GroupQuantLinear``: the quantized Linear of pre-quantized checkpoints' integer weights (GPTQ, AWQ,
compressed-tensors, GGUF), y = x @ dequant(W).T + b over a :class:`kernels.wna16_gemm.GroupWeight`.

Kernels (fixed per layer at load, as for the load-time schemes in engine/quant/linear.py)::

    triton    kernels/wna16_gemm.py: 4 or 8 bits, zero points or offsets, act-order through perm
    packed    torch._weight_int4pack_mm_for_cpu: 4 bits, bfloat16 on CPU, N % 16 == 0, G in 32..256 dividing K
              (act-order: x's columns are gathered through perm first). With ``bf16_activations`` (GGUF)
              float32/float16 models use it too: x is rounded to bfloat16 on the way in and the output
              cast back, since torch vectorises only the bfloat16 path (kernels/quant_cpu.py)
    cpu_int8  kernels/int8_group_gemm_cpu.py (C++): 8 bits with integer zero points, no perm, G a multiple
              of 8, on CPU, whatever the model dtype (it computes in float32). The weight stays 1 byte per
              value; at SmolLM2's shapes it takes 0.77-1.17x the dense float32 matmul's time at M = 1-48
              (docs/benchmarks.md, "Grouped int8 on CPU"), so it is used for every batch size. Without a
              C++ compiler: dequant (a GGUF expands to dense instead)
    dequant   dequantize, then F.linear (the reference; everything else)

A channel-wise symmetric 8-bit weight (compressed-tensors W8A16, GPTQ 8-bit with group_size -1) is no
grouped weight at all: :func:`as_int8` turns it into Tandem's own int8 format, for Int8Linear's kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from engine.quant.linear import QuantLinear
from engine.quant.schemes import Int8Weight
from kernels import int8_group_gemm_cpu
from kernels.int8_group_gemm_cpu import Int8GroupGemm
from kernels.quant_cpu import CPU_INT4_N_MULTIPLE, CpuInt4Weight, int4_pack_for_cpu, int4_packed_mm
from kernels.wna16_gemm import GroupWeight, wna16_gemm, wna16_ref

_CPU_INT4_GROUPS = (32, 64, 128, 256)
_TRITON_MIN_ALIGN = 16


def as_int8(w: GroupWeight) -> Int8Weight | None:
    """``w`` as per-row symmetric int8 when it is one: 8 bits, one group per row, every zero point 128,
    no permutation. None otherwise."""
    n, k = w.shape
    if w.bits != 8 or w.group_size < k or w.perm is not None or w.offset_zeros or not bool((w.zeros == 128).all()):
        return None
    return Int8Weight((w.qweight.to(torch.int16) - 128).to(torch.int8), w.scales.float().reshape(n).contiguous())


def choose_group_kernel(
    w: GroupWeight, backend: str, device: torch.device, dtype: torch.dtype, bf16_activations: bool = False
) -> str:
    """triton | packed | cpu_int8 | dequant for one layer; backend "triton" or "torch"
    (engine/quant/apply.py); ``bf16_activations``: a model of another dtype may round x to bfloat16 for
    the packed kernel. cpu_int8 only where its C++ kernel built (one logged warning otherwise)."""
    n, k = w.shape
    if backend == "triton":
        align = math.gcd(w.group_size, k)
        return "triton" if align & -align >= _TRITON_MIN_ALIGN else "dequant"
    if (device.type == "cpu" and (dtype == torch.bfloat16 or bf16_activations) and w.bits == 4
            and n % CPU_INT4_N_MULTIPLE == 0 and w.group_size in _CPU_INT4_GROUPS and k % w.group_size == 0):  # fmt: skip
        return "packed"
    if device.type == "cpu" and int8_group_gemm_cpu.supports(w) and int8_group_gemm_cpu.load_kernel() is not None:
        return "cpu_int8"
    return "dequant"


class GroupQuantLinear(QuantLinear):
    """W4A16 / W8A16 with a (scale, zero) per group of inputs. Buffers: qweight, scales, zeros and perm
    as the GroupWeight has them (scales in the checkpoint's float dtype, so nothing is rounded; float32
    for cpu_int8, exactly converted), or for the packed kernel torch's CPU layout (qweight,
    scale_and_zeros (K // G, N, 2) in bfloat16, the dtype its activations are computed in) and perm."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    perm: Tensor | None
    scale_and_zeros: Tensor

    def __init__(self, w: GroupWeight, bias: Tensor | None, kernel: str, dtype: torch.dtype) -> None:
        n, k = w.shape
        super().__init__(k, n, kernel, bias)
        self.scheme = f"w{w.bits}a16"
        self.group_size, self.bits = w.group_size, w.bits
        self.register_buffer("perm", w.perm)
        if kernel == "packed":
            cpu = int4_pack_for_cpu(w.qweight, w.scales, w.zeros, torch.bfloat16)
            self.register_buffer("qweight", cpu.packed)
            self.register_buffer("scale_and_zeros", cpu.scale_and_zeros)
        else:
            self.register_buffer("qweight", w.qweight)
            self.register_buffer("scales", w.scales.float() if kernel == "cpu_int8" else w.scales)
            self.register_buffer("zeros", w.zeros)
        self._cpu_int8: Int8GroupGemm | None = Int8GroupGemm(self.weight()) if kernel == "cpu_int8" else None

    def weight(self) -> GroupWeight:
        """The layer's GroupWeight (not for the packed kernel, which keeps torch's layout)."""
        return GroupWeight(self.qweight, self.scales, self.zeros, self.group_size, self.bits, self.perm)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "packed":
            xs = x if self.perm is None else x.index_select(-1, self.perm)
            packed = CpuInt4Weight(self.qweight, self.scale_and_zeros)
            if x.dtype == torch.bfloat16:
                return int4_packed_mm(xs, packed, self.group_size, self.bias)
            out = int4_packed_mm(xs.to(torch.bfloat16), packed, self.group_size).to(x.dtype)
            return out if self.bias is None else out + self.bias
        if self.kernel == "cpu_int8":
            gemm = self._cpu_int8
            if gemm is None or gemm.weight.qweight is not self.qweight or gemm.weight.scales is not self.scales:
                gemm = self._cpu_int8 = Int8GroupGemm(self.weight())  # buffers replaced (.to(), a load)
            return gemm(x, self.bias)
        if self.kernel == "triton":
            return wna16_gemm(x, self.weight(), self.bias)
        return wna16_ref(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        act_order = ", act_order" if self.perm is not None else ""
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}{act_order}"

