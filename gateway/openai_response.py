"""`tandem.v1.GenerateResponse` messages -> OpenAI response objects and stream chunks (plain dicts).

One `ResponseBuilder` per HTTP request, fed with the messages of each of its prompts' streams (a
completions batch has several; choice index = prompt * n + the message's own index). Streaming:
`chunk(msg, prompt)` for each message (None when it carries nothing to show), then `usage_chunk()`
when the client asked for usage. Non-streaming: `add(msg, prompt)` for each message, then `response()`.

    completion  {"id": "cmpl-<rid>", "object": "text_completion", "choices": [{"index", "text", "logprobs",
                 "finish_reason", "prompt_logprobs"?}], "usage"}
    chat        {"id": "chatcmpl-<rid>", "object": "chat.completion", "choices": [{"index", "message":
                 {"role": "assistant", "content", "reasoning_content"?, "tool_calls"?}, "logprobs":
                 {"content": [...]}, "finish_reason": ... | "tool_calls"}],
                 "prompt_logprobs"?, "usage"}

`echo` (completions): each choice's text starts with its prompt, and with logprobs its token list
starts with the prompt's tokens (the first with a null logprob), as OpenAI's legacy API does.
`prompt_logprobs` (vLLM's extension) is a list with None for the first prompt token, then
{token id: {"logprob", "rank", "decoded_token"}} per prompt token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import Unavailable
from tandem.v1 import generation_pb2 as gen

Kind = Literal["completion", "chat"]
_FINISH = {gen.FINISH_REASON_STOP: "stop", gen.FINISH_REASON_LENGTH: "length"}
_LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def finish_reason(msg: gen.GenerateResponse) -> str | None:
    """"stop"/"length", None while unfinished; raises Unavailable for an aborted or failed request."""
    if msg.finish_reason == gen.FINISH_REASON_UNSPECIFIED:
        return None
    if msg.finish_reason in _FINISH:
        return _FINISH[msg.finish_reason]
    name = gen.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
    raise Unavailable(f"the request ended with {name}: {msg.finish_message or 'no details'}", retry_after_s=1.0)


def _chat_delta(text: str, msg: gen.GenerateResponse) -> dict[str, Any]:
    """A chat chunk's delta: content, reasoning_content, and tool calls as OpenAI streams them (a call's
    first delta with index, id, type and name; later ones append to function.arguments)."""
    delta: dict[str, Any] = {}
    if msg.reasoning_text:
        delta["reasoning_content"] = msg.reasoning_text
    if text:
        delta["content"] = text
    if msg.tool_calls:
        delta["tool_calls"] = [
            {"index": d.index, "id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments}}
            if d.id else {"index": d.index, "function": {"arguments": d.arguments}} for d in msg.tool_calls]
    return delta


def usage_json(u: gen.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)  # chat: {"id", "type", "function": {...}}
    finish: str | None = None
    offset: int = 0  # completion logprobs' text_offset
    started: bool = False  # its first chunk (with the echoed prompt) was sent
    logprobs: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in (*_LOGPROB_KEYS, "content")})


@dataclass
class _Prompt:
    """What one prompt's choices share: its echoed text and its prompt logprobs, once they arrive."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    logprobs: list[gen.TokenLogprob] | None = None


MIN_LOGPROB = -9999.0  # what a token that cannot be sampled reports (JSON has no -Infinity), as vLLM


def _finite(logprob: float) -> float:
    """A logprob as JSON can carry it: alternatives a grammar, allowed_token_ids or a ban rule out are
    -inf in the engine, MIN_LOGPROB here."""
    return max(logprob, MIN_LOGPROB)


class ResponseBuilder:
    """Builds one request's OpenAI objects. `token_text(id)` is one token's text, for logprobs.

    `n`: choices per prompt. `echo_texts`: with echo, each prompt's text (None: no echo). `echo_only`:
    the generated tokens are dropped (echo with max_tokens 0). `prompt_logprobs`: the client asked
    for vLLM's prompt_logprobs field."""

    def __init__(self, kind: Kind, request_id: str, model: str, token_text: Callable[[int], str],
                 top_logprobs: int | None, *, n: int = 1, echo_texts: Sequence[str] | None = None,
                 echo_only: bool = False, prompt_logprobs: bool = False) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text
        self.top_logprobs = top_logprobs
        self.n = n
        self.echo = echo_texts is not None
        self.echo_only = echo_only
        self.want_prompt_logprobs = prompt_logprobs
        self.prompts = [_Prompt(text) for text in (echo_texts or [""])]
        self.choices: dict[int, _Choice] = {}
        self._usage: list[gen.Usage] = []

    def _choice(self, msg: gen.GenerateResponse, prompt: int) -> tuple[int, _Choice]:
        while len(self.prompts) <= prompt:
            self.prompts.append(_Prompt())
        if msg.prompt_token_ids:
            self.prompts[prompt].ids = list(msg.prompt_token_ids)
            self.prompts[prompt].logprobs = list(msg.prompt_logprobs)
        index = prompt * self.n + msg.index
        return index, self.choices.setdefault(index, _Choice())

    def _finish(self, msg: gen.GenerateResponse, choice: _Choice) -> str | None:
        reason = finish_reason(msg)
        if reason == "stop" and choice.calls:  # a reply that called tools ends for them (OpenAI, vLLM)
            reason = "tool_calls"
        if reason is not None:
            choice.finish = reason
        if msg.HasField("usage"):
            self._usage.append(msg.usage)
        return reason

    @property
    def usage(self) -> gen.Usage:
        """Summed over the prompts' streams; with echo_only the dropped tokens are not counted."""
        u = gen.Usage()
        for part in self._usage:
            u.prompt_tokens += part.prompt_tokens
            u.cached_tokens += part.cached_tokens
            u.completion_tokens += 0 if self.echo_only else part.completion_tokens
        return u

    # ---------------------------------------------------------------- logprobs
    def _entry(self, choice: _Choice, token_id: int, lp: gen.TokenLogprob | None, part: dict[str, list[Any]]) -> None:
        token = self.token_text(token_id)
        if self.kind == "chat":
            assert lp is not None
            part["content"].append({
                "token": token, "logprob": _finite(lp.logprob), "bytes": list(token.encode()),
                "top_logprobs": [{"token": (t := self.token_text(a.token_id)), "logprob": _finite(a.logprob),
                                  "bytes": list(t.encode())} for a in lp.top]})
            return
        part["tokens"].append(token)
        part["token_logprobs"].append(lp.logprob if lp is not None else None)
        top = {self.token_text(a.token_id): _finite(a.logprob) for a in lp.top} if lp is not None else None
        if top is not None and lp is not None and lp.HasField("rank"):  # a prompt token: itself too, as vLLM
            top.setdefault(token, lp.logprob)
        part["top_logprobs"].append(top)
        part["text_offset"].append(choice.offset)
        choice.offset += len(token)

    def _logprobs_of(self, msg: gen.GenerateResponse, choice: _Choice, prompt: _Prompt | None
                     ) -> dict[str, Any] | None:
        """The logprobs of this message's tokens (and, with echo, of the prompt before them) in the
        endpoint's format; also kept for `response`."""
        if self.top_logprobs is None:
            return None
        part: dict[str, list[Any]] = {k: [] for k in choice.logprobs}
        if prompt is not None and prompt.ids:
            lps: list[gen.TokenLogprob | None] = [None, *(prompt.logprobs or [])]
            for token_id, lp in zip(prompt.ids, lps, strict=False):
                self._entry(choice, token_id, lp, part)
        if not self.echo_only:
            for lp in msg.logprobs:
                self._entry(choice, lp.token_id, lp, part)
        for k, v in part.items():
            choice.logprobs[k].extend(v)
        if self.kind == "chat":
            return {"content": part["content"], "refusal": None}
        return {k: part[k] for k in _LOGPROB_KEYS}

    def _prompt_logprobs_json(self, prompt: _Prompt) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = [None]
        for token_id, lp in zip(prompt.ids[1:], prompt.logprobs or [], strict=False):
            entry = {str(a.token_id): {"logprob": a.logprob, "rank": r, "decoded_token": self.token_text(a.token_id)}
                     for r, a in enumerate(lp.top, 1)}
            entry[str(token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_text(token_id)}
            out.append(entry)
        return out

    # ---------------------------------------------------------------- streaming
    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def role_chunks(self, num_prompts: int = 1) -> list[dict[str, Any]]:
        """The chat stream's first chunks, announcing the assistant role of each choice."""
        return [self._envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for i in range(num_prompts * self.n)]

    def _consume(self, msg: gen.GenerateResponse, prompt: int
                 ) -> tuple[int, str | None, str, dict[str, Any] | None]:
        """(choice index, finish reason, text, logprobs) of `msg`, kept for `response`; a choice's first
        message carries the echoed prompt (choice 0's first message, which brings the prompt's
        logprobs, always precedes the other choices' first messages)."""
        index, choice = self._choice(msg, prompt)
        if msg.reasoning_text:
            choice.reasoning.append(msg.reasoning_text)
        for d in msg.tool_calls:
            if d.id:  # a call's first delta
                choice.calls.append({"id": d.id, "type": "function", "function": {"name": d.name,
                                                                                 "arguments": d.arguments}})
            else:
                choice.calls[d.index]["function"]["arguments"] += d.arguments
        reason = self._finish(msg, choice)
        echoed = self.prompts[prompt] if self.echo and not choice.started else None
        choice.started = True
        logprobs = self._logprobs_of(msg, choice, echoed)
        text = ("" if echoed is None else echoed.text) + ("" if self.echo_only else msg.text)
        choice.text.append(text)
        return index, reason, text, logprobs

    def chunk(self, msg: gen.GenerateResponse, include_usage: bool, prompt: int = 0) -> dict[str, Any] | None:
        """One stream chunk for `msg` of prompt `prompt`'s stream, or None if it has nothing to report."""
        index, reason, text, logprobs = self._consume(msg, prompt)
        if not text and reason is None and not logprobs and not msg.reasoning_text and not msg.tool_calls:
            return None
        entry: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": reason}
        prompt_logprobs = self._prompt_logprobs_json(self.prompts[prompt]) if (
            self.want_prompt_logprobs and msg.prompt_token_ids) else None
        if self.kind == "chat":
            entry["delta"] = _chat_delta(text, msg)
        else:
            entry["text"] = text
            if prompt_logprobs is not None:
                entry["prompt_logprobs"] = prompt_logprobs
        out = self._envelope([entry])
        if self.kind == "chat" and prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, the whole request's usage."""
        out = self._envelope([])
        out["usage"] = usage_json(self.usage)
        return out

    # ---------------------------------------------------------------- whole response
    def add(self, msg: gen.GenerateResponse, prompt: int = 0) -> None:
        self._consume(msg, prompt)

    def response(self) -> dict[str, Any]:
        """The non-streaming response object; call after every stream's last message was added."""
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            entry: dict[str, Any] = {"index": index, "finish_reason": c.finish, "logprobs": None}
            if self.top_logprobs is not None:
                entry["logprobs"] = ({"content": c.logprobs["content"], "refusal": None} if self.kind == "chat" else
                                     {k: c.logprobs[k] for k in _LOGPROB_KEYS})
            if self.kind == "chat":
                content = "".join(c.text)
                entry["message"] = {"role": "assistant", "content": content if content or not c.calls else None}
                if c.reasoning:
                    entry["message"]["reasoning_content"] = "".join(c.reasoning)
                if c.calls:
                    entry["message"]["tool_calls"] = c.calls
            else:
                entry["text"] = "".join(c.text)
                if self.want_prompt_logprobs:
                    entry["prompt_logprobs"] = self._prompt_logprobs_json(self.prompts[index // self.n])
            choices.append(entry)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
               "usage": usage_json(self.usage)}
        if self.kind == "chat" and self.want_prompt_logprobs:
            out["prompt_logprobs"] = self._prompt_logprobs_json(self.prompts[0])
        return out
