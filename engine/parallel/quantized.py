"""One rank's part of a pre-quantized projection weight (GPTQ, AWQ, compressed-tensors, FP8), cut
after the format's converter so every format shares one set of rules.

    weight kind        column split (rows of W, dim 0)      row split (columns of W, dim 1)
    GroupWeight        rows of qweight, scales, zeros       start and size multiples of group_size, and no
                                                            act-order permutation (GPTQ desc_act): refused
    Int8 / Fp8Weight   rows of qweight and scale            columns of qweight (per-row scales stay)
    Fp8BlockWeight     start and size multiples of block_n  start and size multiples of block_k
    dense Tensor       rows                                 columns

A split that would cut a quantization group (or an fp8 tile) is refused at start-up with a ValueError
naming the projection, the group and the size: the rank's shard would otherwise need a group that
starts in another rank's columns.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from engine.parallel.shard import Slice
from engine.quant.schemes import Fp8BlockWeight, Fp8Weight, Int8Weight
from kernels.wna16_gemm import GroupWeight


def slice_quantized(q: Any, part: Slice | None, name: str) -> Any:
    """`q` (a converter's output for projection `name`) cut to `part`; `q` itself when `part` is None."""
    if part is None or part.size == part.full:
        return q
    a, b = part.start, part.start + part.size
    if part.dim == 0:
        return _rows(q, a, b, name)
    return _cols(q, a, b, name)


def _refuse(name: str, what: str, unit: int, part: tuple[int, int]) -> ValueError:
    return ValueError(f"{name}: tensor parallelism would split its {what} of {unit} at columns/rows "
                      f"[{part[0]}, {part[1]}); choose a --tensor-parallel-size whose shards are whole "
                      f"{what}s (or load a dense checkpoint and quantize at load time)")


def _rows(q: Any, a: int, b: int, name: str) -> Any:
    if isinstance(q, GroupWeight):
        return q._replace(qweight=q.qweight[a:b], scales=q.scales[a:b], zeros=q.zeros[a:b])
    if isinstance(q, Int8Weight | Fp8Weight):
        return q._replace(qweight=q.qweight[a:b], scale=q.scale[a:b])
    if isinstance(q, Fp8BlockWeight):
        bn = q.block[0]
        if a % bn or (b % bn and b != q.qweight.shape[0]):
            raise _refuse(name, "fp8 tile", bn, (a, b))
        return q._replace(qweight=q.qweight[a:b], scale=q.scale[a // bn : -(-b // bn)])
    assert isinstance(q, Tensor), type(q)
    return q[a:b]


def _cols(q: Any, a: int, b: int, name: str) -> Any:
    if isinstance(q, GroupWeight):
        if q.perm is not None:
            raise ValueError(f"{name}: an act-order (desc_act) GPTQ projection cannot be split over its input "
                             f"columns: its column permutation spans every rank's shard; use a checkpoint "
                             f"without desc_act, or --tensor-parallel-size 1")
        g = q.group_size
        if a % g or b % g:
            raise _refuse(name, "quantization group", g, (a, b))
        per_byte = 8 // q.bits
        return q._replace(qweight=q.qweight[:, a // per_byte : b // per_byte], scales=q.scales[:, a // g : b // g],
                          zeros=q.zeros[:, a // g : b // g])
    if isinstance(q, Int8Weight | Fp8Weight):
        return q._replace(qweight=q.qweight[:, a:b])
    if isinstance(q, Fp8BlockWeight):
        bk = q.block[1]
        if a % bk or (b % bk and b != q.qweight.shape[1]):
            raise _refuse(name, "fp8 tile", bk, (a, b))
        return q._replace(qweight=q.qweight[:, a:b], scale=q.scale[:, a // bk : -(-b // bk)])
    assert isinstance(q, Tensor), type(q)
    return q[:, a:b]
