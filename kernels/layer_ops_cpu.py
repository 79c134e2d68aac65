"""The decoder layer's small ops and the greedy argmax on CPU: C++ kernels built on first use.

Each function here returns its reference's answer (and raises its errors) in one compiled pass over
the rows, where the reference runs several torch ops (each a dispatch, an allocation, a pass)::

    rms_norm_cpu      rms_norm_ref      (kernels/rmsnorm.py)     residual add + norm + weight, one pass
    rotary_cpu        rotary_ref        (kernels/rotary.py)      q and k of a token from one cos/sin row
    silu_and_mul_cpu  silu_and_mul_ref  (kernels/activation.py)
    store_kv_cpu      store_kv_ref      (kernels/kv_store.py)    by slot, no boolean mask (no nonzero())
    argmax_rows       torch.argmax(x, dim=-1)                    float32; first maximum, first NaN

They round where the references round (layer_ops_cpu.cpp says where they may differ: the order of
RMSNorm's sum and SiLU's exp). Inputs the kernels do not take (another dtype or device, a strided
last dim, mismatched shapes) go to the reference, which also raises the reference's errors.

Building: as kernels/paged_attention_cpu.py (kernels/cpu_build.py, once per machine); where there is
no compiler :func:`load_kernels` logs why once and returns None, and ``select_ops`` keeps the
references. Each call costs a few attribute checks and one ctypes call: argtypes are set at load.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kernels import cpu_build
from kernels.activation import silu_and_mul_ref
from kernels.kv_store import FP8_KV_DTYPE, _check_kv_scale, store_kv_ref
from kernels.rmsnorm import rms_norm_ref
from kernels.rotary import rotary_ref

SOURCE = Path(__file__).with_name("layer_ops_cpu.cpp")
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FP8_CODE = 3
_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class Kernels(NamedTuple):
    """The library's entry points (argument lists in layer_ops_cpu.cpp); each returns 0 or an error code."""

    rms_norm: Any
    rotary: Any
    silu_and_mul: Any
    store_kv: Any
    argmax: Any


_SIGNATURES = {
    "rms_norm": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _FLOAT, _INT],
    "rotary": [_PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64,
               _INT],
    "silu_and_mul": [_PTR, _I64, _PTR, _I64, _I64, _INT],
    "store_kv": [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _I64, _I64,
                 _I64, _INT, _INT, _FLOAT],
    "argmax": [_PTR, _I64, _I64, _I64, _PTR],
}  # fmt: skip


@functools.cache
def load_kernels() -> Kernels | None:
    """The compiled entry points, built if needed; None (logged once, with the reason) when there is
    no C++ compiler or the build or load fails."""
    # No fused multiply-adds: the references round each product before the sum (rotary's x1*cos - x2*sin).
    lib = cpu_build.load_library(SOURCE, "the CPU layer kernels", "the PyTorch references", ("-ffp-contract=off",))
    if lib is None:
        return None
    fns = {}
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, f"tandem_{name}")
        fn.restype, fn.argtypes = _INT, argtypes
        fns[name] = fn
    return Kernels(**fns)


def _kernels() -> Kernels:
    k = load_kernels()
    if k is None:
        raise RuntimeError("the CPU layer kernels are unavailable (see the log); use the references")
    return k


def rms_norm_cpu(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`rms_norm_ref` in one pass: x, residual (T, H) with a unit last stride, weight (H,), one
    dtype; returns new contiguous tensors, ``out`` or ``(out, x + residual)``."""
    code = _CODES.get(x.dtype)
    if (code is None or not x.is_cpu or x.dim() != 2 or x.stride(1) != 1 or weight.dtype != x.dtype
            or not weight.is_cpu or weight.shape != (x.shape[1],) or weight.stride(0) != 1
            or (residual is not None and (residual.dtype != x.dtype or not residual.is_cpu
                                          or residual.shape != x.shape or residual.stride(1) != 1))):
        return rms_norm_ref(x, weight, eps, residual)  # fmt: skip
    k = _kernels()
    t, h = x.shape
    out = torch.empty((t, h), dtype=x.dtype)
    if residual is None:
        k.rms_norm(x.data_ptr(), x.stride(0), None, 0, weight.data_ptr(), out.data_ptr(), None, t, h, eps, code)
        return out
    res_out = torch.empty((t, h), dtype=x.dtype)
    k.rms_norm(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), weight.data_ptr(),
               out.data_ptr(), res_out.data_ptr(), t, h, eps, code)  # fmt: skip
    return out, res_out


def rotary_cpu(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`rotary_ref` in one pass: q (T, Hq, D), k (T, Hk, D) of one dtype with unit last strides
    (views of a fused qkv output are fine), positions (T,) int64, a float32 cache (max_position, D).
    Returns new contiguous tensors; a position outside the cache raises IndexError."""
    code = _CODES.get(q.dtype)
    t, hq, d = q.shape if q.dim() == 3 else (-1, -1, -1)
    if (code is None or not q.is_cpu or d < 2 or q.stride(2) != 1 or k.dtype != q.dtype or not k.is_cpu
            or k.dim() != 3 or k.shape[0] != t or k.shape[2] != d or k.stride(2) != 1
            or positions.dtype != torch.int64 or not positions.is_cpu or positions.shape != (t,)
            or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_cpu or cos_sin_cache.dim() != 2
            or cos_sin_cache.shape[1] != d or cos_sin_cache.stride(1) != 1 or d % 2):
        return rotary_ref(positions, q, k, cos_sin_cache)  # fmt: skip
    hk = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype)
    k_out = torch.empty((t, hk, d), dtype=q.dtype)
    rc = _kernels().rotary(positions.data_ptr(), positions.stride(0), q.data_ptr(), q.stride(0), q.stride(1),
                           k.data_ptr(), k.stride(0), k.stride(1), cos_sin_cache.data_ptr(), cos_sin_cache.stride(0),
                           cos_sin_cache.shape[0], q_out.data_ptr(), k_out.data_ptr(), t, hq, hk, d, code)  # fmt: skip
    if rc < 0:
        raise IndexError(f"position {int(positions[-1 - rc])} is outside the rotary cache's "
                         f"{cos_sin_cache.shape[0]} rows")  # fmt: skip
    return q_out, k_out


def silu_and_mul_cpu(x: Tensor) -> Tensor:
    """:func:`silu_and_mul_ref` in one pass: x (T, 2*I) with a unit last stride -> new (T, I)."""
    code = _CODES.get(x.dtype)
    if code is None or not x.is_cpu or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 2:
        return silu_and_mul_ref(x)
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, inter), dtype=x.dtype)
    _kernels().silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), t, inter, code)
    return out


def store_kv_cpu(k: Tensor, v: Tensor, kv_layer: Tensor, slot_mapping: Tensor, kv_scale: float | None = None) -> None:
    """:func:`store_kv_ref` by slot, with no boolean mask (so no host sync): k, v (T, Hk, D) of the
    pool's dtype, or any float dtype into a float8_e4m3fn pool (needs kv_scale > 0); unit last
    strides; slot_mapping (T,) int64, negative slots skipped, others below num_blocks * block_size
    (else IndexError, nothing written)."""
    _check_kv_scale(kv_layer, kv_scale)
    code = _CODES.get(k.dtype)
    pool = _FP8_CODE if kv_layer.dtype == FP8_KV_DTYPE else _CODES.get(kv_layer.dtype)
    t = k.shape[0]
    if (code is None or pool is None or (pool != code and pool != _FP8_CODE) or not k.is_cpu or k.dim() != 3
            or k.stride(2) != 1 or v.dtype != k.dtype or not v.is_cpu or v.shape != k.shape or v.stride(2) != 1
            or not kv_layer.is_cpu or kv_layer.dim() != 5 or kv_layer.shape[1] != 2 or kv_layer.stride(4) != 1
            or kv_layer.shape[3:] != k.shape[1:] or slot_mapping.dtype != torch.int64 or not slot_mapping.is_cpu
            or slot_mapping.shape != (t,)):
        store_kv_ref(k, v, kv_layer, slot_mapping, kv_scale)
        return  # fmt: skip
    num_blocks, _, block_size, hk, d = kv_layer.shape
    sb, skv, ss, sh, _ = kv_layer.stride()
    rc = _kernels().store_kv(k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                             kv_layer.data_ptr(), sb, skv, ss, sh, slot_mapping.data_ptr(), slot_mapping.stride(0), t,
                             hk, d, block_size, num_blocks, code, pool, kv_scale if pool == _FP8_CODE else 1.0)  # fmt: skip
    if rc < 0:
        raise IndexError(f"slot {int(slot_mapping[-1 - rc])} is outside the pool's {num_blocks * block_size} slots")


def argmax_rows(x: Tensor) -> Tensor:
    """``x.argmax(dim=-1)``, through the kernel for float32 CPU rows (V >= 1, unit last stride): the
    first maximal index, or the first NaN's where a row holds one, as torch.argmax. (B, V) -> (B,)
    int64. Anything else, or where the library is unavailable, is torch.argmax itself."""
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2 or x.shape[1] == 0 or x.stride(1) != 1:
        return x.argmax(dim=-1)
    k = load_kernels()
    if k is None:
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    k.argmax(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out

