"""Structured-output fields of OpenAI-shaped bodies -> `tandem.v1.StructuredOutput` (shape and type only;
whether the spec can be enforced is gateway/structured.py's check, on the Generate path).

    response_format     {"type": "text"}                                     free text (the default)
    (chat, completions) {"type": "json_object"}                              any JSON object
                        {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
                        {"type": "structural_tag", "structures": [{"begin", "schema", "end"}],
                         "triggers": [...], "only_tags": bool}              (vLLM's shape; only_tags is ours)
    text.format         the same types, flat: {"type": "json_schema", "name", "schema", "strict"} (/v1/responses)
    structured_outputs  vLLM's: {"json": schema | str, "regex", "choice": [...], "grammar", "json_object": true,
                                 "structural_tag": {...}, "best_effort": bool (ours)}: exactly one kind
    guided_json, guided_regex, guided_choice, guided_grammar     vLLM's older names, one of them;
    guided_decoding_backend                                      accepted and ignored (llguidance always)

Best effort (keywords the engine cannot enforce are ignored instead of refused) is asked for with
`"strict": false` in a json_schema response format, or `"best_effort": true` in structured_outputs;
`strict` true or absent refuses them. At most one of response_format (other than text),
structured_outputs and the guided_* fields may be set.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.json_body import shown
from server.errors import InvalidRequest
from tandem.v1 import generation_pb2 as gen

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
FIELDS = frozenset({"response_format", "structured_outputs", *GUIDED, "guided_decoding_backend"})


class StructuredRequestError(InvalidRequest):
    """HTTP 400 with `param` naming the field (gateway.openai_schema.RequestError's shape)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _schema_text(value: Any, where: str, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | bool):
        return json.dumps(value, ensure_ascii=False)
    raise StructuredRequestError(f"{where} must be a JSON Schema (an object), got {shown(value)}", param)


def _string(value: Any, where: str, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise StructuredRequestError(f"{where} must be a non-empty string, got {shown(value)}", param)
    return value


def _choices(value: Any, where: str, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise StructuredRequestError(f"{where} must be a non-empty list of strings", param)
    return value


def structural_tag(value: Any, where: str, param: str) -> gen.StructuralTag:
    """vLLM's {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (+ "only_tags")."""
    if not isinstance(value, dict):
        raise StructuredRequestError(f"{where} must be an object with structures and triggers", param)
    structures, triggers = value.get("structures"), value.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise StructuredRequestError(f"{where}.structures must be a non-empty list of {{begin, schema, end}}", param)
    out = gen.StructuralTag(triggers=_choices(triggers, f"{where}.triggers", param),
                            only_tags=bool(value.get("only_tags", False)))
    for i, s in enumerate(structures):
        if not isinstance(s, dict):
            raise StructuredRequestError(f"{where}.structures[{i}] must be an object {{begin, schema, end}}", param)
        schema = s.get("schema")
        out.tags.append(gen.TagSpec(begin=_string(s.get("begin"), f"{where}.structures[{i}].begin", param),
                                    schema_json="" if schema is None else _schema_text(
                                        schema, f"{where}.structures[{i}].schema", param),
                                    end=s.get("end") if isinstance(s.get("end"), str) else ""))
    return out


def response_format(fmt: Any, param: str = "response_format", *, flat: bool = False) -> gen.StructuredOutput | None:
    """An OpenAI response format (`flat`: the Responses API's text.format, whose json_schema fields sit
    beside "type"); None for {"type": "text"}."""
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise StructuredRequestError(f"{param} must be an object with a type", param)
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return gen.StructuredOutput(json_object=True)
    if kind == "json_schema":
        spec = fmt if flat else fmt.get("json_schema")
        where = param if flat else f"{param}.json_schema"
        if not isinstance(spec, dict) or "schema" not in spec:
            raise StructuredRequestError(f"{where} must hold a schema", param)
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise StructuredRequestError(f"{where}.strict must be true or false, got {shown(strict)}", param)
        return gen.StructuredOutput(json_schema=_schema_text(spec["schema"], f"{where}.schema", param),
                                    best_effort=strict is False)
    if kind == "structural_tag":
        return gen.StructuredOutput(structural_tag=structural_tag(fmt, param, param))
    raise StructuredRequestError(f"{param}.type must be text, json_object, json_schema or structural_tag, got "
                                 f"{shown(kind)}", param)


def _structured_outputs(value: Any) -> gen.StructuredOutput:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise StructuredRequestError("structured_outputs must be an object with one of json, regex, choice, grammar, "
                                     "json_object, structural_tag", param)
    unknown = sorted(set(value) - {"json", "regex", "choice", "grammar", "json_object", "structural_tag",
                                   "best_effort", "backend"})
    if unknown:
        raise StructuredRequestError(f"structured_outputs: unrecognized field(s) {', '.join(unknown[:8])}", param)
    kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
             if value.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise StructuredRequestError(f"structured_outputs must set exactly one of json, regex, choice, grammar, "
                                     f"json_object, structural_tag; got {', '.join(kinds) or 'none'}", param)
    best = value.get("best_effort", False)
    if not isinstance(best, bool):
        raise StructuredRequestError(f"structured_outputs.best_effort must be true or false, got {shown(best)}", param)
    out = gen.StructuredOutput(best_effort=best)
    kind = kinds[0]
    where = f"structured_outputs.{kind}"
    if kind == "json":
        out.json_schema = _schema_text(value[kind], where, param)
    elif kind == "regex":
        out.regex = _string(value[kind], where, param)
    elif kind == "grammar":
        out.grammar = _string(value[kind], where, param)
    elif kind == "choice":
        out.choice.choices.extend(_choices(value[kind], where, param))
    elif kind == "json_object":
        out.json_object = True
    else:
        out.structural_tag.CopyFrom(structural_tag(value[kind], where, param))
    return out


def _guided(body: dict[str, Any], name: str) -> gen.StructuredOutput:
    value = body[name]
    if name == "guided_json":
        return gen.StructuredOutput(json_schema=_schema_text(value, name, name))
    if name == "guided_regex":
        return gen.StructuredOutput(regex=_string(value, name, name))
    if name == "guided_grammar":
        return gen.StructuredOutput(grammar=_string(value, name, name))
    return gen.StructuredOutput(choice=gen.ChoiceList(choices=_choices(value, name, name)))


def structured_of(body: dict[str, Any]) -> gen.StructuredOutput | None:
    """The one structured output a chat or completion body asks for, or None. Raises
    StructuredRequestError naming the field."""
    found: list[tuple[str, gen.StructuredOutput]] = []
    if body.get("response_format") is not None:
        spec = response_format(body["response_format"])
        if spec is not None:
            found.append(("response_format", spec))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(body["structured_outputs"])))
    found += [(name, _guided(body, name)) for name in GUIDED if body.get(name) is not None]
    backend = body.get("guided_decoding_backend")
    if backend is not None and not isinstance(backend, str):
        raise StructuredRequestError(f"guided_decoding_backend must be a string, got {shown(backend)}",
                                     "guided_decoding_backend")
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise StructuredRequestError(f"set one structured output, not several: {names}", found[1][0])
    return found[0][1] if found else None
