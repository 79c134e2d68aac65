"""Block manager: exact block ids and counts on tiny pools."""

from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.prefix_hash import hash_block, hash_prefix


@dataclass
class Seq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    table_version: int = 0


def compute(bm: BlockManager, seq: Seq, n: int) -> None:
    assert bm.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def test_allocation_is_exact_and_frees_everything() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    s = Seq(list(range(10)))
    assert bm.allocate_slots(s, 10)
    assert s.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.allocate_slots(s, 2)  # 12 tokens: still 3 blocks
    assert s.block_table == [0, 1, 2]
    assert bm.allocate_slots(s, 3)  # 13 tokens: a 4th block
    assert s.block_table == [0, 1, 2, 3]
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_out_of_blocks_is_an_answer_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    s = Seq(list(range(12)))
    assert not bm.allocate_slots(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_reuses_three_blocks_and_counts_refs() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    prefix = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]  # 3 full blocks
    a = Seq(prefix + [100, 101])
    compute(bm, a, 14)
    assert len(a.block_hashes) == 3 and bm.num_cached_blocks == 3
    b = Seq(prefix + [200, 201, 202])
    hit = bm.lookup(b.token_ids, len(b.token_ids) - 1)
    assert hit == a.block_table[:3]
    assert bm.allocate_slots(b, 3, hit)
    assert b.block_table[:3] == a.block_table[:3]
    assert [bm.ref_count(x) for x in hit] == [2, 2, 2]
    bm.free(a)
    assert [bm.ref_count(x) for x in hit] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.num_cached_blocks == 3


def test_lookup_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = Seq(list(range(8)))
    compute(bm, a, 8)
    bm.free(a)
    # the same 8-token prompt may reuse only the first block: its last token must be computed
    assert len(bm.lookup(list(range(8)), 7)) == 1


def test_freed_cached_blocks_survive_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = Seq([1, 2, 3, 4]), Seq([9, 9, 8, 8])
    compute(bm, a, 4)
    compute(bm, b, 4)
    bm.free(a)  # a's blocks freed first: least recently used
    bm.free(b)
    assert bm.num_cached_blocks == 4
    c = Seq([7, 7])
    assert bm.allocate_slots(c, 2)  # takes a's tail block first (freed in reverse)
    assert c.block_table == [a_tail := 1] and a_tail == 1
    assert bm.lookup([1, 2, 3, 4], 4) == [0]  # a's first block still named, its second evicted
    assert bm.lookup([9, 9, 8, 8], 4) == [2, 3]


def test_reviving_a_cached_block_takes_it_out_of_the_free_queue() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = Seq([1, 2, 3, 4, 5])
    compute(bm, a, 5)
    bm.free(a)
    b = Seq([1, 2, 3, 4, 6])
    hit = bm.lookup(b.token_ids, 4)
    assert hit == [0, 1]
    assert bm.allocate_slots(b, 1, hit)
    assert bm.num_free_blocks == 0
    assert b.block_table == [0, 1, 2]


def test_truncate_frees_tail_blocks() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    s = Seq(list(range(16)))
    compute(bm, s, 16)
    bm.truncate(s, 9)
    assert s.block_table == [0, 1, 2] and len(s.block_hashes) == 2
    assert bm.num_free_blocks == 3


def test_hash_is_chained() -> None:
    h1 = hash_prefix([1, 2, 3, 4], 2)
    h2 = hash_prefix([9, 9, 3, 4], 2)
    assert h1[0] != h2[0] and h1[1] != h2[1]  # same second block, different parent
    assert hash_prefix([1, 2, 3, 4, 5], 2) == h1


def test_hash_prefix_names_blocks_as_hash_block_chains_them() -> None:
    ids = [(i * 7919) % 50_000 for i in range(100)]
    chained, parent = [], None
    for start in range(0, 96, 8):
        parent = hash_block(parent, ids[start : start + 8])
        chained.append(parent)
    assert hash_prefix(ids, 8) == chained
    assert hash_prefix(ids, 8, max_tokens=40) == chained[:5] and hash_prefix(ids, 8, max_tokens=7) == []


def test_a_fork_shares_every_block_and_copies_the_partial_one_on_first_write() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Seq(list(range(10)))  # blocks 0, 1 full; block 2 holds 2 of 4
    compute(bm, parent, 10)
    child = Seq(list(range(10)), num_computed_tokens=10)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table == [0, 1, 2]
    assert [bm.ref_count(b) for b in (0, 1, 2)] == [2, 2, 2] and bm.num_free_blocks == 5
    parent.token_ids.append(50)
    child.token_ids.append(60)
    assert bm.allocate_slots(child, 1)  # writes position 10, inside the shared partial block: copy it
    assert child.block_table == [0, 1, 3] and bm.take_copies() == [(2, 3)]
    assert [bm.ref_count(b) for b in (2, 3)] == [1, 1]
    assert bm.allocate_slots(parent, 1)  # the parent holds block 2 alone now: it writes in place
    assert parent.block_table == [0, 1, 2] and bm.take_copies() == []
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8


def test_forks_of_a_full_last_block_copy_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Seq(list(range(8)))
    compute(bm, parent, 8)
    child = Seq(list(range(8)), num_computed_tokens=8)
    bm.fork(parent, child)
    assert bm.allocate_slots(child, 1) and bm.allocate_slots(parent, 1)
    assert child.block_table == [0, 1, 2] and parent.block_table == [0, 1, 3] and bm.take_copies() == []


def test_copy_on_write_without_a_free_block_is_an_answer() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    parent = Seq(list(range(10)))
    compute(bm, parent, 10)  # all 3 blocks
    child = Seq(list(range(10)), num_computed_tokens=10)
    bm.fork(parent, child)
    assert not bm.allocate_slots(child, 1)
    assert child.block_table == [0, 1, 2] and bm.take_copies() == [] and bm.ref_count(2) == 2


def test_a_decode_opening_a_block_takes_the_oldest_free_one_and_evicts_its_name() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    old = Seq([5, 6])
    compute(bm, old, 2)  # block 0, named
    bm.free(old)  # the free queue: 1, then 0 (still named)
    s = Seq([1, 2, 3])
    compute(bm, s, 2)  # block 1
    assert bm.lookup([5, 6, 0], 2) == [0]
    version = s.table_version
    assert bm.allocate_slots(s, 1)  # a decode at a block boundary: one new block
    assert s.block_table == [1, 0] and s.table_version == version + 1
    assert bm.lookup([5, 6, 0], 2) == []  # its old name is gone: its KV is about to be overwritten
    s.num_computed_tokens = 4
    s.token_ids += [4, 5]
    assert not bm.allocate_slots(s, 1)  # no block left: an answer, and nothing changed
    assert s.block_table == [1, 0] and s.table_version == version + 1
