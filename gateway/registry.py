"""The gateway's view of its workers: channels, stubs, and a heartbeat that polls each one's Status.

A worker is healthy after a successful Status that reports no error. It turns unhealthy after
`misses_allowed` failed polls in a row (frozen, partitioned, killed: detected within about
interval + misses x timeout), when its Status reports an error (its engine died), or at once when a
call to it breaks at the transport (the process is gone). Every change is announced to the
listeners (`on_change`): the service fails or re-routes the requests on a worker that was lost, and
publishes the gateway's health (SERVING iff a decode worker is healthy). A restarted worker on the
same address becomes healthy again at its next good poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from server.grpc_server import channel_options
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)

Listener = Callable[["WorkerHandle"], None]


@dataclass(eq=False)
class WorkerHandle:
    address: str
    role: gen.WorkerRole
    channel: grpc.aio.Channel
    stub: Any  # worker_pb2_grpc.PrefillWorkerStub or DecodeWorkerStub, by role
    status: pb.StatusResponse | None = None
    status_time: float = 0.0
    healthy: bool = False
    misses: int = 0
    error: str = "not polled yet"
    assigned: int = 0  # requests routed here since the last status (load the status does not show yet)
    prefix_lru: dict[int, None] = field(default_factory=dict)  # block hashes recently routed here

    @property
    def worker_id(self) -> str:
        return self.status.worker_id if self.status else self.address

    @property
    def name(self) -> str:
        """How messages name it: "decode worker <id> (<address>)"."""
        role = "prefill" if self.role == gen.WORKER_ROLE_PREFILL else "decode"
        return f"{role} worker {self.worker_id} ({self.address})"

    def to_proto(self) -> gen.WorkerStatus:
        """Its entry in ClusterStatus: an unhealthy worker's numbers are not shown (they are stale)."""
        s = self.status if (self.status is not None and self.healthy) else pb.StatusResponse()
        return gen.WorkerStatus(
            worker_id=self.worker_id, role=self.role, address=self.address, healthy=self.healthy,
            running=s.running, waiting=s.waiting, kv_address=s.kv_address,
            outstanding_prefill_tokens=s.outstanding_prefill_tokens, cached_blocks=s.cached_blocks,
            kv_blocks_total=s.kv_blocks_total, kv_blocks_free=s.kv_blocks_free,
            kv_block_size=s.kv_layout.block_size, model_fingerprint=s.kv_layout.model_fingerprint,
            error="" if self.healthy else self.error,
            status_age_ms=int((time.monotonic() - self.status_time) * 1000) if self.status else 0,
        )


class WorkerRegistry:
    def __init__(self, prefill: list[str], decode: list[str], *, interval_s: float = 0.5,
                 timeout_s: float = 1.0, misses_allowed: int = 2) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.misses_allowed = misses_allowed
        self.workers: list[WorkerHandle] = []
        for addr in prefill:
            self.workers.append(self._handle(addr, gen.WORKER_ROLE_PREFILL))
        for addr in decode:
            self.workers.append(self._handle(addr, gen.WORKER_ROLE_DECODE))
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _handle(address: str, role: gen.WorkerRole) -> WorkerHandle:
        channel = grpc.aio.insecure_channel(address, options=channel_options())
        stub_cls = worker_pb2_grpc.PrefillWorkerStub if role == gen.WORKER_ROLE_PREFILL else worker_pb2_grpc.DecodeWorkerStub
        return WorkerHandle(address, role, channel, stub_cls(channel))

    def by_role(self, role: int, *, healthy: bool = True) -> list[WorkerHandle]:
        return [w for w in self.workers if w.role == role and (w.healthy or not healthy)]

    def on_change(self, listener: Listener) -> None:
        """Call `listener(worker)` on the event loop whenever a worker turns healthy or unhealthy."""
        self._listeners.append(listener)

    async def start(self) -> None:
        await self.poll_all()
        self._task = asyncio.create_task(self._run(), name="worker-heartbeat")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(w.channel.close() for w in self.workers), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll_all()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in self.workers))

    def lost(self, w: WorkerHandle, reason: str) -> None:
        """A call to `w` broke at the transport: the worker is gone until a poll says otherwise."""
        self._set(w, False, reason)

    async def _poll(self, w: WorkerHandle) -> None:
        try:
            status = await w.stub.Status(pb.StatusRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            w.misses += 1
            if w.misses >= self.misses_allowed:
                self._set(w, False, f"status poll failed {w.misses}x: {exc.code().name} {exc.details()}")
            return
        w.status, w.status_time, w.misses, w.assigned = status, time.monotonic(), 0, 0
        self._set(w, not status.error, status.error)

    def _set(self, w: WorkerHandle, healthy: bool, error: str) -> None:
        changed = healthy != w.healthy
        w.healthy, w.error = healthy, error
        if not changed:
            return
        if healthy:
            logger.info("%s is healthy", w.name)
        else:
            logger.warning("%s is unhealthy: %s", w.name, error)
        for listener in self._listeners:
            try:
                listener(w)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop the heartbeat
                logger.exception("worker change listener failed")
