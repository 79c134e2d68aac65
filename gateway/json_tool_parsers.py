"""Tool calls written as JSON objects in sequence: Llama 3's `{...}; {...}` (maybe after `<|python_tag|>`)
and Mistral's `[TOOL_CALLS][{...}, ...]`. Pure, torch-free; the contract is gateway/tool_parsers.py's.
"""

from __future__ import annotations

from gateway.json_scan import CallScanner
from gateway.tool_calls import CallEmitter, Parsed, held_back


class _JsonListParser:
    """Calls as JSON objects in sequence: Llama 3's `{...}; {...}` and Mistral's `[{...}, {...}]`.

    A reply that starts (after whitespace) with the marker or with a call's first character is read as
    calls; any other start makes the whole reply content. Calls that do not parse (no name) turn the
    whole held text back into content."""

    MARKER = ""
    FIRST = "{"
    ID_KIND = "openai"

    def __init__(self, max_calls: int | None = None) -> None:
        self.calls = CallEmitter(self.ID_KIND, max_calls)
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
