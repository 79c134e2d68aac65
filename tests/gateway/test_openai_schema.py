"""OpenAI bodies -> GenerateRequest (gateway/openai_schema.py), and the HTTP adapter's own answers
(auth hook, malformed bodies, unknown routes, no workers) on a real, idle GenerationService."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import test_utils

from engine.checkpoint import load_hf_config
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer
from gateway.config import GatewayLimits
from gateway.http_api import OpenAIApi
from gateway.openai_schema import RequestError, parse_chat, parse_completion
from gateway.registry import WorkerRegistry
from gateway.responses_api import parse_responses
from gateway.router import Router
from gateway.service import GenerationService
from server.errors import Unauthenticated
from tandem.v1 import generation_pb2 as gen


def test_completion_fields_map_onto_the_grpc_request() -> None:
    p = parse_completion({"model": "m", "prompt": ["hello"], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                          "stop": "\n", "seed": 3, "logprobs": 2, "stream": True,
                          "stream_options": {"include_usage": True}, "top_k": -1, "ignore_eos": True, "user": "u"})
    [r] = p.requests()
    assert (r.model, r.prompt, r.sampling.max_tokens, list(r.sampling.stop), r.sampling.seed) == ("m", "hello", 7,
                                                                                                  ["\n"], 3)
    assert r.sampling.temperature == pytest.approx(0.5) and r.sampling.top_k == 0 and r.sampling.ignore_eos
    assert (p.stream, p.include_usage, p.top_logprobs, r.sampling.logprobs) == (True, True, 2, 2)
    assert list(parse_completion({"prompt": [[5, 6, 7]]}).requests()[0].prompt_token_ids) == [5, 6, 7]
    assert not parse_completion({"prompt": "x"}).request.HasField("model")  # unset: the served model


def test_a_batch_of_prompts_is_one_request_each_with_the_same_options() -> None:
    p = parse_completion({"prompt": ["a", [5, 6], "b"], "n": 2, "seed": 9, "priority": -3, "max_tokens": 4})
    reqs = p.requests()
    assert [r.prompt or list(r.prompt_token_ids) for r in reqs] == ["a", [5, 6], "b"]
    assert all((r.sampling.n, r.sampling.seed, r.priority, r.sampling.max_tokens) == (2, 9, -3, 4) for r in reqs)
    assert p.n == 2 and not p.echo


def test_extensions_map_onto_the_grpc_sampling_params() -> None:
    s = parse_completion({"prompt": "x", "logit_bias": {"5": -100, "7": 2.5}, "allowed_token_ids": [5, 7, 9],
                          "bad_words": ["foo"], "include_stop_str_in_output": True, "prompt_logprobs": 3}).request.sampling
    assert dict(s.logit_bias) == {5: -100.0, 7: 2.5} and list(s.allowed_token_ids) == [5, 7, 9]
    assert list(s.bad_words) == ["foo"] and s.include_stop_str_in_output and s.prompt_logprobs == 3


def test_echo_asks_for_prompt_logprobs_and_max_tokens_zero_means_the_prompt_alone() -> None:
    p = parse_completion({"prompt": "x", "echo": True, "logprobs": 2, "max_tokens": 0})
    s = p.request.sampling
    assert p.echo and p.echo_only and (s.max_tokens, s.logprobs, s.prompt_logprobs) == (1, 2, 2)
    p = parse_completion({"prompt": "x", "echo": True})
    assert p.echo and not p.echo_only and not p.request.sampling.HasField("prompt_logprobs")


def test_chat_fields_and_message_parts() -> None:
    p = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
                    "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3})
    assert list(p.request.messages) == [gen.ChatMessage(role="user", content="ab")]
    assert p.request.sampling.max_tokens == 4
    assert p.top_logprobs == 3 and not p.request.prompt and not p.request.prompt_token_ids


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": ["a", 5]}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt": "x", "bad_words": [1]}, "bad_words"),
    ({"prompt": "x", "priority": 2**31}, "priority"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": "big"}}, "logit_bias"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "top_k": 2**40}, "top_k"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({}, "prompt"),
])
def test_bad_completion_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_completion(body)
    assert err.value.param == param


def test_continue_final_message_turns_off_the_generation_prompt() -> None:
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "The answer is"}]
    p = parse_chat({"messages": msgs, "continue_final_message": True})
    assert p.continue_final_message and not p.add_generation_prompt
    assert parse_chat({"messages": msgs}).add_generation_prompt


def test_responses_input_becomes_a_conversation() -> None:
    p, echoed = parse_responses({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}], "instructions": "be terse",
        "max_output_tokens": 5, "stream": True, "store": False})
    assert p.messages == [{"role": "system", "content": "be terse"}, {"role": "user", "content": "ab"}]
    assert p.request.sampling.max_tokens == 5 and p.stream and echoed["max_output_tokens"] == 5
    assert parse_responses({"input": "hi"})[0].messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": [{"type": "function_call", "role": "user"}]}, "input"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "n": 2}, "n"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text"),
])
def test_bad_responses_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_responses(body)
    assert err.value.param == param


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a", "choice": ["b"]}},
     "structured_outputs"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_choice": "yes"}, "guided_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_regex": "a",
      "response_format": {"type": "json_object"}}, "guided_regex"),
])
def test_bad_chat_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_chat(body)
    assert err.value.param == param


def test_structured_output_fields_become_the_spec() -> None:
    chat = [{"role": "user", "content": "x"}]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    s = parse_chat({"messages": chat, "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": schema, "strict": True}}}).request.sampling.structured
    assert json.loads(s.json_schema) == schema and not s.best_effort
    lenient = parse_chat({"messages": chat, "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": schema, "strict": False}}}).request.sampling.structured
    assert lenient.best_effort
    assert parse_chat({"messages": chat, "response_format": {"type": "json_object"}}).request.sampling.structured \
        .json_object
    assert not parse_chat({"messages": chat, "response_format": {"type": "text"}}).request.sampling.HasField(
        "structured")
    c = parse_completion({"prompt": "x", "structured_outputs": {"choice": ["a", "b"], "best_effort": True}})
    assert list(c.request.sampling.structured.choice.choices) == ["a", "b"]
    assert parse_completion({"prompt": "x", "guided_regex": "[0-9]+", "guided_decoding_backend": "xgrammar"}) \
        .request.sampling.structured.regex == "[0-9]+"
    assert json.loads(parse_completion({"prompt": "x", "guided_json": schema}).request.sampling.structured
                      .json_schema) == schema
    tag = parse_chat({"messages": chat, "response_format": {"type": "structural_tag", "triggers": ["<t>"],
                      "structures": [{"begin": "<t>", "schema": schema, "end": "</t>"}]}}).request.sampling
    assert tag.structured.structural_tag.tags[0].end == "</t>"
    r, _ = parse_responses({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": schema}}})
    assert json.loads(r.request.sampling.structured.json_schema) == schema


def test_adapter_answers_in_openai_shape_without_workers(tiny_model) -> None:
    """Auth hook on /v1 (not /health), malformed JSON, unknown routes, and UNAVAILABLE -> 503 with
    Retry-After when the only decode worker is unreachable: all OpenAI-shaped."""
    model = tiny_model("llama")

    def authorize(header: str | None) -> None:
        if header != "Bearer good-token-0123456789":
            raise Unauthenticated("needs a bearer token")

    async def scenario() -> None:
        registry = WorkerRegistry([], ["127.0.0.1:9"], interval_s=60)  # never polled: no healthy worker
        service = GenerationService(registry, Router(registry, 0), Tokenizer.from_dir(model),
                                    ModelConfig.from_hf(load_hf_config(model)), ("tiny",), GatewayLimits())
        ok = {"Authorization": "Bearer good-token-0123456789"}
        async with test_utils.TestClient(test_utils.TestServer(OpenAIApi(service, authorize).app())) as client:
            r = await client.get("/v1/models")
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
            assert (await client.get("/v1/models", headers=ok)).status == 200
            assert (await client.post("/tokenize", json={"prompt": "hi"})).status == 401
            r = await client.post("/tokenize", json={"prompt": "def f(x):"}, headers=ok)  # no worker needed
            ids = (await r.json())["tokens"]
            assert r.status == 200 and (await r.json())["count"] == len(ids) > 2
            r = await client.post("/detokenize", json={"tokens": ids}, headers=ok)
            assert (await r.json())["prompt"].endswith("def f(x):")
            r = await client.post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                                  headers=ok)
            assert r.status == 400 and "exactly one" in (await r.json())["error"]["message"]
            r = await client.get("/health")
            assert r.status == 503 and (await r.json())["status"].startswith("no healthy decode worker")
            r = await client.post("/v1/completions", data=b"{not json", headers=ok)
            assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
            r = await client.get("/v1/nothing-here", headers=ok)
            assert r.status == 404 and set((await r.json())["error"]) == {"message", "type", "param", "code"}
            r = await client.post("/v1/completions", json={"prompt": "hi"}, headers=ok)
            body = await r.json()
            assert r.status == 503 and body["error"]["code"] == "unavailable" and r.headers["Retry-After"] == "1"
        await registry.close()

    asyncio.run(scenario())
