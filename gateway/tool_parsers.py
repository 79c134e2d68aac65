"""Tool calls out of a model's text, in the formats of the families Tandem serves. Pure, torch-free.

    hermes       Hermes, Qwen2.5, Qwen3:  text <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
                 (several blocks: parallel calls)
    llama3_json  Llama 3.1 / 3.2 / 3.3:   [<|python_tag|>]{"name": "f", "parameters": {...}}[; {...}]
                 (the whole reply is the call; text before it means no call)
    mistral      Mistral v0.3 and later:  text [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]

A parser reads one choice's text as it streams (`feed(delta)`, then `finish()`) and returns `Parsed`
pieces: the reply's content, and tool-call deltas as OpenAI streams them (a call's first delta has
its index, id and name, later ones append to its arguments). Markup never reaches the content: a
tail that may still grow into a marker is held back until it is decided. A block whose JSON carries
no name (or breaks) is not a call: its text is given back as content, as the model wrote it. Arguments
are the model's own JSON text, unchanged; feeding a text whole or in any split gives the same calls.
A call cut short by the end of the reply (max_tokens) keeps what arrived; one cut before its name was
complete is dropped, its markup with it.

`llama3_json` and `mistral` also read a reply that *starts* with the call's JSON without the marker:
`<|python_tag|>` and `[TOOL_CALLS]` are special tokens, which skip_special_tokens (the default) drops
from the text. `parser_for_template` picks the format from a chat template's text.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Protocol

from gateway.json_scan import CallScanner

TOOL_PARSERS = ("hermes", "llama3_json", "mistral")
_ALNUM = string.ascii_letters + string.digits


@dataclass
class ToolCallDelta:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Parsed:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: Parsed) -> Parsed:
        self.content += other.content
        for d in other.calls:  # consecutive argument fragments of one call become one delta
            last = self.calls[-1] if self.calls else None
            if last is not None and last.index == d.index and not d.id:
                last.arguments += d.arguments
            else:
                self.calls.append(ToolCallDelta(d.index, d.id, d.name, d.arguments))
        return self


class ToolParser(Protocol):
    def feed(self, text: str) -> Parsed: ...

    def finish(self) -> Parsed: ...


def call_id(kind: str = "openai") -> str:
    """A new tool call's id: "call_" and 24 random characters; Mistral's templates require exactly 9
    alphanumeric characters, so its calls get those."""
    n = 9 if kind == "mistral" else 24
    return ("" if kind == "mistral" else "call_") + "".join(secrets.choice(_ALNUM) for _ in range(n))


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class _Calls:
    """Numbers a choice's calls and turns each scanner's progress into deltas. `max_calls`: calls past
    it are read but dropped (parallel_tool_calls false keeps the first)."""

    def __init__(self, id_kind: str, max_calls: int | None) -> None:
        self.id_kind = id_kind
        self.max_calls = max_calls
        self.count = 0
        self._scanner: CallScanner | None = None
        self._announced = False
        self._sent = 0  # characters of the current call's arguments sent

    def start(self) -> CallScanner:
        self._scanner = CallScanner()
        self._announced = False
        self._sent = 0
        return self._scanner

    @property
    def _kept(self) -> bool:
        return self.max_calls is None or self.count < self.max_calls

    def progress(self, out: Parsed) -> None:
        """Deltas for what the current call's scanner learned since the last call."""
        sc = self._scanner
        if sc is None or sc.name is None or not self._kept:
            return
        args = sc.arguments_text()
        if not self._announced:
            self._announced = True
            out.calls.append(ToolCallDelta(self.count, call_id(self.id_kind), sc.name, args))
        elif len(args) > self._sent:
            out.calls.append(ToolCallDelta(self.count, arguments=args[self._sent:]))
        self._sent = len(args)

    def close(self, out: Parsed) -> bool:
        """End the current call; False (nothing emitted) when it had no name: not a call."""
        sc = self._scanner
        self._scanner = None
        if sc is None or sc.name is None:
            return False
        if self._kept:
            self._scanner = sc
            self.progress(out)
            self._scanner = None
            if not sc.has_arguments:
                out.calls.append(ToolCallDelta(self.count, arguments="{}"))
        self.count += 1
        return True


class HermesParser:
    """`<tool_call>{json}</tool_call>` blocks anywhere in the text; the text around them is content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None = None) -> None:
        self.calls = _Calls("openai", max_calls)
        self.buf = ""
        self.block: str | None = None  # the raw text of the open block, None outside one
        self.scanner: CallScanner | None = None

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        self.buf += text
        while self.buf:
            if self.block is None:
                i = self.buf.find(self.OPEN)
                if i < 0:
                    keep = held_back(self.buf, self.OPEN)
                    out.content += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                out.content += self.buf[:i]
                self.buf = self.buf[i + len(self.OPEN):]
                self.block = ""
                self.scanner = self.calls.start()
                continue
            assert self.scanner is not None
            if not (self.scanner.done or self.scanner.error):
                self.block += self.buf
                self.scanner.feed(self.buf)
                self.buf = ""
                self.calls.progress(out)
                if not (self.scanner.done or self.scanner.error):
                    break
                self.buf, self.scanner.rest = self.scanner.rest, ""
                self.block = self.block[:len(self.block) - len(self.buf)]
            j = self.buf.find(self.CLOSE)
            if j < 0:
                keep = held_back(self.buf, self.CLOSE)
                self.block += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                break
            self.block += self.buf[:j]
            self.buf = self.buf[j + len(self.CLOSE):]
            self._end_block(out, closed=True)
        return out

    def _end_block(self, out: Parsed, closed: bool) -> None:
        cut = not closed and self.scanner is not None and not self.scanner.error  # a call max_tokens cut short
        if not self.calls.close(out) and not cut:
            out.content += self.OPEN + (self.block or "") + (self.CLOSE if closed else "")
        self.block = None
        self.scanner = None

    def finish(self) -> Parsed:
        out = Parsed()
        if self.block is not None:
            self.block += self.buf
            self.buf = ""
            self._end_block(out, closed=False)
        out.content += self.buf
        self.buf = ""
        return out


class _JsonListParser:
    """Calls as JSON objects in sequence: Llama 3's `{...}; {...}` and Mistral's `[{...}, {...}]`.

    A reply that starts (after whitespace) with the marker or with a call's first character is read as
    calls; any other start makes the whole reply content. Calls that do not parse (no name) turn the
    whole held text back into content."""

    MARKER = ""
    FIRST = "{"
    ID_KIND = "openai"

    def __init__(self, max_calls: int | None = None) -> None:
        self.calls = _Calls(self.ID_KIND, max_calls)
        self.buf = ""
        self.mode = "start"  # start | content | calls
        self.raw = ""  # held text of the calls, given back as content if they fail

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        self.buf += text
        if self.mode == "start":
            head = self.buf.lstrip()
            if not head or (self.MARKER and self.MARKER.startswith(head)):
                return out
            if self.MARKER and head.startswith(self.MARKER):
                lead = self.buf[:len(self.buf) - len(head)]
                self.raw, self.buf, self.mode = lead + self.MARKER, head[len(self.MARKER):], "calls"
                self._begin()
            elif head.startswith(self.FIRST):
                self.raw, self.buf, self.mode = "", self.buf, "calls"
                self._begin()
            else:
                self.mode = "content"
        if self.mode == "content":
            self._content(out)
        elif self.mode == "calls":
            self.raw += self.buf
            text, self.buf = self.buf, ""
            self._calls(text, out)
        return out

    def _content(self, out: Parsed) -> None:
        out.content += self.buf
        self.buf = ""

    def _begin(self) -> None:
        """Entering the calls."""

    def _calls(self, text: str, out: Parsed) -> None:
        raise NotImplementedError

    def _fail(self, out: Parsed) -> None:
        """The calls do not parse: what was held is content, and so is the rest of the reply."""
        if self.calls.count == 0 and not out.calls:
            out.content += self.raw
        self.mode = "content"

    def _cut(self, scanner: CallScanner | None, out: Parsed) -> None:
        """The reply ended inside a call that has no name yet: after the marker, a call max_tokens cut
        short (dropped: no markup in the content); without it, maybe just text (given back)."""
        if not (self.MARKER and self.raw.lstrip().startswith(self.MARKER) and scanner is not None
                and not scanner.error):
            self._fail(out)

    def finish(self) -> Parsed:
        out = Parsed()
        if self.mode == "start":
            out.content += self.buf
        elif self.mode == "content":
            self._content(out)
            out.content += self.buf
        else:
            self._finish_calls(out)
        self.buf = ""
        return out

    def _finish_calls(self, out: Parsed) -> None:
        raise NotImplementedError


class Llama3JsonParser(_JsonListParser):
    """`{"name": ..., "parameters": ...}`, optionally after `<|python_tag|>`, several joined by `;`."""

    MARKER = "<|python_tag|>"

    def _begin(self) -> None:
        self.scanner: CallScanner | None = self.calls.start()
        self.between = False  # after a call: waiting for ";" and the next one

    def _calls(self, text: str, out: Parsed) -> None:
        while text:
            if self.between:
                stripped = text.lstrip()
                if not stripped:
                    return
                if stripped[0] != ";":
                    out.content += stripped  # text after the calls
                    self.mode = "content"
                    return
                text = stripped[1:]
                self.between = False
                self.scanner = self.calls.start()
                continue
            assert self.scanner is not None
            self.scanner.feed(text)
            self.calls.progress(out)
            if self.scanner.done:
                text, self.scanner.rest = self.scanner.rest, ""
                if not self.calls.close(out):  # a JSON object, but not a call
                    self._fail(out)
                    out.content += text if self.calls.count else ""
                    return
                self.between = True
            elif self.scanner.error:
                rest = self.scanner.rest
                if not self.calls.close(out):
                    self._fail(out)
                    return
                out.content += rest
                self.mode = "content"
                return
            else:
                return

    def _finish_calls(self, out: Parsed) -> None:
        if not self.between and not self.calls.close(out):
            self._cut(self.scanner, out)


class MistralParser(_JsonListParser):
    """`[TOOL_CALLS]` then a JSON array of calls; content may come before it. Ids are 9 characters."""

    MARKER = "[TOOL_CALLS]"
    FIRST = "["
    ID_KIND = "mistral"

    def _begin(self) -> None:
        self.array = "open"  # open: before "[" | elem: in a call | sep: after a call | after: after "]"
        self.scanner: CallScanner | None = None
        self.pending = ""  # after an array: text that may be the next marker

    def _content(self, out: Parsed) -> None:
        i = self.buf.find(self.MARKER)
        if i < 0:
            keep = held_back(self.buf, self.MARKER)
            out.content += self.buf[:len(self.buf) - keep]
            self.buf = self.buf[len(self.buf) - keep:]
            return
        out.content += self.buf[:i]
        rest = self.buf[i + len(self.MARKER):]
        self.buf, self.raw, self.mode = "", self.MARKER, "calls"
        self._begin()
        self.raw += rest
        self._calls(rest, out)

    def _calls(self, text: str, out: Parsed) -> None:
        while text:
            if self.array == "after":  # another array of calls, with its marker or without (skipped)
                text, self.pending = self.pending + text, ""
                stripped = text.lstrip()
                if not stripped or self.MARKER.startswith(stripped):
                    self.pending = text
                    return
                if stripped.startswith(self.MARKER):
                    self.array, text = "open", stripped[len(self.MARKER):]
                    continue
                if stripped[0] == "[":
                    self.array, text = "open", stripped
                    continue
                self.mode, self.buf = "content", text
                self._content(out)
                return
            if self.array in ("open", "sep"):
                stripped = text.lstrip()
                if not stripped:
                    return
                ch, text = stripped[0], stripped[1:]
                if self.array == "open" and ch == "[" or self.array == "sep" and ch == ",":
                    self.array = "elem"
                    self.scanner = self.calls.start()
                elif self.array == "sep" and ch == "]":
                    self.array = "after"
                    continue
                else:
                    self._fail(out)
                    if self.calls.count:
                        out.content += ch + text
                    return
                continue
            assert self.scanner is not None
            self.scanner.feed(text)
            self.calls.progress(out)
            if self.scanner.done:
                text, self.scanner.rest = self.scanner.rest, ""
                if not self.calls.close(out):
                    self._fail(out)
                    out.content += text if self.calls.count else ""
                    return
                self.array = "sep"
            elif self.scanner.error:
                rest = self.scanner.rest
                if not self.calls.close(out):
                    self._fail(out)
                    return
                self.mode = "content"
                out.content += rest
                return
            else:
                return

    def _finish_calls(self, out: Parsed) -> None:
        if self.array == "elem" and not self.calls.close(out):
            self._cut(self.scanner, out)
        out.content += self.pending.lstrip() if self.array == "after" else ""
        self.pending = ""


def make_tool_parser(name: str, max_calls: int | None = None) -> ToolParser:
    """A fresh parser of format `name` (one of TOOL_PARSERS) for one choice."""
    if name == "hermes":
        return HermesParser(max_calls)
    if name == "llama3_json":
        return Llama3JsonParser(max_calls)
    if name == "mistral":
        return MistralParser(max_calls)
    raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_PARSERS)}")


def parser_for_template(template: str | None) -> str | None:
    """The tool-call format a chat template writes, from its text; None when it shows none."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template
                                         and '"parameters"' in template):
        return "llama3_json"
    return None
