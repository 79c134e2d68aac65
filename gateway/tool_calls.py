"""What every tool-call parser shares: the deltas it returns, the numbering and ids of a choice's calls,
and holding back a tail of text that may grow into a marker. Pure, torch-free.

    ToolCallDelta(index, id, name, arguments)   OpenAI's streaming unit: a call's first delta has its
                                                index, id and name; later ones append `arguments`
    Parsed(content, calls)                      what one `feed` or `finish` of a parser returns
    CallEmitter                                 a scanner's progress (gateway/json_scan.py) -> deltas
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Protocol

from gateway.json_scan import CallScanner

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


class CallEmitter:
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
