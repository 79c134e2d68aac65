"""Names of full KV blocks: a chained hash over block-sized runs of token ids.

Equal names mean equal prefixes, in any process: the block manager's prefix cache keys its blocks by
them, and the gateway's router predicts a prefill worker's cache hits with the same function.

    name(block i) = blake2b-128( name(block i-1) as 16 little-endian bytes  (0 for the first block)
                                 + block i's token ids as int64 little-endian )
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from collections.abc import Sequence as Seq

import numpy as np

_PARENT_BYTES = 16


def _chain(parent: int | None, block: bytes) -> int:
    # one blake2b call over parent + block: every sequence of a steady batch fills a block in the same
    # step, so hash_block runs ~B times in a row on the engine thread
    data = (parent or 0).to_bytes(_PARENT_BYTES, "little") + block
    return int.from_bytes(hashlib.blake2b(data, digest_size=_PARENT_BYTES).digest(), "little")


@functools.cache
def _packer(n: int) -> Callable[..., bytes]:
    return struct.Struct(f"<{n}q").pack  # n int64 little-endian: hash_prefix's bytes for one block


def hash_block(parent: int | None, token_ids: Seq[int]) -> int:
    """A 128-bit name for a full block, chained over its parent's name (stable across processes)."""
    return _chain(parent, _packer(len(token_ids))(*token_ids))  # hash_prefix's bytes, by a compiled Struct


def hash_prefix(token_ids: Seq[int], block_size: int, max_tokens: int | None = None) -> list[int]:
    """Names of the full blocks in `token_ids[:max_tokens]`, in order.

    Linear in the tokens hashed: the ids are converted to bytes once, then each block is one digest
    (the gateway's router bounds `max_tokens`, since it runs on the event loop)."""
    limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
    num_blocks = max(limit, 0) // block_size
    if num_blocks == 0:
        return []
    data = np.asarray(token_ids[: num_blocks * block_size], dtype=np.int64).tobytes()
    step = block_size * 8  # bytes per block
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(data), step):
        parent = _chain(parent, data[start : start + step])
        hashes.append(parent)
    return hashes
