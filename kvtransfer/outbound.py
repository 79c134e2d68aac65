"""One outgoing transfer on a KVSender: what the engine has made ready, what is queued, in flight and
acknowledged. Lives on the sender's I/O thread only.

    layer l ready ──► queue += [(l, 0, c), (l, c, c), ...]   chunks of c pages (plan_chunks)
    credit allows ──► KVLayer sent: inflight += bytes, chunks_left -= 1
    KVAck         ──► inflight -= bytes (and its staging buffers are reusable)
    chunks_left == 0 ──► WAIT_DONE ──► KVDone
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

import numpy as np
import zmq

from kvtransfer.handle import TransferHandle


class State(enum.Enum):
    WAIT_READY = "waiting for KVReady"
    STREAMING = "streaming layers"
    WAIT_DONE = "waiting for KVDone"


@dataclass(eq=False)
class Outbound:
    """One outgoing transfer; I/O thread only."""

    handle: TransferHandle
    sock: zmq.Socket
    ids: np.ndarray  # (num_blocks,) int64 source block ids
    breaks: np.ndarray  # run_breaks(ids)
    chunks: list[tuple[int, int]]  # (first, count) of every layer
    now: float
    state: State = State.WAIT_READY
    ready: set[int] = field(default_factory=set)  # layers the engine marked ready
    queue: collections.deque[tuple[int, int, int]] = field(default_factory=collections.deque)  # (layer, first, n)
    chunks_left: int = 0
    window: int = 0
    dst_breaks: np.ndarray | None = None
    staged: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)  # (layer, first) -> buffers
    inflight: int = 0  # bytes sent and not yet acknowledged
    sent: int = 0
    t_first_ns: int = 0  # perf_counter_ns when the first KV byte went to ZeroMQ
    last_heard: float = 0.0
    last_sent: float = 0.0
    last_engine: float = 0.0
    meta: bytes | None = None  # late meta (TransferHandle.finish), sent on the last chunk

    def __post_init__(self) -> None:
        self.last_heard = self.last_sent = self.last_engine = self.now
