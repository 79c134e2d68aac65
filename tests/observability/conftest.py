"""One real 1 prefill + 1 decode stack for the observability tests, with tracing and metrics on.

`otlp_sink` is an OTLP/gRPC trace receiver in this process (the opentelemetry-proto service
definition, nothing of ours): every process of the stack exports its spans to it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from cli.launcher import Stack
from tests.e2e.conftest import ENGINE_ARGS


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ExportedSpan:
    service: str  # resource service.name
    instance: str  # resource service.instance.id
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span; `wait_for(predicate)` polls with a deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ExportedSpan] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        got: list[ExportedSpan] = []
        for rs in request.resource_spans:
            res = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ExportedSpan(res.get("service.name", ""), res.get("service.instance.id", ""),
                                            s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                            s.kind, _attrs(s.attributes), s.start_time_unix_nano,
                                            s.end_time_unix_nano))
        with self._lock:
            self._spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[list[ExportedSpan]], bool], timeout_s: float = 20.0
                 ) -> list[ExportedSpan]:
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"spans did not arrive within {timeout_s} s; have {names}")
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def otlp_sink() -> Iterator[tuple[SpanSink, int]]:
    """(sink, port): the receiver is *not* started yet, only its port chosen: `start_sink` starts it
    once the stack's processes exist (forking while a gRPC server's threads poll can abort the child)."""
    yield SpanSink(), _free_port()


def start_sink(sink: SpanSink, port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise OSError(f"port {port} was taken before the OTLP receiver could bind it")
    server.start()
    return server


def start_stack(model: Path, workdir: Path, env: dict[str, str] | None = None) -> tuple[Stack, dict[str, int]]:
    """A 1 prefill + 1 decode stack with /metrics and the HTTP API on; returns it and {role: metrics port}."""
    ports = {role: _free_port() for role in ("gateway", "prefill", "decode")}
    stack = Stack(model, engine_args=ENGINE_ARGS, env=env, workdir=workdir,
                  gateway_args=["--local-prefill-threshold", "0", "--metrics-port", str(ports["gateway"]),
                                "--http-port", "0"],
                  prefill_args=["--metrics-port", str(ports["prefill"])],
                  decode_args=["--metrics-port", str(ports["decode"])])
    return stack.start(), ports


@pytest.fixture(scope="module")
def traced_stack(tiny_model: Callable[..., Path], otlp_sink: tuple[SpanSink, int],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose three processes export spans to `otlp_sink` every 100 ms."""
    sink, port = otlp_sink
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    stack, _ = start_stack(tiny_model("llama", max_position_embeddings=1024), tmp_path_factory.mktemp("traced"), env)
    try:
        server = start_sink(sink, port)
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()
    server.stop(grace=None)
