"""A chat request (`messages` and `ChatOptions`, from gRPC or /v1/chat/completions) checked and turned into
what the chat template and the output reader need. Torch-free; no I/O.

    prepare_chat(messages, options, formats, limits) -> PreparedChat
        .messages   dicts as transformers' apply_chat_template takes them (tool call arguments as objects)
        .variables  tools=[{"type": "function", "function": {...}}] and chat_template_kwargs
        .output     how the reply is read back (reasoning split, tool-call format, max calls)
        .constraint the grammar that enforces tool_choice required / a named function (tool_constraint)

Refused with RequestError (HTTP 400 / gRPC INVALID_ARGUMENT), each naming what to fix: a tool without a
name or with parameters that are not an object schema, two tools of one name, a tool_choice naming no
given tool, tool_choice required without tools, a tool message without tool_call_id, chat_template_kwargs
that are not a JSON object, tools for a model whose template shows no tool-call format Tandem reads.
`tool_choice` none renders the tools as the template does (vLLM's default) and reads no calls back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.chat_output import OutputFormat
from gateway.json_body import RequestError
from gateway.reasoning import template_thinks
from gateway.tool_constraint import Constraint, tool_constraint
from gateway.tool_parsers import TOOL_PARSERS, parser_for_template
from gateway.validation import PromptLimits
from tandem.v1 import generation_pb2 as gen

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Template variables the request sets through their own fields.
_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "continue_final_message"})


@dataclass(frozen=True)
class ChatFormats:
    """What the served model's chat template writes: its tool-call format (None: none known) and whether
    it thinks in `<think>`. `from_template` reads them from the template, or takes the gateway's flags
    (--tool-call-parser, --reasoning-parser: "auto" reads the template, "none" turns it off)."""

    tool_parser: str | None = None
    reasoning: bool = False
    template_has_tools: bool = False

    @classmethod
    def from_template(cls, template: str | None, tool_flag: str = "auto", reasoning_flag: str = "auto"
                      ) -> ChatFormats:
        tool = parser_for_template(template) if tool_flag == "auto" else None if tool_flag == "none" else tool_flag
        if tool is not None and tool not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {tool!r}; known: {', '.join(TOOL_PARSERS)}")
        reasoning = template_thinks(template) if reasoning_flag == "auto" else reasoning_flag != "none"
        return cls(tool, reasoning, bool(template) and "tools" in template)  # type: ignore[operator]


@dataclass
class PreparedChat:
    messages: list[dict[str, Any]]
    variables: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    output: OutputFormat = field(default_factory=OutputFormat)
    constraint: Constraint | None = None

    @property
    def num_chars(self) -> int:
        """The characters the template gets besides its own: contents, calls and tool definitions."""
        return _message_chars(self.messages) + len(json.dumps(self.variables.get("tools") or []))


def _message_chars(messages: Sequence[Any]) -> int:
    return sum(len(str(m.get("content") or "")) + len(json.dumps(m.get("tool_calls") or [])) for m in messages)


def _object(text: str, what: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise RequestError(f"{what} is not valid JSON: {exc}", param) from None
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__}", param)
    return value


def _tools(options: gen.ChatOptions) -> list[dict[str, Any]]:
    """The tools as the template takes them; their names and schemas checked."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, t in enumerate(options.tools):
        if not _NAME.fullmatch(t.name):
            got = f", got {t.name[:80]!r}" if t.name else ""
            raise RequestError(f"tools[{i}]: a function needs a name of 1 to 64 letters, digits, _ or -{got}", "tools")
        if t.name in seen:
            raise RequestError(f"tools[{i}]: two tools are named {t.name!r}; each name must be unique", "tools")
        seen.add(t.name)
        function: dict[str, Any] = {"name": t.name}
        if t.description:
            function["description"] = t.description
        if t.parameters_json:
            schema = _object(t.parameters_json, f"tools[{i}] ({t.name}): parameters", "tools")
            kind = schema.get("type", "object")
            if kind != "object":
                raise RequestError(f"tools[{i}] ({t.name}): parameters must be a JSON Schema of an object "
                                   f"(\"type\": \"object\", with \"properties\"), got \"type\": {json.dumps(kind)}",
                                   "tools")
            function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _messages(messages: Sequence[gen.ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not m.role:
            raise RequestError(f"messages[{i}] needs a role", "messages")
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        if m.role == "tool":
            if not m.tool_call_id:
                raise RequestError(f"messages[{i}]: a tool message needs tool_call_id, the id of the assistant's "
                                   f"tool call it answers", "messages")
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if m.role != "assistant":
                raise RequestError(f"messages[{i}]: only assistant messages carry tool_calls, not {m.role!r}",
                                   "messages")
            calls = []
            for j, c in enumerate(m.tool_calls):
                if not c.name:
                    raise RequestError(f"messages[{i}].tool_calls[{j}] needs the function's name", "messages")
                try:  # as vLLM: templates expect the arguments as an object (a string is kept as it is)
                    args: Any = json.loads(c.arguments_json) if c.arguments_json else {}
                except ValueError:
                    args = c.arguments_json
                calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
            d["tool_calls"] = calls
            if not m.content:
                d["content"] = None
        if m.HasField("reasoning_content"):
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


def prepare_chat(messages: Sequence[gen.ChatMessage], options: gen.ChatOptions, formats: ChatFormats,
                 limits: PromptLimits, specials: Mapping[str, int] | None = None) -> PreparedChat:
    """Check a chat request and build what rendering it and reading its output need. Sizes first: the
    characters of messages and tools are counted before any JSON in them is parsed. `specials`: the
    tokenizer's special tokens (text -> id), for the tool-call constraint."""
    raw = sum(len(m.content) + sum(len(c.arguments_json) + len(c.name) for c in m.tool_calls) for m in messages)
    raw += sum(len(t.parameters_json) + len(t.description) for t in options.tools)
    limits.check_chars("messages", raw)
    if not messages:
        raise RequestError("messages is empty: send at least one message", "messages")
    prepared = PreparedChat(_messages(messages))
    tools = _tools(options)
    if options.chat_template_kwargs_json:
        kwargs = _object(options.chat_template_kwargs_json, "chat_template_kwargs", "chat_template_kwargs")
        clash = sorted(set(kwargs) & _RESERVED)
        if clash:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(clash)}: use the request's own field",
                               "chat_template_kwargs")
        prepared.variables.update(kwargs)
    if tools:
        prepared.variables["tools"] = tools
    prepared.continue_final_message = options.continue_final_message
    prepared.add_generation_prompt = options.add_generation_prompt if options.HasField("add_generation_prompt") \
        else not options.continue_final_message

    which = options.WhichOneof("tool_choice")
    mode = options.tool_choice_mode if which == "tool_choice_mode" else gen.TOOL_CHOICE_MODE_UNSPECIFIED
    named = options.tool_choice_function if which == "tool_choice_function" else None
    if mode == gen.TOOL_CHOICE_MODE_UNSPECIFIED and named is None:
        mode = gen.TOOL_CHOICE_MODE_AUTO if tools else gen.TOOL_CHOICE_MODE_NONE
    names = [t["function"]["name"] for t in tools]
    if named is not None and named not in names:
        offered = ", ".join(names) if names else "no tools were given"
        raise RequestError(f"tool_choice names the function {named[:80]!r}, which is not among the tools ({offered})",
                           "tool_choice")
    if mode == gen.TOOL_CHOICE_MODE_REQUIRED and not tools:
        raise RequestError("tool_choice is \"required\" but no tools were given: add tools or use \"auto\"",
                           "tool_choice")
    calls_read = bool(tools) and mode != gen.TOOL_CHOICE_MODE_NONE
    if calls_read and not formats.template_has_tools:
        raise RequestError("this model's chat template does not render tools, so the model would never see them: "
                           "serve a model whose template takes tools, or send tool_choice \"none\"", "tools")
    if calls_read and formats.tool_parser is None:
        raise RequestError("this model's chat template writes no tool-call format Tandem reads (hermes, llama3_json, "
                           "mistral): start the gateway with --tool-call-parser, or send tool_choice \"none\"", "tools")
    single = options.HasField("parallel_tool_calls") and not options.parallel_tool_calls
    prepared.output = OutputFormat(reasoning=formats.reasoning,
                                   tool_parser=formats.tool_parser if calls_read else None,
                                   max_calls=1 if single or named is not None else None)
    if calls_read and (mode == gen.TOOL_CHOICE_MODE_REQUIRED or named is not None):
        assert formats.tool_parser is not None
        chosen = [t for t in tools if t["function"]["name"] == named] if named is not None else tools
        prepared.constraint = tool_constraint(formats.tool_parser, chosen, parallel=not single and named is None,
                                              specials=specials)
    return prepared
