"""Start a prefill worker: engine + KV sender + gRPC service, until told to stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from engine.checkpoint import checkpoint_fingerprint
from engine.config import EngineConfig
from engine.engine import Engine
from kvtransfer import KVLayout
from kvtransfer.curve import CurveClient
from prefill_worker.observe import PrefillObserver
from prefill_worker.service import PrefillService
from prefill_worker.worker import PrefillCore
from tandem import serve
from tandem.metrics import EngineCollector, WorkerMetrics, new_registry, start_metrics_server
from tandem.tracing import Tracing, disabled
from tandem.v1 import worker_pb2_grpc


@dataclass(frozen=True)
class PrefillWorkerConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    kv_timeout_s: float = 30.0
    request_timeout_s: float = 300.0  # queueing + prefill + transfer, unless the request says less
    max_waiting: int = 1024  # queued Prefill calls before RESOURCE_EXHAUSTED
    ready_file: str | None = None
    kv_curve: CurveClient | None = None  # CurveZMQ on the KV sender; None: plaintext
    metrics_port: int = 0  # Prometheus /metrics on host:metrics_port; 0: off

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.kv_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("kv_timeout_s and request_timeout_s must be > 0")


async def serve_prefill(cfg: PrefillWorkerConfig, stop: asyncio.Event, *, tracing: Tracing | None = None) -> None:
    """Serve until `stop`; `tracing` is the process's (setup_tracing in its main), off when None."""
    engine = Engine(cfg.engine)
    layout = KVLayout.for_pool(engine.runner.kv, checkpoint_fingerprint(cfg.engine.model))
    registry = new_registry()
    metrics = WorkerMetrics(registry, "prefill")
    core = PrefillCore(engine, layout, cfg.kv_timeout_s, PrefillObserver(tracing or disabled(), metrics),
                       curve=cfg.kv_curve)
    service = PrefillService(core, "", "", cfg.request_timeout_s, cfg.max_waiting)
    registry.register(EngineCollector("prefill", core.loop.stats, lambda: {
        "prefill_requests_inflight": service.inflight, "prefill_outstanding_tokens": core.outstanding_tokens(),
        "kv_transfers_inflight": core.num_transferring()}))
    metrics_server = start_metrics_server(cfg.host, cfg.metrics_port, registry)
    core.start()
    try:
        await serve.serve_component(
            "prefill", service,
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server, "tandem.v1.PrefillWorker",
            cfg.host, cfg.port, cfg.ready_file, stop,
            {"metrics_address": metrics_server.address} if metrics_server else None,
        )
    finally:
        core.close()
        if metrics_server is not None:
            metrics_server.close()
