"""Integers packed into int32 words, as GPTQ, AWQ and compressed-tensors store them.

Every format here packs 32 / bits values into each int32, value i of a word in bits [bits*i, bits*(i+1))
(little end first); they differ in the axis they pack along and, for AWQ, in the order of the values::

    pack along the last axis (compressed-tensors weight_packed, GPTQ qzeros, AWQ qweight / qzeros)
        word (r, c) holds values (r, c*per + i), i = 0 .. per-1      per = 32 / bits
    AWQ reorders each word's 8 nibbles: nibble i holds column c*8 + AWQ_ORDER[i]
"""

from __future__ import annotations

import torch
from torch import Tensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(packed: Tensor, bits: int, order: tuple[int, ...] | None = None) -> Tensor:
    """(R, C) int32 -> (R, C * 32 / bits) int32 values in [0, 2**bits), unpacked along the last axis.

    ``order``: value i of a word is column ``order[i]`` of its run (AWQ); default: column i.
    Raises ValueError for bits that do not divide 32 or a non-int32 input.
    """
    if packed.dtype != torch.int32 or 32 % bits:
        raise ValueError(f"expected int32 words and bits dividing 32, got {packed.dtype} and {bits} bits")
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    vals = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (R, C, per): value i at bits*i
    if order is not None:
        vals = vals[..., torch.tensor([order.index(j) for j in range(per)], device=packed.device)]
    return vals.reshape(*packed.shape[:-1], -1)


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """(R, C) integers in [0, 2**bits), C a multiple of 32 / bits -> (R, C * bits / 32) int32, packed
    along the last axis (the inverse of :func:`unpack_int32` without ``order``)."""
    per = 32 // bits
    if 32 % bits or values.shape[-1] % per:
        raise ValueError(f"{values.shape[-1]} columns do not pack into int32 words of {per} values")
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=values.device) * bits
    words = (v << shifts).sum(dim=-1)  # < 2**32, so exact in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
