"""Tool-call and reasoning parsers on real-format strings of each family, whole and in random chunk splits:
the same calls and content whatever the split, and no markup in the content. Pure, no stack."""

from __future__ import annotations

import json
import random

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.chat_output import ChatOutput, OutputFormat
from gateway.json_scan import scan_call
from gateway.openai_response import ResponseBuilder
from gateway.reasoning import ThinkSplitter, prompt_opens_thinking, template_thinks
from gateway.tool_calls import Parsed
from gateway.tool_parsers import make_tool_parser, parser_for_template
from tandem.v1 import generation_pb2 as gen

MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<think>", "</think>")


def run(parser_name: str, text: str, splits: list[int] | None = None, max_calls: int | None = None
        ) -> tuple[str, list[dict[str, str]], list[Parsed]]:
    """(content, calls as {id, name, arguments}, every piece) of `text` fed in the given chunks."""
    parser = make_tool_parser(parser_name, max_calls)
    cuts = [0, *sorted(splits or []), len(text)]
    pieces = [parser.feed(text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    pieces.append(parser.finish())
    content = "".join(p.content for p in pieces)
    calls: list[dict[str, str]] = []
    for p in pieces:
        for d in p.calls:
            if d.id:  # a call's first delta: OpenAI's SDK starts a call here
                assert d.index == len(calls) and d.name
                calls.append({"id": d.id, "name": d.name, "arguments": d.arguments})
            else:
                assert d.index == len(calls) - 1 and not d.name
                calls[d.index]["arguments"] += d.arguments
    return content, calls, pieces


def random_splits(text: str, rng: random.Random) -> list[int]:
    return rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))) if len(text) > 1 else []


def every_split_agrees(parser_name: str, text: str, **kw) -> tuple[str, list[dict[str, str]]]:
    content, calls, _ = run(parser_name, text, **kw)
    rng = random.Random(hash(text) & 0xFFFF)
    for trial in range(60):
        splits = list(range(1, len(text))) if trial == 0 else random_splits(text, rng)  # one char at a time first
        c, k, _ = run(parser_name, text, splits, **kw)
        assert c == content, splits
        assert [(x["name"], x["arguments"]) for x in k] == [(x["name"], x["arguments"]) for x in calls], splits
    return content, calls


HERMES_TWO = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>')


def test_hermes_parallel_calls_with_content_before() -> None:
    content, calls = every_split_agrees("hermes", HERMES_TWO)
    assert content == "Let me check both.\n\n"
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert json.loads(calls[1]["arguments"]) == {"tz": "Europe/Paris"}
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_hermes_streams_arguments_before_the_block_closes() -> None:
    _, calls, pieces = run("hermes", '<tool_call>\n{"name": "f", "arguments": {"q": "a long query"}}\n</tool_call>',
                           splits=[25, 35, 45, 55])
    deltas = [d for p in pieces for d in p.calls]
    assert len(deltas) >= 3 and deltas[0].name == "f" and deltas[0].id
    assert json.loads(calls[0]["arguments"]) == {"q": "a long query"}


def test_hermes_tricky_strings_and_no_arguments() -> None:
    text = ('<tool_call>{"arguments": {"s": "}</tool_call>{\\"x\\"", "n": [1, {"a": null}]}, "name": "odd"}</tool_call>'
            '<tool_call>{"name": "noargs"}</tool_call>after')
    content, calls = every_split_agrees("hermes", text)
    assert content == "after"
    assert calls[0]["name"] == "odd" and json.loads(calls[0]["arguments"]) == {"s": '}</tool_call>{"x"',
                                                                               "n": [1, {"a": None}]}
    assert calls[1] == {**calls[1], "name": "noargs", "arguments": "{}"}


def test_hermes_malformed_block_is_content_and_partial_markers_are_content_at_the_end() -> None:
    content, calls = every_split_agrees("hermes", "a <tool_call>not json</tool_call> b <tool_")
    assert calls == [] and content == "a <tool_call>not json</tool_call> b <tool_"


def test_hermes_call_cut_by_max_tokens_keeps_what_arrived() -> None:
    content, calls = every_split_agrees("hermes", '<tool_call>\n{"name": "f", "arguments": {"city": "Par')
    assert content == "" and calls[0]["name"] == "f" and calls[0]["arguments"] == '{"city": "Par'
    content, calls = every_split_agrees("hermes", 'Hi <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
                                                  '<tool_call>\n{"na')
    assert content == "Hi " and [c["name"] for c in calls] == ["f"]  # cut before its name: dropped, no markup
    content, calls = every_split_agrees("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"nam')
    assert content == "" and [c["name"] for c in calls] == ["f"]
    content, calls = every_split_agrees("llama3_json", '<|python_tag|>{"na')
    assert content == "" and calls == []
    content, calls = every_split_agrees("llama3_json", '{"na')  # no marker: it may be plain JSON text
    assert content == '{"na' and calls == []


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    content, calls = every_split_agrees("hermes", HERMES_TWO, max_calls=1)
    assert [c["name"] for c in calls] == ["get_weather"] and content == "Let me check both.\n\n"


@pytest.mark.parametrize("text", [
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '  {"name": "get_weather", "parameters": {"city": "Paris"}}  ',
])
def test_llama3_json_with_and_without_python_tag(text: str) -> None:
    content, calls = every_split_agrees("llama3_json", text)
    assert content.strip() == "" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_llama3_json_several_calls_and_plain_text() -> None:
    _, calls = every_split_agrees("llama3_json", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("a", {}), ("b", {"x": 1})]
    content, calls = every_split_agrees("llama3_json", "The weather in Paris is {unknown}.")
    assert calls == [] and content == "The weather in Paris is {unknown}."
    content, calls = every_split_agrees("llama3_json", "{not a call} at all")
    assert calls == [] and content == "{not a call} at all"
    content, calls = every_split_agrees("llama3_json", '{"x": 1}')
    assert calls == [] and content == '{"x": 1}'


@pytest.mark.parametrize("marker", ["[TOOL_CALLS]", ""])
def test_mistral_array_of_calls(marker: str) -> None:
    text = marker + '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    content, calls = every_split_agrees("mistral", text)
    assert content == "" and [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"} and calls[1]["arguments"] == "{}"
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)  # Mistral's templates require it


def test_mistral_content_then_calls_and_consecutive_arrays() -> None:
    text = 'Sure.[TOOL_CALLS][{"name": "a", "arguments": {"k": "v"}}][TOOL_CALLS][{"name": "b", "arguments": {}}]'
    content, calls = every_split_agrees("mistral", text)
    assert content == "Sure." and [c["name"] for c in calls] == ["a", "b"]
    content, calls = every_split_agrees("mistral", "[1, 2, 3] are numbers")
    assert calls == [] and content == "[1, 2, 3] are numbers"


def test_json_scanner_reads_names_and_raw_arguments() -> None:
    s = scan_call('{"name": "f\\u00e9", "parameters": {"a": [1, "]"]}, "extra": true} tail')
    assert s.done and s.name == "fé" and s.arguments_text() == '{"a": [1, "]"]}' and s.rest == " tail"
    assert scan_call("[1]").error and not scan_call('{"name": 3}').name


def test_parser_is_chosen_from_the_template() -> None:
    assert parser_for_template("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert parser_for_template("[AVAILABLE_TOOLS] {{ tools }} [TOOL_CALLS]") == "mistral"
    assert parser_for_template("<|start_header_id|>ipython<|end_header_id|><|python_tag|>") == "llama3_json"
    assert parser_for_template("{{ messages }}") is None and parser_for_template(None) is None


# ------------------------------------------------------------------ reasoning
def split_all(text: str, thinking: bool, splits: list[int]) -> tuple[str, str]:
    s = ThinkSplitter(thinking)
    cuts = [0, *sorted(splits), len(text)]
    parts = [s.feed(text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)] + [s.finish()]
    return "".join(p.reasoning for p in parts), "".join(p.content for p in parts)


@pytest.mark.parametrize(("text", "thinking", "reasoning", "content"), [
    ("<think>\nLet me add.\n</think>\n\nIt is 4.", False, "\nLet me add.\n", "It is 4."),
    ("Let me add.\n</think>\n\nIt is 4.", True, "Let me add.\n", "It is 4."),  # the prompt opened <think>
    ("It is 4.", False, "", "It is 4."),
    ("<think>\n\n</think>\n\nIt is 4.", False, "\n\n", "It is 4."),
    ("<think>\nstill thinking when max_tokens", False, "\nstill thinking when max_tokens", ""),  # cut: reasoning
    ("a < b", False, "", "a < b"),
    ("<thin", False, "", "<thin"),
])
def test_think_split_in_every_chunking(text: str, thinking: bool, reasoning: str, content: str) -> None:
    rng = random.Random(7)
    for trial in range(40):
        splits = list(range(1, len(text))) if trial == 0 else random_splits(text, rng)
        assert split_all(text, thinking, splits) == (reasoning, content), splits


def test_thinking_is_detected_from_template_and_prompt() -> None:
    assert template_thinks("{{ '<think>' }}...{{ '</think>' }}") and not template_thinks("{{ messages }}")
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n") and not prompt_opens_thinking("x<think></think>")


def test_chat_output_splits_reasoning_then_tool_calls_per_choice() -> None:
    out = ChatOutput(OutputFormat(reasoning=True, tool_parser="hermes"))
    text = '<think>I should call f.</think>\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    msgs = [gen.GenerateResponse(text=text[i:i + 7], index=0) for i in range(0, len(text), 7)]
    msgs[-1].finish_reason = gen.FINISH_REASON_STOP
    read = [out.read(m) for m in msgs]
    assert "".join(m.reasoning_text for m in read) == "I should call f."
    assert "".join(m.text for m in read) == ""
    deltas = [d for m in read for d in m.tool_calls]
    assert deltas[0].name == "f" and json.loads("".join(d.arguments for d in deltas)) == {"a": 1}
    for m in read:
        assert not any(mark in m.text or mark in m.reasoning_text for mark in MARKUP)


# ------------------------------------------------------------------ what the OpenAI SDK makes of it
def worker_stream(text: str, step: int) -> list[gen.GenerateResponse]:
    msgs = [gen.GenerateResponse(text=text[i:i + step], token_ids=[1]) for i in range(0, len(text), step)]
    msgs[-1].finish_reason = gen.FINISH_REASON_STOP
    return msgs


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_the_openai_sdk_accumulates_the_streamed_deltas_into_the_whole_response(step: int) -> None:
    fmt = OutputFormat(reasoning=True, tool_parser="hermes")
    text = "<think>Two cities.</think>\n\n" + HERMES_TWO
    stream_builder = ResponseBuilder("chat", "r1", "m", str, None)
    state = ChatCompletionStreamState()
    reader = ChatOutput(fmt)
    for chunk in stream_builder.role_chunks():
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    for msg in worker_stream(text, step):
        chunk = stream_builder.chunk(reader.read(msg), include_usage=False)
        if chunk is not None:
            assert not any(mark in json.dumps(chunk) for mark in ("<tool_call>", "<think>", "</think>"))
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion().choices[0]
    whole_builder = ResponseBuilder("chat", "r1", "m", str, None)
    reader = ChatOutput(fmt)
    for msg in worker_stream(text, len(text)):
        whole_builder.add(reader.read(msg))
    whole = ChatCompletion.model_validate(whole_builder.response()).choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert final.message.content == whole.message.content == "Let me check both.\n\n"
    for a, b in zip(final.message.tool_calls, whole.message.tool_calls, strict=True):
        assert (a.function.name, json.loads(a.function.arguments)) == (b.function.name, json.loads(b.function.arguments))
        assert a.id.startswith("call_") and a.type == "function"
    assert [c.function.name for c in whole.message.tool_calls] == ["get_weather", "get_time"]
    assert whole_builder.response()["choices"][0]["message"]["reasoning_content"] == "Two cities."
