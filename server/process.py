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

from engine.heap import freeze_startup_heap

if TYPE_CHECKING:
    from server.config import ServerOptions
    from server.tracing import Tracing

logger = logging.getLogger(__name__)


FATAL_DRAIN_S = 0.5  # after a fatal error: time for failed streams to reach their clients before exiting


class Health:
    """One truth about whether this process serves: its gRPC health service (for "" and each of its
    services) and the gateway's HTTP /health read it. `fatal` ends the process with exit code 1."""

    def __init__(self, serving: bool = True) -> None:
        self.serving = serving
        self.reason = "" if serving else "starting"
        self.fatal = asyncio.Event()
        self.fatal_reason = ""
        self._servicer: Any = None
        self._names: tuple[str, ...] = ()

    def attach(self, servicer: Any, names: Sequence[str]) -> None:
        self._servicer, self._names = servicer, ("", *names)

    async def set(self, serving: bool, reason: str = "") -> None:
        """Publish SERVING / NOT_SERVING (with why, for logs and /health)."""
        if serving != self.serving:
            logger.log(logging.INFO if serving else logging.WARNING, "health: %s%s",
                       "SERVING" if serving else "NOT_SERVING", f" ({reason})" if reason else "")
        self.serving, self.reason = serving, reason
        if self._servicer is not None:
            from grpc_health.v1 import health_pb2

            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in self._names:
                await self._servicer.set(name, status)

    def die(self, reason: str) -> None:
        """Fail-stop: stop serving and exit non-zero (call on the event loop)."""
        if not self.fatal.is_set():
            self.fatal_reason = reason
            self.fatal.set()


def run(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main(stop_event)` on uvloop and return its exit code; SIGINT/SIGTERM set the event so
    `main` can drain and exit."""
    import uvloop

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return int(await main(stop) or 0)

    return uvloop.run(runner())


def run_component(role: str, opts: ServerOptions,
                  serve: Callable[[asyncio.Event, Tracing], Awaitable[int | None]]) -> int:
    """A component process's main: set up its tracing, `run(serve(stop, tracing))`, flush on exit;
    returns the process's exit code (1 after a fatal error)."""
    from server.tracing import SERVICE_NAMES, setup_tracing

    tracing = setup_tracing(SERVICE_NAMES[role], endpoint=opts.otlp_endpoint, sample_ratio=opts.trace_sample_ratio)
    try:
        return run(lambda stop: serve(stop, tracing))
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
    health: Health | None = None,
    interceptors: Sequence[Any] = (),
    credentials: Any = None,
    wire_checks: Mapping[str, Callable[[bytes], None]] | None = None,
) -> int:
    """Serve `service` (whose `address`/`worker_id` are filled in here) until `stop` is set (exit
    code 0) or `health.fatal` (NOT_SERVING at once, a short drain, exit code 1).
    `interceptors` run inside the error mapper (server.auth's); `credentials` (grpc.ServerCredentials)
    serve TLS instead of plaintext; `wire_checks` see server.grpc_server.ErrorInterceptor."""
    from server.grpc_server import make_server

    health = health or Health()
    server, bound, servicer = await make_server(lambda s: add_to_server(service, s), [service_name],
                                                f"{opts.host}:{opts.port}", interceptors=interceptors,
                                                credentials=credentials, opts=opts, wire_checks=wire_checks)
    health.attach(servicer, [service_name])
    frozen = freeze_startup_heap()  # everything is built: the requests' objects are all the collector sees
    logger.debug("%s: %d objects frozen out of the garbage collector", role, frozen)
    await health.set(health.serving, health.reason)
    service.address = f"{advertised_host(opts.host)}:{bound}"
    service.worker_id = worker_id(role, bound)
    info = {"role": role, "address": service.address, "worker_id": service.worker_id, **(extra_info or {})}
    logger.info("%s %s serving on %s %s", role, service.worker_id, service.address, extra_info or "")
    write_ready_file(opts.ready_file, info)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(health.fatal.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if health.fatal.is_set():
            logger.critical("%s %s: fatal: %s; exiting", role, service.worker_id, health.fatal_reason)
            await health.set(False, health.fatal_reason)
            await asyncio.sleep(FATAL_DRAIN_S)
            return 1
        return 0
    finally:
        for w in waits:
            w.cancel()
        await server.stop(grace=1.0 if health.fatal.is_set() else 2.0)
