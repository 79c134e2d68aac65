"""The gateway's view of each request for traces, metrics and the access log: one `RequestObservation`
per Generate.

    text_completion <model>                SERVER root (child of the client's traceparent, if any);
                                           over HTTP: `chat <model>` or `text_completion <model>`, a
                                           child of the HTTP SERVER span (gateway/http_observe.py)
    ├── gateway.tokenize                   validation + tokenization (off the event loop)
    ├── gateway.route                      which workers, why, the expected prefix hit
    ├── tandem.v1.DecodeWorker/Decode      CLIENT: the decode stream (the decode worker's spans below it)
    └── tandem.v1.PrefillWorker/Prefill    CLIENT: remote prefill only (the prefill worker's spans below it)

Root attributes follow the OpenTelemetry GenAI semantic conventions (gen_ai.operation.name,
gen_ai.request.model / max_tokens / temperature / top_p, gen_ai.usage.input_tokens / output_tokens,
gen_ai.response.finish_reasons) plus rpc.* and tandem.*; a "gen_ai.finish" event marks the finish.
With `capture_content` (opt-in: prompts may hold personal data) the root also carries
gen_ai.input.messages (the prompt as the model saw it, chat template applied) and
gen_ai.output.messages (the completion), JSON as the GenAI conventions write them.
Every span is given its parent explicitly; nothing is attached to the asyncio context.

Each request ends in one line on the `tandem.access` logger (id, route, tokens, TTFT, status, finish):
written here for gRPC calls, by the HTTP middleware (with the HTTP status) for HTTP ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from engine.sampling.params import SamplingParams
from gateway.http_observe import HTTP_CALL, HttpCall, format_access
from gateway.router import Route
from server.logs import ACCESS_LOGGER
from server.metrics import GatewayMetrics, new_registry
from server.tracing import (
    Tracing,
    carrier_of,
    context_from_carrier,
    context_of,
    disabled,
    finish_span,
    grpc_status_of,
)
from tandem.v1 import generation_pb2 as gen

OPERATION = "text_completion"
_FINISH_NAMES: dict[int, str] = {gen.FINISH_REASON_LENGTH: "length", gen.FINISH_REASON_STOP: "stop",
                 gen.FINISH_REASON_ABORT: "abort", gen.FINISH_REASON_ERROR: "error"}


access_log = logging.getLogger(ACCESS_LOGGER)
_ABORTED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


class GatewayObserver:
    """The gateway process's tracer and metrics; `start()` opens one request's observation.

    `decode(ids)` (the tokenizer's, special tokens kept) is given when prompts and completions are
    captured on spans (`capture_content`); None leaves them out."""

    def __init__(self, tracing: Tracing | None = None, metrics: GatewayMetrics | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self.tracing = tracing or disabled()
        self.metrics = metrics or GatewayMetrics(new_registry())
        self.decode = decode if self.tracing.enabled else None

    def start(self, rid: str, model: str, metadata: Any) -> RequestObservation:
        """`metadata`: the call's invocation metadata (a client `traceparent` there becomes the parent)."""
        return RequestObservation(self, rid, model, metadata)


class RequestObservation:
    """One Generate call: its root span, its client spans, TTFT / ITL / e2e timing. asyncio thread only."""

    def __init__(self, owner: GatewayObserver, rid: str, model: str, metadata: Any) -> None:
        self.tracer = owner.tracing.tracer
        self.metrics = owner.metrics
        self.decode = owner.decode
        self.rid = rid
        self.t0 = time.perf_counter()
        self.t_last = 0.0
        self.ttft_s: float | None = None
        self.tokens = 0
        self.prompt_tokens = 0
        self.routed_ok = False
        self.finish_reason = ""
        self.output: list[str] = []
        self.http: HttpCall | None = HTTP_CALL.get()
        pairs = [(k, v) for k, v in (metadata or ()) if k in ("traceparent", "tracestate") and isinstance(v, str)]
        self.incoming = dict(pairs)  # forwarded as-is when this process does not trace
        parent = context_from_carrier(self.incoming) if owner.tracing.enabled else None
        operation = OPERATION
        attrs: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": "tandem.v1.Generation", "rpc.method": "Generate"}
        kind = SpanKind.SERVER
        if self.http is not None:  # under the HTTP SERVER span
            operation, attrs, kind = self.http.operation or OPERATION, {}, SpanKind.INTERNAL
            parent = context_of(self.http.span) if owner.tracing.enabled else None
            self.http.request_id = rid
        self.root: Span = self.tracer.start_span(f"{operation} {model}", context=parent, kind=kind, attributes={
            "gen_ai.operation.name": operation, "gen_ai.request.model": model, "gen_ai.response.model": model,
            "gen_ai.response.id": rid, **attrs, "tandem.request_id": rid,
        })
        self.ctx = context_of(self.root)
        if self.http is not None and not self.incoming:  # workers' spans join the HTTP request's trace
            self.incoming = carrier_of(self.http.span)
        self._open: list[Span] = []
        self.metrics.inflight.inc()

    # ---------------------------------------------------------------- stages
    def request(self, params: SamplingParams) -> None:
        self.root.set_attributes({"gen_ai.request.max_tokens": params.max_tokens,
                                  "gen_ai.request.temperature": params.temperature,
                                  "gen_ai.request.top_p": params.top_p})
        if params.top_k:
            self.root.set_attribute("gen_ai.request.top_k", params.top_k)
        if params.seed is not None:
            self.root.set_attribute("gen_ai.request.seed", params.seed)
        if params.structured is not None:
            self.root.set_attributes({"tandem.structured.kind": params.structured.kind,
                                      "tandem.structured.best_effort": params.structured.best_effort})

    @contextmanager
    def span(self, name: str) -> Iterator[Span]:
        """A child of the root around a stage; an exception marks it failed and propagates."""
        span = self.tracer.start_span(name, context=self.ctx)
        try:
            yield span
        except BaseException as exc:
            finish_span(span, exc)
            raise
        span.end()

    def tokenized(self, span: Span, ids: list[int], from_text: bool) -> None:
        self.prompt_tokens = len(ids)
        span.set_attributes({"tandem.prompt_tokens": len(ids), "tandem.tokenized": from_text})
        self.root.set_attribute("gen_ai.usage.input_tokens", len(ids))
        if self.decode is not None and self.root.is_recording():
            message = {"role": "user", "parts": [{"type": "text", "content": self.decode(list(ids))}]}
            self.root.set_attribute("gen_ai.input.messages", json.dumps([message], ensure_ascii=False))

    def routed(self, span: Span, route: Route) -> None:
        self.routed_ok = True
        local = route.prefill is None
        self.metrics.routes.labels("local" if local else "remote").inc()
        self.metrics.prefix_hit_tokens.inc(route.matched_tokens)
        attrs: dict[str, Any] = {"tandem.route.decode_worker": route.decode.worker_id,
                                 "tandem.route.local_prefill": local, "tandem.route.reason": route.reason,
                                 "tandem.route.prefix_hit_tokens": route.matched_tokens}
        if route.prefill is not None:
            attrs["tandem.route.prefill_worker"] = route.prefill.worker_id
        span.set_attributes(attrs)

    def client_call(self, method: str, worker_id: str, address: str) -> tuple[Span, list[tuple[str, str]], str]:
        """A CLIENT span for a call to a worker: (span, metadata to send, traceparent for the request
        field). With tracing off, the client's own traceparent is passed through unchanged."""
        service, _, name = method.rpartition("/")
        span = self.tracer.start_span(method, context=self.ctx, kind=SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "server.address": address,
            "tandem.worker_id": worker_id})
        self._open.append(span)
        carrier = carrier_of(span) or self.incoming
        return span, list(carrier.items()), carrier.get("traceparent", "")

    def watch_call(self, span: Span, task: asyncio.Future[Any]) -> None:
        """End the CLIENT `span` when `task` (the call) completes, with its outcome."""
        def done(t: asyncio.Future[Any]) -> None:
            self.call_done(span, asyncio.CancelledError() if t.cancelled() else t.exception())

        task.add_done_callback(done)

    def call_done(self, span: Span, exc: BaseException | None) -> None:
        if span in self._open:
            self._open.remove(span)
            if isinstance(exc, grpc.aio.AioRpcError):
                span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
                span.set_status(Status(StatusCode.ERROR, f"{exc.code().name}: {exc.details()}"))
                span.end()
            else:
                finish_span(span, exc)

    def relayed(self, num_tokens: int, text: str = "") -> None:
        """A message with `num_tokens` tokens (and `text`) went to the client: TTFT, then inter-token gaps."""
        if self.decode is not None and text:
            self.output.append(text)
        if not num_tokens:
            return
        now = time.perf_counter()
        gaps, gap = num_tokens, (now - self.t_last) / num_tokens
        if not self.tokens:  # tokens that come with the first one count as gaps of 0
            self.ttft_s = now - self.t0
            self.metrics.ttft.observe(now - self.t0)
            self.root.add_event("gen_ai.first_token", {"tandem.ttft_s": now - self.t0})
            gaps, gap = num_tokens - 1, 0.0
        for _ in range(gaps):  # every token after the first is one inter-token gap
            self.metrics.itl.observe(gap)
        self.t_last = now
        self.tokens += num_tokens
        self.metrics.generation_tokens.inc(num_tokens)

    def finished(self, reason: int, usage: gen.Usage, message: str) -> None:
        name = _FINISH_NAMES.get(reason, "unknown")
        self.finish_reason = name
        self.metrics.finished.labels(name).inc()
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.prompt_tokens_hist.observe(usage.prompt_tokens)
        self.metrics.generation_tokens_hist.observe(usage.completion_tokens)
        self.prompt_tokens = usage.prompt_tokens
        if self.decode is not None and self.root.is_recording():
            output: dict[str, Any] = {"role": "assistant", "finish_reason": name,
                                      "parts": [{"type": "text", "content": "".join(self.output)}]}
            self.root.set_attribute("gen_ai.output.messages", json.dumps([output], ensure_ascii=False))
        self.root.set_attributes({"gen_ai.response.finish_reasons": [name],
                                  "gen_ai.usage.input_tokens": usage.prompt_tokens,
                                  "gen_ai.usage.output_tokens": usage.completion_tokens,
                                  "tandem.cached_tokens": usage.cached_tokens})
        self.root.add_event("gen_ai.finish", {"tandem.finish.reason": name, "tandem.finish.message": message})

    def end(self, exc: BaseException | None) -> None:
        """The call is over (after the last message, or failing with `exc`): status metrics, spans."""
        code = grpc_status_of(exc)[0] if exc is not None else grpc.StatusCode.OK
        self.metrics.status.labels(code.name).inc()
        if exc is None:
            self.metrics.e2e.observe(time.perf_counter() - self.t0)
        elif not self.finish_reason and self.routed_ok:  # admitted, then cancelled or failed
            self.finish_reason = "abort" if code in _ABORTED else "error"
            self.metrics.finished.labels(self.finish_reason).inc()
        self.metrics.inflight.dec()
        for span in list(self._open):
            self.call_done(span, exc)
        self.root.set_attribute("rpc.grpc.status_code", code.value[0])
        finish_span(self.root, exc)
        self._access(code)

    def _access(self, code: grpc.StatusCode) -> None:
        """The access line: for HTTP, the outcome goes to the middleware, which writes the line."""
        fields: dict[str, Any] = {"request_id": self.rid, "prompt_tokens": self.prompt_tokens,
                                  "completion_tokens": self.tokens,
                                  "ttft_ms": round(self.ttft_s * 1000, 1) if self.ttft_s is not None else None,
                                  "finish": self.finish_reason or None, "grpc_status": code.name}
        if self.http is not None:  # the HTTP status says it unless the call failed after the headers
            self.http.fields.update({k: v for k, v in fields.items()
                                     if k != "request_id" and (k != "grpc_status" or code is not grpc.StatusCode.OK)})
            return
        fields = {"protocol": "grpc", "route": "/tandem.v1.Generation/Generate", "status": code.name, **fields,
                  "duration_ms": round(1000 * (time.perf_counter() - self.t0), 1)}
        fields.pop("grpc_status")
        access_log.info("%s", format_access({**fields, "method": "gRPC"}), extra={"fields": fields})
