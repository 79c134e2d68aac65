"""One incoming transfer on a KVReceiver: its reservation, what has arrived, and how a KVLayer's
frames are written into the pool.

    KVLayer{layer l, first f, num_blocks n, frame_pages [2, 3]}  [frame 0][frame 1]
        frame 0 = pages f, f+1 of the transfer  ->  kv[l, dst[f]], kv[l, dst[f+1]]
        frame 1 = pages f+2 .. f+4              ->  kv[l, dst[f+2]] .. kv[l, dst[f+4]]
    A frame whose destination pages are one run (CPU pool) is received straight into the pool;
    any other goes through a scratch buffer and one scatter.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import numpy as np
import zmq

from kvtransfer import wire
from kvtransfer.frames import PagePool, run_breaks
from kvtransfer.layout import KVLayout, layout_diff, mapping_error
from kvtransfer.results import TransferCode


def refuse_begin(b: wire.Begin, layout: KVLayout, pool_blocks: int) -> tuple[TransferCode, str] | None:
    """Why a KVTransferBegin must be refused on its own merits (code, message), or None."""
    n, bs = b.num_blocks, layout.block_size
    unmappable = mapping_error(b.layout, layout)
    if unmappable is not None:
        return TransferCode.MISMATCH, "KV layouts cannot be mapped: " + unmappable
    problems = layout_diff(b.layout, layout, "sender", "receiver")
    if problems:
        return TransferCode.MISMATCH, "KV layout mismatch: " + "; ".join(problems)
    if not b.request_id or n == 0 or not (n - 1) * bs < b.num_tokens <= n * bs:
        return TransferCode.PROTOCOL, f"bad transfer header: request {b.request_id!r}, {n} blocks, {b.num_tokens} tokens"
    if n > pool_blocks:
        return TransferCode.NO_SPACE, f"{n} blocks requested, the receiver's pool has {pool_blocks}"
    return None


class Phase(enum.Enum):
    RESERVING = "waiting for free blocks"
    RECEIVING = "receiving"


@dataclass(eq=False)
class Inbound:
    """State of one transfer on the receiver's I/O thread."""

    ident: bytes  # the sender's ZeroMQ routing id
    request_id: str
    num_blocks: int
    num_tokens: int
    meta: bytes
    traceparent: str
    window: int  # credit granted to the sender, bytes
    begin_at: float  # monotonic, when KVTransferBegin arrived
    phase: Phase = Phase.RESERVING
    ids: np.ndarray | None = None  # (num_blocks,) int64 reserved block ids
    breaks: np.ndarray | None = None
    got: np.ndarray | None = None  # (num_layers, num_blocks) bool: pages written
    pages_left: int = 0
    bytes: int = 0
    t_first_ns: int = 0  # perf_counter_ns at the first KV frame
    t_last_ns: int = 0  # ... after the last frame was written
    last_heard: float = 0.0
    last_sent: float = 0.0

    def __post_init__(self) -> None:
        self.last_heard = self.last_sent = self.begin_at

    def reserved(self, ids: list[int], num_layers: int) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.breaks = run_breaks(ids)
        self.got = np.zeros((num_layers, self.num_blocks), dtype=bool)
        self.pages_left = num_layers * self.num_blocks
        self.phase = Phase.RECEIVING
        self.last_sent = time.monotonic()

    def progress(self, num_layers: int) -> str:
        total = num_layers * self.num_blocks
        return f"{total - self.pages_left} of {total} pages" if self.phase is Phase.RECEIVING else "no pages"

    def check_layer(self, h: wire.Layer, num_layers: int, page_bytes: int) -> str | None:
        """Why this KVLayer header cannot be accepted, or None."""
        if self.phase is not Phase.RECEIVING:
            return "KV sent before KVReady"
        assert self.got is not None
        first, n, frames = h.first_block, h.num_blocks, list(h.frame_pages)
        if h.layer >= num_layers or n == 0 or first + n > self.num_blocks:
            return f"pages [{first}, {first + n}) of layer {h.layer} are outside {num_layers} x {self.num_blocks}"
        if h.bytes_per_block != page_bytes:
            return f"bytes_per_block: sender {h.bytes_per_block}, receiver {page_bytes}"
        if sum(frames) != n or min(frames, default=0) <= 0:
            return f"frame_pages {frames} do not cover {n} pages"
        if self.got[h.layer, first : first + n].any():
            return f"pages of layer {h.layer} sent twice"
        return None

    def write_layer(self, sock: zmq.Socket, h: wire.Layer, pool: PagePool) -> str | None:
        """Receive the frames that follow header `h` on `sock` into the pool; None on success, else
        why not (the caller drains what is left and fails the transfer: these pages are reserved to
        it, so a partial write harms nobody)."""
        assert self.ids is not None and self.breaks is not None and self.got is not None
        first, n, frames = h.first_block, h.num_blocks, list(h.frame_pages)
        ids, breaks = self.ids[first : first + n], self.breaks[first : first + n]
        targets = pool.write_targets(h.layer, ids, breaks, frames)
        if not self.t_first_ns:
            self.t_first_ns = time.perf_counter_ns()
        for i, target in enumerate(targets):
            if not sock.rcvmore:
                return f"KVLayer announced {len(frames)} frames, {i} arrived"
            size = sock.recv_into(target.data)  # one copy: ZeroMQ's message -> the page(s)
            if size != len(target):
                return f"frame {i} of layer {h.layer} has {size} bytes, expected {len(target)}"
        if sock.rcvmore:
            return f"KVLayer announced {len(frames)} frames, more arrived"
        pool.commit(h.layer, ids, breaks, frames)
        if h.HasField("meta"):
            self.meta = h.meta
        self.got[h.layer, first : first + n] = True
        self.pages_left -= n
        self.bytes += n * h.bytes_per_block
        self.t_last_ns = time.perf_counter_ns()
        return None
