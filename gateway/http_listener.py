"""The HTTP API's listening socket: a cap on open connections, and timeouts for idle and slow ones.

    idle_timeout_s   aiohttp's keep-alive timer, armed when a connection opens and after each response:
                     a connection with no request in progress that long is closed, whether it sent
                     nothing, is idle between requests, or is still sending a request's headers
                     (slowloris); a TLS handshake gets the same time
    read_timeout_s   a request's body must arrive within it (OpenAIApi answers 408 otherwise)
    max_connections  past it a new connection is answered 503 and closed before anything is read;
                     the count is aiohttp's open connections (TLS ones once their handshake is done)

Nothing here runs per byte: refusing a connection costs one small write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from aiohttp import web

from gateway.config import HttpLimits
from gateway.http_api import Authorize, OpenAIApi

if TYPE_CHECKING:
    from gateway.service import GenerationService

logger = logging.getLogger(__name__)

LINGERING_S = 2.0  # reading and dropping the rest of a refused body before closing (aiohttp's default: 10)
_WARN_EVERY_S = 10.0


class _Refused(asyncio.Protocol):
    """A connection past the cap: one 503 in OpenAI's error shape, then closed."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        stream.write(self.response)
        stream.close()


def _refusal(max_connections: int) -> bytes:
    body = json.dumps({"error": {
        "message": f"the gateway has {max_connections} HTTP connections open (its limit, --http-max-connections); "
                   f"retry after about 1 s, or reuse a connection", "type": "server_error", "param": None,
        "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class CappedConnections:
    """The protocol factory for the listening socket: aiohttp's own handler while fewer than
    `max_connections` are open, else a `_Refused` one."""

    def __init__(self, server: web.Server, max_connections: int) -> None:
        self.server = server
        self.max_connections = max_connections
        self.refused = 0
        self._response = _refusal(max_connections)
        self._warned = 0.0

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) < self.max_connections:
            return self.server()
        self.refused += 1
        now = time.monotonic()
        if now - self._warned > _WARN_EVERY_S:
            self._warned = now
            logger.warning("HTTP connection refused: %d open (--http-max-connections); %d refused so far",
                           self.max_connections, self.refused)
        return _Refused(self._response)


@dataclass
class HttpServer:
    """A running HTTP API; `port` is the bound one (the config may have asked for 0)."""

    runner: web.AppRunner
    listener: asyncio.AbstractServer
    connections: CappedConnections
    port: int

    async def close(self) -> None:
        self.listener.close()
        await self.runner.cleanup()


def http_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for the HTTP API from the gateway's PEM files; with `client_ca`, clients must present a
    certificate it signed (as gRPC's mTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_http_api(service: GenerationService, host: str, port: int, *, limits: HttpLimits | None = None,
                         authorize: Authorize | None = None, ssl_context: ssl.SSLContext | None = None,
                         instrument: Callable[[web.Application], None] | None = None) -> HttpServer:
    """Serve the OpenAI API for `service` on host:port (0: any free port) on the running event loop.
    `instrument(app)` may add middleware and routes before it starts (gateway/http_observe.py)."""
    limits = limits or HttpLimits()
    app = OpenAIApi(service, authorize, read_timeout_s=limits.read_timeout_s).app()
    if instrument is not None:
        instrument(app)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0,
                           keepalive_timeout=limits.idle_timeout_s, lingering_time=LINGERING_S)
    await runner.setup()
    assert runner.server is not None
    connections = CappedConnections(runner.server, limits.max_connections)
    listener = await asyncio.get_running_loop().create_server(
        connections, host, port, ssl=ssl_context, backlog=128,
        ssl_handshake_timeout=limits.idle_timeout_s if ssl_context else None)
    bound = int(listener.sockets[0].getsockname()[1])
    logger.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if ssl_context else "http", host, bound)
    return HttpServer(runner, listener, connections, bound)
