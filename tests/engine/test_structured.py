"""Structured outputs in the engine: a random tiny model writes garbage, the grammar forces the structure.

Each output is parsed and validated (jsonschema for JSON Schema); constrained outputs with speculation
on (n-gram, a draft model; greedy and seeded) equal those with it off; the grammar stops a request
without EOS; blocks come back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.structured.grammar import GrammarError
from engine.structured.spec import StructuralTag, StructuredOutput, TagSpec
from tests.spec_models import make_draft

OPTS = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=512, max_num_batched_tokens=64)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
ARRAY_OF_POINTS = {"type": "array", "minItems": 2, "maxItems": 4,
                   "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                              "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                             "required": ["x", "y"], "additionalProperties": False}}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
NO_PARAMS = {"type": "object", "properties": {}, "additionalProperties": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(target) -> LLM:
    return LLM(target, **OPTS)


def prompts(n: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(k),), generator=g).tolist() for k in torch.randint(3, 20, (n,), generator=g)]


def schema_params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 160), structured=StructuredOutput.of_schema(schema), **kw)


def assert_all_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


# ------------------------------------------------------------------------ JSON Schema
@pytest.mark.parametrize("schema", [PERSON, ARRAY_OF_POINTS], ids=["nested-object", "array-of-objects"])
def test_json_schema_outputs_parse_and_validate(llm, schema) -> None:
    params = [schema_params(schema, temperature=0.0), schema_params(schema, temperature=1.0, seed=7),
              schema_params(schema, temperature=1.0, n=3), schema_params(schema, temperature=0.7, top_p=0.9,
                                                                         repetition_penalty=1.3, seed=2)]
    outs = llm.generate(prompts(len(params)), params)
    assert len(outs) == 6
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
        assert o.token_ids[-1] not in llm.tokenizer.eos_token_ids  # the grammar ended it, not EOS
    assert ", " in outs[0].text or ": " in outs[0].text  # bounded whitespace: one space after , and :
    assert not re.search(r"[\n\t]|  ", "".join(re.sub(r'"(\\.|[^"\\])*"', '""', o.text) for o in outs))
    assert_all_free(llm)


def test_json_object_and_max_tokens_gives_length(llm) -> None:
    # a random model writes an endless string in an unconstrained object: max_tokens ends it, and says so
    [obj, cut] = llm.generate(prompts(2), [SamplingParams(max_tokens=30, temperature=0.0, structured=StructuredOutput(
        json_object=True)), schema_params(PERSON, max_tokens=6, temperature=0.0)])
    assert obj.finish_reason == "length" and len(obj.token_ids) == 30 and obj.text.startswith('{"')
    assert cut.finish_reason == "length" and len(cut.token_ids) == 6 and cut.text.startswith('{"name": "')


def test_seeded_constrained_output_is_reproducible_in_any_batch(llm) -> None:
    p = schema_params(PERSON, temperature=1.0, seed=123)
    alone = llm.generate(prompts(1), p)[0]
    mixed = llm.generate(prompts(1) + prompts(2, seed=9), [p, SamplingParams(max_tokens=9), schema_params(
        ARRAY_OF_POINTS, temperature=1.0)])
    assert mixed[0].token_ids == alone.token_ids


def test_logprobs_penalties_and_logit_bias_keep_working(llm) -> None:
    # a huge bias on a token the grammar forbids changes nothing: the grammar mask comes last
    banned = llm.tokenizer.token_to_id("q")
    assert banned is not None
    params = schema_params(ARRAY_OF_POINTS, temperature=0.0, logprobs=3, presence_penalty=1.0,
                           frequency_penalty=0.5, logit_bias={banned: 100.0})
    o = llm.generate(prompts(1), params)[0]
    jsonschema.validate(json.loads(o.text), ARRAY_OF_POINTS)
    assert banned not in o.token_ids
    assert len(o.logprobs) == len(o.token_ids)
    for lp in o.logprobs:  # the logprobs of the constrained distribution: the forced tokens have 0
        assert float("-inf") < lp.logprob <= 0.0
        assert lp.top[0][1] >= lp.logprob - 1e-5 and banned not in [t for t, v in lp.top if v > float("-inf")]


# ------------------------------------------------------------------------ regex, choice, grammar
def test_regex_choice_and_grammars(llm) -> None:
    specs = {
        "regex": (StructuredOutput(regex=r"\d{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        "choice": (StructuredOutput(choice=("yes", "no", "maybe not")), lambda t: t in ("yes", "no", "maybe not")),
        "lark": (StructuredOutput(grammar='start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'),
                 lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)),
        "gbnf": (StructuredOutput(grammar='root ::= "ab" [c-e]{2} "!"'), lambda t: re.fullmatch(r"ab[c-e]{2}!", t)),
    }
    outs = llm.generate(prompts(len(specs)), [SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured=s)
                                              for s, _ in specs.values()])
    for (name, (_, ok)), o in zip(specs.items(), outs, strict=True):
        assert o.finish_reason in ("stop", "length"), name
        if o.finish_reason == "length":  # the lark sum may run on: every prefix still fits it
            assert name == "lark" and re.fullmatch(r"\([0-9+]*", o.text), o.text
        else:
            assert ok(o.text), (name, o.text)


@pytest.mark.parametrize(("spec", "words"), [
    (StructuredOutput.of_schema({"type": "object", "not": {"required": ["a"]}}), ["not"]),
    (StructuredOutput.of_schema({"type": "array", "uniqueItems": True}), ["uniqueItems"]),
    (StructuredOutput(regex="a(b"), ["regex does not compile", "unclosed group"]),
    (StructuredOutput(grammar="start: foo"), ["grammar does not compile", "foo"]),
])
def test_what_cannot_be_enforced_is_refused_naming_why(llm, spec, words) -> None:
    with pytest.raises(GrammarError) as err:
        llm.engine.make_sequence("x", [1, 2, 3], SamplingParams(structured=spec))
    for w in words:
        assert w in str(err.value)


def test_best_effort_ignores_unenforceable_keywords(llm) -> None:
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3,
              "uniqueItems": True}
    o = llm.generate(prompts(1), SamplingParams(max_tokens=40, temperature=0.0, structured=StructuredOutput.of_schema(
        schema, best_effort=True)))[0]
    jsonschema.validate(json.loads(o.text), {**schema, "uniqueItems": False})


def test_compiled_grammars_are_cached_by_content(llm) -> None:
    grammars = llm.engine.grammars
    spec = StructuredOutput.of_schema({"type": "object", "properties": {"k": {"type": "integer"}}})
    first = grammars.compile(spec)
    again = grammars.compile(StructuredOutput.of_schema(json.loads(spec.json_schema or "")))
    assert again.cached and again.grammar is first.grammar
    assert not grammars.compile(StructuredOutput.of_schema({"type": "object", "title": "other"})).cached


# ------------------------------------------------------------------------ structural tags (tool calls)
def _tool_shapes(tokenizer) -> dict[str, tuple[StructuralTag, re.Pattern[str]]]:
    hermes = StructuralTag((TagSpec('<tool_call>\n{"name": "get_weather", "arguments": ', json.dumps(WEATHER),
                                    "}\n</tool_call>"),
                            TagSpec('<tool_call>\n{"name": "get_time", "arguments": ', json.dumps(NO_PARAMS),
                                    "}\n</tool_call>")),
                           ("<tool_call>",))
    llama3 = StructuralTag((TagSpec('{"name": "get_weather", "parameters": ', json.dumps(WEATHER), "}"),),
                           ('{"name": ',))
    calls = {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "object", "properties": {
        "name": {"const": "get_weather"}, "arguments": WEATHER}, "required": ["name", "arguments"],
        "additionalProperties": False}}
    mistral = StructuralTag((TagSpec("[TOOL_CALLS]", json.dumps(calls), ""),), ("[TOOL_CALLS]",))
    return {
        "hermes": (hermes, re.compile(r'<tool_call>\n\{"name": "(get_weather|get_time)", "arguments": (.*?)\}\n'
                                      r'</tool_call>', re.S)),
        "llama3": (llama3, re.compile(r'\{"name": "get_weather", "parameters": (\{.*?\})\}', re.S)),
        "mistral": (mistral, re.compile(r"\[TOOL_CALLS\](.*)", re.S)),
    }


@pytest.mark.parametrize("shape", ["hermes", "llama3", "mistral"])
def test_structural_tags_only_tags(llm, shape) -> None:
    tag, pattern = _tool_shapes(llm.tokenizer)[shape]
    only = StructuralTag(tag.tags, tag.triggers, only_tags=True)
    outs = llm.generate(prompts(3), [SamplingParams(max_tokens=120, temperature=t, seed=s, structured=StructuredOutput(
        structural_tag=only)) for t, s in ((0.0, None), (1.0, 1), (1.0, 2))])
    for o in outs:
        m = pattern.match(o.text)
        assert m, o.text
        if shape == "hermes":
            name, args = m.group(1), json.loads(m.group(2))
            jsonschema.validate(args, WEATHER if name == "get_weather" else NO_PARAMS)
        elif shape == "llama3":
            jsonschema.validate(json.loads(m.group(1)), WEATHER)
        else:
            if o.finish_reason == "stop":  # the array closed: that is the whole output
                for call in json.loads(m.group(1)):
                    jsonschema.validate(call["arguments"], WEATHER)


@pytest.mark.parametrize("shape", ["hermes", "llama3"])
def test_structural_tags_in_free_text(llm, shape) -> None:
    tag, pattern = _tool_shapes(llm.tokenizer)[shape]
    spec = StructuredOutput(structural_tag=tag)
    # force the trigger early with a prompt ending in it is not possible for a random model: check
    # instead that whatever it writes, each trigger it writes starts a valid tag
    outs = llm.generate(prompts(6, seed=3), [SamplingParams(max_tokens=60, temperature=1.0, seed=s,
                                                            structured=spec) for s in range(6)])
    trigger = tag.triggers[0]
    for o in outs:
        for start in [m.start() for m in re.finditer(re.escape(trigger), o.text)]:
            rest = o.text[start:]
            m = pattern.match(rest)
            complete = m is not None
            # a tag cut by max_tokens is a prefix of a valid tag
            assert complete or o.finish_reason == "length", rest


def test_structural_tag_engine_forces_a_tag_after_the_trigger(llm) -> None:
    """Prefill the trigger as if the model had written it: the grammar must continue with a tag."""
    tag, pattern = _tool_shapes(llm.tokenizer)["hermes"]
    state_spec = StructuredOutput(structural_tag=tag)
    eng = llm.engine
    seq = eng.make_sequence("t", [5, 6, 7], SamplingParams(structured=state_spec))
    ids = llm.tokenizer.encode("I will call it.<tool_call>", add_special_tokens=False)
    assert seq.grammar.advance(ids)
    assert seq.grammar.valid_prefix(llm.tokenizer.encode(" hello", add_special_tokens=False)) == 0
    ok = llm.tokenizer.encode('\n{"name": "get_time", "arguments": {}}\n</tool_call>', add_special_tokens=False)
    assert seq.grammar.valid_prefix(ok) == len(ok)


# ------------------------------------------------------------------------ speculation is exact
@pytest.fixture(scope="module")
def draft(target, tmp_path_factory) -> Path:
    return make_draft(target, tmp_path_factory.mktemp("draft"), noise=0.05)


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_constrained_outputs_with_speculation_equal_those_without(llm, target, draft, kind) -> None:
    tag, _ = _tool_shapes(llm.tokenizer)["hermes"]
    specs = [StructuredOutput.of_schema(PERSON), StructuredOutput.of_schema(ARRAY_OF_POINTS),
             StructuredOutput(structural_tag=StructuralTag(tag.tags, tag.triggers, only_tags=True)),
             StructuredOutput(regex=r"(ab|cd){3,6}x")]
    params = []
    for i, s in enumerate(specs):
        params.append(SamplingParams(max_tokens=80, temperature=0.0, structured=s))
        params.append(SamplingParams(max_tokens=80, temperature=1.0, seed=40 + i, structured=s))
    params.append(SamplingParams(max_tokens=30, temperature=0.0))  # unconstrained beside them
    ps = prompts(len(params), seed=8)
    ps[0] = [5, 9, 14, 3, 7] * 6  # something for n-gram lookup to find
    want = llm.generate(ps, params)
    extra = {"speculative_method": "ngram"} if kind == "ngram" else {"speculative_model": str(draft)}
    spec_llm = LLM(target, **OPTS, num_speculative_tokens=4, speculative_adaptive=False, **extra)
    got = spec_llm.generate(ps, params)
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
    stats = spec_llm.engine.stats()
    constrained = [g.spec for g, p in zip(got, params, strict=True) if p.structured is not None and g.spec]
    assert sum(m.num_draft_tokens for m in constrained) > 0  # drafts of constrained sequences were verified
    assert sum(m.num_accepted_tokens for m in constrained) > 0
    assert_all_free(spec_llm)
    if kind == "draft":
        assert stats["draft_kv_blocks_free"] == stats["draft_kv_blocks_total"]


def test_masks_are_filled_while_the_forward_runs(llm, monkeypatch) -> None:
    runner = llm.engine.runner
    seen: list[bool] = []
    forward = runner.forward_logits

    def spy(step, on_layer_done=None):
        if any(s.grammar is not None for s, smp in zip(step.seqs, step.sample, strict=True) if smp):
            seen.append(step.masks is not None and step.masks._future is not None)
        return forward(step, on_layer_done)

    monkeypatch.setattr(runner, "forward_logits", spy)
    llm.generate(prompts(2), [schema_params(ARRAY_OF_POINTS, temperature=0.0), SamplingParams(max_tokens=5)])
    assert seen and all(seen)


# ------------------------------------------------------------------------ vocabularies
def test_padded_model_rows_are_never_sampled_under_a_grammar(tiny_model) -> None:
    path = tiny_model("qwen2", vocab_size=384, model_vocab_size=512)
    llm = LLM(path, **OPTS)
    outs = llm.generate(prompts(4), [SamplingParams(max_tokens=80, temperature=1.0, seed=s, structured=StructuredOutput(
        regex=r"[a-z ]{10,60}")) for s in range(4)])
    for o in outs:
        assert all(t < 384 for t in o.token_ids)
        assert re.fullmatch(r"[a-z ]{10,60}", o.text)


# ------------------------------------------------------------------------ the documented refusals
@pytest.mark.parametrize(("keyword", "schema"), [
    ("not", {"not": {"type": "string"}}),
    ("if", {"if": {"type": "string"}, "then": {"maxLength": 3}, "else": {"type": "integer"}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("dependentSchemas", {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}),
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("maxContains", {"type": "array", "contains": {"type": "integer"}, "maxContains": 2}),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}),
    ("unevaluatedItems", {"type": "array", "unevaluatedItems": False}),
    ("Unknown format", {"type": "string", "format": "no-such-format"}),
])
def test_every_documented_refusal_is_refused_and_best_effort_ignores_it(keyword, schema) -> None:
    """docs/structured-outputs.md lists these: the gateway's check (no tokenizer) refuses each, naming it."""
    from engine.structured.grammar import check

    with pytest.raises(GrammarError, match=keyword):
        check(StructuredOutput.of_schema(schema))
    check(StructuredOutput.of_schema(schema, best_effort=True))
