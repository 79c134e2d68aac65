"""Prometheus metrics: one CollectorRegistry per process, served on `--metrics-port` at /metrics
(and, on the gateway, on the HTTP API's port: gateway/http_observe.py).

Nothing touches prometheus_client's global default registry: each process main makes a registry with
`new_registry(model_name, role)`, hands it to its component, and `start_metrics_server` serves it.
Every series of that registry carries `model_name` (the checkpoint's name, engine.checkpoint.model_name;
the gateway's is its served name); `tandem_info{version, role}` is 1. No `_created` series are
exported (`disable_created_metrics`, process-wide, set by `new_registry`). Counters and histograms
are updated where things happen (any thread: prometheus_client is thread-safe); gauges that mirror
engine state are read lazily at scrape time by `EngineCollector`, so the engine thread pays nothing.

Gateway (`GatewayMetrics`)
    tandem_gateway_time_to_first_token_seconds     histogram   request arrival -> first token relayed
    tandem_gateway_inter_token_latency_seconds     histogram   one per output token after the first
    tandem_gateway_e2e_request_latency_seconds     histogram   arrival -> last message
    tandem_gateway_request_prompt_tokens           histogram   per finished request
    tandem_gateway_request_generation_tokens       histogram   per finished request
    tandem_gateway_requests_inflight               gauge
    tandem_gateway_requests_finished_total         counter     {finish_reason: length|stop|abort|error}
                                                               (a cancelled admitted request: abort)
    tandem_gateway_requests_total                  counter     {code: OK|INVALID_ARGUMENT|CANCELLED|...}
    tandem_gateway_http_requests_total             counter     {method, route, status}: every HTTP answer,
                                                               400s refused before Generate included
    tandem_gateway_prompt_tokens_total, tandem_gateway_generation_tokens_total   counters
    tandem_gateway_routes_total                    counter     {mode: remote|local}
    tandem_gateway_constrained_requests_total      counter     {kind: json_object|json_schema|regex|grammar|
                                                               choice|structural_tag}
    tandem_gateway_grammar_check_seconds           histogram   checking a spec before admission (cache: hit|miss)
    tandem_gateway_route_prefix_hit_tokens_total   counter
Workers (`WorkerMetrics`, every series labelled {role: prefill|decode})
    tandem_kv_transfer_bytes, tandem_kv_transfer_seconds   histograms {role, direction: send|receive}
    tandem_kv_transfers_total                      counter     {role, direction, result: OK|TIMEOUT|...}
    tandem_request_queue_time_seconds              histogram   prefill: arrival -> first forward;
                                                               decode: Decode call -> KV adopted
    tandem_request_prefill_time_seconds            histogram   first forward -> last prompt chunk computed
                                                               (decode: local prefills)
    tandem_request_decode_time_seconds             histogram   decode: first token -> finished
    tandem_engine_step_seconds                     histogram   one engine step (schedule excluded)
    tandem_engine_iteration_tokens                 histogram   tokens one engine step ran through the model
    tandem_grammar_compile_seconds                 histogram   {role, kind, cache: hit|miss} a constrained
                                                               request's wait for its compiled grammar
    tandem_grammar_mask_seconds                    histogram   one step's token masks (every constrained row),
                                                               filled while the forward runs
    tandem_grammar_mask_wait_seconds               histogram   what the step still waited for them after its
                                                               forward (0 when the forward hid them)
    tandem_constrained_requests_total              counter     {role, kind: json_schema|regex|...}
    (EngineCollector, at scrape time)
    tandem_engine_running_sequences, tandem_engine_waiting_sequences     gauges
    tandem_engine_kv_blocks_used / _free / _cached / _capacity           gauges
    tandem_engine_kv_cache_usage_ratio             gauge       used / capacity (0..1)
    tandem_engine_prefix_cache_hit_rate            gauge       hit tokens / queried tokens (0 before any)
    tandem_engine_prefix_cache_queried_tokens_total, tandem_engine_prefix_cache_hit_tokens_total
    tandem_engine_preemptions_total, tandem_engine_computed_tokens_total
    tandem_spec_steps_total, tandem_spec_draft_tokens_total, tandem_spec_accepted_tokens_total,
    tandem_spec_acceptance_rate    (from Engine.stats(); 0 without speculative decoding)
    tandem_<name> gauges the worker adds (queue lengths: prefill_queued_requests, decode_kv_pending, ...)
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    Metric,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# seconds: 1 ms .. ~2 min; bytes: 4 KiB .. 16 GiB
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0)
BYTES_BUCKETS = tuple(float(4096 * 4**i) for i in range(12))
TOKEN_COUNT_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
                       16384.0, 32768.0, 131072.0)
ROLES = ("gateway", "prefill", "decode")


def tandem_version() -> str:
    try:
        return version("tandem")
    except PackageNotFoundError:
        return "unknown"


class LabelledRegistry(CollectorRegistry):
    """A registry whose every sample also carries `const_labels` (model_name), added at collection."""

    def __init__(self, const_labels: Mapping[str, str]) -> None:
        super().__init__(auto_describe=True)
        self.const_labels = dict(const_labels)

    def collect(self) -> Iterable[Metric]:
        for family in super().collect():
            family.samples = [s._replace(labels={**self.const_labels, **s.labels}) for s in family.samples]
            yield family


def new_registry(model_name: str = "", role: str = "") -> CollectorRegistry:
    """A process's registry: the standard process_* series (CPU, memory, fds) and python_gc_* series
    (collections per generation), `tandem_gc_frozen_objects` (what `engine.heap.freeze_startup_heap`
    took out of the collector's reach), `tandem_info{version, role}` = 1 and `model_name` on every
    series (when given). Turns `_created` series off for the whole process (prometheus_client's one
    switch; no Tandem process exports them).
    Raises ValueError for a role other than gateway, prefill or decode."""
    if role and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    disable_created_metrics()
    registry = LabelledRegistry({"model_name": model_name} if model_name else {})
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    Gauge("tandem_gc_frozen_objects", "Objects alive when the process started serving, frozen out of Python's cyclic "
          "garbage collector (gc.freeze), so a full collection never walks them", registry=registry
          ).set_function(gc.get_freeze_count)
    if role:
        Info("tandem", "The Tandem build and this process's role", registry=registry).info(
            {"version": tandem_version(), "role": role})
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
        self.prompt_tokens_hist = Histogram("tandem_gateway_request_prompt_tokens", "Prompt tokens of one finished "
                                            "request", registry=r, buckets=TOKEN_COUNT_BUCKETS)
        self.generation_tokens_hist = Histogram("tandem_gateway_request_generation_tokens",
                                                "Tokens generated for one finished request", registry=r,
                                                buckets=TOKEN_COUNT_BUCKETS)
        self.inflight = Gauge("tandem_gateway_requests_inflight", "Generate calls being served", registry=r)
        self.http = Counter("tandem_gateway_http_requests", "HTTP API answers, by method, route and status "
                            "(requests refused before Generate included)", ["method", "route", "status"], registry=r)
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
        self.constrained = Counter("tandem_gateway_constrained_requests", "Requests with a structured output, by "
                                   "kind", ["kind"], registry=r)
        self.grammar_check = Histogram("tandem_gateway_grammar_check_seconds", "Checking a structured output spec "
                                       "before admission", ["cache"], registry=r, buckets=TOKEN_LATENCY_BUCKETS)


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
            "tandem_request_queue_time_seconds",
            "prefill: request arrival -> first forward; decode: Decode call -> KV adopted (admission)",
            ["role"], registry=r, buckets=LATENCY_BUCKETS).labels(role)
        self.prefill_time = Histogram(
            "tandem_request_prefill_time_seconds",
            "First forward of a request -> its last prompt chunk computed (decode workers: local prefills)",
            ["role"], registry=r, buckets=LATENCY_BUCKETS).labels(role)
        self.decode_time = Histogram("tandem_request_decode_time_seconds",
                                     "A request's first token on this worker -> finished", ["role"], registry=r,
                                     buckets=LATENCY_BUCKETS).labels(role)
        self.step_seconds = Histogram("tandem_engine_step_seconds", "One engine step: forward, sampling, bookkeeping",
                                      ["role"], registry=r, buckets=TOKEN_LATENCY_BUCKETS).labels(role)
        self.iteration_tokens = Histogram("tandem_engine_iteration_tokens",
                                          "Tokens one engine step ran through the model (prompt chunks, decodes, "
                                          "drafts)", ["role"], registry=r, buckets=TOKEN_COUNT_BUCKETS).labels(role)

        self.grammar_compile = Histogram("tandem_grammar_compile_seconds", "A constrained request's wait for its "
                                         "compiled grammar (cache hit: ~0)", ["role", "kind", "cache"], registry=r,
                                         buckets=TOKEN_LATENCY_BUCKETS)
        self.grammar_mask = Histogram("tandem_grammar_mask_seconds", "One step's token masks (every constrained row), "
                                      "filled while the forward runs", ["role"], registry=r,
                                      buckets=TOKEN_LATENCY_BUCKETS).labels(role)
        self.grammar_mask_wait = Histogram("tandem_grammar_mask_wait_seconds", "What a step still waited for its "
                                           "token masks after its forward", ["role"], registry=r,
                                           buckets=TOKEN_LATENCY_BUCKETS).labels(role)
        self.constrained = Counter("tandem_constrained_requests", "Requests with a structured output, by kind",
                                   ["role", "kind"], registry=r)

    def grammar_compiled(self, kind: str, seconds: float, cached: bool) -> None:
        """A constrained request got its grammar (compiled now, or from the cache)."""
        self.constrained.labels(self.role, kind).inc()
        self.grammar_compile.labels(self.role, kind, "hit" if cached else "miss").observe(seconds)

    def step_masks(self, step: Any) -> None:
        """A step's mask timings (engine.structured.masks.PendingMasks), when it had constrained rows."""
        masks = getattr(step, "masks", None)
        if masks is not None:
            self.grammar_mask.observe(masks.fill_seconds)
            self.grammar_mask_wait.observe(masks.wait_seconds)

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
        yield gauge("engine_kv_blocks_capacity", "KV blocks in the pool", total)
        yield gauge("engine_kv_blocks_free", "KV blocks free (cached-but-unreferenced count as free)", free)
        yield gauge("engine_kv_blocks_used", "KV blocks referenced by sequences or reservations", total - free)
        yield gauge("engine_kv_blocks_cached", "Free KV blocks still named in the prefix cache", s["kv_blocks_cached"])
        yield gauge("engine_kv_cache_usage_ratio", "KV blocks used / capacity (0..1)", (total - free) / total if total
                    else 0.0)
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
