"""OpenAI request bodies -> a `tandem.v1.GenerateRequest`; no I/O and no policy beyond shape and type.

The gateway's own validation (sampling ranges, vocabulary, context length, the model name) runs later,
on the gRPC code path; this module only checks what the JSON must look like, and names the field:

    /v1/completions       {"model", "prompt": str | [int] | [str] (one) | [[int]] (one), "max_tokens",
                           "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                           "logprobs": int, "n": 1, "stream", "stream_options": {"include_usage"}, ...}
    /v1/chat/completions  {"model", "messages": [{"role", "content": str | [{"type": "text", "text"}]}],
                           "max_tokens" | "max_completion_tokens", "logprobs": bool, "top_logprobs": int, ...}

Extensions both accept (vLLM's names): top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens. Unknown fields are rejected rather than silently ignored, except
the bookkeeping ones OpenAI clients send (user, metadata, store, service_tier, parallel_tool_calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.sampling.params import MAX_STOP_STRINGS
from gateway.json_body import shown
from server.errors import InvalidRequest
from server.protoconv import MAX_TOP_K
from tandem.v1 import generation_pb2 as gen

MAX_N = 1  # one choice per request: send n requests for n samples
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_SAMPLING = frozenset({"model", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
                       "frequency_penalty", "n", "stream", "stream_options", "logit_bias", "top_k", "min_p",
                       "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens"})
COMPLETION_FIELDS = _SAMPLING | {"prompt", "logprobs", "echo", "suffix", "best_of"}
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                           "tools", "tool_choice", "functions", "function_call", "add_generation_prompt"}


class RequestError(InvalidRequest):
    """A malformed body: HTTP 400 with `param` naming the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ParsedRequest:
    """What the HTTP adapter needs beyond the GenerateRequest itself.

    `request` has sampling and model set; a completion also has its prompt, a chat request has neither
    prompt nor ids until the adapter renders `messages` with the chat template.
    `top_logprobs` is None when no logprobs were asked for, else how many alternatives per token.
    """

    request: gen.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    add_generation_prompt: bool = True


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
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise RequestError(f"{name} must be a list of non-negative integer token ids", name)
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
def _sampling(body: dict[str, Any], max_tokens_field: str) -> gen.SamplingParams:
    """The sampling fields common to both endpoints; ranges are left to the engine's validation."""
    s = gen.SamplingParams()
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(s, name, value)
    max_tokens = _integer(body, max_tokens_field, minimum=1)
    if max_tokens is not None:
        s.max_tokens = min(max_tokens, 2**32 - 1)
    top_k = _integer({"top_k": 0 if body.get("top_k") == -1 else body.get("top_k")}, "top_k")  # -1: vLLM's "off"
    if top_k is not None:
        if top_k > MAX_TOP_K:
            raise RequestError(f"top_k {top_k} exceeds the limit of {MAX_TOP_K} (2**31 - 1); send -1 or 0 to turn "
                               f"it off", "top_k")
        s.top_k = top_k
    min_tokens = _integer(body, "min_tokens")
    if min_tokens:
        s.min_tokens = min(min_tokens, 2**32 - 1)
    seed = _integer(body, "seed")
    if seed is not None:
        if seed >= 2**63:
            raise RequestError(f"seed must be below 2**63, got {seed}", "seed")
        s.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise RequestError("stop must be a string or a list of strings", "stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
        s.stop.extend(stop)
    if body.get("stop_token_ids") is not None:
        s.stop_token_ids.extend(_token_ids(body["stop_token_ids"], "stop_token_ids"))
    s.ignore_eos = bool(_flag(body, "ignore_eos"))
    skip = _flag(body, "skip_special_tokens")
    if skip is not None:
        s.skip_special_tokens = skip
    if _integer(body, "n", minimum=1) not in (None, 1):
        raise RequestError(f"n must be {MAX_N}: send one request per sample", "n")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported", "logit_bias")
    return s


def _common(body: dict[str, Any], max_tokens_field: str) -> ParsedRequest:
    req = gen.GenerateRequest(sampling=_sampling(body, max_tokens_field))
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(f"model must be a string, got {shown(model)}", "model")
        req.model = model
    stream = bool(_flag(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise RequestError("stream_options must be {\"include_usage\": bool}", "stream_options")
    include_usage = bool(_flag(options or {}, "include_usage"))
    return ParsedRequest(request=req, stream=stream, include_usage=include_usage)


def _set_logprobs(parsed: ParsedRequest, top: int | None) -> None:
    if top is not None:
        parsed.request.sampling.logprobs = top
        parsed.top_logprobs = top


# ------------------------------------------------------------------ the two endpoints
def parse_completion(body: Any) -> ParsedRequest:
    """A /v1/completions body. Raises RequestError naming the field when its shape or type is wrong."""
    body = _check_fields(body, COMPLETION_FIELDS)
    parsed = _common(body, "max_tokens")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        parsed.request.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        parsed.request.prompt_token_ids.extend(_token_ids(prompt, "prompt"))
    elif isinstance(prompt, list):
        raise RequestError("batched prompts are not supported: send one request per prompt", "prompt")
    else:
        raise RequestError("prompt is required: a string or a list of token ids", "prompt")
    if _flag(body, "echo"):
        raise RequestError("echo is not supported", "echo")
    if body.get("suffix"):
        raise RequestError("suffix is not supported", "suffix")
    if _integer(body, "best_of", minimum=1) not in (None, 1):
        raise RequestError("best_of must be 1", "best_of")
    _set_logprobs(parsed, _integer(body, "logprobs"))
    return parsed


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", "messages")


def parse_chat(body: Any) -> ParsedRequest:
    """A /v1/chat/completions body. Raises RequestError naming the field when its shape or type is wrong."""
    body = _check_fields(body, CHAT_FIELDS)
    field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    parsed = _common(body, field_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages is required: a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role", "messages")
        parsed.messages.append({**m, "content": _text_content(m.get("content"), i)})
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise RequestError(f"{name} is not supported", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("response_format: only {\"type\": \"text\"} is supported", "response_format")
    add = _flag(body, "add_generation_prompt")
    parsed.add_generation_prompt = True if add is None else add
    top = _integer(body, "top_logprobs")
    if _flag(body, "logprobs"):
        _set_logprobs(parsed, top or 0)
    elif top is not None:
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    return parsed
