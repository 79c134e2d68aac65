"""Hot-path kernels: each Triton kernel sits beside its plain-PyTorch reference.

``select_ops(backend, device)`` returns the bundle the engine calls; the ``*_ref`` functions are
the PyTorch references (and the CPU path), the others the Triton launchers. The exceptions are
C++ CPU kernels built on first use (kernels/cpu_build.py): kernels.paged_attention_cpu (attention),
kernels.layer_ops_cpu (the references' CPU counterparts and the sampler's argmax) and
kernels.int8_group_gemm_cpu (grouped 8-bit weights); and kernels.onednn_linear, torch's oneDNN
inner product for the wide float32 CPU linears (chosen per layer at load: engine.model.use_onednn_linears).
kernels.fast_new is built the same way but is not a kernel: a fast constructor for the engine's
per-row output dataclass.
"""

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.kv_store import store_kv, store_kv_ref
from kernels.ops import Ops, select_ops
from kernels.paged_attention import paged_attention_ref
from kernels.paged_decode import paged_decode_attention
from kernels.paged_extend import paged_extend_attention
from kernels.rmsnorm import rms_norm, rms_norm_ref
from kernels.rotary import build_cos_sin_cache, rotary, rotary_ref

__all__ = [
    "Ops",
    "build_cos_sin_cache",
    "paged_attention_ref",
    "paged_decode_attention",
    "paged_extend_attention",
    "rms_norm",
    "rms_norm_ref",
    "rotary",
    "rotary_ref",
    "select_ops",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kv",
    "store_kv_ref",
]
