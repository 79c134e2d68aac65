"""The grammar that makes a model call tools: tool_choice "required" or a named function, in the shape of
the model's own tool-call format, for the engine's constrained decoding to enforce. Torch-free.

    hermes       a structural tag per tool, only tags allowed:
                   begin  <tool_call>\\n{"name": "get_weather", "arguments":␠
                   schema the tool's parameters
                   end    }\\n</tool_call>
    mistral      the same with begin [TOOL_CALLS][{"name": "get_weather", "arguments":␠ and end }]
    llama3_json  a JSON Schema: {"name": <one of the tools' names>, "parameters": <that tool's schema>}
                 (one call: Llama 3's format has no parallel calls)

A named function is the same with that one tool. With parallel calls off (or a named function) the
reply holds exactly one call and ends with it: for hermes and mistral that is a Lark grammar (the
structural tag's "only tags" allows any number of them),

    start: call_0 | call_1 | ...
    call_i: "<begin>" %json{<schema>} "<end>"      (a special token, e.g. [TOOL_CALLS], as <[its id]>)

with the engine's bounded JSON whitespace. The output is then read back by the same parser as
tool_choice "auto".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.structured.grammar import JSON_OPTIONS
from server.errors import InvalidRequest
from tandem.v1 import generation_pb2 as gen


@dataclass(frozen=True)
class TagSpec:
    begin: str
    schema: dict[str, Any]
    end: str


@dataclass(frozen=True)
class Constraint:
    """One of: a JSON Schema for the whole reply, a Lark grammar, or structural tags (with `only_tags`,
    the reply is one or more tagged segments and nothing else)."""

    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    tags: tuple[TagSpec, ...] = ()
    triggers: tuple[str, ...] = ()
    only_tags: bool = False


_TAG_SHAPES = {
    "hermes": ('<tool_call>\n{{"name": {name}, "arguments": ', "}\n</tool_call>", "<tool_call>"),
    "mistral": ('[TOOL_CALLS][{{"name": {name}, "arguments": ', "}]", "[TOOL_CALLS]"),
}


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_constraint(parser: str, tools: list[dict[str, Any]], parallel: bool,
                    specials: Mapping[str, int] | None = None) -> Constraint:
    """The constraint for calling one of `tools` (a named choice: the list of that one tool) in `parser`'s
    format; one call only unless `parallel`. `specials`: the tokenizer's special tokens (text -> id),
    matched as tokens in a grammar. Raises ValueError for a parser with no constraint shape."""
    if parser in _TAG_SHAPES:
        begin, end, trigger = _TAG_SHAPES[parser]
        tags = tuple(TagSpec(begin.format(name=json.dumps(t["function"]["name"])), _parameters(t), end) for t in tools)
        if not parallel:
            return Constraint(grammar=_one_call_lark(tags, specials or {}))
        return Constraint(tags=tags, triggers=(trigger,), only_tags=True)
    if parser == "llama3_json":
        shapes = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                    "parameters": _parameters(t)},
                   "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        return Constraint(json_schema=shapes[0] if len(shapes) == 1 else {"anyOf": shapes})
    raise ValueError(f"no tool-call constraint for the {parser!r} format")


def _literal(text: str, specials: Mapping[str, int]) -> str:
    """`text` as a Lark sequence: its special tokens as `<[id]>`, the rest as quoted strings."""
    names = sorted((t for t in specials if t and t in text), key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, names)) + ")", text) if names else [text]
    return " ".join(f"<[{specials[p]}]>" if p in specials else json.dumps(p, ensure_ascii=False) for p in parts if p)


def _one_call_lark(tags: tuple[TagSpec, ...], specials: Mapping[str, int]) -> str:
    lines = ["%llguidance {}", "start: " + " | ".join(f"call_{i}" for i in range(len(tags)))]
    for i, t in enumerate(tags):
        schema = {**t.schema, "x-guidance": {**JSON_OPTIONS, **(t.schema.get("x-guidance") or {})}}
        lines.append(f"call_{i}: {_literal(t.begin, specials)} %json {json.dumps(schema, ensure_ascii=False)} "
                     f"{_literal(t.end, specials)}")
    return "\n".join(lines)


def apply_constraint(constraint: Constraint, sampling: gen.SamplingParams) -> gen.SamplingParams:
    """A copy of `sampling` with the constraint as its structured output. Raises InvalidRequest when the
    request already asks for a structured output, or this build has no constrained decoding."""
    fields = gen.SamplingParams.DESCRIPTOR.fields_by_name
    if "structured" not in fields:
        raise InvalidRequest("tool_choice \"required\" and a named tool_choice need constrained decoding, which this "
                             "build of Tandem lacks: use tool_choice \"auto\"")
    out = gen.SamplingParams()
    out.CopyFrom(sampling)
    if out.HasField("structured"):
        raise InvalidRequest("tool_choice \"required\" or a named function cannot be combined with a structured "
                             "output (response_format): the tool calls are the structured output")
    _fill(constraint, out.structured)
    return out


def _fill(constraint: Constraint, structured: Any) -> None:
    """Write the constraint into a StructuredOutput message (the engine's constrained decoding)."""
    if constraint.json_schema is not None:
        structured.json_schema = json.dumps(constraint.json_schema)
        return
    if constraint.grammar is not None:
        structured.grammar = constraint.grammar
        return
    tag = structured.structural_tag
    for t in constraint.tags:
        tag.tags.add(begin=t.begin, schema_json=json.dumps(t.schema), end=t.end)
    tag.triggers.extend(constraint.triggers)
    tag.only_tags = constraint.only_tags
