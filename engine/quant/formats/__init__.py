"""Pre-quantized weight formats, one module each: a module's checkpoint tensors -> the layouts of
kernels/wna16_gemm.py (GroupWeight) and engine/quant/schemes.py (Fp8Weight, Fp8BlockWeight)."""
