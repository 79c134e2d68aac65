"""Start the gateway: worker registry + router + the public Generation service."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint import load_hf_config
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer
from gateway.observe import GatewayObserver
from gateway.registry import WorkerRegistry
from gateway.router import Router
from gateway.service import GatewayLimits, GenerationService
from tandem import serve
from tandem.auth import AuthInterceptor, TokenTable
from tandem.metrics import GatewayMetrics, new_registry, start_metrics_server
from tandem.tls import TLSConfig
from tandem.tracing import Tracing
from tandem.v1 import generation_pb2_grpc

logger = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class GatewayConfig:
    model: str
    prefill_workers: tuple[str, ...]
    decode_workers: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 0
    served_model_name: str | None = None  # default: the model directory's name
    local_prefill_threshold: int = 32  # uncached prompt tokens below which the decode worker prefills
    heartbeat_interval_s: float = 0.5
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    ready_file: str | None = None
    metrics_port: int = 0  # Prometheus /metrics on host:metrics_port; 0: off
    tls: TLSConfig | None = None  # None: plaintext (fine on loopback)
    auth_token_file: str | None = None  # None: no bearer-token check (tandem.auth)
    http_port: int | None = None  # the OpenAI-compatible HTTP API (gateway/http_api.py); 0: any free port; None: off

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if not self.decode_workers:
            raise ValueError("the gateway needs at least one decode worker (--decode-workers)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.local_prefill_threshold < 0:
            raise ValueError(f"local_prefill_threshold must be >= 0, got {self.local_prefill_threshold}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


async def serve_gateway(cfg: GatewayConfig, stop: asyncio.Event, *, tracing: Tracing | None = None) -> None:
    """Serve until `stop`; `tracing` is the process's (setup_tracing in its main), off when None."""
    interceptors = [AuthInterceptor(TokenTable.from_file(cfg.auth_token_file))] if cfg.auth_token_file else []
    model_config = ModelConfig.from_hf(load_hf_config(cfg.model))
    tokenizer = Tokenizer.from_dir(cfg.model)
    registry = WorkerRegistry(list(cfg.prefill_workers), list(cfg.decode_workers),
                              interval_s=cfg.heartbeat_interval_s)
    await registry.start()
    metrics_registry = new_registry()
    observer = GatewayObserver(tracing, GatewayMetrics(metrics_registry))
    service = GenerationService(registry, Router(registry, cfg.local_prefill_threshold), tokenizer,
                                model_config, cfg.model_name, cfg.limits, observer)
    metrics_server = start_metrics_server(cfg.host, cfg.metrics_port, metrics_registry)
    if cfg.host not in _LOOPBACK and (cfg.tls is None or not interceptors):
        logger.warning("the gateway listens on %s without %s: see docs/security.md", cfg.host,
                       " or ".join(n for n, on in (("TLS", cfg.tls), ("bearer tokens", interceptors)) if not on))
    http, http_info = None, {}
    if cfg.http_port is not None:  # same service, limits, auth and TLS as gRPC
        from gateway.http_api import http_ssl_context, start_http_api

        tokens = interceptors[0].tokens if interceptors else None
        http = await start_http_api(
            service, cfg.host, cfg.http_port,
            authorize=(lambda header: tokens.check("/tandem.v1.Generation/Generate", header)) if tokens else None,
            ssl_context=http_ssl_context(cfg.tls.cert, cfg.tls.key, cfg.tls.client_ca) if cfg.tls else None)
        http_info = {"http_address": f"{serve.advertised_host(cfg.host)}:{http.port}"}
    try:
        await serve.serve_component("gateway", service, generation_pb2_grpc.add_GenerationServicer_to_server,
                                    "tandem.v1.Generation", cfg.host, cfg.port, cfg.ready_file, stop,
                                    {**({"metrics_address": metrics_server.address} if metrics_server else {}),
                                     **http_info},
                                    interceptors=interceptors,
                                    credentials=cfg.tls.server_credentials() if cfg.tls else None)
    finally:
        if http is not None:
            await http.close()
        await registry.close()
        if metrics_server is not None:
            metrics_server.close()
