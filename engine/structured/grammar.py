"""A `StructuredOutput` as an llguidance grammar, and the check that refuses what cannot be enforced.

Torch-free (llguidance imports in ~80 ms and loads no torch), so the gateway checks every spec before
admission with the same code the workers compile with:

    grammar_text(spec, specials)   the llguidance grammar (JSON text) of a spec
    check(spec)                    raises GrammarError when the grammar does not compile, or when a
                                   JSON Schema uses keywords llguidance cannot enforce (unless best_effort)

JSON whitespace is bounded by default: no whitespace except one space after ',' and ':' (the
separators Python's json.dumps writes), so a model cannot loop on whitespace between tokens of the
structure. A schema's own "x-guidance" object overrides these options (llguidance's JsonCompileOptions,
e.g. {"whitespace_flexible": true}).

Structural tags become a Lark grammar:

    free text (only_tags false)                      only_tags true
    start: seg_0* ... FREE                           start: tag (SEP tag)*
    seg_k: head_k (tag_i | tag_j ...)                tag: tag_0 | tag_1 | ...
    head_k[lazy]: /(.|\\n)*/ "<trigger k>"            SEP: /[ \\t\\r\\n]{0,4}/
    tag_i: "<rest of begin>" %json{schema} "<end>"
    FREE: /(.|\\n)*/ & ~/(.|\\n)*(<trigger>...)(.|\\n)*/   (free text never holds a trigger: once the
                                                      output holds one, a tag must follow)

A trigger (or a part of begin/end) that is one special token of the tokenizer (`specials`: its text ->
id, e.g. Mistral's "[TOOL_CALLS]") is matched as that token (`<[id]>`), as the model emits it; free
text cannot hold a special token at all, so no lazy head is needed before it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import llguidance as llg

from engine.structured.spec import StructuralTag, StructuredOutput, TagSpec

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_SCHEMA: dict[str, Any] = {}  # a tag without a schema: any JSON value
_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')
_REGEX_META = set("\\.+*?()|[]{}^$#&-~/\"")


class GrammarError(ValueError):
    """A spec that cannot be enforced: the message says why (the compiler's words, or the keywords)."""


def _json_options(best_effort: bool) -> Any:  # llguidance's JsonCompileOptions (a TypedDict)
    return {**JSON_OPTIONS, "lenient": best_effort}


def _with_options(schema_text: str, best_effort: bool) -> str:
    """Schema text with our JSON options as defaults under its own "x-guidance" (for %json in Lark)."""
    schema = json.loads(schema_text) if schema_text.strip() else ANY_JSON_SCHEMA
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    own: dict[str, Any] = schema["x-guidance"] if isinstance(schema.get("x-guidance"), dict) else {}
    return json.dumps({**schema, "x-guidance": {**_json_options(best_effort), **own}}, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    """`text` as a literal inside a Lark /regex/ (Rust regex syntax)."""
    out = []
    for ch in text:
        if ch in _REGEX_META:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        else:
            out.append(ch)
    return "".join(out)


def _literal(text: str, specials: Mapping[str, int]) -> str:
    """`text` as a Lark sequence: special tokens as `<[id]>`, the rest as JSON-quoted strings."""
    if not text:
        return ""
    names = sorted((s for s in specials if s and s in text), key=len, reverse=True)
    if not names:
        return json.dumps(text, ensure_ascii=False)
    parts = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
    return " ".join(f"<[{specials[p]}]>" if p in specials else json.dumps(p, ensure_ascii=False) for p in parts if p)


def _tag_body(tag: TagSpec, skip: int, specials: Mapping[str, int], best_effort: bool) -> str:
    """begin[skip:] (the trigger already matched), the schema's JSON, end."""
    parts = [_literal(tag.begin[skip:], specials), "%json " + _with_options(tag.schema, best_effort),
             _literal(tag.end, specials)]
    return " ".join(p for p in parts if p)


def structural_tag_lark(st: StructuralTag, specials: Mapping[str, int], best_effort: bool = False) -> str:
    """The Lark grammar of a structural tag (module docstring)."""
    lines = ["%llguidance {}"]
    tags = [f"tag_{i}" for i in range(len(st.tags))]
    if st.only_tags:
        for i, tag in enumerate(st.tags):
            lines.append(f"tag_{i}: {_tag_body(tag, 0, specials, best_effort)}")
        lines += ["start: tag (SEP tag)*", f"tag: {' | '.join(tags)}", "SEP: /[ \\t\\r\\n]{0,4}/"]
        return "\n".join(lines)
    by_trigger: dict[str, list[int]] = {}
    for i, tag in enumerate(st.tags):
        trig = st.trigger_of(tag)
        assert trig is not None  # StructuralTag checked it
        by_trigger.setdefault(trig, []).append(i)
    segs = []
    text_triggers = []
    for k, (trig, members) in enumerate(by_trigger.items()):
        for i in members:
            lines.append(f"tag_{i}: {_tag_body(st.tags[i], len(trig), specials, best_effort)}")
        if trig in specials:  # a special token: free text cannot hold it, so FREE stops before it
            head = f"head_{k}: FREE {_literal(trig, specials)}"
        else:
            head = f"head_{k}[lazy]: /(.|\\n)*/ {json.dumps(trig, ensure_ascii=False)}"
            text_triggers.append(trig)
        lines.append(head)
        lines.append(f"seg_{k}: head_{k} ({' | '.join(f'tag_{i}' for i in members)})")
        segs.append(f"seg_{k}")
    lines.append(f"start: ({' | '.join(segs)})* FREE")
    if text_triggers:
        alts = "|".join(_regex_escape(t) for t in text_triggers)
        lines.append(f"FREE: /(.|\\n)*/ & ~/(.|\\n)*({alts})(.|\\n)*/")
    else:
        lines.append("FREE: /(.|\\n)*/")
    return "\n".join(lines)


def choice_lark(choices: tuple[str, ...]) -> str:
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def grammar_text(spec: StructuredOutput, specials: Mapping[str, int] | None = None) -> str:
    """The llguidance grammar of `spec`. `specials`: the tokenizer's special tokens (text -> id) that
    structural tags match as tokens; None outside an engine (the gateway's check).
    Raises GrammarError for a schema that is not JSON."""
    specials = specials or {}
    kind = spec.kind
    try:
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_json_options(False))
        if kind == "json_schema":
            assert spec.json_schema is not None
            return llg.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=_json_options(spec.best_effort))
        if kind == "regex":  # \d and \w are ASCII, as in JSON Schema's pattern (JavaScript semantics)
            assert spec.regex is not None
            return llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(spec.regex, 'dw')}/")
        if kind == "grammar":
            assert spec.grammar is not None
            return llg.grammar_from("grammar", spec.grammar)
        if kind == "choice":
            assert spec.choice is not None
            return llg.LLMatcher.grammar_from_lark(choice_lark(spec.choice))
        assert spec.structural_tag is not None
        return llg.LLMatcher.grammar_from_lark(structural_tag_lark(spec.structural_tag, specials, spec.best_effort))
    except (ValueError, TypeError) as exc:  # not JSON, or a GBNF the converter cannot read
        raise GrammarError(f"{kind} does not compile: {exc}") from None


def refusal(kind: str, message: str) -> str:
    """The compiler's error as the client reads it: unenforceable keywords named first."""
    found = _UNIMPLEMENTED.search(message)
    if found and kind in ("json_schema", "structural_tag"):
        keys = ", ".join(k.strip().strip('"') for k in found.group(1).split(",") if k.strip())
        return (f"{kind} uses JSON Schema keywords this server cannot enforce: {keys} (ask for best effort to "
                f"ignore them: best_effort in tandem.v1, \"strict\": false in response_format)")
    return f"{kind} does not compile: {message.strip()}"


def check(spec: StructuredOutput, tokenizer: llg.LLTokenizer | None = None) -> str:
    """The grammar of `spec` once it is known to compile (with `tokenizer` when given). Raises
    GrammarError naming unenforceable keywords (unless spec.best_effort) or the compiler's error."""
    text = grammar_text(spec)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
    if is_error:
        raise GrammarError(refusal(spec.kind, messages[0] if messages else "unknown error"))
    return text
