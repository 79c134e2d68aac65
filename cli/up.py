"""`tandem up`: the whole stack as local processes; Ctrl-C or SIGTERM stops every one of them.

A worker that exits is restarted on its port after a back-off while the rest keep serving
(cli/supervisor.py); the gateway exiting, or a worker that fails to start --max-restarts times in a
row, stops everything and exits 1.

Its flags are the components' own (generated from their configs, engine.options): engine flags go to
every worker, gateway flags to the gateway, worker flags to the workers that have them. Only the
flags given are passed on, so each child keeps its own defaults.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from decode_worker.config import DecodeWorkerConfig
from engine.config import EngineConfig
from engine.options import add_options, forward_args
from gateway.config import GatewayConfig
from prefill_worker.config import PrefillWorkerConfig
from server.config import DEFAULT_PORTS, ServerOptions

# Decided by `tandem up` itself: the model (resolved once, here: a Hugging Face id becomes its local
# snapshot, which every child is given) and the workers' addresses, each process's bind address,
# port, ready file and metrics port (see --metrics-port).
_SET_BY_UP = ("model", "revision", "decode_workers", "prefill_workers", "host", "port", "ready_file",
              "metrics_port")
_TRACING = ("otlp_endpoint", "trace_sample_ratio")

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    from cli.launcher import Stack
    from cli.supervisor import RestartPolicy, Supervisor
    from engine.hub import resolve_model

    try:
        policy = RestartPolicy(backoff_s=args.restart_backoff, max_backoff_s=args.max_restart_backoff,
                               reset_after_s=args.restart_reset_after, max_restarts=args.max_restarts,
                               ready_timeout_s=args.startup_timeout)
        model = resolve_model(args.model, getattr(args, "revision", None))  # CheckpointError is a ValueError
    except ValueError as exc:
        logger.error("up: %s", exc)
        return 2
    tracing = forward_args(ServerOptions, args, exclude=_SET_BY_UP)
    engine = forward_args(EngineConfig, args, exclude=("model", "revision"))
    stack = Stack(model.path, prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                  host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", DEFAULT_PORTS["gateway"]),
                  engine_args=[*engine, *tracing],
                  prefill_args=forward_args(PrefillWorkerConfig, args, exclude=(*_SET_BY_UP, *_TRACING, "engine")),
                  decode_args=forward_args(DecodeWorkerConfig, args, exclude=(*_SET_BY_UP, *_TRACING, "engine")),
                  gateway_args=forward_args(GatewayConfig, args, exclude=_SET_BY_UP),
                  workdir=args.workdir, metrics_port=getattr(args, "metrics_port", 0))
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if starting:
            raise KeyboardInterrupt  # interrupts Stack.start, which stops what it started

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"starting {args.prefill_workers} prefill + {args.decode_workers} decode workers on {model.name} "
          f"({model.path}) ...", flush=True)
    try:
        stack.start(timeout_s=args.startup_timeout)
        starting = False
    except KeyboardInterrupt:
        stack.stop()
        print("stopped", flush=True)
        return 130
    supervisor = Supervisor(stack, policy)
    try:
        for c in stack.prefill:
            print(f"  prefill worker  {c.info['address']}{_metrics(c.info)}", flush=True)
        for c in stack.decode:
            print(f"  decode worker   {c.info['address']}  (KV {c.info.get('kv_address')}){_metrics(c.info)}",
                  flush=True)
        if stack.gateway is not None and "metrics_address" in stack.gateway.info:
            print(f"  gateway metrics http://{stack.gateway.info['metrics_address']}/metrics", flush=True)
        print(f"gateway ready on {stack.address}   logs: {stack.workdir}", flush=True)
        if stack.gateway is not None and "http_address" in stack.gateway.info:
            print(f"  OpenAI-compatible HTTP API http://{stack.gateway.info['http_address']}/v1", flush=True)
        print(f"try: tandem generate --addr {stack.address} 'def fibonacci(n):'   (Ctrl-C stops everything)",
              flush=True)
        while not stop.wait(0.25):
            reason = supervisor.poll()
            if reason is not None and not stop.is_set():  # Ctrl-C in a terminal signals the children too
                print(f"stopping: {reason}; every log is in {stack.workdir}", flush=True)
                return 1
    finally:
        stack.stop()
        print("stopped", flush=True)
    return 0


def _metrics(info: dict[str, Any]) -> str:
    return f"  metrics http://{info['metrics_address']}/metrics" if "metrics_address" in info else ""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("up", help="start gateway + prefill + decode workers as local processes")
    p.add_argument("--prefill-workers", type=int, default=1, help="prefill worker processes (0: decode workers "
                   "prefill every prompt themselves)")
    p.add_argument("--decode-workers", type=int, default=1, help="decode worker processes")
    p.add_argument("--workdir", default=None, help="where ready files and logs go (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for every process (and "
                   "for a restarted worker)")
    sup = p.add_argument_group("supervision (a worker that exits is restarted on its port; the rest keep serving)")
    sup.add_argument("--restart-backoff", type=float, default=1.0, metavar="SECONDS",
                     help="wait before restarting a worker that exited; doubles with each exit in a row")
    sup.add_argument("--max-restart-backoff", type=float, default=30.0, metavar="SECONDS",
                     help="the longest wait between restarts of one worker")
    sup.add_argument("--restart-reset-after", type=float, default=60.0, metavar="SECONDS",
                     help="a worker that stayed up this long restarts after --restart-backoff again")
    sup.add_argument("--max-restarts", type=int, default=5, metavar="N",
                     help="stop everything (exit 1) when a worker fails to start N times in a row "
                          "(0: any worker exiting stops everything)")
    add_options(p.add_argument_group("engine (every worker)"), EngineConfig, passthrough=True)
    add_options(p.add_argument_group("gateway"), GatewayConfig, passthrough=True,
                exclude=("model", "decode_workers", "prefill_workers", "ready_file"),
                defaults={"port": DEFAULT_PORTS["gateway"]},
                helps={"host": "bind address of every process (the gateway's is the one clients dial)",
                       "metrics_port": "Prometheus base port: the gateway here, prefill workers next, then decode "
                                       "workers (0: off)",
                       "otlp_endpoint": "every process sends traces here (http://host:4317 or 'console'); "
                                        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else off"})
    workers = p.add_argument_group("workers")
    for cls in (PrefillWorkerConfig, DecodeWorkerConfig):
        add_options(workers, cls, passthrough=True, exclude=("ready_file",))
    p.set_defaults(func=run)
