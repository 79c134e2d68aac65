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
from gateway.json_body import MAX_JSON_DEPTH, max_body_bytes, max_skeleton_chars
from gateway.validation import MAX_REQUEST_ID_CHARS, MAX_SAMPLING_BYTES, MAX_WIRE_FIELDS, PromptLimits
from server.grpc_server import MAX_MESSAGE_BYTES
from server.protoconv import MAX_TOP_K
from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import wait_all_blocks_free
from tests.reliability.conftest import DECODE_BLOCKS, TOKENS, SecureStack, bearer

CONTEXT = DECODE_BLOCKS * 8  # the decode worker's context, in tokens
MODEL = PromptLimits(1024)  # the model's context (rel_model): what the gateway checks before routing
CHARS = MODEL.max_prompt_chars
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
    Case("prompt longer than the context", R(prompt="hello world " * 30), INVALID,
         (f"context holds {CONTEXT}",)),
    Case("prompt longer than the model's context", R(prompt="hello world " * 200), INVALID,
         ("tokens; the model's context holds 1024",)),
    Case("token ids past the model's context", R(prompt_token_ids=[5] * 1024), INVALID,
         ("the prompt has 1024 tokens", "context holds 1024")),
    Case("token ids far past the context, refused by their bytes", R(prompt_token_ids=[5] * 100_000), INVALID,
         ("prompt_token_ids holds at least 20000 ids", "context holds 1024")),
    Case("token ids sent unpacked", b"\x18\x05" * 40_000, INVALID, (f"more than {MAX_WIRE_FIELDS} fields", "packed")),
    Case("prompt over the character limit", R(prompt="x" * (CHARS + 1)), INVALID,
         (f"prompt has {CHARS + 1} characters", f"the limit is {CHARS}")),
    Case("prompt far over the character limit, refused by its bytes", R(prompt="x" * (4 * CHARS + 1)), INVALID,
         (f"prompt is {4 * CHARS + 1} bytes long", f"the limit is {CHARS} characters")),
    Case("chat messages over the character limit", R(messages=[gen.ChatMessage(role="user", content="x" * (CHARS + 1))]),
         INVALID, (f"messages has {CHARS + 1} characters", f"the limit is {CHARS}")),
    Case("chat messages far over the limit, refused by their bytes",
         R(messages=[gen.ChatMessage(role="user", content="x" * (4 * CHARS + (64 << 10)))]), INVALID,
         ("messages is", "bytes long")),
    Case("prompt and messages", R(prompt="hi", messages=[gen.ChatMessage(role="user", content="hi")]), INVALID,
         ("exactly one of prompt, prompt_token_ids and messages",)),
    Case("tools for a template that renders none", R(messages=[gen.ChatMessage(role="user", content="hi")],
                                                     chat=gen.ChatOptions(tools=[gen.Tool(name="f")])),
         INVALID, ("does not render tools", "tool_choice \"none\"")),
    Case("request_id over its limit", R(prompt="hi", request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), INVALID,
         (f"request_id has {MAX_REQUEST_ID_CHARS + 1} characters", f"the limit is {MAX_REQUEST_ID_CHARS}")),
    Case("request_id of 4 MiB", R(prompt="hi", request_id="r" * (4 << 20)), INVALID,
         ("request_id is 4194304 bytes long", f"the limit is {MAX_REQUEST_ID_CHARS} characters")),
    Case("model name over its limit", R(prompt="hi", model="m" * 300), INVALID, ("model has 300 characters",)),
    Case("sampling over its size limit", R(prompt="hi", sampling=S(stop=["s" * 200] * 7_000)), INVALID,
         ("sampling is", f"the limit is {MAX_SAMPLING_BYTES} bytes")),
    Case("max_tokens beyond the context", R(prompt_token_ids=[5] * 10, sampling=S(max_tokens=1000)), INVALID,
         ("max_tokens (1000)", f"at most {CONTEXT - 10}")),
    Case("negative temperature", R(prompt="hi", sampling=S(temperature=-0.5)), INVALID, ("temperature", ">= 0")),
    Case("NaN temperature", R(prompt="hi", sampling=S(temperature=float("nan"))), INVALID, ("temperature", "finite")),
    Case("top_p 0", R(prompt="hi", sampling=S(top_p=0.0)), INVALID, ("top_p", "(0, 1]")),
    Case("top_p above 1", R(prompt="hi", sampling=S(top_p=1.5)), INVALID, ("top_p", "(0, 1]")),
    Case("negative top_k (-1 wrapped to uint32)", R(prompt="hi", sampling=S(top_k=2**32 - 1)), INVALID,
         ("top_k", "-1 wrapped")),
    Case("top_k 2**31", R(prompt="hi", sampling=S(top_k=2**31)), INVALID,
         (f"top_k {2**31} exceeds the limit of {MAX_TOP_K}",)),
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
    path: str = "/v1/completions"
    headers: dict[str, str] = field(default_factory=dict)


def _json(d: dict[str, object]) -> bytes:
    return json.dumps(d).encode()


HTTP_CASES = [
    HttpCase("empty prompt", {"prompt": ""}, 400, ("empty",)),
    HttpCase("token id outside the vocabulary", {"prompt": [3, 10**6]}, 400, ("1000000", "vocabulary")),
    HttpCase("prompt longer than the context", {"prompt": "hello world " * 30}, 400, (f"context holds {CONTEXT}",)),
    HttpCase("prompt longer than the model's context", {"prompt": "hello world " * 200}, 400,
             ("tokens; the model's context holds 1024",)),
    HttpCase("max_tokens beyond the context", {"prompt": [5] * 10, "max_tokens": 1000}, 400,
             (f"at most {CONTEXT - 10}",)),
    HttpCase("negative temperature", {"prompt": "hi", "temperature": -0.5}, 400, ("temperature",)),
    HttpCase("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', 400, ("temperature", "finite")),
    HttpCase("top_p above 1", {"prompt": "hi", "top_p": 1.5}, 400, ("top_p",)),
    HttpCase("negative top_k", {"prompt": "hi", "top_k": -5}, 400, ("top_k",)),
    HttpCase("too many stop strings", {"prompt": "hi", "stop": ["s"] * (MAX_STOP_STRINGS + 1)}, 400, ("stop",)),
    HttpCase("too long a stop string", {"prompt": "hi", "stop": ["x" * (MAX_STOP_LEN + 1)]}, 400, ("stop",)),
    HttpCase("body over the size limit", _json({"prompt": "x" * (MAX_MESSAGE_BYTES + 1)}), 413,
             ("Too Large", f"body size {max_body_bytes(1024)} exceeded")),
    HttpCase("invalid UTF-8 in the body", b'{"prompt": "hel\xfflo"}', 400, ("JSON",)),
    HttpCase("token ids past the model's context", {"prompt": [5] * 2000}, 400,
             ("the prompt has 2000 tokens", "context holds 1024")),
    HttpCase("more values than the context holds", {"prompt": [5] * 30_000}, 400,
             ("commas, brackets and quotes", f"the limit is {max_skeleton_chars(1024)}")),
    HttpCase("JSON nested too deep", b'{"prompt": "hi", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
             ("nests 5001 levels deep", f"the limit is {MAX_JSON_DEPTH}")),
    HttpCase("lone surrogate in a prompt", b'{"prompt": "ab\\udc00"}', 400, ("prompt holds a lone surrogate",)),
    HttpCase("lone surrogate in chat content", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
             ("messages[0].content holds a lone surrogate",), path="/v1/chat/completions"),
    HttpCase("chat content over the character limit", {"messages": [{"role": "user", "content": "x" * (CHARS + 1)}]},
             400, (f"messages has {CHARS + 1} characters", f"the limit is {CHARS}"), path="/v1/chat/completions"),
    HttpCase("top_k 2**40", {"prompt": "hi", "top_k": 2**40}, 400, (f"top_k {2**40} exceeds the limit of {MAX_TOP_K}",)),
    HttpCase("X-Request-Id over its limit", {"prompt": "hi"}, 400,
             (f"X-Request-Id has 300 characters; the limit is {MAX_REQUEST_ID_CHARS}",),
             headers={"X-Request-Id": "r" * 300}),
    HttpCase("unknown field with a huge name", {"prompt": "hi", "y" * 100_000: 1}, 400,
             ("unrecognized request argument(s): " + "y" * 64,)),
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
        headers = {"Content-Type": "application/json", **case.headers}
        if case.token is not None:
            headers["Authorization"] = f"Bearer {TOKENS.get(case.token, case.token)}"
        body = case.body if isinstance(case.body, bytes) else _json(case.body)
        t0 = time.monotonic()
        try:
            conn.request("POST", case.path, body=body, headers=headers)
            resp = conn.getresponse()
            status, text = resp.status, resp.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:  # a server that hangs up on a huge body
            status, text = 0, repr(exc)
        finally:
            conn.close()
        elapsed = time.monotonic() - t0
        if status != case.status or not all(n in text for n in case.needles) or elapsed > 5.0 or len(text) > 2048:
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
