"""Quantized weights: rounded at load time, or read from a pre-quantized checkpoint.

``quantize_model(model, scheme, device)`` swaps the decoder layers' projections for the modules in
``engine.quant.linear`` (int8 W8A16, int4 W4A16 group 128, fp8 e4m3; formats in ``engine.quant.schemes``).
``engine.quant.prequantized.detect`` recognises GPTQ, AWQ, compressed-tensors and FP8 checkpoints from their
config.json and ``engine.quant.loader.load_prequantized`` loads them kept quantized (converters in
``engine.quant.formats``, GGUF tensors included; ``GroupQuantLinear`` in ``engine.quant.group_linear``).
GEMMs: kernels/quant_gemm.py, kernels/wna16_gemm.py, kernels/quant_cpu.py. See docs/quantization.md.
"""

from engine.quant.apply import gemm_backend, linear_weight_bytes, projection_modules, quantize_model
from engine.quant.group_linear import GroupQuantLinear
from engine.quant.linear import Fp8Linear, Int4Linear, Int8Linear, QuantLinear, choose_kernel
from engine.quant.schemes import SCHEMES, check_scheme

__all__ = [
    "SCHEMES",
    "Fp8Linear",
    "GroupQuantLinear",
    "Int4Linear",
    "Int8Linear",
    "QuantLinear",
    "check_scheme",
    "choose_kernel",
    "gemm_backend",
    "linear_weight_bytes",
    "projection_modules",
    "quantize_model",
]
