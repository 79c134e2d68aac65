"""Stacks for the reliability tests, started once and shared (a stack start costs ~20 s on the 2-core box).

`secure`: the whole security configuration at once, so the bad-input table also covers the
authentication rows and every overload test runs through TLS and CurveZMQ:
    gateway  TLS + mTLS (test CA), bearer tokens (user, admin), --max-inflight 4, and the HTTP API
             (same TLS and tokens) when this checkout has it
    prefill  CurveZMQ client key        decode  CurveZMQ server key + allow-list, 16 KV blocks (128 tokens)
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cli.keygen import write_keypair
from cli.launcher import Stack
from cli.main import build_parser
from server.tls import client_credentials
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import ENGINE_ARGS
from tests.reliability.certs import TestPKI, make_pki

MAX_INFLIGHT = 4
DECODE_BLOCKS = 16  # x block size 8 = a 128-token context on the decode worker
TOKENS = {"user": "user-token-0123456789abcdef", "admin": "admin-token-0123456789abcdef"}
Metadata = Sequence[tuple[str, str]]


def bearer(role: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[role]}")]


def _gateway_has_http() -> bool:
    """Whether this checkout's gateway serves the OpenAI-compatible HTTP API (`--http-port`)."""
    _, unknown = build_parser().parse_known_args(["gateway", "--model", "m", "--decode-workers", "d:1",
                                                  "--http-port", "0"])
    return not unknown


@pytest.fixture(scope="session")
def rel_model(tiny_model) -> Path:
    return tiny_model("llama", max_position_embeddings=1024)  # the e2e tests' model: made once


@dataclass
class SecureStack:
    stack: Stack
    pki: TestPKI

    @property
    def http_address(self) -> str | None:
        """host:port of the HTTP API (same TLS, client CA and tokens as gRPC), None if not served."""
        assert self.stack.gateway is not None
        return self.stack.gateway.info.get("http_address")

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(self.pki.client.cert), str(self.pki.client.key))
        return ctx

    def channel(self, *, client_cert: bool = True, stranger: bool = False) -> grpc.Channel:
        pem = self.pki.stranger if stranger else self.pki.client
        cert, key = pem.read() if client_cert else (None, None)
        return grpc.secure_channel(self.stack.address, client_credentials(self.pki.ca.read_bytes(), cert, key))

    def stub(self, **kw: bool) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self.channel(**kw))

    def generate(self, prompt_ids: list[int], timeout: float = 60, **sampling: object) -> list[gen.GenerateResponse]:
        req = gen.GenerateRequest(prompt_token_ids=prompt_ids, sampling=gen.SamplingParams(**sampling))
        return list(self.stub().Generate(req, timeout=timeout, metadata=bearer("user")))


@pytest.fixture(scope="session")
def secure(rel_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    root = tmp_path_factory.mktemp("secure")
    pki = make_pki(root / "pki")
    tokens = root / "tokens.txt"
    tokens.write_text(f"# test tokens\n{TOKENS['user']}\n{TOKENS['admin']} admin\n")
    keys = root / "kv-keys"
    _, decode_secret = write_keypair(keys, "decode")
    _, prefill_secret = write_keypair(keys, "prefill")
    clients = keys / "clients"
    clients.mkdir()
    (clients / "prefill.key").write_text((keys / "prefill.key").read_text())
    stack = Stack(
        rel_model, engine_args=ENGINE_ARGS, workdir=root / "stack",
        prefill_args=["--kv-curve-secret-key-file", str(prefill_secret),
                      "--kv-curve-server-public-key-file", str(keys / "decode.key")],
        decode_args=["--num-kv-blocks", str(DECODE_BLOCKS), "--kv-curve-secret-key-file", str(decode_secret),
                     "--kv-curve-client-keys", str(clients)],
        gateway_args=["--local-prefill-threshold", "0", "--max-inflight", str(MAX_INFLIGHT),
                      "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                      "--tls-client-ca", str(pki.ca), "--auth-token-file", str(tokens),
                      *(["--http-port", "0"] if _gateway_has_http() else [])],
    )
    stack.start()
    try:
        yield SecureStack(stack, pki)
    finally:
        stack.stop()
