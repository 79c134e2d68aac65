"""The chat fields of OpenAI request bodies -> `tandem.v1` ChatMessage / ChatOptions; shape and type only
(what they mean is checked once, for gRPC and HTTP alike, in gateway/chat_request.py). No I/O.

    messages              [{"role", "content": str | [{"type": "text", "text"}] | null, "name",
                            "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}],
                            "tool_call_id", "reasoning_content"}]
    tools                 [{"type": "function", "function": {"name", "description", "parameters", "strict"}}]
    tool_choice           "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls   bool
    chat_template_kwargs  {...}: extra variables for the chat template, e.g. {"enable_thinking": false}
"""

from __future__ import annotations

import json
from typing import Any

from gateway.json_body import RequestError, shown
from tandem.v1 import generation_pb2 as gen

CHAT_OPTION_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"})
_MODES = {"none": gen.TOOL_CHOICE_MODE_NONE, "auto": gen.TOOL_CHOICE_MODE_AUTO,
          "required": gen.TOOL_CHOICE_MODE_REQUIRED}
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content",
                           "reasoning", "refusal", "function_call", "audio", "annotations"})


def text_content(content: Any, where: str) -> str:
    """A message's content: a string, null, or a list of text parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", "messages")


def _string(value: Any, where: str, param: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {shown(value)}", param)
    return value


def _tool_call(value: Any, where: str) -> gen.ToolCall:
    if not isinstance(value, dict) or not isinstance(value.get("function"), dict):
        raise RequestError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                           f"\"arguments\"}}}}", "messages")
    function = value["function"]
    args = function.get("arguments")
    if isinstance(args, dict):  # some clients send the object itself
        args = json.dumps(args, ensure_ascii=False)
    return gen.ToolCall(id=_string(value.get("id"), f"{where}.id", "messages"),
                        name=_string(function.get("name"), f"{where}.function.name", "messages"),
                        arguments_json=_string(args, f"{where}.function.arguments", "messages"))


def chat_messages(value: Any) -> list[gen.ChatMessage]:
    """`messages` as ChatMessages. Raises RequestError naming the message and its field."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages is required: a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where} must be an object with a string role", "messages")
        unknown = sorted(set(m) - _MESSAGE_KEYS)
        if unknown:
            raise RequestError(f"{where} has unrecognized field(s): {', '.join(k[:64] for k in unknown[:8])}",
                               "messages")
        msg = gen.ChatMessage(role=m["role"], content=text_content(m.get("content"), where),
                              name=_string(m.get("name"), f"{where}.name", "messages"),
                              tool_call_id=_string(m.get("tool_call_id"), f"{where}.tool_call_id", "messages"))
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", "messages")
            msg.tool_calls.extend(_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        if reasoning is not None:
            msg.reasoning_content = _string(reasoning, f"{where}.reasoning_content", "messages")
        out.append(msg)
    return out


def _tool(value: Any, i: int) -> gen.Tool:
    shape = "{\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}"
    if not isinstance(value, dict) or value.get("type", "function") != "function" \
            or not isinstance(value.get("function"), dict):
        raise RequestError(f"tools[{i}] must be {shape} (only function tools are supported)", "tools")
    f = value["function"]
    params = f.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise RequestError(f"tools[{i}].function.parameters must be a JSON Schema object, got {shown(params)}", "tools")
    strict = f.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError(f"tools[{i}].function.strict must be true or false", "tools")
    return gen.Tool(name=_string(f.get("name"), f"tools[{i}].function.name", "tools"),
                    description=_string(f.get("description"), f"tools[{i}].function.description", "tools"),
                    parameters_json=json.dumps(params, ensure_ascii=False) if params is not None else "",
                    strict=bool(strict))


def chat_options(body: dict[str, Any]) -> gen.ChatOptions:
    """tools, tool_choice, parallel_tool_calls and chat_template_kwargs of a body, as ChatOptions."""
    options = gen.ChatOptions()
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise RequestError("tools must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
        options.tools.extend(_tool(t, i) for i, t in enumerate(tools))
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice in _MODES:
        options.tool_choice_mode = _MODES[choice]
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        options.tool_choice_function = choice["function"]["name"]
    elif choice is not None:
        raise RequestError("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                           f"\"function\": {{\"name\": ...}}}}, got {shown(choice)}", "tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise RequestError(f"parallel_tool_calls must be true or false, got {shown(parallel)}",
                               "parallel_tool_calls")
        options.parallel_tool_calls = parallel
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise RequestError(f"chat_template_kwargs must be a JSON object, got {shown(kwargs)}",
                               "chat_template_kwargs")
        options.chat_template_kwargs_json = json.dumps(kwargs, ensure_ascii=False)
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise RequestError(f"{name} (deprecated by OpenAI) is not supported: send tools and tool_choice", name)
    return options
