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

from gateway.json_scan import CallScanner
from gateway.json_tool_parsers import Llama3JsonParser, MistralParser
from gateway.tool_calls import CallEmitter, Parsed, ToolParser, held_back

TOOL_PARSERS = ("hermes", "llama3_json", "mistral")


class HermesParser:
    """`<tool_call>{json}</tool_call>` blocks anywhere in the text; the text around them is content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None = None) -> None:
        self.calls = CallEmitter("openai", max_calls)
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
