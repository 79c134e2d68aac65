"""Names of full KV blocks: a chained hash over block-sized runs of token ids.

Equal names mean equal prefixes, in any process: the block manager's prefix cache keys its blocks by
them, and the gateway's router predicts a prefill worker's cache hits with the same function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq

import numpy as np


def hash_block(parent: int | None, token_ids: Seq[int]) -> int:
    """A 128-bit name for a full block, chained over its parent's name (stable across processes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update((parent or 0).to_bytes(16, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_prefix(token_ids: Seq[int], block_size: int, max_tokens: int | None = None) -> list[int]:
    """Names of the full blocks in `token_ids[:max_tokens]`, in order."""
    limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, limit - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
