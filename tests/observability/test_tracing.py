"""One request through a real 1 prefill + 1 decode stack yields one trace across all three processes."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request

import grpc

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.observability.conftest import ExportedSpan, SpanSink

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
PROMPT = "\n".join(f"def handler_{i}(request, context):\n    return context.abort(request.code, 'no')"
                   for i in range(6))
MAX_TOKENS = 40
STAGES = {
    "tandem-gateway": {"gateway.tokenize", "gateway.route", "tandem.v1.DecodeWorker/Decode",
                       "tandem.v1.PrefillWorker/Prefill"},
    "tandem-prefill": {"tandem.v1.PrefillWorker/Prefill", "prefill.queue_wait", "prefill.chunk", "kv.send"},
    "tandem-decode": {"tandem.v1.DecodeWorker/Decode", "kv.receive", "decode.admission_wait", "decode.steps",
                      "decode.finish"},
}


def _send(stack: Stack, rid: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[gen.GenerateResponse]:
    with grpc.insecure_channel(stack.address) as ch:
        return list(generation_pb2_grpc.GenerationStub(ch).Generate(gen.GenerateRequest(
            request_id=rid, prompt=f"# {rid}\n{PROMPT}",  # unique: no prefix-cache hit
            sampling=gen.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)),
            metadata=metadata, timeout=60))


def _trace_of(sink: SpanSink, rid: str) -> list[ExportedSpan]:
    """Wait until the request's trace holds every stage, then return its spans."""
    def complete(spans: list[ExportedSpan]) -> bool:
        roots = [s for s in spans if s.attributes.get("gen_ai.response.id") == rid]
        if not roots:
            return False
        mine = {(s.service, s.name) for s in spans if s.trace_id == roots[0].trace_id}
        return all((svc, name) in mine for svc, names in STAGES.items() for name in names)

    spans = sink.wait_for(complete)
    root = next(s for s in spans if s.attributes.get("gen_ai.response.id") == rid)
    return [s for s in spans if s.trace_id == root.trace_id]


def _check_trace(spans: list[ExportedSpan], rid: str, usage: gen.Usage) -> ExportedSpan:
    """Everything a single request's trace must show; returns its root."""
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "span ids repeat"
    # no span of this request went to another trace
    assert {s.service for s in spans} == set(STAGES)
    assert len({s.instance for s in spans}) == 3, "one service.instance.id per process"
    roots = [s for s in spans if s.attributes.get("gen_ai.response.id") == rid]
    assert len(roots) == 1
    root = roots[0]
    assert root.service == "tandem-gateway" and root.kind == SERVER
    for s in spans:
        if s is not root:
            assert s.parent_id in by_id, f"{s.service} {s.name}: parent {s.parent_id} is not in the trace"
        assert s.start_ns <= s.end_ns
    a = root.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == root.name.split()[1]
    assert a["gen_ai.request.max_tokens"] == MAX_TOKENS and a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.request.top_p"] == 1.0
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == MAX_TOKENS
    assert a["gen_ai.response.finish_reasons"] == ["length"]

    def one(service: str, name: str) -> ExportedSpan:
        found = [s for s in spans if s.service == service and s.name == name]
        assert len(found) == 1, (service, name, len(found))
        return found[0]

    # gRPC crossings: each worker's SERVER span is the child of the gateway's CLIENT span
    for service, method in (("tandem-decode", "tandem.v1.DecodeWorker/Decode"),
                            ("tandem-prefill", "tandem.v1.PrefillWorker/Prefill")):
        client, server = one("tandem-gateway", method), one(service, method)
        assert client.kind == CLIENT and client.parent_id == root.span_id
        assert server.kind == SERVER and server.parent_id == client.span_id
    route = one("tandem-gateway", "gateway.route")
    assert route.attributes["tandem.route.local_prefill"] is False
    assert route.attributes["tandem.route.prefill_worker"].startswith("prefill-")
    assert "prefill on" in route.attributes["tandem.route.reason"]
    # the ZeroMQ crossing: kv.receive (decode) is the child of kv.send (prefill)
    send, recv = one("tandem-prefill", "kv.send"), one("tandem-decode", "kv.receive")
    assert recv.parent_id == send.span_id
    assert send.attributes["tandem.kv.bytes"] == recv.attributes["tandem.kv.bytes"] > 0
    assert send.attributes["tandem.kv.num_layers"] >= 1 and send.attributes["tandem.kv.result"] == "OK"
    # the prompt went in several chunks under the 64-token budget, which cover it exactly
    chunks = sorted((s for s in spans if s.name == "prefill.chunk"), key=lambda s: s.start_ns)
    assert usage.cached_tokens == 0 and usage.prompt_tokens > 64 and len(chunks) >= 2
    assert sum(c.attributes["tandem.chunk.tokens"] for c in chunks) == usage.prompt_tokens
    assert [c.attributes["tandem.chunk.final"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    # decode: aggregated steps (the first token came from the prefill worker), then the finish
    steps = [s for s in spans if s.name == "decode.steps"]
    assert sum(s.attributes["tandem.decode.tokens"] for s in steps) == MAX_TOKENS - 1
    assert len(steps) < MAX_TOKENS // 4, "decode spans must aggregate steps"
    finish = one("tandem-decode", "decode.finish")
    assert finish.attributes["tandem.finish.reason"] == "length"
    assert finish.attributes["gen_ai.usage.output_tokens"] == MAX_TOKENS
    return root


def test_one_request_is_one_trace_across_three_processes(traced_stack: Stack, otlp_sink: tuple[SpanSink, int]) -> None:
    stack = traced_stack
    sink, _ = otlp_sink
    rid = "trace-" + secrets.token_hex(4)
    msgs = _send(stack, rid)
    assert sum(len(m.token_ids) for m in msgs) == MAX_TOKENS
    root = _check_trace(_trace_of(sink, rid), rid, msgs[-1].usage)
    assert root.parent_id == ""


def test_client_traceparent_is_honoured(traced_stack: Stack, otlp_sink: tuple[SpanSink, int]) -> None:
    stack = traced_stack
    sink, _ = otlp_sink
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    rid = "traced-" + secrets.token_hex(4)
    msgs = _send(stack, rid, (("traceparent", f"00-{trace_id}-{span_id}-01"),))
    root = _check_trace(_trace_of(sink, rid), rid, msgs[-1].usage)  # every other span hangs under the root
    assert root.trace_id == trace_id and root.parent_id == span_id


def _post(address: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{address}{path}", data=body,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_chat_is_traced_as_chat_under_an_http_server_span(traced_stack: Stack,
                                                               otlp_sink: tuple[SpanSink, int]) -> None:
    stack = traced_stack
    sink, _ = otlp_sink
    http = stack.gateway.info["http_address"]
    rid = "http-" + secrets.token_hex(4)
    status, body = _post(http, "/v1/chat/completions", json.dumps({
        "model": stack.gateway.info["model_name"], "max_tokens": 5,
        "messages": [{"role": "user", "content": f"# {rid}\n{PROMPT}"}]}).encode(),
        {"X-Request-Id": rid, "User-Agent": "tandem-test"})
    assert status == 200, body
    spans = sink.wait_for(lambda ss: any(s.attributes.get("gen_ai.response.id") == rid for s in ss)
                          and any(s.name == "POST /v1/chat/completions" and s.attributes.get("http.response.status_code")
                                  == 200 for s in ss))
    [chat] = [s for s in spans if s.attributes.get("gen_ai.response.id") == rid]
    assert chat.name == f"chat {stack.gateway.info['model_name']}" and chat.attributes["gen_ai.operation.name"] == "chat"
    assert "rpc.system" not in chat.attributes and "gen_ai.input.messages" not in chat.attributes  # capture is opt-in
    [server] = [s for s in spans if s.span_id == chat.parent_id]
    assert server.kind == SERVER and server.name == "POST /v1/chat/completions"
    attrs = server.attributes
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/v1/chat/completions"
    assert attrs["url.path"] == "/v1/chat/completions" and attrs["http.response.status_code"] == 200
    assert attrs["user_agent.original"] == "tandem-test" and attrs["server.port"] == int(http.rsplit(":", 1)[1])
    # the workers' spans are in the same trace, below the chat span
    sink.wait_for(lambda ss: any(s.trace_id == chat.trace_id and s.name == "decode.finish" for s in ss))
    # a body refused while parsing: an HTTP span with its 400, and no generation span
    status, _ = _post(http, "/v1/completions", b"{", {"User-Agent": "bad-json"})
    assert status == 400
    bad = sink.wait_for(lambda ss: any(s.attributes.get("user_agent.original") == "bad-json" for s in ss))
    [refused] = [s for s in bad if s.attributes.get("user_agent.original") == "bad-json"]
    assert refused.attributes["http.response.status_code"] == 400
    assert not [s for s in bad if s.parent_id == refused.span_id]
    # one access line per request, with what happened
    log = (stack.workdir / "gateway.log").read_text()
    [line] = [ln for ln in log.splitlines() if f"id={rid}" in ln]
    assert "tandem.access: POST /v1/chat/completions 200" in line
    for key in ("prompt_tokens=", "completion_tokens=5", "ttft_ms=", "finish=length", "duration_ms="):
        assert key in line, line
    assert "tandem.access: POST /v1/completions 400" in log


def test_reflection_is_served_as_v1_and_v1alpha(traced_stack: Stack) -> None:
    from grpc_reflection.v1alpha import reflection_pb2 as alpha

    with grpc.insecure_channel(traced_stack.address) as ch:
        for version in ("v1", "v1alpha"):
            call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                    request_serializer=alpha.ServerReflectionRequest.SerializeToString,
                                    response_deserializer=alpha.ServerReflectionResponse.FromString)
            listed, described = call(iter([
                alpha.ServerReflectionRequest(list_services=""),
                alpha.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            ]), timeout=10)
            names = {s.name for s in listed.list_services_response.service}
            assert {"tandem.v1.Generation", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= names, version
            assert described.file_descriptor_response.file_descriptor_proto, version
