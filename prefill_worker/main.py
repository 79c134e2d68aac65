"""Start a prefill worker: engine + KV sender + gRPC service, until told to stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from engine.checkpoint import checkpoint_fingerprint
from engine.config import EngineConfig
from engine.engine import Engine
from kvtransfer import KVLayout
from prefill_worker.service import PrefillService
from prefill_worker.worker import PrefillCore
from tandem import serve
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

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.kv_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("kv_timeout_s and request_timeout_s must be > 0")


async def serve_prefill(cfg: PrefillWorkerConfig, stop: asyncio.Event) -> None:
    engine = Engine(cfg.engine)
    layout = KVLayout.for_pool(engine.runner.kv, checkpoint_fingerprint(cfg.engine.model))
    core = PrefillCore(engine, layout, cfg.kv_timeout_s)
    core.start()
    try:
        await serve.serve_component(
            "prefill", PrefillService(core, "", "", cfg.request_timeout_s, cfg.max_waiting),
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server, "tandem.v1.PrefillWorker",
            cfg.host, cfg.port, cfg.ready_file, stop,
        )
    finally:
        core.close()
