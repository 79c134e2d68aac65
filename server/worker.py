"""Both workers' process main: one engine, its KV layout, metrics, a core and its gRPC service.

    serve_worker(kind, cfg, stop, tracing)
        Engine(cfg.engine) -> KVLayout of its pool -> WorkerMetrics
        kind.build(engine, layout, metrics, tracing) -> Worker(core, service, gauges, info)
        /metrics (EngineCollector reads core.loop.stats + gauges at scrape time)
        core.start(); serve the gRPC service until `stop`; core.close()

What differs between a prefill and a decode worker is `kind.build`; everything else is said here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine.checkpoint import checkpoint_fingerprint, model_name
from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from kvtransfer import KVLayout
from server import process
from server.config import ServerOptions
from server.metrics import EngineCollector, WorkerMetrics, new_registry, start_metrics_server
from server.tracing import Tracing, disabled


class WorkerCore(Protocol):
    """A worker's engine-side half: an engine loop plus its KV transport."""

    loop: EngineLoop

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Worker:
    core: WorkerCore
    service: Any  # the gRPC servicer; serve_component fills in its address and worker_id
    gauges: Callable[[], Mapping[str, float]]  # worker gauges exported as tandem_<name>{role}
    info: Mapping[str, str]  # extra ready-file fields (the KV address)


@dataclass(frozen=True)
class WorkerKind:
    role: str  # "prefill" | "decode"
    service_name: str  # "tandem.v1.PrefillWorker"
    add_to_server: Callable[[Any, Any], None]
    build: Callable[[Engine, KVLayout, WorkerMetrics, Tracing], Worker]


async def serve_worker(kind: WorkerKind, engine_config: EngineConfig, opts: ServerOptions, stop: asyncio.Event,
                       *, tracing: Tracing | None = None) -> None:
    """Serve until `stop`; `tracing` is the process's (server.process.run_component), off when None."""
    engine = Engine(engine_config)
    layout = KVLayout.for_pool(engine.runner.kv, checkpoint_fingerprint(engine_config.model))
    registry = new_registry(model_name(engine_config.model), kind.role)
    worker = kind.build(engine, layout, WorkerMetrics(registry, kind.role), tracing or disabled())
    registry.register(EngineCollector(kind.role, worker.core.loop.stats, worker.gauges))
    metrics_server = start_metrics_server(opts.host, opts.metrics_port, registry)
    info = dict(worker.info)
    if metrics_server is not None:
        info["metrics_address"] = metrics_server.address
    worker.core.start()
    try:
        await process.serve_component(kind.role, worker.service, kind.add_to_server, kind.service_name, opts, stop,
                                      info)
    finally:
        worker.core.close()
        if metrics_server is not None:
            metrics_server.close()
