"""Writing new K/V into the paged KV cache.

One layer's cache, ``kv_layer``, is (num_blocks, 2, block_size, Hk, D)::

    kv_layer[block, 0, offset] = K of one token   (Hk, D)
    kv_layer[block, 1, offset] = V of one token   (Hk, D)

A token's slot is ``block * block_size + offset``; slot_mapping gives one slot per new token,
and a negative slot marks a padding token that is not stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import FLOAT_DTYPES, check, check_tensor, launchable, tl, triton


def store_kv_ref(k: Tensor, v: Tensor, kv_layer: Tensor, slot_mapping: Tensor) -> None:
    """PyTorch reference: write k, v (T, Hk, D) into kv_layer at slot_mapping (T,) int64, in place.

    Slots < 0 are skipped. kv_layer may be any strided view (e.g. ``kv[layer]``).
    """
    block_size = kv_layer.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
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


def store_kv(k: Tensor, v: Tensor, kv_layer: Tensor, slot_mapping: Tensor) -> None:
    """Triton KV store, same contract as :func:`store_kv_ref`: writes kv_layer in place.

    k, v: (T, Hk, D) with unit stride on D (may be views of a fused qkv output); kv_layer:
    (num_blocks, 2, block_size, Hk, D) in the same dtype, unit stride on D; slot_mapping (T,) int64.
    Slots must be < num_blocks * block_size (not checked: that would sync). Raises ValueError on
    shape, stride, dtype or device mismatches.
    """
    check_tensor("kv_layer", kv_layer, 5, FLOAT_DTYPES, kv_layer.device)
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
