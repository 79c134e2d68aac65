"""OpenAI's Responses API (`POST /v1/responses`) for plain text in and out: body -> a chat request,
`tandem.v1.GenerateResponse` messages -> a Response object or its stream of events.

    {"model", "input": str | [{"role", "content": str | [{"type": "input_text" | "output_text", "text"}]}],
     "instructions", "max_output_tokens", "temperature", "top_p", "stream", ...}
    -> {"id": "resp_<rid>", "object": "response", "status": "completed" | "incomplete",
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text"}]}],
        "usage": {"input_tokens", "output_tokens", "total_tokens", ...}, ...}

The input is rendered with the model's chat template (instructions as a system message first) and
runs the same path as a chat completion. Streams are server-sent events named by their type:
response.created, response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta (one per message with text), response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or
response.incomplete when max_output_tokens ended it). `text.format` asks for structured output
(json_object, json_schema: gateway/openai_structured.py). Tools, reasoning, stored conversations
(previous_response_id) and non-text input are refused with 400 naming the field; nothing is stored.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.openai_response import finish_reason
from gateway.openai_schema import ParsedRequest, RequestError, common_request
from gateway.openai_structured import StructuredRequestError, response_format
from tandem.v1 import generation_pb2 as gen

RESPONSES_FIELDS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
                              "stream", "text", "tools", "tool_choice", "truncation", "reasoning",
                              "previous_response_id", "include", "top_logprobs", "seed", "priority"})
_TEXT_PARTS = ("input_text", "output_text", "text")


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content: only text parts (input_text, output_text) are supported", "input")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", "input")


def parse_responses(body: Any) -> tuple[ParsedRequest, dict[str, Any]]:
    """The request (its `messages` still to be rendered) and the fields the Response echoes back.
    Raises RequestError naming the field."""
    parsed = common_request(body, RESPONSES_FIELDS, "max_output_tokens")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("instructions must be a string", "instructions")
    if instructions:
        parsed.messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("input is required: a string or a non-empty list of messages", "input")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type", "message") != "message" or not isinstance(item.get("role"), str):
            raise RequestError(f"input[{i}] must be a message with a role (only text messages are supported)", "input")
        parsed.messages.append({"role": item["role"], "content": _content(item.get("content"), f"input[{i}]")})
    for name, off in (("tools", ([], None)), ("tool_choice", ("none", "auto", None)), ("reasoning", (None,)),
                      ("previous_response_id", (None,)), ("include", ([], None)), ("top_logprobs", (0, None)),
                      ("truncation", ("disabled", None))):
        if body.get(name) not in off:
            raise RequestError(f"{name} is not supported", name)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise RequestError("text must be an object {\"format\": {...}}", "text")
    fmt = (text or {}).get("format")
    if fmt is not None:  # text, json_object, json_schema (flat: name, schema, strict), structural_tag
        try:
            spec = response_format(fmt, "text", flat=True)
        except StructuredRequestError as exc:
            raise RequestError(exc.message, exc.param) from None
        if spec is not None:
            parsed.request.sampling.structured.CopyFrom(spec)
    echoed = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
              "temperature": body.get("temperature"), "top_p": body.get("top_p")}
    return parsed, echoed


class ResponsesBuilder:
    """One Response (and its stream's events) from the messages of one generation."""

    def __init__(self, request_id: str, model: str, echoed: dict[str, Any]) -> None:
        self.id = f"resp_{request_id}"
        self.item_id = f"msg_{request_id}"
        self.model = model
        self.echoed = echoed
        self.created = int(time.time())
        self.text: list[str] = []
        self.finish: str | None = None
        self.usage = gen.Usage()
        self.sequence = 0

    def add(self, msg: gen.GenerateResponse) -> str:
        """Keep `msg`'s text and state; returns the text."""
        reason = finish_reason(msg)
        if reason is not None:
            self.finish = reason
        if msg.HasField("usage"):
            self.usage = msg.usage
        self.text.append(msg.text)
        return msg.text

    def _part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self.text), "annotations": [], "logprobs": []}

    def _item(self, done: bool) -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "role": "assistant",
                "status": "completed" if done else "in_progress", "content": [self._part()] if done else []}

    def response(self, done: bool = True) -> dict[str, Any]:
        u = self.usage
        status = ("incomplete" if self.finish == "length" else "completed") if done else "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": [self._item(True)] if done else [], "parallel_tool_calls": False, "tool_choice": "none",
            "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
            **self.echoed,
            "usage": {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                      "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": u.prompt_tokens + u.completion_tokens} if done else None,
        }

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One stream event of `kind` (response.<...>), numbered in order."""
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def opening(self) -> list[dict[str, Any]]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [self.event("response.created", response=self.response(False)),
                self.event("response.in_progress", response=self.response(False)),
                self.event("response.output_item.added", output_index=0, item=self._item(False)),
                self.event("response.content_part.added", **where,
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, text: str) -> dict[str, Any]:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def closing(self) -> list[dict[str, Any]]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        final = self.response(True)
        return [self.event("response.output_text.done", **where, text="".join(self.text), logprobs=[]),
                self.event("response.content_part.done", **where, part=self._part()),
                self.event("response.output_item.done", output_index=0, item=self._item(True)),
                self.event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                           response=final)]
