"""OpenAI request bodies -> `tandem.v1.GenerateRequest`s; no I/O and no policy beyond shape and type.

The gateway's own validation (sampling ranges, vocabulary, context length, the model name) runs later,
on the gRPC code path; this module only checks what the JSON must look like, and names the field:

    /v1/completions       {"model", "prompt": str | [int] | [str, ...] | [[int], ...], "max_tokens",
                           "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                           "logprobs": int, "echo", "n", "stream", "stream_options": {"include_usage"}, ...}
    /v1/chat/completions  {"model", "messages": [{"role", "content": str | [{"type": "text", "text"}],
                           "tool_calls", "tool_call_id", ...}], "max_tokens" | "max_completion_tokens",
                           "logprobs": bool, "top_logprobs": int, "n", "tools", "tool_choice",
                           "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt",
                           "continue_final_message", ...}   (chat fields: gateway/chat_schema.py)

A list of prompts is a batch: one GenerateRequest per prompt (`ParsedRequest.requests`), prompt i's
n choices numbered i*n .. i*n + n - 1. `echo` with `max_tokens` 0 returns the prompt alone (it is
computed with one token, which is dropped). Extensions both endpoints accept (vLLM's names): top_k,
min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, logit_bias,
allowed_token_ids, bad_words, include_stop_str_in_output, prompt_logprobs, priority; structured outputs:
response_format (both endpoints), structured_outputs and guided_json / guided_regex / guided_choice /
guided_grammar (gateway/openai_structured.py). Unknown fields
are rejected rather than silently ignored, except the bookkeeping ones OpenAI clients send (user,
metadata, store, service_tier, parallel_tool_calls outside chat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.sampling.params import MAX_STOP_STRINGS
from gateway.chat_schema import chat_messages, chat_options
from gateway.json_body import RequestError, shown
from gateway.openai_structured import FIELDS as STRUCTURED_FIELDS
from gateway.openai_structured import StructuredRequestError, structured_of
from server.protoconv import MAX_TOP_K
from tandem.v1 import generation_pb2 as gen

MAX_PROMPTS = 64  # prompts in one /v1/completions batch (each holds a --max-inflight slot)
_INT32 = 2**31
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})  # chat reads parallel_tool_calls
_SAMPLING = frozenset({"model", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
                       "frequency_penalty", "n", "stream", "stream_options", "logit_bias", "top_k", "min_p",
                       "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                       "allowed_token_ids", "bad_words", "include_stop_str_in_output", "prompt_logprobs",
                       "priority"}) | STRUCTURED_FIELDS
COMPLETION_FIELDS = _SAMPLING | {"prompt", "logprobs", "echo", "suffix", "best_of"}
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                           "parallel_tool_calls", "chat_template_kwargs", "functions", "function_call",
                           "add_generation_prompt", "continue_final_message"}


@dataclass
class ParsedRequest:
    """What the HTTP adapter needs beyond the GenerateRequests themselves.

    `request` has sampling, model and priority set; a completion's prompts are in `prompts` (one
    request each: `requests()`), a chat request carries `request.messages` and `request.chat` (the
    gateway service renders them), a Responses request its conversation in `messages` until the
    adapter renders it. `top_logprobs` is None when no logprobs were asked for, else
    how many alternatives per token; `prompt_logprobs` likewise for vLLM's prompt_logprobs.
    """

    request: gen.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False
    echo_only: bool = False  # echo with max_tokens 0: the generated token is dropped
    messages: list[dict[str, Any]] = field(default_factory=list)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @property
    def n(self) -> int:
        return self.request.sampling.n or 1

    def requests(self) -> list[gen.GenerateRequest]:
        """One GenerateRequest per prompt (the chat's single one when there are no prompts)."""
        if not self.prompts:
            return [self.request]
        out = []
        for prompt in self.prompts:
            req = gen.GenerateRequest()
            req.CopyFrom(self.request)
            if isinstance(prompt, str):
                req.prompt = prompt
            else:
                req.prompt_token_ids.extend(prompt)
            out.append(req)
        return out


# ------------------------------------------------------------------ typed field readers
def _number(body: dict[str, Any], name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RequestError(f"{name} must be a finite number, got {shown(v)}", name)
    return float(v)


def _integer(body: dict[str, Any], name: str, minimum: int = 0) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name} must be an integer, got {shown(v)}", name)
    if v < minimum:
        raise RequestError(f"{name} must be at least {minimum}, got {v}", name)
    return v


def _flag(body: dict[str, Any], name: str) -> bool | None:
    v = body.get(name)
    if v is None or isinstance(v, bool):
        return v
    raise RequestError(f"{name} must be true or false, got {shown(v)}", name)


def _token_ids(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                                          for t in v):
        raise RequestError(f"{name} must be a list of non-negative integer token ids", name)
    return v


def _strings(v: Any, name: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise RequestError(f"{name} must be a string or a list of strings", name)
    return v


def _check_fields(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed - _IGNORED)
    if unknown:
        names = ", ".join(n[:64] for n in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise RequestError(f"unrecognized request argument(s): {names}", unknown[0][:64])
    return body


# ------------------------------------------------------------------ shared sampling fields
def _logit_bias(v: Any) -> dict[int, float]:
    """{"token id": bias} (JSON keys are strings); ranges are SamplingParams'."""
    if not isinstance(v, dict):
        raise RequestError(f"logit_bias must map token ids to numbers, got {shown(v)}", "logit_bias")
    out: dict[int, float] = {}
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 10 and int(key) < 2**32):
            raise RequestError(f"logit_bias keys must be token ids, got {shown(key)}", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise RequestError(f"logit_bias values must be numbers, got {shown(bias)}", "logit_bias")
        out[int(key)] = float(bias)
    return out


def _sampling(body: dict[str, Any], max_tokens_field: str, min_max_tokens: int = 1) -> gen.SamplingParams:
    """The sampling fields common to both endpoints; ranges are left to the engine's validation."""
    s = gen.SamplingParams()
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(s, name, value)
    max_tokens = _integer(body, max_tokens_field, minimum=min_max_tokens)
    if max_tokens is not None:
        s.max_tokens = max(1, min(max_tokens, 2**32 - 1))
    top_k = _integer({"top_k": 0 if body.get("top_k") == -1 else body.get("top_k")}, "top_k")  # -1: vLLM's "off"
    if top_k is not None:
        if top_k > MAX_TOP_K:
            raise RequestError(f"top_k {top_k} exceeds the limit of {MAX_TOP_K} (2**31 - 1); send -1 or 0 to turn "
                               f"it off", "top_k")
        s.top_k = top_k
    for name in ("min_tokens", "n", "prompt_logprobs"):
        value = _integer(body, name, minimum=1 if name == "n" else 0)
        if value is not None:
            setattr(s, name, min(value, 2**32 - 1))
    seed = _integer(body, "seed")
    if seed is not None:
        if seed >= 2**63:
            raise RequestError(f"seed must be below 2**63, got {seed}", "seed")
        s.seed = seed
    if body.get("stop") is not None:
        stop = _strings(body["stop"], "stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
        s.stop.extend(stop)
    if body.get("bad_words") is not None:
        s.bad_words.extend(_strings(body["bad_words"], "bad_words"))
    for name in ("stop_token_ids", "allowed_token_ids"):
        if body.get(name) is not None:
            getattr(s, name).extend(_token_ids(body[name], name))
    if body.get("allowed_token_ids") == []:
        raise RequestError("allowed_token_ids must not be empty (leave it out to allow every token)",
                           "allowed_token_ids")
    if body.get("logit_bias"):
        for token, bias in _logit_bias(body["logit_bias"]).items():
            s.logit_bias[token] = bias
    s.ignore_eos = bool(_flag(body, "ignore_eos"))
    s.include_stop_str_in_output = bool(_flag(body, "include_stop_str_in_output"))
    skip = _flag(body, "skip_special_tokens")
    if skip is not None:
        s.skip_special_tokens = skip
    try:  # response_format, structured_outputs, guided_* (gateway/openai_structured.py)
        structured = structured_of(body)
    except StructuredRequestError as exc:
        raise RequestError(exc.message, exc.param) from None
    if structured is not None:
        s.structured.CopyFrom(structured)
    return s


def _common(body: dict[str, Any], max_tokens_field: str, min_max_tokens: int = 1) -> ParsedRequest:
    req = gen.GenerateRequest(sampling=_sampling(body, max_tokens_field, min_max_tokens))
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(f"model must be a string, got {shown(model)}", "model")
        req.model = model
    priority = _integer(body, "priority", minimum=-_INT32)
    if priority is not None:
        if priority >= _INT32:
            raise RequestError(f"priority must be a 32-bit integer, got {priority}", "priority")
        req.priority = priority
    stream = bool(_flag(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise RequestError("stream_options must be {\"include_usage\": bool}", "stream_options")
    include_usage = bool(_flag(options or {}, "include_usage"))
    parsed = ParsedRequest(request=req, stream=stream, include_usage=include_usage)
    if req.sampling.HasField("prompt_logprobs"):
        parsed.prompt_logprobs = req.sampling.prompt_logprobs
    return parsed


def common_request(body: Any, allowed: frozenset[str], max_tokens_field: str) -> ParsedRequest:
    """The fields every endpoint shares (sampling, model, priority, stream) of a body whose other
    fields are all in `allowed`."""
    return _common(_check_fields(body, allowed), max_tokens_field)


def _set_logprobs(parsed: ParsedRequest, top: int | None) -> None:
    if top is not None:
        parsed.request.sampling.logprobs = top
        parsed.top_logprobs = top


# ------------------------------------------------------------------ the two endpoints
def _prompts(prompt: Any) -> list[str | list[int]]:
    """One prompt (text or ids) or a batch of them (texts, or lists of ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [_token_ids(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        if len(prompt) > MAX_PROMPTS:
            raise RequestError(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} are allowed in one "
                               f"request", "prompt")
        out: list[str | list[int]] = []
        for p in prompt:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, list) and p:
                out.append(_token_ids(p, "prompt"))
            else:
                raise RequestError("a batch of prompts must hold strings or non-empty lists of token ids", "prompt")
        return out
    raise RequestError("prompt is required: a string, a list of token ids, or a list of either", "prompt")


def parse_completion(body: Any) -> ParsedRequest:
    """A /v1/completions body. Raises RequestError naming the field when its shape or type is wrong."""
    body = _check_fields(body, COMPLETION_FIELDS)
    echo = bool(_flag(body, "echo"))
    parsed = _common(body, "max_tokens", min_max_tokens=0 if echo else 1)
    parsed.prompts = _prompts(body.get("prompt"))
    parsed.echo = echo
    parsed.echo_only = echo and body.get("max_tokens") == 0
    if body.get("suffix"):
        raise RequestError("suffix is not supported", "suffix")
    if _integer(body, "best_of", minimum=1) not in (None, 1):
        raise RequestError("best_of must be 1 (use n for several choices)", "best_of")
    top = _integer(body, "logprobs")
    _set_logprobs(parsed, top)
    if echo and top is not None:  # the prompt's tokens are reported with their logprobs too
        sampling = parsed.request.sampling
        sampling.prompt_logprobs = max(top, sampling.prompt_logprobs) if sampling.HasField("prompt_logprobs") else top
    return parsed


def parse_chat(body: Any) -> ParsedRequest:
    """A /v1/chat/completions body. Raises RequestError naming the field when its shape or type is wrong.
    The conversation goes into the request as `messages` and `chat` (gateway/chat_schema.py), which
    the gateway renders through the chat template and checks (gateway/chat_request.py)."""
    body = _check_fields(body, CHAT_FIELDS)
    field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    parsed = _common(body, field_name)
    req = parsed.request
    req.messages.extend(chat_messages(body.get("messages")))
    req.chat.CopyFrom(chat_options(body))
    parsed.continue_final_message = bool(_flag(body, "continue_final_message"))
    add = _flag(body, "add_generation_prompt")
    parsed.add_generation_prompt = not parsed.continue_final_message if add is None else add
    req.chat.continue_final_message = parsed.continue_final_message
    if add is not None:
        req.chat.add_generation_prompt = add
    top = _integer(body, "top_logprobs")
    if _flag(body, "logprobs"):
        _set_logprobs(parsed, top or 0)
    elif top is not None:
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    return parsed
