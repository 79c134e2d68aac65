"""One engine step as the tensors rank 0 broadcasts to its followers (the STEP command, group.py).

    header sizes: [T, B, max_blocks, R, C, max_query_len, G]
    payload (int64): input_ids (T) | positions (T) | slot_mapping (T) | block_tables (B * max_blocks) |
                     query_start_loc (B + 1) | seq_lens (B) | logit rows (R) | copy src (C) | copy dst (C) |
                     relay pages (G)

Everything a follower needs to run the same forward as rank 0 on its shard: the batch's token ids and
positions, where their KV goes and lives (the same block ids on every rank), which rows' logits are
gathered, the copy-on-write pages to copy first, and the pool pages whose heads every rank sends to rank 0
after each layer (a TP prefill worker's KV relay, overlapping the forward: relay.gather_layer). Nothing
about sampling: only rank 0 samples.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from engine.parallel.group import Command, Op, TPGroup


class StepTensors(NamedTuple):
    input_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    slot_mapping: Tensor  # (T,) int64
    block_tables: Tensor  # (B, max_blocks) int32
    query_start_loc: Tensor  # (B + 1,) int32
    seq_lens: Tensor  # (B,) int32
    max_query_len: int
    rows: Tensor  # (R,) int64: rows of the hidden states whose logits are computed
    copies: Tensor | None  # (2, C) int64: copy-on-write pages, source then destination
    relay: Tensor | None = None  # (G,) int64: pool pages gathered to rank 0 after each layer


def send_step(group: TPGroup, s: StepTensors) -> None:
    """Rank 0: broadcast `s` (one header, one payload)."""
    b, max_blocks = s.block_tables.shape
    parts = [s.input_ids, s.positions, s.slot_mapping, s.block_tables.reshape(-1), s.query_start_loc,
             s.seq_lens, s.rows] + ([s.copies[0], s.copies[1]] if s.copies is not None else [])
    parts += [s.relay] if s.relay is not None else []
    sizes = [len(s.input_ids), b, max_blocks, len(s.rows), s.copies.shape[1] if s.copies is not None else 0,
             s.max_query_len, len(s.relay) if s.relay is not None else 0]
    group.send(Op.STEP, sizes, torch.cat([p.to(torch.int64) for p in parts]))


def unpack_step(cmd: Command) -> StepTensors:
    """Followers: the StepTensors of a STEP command."""
    t, b, max_blocks, r, c, max_query_len, g = cmd.sizes
    ids, pos, slots, tables, qsl, seq_lens, rows, src, dst, relay = cmd.payload.split(
        [t, t, t, b * max_blocks, b + 1, b, r, c, c, g])
    return StepTensors(ids, pos, slots, tables.view(b, max_blocks).to(torch.int32), qsl.to(torch.int32),
                       seq_lens.to(torch.int32), max_query_len, rows, torch.stack([src, dst]) if c else None,
                       relay if g else None)
