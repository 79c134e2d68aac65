"""A step's forward inputs, built with array operations over the batch; block-table rows kept from step to step.

Per sequence a step reads only its new token ids and its `num_computed_tokens` in Python. Its
block-table row is copied from its list only when it joins the batch or its `table_version` moved (a
new block, a copy on write, a rollback); positions, slots and logit rows are computed over the batch:

    seq b, n_b rows from start_b:  positions  start_b .. start_b + n_b - 1
                                   slot(p) =  tables[b, p // bs] * bs + p % bs

    tables  (capacity, width) int32   row b: the block table of the last step's sequence b, 0-padded
    lens    (capacity,)       int64   row b: how many of its entries are blocks

The host work is numpy (a small numpy operation costs a fraction of a torch one); each step gets its
own tensors, so a step may still be running (engine.overlap) while the next one is prepared.
"""

from __future__ import annotations

import itertools
import operator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.model_runner import StepInput


_ROW_BY_ROW = 8  # block-table rows that changed up to which each is copied on its own; more: `_write_rows`


class StepArrays(NamedTuple):
    """One step's forward inputs on the host: T new tokens of B sequences, R logit rows."""

    input_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    slot_mapping: Tensor  # (T,) int64
    block_tables: Tensor  # (B, max_blocks) int32
    query_start_loc: Tensor  # (B + 1,) int32: sequence b owns rows [qsl[b], qsl[b + 1])
    seq_lens: Tensor  # (B,) int32: context length after this step
    max_query_len: int
    logits_idx: Tensor  # (R,) int64: rows of the flat batch whose logits are sampled, in sampling order


class InputBatch:
    """Builds `StepArrays` for each step; keeps the last step's block-table rows. One caller thread."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._seqs: list[Sequence] = []  # the last step's sequences: row b is _seqs[b]'s
        self._versions: list[int] = []  # the table_version row b was copied at (-1: not yet)
        self._tables = np.zeros((0, 1), dtype=np.int32)
        self._lens = np.zeros(0, dtype=np.int64)

    def prepare(self, step: StepInput) -> StepArrays:
        """The inputs of `step`: each sequence's new tokens, then its drafts (speculative decoding)."""
        seqs, counts, drafts = step.seqs, step.num_new_tokens, step.spec_tokens
        b = len(seqs)
        starts = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)  # (B,)
        if drafts is None and max(counts) == 1:  # a decode step: one row per sequence
            ids = [s.token_ids[s.num_computed_tokens] for s in seqs]
            n = np.ones(b, dtype=np.int64)  # (B,)
            owner = np.arange(b)  # (T,)
            positions = starts  # (T,)
        else:
            ids = []
            rows: list[int] = []
            for i, (seq, new) in enumerate(zip(seqs, counts, strict=True)):
                start = seq.num_computed_tokens
                draft = drafts[i] if drafts is not None else []
                ids.extend(seq.token_ids[start : start + new])
                ids.extend(draft)  # drafts are verified right after the new tokens
                rows.append(new + len(draft))
            n = np.array(rows, dtype=np.int64)  # (B,)
            owner = np.repeat(np.arange(b), n)  # (T,)
            first_row = np.cumsum(n) - n  # (B,)
            positions = starts[owner] + np.arange(len(ids)) - first_row[owner]  # (T,)
        tables = self._block_tables(seqs)  # (B, max_blocks)
        bs = self.block_size
        slots = tables[owner, positions // bs].astype(np.int64) * bs + positions % bs  # (T,)
        qsl = np.zeros(b + 1, dtype=np.int32)
        qsl[1:] = np.cumsum(n)
        return StepArrays(
            input_ids=torch.from_numpy(np.array(ids, dtype=np.int64)),
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slots),
            block_tables=torch.from_numpy(tables),
            query_start_loc=torch.from_numpy(qsl),
            seq_lens=torch.from_numpy((starts + n).astype(np.int32)),
            max_query_len=int(n.max()),
            logits_idx=torch.from_numpy(_logit_rows(step, qsl)),
        )

    # ------------------------------------------------------------ block tables
    def _block_tables(self, seqs: list[Sequence]) -> np.ndarray:
        """(B, max_blocks) int32, a copy of the rows of `seqs` (rows rewritten only where they changed)."""
        if len(seqs) != len(self._seqs) or not all(map(operator.is_, seqs, self._seqs)):
            self._rearrange(seqs)
        versions = [s.table_version for s in seqs]
        if versions != self._versions:
            changed = [b for b, (now, was) in enumerate(zip(versions, self._versions, strict=True)) if now != was]
            if len(changed) > _ROW_BY_ROW:
                self._write_rows(changed, [seqs[b].block_table for b in changed])
            else:
                for b in changed:
                    self._write(b, seqs[b].block_table)
            self._versions = versions
        b = len(seqs)
        return self._tables[:b, : int(self._lens[:b].max())].copy()

    def _rearrange(self, seqs: list[Sequence]) -> None:
        """Rows for `seqs` in their order: a sequence of the last step keeps its row's contents."""
        where = {id(s): b for b, s in enumerate(self._seqs)}
        src = np.array([where.get(id(s), -1) for s in seqs], dtype=np.int64)  # (B,) last step's row, or -1
        kept = np.flatnonzero(src >= 0)
        tables = np.zeros((max(len(seqs), len(self._tables)), self._tables.shape[1]), dtype=np.int32)
        lens = np.zeros(len(tables), dtype=np.int64)
        tables[kept] = self._tables[src[kept]]
        lens[kept] = self._lens[src[kept]]
        self._tables, self._lens = tables, lens
        self._versions = [self._versions[r] if r >= 0 else -1 for r in src.tolist()]
        self._seqs = list(seqs)

    def _write(self, b: int, table: list[int]) -> None:
        n = len(table)
        self._widen(n)
        row = self._tables[b]
        row[:n] = table
        row[n:] = 0
        self._lens[b] = n

    def _write_rows(self, rows: list[int], tables: list[list[int]]) -> None:
        """`_write` of many rows in a few array operations (a steady batch's sequences all open a new
        block at the same step)."""
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))  # (n,)
        self._widen(int(lens.max()))
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
        idx = np.array(rows, dtype=np.int64)  # (n,)
        self._tables[idx] = 0
        starts = np.cumsum(lens) - lens  # (n,): where each table begins in flat
        self._tables[np.repeat(idx, lens), np.arange(len(flat)) - np.repeat(starts, lens)] = flat
        self._lens[idx] = lens

    def _widen(self, n: int) -> None:
        if n > self._tables.shape[1]:  # wider: double, so a growing context copies the array rarely
            wider = np.zeros((len(self._tables), max(n, 2 * self._tables.shape[1])), dtype=np.int32)
            wider[:, : self._tables.shape[1]] = self._tables
            self._tables = wider


def _logit_rows(step: StepInput, qsl: np.ndarray) -> np.ndarray:
    """(R,) int64: per sampling sequence its last row (once per choice it forks), or its last new
    token's and its drafts' rows."""
    ends = qsl[1:].astype(np.int64) - 1  # (B,): each sequence's last row
    # a list, not a generator: ~2x cheaper over a steady batch, where nothing forks and all is read anyway
    if all(step.sample) and step.spec_tokens is None and not any([s.pending_forks for s in step.seqs]):
        return ends
    rows: list[int] = []
    for i, (seq, sample) in enumerate(zip(step.seqs, step.sample, strict=True)):
        if not sample:
            continue
        last = int(ends[i])
        draft = step.num_draft(i)
        if draft:
            rows.extend(range(last - draft, last + 1))
        else:
            rows.extend([last] * seq.num_sample_rows)
    return np.array(rows, dtype=np.int64)
