"""Process-level plumbing shared by every Tandem component: event loop, signals, readiness."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import ServerOptions
    from server.tracing import Tracing

logger = logging.getLogger(__name__)


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop_event)` on uvloop; SIGINT/SIGTERM set the event so `main` can drain and exit."""
    import uvloop

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(runner())


def run_component(role: str, opts: ServerOptions,
                  serve: Callable[[asyncio.Event, Tracing], Awaitable[None]]) -> None:
    """A component process's main: set up its tracing, `run(serve(stop, tracing))`, flush on exit."""
    from server.tracing import SERVICE_NAMES, setup_tracing

    tracing = setup_tracing(SERVICE_NAMES[role], endpoint=opts.otlp_endpoint, sample_ratio=opts.trace_sample_ratio)
    try:
        run(lambda stop: serve(stop, tracing))
    finally:
        tracing.shutdown()


def write_ready_file(path: str | os.PathLike[str] | None, info: dict[str, Any]) -> None:
    """Atomically write `info` as JSON: launchers wait for this file to know the process is up."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(target)


def advertised_host(bind_host: str) -> str:
    """The host others should dial: the bind host, or this machine's name for a wildcard bind."""
    if bind_host in ("0.0.0.0", "::", "[::]", "*", ""):
        return socket.gethostname()
    return bind_host


def worker_id(role: str, port: int) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{port}"


async def serve_component(
    role: str,
    service: Any,
    add_to_server: Callable[[Any, Any], None],
    service_name: str,
    opts: ServerOptions,
    stop: asyncio.Event,
    extra_info: dict[str, Any] | None = None,
    *,
    interceptors: Sequence[Any] = (),
    credentials: Any = None,
    wire_checks: Mapping[str, Callable[[bytes], None]] | None = None,
) -> None:
    """Serve `service` (whose `address`/`worker_id` are filled in here) until `stop` is set.
    `interceptors` run inside the error mapper (server.auth's); `credentials` (grpc.ServerCredentials)
    serve TLS instead of plaintext; `wire_checks` see server.grpc_server.ErrorInterceptor."""
    from server.grpc_server import make_server

    server, bound, _ = await make_server(lambda s: add_to_server(service, s), [service_name],
                                         f"{opts.host}:{opts.port}", interceptors=interceptors,
                                         credentials=credentials, opts=opts, wire_checks=wire_checks)
    service.address = f"{advertised_host(opts.host)}:{bound}"
    service.worker_id = worker_id(role, bound)
    info = {"role": role, "address": service.address, "worker_id": service.worker_id, **(extra_info or {})}
    logger.info("%s %s serving on %s %s", role, service.worker_id, service.address, extra_info or "")
    write_ready_file(opts.ready_file, info)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2.0)
