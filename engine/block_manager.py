"""The paged KV cache's bookkeeping: block ids, reference counts and the prefix cache.

The pool itself is one tensor per engine (see `engine.kv_cache`); this module only decides which
block ids a sequence owns. A sequence's *block table* maps its token positions to pages:

    token position p  ->  block_table[p // block_size], offset p % block_size

    seq A (tokens 0..37, block_size 16)     pool (num_blocks pages)
    block_table = [7, 2, 9]                  +----+----+----+----+----+----+----+----+----+----+
      tokens  0..15 -> page 7                | 0  | 1  | 2A | 3  | 4  | 5  | 6  | 7A | 8  | 9A |
      tokens 16..31 -> page 2                +----+----+----+----+----+----+----+----+----+----+
      tokens 32..37 -> page 9 (6 of 16 used)
    slot of token p = block_table[p // 16] * 16 + p % 16    (the "slot mapping" used for writes)

Prefix caching: a *full* block is named by `hash(parent_hash, its block_size token ids)`, so equal
hashes mean equal prefixes. When a sequence frees its blocks, named blocks keep their KV and stay
findable until the pool hands them out again. Free blocks form one LRU queue: allocation takes the
least recently freed block first and erases its name (eviction). A request's cached prefix costs no
compute: the scheduler sets `num_computed_tokens` past it.

Forks (parallel sampling): `fork` gives a sibling the same block table, one more reference each.
A shared *full* block is only ever read. A shared *partial* block is copied on write: when a sequence
is given new tokens to compute and the block they start in is partial and referenced by another
sequence, `allocate_slots` gives it a fresh block in that place and queues (source, destination) for
the model runner to copy the page before the forward (`take_copies`):

    parent  [7, 2, 9*]   tokens 0..37, block 9 holds 6 of 16      * ref_count 2 (parent + sibling)
    sibling [7, 2, 9*]
    sibling computes token 38:  sibling [7, 2, 4], copy 9 -> 4 first; block 9's ref_count back to 1,
    so the parent writes into 9 in place.

Ownership: a block with ref_count > 0 belongs to the sequences that reference it and is never
handed out; a block with ref_count 0 is in the free queue (named or not). Running out of blocks is
an answer (`allocate_slots` returns False), not an exception.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

from engine.prefix_hash import hash_block, hash_prefix


class HasBlocks(Protocol):
    """What the block manager needs of a sequence."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    block_hashes: list[int]
    table_version: int  # bumped here whenever block_table changes


@dataclass
class _Block:
    ref_count: int = 0
    hash: int | None = None


class BlockManager:
    """Allocates fixed-size KV pages to sequences, with reference counts and a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found
        self._copies: list[tuple[int, int]] = []  # copy-on-write (source, destination) pages not yet copied

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (named ones included: they are evictable)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def lookup(self, token_ids: Seq[int], max_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix of full blocks within `token_ids[:max_tokens]`.

        Takes no reference: pass the result to `allocate_slots` in the same scheduling step.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for h in hash_prefix(token_ids, self.block_size, max_tokens):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        self.prefix_queries += max(0, min(max_tokens, len(token_ids)))
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def cached_prefix_tokens(self, hashes: Seq[int]) -> int:
        """How many leading tokens of a prompt (given its block hashes) this cache holds."""
        n = 0
        for h in hashes:
            if h not in self._cached:
                break
            n += 1
        return n * self.block_size

    # ------------------------------------------------------------- allocation
    def decode_fits(self, block_table: list[int], num_computed_tokens: int) -> bool:
        """Whether one more token at position `num_computed_tokens` goes into a block the sequence
        already owns alone (a decode inside its last, partial block: `allocate_slots` would do nothing)."""
        offset = num_computed_tokens % self.block_size
        return offset != 0 and self._blocks[block_table[num_computed_tokens // self.block_size]].ref_count == 1

    def allocate_slots(self, seq: HasBlocks, num_new_tokens: int, cached: Seq[int] = ()) -> bool:
        """Make `seq.block_table` cover `num_computed_tokens + len(cached)*block_size + num_new_tokens`.

        `cached` (from `lookup`, only for a sequence with an empty block table) is prepended with a
        reference each; the caller then advances `num_computed_tokens` past it. Returns False and
        changes nothing when the pool cannot supply the blocks.
        """
        if not cached:  # the common case (a decode step inside its last block): nothing to do
            computed, table, bs = seq.num_computed_tokens, seq.block_table, self.block_size
            if -(-(computed + num_new_tokens) // bs) <= len(table) and (
                num_new_tokens == 0 or computed % bs == 0 or self._blocks[table[computed // bs]].ref_count == 1
            ):
                return True
            if num_new_tokens == 1 and computed == len(table) * bs and self._free:  # a decode opening a block
                table.append(self._take_free())
                seq.table_version += 1
                return True
        elif seq.block_table:
            raise ValueError("cached blocks can only start an empty block table")
        total = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(seq.block_table) - len(cached)
        revived = sum(1 for b in cached if self._blocks[b].ref_count == 0)
        shared = self._shared_partial(seq) if num_new_tokens > 0 else None
        if max(needed, 0) + revived + (shared is not None) > len(self._free):
            return False
        if shared is not None or cached or needed > 0:
            seq.table_version += 1
        if shared is not None:  # copy on write: this sequence gets its own copy of the partial block
            old = seq.block_table[shared]
            new = self._take_free()
            self._blocks[old].ref_count -= 1
            seq.block_table[shared] = new
            self._copies.append((old, new))
        for block_id in cached:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)  # type: ignore[arg-type]
        for _ in range(needed):
            seq.block_table.append(self._take_free())
        return True

    def _shared_partial(self, seq: HasBlocks) -> int | None:
        """The index in seq's table of the partial block its next token goes into, if another
        sequence references it too (a fork); else None."""
        i, offset = divmod(seq.num_computed_tokens, self.block_size)
        if offset == 0 or i >= len(seq.block_table):
            return None
        return i if self._blocks[seq.block_table[i]].ref_count > 1 else None

    def fork(self, parent: HasBlocks, child: HasBlocks) -> None:
        """Give `child` (with an empty table) `parent`'s blocks, one more reference each."""
        if child.block_table:
            raise ValueError("a fork starts from an empty block table")
        for block_id in parent.block_table:
            self._blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.table_version += 1

    def adopt(self, seq: HasBlocks, block_ids: list[int]) -> None:
        """Make `block_ids` (from `allocate_blocks`, their KV written) `seq`'s table, which was empty."""
        if seq.block_table:
            raise ValueError("only an empty block table adopts blocks")
        seq.block_table = block_ids
        seq.table_version += 1

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) pages copy-on-write queued since the last call; the caller must
        copy them before any forward writes to the destinations."""
        copies, self._copies = self._copies, []
        return copies

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        assert block.ref_count == 0, f"free block {block_id} has references"
        if block.hash is not None:  # evict its name: the KV is about to be overwritten
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def allocate_blocks(self, num_blocks: int) -> list[int] | None:
        """Blocks outside any sequence (KV arriving from another worker); None when short."""
        if num_blocks > len(self._free):
            return None
        return [self._take_free() for _ in range(num_blocks)]

    def cache_full_blocks(self, seq: HasBlocks) -> None:
        """Name every block of `seq` that is full of computed tokens and not yet named."""
        if not self.enable_prefix_caching:
            return
        bs, hashes, table, cached = self.block_size, seq.block_hashes, seq.block_table, self._cached
        num_full = min(seq.num_computed_tokens // bs, len(table))
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            parent = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
            block = self._blocks[table[i]]
            if block.hash is None and parent not in cached:
                block.hash = parent
                cached[parent] = table[i]

    def free(self, seq: HasBlocks) -> None:
        """Drop `seq`'s references; its tail blocks are freed first so they are evicted first."""
        self.free_blocks(reversed(seq.block_table))
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.table_version += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            block = self._blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def truncate(self, seq: HasBlocks, num_tokens: int) -> None:
        """Shrink `seq` to its first `num_tokens` tokens' blocks (speculative rollback)."""
        keep = -(-num_tokens // self.block_size)
        tail = seq.block_table[keep:]
        del seq.block_table[keep:]
        seq.table_version += 1
        del seq.block_hashes[num_tokens // self.block_size :]
        self.free_blocks(list(reversed(tail)))

    def reset_prefix_cache(self) -> None:
        for h, block_id in list(self._cached.items()):
            if self._blocks[block_id].ref_count == 0:
                self._blocks[block_id].hash = None
                del self._cached[h]
