"""Hot-path kernels: each Triton kernel sits beside its plain-PyTorch reference."""

from kernels.activation import silu_and_mul_ref
from kernels.kv_store import store_kv_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rmsnorm import rms_norm_ref
from kernels.rotary import build_cos_sin_cache, rotary_ref

__all__ = [
    "build_cos_sin_cache",
    "paged_attention_ref",
    "rms_norm_ref",
    "rotary_ref",
    "silu_and_mul_ref",
    "store_kv_ref",
]
