"""Start a decode worker: engine + KV receiver + gRPC service, until told to stop."""

from __future__ import annotations

import asyncio
from typing import Any

from decode_worker.config import DecodeWorkerConfig
from decode_worker.observe import DecodeObserver
from decode_worker.service import DecodeService
from decode_worker.worker import DecodeCore
from engine.engine import Engine
from kvtransfer import KVLayout
from server.config import parse_fault
from server.metrics import WorkerMetrics
from server.tracing import Tracing
from server.worker import Worker, WorkerKind, serve_worker
from tandem.v1 import worker_pb2_grpc


def _relay(core: Any) -> dict[str, float]:
    """Tensor parallelism: rank 0's free whole-page staging blocks (engine/parallel/relay.py)."""
    stats = core.loop.snapshot.stats
    return {"kv_relay_blocks_free": stats["kv_relay_blocks_free"]} if "kv_relay_blocks_free" in stats else {}


async def serve_decode(cfg: DecodeWorkerConfig, stop: asyncio.Event, *, tracing: Tracing | None = None) -> int:
    """Serve until `stop` (exit code 0) or the engine's death (1); `tracing` is the process's."""
    opts = cfg.worker

    def build(engine: Engine, layout: KVLayout, metrics: WorkerMetrics, tracing: Tracing) -> Worker:
        core = DecodeCore(engine, layout, cfg.kv_bind, opts.kv_timeout_s, DecodeObserver(tracing, metrics),
                          curve=cfg.kv_curve(), watchdog_s=opts.watchdog_s or None, fault=parse_fault(opts.fault))
        service = DecodeService(core, "", "", cfg.max_streams)
        return Worker(core, service, lambda: {
            "decode_streams": service.streams, "decode_kv_pending": core.num_pending(),
            "kv_transfers_inflight": core.receiver.stats().get("live", 0)} | _relay(core), {"kv_address": core.receiver.address})

    kind = WorkerKind("decode", "tandem.v1.DecodeWorker", worker_pb2_grpc.add_DecodeWorkerServicer_to_server, build)
    return await serve_worker(kind, cfg.engine, cfg.server, stop, tracing=tracing)
