"""The OpenAI-compatible HTTP API: a thin aiohttp adapter over `GenerationService.generate`, in-process.

    POST /v1/completions        -> parse_completion -> service.generate(GenerateRequest), one per prompt
                                   of a batch, run concurrently -> JSON or SSE (choices i*n .. i*n+n-1)
    POST /v1/chat/completions   -> parse_chat -> GenerateRequest.messages + chat (tools, ...) -> the same
                                   path, where the service renders the chat template and splits the
                                   output into content, reasoning and tool calls
    POST /v1/responses          -> parse_responses -> chat template -> the same path -> a Response or
                                   its events (gateway/responses_api.py)
    POST /tokenize, /detokenize -> the Tokenize / Detokenize RPCs' code (gateway/tokenization.py)
    GET  /v1/models[/{model}]   -> the served model, once per served name
    GET  /health                -> 200 while the gateway serves (a decode worker is healthy), else 503:
                                   the same truth as its gRPC health service (server.process.Health)

It runs on the gateway's own event loop (uvloop) beside the gRPC server, so both APIs share the
validation, the router and the `max_inflight` limit. Sizes are checked before work that grows with
them (gateway/json_body.py: the body's bytes, then its shape, then JSON; gateway/validation.py: the
prompt), and the listening socket bounds connections (gateway/http_listener.py). Errors are OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the gRPC status mapped to HTTP (400, 404,
429 with Retry-After, 503, 504, ...). Streams are server-sent events, `data: {chunk}` lines and a final
`data: [DONE]`; an error after the stream started is sent as one `data: {"error": ...}` event.
A client that disconnects cancels its handler, which aborts the request on every worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack, aclosing
from typing import TYPE_CHECKING, Any, cast

import grpc
from aiohttp import web

from gateway.http_streams import Stream, merged, open_stream, send_event
from gateway.json_body import loads_bounded, max_body_bytes, max_skeleton_chars
from gateway.openai_response import Kind, ResponseBuilder
from gateway.openai_schema import COMPLETION_FIELDS, ParsedRequest, RequestError, parse_chat, parse_completion
from gateway.responses_api import ResponsesBuilder, parse_responses
from gateway.service import bounded_by_reader
from gateway.tokenization import detokenize_request, tokenize_request
from gateway.validation import PromptLimits, check_model, check_request_id
from server.errors import InvalidRequest
from server.grpc_server import status_for
from tandem.v1 import generation_pb2 as gen

if TYPE_CHECKING:
    from gateway.service import GenerationService

logger = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 429: "rate_limit_error"}
Authorize = Callable[[str | None], object]
_KNOWN_PARAMS = COMPLETION_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "input",
                                     "max_output_tokens", "instructions"}


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
        message = f"{exc.reason}: {request.method} {request.path[:200]}"
        if exc.text and not exc.text.startswith(f"{exc.status}:"):  # aiohttp's default text repeats the reason
            message += f": {exc.text}"
        body = {"error": {"message": message, "type": _ERROR_TYPE.get(exc.status, "server_error"),
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
    A request's body must arrive within `read_timeout_s` (408 otherwise).
    """

    def __init__(self, service: GenerationService, authorize: Authorize | None = None, *,
                 read_timeout_s: float = 30.0) -> None:
        self.service = service
        self.authorize = authorize
        self.read_timeout_s = read_timeout_s
        self.limits = PromptLimits(service.model_config.max_position_embeddings)
        self.max_body_bytes = max_body_bytes(self.limits.context)
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors, self._auth], client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.authorize is not None and request.path != "/health":
            self.authorize(request.headers.get("Authorization"))
        return await handler(request)

    # ------------------------------------------------------------------ routes
    async def completions(self, request: web.Request) -> web.StreamResponse:
        rid = self._request_id(request)
        return await self._generate(request, rid, "completion", parse_completion(await self._json(request)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        rid = self._request_id(request)
        # the conversation travels as the request's messages: the service renders and reads it back
        return await self._generate(request, rid, "chat", parse_chat(await self._json(request)))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        rid = self._request_id(request)
        parsed, echoed = parse_responses(await self._json(request))
        await self._render(parsed)
        parsed.request.request_id = rid
        async with aclosing(self._stream_of(request, parsed.request)) as stream:
            first = await anext(stream)  # validation and routing errors surface here, as HTTP statuses
            builder = ResponsesBuilder(first.request_id, self._model_of(parsed), echoed)
            if not parsed.stream:
                builder.add(first)
                async for later in stream:
                    builder.add(later)
                return web.json_response(builder.response(), headers={"X-Request-Id": first.request_id})
            resp = await open_stream(request, first.request_id)
            try:
                for event in builder.opening():
                    await send_event(resp, event, named=True)
                msg: gen.GenerateResponse | None = first
                while msg is not None:
                    if text := builder.add(msg):
                        await send_event(resp, builder.delta(text), named=True)
                    msg = await anext(cast(Stream, stream), None)
                for event in builder.closing():
                    await send_event(resp, event, named=True)
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
                await send_event(resp, {"type": "error", "sequence_number": builder.sequence, **error_body(exc)[1]},
                                 named=True)
            await resp.write_eof()
            return resp

    async def tokenize(self, request: web.Request) -> web.Response:
        resp = await self.service.texts.tokenize(tokenize_request(await self._json(request)))
        return web.json_response({"count": len(resp.token_ids), "max_model_len": resp.max_model_len,
                                  "tokens": list(resp.token_ids), "token_strs": list(resp.tokens)})

    async def detokenize(self, request: web.Request) -> web.Response:
        resp = await self.service.texts.detokenize(detokenize_request(await self._json(request)))
        return web.json_response({"prompt": resp.text})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card(n) for n in self.service.model_names]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        check_model(name, self.service.model_names)
        return web.json_response(self._model_card(name))

    async def health(self, request: web.Request) -> web.Response:
        health = self.service.health
        return web.json_response({"status": "ok" if health.serving else health.reason or "not serving"},
                                 status=200 if health.serving else 503)

    # ------------------------------------------------------------------ helpers
    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tandem",
                "root": self.service.model_name, "max_model_len": self.service.model_config.max_position_embeddings}

    def _model_of(self, parsed: ParsedRequest) -> str:
        """The name responses carry: the one the client used (once validated), else the first served name."""
        return parsed.request.model if parsed.request.HasField("model") else self.service.model_name

    async def _render(self, parsed: ParsedRequest) -> None:
        """The conversation through the chat template, as the request's prompt token ids."""
        try:
            ids = await asyncio.to_thread(self.service.texts.render_chat, parsed.messages,
                                          parsed.add_generation_prompt, parsed.continue_final_message)
        except RequestError:
            raise
        except InvalidRequest as exc:
            raise RequestError(exc.message, "messages") from None
        parsed.request.prompt_token_ids.extend(ids)

    @staticmethod
    def _request_id(http: web.Request) -> str:
        rid = http.headers.get("X-Request-Id", "")
        check_request_id(rid, "X-Request-Id")
        return rid

    async def _json(self, request: web.Request) -> Any:
        """The body as JSON: its size (Content-Length first), its arrival within read_timeout_s, its shape."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        try:
            async with asyncio.timeout(self.read_timeout_s):
                body = await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(text=f"the request body did not arrive within {self.read_timeout_s:g} s "
                                              f"(--http-read-timeout)") from None
        return loads_bounded(body, max_skeleton_chars(self.limits.context))

    def _token_text(self, token_id: int) -> str:
        return self.service.tokenizer.decode([token_id], skip_special_tokens=False)

    def _stream_of(self, http: web.Request, request: gen.GenerateRequest) -> AsyncGenerator[gen.GenerateResponse, None]:
        metadata = tuple((k.lower(), v) for k, v in http.headers.items() if k.lower() in ("traceparent", "tracestate"))
        read_timeout_s = self.service.limits.client_read_timeout_s  # a client that stops reading loses it
        return bounded_by_reader(self.service.generate(request, metadata), read_timeout_s)

    async def _generate(self, http: web.Request, rid: str, kind: Kind, parsed: ParsedRequest
                        ) -> web.StreamResponse:
        parsed.request.request_id = rid
        requests = parsed.requests()
        async with AsyncExitStack() as closing:
            streams = [await closing.enter_async_context(aclosing(self._stream_of(http, r))) for r in requests]
            # every prompt's validation and routing errors surface here, as HTTP statuses
            firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
            failed = next((f for f in firsts if isinstance(f, BaseException)), None)
            if failed is not None:
                raise failed
            first = firsts[0]
            assert isinstance(first, gen.GenerateResponse)
            echo = [p if isinstance(p, str) else self.service.tokenizer.decode(p) for p in parsed.prompts] \
                if parsed.echo else None
            builder = ResponseBuilder(kind, first.request_id, self._model_of(parsed), self._token_text,
                                      parsed.top_logprobs, n=parsed.n, echo_texts=echo, echo_only=parsed.echo_only,
                                      prompt_logprobs=parsed.prompt_logprobs is not None)
            messages = merged(cast(list[gen.GenerateResponse], firsts), streams)
            if not parsed.stream:
                async for i, msg in messages:
                    builder.add(msg, i)
                return web.json_response(builder.response(), headers={"X-Request-Id": first.request_id})
            resp = await open_stream(http, first.request_id)
            try:
                if builder.kind == "chat":
                    for role in builder.role_chunks(len(requests)):
                        await send_event(resp, role)
                async for i, msg in messages:
                    if (chunk := builder.chunk(msg, parsed.include_usage, i)) is not None:
                        await send_event(resp, chunk)
                if parsed.include_usage:
                    await send_event(resp, builder.usage_chunk())
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
                await send_event(resp, error_body(exc)[1])
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
