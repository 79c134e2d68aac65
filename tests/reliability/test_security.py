"""Security of the secure stack (TLS + mTLS, bearer tokens, CurveZMQ KV): who gets in, who does not, and
that requests work end to end with all of it on. Plus: every internal port binds loopback by default,
and nothing on a wire is unpickled."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from cli.main import build_parser
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import wait_all_blocks_free
from tests.reliability.conftest import SecureStack, bearer

REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
ROOT = Path(__file__).resolve().parents[2]


def test_tls_and_client_certificates_are_required(secure: SecureStack) -> None:
    req = gen.ClusterStatusRequest()
    plaintext = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(secure.stack.address))
    for name, s in (("plaintext", plaintext), ("no client certificate", secure.stub(client_cert=False)),
                    ("a certificate the CA did not sign", secure.stub(stranger=True))):
        with pytest.raises(grpc.RpcError) as err:
            s.ClusterStatus(req, timeout=5, metadata=bearer("admin"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (name, err.value.details())
    workers = secure.stub().ClusterStatus(req, timeout=5, metadata=bearer("admin")).workers
    assert len(workers) == 2 and all(w.healthy for w in workers)


def test_health_is_open_and_reflection_needs_a_token(secure: SecureStack) -> None:
    channel = secure.channel()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflect = channel.stream_stream(REFLECTION, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.RpcError) as err:
        list(reflect(iter(ask), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answer = list(reflect(iter(ask), timeout=5, metadata=bearer("user")))
    assert "tandem.v1.Generation" in {s.name for s in answer[0].list_services_response.service}


def test_generation_works_over_tls_tokens_and_curve_kv(secure: SecureStack) -> None:
    msgs = secure.generate(list(range(5, 60)), temperature=0.0, max_tokens=6)
    assert msgs[-1].usage.completion_tokens == 6
    assert msgs[-1].timing.kv_transfer_ns > 0, "the KV should have crossed the CurveZMQ channel"
    wait_all_blocks_free(secure.stub(), metadata=bearer("admin"))


def test_internal_ports_bind_loopback_by_default() -> None:
    parser = build_parser()
    for argv in (["gateway", "--model", "m", "--decode-workers", "d:1"], ["prefill-worker", "--model", "m"],
                 ["decode-worker", "--model", "m"]):
        args = parser.parse_args(argv)
        assert args.host == "127.0.0.1", argv  # gRPC and the /metrics endpoint
        assert getattr(args, "kv_bind", "tcp://127.0.0.1:0").startswith("tcp://127.0.0.1:"), argv


def test_nothing_on_a_wire_is_unpickled() -> None:
    """Every process that reads a socket parses protobuf or raw KV bytes; none of them may unpickle."""
    pattern = re.compile(r"\bimport (pickle|marshal|dill|shelve)\b|\bpickle\.|torch\.load\(|allow_pickle=True")
    offenders = []
    for package in ("gateway", "prefill_worker", "decode_worker", "kvtransfer", "tandem"):
        for path in (ROOT / package).rglob("*.py"):
            if "v1" in path.relative_to(ROOT).parts:
                continue  # generated protobuf code
            offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]
    assert not offenders, offenders
