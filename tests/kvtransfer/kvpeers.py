"""Helpers of the kvtransfer tests: pools with known contents, a block allocator that counts, and the
entry points of peer processes (started with multiprocessing spawn; they talk to the test through
multiprocessing queues of plain dicts, the test's control channel, not a KV wire)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtransfer import CompletedTransfer, FailedTransfer, KVLayout, KVReceiver, KVSender

SHAPE = {"num_layers": 3, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}
NUM_BLOCKS = 128
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Source block ids: a long run (zero-copy frames) and scattered blocks (gathered frames).
SRC_IDS = [*range(10, 50), 2, 7, 60, 61, 90, 5, 127, 64, 65, 66]


def make_pool(dtype: str, seed: int | None, num_blocks: int = NUM_BLOCKS, **shape: int) -> torch.Tensor:
    """(L, N, 2, bs, Hk, D): random values from `seed`, or zeros when seed is None."""
    s = {**SHAPE, **shape}
    dims = (s["num_layers"], num_blocks, 2, s["block_size"], s["num_kv_heads"], s["head_dim"])
    if seed is None:
        return torch.zeros(dims, dtype=DTYPES[dtype])
    return torch.randn(dims, generator=torch.Generator().manual_seed(seed)).to(DTYPES[dtype])


def layout_of(kv: torch.Tensor, fingerprint: str = "tiny-llama@1") -> KVLayout:
    return KVLayout.for_pool(kv, fingerprint)


def digest(kv: torch.Tensor, ids: list[int]) -> str:
    """sha256 of the pages `ids` of every layer, in order: equal digests mean byte-exact copies."""
    return hashlib.sha256(kv[:, ids].contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def scattered_order(num_blocks: int, seed: int) -> list[int]:
    """A free list whose reservations are part runs, part scattered: blocks 70..109 first (a run),
    then the rest shuffled."""
    rest = [b for b in range(num_blocks) if not 70 <= b < 110]
    perm = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    return [*range(70, 110), *(rest[i] for i in perm)]


@dataclass
class Allocator:
    """The receiver's `want`/`release`/`on_complete`/`on_failed`, counting everything. A want that
    finds no space waits, in order, until blocks come back (release, or `add_free`)."""

    num_blocks: int
    free: list[int] = field(default_factory=list)
    reserved: dict[str, list[int]] = field(default_factory=dict)
    completed: dict[str, CompletedTransfer] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    failed: list[FailedTransfer] = field(default_factory=list)
    reservations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    waiting: list[tuple[str, int]] = field(default_factory=list)
    rx: KVReceiver | None = None

    def __post_init__(self) -> None:
        self.free = self.free or list(range(self.num_blocks))
        self.changed = threading.Condition(self.lock)

    def reserve(self, rid: str, n: int) -> list[int] | None:
        with self.lock:
            if len(self.free) < n:
                return None
            ids, self.free = self.free[:n], self.free[n:]
            self.reserved[rid] = ids
            self.reservations += 1
            self.changed.notify_all()
            return ids

    def want(self, rid: str, n: int) -> None:
        with self.lock:
            self.waiting.append((rid, n))
        self._grant_waiting()

    def _grant_waiting(self) -> None:
        assert self.rx is not None
        while self.waiting:
            rid, n = self.waiting[0]
            ids = self.reserve(rid, n)
            if ids is None:
                return
            self.waiting.pop(0)
            self.rx.grant(rid, ids)

    def add_free(self, ids: list[int]) -> None:
        with self.lock:
            self.free.extend(ids)
        self._grant_waiting()

    def release(self, rid: str, ids: list[int]) -> None:
        with self.lock:
            assert self.reserved.pop(rid) == ids
            self.free.extend(ids)
            self.released.append(rid)
            self.changed.notify_all()
        self._grant_waiting()

    def on_complete(self, done: CompletedTransfer) -> None:
        with self.lock:
            assert self.reserved.pop(done.request_id) == done.block_ids
            self.completed[done.request_id] = done
            self.changed.notify_all()

    def on_failed(self, failed: FailedTransfer) -> None:
        with self.lock:
            self.failed.append(failed)
            self.waiting = [w for w in self.waiting if w[0] != failed.request_id]
            self.changed.notify_all()
        self._grant_waiting()  # the failed one may have been first in line

    def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        with self.lock:
            assert self.changed.wait_for(lambda: predicate(self), timeout), "timed out waiting on the allocator"

    def balanced(self) -> bool:
        """Every reservation ended in exactly one release or completion, and no block is lost."""
        with self.lock:
            held = sum(len(c.block_ids) for c in self.completed.values())
            return (not self.reserved and self.reservations == len(self.released) + len(self.completed)
                    and len(self.free) + held == self.num_blocks and len(set(self.free)) == len(self.free))

    def receiver(self, kv: torch.Tensor, bind: str, layout: KVLayout | None = None, **kw: Any) -> KVReceiver:
        self.rx = KVReceiver(kv, layout or layout_of(kv), bind, want=self.want, release=self.release,
                             on_complete=self.on_complete, on_failed=self.on_failed, **kw)
        return self.rx


# -- peer processes ---------------------------------------------------------------------------------
def receiver_main(binds: list[tuple[str, str]], timeout_s: float, events: Any, commands: Any) -> None:
    """One KVReceiver per (bind, dtype), each on a zeroed pool with a scattered free list. Reports
    addresses, then each reservation, release and completion (with the digest of what landed)."""
    receivers = []
    for i, (bind, dtype) in enumerate(binds):
        kv = make_pool(dtype, None)
        alloc = _ReportingAllocator(NUM_BLOCKS, scattered_order(NUM_BLOCKS, seed=i), events=events, kv=kv)
        receivers.append(alloc.receiver(kv, bind, timeout_s=timeout_s))
    events.put({"event": "up", "addresses": [r.address for r in receivers]})
    commands.get()  # anything: stop
    for r in receivers:
        r.close()


def sender_main(dtype: str, peer: str, rid: str, timeout_s: float, events: Any) -> None:
    """Begins one transfer, makes only layer 0 ready, then stays alive until killed."""
    kv = make_pool(dtype, seed=1)
    sender = KVSender(kv, layout_of(kv), timeout_s=timeout_s)
    handle = sender.begin(rid, peer, SRC_IDS, len(SRC_IDS) * SHAPE["block_size"])
    handle.layer_ready(0)
    events.put({"event": "begun"})
    time.sleep(3600)


@dataclass
class _ReportingAllocator(Allocator):
    events: Any = None
    kv: torch.Tensor | None = None

    def reserve(self, rid: str, n: int) -> list[int] | None:
        ids = super().reserve(rid, n)
        if ids is not None:
            self.events.put({"event": "reserved", "rid": rid, "ids": ids})
        return ids

    def release(self, rid: str, ids: list[int]) -> None:
        super().release(rid, ids)
        self.events.put({"event": "released", "rid": rid})

    def on_complete(self, done: CompletedTransfer) -> None:
        super().on_complete(done)
        assert self.kv is not None
        self.events.put({"event": "complete", "rid": done.request_id, "ids": done.block_ids,
                         "digest": digest(self.kv, done.block_ids), "num_tokens": done.num_tokens,
                         "meta": done.meta.hex(), "traceparent": done.traceparent, "bytes": done.bytes})
