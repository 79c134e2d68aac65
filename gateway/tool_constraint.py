"""The grammar that makes a model call tools: tool_choice "required" or a named function, in the shape of
the model's own tool-call format, for the engine's constrained decoding to enforce. Torch-free.

    hermes       a structural tag per tool, only tags allowed:
                   begin  <tool_call>\\n{"name": "get_weather", "arguments":␠
                   schema the tool's parameters
                   end    }\\n</tool_call>
    mistral      the same with begin [TOOL_CALLS][{"name": "get_weather", "arguments":␠ and end }]
    llama3_json  a JSON Schema: {"name": <one of the tools' names>, "parameters": <that tool's schema>}
                 (one call: Llama 3's format has no parallel calls)

A named function is the same with that one tool; with parallel calls off (or a named function) the
reply holds exactly one call. The output is then read back by the same parser as tool_choice "auto".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest
from tandem.v1 import generation_pb2 as gen


@dataclass(frozen=True)
class TagSpec:
    begin: str
    schema: dict[str, Any]
    end: str


@dataclass(frozen=True)
class Constraint:
    """Either a JSON Schema for the whole reply, or structural tags: with `only_tags`, the reply is one
    or more tagged segments (exactly one when not `parallel`), nothing else."""

    json_schema: dict[str, Any] | None = None
    tags: tuple[TagSpec, ...] = ()
    triggers: tuple[str, ...] = ()
    only_tags: bool = False
    parallel: bool = True


_TAG_SHAPES = {
    "hermes": ('<tool_call>\n{{"name": {name}, "arguments": ', "}\n</tool_call>", "<tool_call>"),
    "mistral": ('[TOOL_CALLS][{{"name": {name}, "arguments": ', "}]", "[TOOL_CALLS]"),
}


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_constraint(parser: str, tools: list[dict[str, Any]], parallel: bool) -> Constraint:
    """The constraint for calling one of `tools` (a named choice: the list of that one tool) in `parser`'s
    format. Raises ValueError for a parser with no constraint shape."""
    if parser in _TAG_SHAPES:
        begin, end, trigger = _TAG_SHAPES[parser]
        tags = tuple(TagSpec(begin.format(name=json.dumps(t["function"]["name"])), _parameters(t), end) for t in tools)
        return Constraint(tags=tags, triggers=(trigger,), only_tags=True, parallel=parallel)
    if parser == "llama3_json":
        shapes = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                    "parameters": _parameters(t)},
                   "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        return Constraint(json_schema=shapes[0] if len(shapes) == 1 else {"anyOf": shapes}, parallel=False)
    raise ValueError(f"no tool-call constraint for the {parser!r} format")


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
    tag = structured.structural_tag
    for t in constraint.tags:
        tag.tags.add(begin=t.begin, schema_json=json.dumps(t.schema), end=t.end)
    tag.triggers.extend(constraint.triggers)
    tag.only_tags = constraint.only_tags
