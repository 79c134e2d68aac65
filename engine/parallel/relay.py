"""KV pages between a tensor-parallel worker's ranks and the KV transfer, relayed by rank 0.

Each rank's pool holds only its KV heads; the KV transfer (kvtransfer/) moves whole pages, all heads.
Rank 0 keeps a small staging pool of whole pages and moves pages between it and the ranks' pools:

    staging (rank 0): (L, S, 2, bs, Hk, D)          all Hk heads, S blocks (`kv_relay_blocks`)
    pool of rank r:   (L, N, 2, bs, Hk/tp, D)       heads [kv_head_start(r), + Hk/tp) (one, replicated,
                                                    when Hk < tp)

    gather(pool ids -> staging ids)    prefill side: every rank sends its heads of the pages, rank 0
                                       writes them into staging; the sender ships the staging pages. Layer
                                       by layer inside the prompt's last forward (`gather_layer`, announced
                                       with the step), or all layers after it (`gather_pages`, a command)
    scatter(staging ids -> pool ids)   decode side, after the receiver wrote the staging pages: rank 0
                                       sends each rank its heads, each writes them into its pool

Both are collectives on the group's command channel (a command + one gather/scatter). Only the
engine thread of rank 0 calls them, as it calls forwards. Staging blocks are handed out by
`KVStaging.alloc` (None when full: the caller waits) and given back by `free`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.parallel.group import Op, TPGroup
from engine.parallel.shard import kv_head_start


class KVStaging:
    """Rank 0's whole-page staging pool and its free list (engine thread only)."""

    def __init__(self, num_blocks: int, local_kv: Tensor, num_kv_heads: int) -> None:
        layers, _, two, bs, _, d = local_kv.shape
        self.kv = torch.zeros((layers, num_blocks, two, bs, num_kv_heads, d), dtype=local_kv.dtype,
                              device=local_kv.device)  # (L, S, 2, bs, Hk, D)
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        self._free.extend(ids)
        assert len(self._free) <= self.num_blocks, "a staging block was freed twice"


def _heads(num_kv_heads: int, size: int, rank: int, local: int) -> slice:
    start = kv_head_start(num_kv_heads, size, rank)
    return slice(start, start + local)


def gather_pages(group: TPGroup, kv: Tensor, ids: Tensor, num_kv_heads: int, staging: Tensor | None,
                 staging_ids: Tensor | None) -> None:
    """Every rank: its heads of pages `ids` of `kv` -> rank 0's `staging[:, staging_ids]` (rank 0 only
    passes staging). Rank 0 sends the command first (`send_gather`)."""
    pages = kv[:, ids].contiguous()  # (L, n, 2, bs, Hk_local, D)
    parts = group.gather(pages.view(torch.uint8))  # as bytes: gloo has no float8
    if parts is None:
        return
    assert staging is not None and staging_ids is not None
    local = kv.shape[4]
    for r, part in enumerate(parts):
        staging[:, staging_ids, :, :, _heads(num_kv_heads, group.size, r, local)] = part.view(kv.dtype)


def gather_layer(group: TPGroup, kv: Tensor, layer: int, ids: Tensor, num_kv_heads: int, staging: Tensor | None,
                 staging_ids: Tensor | None) -> None:
    """`gather_pages` of one layer, inside a forward (every rank, after layer `layer`; no command: the
    step that announced `ids` runs it): rank 0's `staging[layer, staging_ids]` gets every rank's heads."""
    pages = kv[layer, ids].contiguous()  # (n, 2, bs, Hk_local, D)
    parts = group.gather(pages.view(torch.uint8))
    if parts is None:
        return
    assert staging is not None and staging_ids is not None
    local = kv.shape[4]
    for r, part in enumerate(parts):
        staging[layer, staging_ids, :, :, _heads(num_kv_heads, group.size, r, local)] = part.view(kv.dtype)


def scatter_pages(group: TPGroup, kv: Tensor, ids: Tensor, num_kv_heads: int, staging: Tensor | None,
                  staging_ids: Tensor | None) -> None:
    """Rank 0's `staging[:, staging_ids]` -> every rank's heads of pages `ids` of its `kv`."""
    local = kv.shape[4]
    parts = None
    if staging is not None:
        assert staging_ids is not None
        whole = staging[:, staging_ids]  # (L, n, 2, bs, Hk, D)
        parts = [whole[:, :, :, :, _heads(num_kv_heads, group.size, r, local)].contiguous().view(torch.uint8)
                 for r in range(group.size)]
    out = torch.empty((kv.shape[0], len(ids), *kv.shape[2:]), dtype=kv.dtype, device=kv.device)
    group.scatter(out.view(torch.uint8), parts)  # as bytes: gloo has no float8
    kv[:, ids] = out


def send_command(group: TPGroup, op: Op, ids: list[int]) -> Tensor:
    """Rank 0: announce a GATHER_KV / SCATTER_KV of pool pages `ids`; returns them as a tensor."""
    t = torch.tensor(ids, dtype=torch.int64)
    group.send(op, [len(ids)], t)
    return t.to(group.device)
