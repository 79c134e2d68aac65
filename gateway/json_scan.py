"""Reading one tool call's JSON object as it streams in: its name as soon as it is complete, and the raw
text of its arguments piece by piece, without waiting for the object to close. Pure, torch-free.

    {"name": "get_weather", "arguments": {"city": "Paris"}}
             ^^^^^^^^^^^^^ name        ^^^^^^^^^^^^^^^^^ arguments (raw text, as the model wrote it)

`CallScanner.feed(text)` takes the next characters; `name`, `arguments_text()` and `done` tell what is
known so far. The arguments key is "arguments" or "parameters" (Llama 3 writes the latter). A value is
scanned by its brackets and strings alone (nothing is decoded but the name), so the cost is one pass
over the characters however they are split.
"""

from __future__ import annotations

import json
from enum import Enum, auto

ARGUMENT_KEYS = frozenset({"arguments", "parameters"})
_WS = " \t\r\n"


class _S(Enum):
    OPEN = auto()  # before the object's "{"
    KEY_OR_CLOSE = auto()  # after "{" or ",": a key, or "}"
    KEY = auto()  # inside a key's string
    COLON = auto()
    VALUE = auto()  # before a value's first character
    IN_VALUE = auto()  # inside a value (strings and brackets tracked)
    AFTER_VALUE = auto()  # "," or "}"
    DONE = auto()
    ERROR = auto()


class CallScanner:
    """One JSON object `{"name": ..., "arguments": ...}` read incrementally.

    After each `feed`: `name` is the decoded name once its string has closed (None before, or if it is
    not a string); `arguments_text()` is the raw text of the arguments value read so far (the whole
    value once `arguments_done`); `done` is set when the object closed, `error` when the text stopped
    being a JSON object. `rest` keeps what followed the closing brace, or the text from the first
    character that broke the object."""

    def __init__(self) -> None:
        self.state = _S.OPEN
        self.name: str | None = None
        self.arguments_done = False
        self.rest = ""  # text fed after the object closed (or after an error)
        self._key: list[str] = []
        self._value: list[str] = []  # the current value's raw text
        self._current_key = ""
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._primitive = False  # a number, true, false or null: ends at a delimiter
        self._arguments: list[str] = []
        self._has_arguments = False

    @property
    def done(self) -> bool:
        return self.state is _S.DONE

    @property
    def error(self) -> bool:
        return self.state is _S.ERROR

    @property
    def has_arguments(self) -> bool:
        return self._has_arguments

    def arguments_text(self) -> str:
        return "".join(self._arguments)

    def feed(self, text: str) -> None:
        if self.state in (_S.DONE, _S.ERROR):
            self.rest += text
            return
        for i, ch in enumerate(text):
            self._step(ch)
            if self.state is _S.DONE:
                self.rest += text[i + 1:]
                return
            if self.state is _S.ERROR:  # the offending character is kept: it may start a closing tag
                self.rest += text[i:]
                return

    def _fail(self) -> None:
        self.state = _S.ERROR

    def _step(self, ch: str) -> None:
        s = self.state
        if s is _S.OPEN:
            if ch == "{":
                self.state = _S.KEY_OR_CLOSE
            elif ch not in _WS:
                self._fail()
        elif s is _S.KEY_OR_CLOSE:
            if ch == '"':
                self._key = ['"']
                self._escape = False
                self.state = _S.KEY
            elif ch == "}":
                self.state = _S.DONE
            elif ch not in _WS:
                self._fail()
        elif s is _S.KEY:
            self._key.append(ch)
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                try:
                    self._current_key = json.loads("".join(self._key))
                except ValueError:
                    self._fail()
                    return
                self.state = _S.COLON
        elif s is _S.COLON:
            if ch == ":":
                self.state = _S.VALUE
            elif ch not in _WS:
                self._fail()
        elif s is _S.VALUE:
            if ch in _WS:
                return
            if ch in ",}]:":
                self._fail()
                return
            self._value = []
            self._depth = 0
            self._in_string = False
            self._escape = False
            self._primitive = ch not in '{["'
            self._is_args = self._current_key in ARGUMENT_KEYS and not self._has_arguments
            if self._is_args:
                self._has_arguments = True
            self.state = _S.IN_VALUE
            self._value_char(ch)
        elif s is _S.IN_VALUE:
            self._value_char(ch)
        elif s is _S.AFTER_VALUE:
            if ch == ",":
                self.state = _S.KEY_OR_CLOSE
            elif ch == "}":
                self.state = _S.DONE
            elif ch not in _WS:
                self._fail()

    def _value_char(self, ch: str) -> None:
        if self._primitive:
            if ch in ",}" or ch in _WS:
                self._end_value()
                self._step(ch)  # the delimiter belongs to the object
                return
            self._keep(ch)
            return
        self._keep(ch)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._depth == 0:
                    self._end_value()
            return
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._end_value()
            elif self._depth < 0:
                self._fail()

    def _keep(self, ch: str) -> None:
        self._value.append(ch)
        if self._is_args:
            self._arguments.append(ch)

    def _end_value(self) -> None:
        raw = "".join(self._value)
        if self._current_key == "name" and self.name is None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            if isinstance(value, str):
                self.name = value
        if self._is_args:
            self.arguments_done = True
            self._is_args = False
        self.state = _S.AFTER_VALUE

    _is_args = False


def scan_call(text: str) -> CallScanner:
    """A scanner that has read all of `text`."""
    scanner = CallScanner()
    scanner.feed(text)
    return scanner
