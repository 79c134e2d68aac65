"""`tandem up`: the whole stack as local processes; Ctrl-C or SIGTERM stops every one of them."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any


def run(args: argparse.Namespace) -> int:
    from tandem.launcher import Stack

    engine_args = ["--device", args.device, "--dtype", args.dtype]
    if args.num_kv_blocks:
        engine_args += ["--num-kv-blocks", str(args.num_kv_blocks)]
    if args.quantization:
        engine_args += ["--quantization", args.quantization]
    engine_args += ["--kv-cache-dtype", args.kv_cache_dtype]
    tracing_args = ["--trace-sample-ratio", str(args.trace_sample_ratio)]
    if args.otlp_endpoint is not None:
        tracing_args += ["--otlp-endpoint", args.otlp_endpoint]
    spec_args: list[str] = []  # decode workers speculate; prefill workers would ignore it
    for flag, value in (("--speculative-model", args.speculative_model),
                        ("--speculative-method", args.speculative_method),
                        ("--num-speculative-tokens", args.num_speculative_tokens)):
        if value is not None:
            spec_args += [flag, str(value)]
    stack = Stack(args.model, prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                  host=args.host, port=args.port, engine_args=[*engine_args, *tracing_args],
                  gateway_args=["--local-prefill-threshold", str(args.local_prefill_threshold), *tracing_args,
                                *(["--http-port", str(args.http_port)] if args.http_port is not None else [])],
                  workdir=args.workdir, metrics_port=args.metrics_port, decode_args=spec_args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting {args.prefill_workers} prefill + {args.decode_workers} decode workers on {args.model} ...",
          flush=True)
    stack.start(timeout_s=args.startup_timeout)
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
        while not stop.wait(0.5):
            dead = [c.name for c in [stack.gateway, *stack.prefill, *stack.decode]
                    if c is not None and c.proc is not None and c.proc.poll() is not None]
            if dead:
                print(f"stopping: {', '.join(dead)} exited (logs in {stack.workdir})", flush=True)
                return 1
    finally:
        stack.stop()
        print("stopped", flush=True)
    return 0


def _metrics(info: dict[str, Any]) -> str:
    return f"  metrics http://{info['metrics_address']}/metrics" if "metrics_address" in info else ""


def register(subparsers: Any) -> None:
    from engine.config import KV_CACHE_DTYPES, QUANTIZATIONS
    from tandem.cmd_components import add_speculative_args

    p = subparsers.add_parser("up", help="start gateway + prefill + decode workers as local processes")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="the gateway's bind address")
    p.add_argument("--port", type=int, default=50051, help="the gateway's port")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="every worker quantizes its weights at load (docs/quantization.md)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="fp8: float8_e4m3fn KV pages on every worker")
    p.add_argument("--local-prefill-threshold", type=int, default=32)
    add_speculative_args(p)
    p.add_argument("--workdir", default=None, help="where ready files and logs go (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--http-port", type=int, default=None,
                   help="the gateway's OpenAI-compatible HTTP API port (0: any free port; default: off)")
    p.add_argument("--otlp-endpoint", default=None,
                   help="every process sends traces here (http://host:4317 or 'console'); "
                        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else off")
    p.add_argument("--trace-sample-ratio", type=float, default=1.0, help="fraction of requests traced")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus base port: gateway here, prefill workers next, then decode workers (0: off)")
    p.set_defaults(func=run)
