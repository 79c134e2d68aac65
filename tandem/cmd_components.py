"""`tandem gateway`, `tandem prefill-worker`, `tandem decode-worker`: one component per process.

These are exactly the commands `tandem up` and docker-compose run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from engine.config import KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig
from tandem.security_args import add_gateway_security_args, add_kv_curve_args

if TYPE_CHECKING:
    import asyncio

    from tandem.tracing import Tracing

logger = logging.getLogger(__name__)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    g.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16 (auto: float32 on CPU)")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    g.add_argument("--max-num-seqs", type=int, default=256, help="running sequences per step")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides the budget)")
    g.add_argument("--kv-cache-memory", type=float, default=None, help="KV pool budget in GiB")
    g.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="quantize the decoder layers' weights at load time (docs/quantization.md; default: off)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="auto: the model dtype; fp8: float8_e4m3fn KV pages (prefill and decode must agree)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    g.add_argument("--attention-backend", default="auto", help="auto|torch|triton")
    add_speculative_args(g)


def add_speculative_args(g: Any) -> None:
    """Speculative decoding (docs/speculative.md): decode workers use it, prefill workers ignore it."""
    g.add_argument("--speculative-model", default=None,
                   help="draft checkpoint (the target's tokenizer) that proposes tokens for the model to verify")
    g.add_argument("--speculative-method", default=None, choices=["ngram"],
                   help="ngram: propose by prompt lookup, no draft model")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="k, the most draft tokens verified per sequence and step (1..16; default 4)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=int(args.kv_cache_memory * 2**30) if args.kv_cache_memory else None,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=not args.no_prefix_caching, attention_backend=args.attention_backend,
        speculative_model=args.speculative_model, speculative_method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens,
    )


def without_speculation(cfg: EngineConfig) -> EngineConfig:
    """A prefill worker's engine: it samples one token per request, so drafts would never be verified."""
    if cfg.speculative:
        logger.info("prefill worker: speculative decoding options ignored (decode workers speculate)")
    return dataclasses.replace(cfg, speculative_model=None, speculative_method=None, num_speculative_tokens=None)


def add_server_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (internal ports stay on loopback by default)")
    p.add_argument("--port", type=int, default=default_port, help="gRPC port (0: any free port)")
    p.add_argument("--ready-file", default=None, help="write a JSON line with the bound addresses here once up")


def add_observability_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("observability")
    g.add_argument("--otlp-endpoint", default=None,
                   help="send traces over OTLP/gRPC to this collector (http://host:4317), or 'console'; "
                        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else tracing off")
    g.add_argument("--trace-sample-ratio", type=float, default=1.0,
                   help="fraction of requests traced, decided at the gateway (workers follow it)")
    g.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")


def _run_traced(role: str, args: argparse.Namespace,
                serve_fn: Callable[[asyncio.Event, Tracing], Awaitable[None]]) -> None:
    """Set up this process's tracing, run `serve_fn(stop, tracing)` on the event loop, flush on exit."""
    from tandem import serve
    from tandem.tracing import SERVICE_NAMES, setup_tracing

    tracing = setup_tracing(SERVICE_NAMES[role], endpoint=args.otlp_endpoint, sample_ratio=args.trace_sample_ratio)
    try:
        serve.run(lambda stop: serve_fn(stop, tracing))
    finally:
        tracing.shutdown()


def _split(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def run_gateway(args: argparse.Namespace) -> int:
    from gateway.main import GatewayConfig, serve_gateway
    from gateway.service import GatewayLimits
    from tandem.security_args import gateway_tls

    cfg = GatewayConfig(
        model=args.model, prefill_workers=_split(args.prefill_workers), decode_workers=_split(args.decode_workers),
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        local_prefill_threshold=args.local_prefill_threshold, ready_file=args.ready_file,
        limits=GatewayLimits(max_inflight=args.max_inflight, kv_timeout_s=args.kv_timeout,
                             default_max_tokens=args.default_max_tokens),
        metrics_port=args.metrics_port,
        tls=gateway_tls(args), auth_token_file=args.auth_token_file,
        http_port=args.http_port,
    )
    _run_traced("gateway", args, lambda stop, tracing: serve_gateway(cfg, stop, tracing=tracing))
    return 0


def run_prefill(args: argparse.Namespace) -> int:
    from prefill_worker.main import PrefillWorkerConfig, serve_prefill
    from tandem.security_args import kv_curve_client

    cfg = PrefillWorkerConfig(engine=without_speculation(engine_config(args)), host=args.host, port=args.port,
                              kv_timeout_s=args.kv_timeout, ready_file=args.ready_file,
                              metrics_port=args.metrics_port, kv_curve=kv_curve_client(args))
    _run_traced("prefill", args, lambda stop, tracing: serve_prefill(cfg, stop, tracing=tracing))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from decode_worker.main import DecodeWorkerConfig, serve_decode
    from tandem.security_args import kv_curve_server

    cfg = DecodeWorkerConfig(engine=engine_config(args), host=args.host, port=args.port, kv_bind=args.kv_bind,
                             kv_timeout_s=args.kv_timeout, ready_file=args.ready_file,
                             metrics_port=args.metrics_port, kv_curve=kv_curve_server(args))
    _run_traced("decode", args, lambda stop, tracing: serve_decode(cfg, stop, tracing=tracing))
    return 0


def register(subparsers: Any) -> None:
    g = subparsers.add_parser("gateway", help="run the gRPC gateway")
    g.add_argument("--model", required=True, help="checkpoint directory (tokenizer and config are read from it)")
    g.add_argument("--prefill-workers", default="", help="comma-separated host:port of prefill workers")
    g.add_argument("--decode-workers", required=True, help="comma-separated host:port of decode workers")
    g.add_argument("--served-model-name", default=None, help="the name clients use (default: the directory's)")
    g.add_argument("--local-prefill-threshold", type=int, default=32,
                   help="uncached prompt tokens below which the decode worker prefills itself (0: never)")
    g.add_argument("--max-inflight", type=int, default=256, help="concurrent requests before RESOURCE_EXHAUSTED")
    g.add_argument("--kv-timeout", type=float, default=30.0, help="seconds a KV transfer may take")
    g.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request leaves it 0")
    g.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API (/v1/completions, ...) on this port "
                        "(0: any free port, reported as http_address in the ready file; default: off)")
    add_server_args(g, 50051)
    add_observability_args(g)
    add_gateway_security_args(g)
    g.set_defaults(func=run_gateway)

    p = subparsers.add_parser("prefill-worker", help="run a prefill worker")
    add_engine_args(p)
    add_server_args(p, 50061)
    p.add_argument("--kv-timeout", type=float, default=30.0, help="seconds a KV transfer may stay silent")
    add_observability_args(p)
    add_kv_curve_args(p, "prefill")
    p.set_defaults(func=run_prefill)

    d = subparsers.add_parser("decode-worker", help="run a decode worker")
    add_engine_args(d)
    add_server_args(d, 50071)
    d.add_argument("--kv-bind", default="tcp://127.0.0.1:0", help="KV receiver endpoint (tcp://host:port or ipc://path)")
    d.add_argument("--kv-timeout", type=float, default=30.0, help="seconds a KV transfer may stay silent")
    add_observability_args(d)
    add_kv_curve_args(d, "decode")
    d.set_defaults(func=run_decode)
