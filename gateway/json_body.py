r"""A request body as JSON, refused by its size and then its shape before it is parsed.

The size limit grows with the model's context (`max_body_bytes`): 64 KiB for the fields around the
prompt plus 64 bytes per token of context (a token is ~4 characters, up to 6 bytes each when escaped
as \uXXXX), at most MAX_BODY_BYTES. Every cost below is linear in a body that size.

`json.loads` holds the event loop (and the GIL) while it runs, ~50-100 ns for each value it builds: a
16 MiB body of `[1,1,1,...` costs over a second, and a deep one `[[[[...` ends in RecursionError. So
the body's skeleton is measured first, with loops that build no Python object per byte:

    body.replace(b"\\\\", b"").replace(b'\\"', b"")    escaped backslashes and quotes dropped: every "
                                                      left opens or closes a string
    .translate(None, delete=all but , [ ] { } ")      the skeleton
    len(skeleton) > max_chars                         refused: too many values for the model's context
    strings dropped, bracket depth (numpy cumsum)     refused past MAX_JSON_DEPTH
    json.loads                                        bounded now: by max_chars values and the body's size
    a string holding a lone surrogate ("\ud800")      refused, naming where: it cannot become UTF-8

Commas and brackets inside strings count too, so the limit has room for them: a token rarely carries
more than two (`},{` is one token in some vocabularies).
"""

from __future__ import annotations

import json
import re
import reprlib
from typing import Any

import numpy as np

from server.errors import InvalidRequest


class RequestError(InvalidRequest):
    """A malformed body: HTTP 400 with `param` naming the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


MAX_BODY_BYTES = 16 << 20  # whatever the context; gRPC's message limit is the same
BODY_BASE_BYTES = 64 << 10  # 16 stop strings (24 KiB escaped), 1024 stop token ids (11 KiB), the rest
BODY_BYTES_PER_TOKEN = 64
MAX_JSON_DEPTH = 32  # OpenAI bodies nest 4 deep (body -> messages -> message -> content parts -> part); tools
# nest their JSON Schemas 4 deeper (body -> tools -> tool -> function -> parameters -> ...)
# The skeleton may hold this many characters per token of the model's context, plus a fixed allowance
# for the fields around the prompt (16 stop strings, 1024 stop token ids, messages' keys):
SKELETON_CHARS_PER_TOKEN = 4
SKELETON_BASE_CHARS = 16384

_KEEP = b',[]{}"'
_DELETE = bytes(sorted(set(range(256)) - set(_KEEP)))
_STRING = re.compile(rb'"[^"]*"')  # a string of the skeleton: only , [ ] { } between its quotes
_OPENS = np.frombuffer(b"[{", dtype=np.uint8)
_SHOWN = reprlib.Repr()  # a client's value echoed in a message: a few dozen characters at most
_SHOWN.maxstring = _SHOWN.maxother = 40
_SHOWN.maxlist = _SHOWN.maxdict = 4
_KEY_SHOWN = 40  # characters of a key in a path such as messages[0].content


def max_body_bytes(context: int) -> int:
    """The largest request body for a model whose context holds `context` tokens."""
    return min(MAX_BODY_BYTES, BODY_BASE_BYTES + BODY_BYTES_PER_TOKEN * context)


def max_skeleton_chars(context: int) -> int:
    """How many structural characters (, [ ] { } ") a body may hold for a model with this context."""
    return SKELETON_BASE_CHARS + SKELETON_CHARS_PER_TOKEN * context


def loads_bounded(body: bytes, max_chars: int) -> Any:
    """`body` parsed as JSON. Raises InvalidRequest for a body with more than `max_chars` structural
    characters (see the module docstring), nested deeper than MAX_JSON_DEPTH, that is not JSON, or that
    holds a lone surrogate."""
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _DELETE)
    if len(skeleton) > max_chars:
        raise InvalidRequest(f"the request body has {len(skeleton)} commas, brackets and quotes; the limit is "
                             f"{max_chars} for this model ({SKELETON_BASE_CHARS} + {SKELETON_CHARS_PER_TOKEN} per token of its "
                             f"context): it holds more values than the context can")
    brackets = np.frombuffer(_STRING.sub(b"", skeleton).translate(None, b",\""), dtype=np.uint8)
    if brackets.size:
        depth = int(np.cumsum(np.where(np.isin(brackets, _OPENS), 1, -1)).max())
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the request body nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # unreachable past the depth check; kept so it can never become a 500
        raise InvalidRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if b"\\u" in body:  # a lone surrogate can only arrive escaped (raw ones are not UTF-8)
        _check_unicode(value)
    return value


def _check_unicode(value: Any) -> None:
    """Raises InvalidRequest naming the first string (key or value) that holds a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            _check_string(path or "the body", v)
        elif isinstance(v, dict):
            for key, item in v.items():
                _check_string(f"a key of {path or 'the body'}", key)
                name = key[:_KEY_SHOWN]
                stack.append((f"{path}.{name}" if path else name, item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))


def _check_string(where: str, s: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{where} holds a lone surrogate (\\u{ord(s[exc.start]):04x}) at character "
                             f"{exc.start}: text must be valid Unicode (an astral character is escaped as a "
                             f"surrogate pair)") from None


def shown(value: Any) -> str:
    """`repr(value)` cut to a few dozen characters, for echoing a client's value in an error message."""
    return _SHOWN.repr(value)
