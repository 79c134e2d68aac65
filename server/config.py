"""What every Tandem process (gateway, prefill worker, decode worker) is told about serving.

Torch-free. Each component's config holds one `ServerOptions`; the `tandem` command's flags for it
are generated from the fields (engine.options), with each component's own default port.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.options import check_options, option

# The port each component binds when the command line does not say (docker-compose uses these).
DEFAULT_PORTS = {"gateway": 50051, "prefill": 50061, "decode": 50071}


@dataclass(frozen=True)
class ServerOptions:
    host: str = option("127.0.0.1", "bind address (internal ports stay on loopback by default)")
    port: int = option(0, "gRPC port (0: any free port)", min=0, max=65535)
    ready_file: str | None = option(None, "write a JSON line with the bound addresses here once up")
    metrics_port: int = option(0, "serve Prometheus /metrics on this port (0: off)", min=0, max=65535)
    otlp_endpoint: str | None = option(
        None, "send traces over OTLP/gRPC to this collector (http://host:4317), or 'console'; "
        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else tracing off")
    trace_sample_ratio: float = option(1.0, "fraction of requests traced, decided at the gateway "
                                       "(workers follow it)", min=0.0, max=1.0)
    max_concurrent_rpcs: int = option(2048, "gRPC calls served at once (health checks included); more are "
                                      "refused with RESOURCE_EXHAUSTED", min=1)
    idle_connection_timeout_s: float = option(
        300.0, "seconds a gRPC connection may go without a call before it is closed (clients reconnect on "
        "their next call)", flag="grpc-idle-timeout", above=0)
    handshake_timeout_s: float = option(10.0, "seconds a new gRPC connection has to finish its TLS and HTTP/2 "
                                        "handshake before it is dropped", flag="grpc-handshake-timeout", above=0)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class WorkerOptions:
    """What both kinds of workers are told about their KV channel and their engine's health."""

    kv_timeout_s: float = option(30.0, "seconds a KV transfer may stay silent (or wait for free blocks)",
                                 flag="kv-timeout", above=0)
    watchdog_s: float = option(
        300.0, "seconds one engine step may run before the worker counts its engine as dead, fails its "
        "requests and exits for its supervisor to restart it (0: no watchdog)", flag="watchdog", min=0)
    fault: str | None = option(
        None, "fault injection, for tests of the failure paths: raise@N makes engine step N raise, hang@N "
        "makes it hang (docs/ARCHITECTURE.md)", metavar="KIND@STEP")

    def __post_init__(self) -> None:
        check_options(self)
        parse_fault(self.fault)


def parse_fault(spec: str | None) -> tuple[str, int] | None:
    """"raise@N" / "hang@N" -> (kind, N); None -> None. Raises ValueError for anything else."""
    if not spec:
        return None
    kind, _, at = spec.partition("@")
    if kind not in ("raise", "hang") or not at.isdigit() or int(at) < 1:
        raise ValueError(f"fault must be raise@N or hang@N with N >= 1, got {spec!r}")
    return kind, int(at)
