"""Bounded JSON (gateway/json_body.py): what the skeleton counts, where the depth is measured, which
strings are refused, and that refusing the largest hostile bodies costs milliseconds, not seconds."""

from __future__ import annotations

import json
import time

import pytest

from gateway.json_body import MAX_JSON_DEPTH, loads_bounded, max_body_bytes, max_skeleton_chars, shown
from server.errors import InvalidRequest


def test_strings_with_brackets_quotes_and_backslashes_parse_as_json_does() -> None:
    tricky = {"prompt": 'say "[[[{{{" \\" \\\\', "stop": ["]", "\\\\\"", "}"], "messages": [{"a": "\\"}]}
    body = json.dumps(tricky).encode()
    assert loads_bounded(body, 64) == tricky
    nested = {"x": [[[[{"y": [1, 2]}]]]]}
    assert loads_bounded(json.dumps(nested).encode(), 64) == nested
    emoji = b'{"prompt": "\\ud83d\\ude00 ok"}'  # a surrogate pair is one character, not a lone surrogate
    assert loads_bounded(emoji, 64) == {"prompt": "\U0001F600 ok"}


@pytest.mark.parametrize(("body", "needles"), [
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), (f"nests {MAX_JSON_DEPTH + 1} levels",)),
    (b'{"a": ' + b"[" * 5000, ("nests 5001 levels",)),  # unterminated: refused by depth, never parsed
    (b'{"prompt": [' + b"1," * 9999 + b"1]}", ("has 10005 commas, brackets and quotes", "the limit is 10000")),
    (b'{"prompt": "' + b"," * 9999 + b'"}', ("has 10005 commas",)),  # counted inside strings too
    (b'{"prompt": "\\ud800"}', ("prompt holds a lone surrogate (\\ud800) at character 0",)),
    (b'{"messages": [{"role": "user", "content": "ok \\udfff"}]}', ("messages[0].content holds a lone surrogate",)),
    (b'{"\\udc00": 1}', ("a key of the body holds a lone surrogate",)),
    (b'{"prompt": "x"', ("not valid JSON",)),
    (b'{"prompt": "\xff"}', ("not valid JSON",)),
])
def test_bodies_refused_name_the_limit_or_the_place(body: bytes, needles: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as err:
        loads_bounded(body, 10_000)
    assert all(n in err.value.message for n in needles), err.value.message


def test_limits_grow_with_the_context_up_to_a_cap() -> None:
    assert max_body_bytes(1024) == (64 << 10) + 64 * 1024 and max_body_bytes(1 << 20) == 16 << 20
    assert max_skeleton_chars(1024) == 16384 + 4 * 1024


@pytest.mark.parametrize("kind", ["values", "deep", "backslashes", "string"])
def test_the_largest_hostile_bodies_cost_milliseconds(kind: str) -> None:
    """At the largest body a 128K-token model allows (8 MiB): refused, or parsed, in tens of ms here
    (json.loads alone took 1 s for 16 MiB of small values before)."""
    size = max_body_bytes(128 << 10)
    body = {"values": b"[" + b"1," * (size // 2 - 1) + b"1]", "deep": b"[" * size,
            "backslashes": b'{"prompt": "' + b"\\\\" * (size // 2 - 8) + b'"}',
            "string": b'{"prompt": "' + b"x" * (size - 16) + b'"}'}[kind]
    t0 = time.perf_counter()
    try:
        loads_bounded(body, max_skeleton_chars(128 << 10))
    except InvalidRequest:
        pass
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"{kind}: {elapsed * 1000:.0f} ms"


def test_echoed_values_are_short() -> None:
    assert len(shown("x" * 10_000_000)) < 64 and len(shown(list(range(100_000)))) < 64
