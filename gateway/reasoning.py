"""A thinking model's reasoning split from its reply: `<think>...</think>` (Qwen3, DeepSeek-R1 distills,
QwQ). Pure, torch-free.

    <think>\\nLet me see...\\n</think>\\n\\nThe answer is 4.
            ^^^^^^^^^^^^^^^^ reasoning            ^^^^^^^^^^^^^^^^ content (leading whitespace dropped)

A reply starts inside the thinking when the prompt left a `<think>` open (DeepSeek-R1's and the
Qwen3 thinking-2507 templates end the generation prompt with it), or when the reply itself opens with
`<think>`; any other start means no thinking. Thinking that never closes (cut by max_tokens) is all
reasoning. Markup never reaches either part: a tail that may still grow into `</think>` is held back.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.tool_calls import held_back

START, END = "<think>", "</think>"
REASONING_PARSERS = ("think",)


class Split(NamedTuple):
    reasoning: str
    content: str


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>`: its reply begins with reasoning."""
    return prompt.rstrip().endswith(START)


def template_thinks(template: str | None) -> bool:
    """Whether a chat template is a thinking model's (it writes or strips `<think>` blocks)."""
    return bool(template) and START in template and END in template  # type: ignore[operator]


class ThinkSplitter:
    """One choice's text, fed as it streams, split into reasoning and content."""

    def __init__(self, thinking: bool = False) -> None:
        self.state = "thinking" if thinking else "start"  # start | thinking | after | content
        self.buf = ""

    def feed(self, text: str) -> Split:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if not head or START.startswith(head):
                return Split("", "")
            if head.startswith(START):
                self.buf, self.state = head[len(START):], "thinking"
            else:
                self.state = "content"
        if self.state == "thinking":
            i = self.buf.find(END)
            if i < 0:
                keep = held_back(self.buf, END)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return Split(reasoning, "")
            reasoning, self.buf, self.state = self.buf[:i], self.buf[i + len(END):], "after"
        if self.state == "after":
            self.buf = self.buf.lstrip()
            if not self.buf:
                return Split(reasoning, "")
            self.state = "content"
        content, self.buf = self.buf, ""
        return Split(reasoning, content)

    def finish(self) -> Split:
        """What was held back: reasoning if the thinking never closed, else content."""
        rest, self.buf = self.buf, ""
        if self.state == "thinking":
            return Split(rest, "")
        return Split("", "" if self.state == "after" else rest)
