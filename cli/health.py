"""`tandem health --addr host:port`: one grpc.health.v1 Check; exit 0 when SERVING, 1 otherwise.

Container healthchecks run it (docker-compose); Kubernetes uses its native `grpc:` probe on the same
service. Every Tandem process serves health for "" (the whole process) and for its own service name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def check(addr: str, service: str = "", timeout_s: float = 2.0, tls_ca: str | None = None) -> tuple[bool, str]:
    """(serving?, what was seen) for one Check call; never raises for an unreachable server."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is not None:
        channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
    else:
        channel = grpc.insecure_channel(addr)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, status


def run(args: argparse.Namespace) -> int:
    ok, seen = check(args.addr, args.service, args.timeout, args.tls_ca)
    print(f"{args.addr} {args.service or '(process)'}: {seen}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("health", help="gRPC health check of a gateway or worker (exit 0 when serving)")
    p.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the component")
    p.add_argument("--service", default="", help="service name to check (default: the whole process)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    p.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this CA certificate (PEM)")
    p.set_defaults(func=run)
