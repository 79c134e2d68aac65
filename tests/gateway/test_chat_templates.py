"""Chat requests with tools through real-shaped chat templates (tests/chat_templates.py): what the gateway
renders equals transformers' `apply_chat_template(..., tools=...)` on the same tokenizer, token for token;
the parser and thinking are chosen from the template; and malformed tool requests are refused with a
message naming what to fix. No stack: the gateway's own rendering code (gateway.tokenization.Texts)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from engine.structured.grammar import check
from engine.structured.spec import StructuredOutput
from engine.tokenizer import Tokenizer
from gateway.chat_request import ChatFormats
from gateway.chat_schema import chat_messages, chat_options
from gateway.json_body import RequestError
from gateway.tokenization import Texts
from gateway.tool_constraint import apply_constraint, tool_constraint
from gateway.validation import PromptLimits
from server.errors import InvalidRequest
from server.protoconv import structured_from_proto
from tandem.v1 import generation_pb2 as gen
from tests.chat_templates import (
    HERMES_TEMPLATE,
    LLAMA31_TEMPLATE,
    QWEN3_TEMPLATE,
    TIME,
    WEATHER,
    with_template,
)

CALL = {"id": "call_abc", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "Paris", "unit": "c"}'}}
ROUND_TRIP = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {"hermes": with_template(tiny_model("qwen2"), root / "hermes", HERMES_TEMPLATE),
            "llama31": with_template(tiny_model("llama"), root / "llama31", LLAMA31_TEMPLATE),
            "qwen3": with_template(tiny_model("qwen3"), root / "qwen3", QWEN3_TEMPLATE)}


def texts(model: Path) -> Texts:
    tok = Tokenizer.from_dir(model)
    return Texts(tok, ["m"], PromptLimits(4096), tok.vocab_size)


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as transformers' templates take it: tool call arguments as objects (what vLLM and
    the gateway hand the template)."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def ours(model: Path, body: dict[str, Any]) -> list[int]:
    t = texts(model)
    return t.render(t.prepare(chat_messages(body["messages"]), chat_options(body)))


@pytest.mark.parametrize("family", ["hermes", "llama31", "qwen3"])
@pytest.mark.parametrize("case", ["ask", "round_trip", "no_tools"])
def test_rendering_equals_transformers_apply_chat_template(models, family: str, case: str) -> None:
    messages = ROUND_TRIP[:2] if case == "ask" else [ROUND_TRIP[1]] if case == "no_tools" else ROUND_TRIP
    tools = [] if case == "no_tools" else [WEATHER, TIME] if family != "llama31" else [WEATHER]
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    hf = AutoTokenizer.from_pretrained(models[family])
    expected = hf.apply_chat_template(hf_messages(messages), tools=tools or None, add_generation_prompt=True,
                                      tokenize=False)
    ids = ours(models[family], body)
    assert Tokenizer.from_dir(models[family]).decode(ids, skip_special_tokens=False) == expected
    assert ids == hf.encode(expected, add_special_tokens=False)
    if tools:
        assert '"name": "get_weather"' in expected  # the tools really are in the prompt


def test_chat_template_kwargs_and_reasoning_history_reach_the_template(models) -> None:
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
                {"role": "user", "content": "and 3+3?"}]
    hf = AutoTokenizer.from_pretrained(models["qwen3"])
    for kwargs in ({}, {"enable_thinking": False}):
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        body = {"messages": messages, **({"chat_template_kwargs": kwargs} if kwargs else {})}
        assert ours(models["qwen3"], body) == hf.encode(expected, add_special_tokens=False)
    t = texts(models["qwen3"])
    closed = t.prepare(chat_messages(messages), chat_options({"chat_template_kwargs": {"enable_thinking": False}}))
    t.render(closed)
    opened = t.prepare(chat_messages(messages), chat_options({}))
    t.render(opened)
    assert opened.output.reasoning and opened.output.thinking_open  # the prompt ends in <think>
    assert closed.output.reasoning and not closed.output.thinking_open


def test_formats_are_read_from_the_template_or_set_by_flag(models) -> None:
    assert ChatFormats.from_template(HERMES_TEMPLATE) == ChatFormats("hermes", False, True)
    assert ChatFormats.from_template(LLAMA31_TEMPLATE).tool_parser == "llama3_json"
    assert ChatFormats.from_template(QWEN3_TEMPLATE) == ChatFormats("hermes", True, True)
    assert ChatFormats.from_template(QWEN3_TEMPLATE, "mistral", "none") == ChatFormats("mistral", False, True)
    assert ChatFormats.from_template("{{ messages }}", "auto", "auto") == ChatFormats(None, False, False)
    with pytest.raises(ValueError):
        ChatFormats.from_template(HERMES_TEMPLATE, "pythonic")


def refused(model: Path, body: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as err:
        ours(model, body)
    return err.value


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "needs a name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "\"type\": \"object\""),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not among the tools (get_weather)"),
    ({"tool_choice": "required"}, "tool_choice", "no tools were given"),
    ({"tools": [WEATHER], "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "may not set tools"),
])
def test_malformed_tool_requests_are_refused_with_what_to_fix(models, extra, param, words) -> None:
    err = refused(models["hermes"], {"messages": [{"role": "user", "content": "hi"}], **extra})
    assert err.param == param and words in err.message, err.message


def test_shape_errors_and_tool_messages_without_ids(models) -> None:
    err = refused(models["hermes"], {"messages": [{"role": "user", "content": "x"},
                                                  {"role": "tool", "content": "{}"}]})
    assert err.param == "messages" and "tool_call_id" in err.message and "messages[1]" in err.message
    with pytest.raises(RequestError) as shape:
        chat_options({"tools": [{"type": "function", "function": {"name": "f", "parameters": "an object"}}]})
    assert shape.value.param == "tools" and "JSON Schema object" in shape.value.message
    with pytest.raises(RequestError) as choice:
        chat_options({"tool_choice": "always"})
    assert choice.value.param == "tool_choice"


def test_tools_are_refused_only_where_they_cannot_work(tiny_model) -> None:
    plain = tiny_model("llama")  # its template renders no tools and writes no tool calls
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    assert "does not render tools" in refused(plain, body).message
    assert ours(plain, {**body, "tool_choice": "none"})  # tool_choice none: accepted (the template drops them)


def test_required_and_named_choices_build_the_constraint_in_the_models_format(models) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME]}
    t = texts(models["hermes"])
    req = t.prepare(chat_messages(body["messages"]), chat_options({**body, "tool_choice": "required"}))
    assert req.constraint is not None and req.constraint.only_tags and req.constraint.triggers == ("<tool_call>",)
    assert [tag.begin for tag in req.constraint.tags] == ['<tool_call>\n{"name": "get_weather", "arguments": ',
                                                          '<tool_call>\n{"name": "get_time", "arguments": ']
    assert req.constraint.tags[0].schema == WEATHER["function"]["parameters"] and req.output.max_calls is None
    named = t.prepare(chat_messages(body["messages"]),
                      chat_options({**body, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}))
    assert named.constraint.tags == () and named.output.max_calls == 1  # exactly one call: a grammar
    assert "get_time" in named.constraint.grammar and "get_weather" not in named.constraint.grammar
    check(StructuredOutput(grammar=named.constraint.grammar))  # it compiles, as the gateway checks it
    mistral = tool_constraint("mistral", [TIME], parallel=False, specials={"[TOOL_CALLS]": 5})
    assert mistral.grammar.splitlines()[2].startswith('call_0: <[5]> "[{\\"name\\": \\"get_time\\"')
    check(StructuredOutput(grammar=mistral.grammar))
    llama = texts(models["llama31"]).prepare(chat_messages(body["messages"]),
                                             chat_options({**body, "tool_choice": "required"}))
    schema = llama.constraint.json_schema
    assert [s["properties"]["name"]["const"] for s in schema["anyOf"]] == ["get_weather", "get_time"]
    assert schema["anyOf"][1]["properties"]["parameters"] == TIME["function"]["parameters"]
    qwen3 = texts(models["qwen3"])
    thinking_model = qwen3.prepare(chat_messages(body["messages"]), chat_options({**body, "tool_choice": "required"}))
    qwen3.render(thinking_model)  # its prompt opens <think>, but a constrained reply starts with the calls
    assert thinking_model.output.reasoning and not thinking_model.output.thinking_open
    auto = t.prepare(chat_messages(body["messages"]), chat_options(body))
    none = t.prepare(chat_messages(body["messages"]), chat_options({**body, "tool_choice": "none"}))
    assert auto.constraint is None and auto.output.tool_parser == "hermes"
    assert none.constraint is None and none.output.tool_parser is None and "tools" in none.variables


@pytest.mark.parametrize("parser", ["hermes", "mistral", "llama3_json"])
@pytest.mark.parametrize("parallel", [True, False])
def test_every_constraint_shape_crosses_the_proto_and_compiles(parser: str, parallel: bool) -> None:
    """What the gateway adds to a request's sampling is a structured output the engine accepts."""
    constraint = tool_constraint(parser, [WEATHER, TIME], parallel, specials={"[TOOL_CALLS]": 5})
    sampling = apply_constraint(constraint, gen.SamplingParams(temperature=0.5))
    assert sampling.temperature == 0.5
    spec = structured_from_proto(sampling.structured)
    check(spec)
    assert spec.kind == ("json_schema" if parser == "llama3_json" else "structural_tag" if parallel else "grammar")
    with pytest.raises(InvalidRequest, match="cannot be combined"):
        apply_constraint(constraint, sampling)  # the request already has a structured output
