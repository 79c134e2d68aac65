"""The HTTP API as an operator sees it: a SERVER span and a counted status per request, one access
line, and Prometheus /metrics on the API's own port. `HttpObserver.install(app)` adds it to the
OpenAI app (gateway/http_api.py) before the app starts.

    POST /v1/chat/completions                 SERVER (http.* attributes; child of a `traceparent` header)
    └── chat <model>                          the request (gateway/observe.py), then its worker spans

The middleware is the outermost one, so it sees the status the client gets, whether the request was
refused while parsing (400, never reaching Generate), by a limit (429) or served. While it runs, the
request's `HttpCall` is the task's `HTTP_CALL`: the Generate observation (same task: the handler
awaits `GenerationService.generate` directly) takes its operation name and parent span from it and
writes its outcome back, so the access line says the tokens, TTFT and finish of that request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.logs import ACCESS_LOGGER
from server.metrics import GatewayMetrics
from server.tracing import Tracing, context_from_carrier

access_log = logging.getLogger(ACCESS_LOGGER)

OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}
CLIENT_CLOSED = 499  # nginx's "client closed request": the client went away before the answer


@dataclass
class HttpCall:
    """One HTTP request while it is served; the Generate observation fills in the outcome fields."""

    method: str
    route: str
    span: Span
    operation: str | None  # "chat" | "text_completion" for generation routes
    t0: float = field(default_factory=time.perf_counter)
    request_id: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # prompt_tokens, completion_tokens, ttft_ms, finish


HTTP_CALL: ContextVar[HttpCall | None] = ContextVar("tandem_http_call", default=None)


def _route(request: web.Request) -> str:
    """The matched route's template (bounded label values), or "unmatched" (404, 405)."""
    resource = getattr(getattr(request.match_info, "route", None), "resource", None)
    return resource.canonical if resource is not None else "unmatched"


class HttpObserver:
    """Spans, the `tandem_gateway_http_requests_total` counter, access lines and /metrics for the HTTP API."""

    def __init__(self, tracing: Tracing, metrics: GatewayMetrics, registry: CollectorRegistry) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.registry = registry

    def install(self, app: web.Application) -> None:
        """Add the middleware (outermost) and GET /metrics to `app` (before it is frozen)."""
        app.middlewares.insert(0, self.middleware)
        app.router.add_get("/metrics", self.serve_metrics)

    async def serve_metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        route = _route(request)
        call = HttpCall(request.method, route, self._start_span(request, route), OPERATIONS.get(route))
        token = HTTP_CALL.set(call)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            HTTP_CALL.reset(token)
            self._finish(call, status)

    def _start_span(self, request: web.Request, route: str) -> Span:
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() in ("traceparent", "tracestate")}
        parent = context_from_carrier(headers) if self.tracing.enabled else None
        host, _, port = (request.host or "").rpartition(":")
        attrs: dict[str, Any] = {"http.request.method": request.method, "url.path": request.path,
                                 "url.scheme": request.scheme, "http.route": route,
                                 "network.protocol.version": f"{request.version.major}.{request.version.minor}"}
        if host and port.isdigit():
            attrs.update({"server.address": host, "server.port": int(port)})
        if request.remote:
            attrs["client.address"] = request.remote
        if "User-Agent" in request.headers:
            attrs["user_agent.original"] = request.headers["User-Agent"]
        return self.tracing.tracer.start_span(f"{request.method} {route}", context=parent, kind=SpanKind.SERVER,
                                              attributes=attrs)

    def _finish(self, call: HttpCall, status: int) -> None:
        try:  # an observer never breaks serving
            self.metrics.http.labels(call.method, call.route, str(status)).inc()
            call.span.set_attribute("http.response.status_code", status)
            if status >= 500:
                call.span.set_attribute("error.type", str(status))
                call.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            call.span.end()
            duration_ms = round(1000 * (time.perf_counter() - call.t0), 1)
            fields = {"protocol": "http", "method": call.method, "route": call.route, "status": status,
                      "request_id": call.request_id, **call.fields, "duration_ms": duration_ms}
            access_log.info("%s", format_access(fields), extra={"fields": fields})
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).exception("HTTP observer failed")


def format_access(fields: dict[str, Any]) -> str:
    """An access line's text: `POST /v1/completions 200 id=... prompt_tokens=5 ... duration_ms=80.1`."""
    head = (f"{fields.get('method', 'gRPC')} {fields.get('route', '')} {fields.get('status', '')}").strip()
    rest = " ".join(f"{k if k != 'request_id' else 'id'}={v}" for k, v in fields.items()
                    if k not in ("protocol", "method", "route", "status") and v not in ("", None))
    return f"{head} {rest}"
