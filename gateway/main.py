"""Start the gateway: worker registry + router + the public Generation service."""

from __future__ import annotations

import asyncio
import logging
import os

from engine.checkpoint import load_hf_config
from engine.config import ModelConfig
from engine.hub import resolve_model
from engine.tokenizer import Tokenizer
from gateway.chat_request import ChatFormats
from gateway.config import GatewayConfig
from gateway.http_observe import HttpObserver
from gateway.observe import GatewayObserver
from gateway.registry import WorkerRegistry
from gateway.router import Router
from gateway.service import GenerationService
from gateway.validation import PromptLimits, check_generate_wire
from server import process
from server.auth import AuthInterceptor, TokenTable
from server.metrics import GatewayMetrics, new_registry, start_metrics_server
from server.tracing import Tracing
from tandem.v1 import generation_pb2_grpc

logger = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
GENERATE = "/tandem.v1.Generation/Generate"
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def capture_content(cfg: GatewayConfig) -> bool:
    """Whether prompts and completions go on spans: --trace-content, or the GenAI convention's variable."""
    return cfg.trace_content or os.environ.get(CAPTURE_ENV, "").strip().lower() == "true"


async def serve_gateway(cfg: GatewayConfig, stop: asyncio.Event, *, tracing: Tracing | None = None) -> int:
    """Serve until `stop` (exit code 0); `tracing` is the process's (setup_tracing in its main), off when None."""
    tls = cfg.tls
    interceptors = [AuthInterceptor(TokenTable.from_file(cfg.auth_token_file))] if cfg.auth_token_file else []
    model = resolve_model(cfg.model, cfg.revision)  # a Hugging Face id: its snapshot in the cache
    names = cfg.served_model_name or (model.name,)
    model_config = ModelConfig.from_hf(load_hf_config(model.path))
    prompt_limits = PromptLimits(model_config.max_position_embeddings)
    tokenizer = Tokenizer.from_dir(model.path)
    registry = WorkerRegistry(list(cfg.prefill_workers), list(cfg.decode_workers),
                              interval_s=cfg.heartbeat_interval_s)
    await registry.start()
    metrics_registry = new_registry(names[0], "gateway")
    metrics = GatewayMetrics(metrics_registry)
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)) if capture_content(cfg) else None
    observer = GatewayObserver(tracing, metrics, decode)
    health = process.Health(serving=False)
    formats = ChatFormats.from_template(tokenizer.chat_template, cfg.tool_call_parser, cfg.reasoning_parser)
    service = GenerationService(registry, Router(registry, cfg.local_prefill_threshold), tokenizer,
                                model_config, names, cfg.limits, observer, health, formats)
    logger.info("serving %s as %s (tool calls: %s; reasoning: %s)", model.path, ", ".join(names),
                formats.tool_parser or "none", "<think>" if formats.reasoning else "none")
    metrics_server = start_metrics_server(cfg.server.host, cfg.server.metrics_port, metrics_registry)
    if cfg.server.host not in _LOOPBACK and (tls is None or not interceptors):
        logger.warning("the gateway listens on %s without %s: see docs/security.md", cfg.server.host,
                       " or ".join(n for n, on in (("TLS", tls), ("bearer tokens", interceptors)) if not on))
    http, http_info = None, {}
    if cfg.http_port is not None:  # same service, limits, auth and TLS as gRPC
        from gateway.http_listener import http_ssl_context, start_http_api

        tokens = interceptors[0].tokens if interceptors else None
        http = await start_http_api(
            service, cfg.server.host, cfg.http_port, limits=cfg.http,
            authorize=(lambda header: tokens.check("/tandem.v1.Generation/Generate", header)) if tokens else None,
            ssl_context=http_ssl_context(tls.cert, tls.key, tls.client_ca) if tls else None,
            instrument=HttpObserver(observer.tracing, metrics, metrics_registry).install)
        http_info = {"http_address": f"{process.advertised_host(cfg.server.host)}:{http.port}"}
    try:
        return await process.serve_component(
            "gateway", service, generation_pb2_grpc.add_GenerationServicer_to_server, "tandem.v1.Generation",
            cfg.server, stop, {**({"metrics_address": metrics_server.address} if metrics_server else {}), **http_info,
                               "model_name": names[0]},
            health=health, interceptors=interceptors, credentials=tls.server_credentials() if tls else None,
            wire_checks={GENERATE: lambda data: check_generate_wire(data, prompt_limits)})
    finally:
        if http is not None:
            await http.close()
        await registry.close()
        if metrics_server is not None:
            metrics_server.close()
