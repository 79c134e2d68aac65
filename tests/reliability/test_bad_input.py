"""Hostile and broken requests, one table: each gets a precise status and a message naming the field and
the limit, at once, and leaves nothing allocated. Through gRPC on the secure stack (TLS + tokens).

The OpenAI-compatible HTTP API (gateway/http_api.py) maps the same statuses to HTTP; its rows belong
in this table once that API is served by the stack's gateway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from engine.sampling_params import MAX_STOP_LEN, MAX_STOP_STRINGS
from gateway.validation import MAX_PROMPT_CHARS
from tandem.grpc_server import MAX_MESSAGE_BYTES
from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import wait_all_blocks_free
from tests.reliability.conftest import DECODE_BLOCKS, SecureStack, bearer

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
    channel = secure.channel()
    failures = []
    for case in CASES:
        t0 = time.monotonic()
        err = _call(channel, case)
        elapsed = time.monotonic() - t0
        details = err.details() or ""
        if err.code() != case.code or not all(n in details for n in case.needles) or elapsed > 5.0:
            failures.append(f"{case.name}: {err.code().name} after {elapsed:.1f} s: {details[:200]}")
    assert not failures, "\n".join(failures)
    assert secure.generate([5, 6, 7], max_tokens=3, temperature=0.0)[-1].usage.completion_tokens == 3
    wait_all_blocks_free(secure.stub(), metadata=bearer("admin"))
