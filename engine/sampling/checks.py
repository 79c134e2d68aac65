"""Type and shape checks of single sampling fields: each raises ValueError naming the field and the value.

Torch-free; `engine.sampling.params.SamplingParams` runs them once, at construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def number(name: str, value: object) -> float:
    """`value` as a finite float; bools, strings, NaN and infinities are rejected."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def strings(name: str, value: object, max_count: int, max_len: int) -> tuple[str, ...]:
    """A str or a list of 1..max_len-character strings, at most max_count of them, as a tuple."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    if len(value) > max_count:
        raise ValueError(f"{name} has {len(value)} strings; at most {max_count} are allowed")
    for s in value:
        if not isinstance(s, str):
            raise ValueError(f"{name} strings must be strings, got {s!r}")
        if not 1 <= len(s) <= max_len:
            raise ValueError(f"{name} strings must be 1 to {max_len} characters long, got {len(s)}: {s[:40]!r}")
    return tuple(value)


def token_ids(name: str, value: object, max_count: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ValueError(f"{name} must be a list of token ids, got {value!r}")
    if max_count is not None and len(value) > max_count:
        raise ValueError(f"{name} has {len(value)} ids; at most {max_count} are allowed")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{name} must hold non-negative integer token ids, got {t!r}")
    return tuple(value)


def logit_bias(value: object, max_count: int, max_abs: float) -> tuple[tuple[int, float], ...]:
    """A {token id: bias} mapping (ids may be decimal strings, as JSON object keys are) or (id, bias)
    pairs, as sorted (id, bias) pairs; each bias in [-max_abs, max_abs]."""
    if isinstance(value, Mapping):
        items: Sequence[object] = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        items = value
    else:
        raise ValueError(f"logit_bias must map token ids to numbers, got {value!r}")
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"logit_bias must map token ids to numbers, got the entry {item!r}")
        key, bias = item
        if isinstance(key, str) and key.isdigit() and len(key) <= 10:
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {key!r}")
        b = number("logit_bias values", bias)
        if not -max_abs <= b <= max_abs:
            raise ValueError(f"logit_bias values must be in [-{max_abs:g}, {max_abs:g}], got {b!r} for token {key}")
        pairs[key] = b
    if len(pairs) > max_count:
        raise ValueError(f"logit_bias has {len(pairs)} entries; at most {max_count} are allowed")
    return tuple(sorted(pairs.items()))
