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
