"""`tandem gateway`, `tandem prefill-worker`, `tandem decode-worker`: one component per process.

These are exactly the commands `tandem up` and docker-compose run. Every flag is generated from the
component's config dataclass (engine.options), which holds its default, range and help text.
`--model` may name a packaged model or a Hugging Face id (engine.hub), as in `tandem up`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from decode_worker.config import DecodeWorkerConfig
from engine.checkpoint import CheckpointError
from engine.config import EngineConfig
from engine.options import add_options, from_args
from gateway.config import GatewayConfig
from prefill_worker.config import PrefillWorkerConfig
from server.config import DEFAULT_PORTS

logger = logging.getLogger(__name__)


def _model_errors(role: str, run: Callable[[], int]) -> int:
    """`run()`, or exit code 2 with one line when the model cannot be found or read (engine.hub)."""
    try:
        return run()
    except CheckpointError as exc:
        logger.error("%s: %s", role, exc)
        return 2


def run_gateway(args: argparse.Namespace) -> int:
    from gateway.main import serve_gateway
    from server.process import run_component

    cfg: GatewayConfig = from_args(GatewayConfig, args)
    return _model_errors("gateway", lambda: run_component(
        "gateway", cfg.server, lambda stop, tracing: serve_gateway(cfg, stop, tracing=tracing)))


def _other_node(engine: EngineConfig) -> int | None:
    """`--node-rank k` > 0: this node only runs its tensor-parallel ranks (no gRPC, no KV endpoint);
    their exit code, once they stop or one fails. None on node 0 (the worker itself)."""
    if engine.node_rank == 0:
        return None
    from engine.engine import local_config
    from engine.parallel.follower import run_node

    local, _ = local_config(engine)
    return run_node(local)


def run_prefill(args: argparse.Namespace) -> int:
    from prefill_worker.main import serve_prefill
    from server.process import run_component

    cfg: PrefillWorkerConfig = from_args(PrefillWorkerConfig, args)
    if (code := _other_node(cfg.engine)) is not None:
        return code
    return _model_errors("prefill worker", lambda: run_component(
        "prefill", cfg.server, lambda stop, tracing: serve_prefill(cfg, stop, tracing=tracing)))


def run_decode(args: argparse.Namespace) -> int:
    from decode_worker.main import serve_decode
    from server.process import run_component

    cfg: DecodeWorkerConfig = from_args(DecodeWorkerConfig, args)
    if (code := _other_node(cfg.engine)) is not None:
        return code
    return _model_errors("decode worker", lambda: run_component(
        "decode", cfg.server, lambda stop, tracing: serve_decode(cfg, stop, tracing=tracing)))


def register(subparsers: Any) -> None:
    g = subparsers.add_parser("gateway", help="run the gRPC gateway (and the OpenAI-compatible HTTP API)")
    add_options(g, GatewayConfig, defaults={"port": DEFAULT_PORTS["gateway"]})
    g.set_defaults(func=run_gateway)

    p = subparsers.add_parser("prefill-worker", help="run a prefill worker")
    # a prefill worker never decodes, so the decode forward's CUDA graphs would only cost it start-up time
    add_options(p, PrefillWorkerConfig, defaults={"port": DEFAULT_PORTS["prefill"], "enforce_eager": True})
    p.set_defaults(func=run_prefill)

    d = subparsers.add_parser("decode-worker", help="run a decode worker")
    add_options(d, DecodeWorkerConfig, defaults={"port": DEFAULT_PORTS["decode"]})
    d.set_defaults(func=run_decode)
