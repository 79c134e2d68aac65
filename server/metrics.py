"""Prometheus metrics: one CollectorRegistry per process, served on `--metrics-port` at /metrics.

Nothing touches prometheus_client's global default registry: each process main makes a registry,
hands it to its component, and `start_metrics_server` serves it. Counters and histograms are updated
where things happen (any thread: prometheus_client is thread-safe); gauges that mirror engine state
are read lazily at scrape time by `EngineCollector`, so the engine thread pays nothing for them.

Gateway (`GatewayMetrics`)
    tandem_gateway_time_to_first_token_seconds     histogram   request arrival -> first token relayed
    tandem_gateway_inter_token_latency_seconds     histogram   one per output token after the first
    tandem_gateway_e2e_request_latency_seconds     histogram   arrival -> last message
    tandem_gateway_requests_inflight               gauge
    tandem_gateway_requests_finished_total         counter     {finish_reason: length|stop|abort|error}
    tandem_gateway_requests_total                  counter     {code: OK|INVALID_ARGUMENT|CANCELLED|...}
    tandem_gateway_prompt_tokens_total, tandem_gateway_generation_tokens_total   counters
    tandem_gateway_routes_total                    counter     {mode: remote|local}
    tandem_gateway_route_prefix_hit_tokens_total   counter
Workers (`WorkerMetrics`, every series labelled {role: prefill|decode})
    tandem_kv_transfer_bytes, tandem_kv_transfer_seconds   histograms {role, direction: send|receive}
    tandem_kv_transfers_total                      counter     {role, direction, result: OK|TIMEOUT|...}
    tandem_queue_wait_seconds                      histogram   prefill: arrival -> first forward;
                                                               decode: Decode call -> KV adopted
    tandem_engine_step_seconds                     histogram   one engine step (schedule excluded)
    (EngineCollector, at scrape time)
    tandem_engine_running_sequences, tandem_engine_waiting_sequences     gauges
    tandem_engine_kv_blocks_used / _free / _total / _cached               gauges
    tandem_engine_prefix_cache_hit_rate            gauge       hit tokens / queried tokens (0 before any)
    tandem_engine_prefix_cache_queried_tokens_total, tandem_engine_prefix_cache_hit_tokens_total
    tandem_engine_preemptions_total, tandem_engine_computed_tokens_total
    tandem_spec_steps_total, tandem_spec_draft_tokens_total, tandem_spec_accepted_tokens_total,
    tandem_spec_acceptance_rate    (from Engine.stats(); 0 without speculative decoding)
    tandem_<name> gauges the worker adds (queue lengths: prefill_queued_requests, decode_kv_pending, ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# seconds: 1 ms .. ~2 min; bytes: 4 KiB .. 16 GiB
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0)
BYTES_BUCKETS = tuple(float(4096 * 4**i) for i in range(12))


def new_registry() -> CollectorRegistry:
    """A process's registry, with the standard process_* series (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


@dataclass
class MetricsServer:
    """The running /metrics HTTP server (a prometheus_client WSGI server on its own thread)."""

    server: Any
    thread: Any
    address: str

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve `registry` on http://host:port/metrics; None when port is 0 (metrics endpoint off).
    Raises ValueError for a port outside [0, 65535], OSError when the port is taken."""
    if not 0 <= port < 65536:
        raise ValueError(f"metrics port must be in [0, 65535], got {port}")
    if port == 0:
        return None
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry)
    address = f"{host}:{server.server_port}"
    logger.info("metrics on http://%s/metrics", address)
    return MetricsServer(server, thread, address)


class GatewayMetrics:
    """The gateway's request metrics (see the module docstring for names and labels)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ttft = Histogram("tandem_gateway_time_to_first_token_seconds", "Request arrival to first token relayed",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("tandem_gateway_inter_token_latency_seconds",
                             "Time between tokens relayed to the client (a message of k tokens counts k gaps of 1/k; "
                             "tokens sent with the first one count 0)",
                             registry=r, buckets=TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram("tandem_gateway_e2e_request_latency_seconds", "Request arrival to its last message",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.inflight = Gauge("tandem_gateway_requests_inflight", "Generate calls being served", registry=r)
        self.finished = Counter("tandem_gateway_requests_finished", "Requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.status = Counter("tandem_gateway_requests", "Generate calls ended, by gRPC status code", ["code"],
                              registry=r)
        self.prompt_tokens = Counter("tandem_gateway_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("tandem_gateway_generation_tokens", "Tokens relayed to clients",
                                         registry=r)
        self.routes = Counter("tandem_gateway_routes", "Routing decisions, by mode (remote or local prefill)",
                              ["mode"], registry=r)
        self.prefix_hit_tokens = Counter("tandem_gateway_route_prefix_hit_tokens",
                                         "Prompt tokens the router expected to hit a prefill worker's prefix cache",
                                         registry=r)


class WorkerMetrics:
    """A worker's event metrics; `role` is "prefill" or "decode" and labels every series."""

    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        self.role = role
        r = registry
        self.transfer_bytes = Histogram("tandem_kv_transfer_bytes", "KV payload bytes of one completed transfer",
                                        ["role", "direction"], registry=r, buckets=BYTES_BUCKETS)
        self.transfer_seconds = Histogram(
            "tandem_kv_transfer_seconds",
            "One transfer's KV streaming time (send: first byte -> KVDone; receive: first frame -> last written)",
            ["role", "direction"], registry=r, buckets=LATENCY_BUCKETS)
        self.transfers = Counter("tandem_kv_transfers", "KV transfers ended, by result", ["role", "direction", "result"],
                                 registry=r)
        self.queue_wait = Histogram(
            "tandem_queue_wait_seconds",
            "prefill: request arrival -> first forward; decode: Decode call -> KV adopted (admission)",
            ["role"], registry=r, buckets=LATENCY_BUCKETS).labels(role)
        self.step_seconds = Histogram("tandem_engine_step_seconds", "One engine step: forward, sampling, bookkeeping",
                                      ["role"], registry=r, buckets=TOKEN_LATENCY_BUCKETS).labels(role)

    def transfer(self, direction: str, ok_code: str, nbytes: int, seconds: float) -> None:
        """One transfer ended; bytes and seconds are observed for successful ones only."""
        self.transfers.labels(self.role, direction, ok_code).inc()
        if ok_code == "OK":
            self.transfer_bytes.labels(self.role, direction).observe(nbytes)
            self.transfer_seconds.labels(self.role, direction).observe(seconds)


class EngineCollector(Collector):
    """Engine state as gauges and counters, read when Prometheus scrapes.

    stats: returns engine.Engine.stats() (e.g. EngineLoop.stats, which takes the engine lock); its
        spec_steps / spec_draft_tokens / spec_accepted_tokens (engines that speculate) feed tandem_spec_*;
    extra: returns {name: value} for worker gauges exported as tandem_<name>{role}.
    """

    def __init__(self, role: str, stats: Callable[[], Mapping[str, int]],
                 extra: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.role = role
        self.stats = stats
        self.extra = extra

    def describe(self) -> Iterator[Any]:
        return iter(())  # unchecked: the series depend on what stats() reports

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        x = self.extra() if self.extra is not None else {}
        role = [self.role]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"tandem_{name}", doc, labels=["role"])
            g.add_metric(role, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"tandem_{name}", doc, labels=["role"])
            c.add_metric(role, value)
            return c

        total, free = s["kv_blocks_total"], s["kv_blocks_free"]
        yield gauge("engine_running_sequences", "Sequences in the running batch", s["running"])
        yield gauge("engine_waiting_sequences", "Sequences queued for admission", s["waiting"])
        yield gauge("engine_kv_blocks_total", "KV blocks in the pool", total)
        yield gauge("engine_kv_blocks_free", "KV blocks free (cached-but-unreferenced count as free)", free)
        yield gauge("engine_kv_blocks_used", "KV blocks referenced by sequences or reservations", total - free)
        yield gauge("engine_kv_blocks_cached", "Free KV blocks still named in the prefix cache", s["kv_blocks_cached"])
        queried, hit = s["prefix_query_tokens"], s["prefix_hit_tokens"]
        yield gauge("engine_prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens since start",
                    hit / queried if queried else 0.0)
        yield counter("engine_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", queried)
        yield counter("engine_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", hit)
        yield counter("engine_preemptions", "Sequences preempted for lack of KV blocks", s["preemptions"])
        yield counter("engine_computed_tokens", "Tokens run through the model", s["computed_tokens"])
        draft, accepted = s.get("spec_draft_tokens", 0), s.get("spec_accepted_tokens", 0)
        yield counter("spec_steps", "Sequence-steps that verified draft tokens", s.get("spec_steps", 0))
        yield counter("spec_draft_tokens", "Speculative draft tokens proposed", draft)
        yield counter("spec_accepted_tokens", "Speculative draft tokens accepted", accepted)
        yield gauge("spec_acceptance_rate", "Accepted / proposed draft tokens since start (0 without speculation)",
                    accepted / draft if draft else 0.0)
        for name, value in x.items():
            yield gauge(name, name.replace("_", " "), value)
