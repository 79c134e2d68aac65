"""Writing new K/V into the paged KV cache.

One layer's cache, ``kv_layer``, is (num_blocks, 2, block_size, Hk, D)::

    kv_layer[block, 0, offset] = K of one token   (Hk, D)
    kv_layer[block, 1, offset] = V of one token   (Hk, D)

A token's slot is ``block * block_size + offset``; slot_mapping gives one slot per new token,
and a negative slot marks a padding token that is not stored.
"""

from __future__ import annotations

from torch import Tensor


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
