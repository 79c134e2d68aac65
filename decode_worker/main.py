"""Start a decode worker: engine + KV receiver + gRPC service, until told to stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from decode_worker.observe import DecodeObserver
from decode_worker.service import DecodeService
from decode_worker.worker import DecodeCore
from engine.checkpoint import checkpoint_fingerprint
from engine.config import EngineConfig
from engine.engine import Engine
from kvtransfer import KVLayout
from kvtransfer.curve import CurveServer
from tandem import serve
from tandem.metrics import EngineCollector, WorkerMetrics, new_registry, start_metrics_server
from tandem.tracing import Tracing, disabled
from tandem.v1 import worker_pb2_grpc


@dataclass(frozen=True)
class DecodeWorkerConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    kv_bind: str = "tcp://127.0.0.1:0"  # ipc:///path on one host
    kv_timeout_s: float = 30.0
    max_waiting: int = 1024  # concurrent Decode streams before RESOURCE_EXHAUSTED
    ready_file: str | None = None
    kv_curve: CurveServer | None = None  # CurveZMQ on the KV receiver; None: plaintext
    metrics_port: int = 0  # Prometheus /metrics on host:metrics_port; 0: off

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.kv_timeout_s <= 0:
            raise ValueError(f"kv_timeout_s must be > 0, got {self.kv_timeout_s}")


async def serve_decode(cfg: DecodeWorkerConfig, stop: asyncio.Event, *, tracing: Tracing | None = None) -> None:
    """Serve until `stop`; `tracing` is the process's (setup_tracing in its main), off when None."""
    engine = Engine(cfg.engine)
    layout = KVLayout.for_pool(engine.runner.kv, checkpoint_fingerprint(cfg.engine.model))
    registry = new_registry()
    metrics = WorkerMetrics(registry, "decode")
    core = DecodeCore(engine, layout, cfg.kv_bind, cfg.kv_timeout_s, DecodeObserver(tracing or disabled(), metrics),
                      curve=cfg.kv_curve)
    service = DecodeService(core, "", "", cfg.max_waiting)
    registry.register(EngineCollector("decode", core.loop.stats, lambda: {
        "decode_streams": service.streams, "decode_kv_pending": core.num_pending(),
        "kv_transfers_inflight": core.receiver.stats().get("live", 0)}))
    metrics_server = start_metrics_server(cfg.host, cfg.metrics_port, registry)
    info: dict[str, str] = {"kv_address": core.receiver.address}
    if metrics_server is not None:
        info["metrics_address"] = metrics_server.address
    core.start()
    try:
        await serve.serve_component(
            "decode", service, worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
            "tandem.v1.DecodeWorker", cfg.host, cfg.port, cfg.ready_file, stop, info,
        )
    finally:
        core.close()
        if metrics_server is not None:
            metrics_server.close()
