"""Hostile and broken requests, one table: each gets a precise status and a message naming the field and
the limit, at once, and leaves nothing allocated. Through gRPC and, when the gateway serves it, the
OpenAI-compatible HTTP API (same TLS, client certificate and tokens), on the secure stack.
"""

from __future__ import annotations

import http.client
import json
import time
import warnings
from dataclasses import dataclass, field

import grpc

from engine.sampling.params import MAX_STOP_LEN, MAX_STOP_STRINGS
from gateway.validation import MAX_PROMPT_CHARS
from server.grpc_server import MAX_MESSAGE_BYTES
from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import wait_all_blocks_free
from tests.reliability.conftest import DECODE_BLOCKS, TOKENS, SecureStack, bearer

CONTEXT = DECODE_BLOCKS * 8  # the decode worker's context, in tokens
GENERATE, STATUS = "/tandem.v1.Generation/Generate", "/tandem.v1.Generation/ClusterStatus"
S = gen.SamplingParams
R = gen.GenerateRequest


def _bad_utf8(req: gen.GenerateRequest, good: bytes, bad: bytes) -> bytes:
    data = req.SerializeToString()
    assert data.count(good) == 1 and len(good) == len(bad)  # same length: only the bytes change
    return data.replace(good, bad)


@dataclass(frozen=True)
class Case:
    name: str
    request: gen.GenerateRequest | gen.ClusterStatusRequest | bytes
    code: grpc.StatusCode
    needles: tuple[str, ...]  # all must appear in the details
    method: str = GENERATE
    metadata: list[tuple[str, str]] | None = field(default_factory=lambda: bearer("user"))


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
CASES = [
    Case("empty prompt", R(), INVALID, ("empty",)),
    Case("prompt and token ids", R(prompt="hi", prompt_token_ids=[1]), INVALID, ("exactly one",)),
    Case("token id outside the vocabulary", R(prompt_token_ids=[3, 10**6]), INVALID, ("1000000", "vocabulary")),
    Case("prompt longer than the context", R(prompt="hello world " * 200), INVALID,
         (f"context holds {CONTEXT}",)),
    Case("prompt over the character limit", R(prompt="x" * (MAX_PROMPT_CHARS + 1)), INVALID,
         (f"the limit is {MAX_PROMPT_CHARS}",)),
    Case("max_tokens beyond the context", R(prompt_token_ids=[5] * 10, sampling=S(max_tokens=1000)), INVALID,
         ("max_tokens (1000)", f"at most {CONTEXT - 10}")),
    Case("negative temperature", R(prompt="hi", sampling=S(temperature=-0.5)), INVALID, ("temperature", ">= 0")),
    Case("NaN temperature", R(prompt="hi", sampling=S(temperature=float("nan"))), INVALID, ("temperature", "finite")),
    Case("top_p 0", R(prompt="hi", sampling=S(top_p=0.0)), INVALID, ("top_p", "(0, 1]")),
    Case("top_p above 1", R(prompt="hi", sampling=S(top_p=1.5)), INVALID, ("top_p", "(0, 1]")),
    Case("negative top_k (-1 wrapped to uint32)", R(prompt="hi", sampling=S(top_k=2**32 - 1)), INVALID,
         ("top_k", "-1 wrapped")),
    Case("too many stop strings", R(prompt="hi", sampling=S(stop=["s"] * (MAX_STOP_STRINGS + 1))), INVALID,
         ("stop", f"at most {MAX_STOP_STRINGS}")),
    Case("too long a stop string", R(prompt="hi", sampling=S(stop=["x" * (MAX_STOP_LEN + 1)])), INVALID,
         ("stop string", str(MAX_STOP_LEN))),
    Case("min_tokens above max_tokens", R(prompt="hi", sampling=S(max_tokens=4, min_tokens=9)), INVALID,
         ("min_tokens",)),
    Case("seed out of range", R(prompt="hi", sampling=S(seed=2**63)), INVALID, ("seed",)),
    Case("request over the message size limit", R(prompt="x" * (MAX_MESSAGE_BYTES + 1)),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ("larger than max",)),
    Case("invalid UTF-8 in the prompt", _bad_utf8(R(prompt="say hello"), b"hello", b"hel\xffo"), INVALID,
         ("prompt", "UTF-8", "0xff")),
    Case("invalid UTF-8 in a stop string", _bad_utf8(R(prompt="hi", sampling=S(stop=["ab", "stop!"])), b"stop!",
                                                     b"st\xc3(!"), INVALID, ("sampling.stop[1]", "UTF-8")),
    Case("unknown model", R(prompt="hi", model="gpt-9"), NOT_FOUND, ("gpt-9", "this gateway serves")),
    Case("no bearer token", R(prompt="hi"), grpc.StatusCode.UNAUTHENTICATED, ("authorization: Bearer",),
         metadata=None),
    Case("unknown bearer token", R(prompt="hi"), grpc.StatusCode.UNAUTHENTICATED, ("invalid bearer token",),
         metadata=[("authorization", "Bearer not-a-real-token-at-all")]),
    Case("ClusterStatus with a user token", gen.ClusterStatusRequest(), grpc.StatusCode.PERMISSION_DENIED,
         ("ClusterStatus", "'admin'", "'user'"), method=STATUS),
]


@dataclass(frozen=True)
class HttpCase:
    name: str
    body: dict[str, object] | bytes  # bytes: sent as is
    status: int
    needles: tuple[str, ...]
    token: str | None = "user"  # None: no Authorization header; other strings: sent as the bearer token


def _json(d: dict[str, object]) -> bytes:
    return json.dumps(d).encode()


HTTP_CASES = [
    HttpCase("empty prompt", {"prompt": ""}, 400, ("empty",)),
    HttpCase("token id outside the vocabulary", {"prompt": [3, 10**6]}, 400, ("1000000", "vocabulary")),
    HttpCase("prompt longer than the context", {"prompt": "hello world " * 200}, 400, (f"context holds {CONTEXT}",)),
    HttpCase("max_tokens beyond the context", {"prompt": [5] * 10, "max_tokens": 1000}, 400,
             (f"at most {CONTEXT - 10}",)),
    HttpCase("negative temperature", {"prompt": "hi", "temperature": -0.5}, 400, ("temperature",)),
    HttpCase("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', 400, ("temperature", "finite")),
    HttpCase("top_p above 1", {"prompt": "hi", "top_p": 1.5}, 400, ("top_p",)),
    HttpCase("negative top_k", {"prompt": "hi", "top_k": -5}, 400, ("top_k",)),
    HttpCase("too many stop strings", {"prompt": "hi", "stop": ["s"] * (MAX_STOP_STRINGS + 1)}, 400, ("stop",)),
    HttpCase("too long a stop string", {"prompt": "hi", "stop": ["x" * (MAX_STOP_LEN + 1)]}, 400, ("stop",)),
    HttpCase("body over the size limit", _json({"prompt": "x" * (MAX_MESSAGE_BYTES + 1)}), 413, ("Too Large",)),
    HttpCase("invalid UTF-8 in the body", b'{"prompt": "hel\xfflo"}', 400, ("JSON",)),
    HttpCase("unknown model", {"prompt": "hi", "model": "gpt-9"}, 404, ("gpt-9",)),
    HttpCase("no bearer token", {"prompt": "hi"}, 401, ("Bearer",), token=None),
    HttpCase("unknown bearer token", {"prompt": "hi"}, 401, ("invalid bearer token",), token="not-a-real-token-at-all"),
]


def _http_failures(secure: SecureStack) -> list[str]:
    address = secure.http_address
    if address is None:
        warnings.warn("the gateway does not serve the HTTP API in this checkout: HTTP rows skipped", stacklevel=1)
        return []
    host, port = address.rsplit(":", 1)
    failures = []
    for case in HTTP_CASES:
        conn = http.client.HTTPSConnection(host, int(port), context=secure.ssl_context(), timeout=30)
        headers = {"Content-Type": "application/json"}
        if case.token is not None:
            headers["Authorization"] = f"Bearer {TOKENS.get(case.token, case.token)}"
        body = case.body if isinstance(case.body, bytes) else _json(case.body)
        t0 = time.monotonic()
        try:
            conn.request("POST", "/v1/completions", body=body, headers=headers)
            resp = conn.getresponse()
            status, text = resp.status, resp.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:  # a server that hangs up on a huge body
            status, text = 0, repr(exc)
        finally:
            conn.close()
        elapsed = time.monotonic() - t0
        if status != case.status or not all(n in text for n in case.needles) or elapsed > 5.0:
            failures.append(f"HTTP {case.name}: {status} after {elapsed:.1f} s: {text[:200]}")
    return failures


def _call(channel: grpc.Channel, case: Case) -> grpc.RpcError:
    serialize = lambda m: m if isinstance(m, bytes) else m.SerializeToString()  # noqa: E731
    try:
        if case.method == GENERATE:
            call = channel.unary_stream(GENERATE, request_serializer=serialize,
                                        response_deserializer=gen.GenerateResponse.FromString)
            list(call(case.request, timeout=30, metadata=case.metadata))
        else:
            unary = channel.unary_unary(case.method, request_serializer=serialize,
                                        response_deserializer=gen.ClusterStatusResponse.FromString)
            unary(case.request, timeout=30, metadata=case.metadata)
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"{case.name}: the call succeeded")


def test_every_bad_request_gets_a_precise_status_at_once(secure: SecureStack) -> None:
    """Every gRPC row, then every HTTP row; all failures are reported together."""
    channel = secure.channel()
    failures = []
    for case in CASES:
        t0 = time.monotonic()
        err = _call(channel, case)
        elapsed = time.monotonic() - t0
        details = err.details() or ""
        if err.code() != case.code or not all(n in details for n in case.needles) or elapsed > 5.0:
            failures.append(f"{case.name}: {err.code().name} after {elapsed:.1f} s: {details[:200]}")
    failures += _http_failures(secure)
    assert not failures, "\n".join(failures)
    assert secure.generate([5, 6, 7], max_tokens=3, temperature=0.0)[-1].usage.completion_tokens == 3
    wait_all_blocks_free(secure.stub(), metadata=bearer("admin"))
