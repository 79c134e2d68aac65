"""Start a prefill worker: engine + KV sender + gRPC service, until told to stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from engine.engine import Engine
from kvtransfer import KVLayout
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.observe import PrefillObserver
from prefill_worker.service import PrefillService
from prefill_worker.worker import PrefillCore
from server.config import parse_fault
from server.metrics import WorkerMetrics
from server.tracing import Tracing
from server.worker import Worker, WorkerKind, serve_worker
from tandem.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)


def _relay(core: Any) -> dict[str, float]:
    """Tensor parallelism: rank 0's free whole-page staging blocks (engine/parallel/relay.py)."""
    stats = core.loop.snapshot.stats
    return {"kv_relay_blocks_free": stats["kv_relay_blocks_free"]} if "kv_relay_blocks_free" in stats else {}


async def serve_prefill(cfg: PrefillWorkerConfig, stop: asyncio.Event, *, tracing: Tracing | None = None) -> int:
    """Serve until `stop` (exit code 0) or the engine's death (1); `tracing` is the process's."""
    opts = cfg.worker

    def build(engine: Engine, layout: KVLayout, metrics: WorkerMetrics, tracing: Tracing) -> Worker:
        core = PrefillCore(engine, layout, opts.kv_timeout_s, PrefillObserver(tracing, metrics), curve=cfg.kv_curve(),
                           watchdog_s=opts.watchdog_s or None, fault=parse_fault(opts.fault))
        service = PrefillService(core, "", "", cfg.request_timeout_s, cfg.max_queued)
        return Worker(core, service, lambda: {
            "prefill_requests_inflight": service.inflight,
            "prefill_outstanding_tokens": core.loop.snapshot.stats.get("outstanding_prefill_tokens", 0),
            "kv_transfers_inflight": core.loop.snapshot.stats.get("transferring", 0)} | _relay(core), {})

    engine_cfg = cfg.engine
    if engine_cfg.speculative:  # it samples one token per request: drafts would never be verified
        logger.info("prefill worker: speculative decoding options ignored (decode workers speculate)")
        engine_cfg = dataclasses.replace(engine_cfg, speculative_model=None, speculative_method=None,
                                         num_speculative_tokens=None)
    kind = WorkerKind("prefill", "tandem.v1.PrefillWorker", worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                      build)
    return await serve_worker(kind, engine_cfg, cfg.server, stop, tracing=tracing)
