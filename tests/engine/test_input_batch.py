"""The persistent input batch (engine.input_batch) builds exactly what a from-scratch build of each step
gives, while sequences decode across block boundaries, join, leave, reorder, fork (copy on write), roll
back (speculative truncation), run prefill chunks and verify drafts. Tiny pools, exact values."""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.input_batch import InputBatch
from engine.model_runner import StepInput
from engine.sampling.params import SamplingParams
from engine.sequence import Sequence

BS = 4


def reference(step: StepInput) -> dict[str, list]:
    """Each input of `step` built from the sequences' lists alone."""
    ids, positions, slots, qsl, lens, rows = [], [], [], [0], [], []
    width = max(len(s.block_table) for s in step.seqs)
    for i, (seq, n) in enumerate(zip(step.seqs, step.num_new_tokens, strict=True)):
        drafts = step.spec_tokens[i] if step.spec_tokens is not None else []
        start = seq.num_computed_tokens
        ids += seq.token_ids[start : start + n] + drafts
        for p in range(start, start + n + len(drafts)):
            positions.append(p)
            slots.append(seq.block_table[p // BS] * BS + p % BS)
        qsl.append(qsl[-1] + n + len(drafts))
        lens.append(start + n + len(drafts))
        if step.sample[i]:
            last = qsl[-1] - 1
            rows += list(range(last - len(drafts), last + 1)) if drafts else [last] * seq.num_sample_rows
    tables = [s.block_table + [0] * (width - len(s.block_table)) for s in step.seqs]
    return {"input_ids": ids, "positions": positions, "slot_mapping": slots, "block_tables": tables,
            "query_start_loc": qsl, "seq_lens": lens, "logits_idx": rows}


def check(batch: InputBatch, step: StepInput) -> None:
    got = batch.prepare(step)
    for name, want in reference(step).items():
        assert getattr(got, name).tolist() == want, name
    assert got.max_query_len == max(got.query_start_loc.diff().tolist())
    assert got.block_tables.dtype == torch.int32 and got.query_start_loc.dtype == torch.int32


def seq(name: str, prompt_len: int, n: int = 1) -> Sequence:
    return Sequence(name, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=100, n=n))


def run(bm: BlockManager, seqs: list[Sequence], counts: list[int] | None = None,
        drafts: list[list[int]] | None = None) -> StepInput:
    """Schedule one step of `seqs` (all uncomputed tokens unless `counts`), as the scheduler does."""
    counts = counts or [s.num_uncomputed_tokens for s in seqs]
    for s, n, d in zip(seqs, counts, drafts or [[]] * len(seqs), strict=True):
        assert bm.allocate_slots(s, n + len(d))
    sample = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(seqs, counts, strict=True)]
    return StepInput(seqs, counts, sample, spec_tokens=drafts, copies=bm.take_copies())


def advance(step: StepInput, token: int = 99) -> None:
    """The step ran: counters move, each sampling sequence appends a token."""
    for s, n, sampled in zip(step.seqs, step.num_new_tokens, step.sample, strict=True):
        s.num_computed_tokens += n
        if sampled:
            s.token_ids.append(token)


def test_rows_follow_every_change_of_the_batch() -> None:
    bm, batch = BlockManager(64, BS), InputBatch(BS)
    a, b, c = seq("a", 6), seq("b", 3), seq("c", 9)
    step = run(bm, [a, b])  # two prefills
    check(batch, step)
    advance(step)
    for _ in range(6):  # decodes, crossing block boundaries at different steps
        step = run(bm, [a, b])
        check(batch, step)
        advance(step)
    step = run(bm, [a, b, c], [1, 1, 5])  # c joins with a chunk
    check(batch, step)
    advance(step)
    step = run(bm, [c, a], [4, 1])  # b leaves; the others reorder; c's last chunk
    check(batch, step)
    advance(step)
    bm.free(a)  # a finishes; a new sequence may get its blocks
    d = seq("d", 13)
    step = run(bm, [c, d])
    check(batch, step)
    advance(step)
    for _ in range(5):
        step = run(bm, [c, d])
        check(batch, step)
        advance(step)


def test_copy_on_write_and_rollback_rewrite_rows() -> None:
    bm, batch = BlockManager(32, BS), InputBatch(BS)
    parent = seq("p", 6, n=2)
    step = run(bm, [parent])
    check(batch, step)  # the forking sequence samples its last row twice
    advance(step)
    child = Sequence("p", parent.prompt_token_ids, parent.params, index=1,
                     num_computed_tokens=parent.num_computed_tokens)
    child.token_ids = list(parent.token_ids)
    parent.pending_forks = 0
    bm.fork(parent, child)
    step = run(bm, [parent, child])  # the child copies the shared partial block before writing
    assert step.copies
    check(batch, step)
    advance(step)
    step = run(bm, [parent, child], drafts=[[5, 6, 7], []])  # the parent verifies drafts
    check(batch, step)
    advance(step)
    bm.truncate(parent, parent.num_computed_tokens)  # drafts rejected: their block goes back
    step = run(bm, [parent, child])
    check(batch, step)
    advance(step)
    for _ in range(6):
        step = run(bm, [parent, child])
        check(batch, step)
        advance(step)


def test_each_step_owns_its_tables() -> None:
    """A step may still run (overlap) while the next is prepared: its tensors are not rewritten."""
    bm, batch = BlockManager(16, BS), InputBatch(BS)
    a = seq("a", 3)
    step = run(bm, [a])
    first = batch.prepare(step).block_tables.clone()
    held = batch.prepare(step).block_tables
    advance(step)
    for _ in range(6):
        step = run(bm, [a])
        batch.prepare(step)
        advance(step)
    assert torch.equal(held, first)


def test_many_rows_changing_at_once_are_rewritten_in_bulk() -> None:
    """More rows than `_ROW_BY_ROW` change in one step (a steady batch opening new blocks together, some
    forking and rolling back): the bulk write, its tables of different lengths and a wider array."""
    bm, batch = BlockManager(256, BS), InputBatch(BS)
    seqs = [seq(f"s{i}", 4 * (i % 3) + 4) for i in range(12)]  # prompts of 4, 8, 12: whole blocks
    step = run(bm, seqs)
    check(batch, step)
    advance(step)
    for _ in range(12):  # every sequence opens a new block at the same steps; the tables outgrow the array
        step = run(bm, seqs)
        check(batch, step)
        advance(step)
    for i, s in enumerate(seqs):  # all roll back, by one block or two (stale entries to clear), then decode on
        back = BS * (1 + i % 2)
        bm.truncate(s, s.num_computed_tokens - back)
        s.num_computed_tokens -= back
        del s.token_ids[s.num_computed_tokens + 1 :]
    for _ in range(5):
        step = run(bm, seqs)
        check(batch, step)
        advance(step)
