"""One process's place in a tensor-parallel group: the collectives the model runs, and the command
channel rank 0 drives its followers with.

    rank 0 (the worker)                              ranks 1..N-1 (followers)
    --------------------                             ------------------------
    send(STEP, header, payload)   --broadcast-->     recv() -> the same forward on their shard
    model forward: all_reduce after o_proj / down_proj / the embedding, on every rank
    compute_logits: gather (N, Vp) from every rank --> (N, V) on rank 0 only
    send(GATHER_KV ids)           --broadcast-->     gather: each rank's heads of pages `ids`
    send(SCATTER_KV ids)          --broadcast-->     scatter: each rank receives its heads
    send(NOP) while idle (keep-alive), send(STOP) at close

A command is two broadcasts from rank 0: a fixed header (int64[HEADER]: op and sizes) and one flat int64
payload. Every collective runs under the process group's timeout (`init_group(timeout_s)`), so a
rank that stops answering fails the others' calls with an error rather than a hang (gloo also fails
them at once when a peer's connection closes). NCCL on CUDA (tensors on the rank's device), gloo on CPU.
"""

from __future__ import annotations

import datetime
import enum
import logging
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

HEADER = 9


class Op(enum.IntEnum):
    STEP = 1
    GATHER_KV = 2
    SCATTER_KV = 3
    NOP = 4
    STOP = 5


class Command(NamedTuple):
    op: Op
    sizes: list[int]  # HEADER - 1 integers, meaning per op
    payload: Tensor  # (sum of the op's payload sizes,) int64 on the group's device


class TPGroup:
    """Rank `rank` of `size` (the default process group, initialised by `init_group`)."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------- the model's collectives
    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum `x` over the ranks, in place; returns it."""
        dist.all_reduce(x)
        return x

    def all_reduce_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_last_dim(self, x: Tensor) -> Tensor | None:
        """(N, C) on every rank -> (N, size * C) on rank 0 (rank r's columns at [r*C, (r+1)*C)), None elsewhere."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def gather(self, x: Tensor) -> list[Tensor] | None:
        """Every rank's `x` (same shape on all) on rank 0, in rank order; None elsewhere."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        dist.gather(x, parts, dst=0)
        return parts

    def scatter(self, out: Tensor, parts: list[Tensor] | None) -> Tensor:
        """Rank r receives parts[r] (given on rank 0 only) into `out`."""
        dist.scatter(out, [p.contiguous() for p in parts] if parts is not None else None, src=0)
        return out

    # ------------------------------------------------------------------- the command channel
    def send(self, op: Op, sizes: list[int] | None = None, payload: Tensor | None = None) -> None:
        """Rank 0: broadcast one command (payload: a flat int64 tensor, or none)."""
        assert self.is_driver
        sizes = list(sizes or [])
        n = int(payload.numel()) if payload is not None else 0
        header = torch.tensor([int(op), n, *sizes, *[0] * (HEADER - 2 - len(sizes))], dtype=torch.int64)
        dist.broadcast(header.to(self.device), src=0)
        if n:
            assert payload is not None
            dist.broadcast(payload.to(self.device, torch.int64).contiguous(), src=0)

    def recv(self) -> Command:
        """Followers: the next command from rank 0 (blocks within the group's timeout)."""
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        op, n, *sizes = header.tolist()
        payload = torch.empty(n, dtype=torch.int64, device=self.device)
        if n:
            dist.broadcast(payload, src=0)
        return Command(Op(op), sizes, payload)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(rank: int, size: int, init_addr: str, timeout_s: float, device: torch.device) -> TPGroup:
    """Join the default process group at tcp://`init_addr` (rank 0 hosts the rendezvous store there) as
    rank `rank` of `size`, with `timeout_s` on the rendezvous and on every collective. Raises (a
    RuntimeError or DistStoreError naming the address) when the others do not join in time."""
    if device.type == "cuda":
        if device.index is None:  # "cuda": this node's GPU of the rank (rank 0 -> cuda:0)
            device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    logger.info("tensor parallel: rank %d of %d joining %s (%s, timeout %.0f s)", rank, size, init_addr,
                backend_for(device), timeout_s)
    dist.init_process_group(backend_for(device), init_method=f"tcp://{init_addr}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TPGroup(rank, size, device)


def destroy_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone; nothing left to tidy
            logger.debug("destroy_process_group failed", exc_info=True)
