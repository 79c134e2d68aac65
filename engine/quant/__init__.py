"""Post-training weight quantization at load time: int8 (W8A16), int4 (W4A16, group 128), fp8 (e4m3).

``quantize_model(model, scheme, device)`` swaps the decoder layers' projections for the modules in
``engine.quant.linear``; the formats are in ``engine.quant.schemes``, the GEMMs in kernels/quant_*.py.
See docs/quantization.md.
"""

from engine.quant.apply import gemm_backend, linear_weight_bytes, projection_modules, quantize_model
from engine.quant.linear import Fp8Linear, Int4Linear, Int8Linear, QuantLinear, choose_kernel
from engine.quant.schemes import SCHEMES, check_scheme

__all__ = [
    "SCHEMES",
    "Fp8Linear",
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
