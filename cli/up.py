"""`tandem up`: the whole stack as local processes; Ctrl-C or SIGTERM stops every one of them.

With no flags it serves SmolLM2-135M-Instruct (engine/hub.py) with gRPC on 127.0.0.1:50051 and the
OpenAI-compatible HTTP API on http://127.0.0.1:8000/v1 (--no-http: off), and prints a curl, an
`openai` snippet and a `tandem generate` line that work against it. Each process logs to its own file
in --workdir (gateway.log, prefill-0.log, decode-0.log; --log-level / --log-format apply to all).

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
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from decode_worker.config import DecodeWorkerConfig
from engine.config import EngineConfig
from engine.hub import DEFAULT_MODEL
from engine.options import add_options, forward_args
from gateway.config import GatewayConfig
from prefill_worker.config import PrefillWorkerConfig
from server.config import DEFAULT_PORTS, ServerOptions

if TYPE_CHECKING:
    from cli.launcher import Stack

DEFAULT_HTTP_PORT = 8000
# Decided by `tandem up` itself: the model (resolved once, here: a packaged name or a Hugging Face id
# becomes its local file or snapshot, which every child is given) and the workers' addresses, each
# process's bind address,
# port, ready file and metrics port (see --metrics-port).
_SET_BY_UP = ("model", "revision", "decode_workers", "prefill_workers", "host", "port", "ready_file",
              "metrics_port")
_TRACING = ("otlp_endpoint", "trace_sample_ratio")

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    from cli.supervisor import RestartPolicy, Supervisor
    from engine.hub import resolve_model

    if getattr(args, "nnodes", 1) > 1 or getattr(args, "node_rank", 0) > 0:
        logger.error("up: tandem up runs one host; start a multi-node worker with `tandem prefill-worker` / "
                     "`tandem decode-worker` on each node (--nnodes, --node-rank, --dist-init-addr; "
                     "docs/tensor-parallel.md)")
        return 2
    try:
        policy = RestartPolicy(backoff_s=args.restart_backoff, max_backoff_s=args.max_restart_backoff,
                               reset_after_s=args.restart_reset_after, max_restarts=args.max_restarts,
                               ready_timeout_s=args.startup_timeout)
        model = resolve_model(getattr(args, "model", DEFAULT_MODEL), getattr(args, "revision", None))
    except ValueError as exc:  # CheckpointError is a ValueError
        logger.error("up: %s", exc)
        return 2
    if args.no_http:
        if hasattr(args, "http_port"):
            logger.error("up: --no-http and --http-port contradict each other")
            return 2
    elif not hasattr(args, "http_port"):
        args.http_port = DEFAULT_HTTP_PORT
    stack = build_stack(args, model.path)
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if starting:
            raise KeyboardInterrupt  # interrupts Stack.start, which stops what it started

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"starting {args.prefill_workers} prefill + {args.decode_workers} decode workers on {model.name} "
          f"({model.path}; logs: {stack.workdir}) ...", flush=True)
    try:
        stack.start(timeout_s=args.startup_timeout)
        starting = False
    except KeyboardInterrupt:
        stack.stop()
        print("stopped", flush=True)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"failed to start: {exc}\nevery log is in {stack.workdir}", flush=True)
        return 1
    supervisor = Supervisor(stack, policy)
    try:
        print(ready_text(stack), flush=True)
        while not stop.wait(0.25):
            reason = supervisor.poll()
            if reason is not None and not stop.is_set():  # Ctrl-C in a terminal signals the children too
                print(f"stopping: {reason}; every log is in {stack.workdir}", flush=True)
                return 1
    finally:
        stack.stop()
        print("stopped", flush=True)
    return 0


def build_stack(args: argparse.Namespace, model_path: str | Path) -> Stack:
    """The stack `args` (tandem up's, parsed) describe, not started: each child's command line."""
    from cli.launcher import Stack

    tracing = forward_args(ServerOptions, args, exclude=_SET_BY_UP)
    engine = forward_args(EngineConfig, args, exclude=("model", "revision"))
    return Stack(model_path, prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                  host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", DEFAULT_PORTS["gateway"]),
                  engine_args=[*engine, *tracing],
                  prefill_args=[*forward_args(PrefillWorkerConfig, args, exclude=(*_SET_BY_UP, *_TRACING, "engine")),
                                *_tp(args.prefill_tensor_parallel_size)],
                  decode_args=[*forward_args(DecodeWorkerConfig, args, exclude=(*_SET_BY_UP, *_TRACING, "engine")),
                               *_tp(args.decode_tensor_parallel_size)],
                  gateway_args=forward_args(GatewayConfig, args, exclude=_SET_BY_UP),
                  workdir=args.workdir, metrics_port=getattr(args, "metrics_port", 0),
                  log_args=["--log-level", args.log_level, "--log-format", args.log_format])


def _tp(size: int | None) -> list[str]:
    """A role's own --tensor-parallel-size (after the engine flags, so it wins over a shared one)."""
    return ["--tensor-parallel-size", str(size)] if size else []


def _metrics(info: dict[str, Any]) -> str:
    return f"  metrics http://{info['metrics_address']}/metrics" if "metrics_address" in info else ""


def ready_text(stack: Stack) -> str:
    """What `tandem up` prints once every process is ready: where each is, its log, and commands to try."""
    assert stack.gateway is not None
    gw = stack.gateway.info
    name = gw.get("model_name", "")
    lines = [f"  prefill worker  {c.info['address']}{_metrics(c.info)}   log {c.log_path}" for c in stack.prefill]
    lines += [f"  decode worker   {c.info['address']}  (KV {c.info.get('kv_address')}){_metrics(c.info)}   "
              f"log {c.log_path}" for c in stack.decode]
    lines.append(f"  gateway         {stack.address}{_metrics(gw)}   log {stack.gateway.log_path}")
    lines.append(f"gateway ready on {stack.address} (gRPC), serving model {name!r}")
    if "http_address" in gw:
        base = f"http://{gw['http_address']}"
        lines += [f"  OpenAI-compatible HTTP API {base}/v1 (also {base}/metrics, {base}/health)", "try:",
                  f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\",
                  f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": "
                  f"\"What is the capital of France?\"}}], \"max_tokens\": 64}}'",
                  "  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"" + base + "/v1\", "
                  "api_key=\"unused\"); print(c.chat.completions.create(model=\"" + name + "\", max_tokens=64, "
                  "messages=[{\"role\": \"user\", \"content\": \"Tell me a joke.\"}]).choices[0].message.content)'"]
    else:
        lines.append("try:")
    lines.append(f"  tandem generate --addr {stack.address} 'The capital of France is'")
    lines.append(f"Ctrl-C stops every process; a worker that exits is restarted. Logs: {stack.workdir}/*.log")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("up", help="start gateway + prefill + decode workers as local processes")
    p.add_argument("--prefill-workers", type=int, default=1, help="prefill worker processes (0: decode workers "
                   "prefill every prompt themselves)")
    p.add_argument("--decode-workers", type=int, default=1, help="decode worker processes")
    p.add_argument("--prefill-tensor-parallel-size", type=int, default=None, metavar="N",
                   help="prefill workers' tensor-parallel size, when it differs from the decode workers' "
                        "(default: --tensor-parallel-size; docs/tensor-parallel.md)")
    p.add_argument("--decode-tensor-parallel-size", type=int, default=None, metavar="N",
                   help="decode workers' tensor-parallel size (default: --tensor-parallel-size)")
    p.add_argument("--workdir", default=None, help="where each process's log (gateway.log, prefill-0.log, "
                   "decode-0.log, ...) and ready file go (default: a new temp dir, printed at start)")
    p.add_argument("--no-http", action="store_true", help=f"do not serve the OpenAI-compatible HTTP API (by "
                   f"default tandem up serves it on port {DEFAULT_HTTP_PORT}; --http-port picks another)")
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
    add_options(p.add_argument_group("engine (every worker)"), EngineConfig, passthrough=True,
                defaults={"model": DEFAULT_MODEL},
                helps={"model": "Hugging Face checkpoint directory, .gguf file, or a packaged model's name"})
    add_options(p.add_argument_group("gateway"), GatewayConfig, passthrough=True,
                exclude=("model", "decode_workers", "prefill_workers", "ready_file"),
                defaults={"port": DEFAULT_PORTS["gateway"]},
                helps={"host": "bind address of every process (the gateway's is the one clients dial)",
                       "http_port": f"serve the OpenAI-compatible HTTP API on this port (tandem up's default: "
                                    f"{DEFAULT_HTTP_PORT}; 0: any free port)",
                       "metrics_port": "Prometheus base port: the gateway here, prefill workers next, then decode "
                                       "workers (0: off)",
                       "otlp_endpoint": "every process sends traces here (http://host:4317 or 'console'); "
                                        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else off"})
    workers = p.add_argument_group("workers")
    for cls in (PrefillWorkerConfig, DecodeWorkerConfig):
        add_options(workers, cls, passthrough=True, exclude=("ready_file",))
    p.set_defaults(func=run)
