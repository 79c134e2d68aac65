"""The quantized GEMMs' non-Triton paths: torch's packed CPU kernels, and fp8 through ``torch._scaled_mm``.

CPU. torch ships packed weight-only kernels, ``torch._weight_int8pack_mm`` and
``torch._weight_int4pack_mm_for_cpu``. Both are exact here (checked against dequantize-and-matmul in
tests/kernels/test_quant_gemm.py), but only their bfloat16 path is vectorised: with float32 or float16
activations they ran 10-40x slower than a dense matmul on this project's CPU (AVX-512, torch 2.13),
slower even than dequantize-and-matmul. So the engine uses them for bfloat16 models and
dequantize-and-matmul (the ``*_ref`` functions in kernels/quant_gemm.py) otherwise.

torch's int4 CPU format is its own blocked layout, ``(N, K // 2) uint8`` but not the nibble order the
Triton kernel reads, with ``scale_and_zeros (K // G, N, 2)`` in the activation dtype and the
dequantization ``w = (q - 8) * scale + zero``; :func:`int4_pack_for_cpu` converts our (scale, integer
zero point) pairs exactly: ``zero = (8 - z) * scale``.

fp8 (Hopper, compute capability >= 8.9): W8A8. Activations get a dynamic per-token scale
(max|x| / 448), weights their per-channel scale, and ``torch._scaled_mm`` runs the fp8 tensor cores
with row-wise scaling (bfloat16 output). Elsewhere :func:`fp8_ref` dequantizes and multiplies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.quant_gemm import unpack_int4

FP8_MAX = 448.0
CPU_INT4_N_MULTIPLE = 16  # torch's CPU int4 packing works on blocks of 16 output channels


class CpuInt4Weight(NamedTuple):
    packed: Tensor  # (N, K // 2) uint8, torch's CPU layout
    scale_and_zeros: Tensor  # (K // G, N, 2) activation dtype


def int8_packed_mm(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) bfloat16 on CPU; qweight (N, K) int8; scale (N,) in x.dtype -> (..., N) in x.dtype."""
    k = x.shape[-1]
    out = torch._weight_int8pack_mm(x.reshape(-1, k), qweight, scale)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def int4_pack_for_cpu(qweight: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype) -> CpuInt4Weight:
    """Our int4 format (kernels/wna16_gemm.py: uint8 zero points, w = (q - z) * s, or float offsets,
    w = q * s + z) -> torch's CPU layout, whose zero term is then (8 - z) * s or 8 * s + z.
    N must be a multiple of 16."""
    n = qweight.shape[0]
    if n % CPU_INT4_N_MULTIPLE:
        raise ValueError(f"torch's CPU int4 layout needs N % {CPU_INT4_N_MULTIPLE} == 0, got N={n}")
    values = unpack_int4(qweight).to(torch.int32)  # (N, K)
    packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
    s = scales.float()
    zero_term = 8.0 * s + zeros.float() if zeros.is_floating_point() else (8.0 - zeros.float()) * s
    sz = torch.stack((s, zero_term), dim=-1)  # (N, G, 2)
    return CpuInt4Weight(packed, sz.transpose(0, 1).contiguous().to(dtype))


def int4_packed_mm(
    x: Tensor, w: CpuInt4Weight, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """x (..., K) on CPU (fast for bfloat16) -> (..., N) in x.dtype, w from :func:`int4_pack_for_cpu`."""
    k = x.shape[-1]
    out = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, k), w.packed, group_size, w.scale_and_zeros)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], w.packed.shape[0])


def fp8_ref(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference W8A16 fp8: dequantize ``float(qweight) * scale[:, None]`` to x.dtype, then F.linear."""
    w = (qweight.float() * scale.float()[:, None]).to(x.dtype)
    return F.linear(x, w, bias)


def supports_scaled_mm(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` can run fp8 here: a CUDA device of compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_scaled_mm(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """W8A8 fp8 on Hopper: x (..., K) float -> (..., N) in x.dtype.

    qweight (N, K) float8_e4m3fn row-major (its transpose is the column-major operand _scaled_mm
    wants), scale (N,) float32; K and N multiples of 16. Each token is quantized with its own scale.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)  # (M, 1)
    xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], qweight.shape[0])
