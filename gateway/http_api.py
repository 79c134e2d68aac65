"""The OpenAI-compatible HTTP API: a thin aiohttp adapter over `GenerationService.generate`, in-process.

    POST /v1/completions        -> parse_completion -> service.generate(GenerateRequest) -> JSON or SSE
    POST /v1/chat/completions   -> parse_chat -> chat template -> token ids -> the same path
    GET  /v1/models[/{model}]   -> the served model
    GET  /health                -> 200 while a decode worker is healthy, else 503

It runs on the gateway's own event loop (uvloop) beside the gRPC server, so both APIs share the
validation, the router and the `max_inflight` limit. Errors are OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the gRPC status mapped to HTTP (400, 404,
429 with Retry-After, 503, 504, ...). Streams are server-sent events, `data: {chunk}` lines and a final
`data: [DONE]`; an error after the stream started is sent as one `data: {"error": ...}` event.
A client that disconnects cancels its handler, which aborts the request on every worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

from gateway.openai_response import Kind, ResponseBuilder
from gateway.openai_schema import COMPLETION_FIELDS, ParsedRequest, RequestError, parse_chat, parse_completion
from server.errors import NotFound
from server.grpc_server import status_for
from tandem.v1 import generation_pb2 as gen

if TYPE_CHECKING:
    from gateway.service import GenerationService

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 429: "rate_limit_error"}
Authorize = Callable[[str | None], object]
_KNOWN_PARAMS = COMPLETION_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """`exc` as (HTTP status, OpenAI's error object, headers), the status mapped from its gRPC status."""
    code, message, trailers = status_for(exc)
    status = _HTTP_STATUS.get(code, 500)
    if status == 500:
        logger.error("HTTP request failed", exc_info=exc)
    param = getattr(exc, "param", None)
    first = message.split(" ", 1)[0]
    if param is None and status == 400 and first in _KNOWN_PARAMS:  # "temperature must be >= 0 ..."
        param = first
    err_code = code.name.lower()
    if status == 404 and message.startswith("model "):
        err_code, param = "model_not_found", "model"
    body = {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": err_code}}
    headers: dict[str, str] = {}
    for key, value in trailers:
        if key == "retry-after-ms":
            headers["retry-after-ms"] = value
            headers["Retry-After"] = str(max(1, math.ceil(int(value) / 1000)))
    return status, body, headers


def error_response(exc: BaseException) -> web.Response:
    status, body, headers = error_body(exc)
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure, ours or aiohttp's (404 route, 405, 413), leaves in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {"error": {"message": f"{exc.reason}: {request.method} {request.path}", "type": _ERROR_TYPE.get(exc.status, "server_error"),
                          "param": None, "code": exc.reason.lower().replace(" ", "_")}}
        return web.json_response(body, status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to an HTTP status
        return error_response(exc)


class OpenAIApi:
    """Request handlers over one GenerationService (which owns the tokenizer, limits and workers).

    `authorize(authorization_header)` (optional) runs before every /v1 handler and raises a TandemError
    (Unauthenticated, PermissionDenied) to refuse: the gateway passes its gRPC bearer-token check, so
    HTTP clients send the same `Authorization: Bearer <token>`. /health stays open, as gRPC health does.
    """

    def __init__(self, service: GenerationService, authorize: Authorize | None = None) -> None:
        self.service = service
        self.authorize = authorize
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors, self._auth], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.authorize is not None and request.path.startswith("/v1/"):
            self.authorize(request.headers.get("Authorization"))
        return await handler(request)

    # ------------------------------------------------------------------ routes
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion", parse_completion(await _json(request)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat(await _json(request))
        ids = await asyncio.to_thread(self._render_chat, parsed)
        parsed.request.prompt_token_ids.extend(ids)
        return await self._generate(request, "chat", parsed)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.service.model_name:
            raise NotFound(f"model {name!r} is not served here; this gateway serves {self.service.model_name!r}")
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        healthy = self.service.registry.by_role(gen.WORKER_ROLE_DECODE)
        return web.json_response({"status": "ok" if healthy else "no healthy decode worker"},
                                 status=200 if healthy else 503)

    # ------------------------------------------------------------------ helpers
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.service.model_name, "object": "model", "created": self.created, "owned_by": "tandem",
                "max_model_len": self.service.model_config.max_position_embeddings}

    def _render_chat(self, parsed: ParsedRequest) -> list[int]:
        """The conversation through the checkpoint's chat template, as token ids (no extra BOS)."""
        tok = self.service.tokenizer
        try:
            text = tok.apply_chat_template(parsed.messages, add_generation_prompt=parsed.add_generation_prompt)
        except ValueError as exc:
            raise RequestError(str(exc), "messages") from None
        return tok.encode(text, add_special_tokens=False)

    def _token_text(self, token_id: int) -> str:
        return self.service.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _generate(self, http: web.Request, kind: Kind, parsed: ParsedRequest) -> web.StreamResponse:
        rid = http.headers.get("X-Request-Id", "")[:128]
        parsed.request.request_id = rid
        metadata = tuple((k.lower(), v) for k, v in http.headers.items() if k.lower() in ("traceparent", "tracestate"))
        async with aclosing(self.service.generate(parsed.request, metadata)) as stream:
            first = await anext(stream)  # validation and routing errors surface here, as HTTP statuses
            builder = ResponseBuilder(kind, first.request_id, self.service.model_name, self._token_text,
                                      parsed.top_logprobs)
            if not parsed.stream:
                builder.add(first)
                async for msg in stream:
                    builder.add(msg)
                return web.json_response(builder.response(), headers={"X-Request-Id": first.request_id})
            return await self._stream(http, stream, first, builder, parsed)

    async def _stream(self, http: web.Request, stream: AsyncIterator[gen.GenerateResponse],
                      first: gen.GenerateResponse, builder: ResponseBuilder, parsed: ParsedRequest
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": first.request_id})
        await resp.prepare(http)
        try:
            if builder.kind == "chat":
                await _event(resp, builder.role_chunk())
            msg: gen.GenerateResponse | None = first
            while msg is not None:
                chunk = builder.chunk(msg, parsed.include_usage)
                if chunk is not None:
                    await _event(resp, chunk)
                msg = await anext(stream, None)
            if parsed.include_usage:
                await _event(resp, builder.usage_chunk())
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            await _event(resp, error_body(exc)[1])
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _event(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


@dataclass
class HttpServer:
    """A running HTTP API; `port` is the bound one (the config may have asked for 0)."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


def http_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for the HTTP API from the gateway's PEM files; with `client_ca`, clients must present a
    certificate it signed (as gRPC's mTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_http_api(service: GenerationService, host: str, port: int, *, authorize: Authorize | None = None,
                         ssl_context: ssl.SSLContext | None = None,
                         instrument: Callable[[web.Application], None] | None = None) -> HttpServer:
    """Serve the OpenAI API for `service` on host:port (0: any free port) on the running event loop.
    `instrument(app)` may add middleware and routes before it starts (gateway/http_observe.py)."""
    app = OpenAIApi(service, authorize).app()
    if instrument is not None:  # issue 17: spans, status counts, access lines, /metrics
        instrument(app)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0][1]
    logger.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if ssl_context else "http", host, bound)
    return HttpServer(runner, int(bound))
