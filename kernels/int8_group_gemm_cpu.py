"""Grouped 8-bit weight GEMM on CPU, a C++ kernel built on first use, beside its reference
:func:`kernels.wna16_gemm.wna16_ref`: ``out = x @ dequant(W).T`` for a :class:`GroupWeight` with
``bits=8``, uint8 zero points (w = (q - z) * s, GGUF Q8_0 / Q6_K as converted, GPTQ and
compressed-tensors 8-bit groups) and no ``perm``; float-offset zeros and act-order stay with the
reference.

The weight stays 1 byte per value (plus a scale and a zero point per group); the kernel
(``int8_group_gemm_cpu.cpp``) converts codes to float32 as it goes::

    x (M, K) float32 --copied once, zero-padded to K8--> xp (M, K8)
    W (N, K) uint8, tiles of 16 rows -> torch's intra-op threads
      M <= 4   each tile's rows converted 4 at a time in registers and used at once (decode:
               every weight byte read once per call)
      M > 4    each tile converted once into a float32 scratch (16, K8), then reused by all M rows

Computes in float32 (bfloat16 / float16 x is converted, and the output cast back). The build is
kernels/cpu_build.py's: :func:`load_kernel` returns None, logged once, where there is no compiler.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kernels import cpu_build
from kernels._triton import FLOAT_DTYPES, check, check_tensor
from kernels.wna16_gemm import GroupWeight

SOURCE = Path(__file__).with_name("int8_group_gemm_cpu.cpp")
VECTOR = 8  # a group must be whole vectors of 8 inputs
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES: list[Any] = [
    _PTR, _I64, _I64,  # x (M, K) float32 and its two strides
    _PTR, _I64,  # qweight (N, K) uint8, its row stride
    _PTR, _I64, _PTR, _I64,  # scales (N, groups) float32, zeros (N, groups) uint8, their row strides
    _PTR, _I64,  # out (M, N) float32, its row stride
    _I64, _I64, _I64, _I64,  # M, N, K, G
]  # fmt: skip


@functools.cache
def load_kernel() -> Callable[..., int] | None:
    """The compiled kernel's entry point, built if needed; None (logged once, with the reason) when
    there is no C++ compiler or the build or load fails."""
    lib = cpu_build.load_library(SOURCE, "the grouped int8 CPU kernel", "the dense or dequantizing fallback")
    if lib is None:
        return None
    return cpu_build.entry_points(lib, SOURCE, {"int8_group_gemm": _ARGTYPES})["int8_group_gemm"]


def supports(w: GroupWeight) -> bool:
    """Whether the kernel takes ``w``: 8 bits, integer zero points, no perm, groups of whole vectors."""
    return w.bits == 8 and not w.offset_zeros and w.perm is None and w.group_size % VECTOR == 0


def _tensor_ok(t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    return (isinstance(t, Tensor) and t.dim() == ndim and t.dtype in dtypes and t.device.type == "cpu"
            and (t.numel() == 0 or t.stride(-1) == 1))  # fmt: skip


def check_weight(w: GroupWeight) -> None:
    """ValueError, naming the field, unless ``w`` is a CPU grouped 8-bit weight this kernel takes
    (qweight (N, K) uint8, scales (N, ceil(K / G)) float, zeros (N, ceil(K / G)) uint8, unit last
    strides, G a multiple of 8, no perm). Cheap when ``w`` is fine: messages are built on failure."""
    ok = (w.bits == 8 and w.perm is None and w.group_size >= VECTOR and w.group_size % VECTOR == 0
          and _tensor_ok(w.qweight, 2, (torch.uint8,)) and _tensor_ok(w.scales, 2, FLOAT_DTYPES)
          and _tensor_ok(w.zeros, 2, (torch.uint8,))
          and w.scales.shape == w.zeros.shape == (w.qweight.shape[0], -(-w.qweight.shape[1] // w.group_size)))  # fmt: skip
    if ok:
        return
    cpu = torch.device("cpu")
    check(w.bits == 8, f"the grouped int8 CPU kernel takes bits=8, got {w.bits}")
    check(w.perm is None, "the grouped int8 CPU kernel takes no perm (act-order goes to wna16_ref)")
    check(w.group_size >= VECTOR and w.group_size % VECTOR == 0,
          f"group_size must be a positive multiple of {VECTOR}, got {w.group_size}")  # fmt: skip
    check_tensor("qweight", w.qweight, 2, (torch.uint8,), cpu)
    check_tensor("scales", w.scales, 2, FLOAT_DTYPES, cpu)
    check_tensor("zeros", w.zeros, 2, (torch.uint8,), cpu)
    n, k = w.qweight.shape
    groups = (n, -(-k // w.group_size))
    check(tuple(w.scales.shape) == groups and tuple(w.zeros.shape) == groups,
          f"scales and zeros must be {groups}, got {tuple(w.scales.shape)} and {tuple(w.zeros.shape)}")  # fmt: skip
    raise AssertionError(f"check_weight's fast test refused a weight its checks accept: {w}")


def int8_group_gemm_cpu(x: Tensor, w: GroupWeight, bias: Tensor | None = None) -> Tensor:
    """:func:`wna16_ref`'s contract for a weight :func:`supports` takes: x (..., K) float on the CPU,
    any strides -> new (..., N) in x.dtype; bias (N,) in x.dtype. Scales other than float32 are
    converted per call (store them as float32 to avoid it; the conversion is exact). Raises ValueError
    on any shape, dtype or device mismatch, RuntimeError when the kernel could not be built (see
    :func:`load_kernel`). The kernel returns no status: every size it needs is checked here."""
    check_weight(w)
    n, k = w.qweight.shape
    if not (isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] == k and x.dtype in FLOAT_DTYPES
            and x.device.type == "cpu"):  # fmt: skip
        check(isinstance(x, Tensor), f"x must be a torch.Tensor, got {type(x).__name__}")
        check(x.dim() >= 1 and x.shape[-1] == k, f"x must be (..., {k}), got {tuple(x.shape)}")
        check(x.dtype in FLOAT_DTYPES, f"x dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
        check(x.device.type == "cpu", f"x is on {x.device}, expected cpu")
    if bias is not None and not (_tensor_ok(bias, 1, (x.dtype,)) and bias.shape[0] == n):
        check_tensor("bias", bias, 1, (x.dtype,), torch.device("cpu"))
        check(bias.shape[0] == n, f"bias must be ({n},), got {tuple(bias.shape)}")
    return Int8GroupGemm(w)(x, bias)


class Int8GroupGemm:
    """A checked weight with its kernel arguments prepared once (scales converted to float32,
    pointers and strides read), so a call costs one output allocation and the kernel: what
    GroupQuantLinear holds. Calling it: x (..., K) float on the CPU (not checked again), bias (N,)
    in x.dtype or None -> new (..., N) in x.dtype. ValueError from the constructor as
    :func:`check_weight`; RuntimeError when the kernel could not be built."""

    def __init__(self, w: GroupWeight) -> None:
        check_weight(w)
        if load_kernel() is None:
            raise RuntimeError("the grouped int8 CPU kernel is unavailable (see the log); use wna16_ref")
        self.weight = w
        self.scales = w.scales if w.scales.dtype == torch.float32 else w.scales.float()  # exact
        self.n, self.k = w.qweight.shape
        # the arguments after x's: qweight, scales, zeros (pointer, row stride each)
        self.args = (w.qweight.data_ptr(), w.qweight.stride(0), self.scales.data_ptr(), self.scales.stride(0),
                     w.zeros.data_ptr(), w.zeros.stride(0))  # fmt: skip

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        n, k = self.n, self.k
        x2 = x if x.dim() == 2 else x.reshape(-1, k)  # (M, K), a view where the strides allow
        if x2.dtype != torch.float32:
            x2 = x2.float()
        m = x2.shape[0]
        out = torch.empty(m, n, dtype=torch.float32)  # (M, N)
        if m:
            sm, sk = x2.stride()
            kernel = load_kernel()  # cached; not held, so the object stays copyable
            assert kernel is not None
            kernel(x2.data_ptr(), sm, sk, *self.args, out.data_ptr(), n, m, n, k, self.weight.group_size)
        if bias is not None:
            out += bias
        if x.dtype != torch.float32:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)
