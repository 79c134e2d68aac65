"""What tracing and metrics cost, on CPU: the same requests through local stacks with each turned on or off.

Run: `.venv/bin/python -m bench.tracing_overhead` (a few minutes). Three real stacks (gateway, 1 prefill
+ 1 decode worker, tiny 2-layer model: the worst case, where the model's own work is smallest) run
side by side, and every round sends the same workload to each in turn, so background load hits all
three alike (the order rotates every round):
  * off:     no --otlp-endpoint, no --metrics-port (metrics are still counted in-process, not served)
  * metrics: --metrics-port on every process, scraped once per round
  * traced:  metrics + --otlp-endpoint to an OTLP/gRPC receiver in this process, sample ratio 1.0
Measured per config: client latency of sequential requests (median, p90), wall time of a concurrent
burst, and the CPU seconds the three processes used per request (from /proc: the honest number on a
shared machine). Also: the cost of one engine-thread span with the no-op tracer and with the SDK.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from training.tiny import make_tiny_model

ENGINE = ["--device", "cpu", "--dtype", "float32", "--block-size", "16", "--num-kv-blocks", "1024"]


class CountingSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP receiver that only counts spans (a stand-in for Jaeger on the same host)."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(stack: Stack) -> float:
    """utime + stime of the stack's processes, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for c in [stack.gateway, *stack.prefill, *stack.decode]:
        assert c is not None and c.proc is not None
        fields = Path(f"/proc/{c.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def one(stub: generation_pb2_grpc.GenerationStub, prompt: list[int], max_tokens: int) -> float:
    t0 = time.perf_counter()
    n = sum(len(m.token_ids) for m in stub.Generate(gen.GenerateRequest(
        prompt_token_ids=prompt, sampling=gen.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                             ignore_eos=True)), timeout=120))
    assert n == max_tokens
    return time.perf_counter() - t0


def workload(stack: Stack, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Sequential requests, then a concurrent burst; distinct prompts (no prefix-cache hits)."""
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(args.prompt_tokens)] for _ in range(args.requests + args.burst)]
    with grpc.insecure_channel(stack.address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        cpu0 = cpu_seconds(stack)
        lat = [one(stub, p, args.max_tokens) for p in prompts[: args.requests]]
        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(args.burst) as pool:
            list(pool.map(lambda p: one(stub, p, args.max_tokens), prompts[args.requests:]))
        burst = time.perf_counter() - t0
        cpu = cpu_seconds(stack) - cpu0
    return {"latency_s": lat, "burst_s": burst, "cpu_s_per_request": cpu / (args.requests + args.burst)}


def span_cost_us(n: int = 20000) -> dict[str, float]:
    """One after-the-fact span (what the engine thread records), no-op tracer vs the SDK."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import NoOpTracer

    from server.tracing import record_span

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    out = {}
    for name, tracer in (("noop", NoOpTracer()), ("sdk", provider.get_tracer("bench"))):
        root = tracer.start_span("root")
        from opentelemetry import trace

        ctx = trace.set_span_in_context(root)
        t0 = time.perf_counter()
        for i in range(n):
            record_span(tracer, "decode.steps", ctx, i, i + 1, {"tandem.request_id": "x", "tandem.decode.tokens": 16})
        out[name] = (time.perf_counter() - t0) / n * 1e6
    provider.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: a tiny random llama)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=24, help="sequential requests per round")
    ap.add_argument("--burst", type=int, default=8, help="concurrent requests per round")
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the raw results here as JSON")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tandem-obs-bench-"))
    model = Path(args.model) if args.model else make_tiny_model(work / "model", "llama")

    sink, sink_port = CountingSink(), free_port()
    configs: dict[str, list[str]] = {"off": [], "metrics": [], "traced": []}
    env = {"traced": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}", "OTEL_BSP_SCHEDULE_DELAY": "500"}}
    metrics_ports: dict[str, int] = {}
    stacks: dict[str, Stack] = {}
    try:
        for name in configs:
            mp = free_port() if name != "off" else 0
            metrics_ports[name] = mp
            stacks[name] = Stack(model, engine_args=ENGINE, gateway_args=["--local-prefill-threshold", "0"],
                                 workdir=work / name, env=env.get(name, {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}),
                                 metrics_port=mp).start(timeout_s=300)
        # the receiver starts after every fork: a gRPC server's threads and fork() do not mix
        server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
        server.add_insecure_port(f"127.0.0.1:{sink_port}")
        server.start()
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for stack in stacks.values():  # warm-up
            workload(stack, argparse.Namespace(**{**vars(args), "requests": 2, "burst": 2}), seed=999)
        names = list(stacks)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[: r % 3]:  # rotate: no config always goes first
                stack = stacks[name]
                results[name].append(workload(stack, args, seed=r))
                if metrics_ports[name]:
                    for port in range(metrics_ports[name], metrics_ports[name] + 3):
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        seen, deadline = -1, time.monotonic() + 10  # let the last batches arrive
        while sink.spans != seen and time.monotonic() < deadline:
            seen = sink.spans
            time.sleep(1.5)
        server.stop(grace=1.0)
    finally:
        for stack in stacks.values():
            stack.stop()

    summary = {}
    for name, rounds in results.items():
        lat = sorted(x for r in rounds for x in r["latency_s"])
        summary[name] = {
            "latency_median_ms": statistics.median(lat) * 1e3,
            "latency_p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1e3,
            "burst_median_s": statistics.median(r["burst_s"] for r in rounds),
            "cpu_ms_per_request": statistics.median(r["cpu_s_per_request"] for r in rounds) * 1e3,
        }
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores",
        "args": vars(args), "summary": summary, "spans_received": sink.spans, "span_cost_us": span_cost_us(),
        "raw": results,
    }
    print(f"{'config':8} {'median ms':>10} {'p90 ms':>8} {'burst s':>8} {'CPU ms/req':>11}")
    for name, s in summary.items():
        print(f"{name:8} {s['latency_median_ms']:10.1f} {s['latency_p90_ms']:8.1f} {s['burst_median_s']:8.2f} "
              f"{s['cpu_ms_per_request']:11.1f}")
    print(f"spans received: {sink.spans}; one engine-thread span: noop {report['span_cost_us']['noop']:.2f} us, "
          f"sdk {report['span_cost_us']['sdk']:.2f} us")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
