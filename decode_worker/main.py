"""Start a decode worker: engine + KV receiver + gRPC service, until told to stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from decode_worker.service import DecodeService
from decode_worker.worker import DecodeCore
from engine.checkpoint import checkpoint_fingerprint
from engine.config import EngineConfig
from engine.engine import Engine
from kvtransfer import KVLayout
from tandem import serve
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

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.kv_timeout_s <= 0:
            raise ValueError(f"kv_timeout_s must be > 0, got {self.kv_timeout_s}")


async def serve_decode(cfg: DecodeWorkerConfig, stop: asyncio.Event) -> None:
    engine = Engine(cfg.engine)
    layout = KVLayout.for_pool(engine.runner.kv, checkpoint_fingerprint(cfg.engine.model))
    core = DecodeCore(engine, layout, cfg.kv_bind, cfg.kv_timeout_s)
    core.start()
    try:
        await serve.serve_component(
            "decode", DecodeService(core, "", "", cfg.max_waiting), worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
            "tandem.v1.DecodeWorker", cfg.host, cfg.port, cfg.ready_file, stop,
            {"kv_address": core.receiver.address},
        )
    finally:
        core.close()
