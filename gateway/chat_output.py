"""A chat request's output read back as it streams: each choice's text split into reasoning, content and
tool-call deltas, written into the GenerateResponse fields that carry them. Torch-free.

    worker text ──> ThinkSplitter ──reasoning──────────────────────────> reasoning_text
                        └──content──> tool parser ──content──────────────> text
                                           └──calls──────────────────────> tool_calls

Each choice (GenerateResponse.index) has its own splitter and parser; its last message (the one with a
finish_reason) also carries whatever they held back. The gateway applies this to requests sent as
`messages` (gRPC) and to /v1/chat/completions alike, so both see the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.reasoning import ThinkSplitter
from gateway.tool_calls import Parsed, ToolParser
from gateway.tool_parsers import make_tool_parser
from tandem.v1 import generation_pb2 as gen


@dataclass(frozen=True)
class OutputFormat:
    """How one chat request's output is read: `reasoning` (a `<think>` model), `thinking_open` (its
    prompt ends inside `<think>`), `tool_parser` (a format of gateway.tool_parsers, None: calls are
    not read), `max_calls` (None: any number; 1 with parallel_tool_calls false)."""

    reasoning: bool = False
    thinking_open: bool = False
    tool_parser: str | None = None
    max_calls: int | None = None

    @property
    def plain(self) -> bool:
        return not self.reasoning and self.tool_parser is None


class _Choice:
    def __init__(self, fmt: OutputFormat) -> None:
        self.splitter = ThinkSplitter(fmt.thinking_open) if fmt.reasoning else None
        self.tools: ToolParser | None = make_tool_parser(fmt.tool_parser, fmt.max_calls) if fmt.tool_parser else None
        self.called = False

    def feed(self, text: str, last: bool) -> tuple[str, Parsed]:
        reasoning, content = "", text
        if self.splitter is not None:
            reasoning, content = self.splitter.feed(text)
            if last:
                r, c = self.splitter.finish()
                reasoning, content = reasoning + r, content + c
        if self.tools is None:
            return reasoning, Parsed(content)
        parsed = self.tools.feed(content)
        if last:
            parsed.extend(self.tools.finish())
        self.called = self.called or bool(parsed.calls)
        return reasoning, parsed


class ChatOutput:
    """Rewrites one chat request's GenerateResponses in place (`read`)."""

    def __init__(self, fmt: OutputFormat) -> None:
        self.fmt = fmt
        self._choices: dict[int, _Choice] = {}

    def read(self, msg: gen.GenerateResponse) -> gen.GenerateResponse:
        if self.fmt.plain:
            return msg
        choice = self._choices.get(msg.index)
        if choice is None:
            choice = self._choices[msg.index] = _Choice(self.fmt)
        last = msg.finish_reason != gen.FINISH_REASON_UNSPECIFIED
        reasoning, parsed = choice.feed(msg.text, last)
        msg.text = parsed.content
        msg.reasoning_text = reasoning
        for d in parsed.calls:
            msg.tool_calls.add(index=d.index, id=d.id, name=d.name, arguments=d.arguments)
        return msg
