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
references. Each call costs a few attribute checks and one call into the library: a Python fast call
(kernels/pyfast.h), or ctypes with argtypes set at load where Python's headers are missing.
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
# No fused multiply-adds: the references round each product before the sum (rotary's x1*cos - x2*sin).
BUILD_FLAGS = ("-ffp-contract=off",)
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
    lib = cpu_build.load_library(SOURCE, "the CPU layer kernels", "the PyTorch references", BUILD_FLAGS)
    if lib is None:
        return None
    return Kernels(**cpu_build.entry_points(lib, SOURCE, _SIGNATURES))


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
    shape, xs = x.shape, x.stride()
    if (code is None or not x.is_cpu or len(shape) != 2 or xs[1] != 1 or weight.dtype != x.dtype
            or not weight.is_cpu or weight.shape != shape[1:] or weight.stride() != (1,)
            or (residual is not None and (residual.dtype != x.dtype or not residual.is_cpu
                                          or residual.shape != shape or residual.stride()[1] != 1))):
        return rms_norm_ref(x, weight, eps, residual)  # fmt: skip
    k = _kernels()
    t, h = shape
    out = torch.empty(t, h, dtype=x.dtype)
    if residual is None:
        k.rms_norm(x.data_ptr(), xs[0], None, 0, weight.data_ptr(), out.data_ptr(), None, t, h, eps, code)
        return out
    res_out = torch.empty(t, h, dtype=x.dtype)
    k.rms_norm(x.data_ptr(), xs[0], residual.data_ptr(), residual.stride()[0], weight.data_ptr(), out.data_ptr(),
               res_out.data_ptr(), t, h, eps, code)  # fmt: skip
    return out, res_out


def rotary_cpu(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`rotary_ref` in one pass: q (T, Hq, D), k (T, Hk, D) of one dtype with unit last strides
    (views of a fused qkv output are fine), positions (T,) int64, a float32 cache (max_position, D).
    Returns new contiguous tensors; a position outside the cache raises IndexError."""
    code = _CODES.get(q.dtype)
    qn, kn, cn = q.shape, k.shape, cos_sin_cache.shape
    qs, ks, cs, ps = q.stride(), k.stride(), cos_sin_cache.stride(), positions.stride()
    if (code is None or len(qn) != 3 or len(kn) != 3 or len(cn) != 2 or len(ps) != 1 or qs[2] != 1 or ks[2] != 1
            or cs[1] != 1 or qn[2] % 2 or kn[0] != qn[0] or kn[2] != qn[2] or cn[1] != qn[2]
            or positions.shape[0] != qn[0] or k.dtype != q.dtype or positions.dtype != torch.int64
            or cos_sin_cache.dtype != torch.float32 or not (q.is_cpu and k.is_cpu and positions.is_cpu
                                                            and cos_sin_cache.is_cpu)):
        return rotary_ref(positions, q, k, cos_sin_cache)  # fmt: skip
    t, hq, d = qn
    hk = kn[1]
    q_out = torch.empty(t, hq, d, dtype=q.dtype)
    k_out = torch.empty(t, hk, d, dtype=q.dtype)
    rc = _kernels().rotary(positions.data_ptr(), ps[0], q.data_ptr(), qs[0], qs[1], k.data_ptr(), ks[0], ks[1],
                           cos_sin_cache.data_ptr(), cs[0], cn[0], q_out.data_ptr(), k_out.data_ptr(), t, hq, hk, d,
                           code)  # fmt: skip
    if rc < 0:
        raise IndexError(f"position {int(positions[-1 - rc])} is outside the rotary cache's {cn[0]} rows")
    return q_out, k_out


def silu_and_mul_cpu(x: Tensor) -> Tensor:
    """:func:`silu_and_mul_ref` in one pass: x (T, 2*I) with a unit last stride -> new (T, I)."""
    code = _CODES.get(x.dtype)
    shape, xs = x.shape, x.stride()
    if code is None or not x.is_cpu or len(shape) != 2 or xs[1] != 1 or shape[1] % 2:
        return silu_and_mul_ref(x)
    t, inter = shape[0], shape[1] // 2
    out = torch.empty(t, inter, dtype=x.dtype)
    _kernels().silu_and_mul(x.data_ptr(), xs[0], out.data_ptr(), t, inter, code)
    return out


def store_kv_cpu(k: Tensor, v: Tensor, kv_layer: Tensor, slot_mapping: Tensor, kv_scale: float | None = None) -> None:
    """:func:`store_kv_ref` by slot, with no boolean mask (so no host sync): k, v (T, Hk, D) of the
    pool's dtype, or any float dtype into a float8_e4m3fn pool (needs kv_scale > 0); unit last
    strides; slot_mapping (T,) int64, negative slots skipped, others below num_blocks * block_size
    (else IndexError, nothing written)."""
    code = _CODES.get(k.dtype)
    fp8 = kv_layer.dtype == FP8_KV_DTYPE
    if fp8:
        _check_kv_scale(kv_layer, kv_scale)
    pool = _FP8_CODE if fp8 else _CODES.get(kv_layer.dtype)
    kn, pn = k.shape, kv_layer.shape
    ks, vs, pstr, ss = k.stride(), v.stride(), kv_layer.stride(), slot_mapping.stride()
    if (code is None or pool is None or (pool != code and not fp8) or len(kn) != 3 or len(pn) != 5 or len(ss) != 1
            or v.shape != kn or ks[2] != 1 or vs[2] != 1 or pstr[4] != 1 or pn[1] != 2 or pn[3:] != kn[1:]
            or slot_mapping.shape[0] != kn[0] or v.dtype != k.dtype or slot_mapping.dtype != torch.int64
            or not (k.is_cpu and v.is_cpu and kv_layer.is_cpu and slot_mapping.is_cpu)):
        store_kv_ref(k, v, kv_layer, slot_mapping, kv_scale)
        return  # fmt: skip
    num_blocks, _, block_size, hk, d = pn
    rc = _kernels().store_kv(k.data_ptr(), ks[0], ks[1], v.data_ptr(), vs[0], vs[1], kv_layer.data_ptr(), pstr[0],
                             pstr[1], pstr[2], pstr[3], slot_mapping.data_ptr(), ss[0], kn[0], hk, d, block_size,
                             num_blocks, code, pool, kv_scale if fp8 else 1.0)  # fmt: skip
    if rc < 0:
        raise IndexError(f"slot {int(slot_mapping[-1 - rc])} is outside the pool's {num_blocks * block_size} slots")


def argmax_rows(x: Tensor) -> Tensor:
    """``x.argmax(dim=-1)``, through the kernel for float32 CPU rows (V >= 1, unit last stride): the
    first maximal index, or the first NaN's where a row holds one, as torch.argmax. (B, V) -> (B,)
    int64. Anything else, or where the library is unavailable, is torch.argmax itself."""
    shape, xs = x.shape, x.stride()
    if x.dtype != torch.float32 or not x.is_cpu or len(shape) != 2 or shape[1] == 0 or xs[1] != 1:
        return x.argmax(dim=-1)  # (never building the library for a GPU's logits)
    k = load_kernels()
    if k is None:
        return x.argmax(dim=-1)
    out = torch.empty(shape[0], dtype=torch.int64)
    k.argmax(x.data_ptr(), xs[0], shape[0], shape[1], out.data_ptr())
    return out

