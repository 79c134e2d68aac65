"""OpenTelemetry for every Tandem process: one `setup_tracing()` in each process's main.

    endpoint                       where spans go
    ---------------------------    -------------------------------------------------------------
    None                           $OTEL_EXPORTER_OTLP_ENDPOINT if set, else off
    "", "off", "none"              off: a no-op tracer; nothing is recorded (the default)
    "console"                      printed as JSON on stdout (debugging)
    "http://host:4317", host:4317  OTLP over gRPC, plaintext (Jaeger, an OpenTelemetry collector)

One trace per request crosses all three processes: gRPC requests carry a W3C `traceparent` in their
metadata (and in the request's `traceparent` field), KV transfers in the KVTransferBegin header.
Sampling is ParentBased(TraceIdRatioBased(sample_ratio)): the gateway decides, workers follow.

Spans are never made "current" (no context is attached): every span names its parent explicitly,
which is the only thing that works across the engine thread, the KV I/O threads and asyncio.
Engine-thread spans are recorded after the fact from perf-counter timestamps (`record_span`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.grpc_server import status_for

logger = logging.getLogger(__name__)

OFF = ("", "off", "none")
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_NAMES = {"gateway": "tandem-gateway", "prefill": "tandem-prefill", "decode": "tandem-decode"}

_PROPAGATOR = TraceContextTextMapPropagator()  # stateless


@dataclass(frozen=True)
class Tracing:
    """A process's tracer. `enabled` is False for the no-op tracer: callers skip span bookkeeping.

    `provider` is the SDK TracerProvider when enabled (typed loosely so the SDK is imported only
    when tracing is on); `shutdown()` flushes queued spans and stops the exporter.
    """

    tracer: Tracer
    enabled: bool
    provider: Any = None
    endpoint: str = ""

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self.provider is not None:
            self.provider.force_flush(int(timeout_s * 1000))
            self.provider.shutdown()


def disabled() -> Tracing:
    """The off switch: a no-op tracer whose spans cost a few hundred nanoseconds and record nothing."""
    return Tracing(trace.NoOpTracer(), False)


def resolve_endpoint(endpoint: str | None) -> str:
    """The effective endpoint: the argument, else $OTEL_EXPORTER_OTLP_ENDPOINT, else off ("")."""
    value = os.environ.get(ENDPOINT_ENV, "") if endpoint is None else endpoint
    value = value.strip()
    return "" if value.lower() in OFF else value


def setup_tracing(service_name: str, *, endpoint: str | None = None, sample_ratio: float = 1.0,
                  instance_id: str | None = None) -> Tracing:
    """Wire OpenTelemetry for this process and return its tracer.

    Sets the global tracer provider (once per process: call it from the process's main, never from
    library code) unless tracing is off, in which case nothing global is touched. `service.name` is
    `service_name`; `service.instance.id` is `instance_id` or host-pid-random. Raises ValueError for
    a sample_ratio outside [0, 1].
    """
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"trace sample ratio must be in [0, 1], got {sample_ratio}")
    target = resolve_endpoint(endpoint)
    if not target:
        return disabled()
    # the SDK and the exporter are imported only when tracing is on
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    instance = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    resource = Resource.create({"service.name": service_name, "service.instance.id": instance})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    exporter: SpanExporter
    if target.lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if "://" not in target:
            target = f"http://{target}"
        # an http:// endpoint means a plaintext channel, https:// TLS (the exporter reads the scheme)
        exporter = OTLPSpanExporter(endpoint=target)
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* env vars tune it
    trace.set_tracer_provider(provider)
    logger.info("tracing on: %s -> %s (sample ratio %g, instance %s)", service_name, target, sample_ratio, instance)
    return Tracing(provider.get_tracer("tandem"), True, provider, target)


# ----------------------------------------------------------------- context across processes
def context_from_carrier(carrier: Mapping[str, str]) -> Context | None:
    """The remote parent named by a `traceparent` (+ `tracestate`) carrier, or None if absent/invalid."""
    if not carrier.get("traceparent"):
        return None
    ctx = _PROPAGATOR.extract(carrier=dict(carrier))
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def context_from_traceparent(traceparent: str) -> Context | None:
    return context_from_carrier({"traceparent": traceparent}) if traceparent else None


@dataclass
class RequestTrace:
    """A worker observer's per-request tracing state, kept on the request's record (engine thread)."""

    traceparent: str = ""  # the worker RPC's SERVER span
    _parent: Context | None = None
    _resolved: bool = False

    def parent(self, tracing: Tracing) -> Context | None:
        """The parent Context of this request's engine-side spans, or None when tracing is off or the
        trace is not sampled; worked out once."""
        if not self._resolved:
            ctx = context_from_traceparent(self.traceparent) if tracing.enabled else None
            sampled = ctx is not None and trace.get_current_span(ctx).get_span_context().trace_flags.sampled
            self._parent, self._resolved = (ctx if sampled else None), True
        return self._parent


def context_of(span: Span) -> Context:
    """A context whose parent is `span` (for `start_span(context=...)`)."""
    return trace.set_span_in_context(span)


def carrier_of(span: Span) -> dict[str, str]:
    """`span` as W3C headers ({"traceparent": ..., maybe "tracestate": ...}); {} for a no-op span."""
    carrier: dict[str, str] = {}
    if span.get_span_context().is_valid:
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def traceparent_of(span: Span) -> str:
    return carrier_of(span).get("traceparent", "")


# ----------------------------------------------------------------- after-the-fact spans
def epoch_ns_from_perf(perf_ns: int) -> int:
    """A `time.perf_counter_ns()` reading as wall-clock epoch ns (OpenTelemetry's timestamps).

    The offset is taken now, so a long-running process never drifts."""
    return time.time_ns() - time.perf_counter_ns() + perf_ns


def epoch_ns_from_monotonic(t: float) -> int:
    """A `time.monotonic()` reading as wall-clock epoch ns."""
    return time.time_ns() - time.monotonic_ns() + int(t * 1e9)


def record_span(tracer: Tracer, name: str, parent: Context | None, start_ns: int, end_ns: int,
                attributes: Mapping[str, Any] | None = None, *, kind: SpanKind = SpanKind.INTERNAL) -> Span:
    """Record a finished span [start_ns, end_ns] (epoch ns) under `parent`; returns it (ended)."""
    span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes, start_time=start_ns)
    span.end(end_time=max(end_ns, start_ns))
    return span


# ----------------------------------------------------------------- gRPC server spans
def start_server_span(tracing: Tracing, method: str, metadata: Any, traceparent_field: str = "",
                      attributes: Mapping[str, Any] | None = None) -> Span:
    """A SERVER span for an incoming RPC `method` ("tandem.v1.PrefillWorker/Prefill"), child of the
    caller's context: the `traceparent` metadata, else the request's `traceparent` field.
    `metadata` is `context.invocation_metadata()` (pairs or None)."""
    if not tracing.enabled:
        return trace.INVALID_SPAN
    carrier = {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate") and isinstance(v, str)}
    parent = context_from_carrier(carrier) or context_from_traceparent(traceparent_field)
    service, _, name = method.rpartition("/")
    attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, **(attributes or {})}
    return tracing.tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes=attrs)


def grpc_status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for `exc` (cancellation: CANCELLED)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED, "cancelled by the caller"
    code, message, _ = status_for(exc)
    return code, message


def finish_span(span: Span, exc: BaseException | None = None) -> None:
    """End `span`; with `exc`, mark it failed with the gRPC status code the client will see."""
    if exc is not None and span.is_recording():
        code, message = grpc_status_of(exc)
        if code is not grpc.StatusCode.CANCELLED:
            span.record_exception(exc)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_attribute("error.type", code.name)
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))
    span.end()
