"""`tandem.v1.GenerateResponse` messages -> OpenAI response objects and stream chunks (plain dicts).

One `ResponseBuilder` per HTTP request. Streaming: `chunk(msg)` for each gateway message (None when
it carries nothing to show), then `usage_chunk()` when the client asked for usage. Non-streaming:
`add(msg)` for each message, then `response()`.

    completion  {"id": "cmpl-<rid>", "object": "text_completion", "choices": [{"text", "logprobs",
                 "finish_reason"}], "usage"}
    chat        {"id": "chatcmpl-<rid>", "object": "chat.completion", "choices": [{"message":
                 {"role": "assistant", "content"}, "logprobs": {"content": [...]}, "finish_reason"}], "usage"}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from server.errors import Unavailable
from tandem.v1 import generation_pb2 as gen

Kind = Literal["completion", "chat"]
_FINISH = {gen.FINISH_REASON_STOP: "stop", gen.FINISH_REASON_LENGTH: "length"}


def finish_reason(msg: gen.GenerateResponse) -> str | None:
    """"stop"/"length", None while unfinished; raises Unavailable for an aborted or failed request."""
    if msg.finish_reason == gen.FINISH_REASON_UNSPECIFIED:
        return None
    if msg.finish_reason in _FINISH:
        return _FINISH[msg.finish_reason]
    name = gen.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
    raise Unavailable(f"the request ended with {name}: {msg.finish_message or 'no details'}", retry_after_s=1.0)


def usage_json(u: gen.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


class ResponseBuilder:
    """Builds one request's OpenAI objects. `token_text(id)` is one token's text, for logprobs."""

    def __init__(self, kind: Kind, request_id: str, model: str, token_text: Callable[[int], str],
                 top_logprobs: int | None) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text
        self.top_logprobs = top_logprobs
        self.text: list[str] = []
        self.finish: str | None = None
        self.usage: gen.Usage | None = None
        self._offset = 0  # completion logprobs' text_offset
        self._logprobs: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                "text_offset": [], "content": []}

    # ---------------------------------------------------------------- logprobs
    def _logprobs_of(self, msg: gen.GenerateResponse) -> dict[str, Any] | None:
        """The logprobs of this message's tokens, in the endpoint's format (also kept for `response`)."""
        if self.top_logprobs is None:
            return None
        acc = self._logprobs
        part: dict[str, list[Any]] = {k: [] for k in acc}
        for lp in msg.logprobs:
            token = self.token_text(lp.token_id)
            if self.kind == "chat":
                part["content"].append({
                    "token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                    "top_logprobs": [{"token": (t := self.token_text(a.token_id)), "logprob": a.logprob,
                                      "bytes": list(t.encode())} for a in lp.top]})
            else:
                part["tokens"].append(token)
                part["token_logprobs"].append(lp.logprob)
                part["top_logprobs"].append({self.token_text(a.token_id): a.logprob for a in lp.top})
                part["text_offset"].append(self._offset)
                self._offset += len(token)
        for k, v in part.items():
            acc[k].extend(v)
        if self.kind == "chat":
            return {"content": part["content"], "refusal": None}
        return {k: part[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}

    # ---------------------------------------------------------------- streaming
    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def role_chunk(self) -> dict[str, Any]:
        """The chat stream's first chunk, announcing the assistant role."""
        return self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])

    def chunk(self, msg: gen.GenerateResponse, include_usage: bool) -> dict[str, Any] | None:
        """One stream chunk for `msg`, or None if it has no text, logprobs or finish to report."""
        reason = finish_reason(msg)
        if reason is not None:
            self.finish, self.usage = reason, msg.usage
        logprobs = self._logprobs_of(msg)
        if not msg.text and reason is None and not msg.logprobs:
            return None
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": reason}
        if self.kind == "chat":
            choice["delta"] = {"content": msg.text} if msg.text else {}
        else:
            choice["text"] = msg.text
        out = self._envelope([choice])
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, the whole request's usage."""
        out = self._envelope([])
        out["usage"] = usage_json(self.usage or gen.Usage())
        return out

    # ---------------------------------------------------------------- whole response
    def add(self, msg: gen.GenerateResponse) -> None:
        reason = finish_reason(msg)
        if reason is not None:
            self.finish, self.usage = reason, msg.usage
        self.text.append(msg.text)
        self._logprobs_of(msg)

    def response(self) -> dict[str, Any]:
        """The non-streaming response object; call after the finishing message was added."""
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish, "logprobs": None}
        if self.top_logprobs is not None:
            acc = self._logprobs
            choice["logprobs"] = ({"content": acc["content"], "refusal": None} if self.kind == "chat" else
                                  {k: acc[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")})
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice["text"] = text
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage_json(self.usage or gen.Usage())}
