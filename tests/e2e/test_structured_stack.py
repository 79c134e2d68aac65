"""Structured outputs through a real stack with the official `openai` client and gRPC: outputs parse and
validate (jsonschema), refusals are 400 / INVALID_ARGUMENT naming why, length says so, blocks come back.

One disaggregated stack for the module (every prompt's KV shipped: the prefill worker samples the first
token under the grammar, the decode worker re-advances over it), its decode worker speculating with
n-gram lookup. The random tiny model writes garbage; the grammar forces the structure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import jsonschema
import openai
import pytest

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.clients import openai_client
from tests.e2e.conftest import ENGINE_ARGS, wait_all_blocks_free
from tests.observability.conftest import _free_port
from tests.observability.test_metrics import scrape, scrape_text, value

CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5, "multipleOf": 0.25},
        "kind": {"enum": ["cat", "dog", "human"]},
        "friends": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 5}},
            "required": ["name"], "additionalProperties": False}},
    },
    "required": ["name", "age", "height_m", "kind", "friends"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    return {role: _free_port() for role in ("prefill", "decode")}


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory, metrics_ports) -> Iterator[Stack]:
    s = Stack(tiny_model("llama", max_position_embeddings=1024), engine_args=ENGINE_ARGS,
              prefill_args=["--metrics-port", str(metrics_ports["prefill"])],
              decode_args=["--speculative-method", "ngram", "--no-speculative-adaptive",
                           "--metrics-port", str(metrics_ports["decode"])],
              gateway_args=["--http-port", "0", "--local-prefill-threshold", "0", "--served-model-name", "tiny"],
              workdir=tmp_path_factory.mktemp("structured-stack"))
    with s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai_client(stack)


@pytest.fixture(autouse=True)
def every_block_comes_back(stack: Stack) -> Iterator[None]:
    yield
    wait_all_blocks_free(stack)


def test_json_schema_chat_outputs_validate_streamed_or_not(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    resp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=200, n=3, seed=5,
                                          temperature=1.0, response_format=fmt, logprobs=True, top_logprobs=3)
    assert len(resp.choices) == 3
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert choice.logprobs is not None and all(t.logprob >= -9999 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=200, temperature=0.0,
                                            response_format=fmt, stream=True)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_regex_choice_and_grammar(client) -> None:
    r = client.completions.create(model="tiny", prompt="Phone:", max_tokens=30, temperature=1.0, seed=1,
                                  extra_body={"structured_outputs": {"regex": r"\+1 \d{3}-\d{4}"}})
    assert re.fullmatch(r"\+1 [0-9]{3}-[0-9]{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=10, temperature=1.0, seed=2,
                                  extra_body={"guided_choice": ["yes", "no", "it depends"]})
    assert r.choices[0].text in ("yes", "no", "it depends")
    r = client.completions.create(model="tiny", prompt="Sum:", max_tokens=30, temperature=0.0,
                                  extra_body={"guided_grammar": 'root ::= [1-9] " + " [1-9] " = " [0-9]{1,2}'})
    assert re.fullmatch(r"[1-9] \+ [1-9] = [0-9]{1,2}", r.choices[0].text)


def test_json_object_hits_max_tokens_and_says_so(client) -> None:
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0.0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_unenforceable_keywords_are_refused_unless_best_effort(client) -> None:
    schema = {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3, "uniqueItems": True}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, response_format=fmt)
    assert "uniqueItems" in str(err.value) and "cannot enforce" in str(err.value)
    fmt["json_schema"]["strict"] = False  # best effort: uniqueItems is ignored, the rest holds
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0.0,
                                       response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), {**schema, "uniqueItems": False})


@pytest.mark.parametrize(("extra", "words"), [
    ({"guided_grammar": "start: undefined_rule"}, ["grammar does not compile", "undefined_rule"]),
    ({"guided_regex": "(unclosed"}, ["regex does not compile", "unclosed group"]),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "strng"}}}}, ["json_schema", "strng"]),
])
def test_specs_that_do_not_compile_are_400_with_the_compilers_message(client, extra, words) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body=extra)
    for w in words:
        assert w in str(err.value)


def test_responses_text_format(client) -> None:
    r = client.responses.create(model="tiny", input="A person as JSON", max_output_tokens=200, temperature=0.0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_grpc_structural_tag_tool_calls_and_refusal(stack) -> None:
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.address))
    args = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
            "additionalProperties": False}
    tag = gen.StructuralTag(triggers=["<tool_call>"], only_tags=True, tags=[gen.TagSpec(
        begin='<tool_call>\n{"name": "get_weather", "arguments": ', schema_json=json.dumps(args),
        end="}\n</tool_call>")])
    msgs = list(stub.Generate(gen.GenerateRequest(prompt="call a tool", sampling=gen.SamplingParams(
        max_tokens=120, temperature=1.0, seed=3, structured=gen.StructuredOutput(structural_tag=tag))), timeout=60))
    text = "".join(m.text for m in msgs)
    m = re.match(r'<tool_call>\n\{"name": "get_weather", "arguments": (\{.*?\})\}\n</tool_call>', text, re.S)
    assert m, text
    jsonschema.validate(json.loads(m.group(1)), args)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gen.GenerateRequest(prompt="x", sampling=gen.SamplingParams(
            structured=gen.StructuredOutput(json_schema='{"not": {"type": "string"}}'))), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not" in err.value.details()


def test_metrics_count_constrained_requests_and_promtool_accepts_them(stack, client, metrics_ports) -> None:
    """Runs last in the module: every test above sent constrained requests."""
    client.completions.create(model="tiny", prompt="x", max_tokens=8, extra_body={"guided_choice": ["a", "b"]})
    http = stack.gateway.info["http_address"]
    gateway = scrape(http)
    assert value(gateway, "tandem_gateway_constrained_requests_total", kind="choice") >= 1
    for role, port in metrics_ports.items():
        samples = scrape(port)
        assert value(samples, "tandem_constrained_requests_total", role=role) >= 5
        assert value(samples, "tandem_grammar_compile_seconds_count", role=role, cache="hit") >= 1
        assert value(samples, "tandem_grammar_mask_seconds_count", role=role) >= 1
        assert value(samples, "tandem_grammar_mask_wait_seconds_count", role=role) >= 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    for address in [http, *(f"127.0.0.1:{p}" for p in metrics_ports.values())]:
        out = subprocess.run([promtool, "check", "metrics"], input=scrape_text(address), capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr
