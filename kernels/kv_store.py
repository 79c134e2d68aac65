"""Writing new K/V into the paged KV cache.

One layer's cache, ``kv_layer``, is (num_blocks, 2, block_size, Hk, D)::

    kv_layer[block, 0, offset] = K of one token   (Hk, D)
    kv_layer[block, 1, offset] = V of one token   (Hk, D)

A token's slot is ``block * block_size + offset``; slot_mapping gives one slot per new token,
and a negative slot marks a padding token that is not stored.

fp8 pools (``kv_cache_dtype="fp8"``) hold float8_e4m3fn values ``clamp(x / kv_scale, +-448)``; the
attention kernels multiply by kv_scale when they read. The engine uses one static scale for every
layer, K and V (FP8_KV_SCALE = 1.0): e4m3 keeps ~2 significant digits over 2^-6..448 whatever the
scale, so a static scale only has to keep values out of saturation, and being static it needs no
calibration and means the same on a prefill and a decode worker. Accuracy: docs/quantization.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, tl, triton

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_SCALE = 1.0
_FP8_MAX = 448.0


def quantize_kv(x: Tensor, kv_scale: float) -> Tensor:
    """x (..., D) float -> new float8_e4m3fn tensor ``clamp(x / kv_scale, -448, 448)`` (no NaN on overflow)."""
    return (x.float() / kv_scale).clamp_(-_FP8_MAX, _FP8_MAX).to(FP8_KV_DTYPE)


def _check_kv_scale(kv_layer: Tensor, kv_scale: float | None) -> None:
    if kv_layer.dtype == FP8_KV_DTYPE:
        check(kv_scale is not None and kv_scale > 0, f"an fp8 KV cache needs kv_scale > 0, got {kv_scale}")


def store_kv_ref(
    k: Tensor, v: Tensor, kv_layer: Tensor, slot_mapping: Tensor, kv_scale: float | None = None
) -> None:
    """PyTorch reference: write k, v (T, Hk, D) into kv_layer at slot_mapping (T,) int64, in place.

    Slots < 0 are skipped. kv_layer may be any strided view (e.g. ``kv[layer]``). A float8_e4m3fn
    kv_layer stores :func:`quantize_kv` of k and v and needs kv_scale (ignored otherwise).
    """
    _check_kv_scale(kv_layer, kv_scale)
    block_size = kv_layer.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    if kv_layer.dtype == FP8_KV_DTYPE:
        assert kv_scale is not None
        kv_layer[blocks, 0, offsets] = quantize_kv(k[valid], kv_scale)
        kv_layer[blocks, 1, offsets] = quantize_kv(v[valid], kv_scale)
        return
    kv_layer[blocks, 0, offsets] = k[valid].to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = v[valid].to(kv_layer.dtype)


@triton.jit
def _store_kv_kernel(
    k_ptr,  # (T, Hk, D)
    v_ptr,  # (T, Hk, D)
    kv_ptr,  # (num_blocks, 2, block_size, Hk, D)
    slot_ptr,  # (T,) int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_block,
    stride_kv,
    stride_slot,
    stride_head,
    num_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token; a negative slot is padding and stores nothing.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    # The token's (Hk, D) tile in the cache page: block = slot // bs, offset = slot % bs.
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < head_dim)
    dst = kv_ptr + (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot
    dst += heads * stride_head + dims
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_kv, v, mask=mask)


def store_kv(
    k: Tensor, v: Tensor, kv_layer: Tensor, slot_mapping: Tensor, kv_scale: float | None = None
) -> None:
    """Triton KV store, same contract as :func:`store_kv_ref`: writes kv_layer in place.

    k, v: (T, Hk, D) with unit stride on D (may be views of a fused qkv output); kv_layer:
    (num_blocks, 2, block_size, Hk, D) in the same dtype, unit stride on D; slot_mapping (T,) int64.
    Slots must be < num_blocks * block_size (not checked: that would sync). Raises ValueError on
    shape, stride, dtype or device mismatches.

    A float8_e4m3fn kv_layer (kv_scale required): k and v are quantized in torch, then the kernel
    copies their bytes. Not fused, because the Triton interpreter rounds fp32 -> fp8 wrongly (7.96
    became 4.0), so a fused cast could not be tested on CPU.
    """
    _check_kv_scale(kv_layer, kv_scale)
    if kv_layer.dtype == FP8_KV_DTYPE and kv_scale is not None:
        k, v = quantize_kv(k, kv_scale).view(torch.uint8), quantize_kv(v, kv_scale).view(torch.uint8)
        kv_layer = kv_layer.view(torch.uint8)
    check_tensor("kv_layer", kv_layer, 5, (*FLOAT_DTYPES, torch.uint8), kv_layer.device)
    kern = launchable(_store_kv_kernel, kv_layer.device)
    _, two, block_size, num_heads, head_dim = kv_layer.shape
    check(two == 2, f"kv_layer must be (num_blocks, 2, block_size, Hk, D), got {tuple(kv_layer.shape)}")
    check_tensor("k", k, 3, (kv_layer.dtype,), kv_layer.device)
    check_tensor("v", v, 3, (kv_layer.dtype,), kv_layer.device)
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,), kv_layer.device, contiguous_last=False)
    num_tokens = k.shape[0]
    expected = (num_tokens, num_heads, head_dim)
    check(tuple(k.shape) == expected, f"k must be {expected} to match kv_layer, got {tuple(k.shape)}")
    check(tuple(v.shape) == expected, f"v must be {expected} to match kv_layer, got {tuple(v.shape)}")
    check(
        slot_mapping.shape[0] == num_tokens,
        f"slot_mapping must be ({num_tokens},), got {tuple(slot_mapping.shape)}",
    )
    if num_tokens == 0:
        return
    kern[(num_tokens,)](
        k, v, kv_layer, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        num_heads, head_dim,
        BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )  # fmt: skip
