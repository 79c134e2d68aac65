"""Conversions between the wire (tandem.v1 protos) and the engine's types. No policy lives here."""

from __future__ import annotations

from typing import Any

from engine.outputs import FinishReason, TokenLogprob
from engine.sampling.params import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_STOP_STRINGS,
    SamplingParams,
)
from engine.structured.spec import StructuralTag, StructuredOutput, TagSpec
from tandem.v1 import generation_pb2 as gen

DEFAULT_MAX_TOKENS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_TOP_K = 2**31 - 1  # top_k beyond any vocabulary; above it a uint32 is more likely a wrapped negative
_UINT32_WRAP = 1 << 32

_FINISH: dict[FinishReason | None, gen.FinishReason] = {
    None: gen.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: gen.FINISH_REASON_LENGTH,
    FinishReason.STOP: gen.FINISH_REASON_STOP,
    FinishReason.ABORT: gen.FINISH_REASON_ABORT,
}


def sampling_from_proto(p: gen.SamplingParams, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
    """Raises ValueError (-> INVALID_ARGUMENT) with the field named, as SamplingParams does; counts
    are checked before the repeated fields are copied.

    top_k is uint32 on the wire and at most MAX_TOP_K: a client that sends -1 ("off" in some APIs)
    through a language that wraps it arrives as 4294967295, so the refusal of a value >= 2**31 also
    says which negative it would be if it was wrapped.
    """
    if p.HasField("top_k") and p.top_k > MAX_TOP_K:
        raise ValueError(f"top_k {p.top_k} exceeds the limit of {MAX_TOP_K} (2**31 - 1); if you meant "
                         f"{p.top_k - _UINT32_WRAP} wrapped to uint32, send 0 or leave top_k unset to turn it off")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(p.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids has {len(p.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
    for name, limit in (("logit_bias", MAX_LOGIT_BIAS), ("allowed_token_ids", MAX_ALLOWED_TOKEN_IDS),
                        ("bad_words", MAX_BAD_WORDS)):
        if len(getattr(p, name)) > limit:
            raise ValueError(f"{name} has {len(getattr(p, name))} entries; at most {limit} are allowed")
    if p.n > MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}], got {p.n}")
    kw: dict[str, Any] = {"max_tokens": p.max_tokens or default_max_tokens, "n": p.n or 1}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "logprobs", "prompt_logprobs", "skip_special_tokens", "top_k"):
        if p.HasField(name):
            kw[name] = getattr(p, name)
    if p.stop:
        kw["stop"] = tuple(p.stop)
    if p.stop_token_ids:
        kw["stop_token_ids"] = tuple(p.stop_token_ids)
    if p.logit_bias:
        kw["logit_bias"] = dict(p.logit_bias)
    if p.allowed_token_ids:
        kw["allowed_token_ids"] = tuple(p.allowed_token_ids)
    if p.bad_words:
        kw["bad_words"] = tuple(p.bad_words)
    if p.HasField("structured"):
        kw["structured"] = structured_from_proto(p.structured)
    kw["include_stop_str_in_output"] = p.include_stop_str_in_output
    kw["ignore_eos"] = p.ignore_eos
    kw["min_tokens"] = p.min_tokens
    if kw["min_tokens"] > kw["max_tokens"]:
        raise ValueError(f"min_tokens ({kw['min_tokens']}) must not exceed max_tokens ({kw['max_tokens']})")
    return SamplingParams(**kw)


def sampling_to_proto(s: SamplingParams) -> gen.SamplingParams:
    p = gen.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, max_tokens=s.max_tokens,
        stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
        repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, min_tokens=s.min_tokens,
        skip_special_tokens=s.skip_special_tokens, n=s.n, logit_bias=dict(s.logit_bias),
        allowed_token_ids=list(s.allowed_token_ids or ()), bad_words=list(s.bad_words),
        include_stop_str_in_output=s.include_stop_str_in_output,
    )
    if s.seed is not None:
        p.seed = s.seed
    if s.logprobs is not None:
        p.logprobs = s.logprobs
    if s.prompt_logprobs is not None:
        p.prompt_logprobs = s.prompt_logprobs
    if s.structured is not None:
        p.structured.CopyFrom(structured_to_proto(s.structured))
    return p


def structured_from_proto(p: gen.StructuredOutput) -> StructuredOutput:
    """Raises ValueError naming the field (no kind set, sizes, a schema that is not JSON)."""
    kind = p.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured: set one of json_object, json_schema, regex, grammar, choice, structural_tag")
    if kind == "choice":
        return StructuredOutput(choice=tuple(p.choice.choices), best_effort=p.best_effort)
    if kind == "structural_tag":
        st = p.structural_tag
        tag = StructuralTag(tuple(TagSpec(t.begin, t.schema_json, t.end) for t in st.tags), tuple(st.triggers),
                            st.only_tags)
        return StructuredOutput(structural_tag=tag, best_effort=p.best_effort)
    return StructuredOutput(**{kind: getattr(p, kind)}, best_effort=p.best_effort)


def structured_to_proto(s: StructuredOutput) -> gen.StructuredOutput:
    p = gen.StructuredOutput(best_effort=s.best_effort)
    kind = s.kind
    if kind == "choice":
        p.choice.choices.extend(s.choice or ())
    elif kind == "structural_tag":
        assert s.structural_tag is not None
        st = s.structural_tag
        p.structural_tag.CopyFrom(gen.StructuralTag(
            tags=[gen.TagSpec(begin=t.begin, schema_json=t.schema, end=t.end) for t in st.tags],
            triggers=list(st.triggers), only_tags=st.only_tags))
    else:
        setattr(p, kind, getattr(s, kind))
    return p


def finish_to_proto(reason: FinishReason | None) -> gen.FinishReason:
    return _FINISH[reason]


def logprob_to_proto(lp: TokenLogprob) -> gen.TokenLogprob:
    p = gen.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                         top=[gen.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
    if lp.rank is not None:
        p.rank = lp.rank
    return p


def logprob_from_proto(p: gen.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(p.token_id, p.logprob, [(t.token_id, t.logprob) for t in p.top],
                        p.rank if p.HasField("rank") else None)
