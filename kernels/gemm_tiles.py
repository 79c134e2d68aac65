"""Tiles, grid and launch shared by the weight-only quantized GEMMs (kernels/quant_gemm.py,
kernels/wna16_gemm.py): out (M, N) = x (M, K) @ dequant(W (N, K)).T.

Grid (tiles of out (M, N), SPLIT_K). A program owns one (BLOCK_M, BLOCK_N) tile and walks its K slice
BLOCK_K at a time; with SPLIT_K > 1 each split stores float32 partials (SPLIT_K, M, N) and torch sums
them (deterministic)::

          K slice 0      K slice 1
        ┌────────────┬────────────┐
   x    │  (BM, BK)… │  (BM, BK)… │        tiles in grouped order: GROUP_M row tiles share a
        └────────────┴────────────┘        column of W tiles while it is still in L2
   W    │  (BN, BK)… │  (BN, BK)… │  ─► acc (BM, BN) float32 per split

Configs differ by M: decode (M <= 16) uses 16-row tiles and splits K until the grid fills the SMs, since
it only has to stream the weights once; prefill (M > 64) uses 128x128 tiles in grouped order for reuse.
They are starting points, not tuned on a GPU yet (bench/quant_gpu.py has the sweep to do that).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from kernels._triton import check, tl, triton

DECODE_MAX_M = 16
PREFILL_MIN_M = 65
MAX_SPLIT_K = 8
DEFAULT_NUM_SMS = 132  # H100/H200; used when the tensors are not on a GPU (interpreter)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def choose_config(m: int, n: int, k: int, k_align: int | None = None, num_sms: int = DEFAULT_NUM_SMS) -> GemmConfig:
    """Tile sizes for an (M, K) x (K, N) product; BLOCK_K divides ``k_align`` (a power of two: the
    quantization group, or the part of it that also divides K) when given."""
    if m <= DECODE_MAX_M:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m < PREFILL_MIN_M:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    bk = min(bk, max(16, triton.next_power_of_2(k)), k_align or bk)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    # Memory-bound shapes: split K while the grid is short of one program per SM and every split
    # keeps at least 4 K tiles (fewer would spend more on partial sums than they save).
    while m < PREFILL_MIN_M and split < MAX_SPLIT_K and tiles * split < num_sms and k >= bk * split * 8:
        split *= 2
    return GemmConfig(bm, bn, bk, split, 8, warps, stages)


@triton.jit
def tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row-tiles share each column of W tiles while it is still in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


def launch_gemm(
    kernel: Any, x: Tensor, n: int, k_align: int | None, config: GemmConfig | None,
    bias: Tensor | None, args: tuple[Any, ...], strides: tuple[int, ...], consts: dict[str, Any],
) -> Tensor:  # fmt: skip
    """Shared launch: x (..., K) -> new (..., N) in x.dtype. ``args`` are the weight tensors (passed
    after x), ``strides`` their row strides; ``k_align``: BLOCK_K must divide it (ValueError if a given
    config's does not)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else DEFAULT_NUM_SMS
    cfg = config or choose_config(m, n, k, k_align, sms)
    check(k_align is None or k_align % cfg.block_k == 0, f"BLOCK_K {cfg.block_k} must divide the group {k_align}")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_per_split)
    dst = out[None] if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    kernel[grid](
        x2, *args, dst, m, n, k, k_per_split, x2.stride(0), *strides, dst.stride(0), dst.stride(1), **consts,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        out.copy_(dst.sum(0))
    if bias is not None:
        out += bias
    return out.reshape(*lead, n)
