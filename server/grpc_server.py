"""gRPC server plumbing shared by the gateway and the workers.

`make_server` builds a grpc.aio server with our interceptor, health service and reflection, binds it
(port 0 picks a free port) and returns `(server, port)`. `ErrorInterceptor` is the one place where
exceptions become status codes:

    TandemError subclasses -> their own code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, ...)
    EngineDied             -> UNAVAILABLE (the worker's engine thread is dead; retry elsewhere)
    DuplicateRequest       -> ALREADY_EXISTS;   RequestGone -> CANCELLED
    ValueError             -> INVALID_ARGUMENT      (bad input the engine rejected)
    TimeoutError           -> DEADLINE_EXCEEDED
    a request that does not parse -> INVALID_ARGUMENT naming the field (invalid UTF-8: server.wirecheck)
    a request a wire check refuses -> INVALID_ARGUMENT with its message, before protobuf parses it
    anything else          -> INTERNAL, logged with its traceback

It is the outermost interceptor, so it also maps what the interceptors inside it raise (the bearer-token
check in `server.auth` raises Unauthenticated / PermissionDenied).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from engine.outputs import DuplicateRequest, EngineDied, RequestGone
from server.config import ServerOptions
from server.errors import InvalidRequest, TandemError
from server.reflection import enable_reflection
from server.wirecheck import explain_decode_error

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 << 20  # requests and responses; a prompt of 4M tokens fits with room to spare


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    if isinstance(exc, EngineDied):
        return grpc.StatusCode.UNAVAILABLE, str(exc), [("retry-after-ms", "1000")]
    if isinstance(exc, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc), []
    if isinstance(exc, RequestGone):
        return grpc.StatusCode.CANCELLED, str(exc), []
    if isinstance(exc, TandemError):
        trailers = []
        if exc.retry_after_s is not None:
            trailers.append(("retry-after-ms", str(int(exc.retry_after_s * 1000))))
        return exc.code, exc.message, trailers
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), []
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out", []
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", []


# Trailer on every status our handlers answer with: a caller tells "the server answered UNAVAILABLE"
# (it is alive) from "the call broke" (it may be gone) by its presence (gateway.registry).
ANSWERED = ("tandem-answered", "1")


def answered(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call's status came from one of our handlers rather than the transport."""
    return any(key == ANSWERED[0] for key, _ in (exc.trailing_metadata() or ()))


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, trailers = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("handler failed", exc_info=exc)
    context.set_trailing_metadata([*trailers, ANSWERED])
    await context.abort(code, message)


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT
    (grpc itself would answer UNKNOWN with protobuf's bare message)."""

    def __init__(self, message: str) -> None:
        self.message = message


# A check of a request's bytes before they are parsed (by method, "/pkg.Service/Method"); it raises
# InvalidRequest to refuse them (e.g. a field whose length alone says it cannot fit).
WireCheck = Callable[[bytes], None]


def _lenient(deserialize: Callable[[bytes], Any] | None, check: WireCheck | None = None
             ) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)

    def parse(data: bytes) -> Any:
        if check is not None:
            try:
                check(data)
            except InvalidRequest as exc:
                return _Undecodable(exc.message)
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the handler answers it
            return _Undecodable(explain_decode_error(data, descriptor, exc))

    return parse


def _check_parsed(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidRequest(request.message)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by unary and server-streaming handlers (and by the interceptors inside
    this one) to gRPC statuses; a request that does not parse, or that `wire_checks[method]` refuses,
    becomes INVALID_ARGUMENT."""

    def __init__(self, wire_checks: Mapping[str, WireCheck] | None = None) -> None:
        self.wire_checks = dict(wire_checks or {})

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        check = self.wire_checks.get(handler_call_details.method)
        if handler.request_streaming:
            return _wrap_request_streaming(handler)
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    _check_parsed(request)
                    return await inner_uu(request, context)
                except (grpc.aio.AbortError, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await _abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _lenient(handler.request_deserializer, check), handler.response_serializer)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    _check_parsed(request)
                    async for item in inner_us(request, context):
                        yield item
                except (grpc.aio.AbortError, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await _abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _lenient(handler.request_deserializer, check), handler.response_serializer)
        return handler


def _wrap_request_streaming(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """ErrorInterceptor for client-streaming methods (reflection, and refusals of them)."""
    deser, ser = handler.request_deserializer, handler.response_serializer
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner_su(requests, context)
            except (grpc.aio.AbortError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await _abort(context, exc)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deser, ser)
    if handler.stream_stream:
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in inner_ss(requests, context):
                    yield item
            except (grpc.aio.AbortError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await _abort(context, exc)

        return grpc.stream_stream_rpc_method_handler(stream_stream, deser, ser)
    return handler


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a restarted peer is dialled again within ~2 s (grpc's default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options(opts: ServerOptions) -> list[tuple[str, int]]:
    """The channel options plus the server's connection limits: a connection with no RPC for
    `idle_connection_timeout_s` is closed (GOAWAY; clients reconnect on their next call), and one that
    has not finished its TLS and HTTP/2 handshake within `handshake_timeout_s` is dropped."""
    return [
        *channel_options(),
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_idle_ms", int(opts.idle_connection_timeout_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(opts.handshake_timeout_s * 1000)),
    ]


async def make_server(
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    address: str,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    opts: ServerOptions | None = None,
    wire_checks: Mapping[str, WireCheck] | None = None,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """A started server with health + reflection. `address` like "127.0.0.1:0" (0: any free port).

    `opts` (default: ServerOptions()) bounds connections (`server_options`) and the RPCs served at once:
    past `max_concurrent_rpcs`, gRPC answers RESOURCE_EXHAUSTED itself. `wire_checks` see ErrorInterceptor."""
    opts = opts or ServerOptions()
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(wire_checks), *interceptors],  # outermost: maps what the others raise
        options=server_options(opts),
        maximum_concurrent_rpcs=opts.max_concurrent_rpcs,
    )
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection([*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    await server.start()
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health
