"""What a request asks its output to look like: one `StructuredOutput`, validated for shape at the door.

Torch-free and grammar-library-free (the gateway, `SamplingParams` and the proto conversions use it).
Exactly one kind is set:

    json_object       any JSON object
    json_schema       JSON Schema text (draft 2020-12 keywords; engine.structured.grammar lists the refused ones)
    regex             a regular expression (Rust `regex` syntax: no look-around, no backreferences)
    grammar           a context-free grammar: llguidance's Lark dialect, or GBNF (llama.cpp's EBNF)
    choice            exactly one of a list of strings
    structural_tag    free text (or nothing, with only_tags) around tags whose bodies match a schema:
                      what tool calls look like (`StructuralTag`)

`best_effort` turns a refusal of schema keywords the engine cannot enforce (e.g. `not`, `uniqueItems`)
into ignoring them; a grammar that does not compile is refused either way. Sizes are bounded here
(MAX_STRUCTURED_CHARS over every string of the spec) so that compiling stays cheap to refuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

MAX_STRUCTURED_CHARS = 256 << 10  # every string of one spec together (schemas, grammars, choices, tags)
MAX_CHOICES = 1024
MAX_TAGS = 256
MAX_TRIGGERS = 64
KINDS = ("json_object", "json_schema", "regex", "grammar", "choice", "structural_tag")


def _schema_text(name: str, text: str, allow_empty: bool = False) -> str:
    """`text` checked to be a JSON object (a schema), returned unchanged; "" when allowed."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be JSON Schema text, got {type(text).__name__}")
    if allow_empty and not text.strip():
        return ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict | bool):
        raise ValueError(f"{name} must be a JSON object (a schema), got {type(value).__name__}")
    return text


@dataclass(frozen=True)
class TagSpec:
    """One tag: `begin` (starts with one of the triggers), a body matching `schema` (JSON Schema text;
    "" for any JSON value), then `end`. E.g. Hermes/Qwen: begin '<tool_call>\\n{"name": "f", "arguments": ',
    schema the arguments' schema, end '}\\n</tool_call>'."""

    begin: str
    schema: str = ""
    end: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.begin, str) or not self.begin:
            raise ValueError("structural_tag: every tag needs a non-empty begin")
        if not isinstance(self.end, str):
            raise ValueError("structural_tag: a tag's end must be a string")
        _schema_text("structural_tag: a tag's schema", self.schema, allow_empty=True)


@dataclass(frozen=True)
class StructuralTag:
    """Tags the output may hold (free text around them), or, with `only_tags`, one or more tags and
    nothing else (a few whitespace characters between tags). Each tag's begin starts with one of
    `triggers`; once the output holds a trigger, the tag that follows must match one of the tags."""

    tags: tuple[TagSpec, ...]
    triggers: tuple[str, ...]
    only_tags: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "triggers", tuple(self.triggers))
        if not 1 <= len(self.tags) <= MAX_TAGS:
            raise ValueError(f"structural_tag needs 1 to {MAX_TAGS} tags, got {len(self.tags)}")
        if not 1 <= len(self.triggers) <= MAX_TRIGGERS:
            raise ValueError(f"structural_tag needs 1 to {MAX_TRIGGERS} triggers, got {len(self.triggers)}")
        for trig in self.triggers:
            if not isinstance(trig, str) or not trig:
                raise ValueError("structural_tag: triggers must be non-empty strings")
        for tag in self.tags:
            if not isinstance(tag, TagSpec):
                raise ValueError(f"structural_tag: tags must be TagSpec, got {type(tag).__name__}")
            if self.trigger_of(tag) is None:
                raise ValueError(f"structural_tag: the tag beginning {tag.begin[:60]!r} starts with none of the "
                                 f"triggers {list(self.triggers)!r}")

    def trigger_of(self, tag: TagSpec) -> str | None:
        """The longest trigger `tag.begin` starts with."""
        found = [t for t in self.triggers if tag.begin.startswith(t)]
        return max(found, key=len) if found else None

    def chars(self) -> int:
        return sum(len(t) for t in self.triggers) + sum(len(t.begin) + len(t.schema) + len(t.end) for t in self.tags)


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of the kinds (module docstring), and `best_effort`. Raises ValueError naming the
    field when the shape is wrong (none or several kinds, a schema that is not JSON, sizes)."""

    json_object: bool = False
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None
    structural_tag: StructuralTag | None = None
    best_effort: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool) or not isinstance(self.best_effort, bool):
            raise ValueError("structured: json_object and best_effort must be true or false")
        if isinstance(self.json_schema, dict | list):  # a parsed schema: keep its text
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured: choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [k for k in KINDS if self._value(k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"structured: set exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(set_) if set_ else 'none'}")
        if self.json_schema is not None:
            _schema_text("json_schema", self.json_schema)
        for name in ("regex", "grammar"):
            value = self._value(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured: {name} must be a non-empty string")
        if self.choice is not None:
            if not 1 <= len(self.choice) <= MAX_CHOICES:
                raise ValueError(f"structured: choice needs 1 to {MAX_CHOICES} strings, got {len(self.choice)}")
            if not all(self.choice):
                raise ValueError("structured: choice strings must not be empty")
        if self.structural_tag is not None and not isinstance(self.structural_tag, StructuralTag):
            raise ValueError("structured: structural_tag must be a StructuralTag")
        if self.chars() > MAX_STRUCTURED_CHARS:
            raise ValueError(f"structured: the {self.kind} is {self.chars()} characters long; the limit is "
                             f"{MAX_STRUCTURED_CHARS}")

    def _value(self, kind: str) -> Any:
        return getattr(self, kind)

    @property
    def kind(self) -> str:
        """Which of KINDS is set."""
        return next(k for k in KINDS if self._value(k) not in (None, False))

    def chars(self) -> int:
        if self.structural_tag is not None:
            return self.structural_tag.chars()
        if self.choice is not None:
            return sum(len(c) for c in self.choice)
        value = self._value(self.kind)
        return len(value) if isinstance(value, str) else 0

    @property
    def key(self) -> str:
        """The spec as canonical text: equal specs (whatever built them) have equal keys (caches)."""
        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            return value

        return json.dumps(plain(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def of_schema(cls, schema: dict[str, Any] | str, *, best_effort: bool = False) -> StructuredOutput:
        """A json_schema spec from a schema (a dict or its text)."""
        return cls(json_schema=schema if isinstance(schema, str) else json.dumps(schema), best_effort=best_effort)
