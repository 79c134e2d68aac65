"""Tools, tool_choice and reasoning against a real stack, with the official `openai` client and gRPC side by
side: a tiny random Qwen3 whose tokenizer carries a Qwen3-shaped chat template (tools in the Hermes
shape, `<think>` opened by the generation prompt unless enable_thinking is false: tests/chat_templates.py).

One stack for the module (gateway + one decode worker, local prefill). A random model never writes a tool
call on its own, so here the calls are checked for shape (accepted, parsed by the SDK, no call where none
was written); the parsers themselves are tested on real-format text in test_tool_parsers.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.chat_templates import QWEN3_TEMPLATE, TIME, WEATHER, with_template
from tests.clients import grpc_stub, openai_client
from tests.clients import post_json as post
from tests.e2e.conftest import ENGINE_ARGS, wait_all_blocks_free

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True}


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory) -> Iterator[Stack]:
    model = with_template(tiny_model("qwen3", max_position_embeddings=2048), tmp_path_factory.mktemp("qwen3t") / "m",
                          QWEN3_TEMPLATE)
    s = Stack(model, prefill_workers=0, engine_args=ENGINE_ARGS, gateway_args=["--http-port", "0"],
              workdir=tmp_path_factory.mktemp("tools-stack"))
    with s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai_client(stack)


@pytest.fixture(scope="module")
def stub(stack: Stack) -> generation_pb2_grpc.GenerationStub:
    return grpc_stub(stack)


@pytest.fixture(autouse=True)
def every_block_comes_back(stack: Stack) -> Iterator[None]:
    yield
    wait_all_blocks_free(stack)



def streamed(stream: Any) -> tuple[str, str, list[Any], str | None]:
    """(content, reasoning, tool call deltas, finish_reason) of a chat stream."""
    content = reasoning = ""
    calls: list[Any] = []
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    return content, reasoning, calls, finish


@pytest.mark.parametrize("tool_choice", ["none", "auto"])
def test_tools_are_accepted_streamed_and_not_and_the_sdk_parses_the_reply(client, stack, tool_choice) -> None:
    common = dict(model=client.models.list().data[0].id, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                  max_tokens=12, temperature=0, extra_body=NO_THINKING)
    whole = client.chat.completions.create(**common)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content and not message.tool_calls
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    content, reasoning, calls, finish = streamed(client.chat.completions.create(stream=True, **common))
    assert (content, reasoning, calls, finish) == (message.content, "", [], "length")
    status, tokens = post(stack, "/tokenize", {"messages": ASK, "tools": [WEATHER, TIME],
                                               "chat_template_kwargs": NO_THINKING["chat_template_kwargs"]})
    assert status == 200 and '"name": "get_weather"' in "".join(tokens["token_strs"]).replace("Ġ", " ")
    assert whole.usage.prompt_tokens == tokens["count"]  # the tools were in the prompt the model read


def test_reasoning_is_split_out_and_chat_template_kwargs_reach_the_template(client, stub) -> None:
    common = dict(model=client.models.list().data[0].id, messages=ASK, max_tokens=10, temperature=0)
    thinking = client.chat.completions.create(**common, extra_body={"ignore_eos": True})
    m = thinking.choices[0].message
    # the prompt opened <think> and max_tokens cut the thinking: all of it is reasoning, none is content
    assert m.reasoning_content and not m.content and thinking.choices[0].finish_reason == "length"
    content, reasoning, calls, _ = streamed(client.chat.completions.create(stream=True, **common,
                                                                            extra_body={"ignore_eos": True}))
    assert (content, reasoning, calls) == ("", m.reasoning_content, [])
    plain = client.chat.completions.create(**common, extra_body=NO_THINKING).choices[0].message
    assert plain.content and not getattr(plain, "reasoning_content", None)
    assert plain.content != m.reasoning_content  # another prompt: the template saw enable_thinking
    # gRPC: the same conversation as messages gives the same split, token for token
    msgs = list(stub.Generate(gen.GenerateRequest(
        messages=[gen.ChatMessage(role="user", content=ASK[0]["content"])],
        sampling=gen.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)), timeout=60))
    assert "".join(x.reasoning_text for x in msgs) == m.reasoning_content and not "".join(x.text for x in msgs)
    msgs = list(stub.Generate(gen.GenerateRequest(
        messages=[gen.ChatMessage(role="user", content=ASK[0]["content"])],
        chat=gen.ChatOptions(chat_template_kwargs_json='{"enable_thinking": false}', tools=[
            gen.Tool(name="get_weather", parameters_json=json.dumps(WEATHER["function"]["parameters"]))],
            tool_choice_mode=gen.TOOL_CHOICE_MODE_NONE),
        sampling=gen.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)), timeout=60))
    assert "".join(x.text for x in msgs) and not any(x.reasoning_text or x.tool_calls for x in msgs)


def test_a_conversation_with_tool_calls_and_results_is_rendered_and_answered(client, stack) -> None:
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    status, tokens = post(stack, "/tokenize", {"messages": history, "tools": [WEATHER],
                                               "chat_template_kwargs": NO_THINKING["chat_template_kwargs"]})
    text = "".join(tokens["token_strs"]).replace("Ġ", " ").replace("Ċ", "\n")
    assert status == 200 and '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in text
    resp = client.chat.completions.create(model=client.models.list().data[0].id, messages=history, tools=[WEATHER],
                                          max_tokens=4, temperature=0, extra_body=NO_THINKING)
    assert resp.choices[0].message.content and resp.usage.prompt_tokens == tokens["count"]


def test_refusals_say_what_to_fix_over_http_and_grpc(client, stub) -> None:
    model = client.models.list().data[0].id
    cases = [
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice",
         "not among the tools"),
        (dict(tool_choice="required"), "tool_choice", "no tools were given"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]), "tools",
         "\"type\": \"object\""),
        (dict(messages=[*ASK, {"role": "tool", "content": "21"}]), "messages", "tool_call_id"),
    ]
    for extra, param, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, **{"messages": ASK, **extra}, max_tokens=2)
        assert err.value.param == param and words in err.value.message, err.value.message
    with pytest.raises(grpc.RpcError) as rpc:
        list(stub.Generate(gen.GenerateRequest(messages=[gen.ChatMessage(role="user", content="x")], chat=gen.ChatOptions(
            tools=[gen.Tool(name="get_weather")], tool_choice_function="get_time")), timeout=30))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not among the tools" in rpc.value.details()
    with pytest.raises(grpc.RpcError) as rpc:
        list(stub.Generate(gen.GenerateRequest(prompt="x", messages=[gen.ChatMessage(role="user", content="x")]),
                           timeout=30))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in rpc.value.details()


# ------------------------------------------------------------------ tool_choice required / named (grammar)
BOUNDED = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
                   "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (BOUNDED, CLOCK)}


def valid_calls(calls: list[Any], names: set[str], cut: bool = False) -> list[tuple[str, Any]]:
    """(name, arguments) of each call, after checking the name and the arguments against the tool's
    schema; `cut`: the reply hit max_tokens, so its last call may be unfinished (only its name is checked)."""
    out = []
    for i, c in enumerate(calls):
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        if cut and i == len(calls) - 1:
            continue
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


def streamed_completion(client: openai.OpenAI, **common: Any) -> Any:
    """The stream accumulated by the openai SDK's own helper, as `client.chat.completions.stream` does."""
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(stream=True, **common):
        state.handle_chunk(chunk)
    snapshot = state.current_completion_snapshot  # get_final_completion refuses a reply cut by length
    return snapshot.choices[0] if snapshot.choices[0].finish_reason == "length" else \
        state.get_final_completion().choices[0]


@pytest.mark.parametrize(("choice", "parallel", "names"), [
    ("required", False, {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, True, {"get_time"}),
])
def test_required_and_named_tool_choice_make_a_random_model_call_one_tool(client, choice, parallel, names) -> None:
    common = dict(model=client.models.list().data[0].id, messages=ASK, tools=[BOUNDED, CLOCK], tool_choice=choice,
                  parallel_tool_calls=parallel, max_tokens=120, temperature=0)
    c = client.chat.completions.create(**common).choices[0]
    calls = valid_calls(c.message.tool_calls or [], names)
    # exactly one call, and the reply ends with it (the grammar is complete) rather than at max_tokens
    assert len(calls) == 1 and c.finish_reason == "tool_calls" and not c.message.content
    final = streamed_completion(client, **common)
    assert valid_calls(final.message.tool_calls or [], names) == calls and final.finish_reason == "tool_calls"
    seeded = client.chat.completions.create(**{**common, "temperature": 1.0, "seed": 3}).choices[0]
    assert len(valid_calls(seeded.message.tool_calls or [], names)) == 1


def test_required_with_parallel_calls_gives_calls_only(client) -> None:
    """A random model never stops calling (only tags follow), so it runs to max_tokens: every finished
    call is valid, nothing but calls is in the reply, streamed or not."""
    common = dict(model=client.models.list().data[0].id, messages=ASK, tools=[BOUNDED, CLOCK],
                  tool_choice="required", max_tokens=100, temperature=0)
    c = client.chat.completions.create(**common).choices[0]
    names = {"get_weather", "get_time"}
    calls = valid_calls(c.message.tool_calls or [], names, cut=c.finish_reason == "length")
    assert calls and c.finish_reason in ("tool_calls", "length") and not c.message.content
    final = streamed_completion(client, **common)
    assert valid_calls(final.message.tool_calls or [], names, cut=final.finish_reason == "length") == calls


def test_a_named_function_over_grpc_streams_its_call(stub) -> None:
    msgs = list(stub.Generate(gen.GenerateRequest(
        messages=[gen.ChatMessage(role="user", content=ASK[0]["content"])],
        chat=gen.ChatOptions(tools=[gen.Tool(name=t["function"]["name"],
                                             parameters_json=json.dumps(t["function"]["parameters"]))
                                    for t in (BOUNDED, CLOCK)], tool_choice_function="get_weather"),
        sampling=gen.SamplingParams(temperature=0, max_tokens=160)), timeout=60))
    deltas = [d for m in msgs for d in m.tool_calls]
    assert deltas[0].name == "get_weather" and deltas[0].id and all(d.index == 0 for d in deltas)
    jsonschema.validate(json.loads("".join(d.arguments for d in deltas)), SCHEMAS["get_weather"])
    assert not "".join(m.text for m in msgs) and msgs[-1].finish_reason == gen.FINISH_REASON_STOP
