"""Text <-> token ids for clients: the Tokenize / Detokenize RPCs, HTTP /tokenize and /detokenize, and
the chat rendering every chat-shaped endpoint shares (chat completions, responses, tokenize).

    render_chat(messages, add_generation_prompt, continue_final_message)   the chat template -> ids
    tokenize(TokenizeRequest) -> TokenizeResponse     a prompt as Generate tokenizes it, or a chat
    detokenize(DetokenizeRequest) -> DetokenizeResponse
    tokenize_request(json) / detokenize_request(json)  vLLM's /tokenize and /detokenize bodies -> the RPCs'

Sizes are checked before the work that grows with them (gateway/validation.py): text by its length
before it is tokenized (refused past the context before the ids are built), ids by their count.
Tokenizing runs off the event loop. Torch-free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from engine.tokenizer import Tokenizer
from gateway.openai_schema import RequestError, parse_chat
from gateway.validation import PromptLimits, check_model, check_prompt_ids, encode_prompt
from server.errors import InvalidRequest
from tandem.v1 import generation_pb2 as gen


class Texts:
    """Tokenizing for one served model: its tokenizer, its names and its context (`limits`)."""

    def __init__(self, tokenizer: Tokenizer, model_names: Sequence[str], limits: PromptLimits,
                 token_id_limit: int) -> None:
        self.tokenizer = tokenizer
        self.model_names = tuple(model_names)
        self.limits = limits
        self.token_id_limit = token_id_limit

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
        """The conversation through the checkpoint's chat template, as token ids (no extra BOS).
        Run it in a thread. Raises InvalidRequest past the context (before the ids are built) or for a
        template that refuses the conversation."""
        self.limits.check_chars("messages", sum(len(str(m.get("content") or "")) for m in messages))
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self.limits.check_chars("the rendered conversation", len(text))
        return encode_prompt(self.tokenizer, text, self.limits, add_special_tokens=False)

    async def tokenize(self, req: gen.TokenizeRequest) -> gen.TokenizeResponse:
        """Raises NotFound for another model, InvalidRequest for both or neither input, or a prompt past
        the context."""
        if req.HasField("model"):
            check_model(req.model, self.model_names)
        prompt = req.prompt
        if prompt and req.messages:
            raise InvalidRequest("set exactly one of prompt and messages, not both")
        if req.messages:
            messages = [{"role": m.role, "content": m.content} for m in req.messages]
            add = req.add_generation_prompt if req.HasField("add_generation_prompt") else not req.continue_final_message
            ids = await asyncio.to_thread(self.render_chat, messages, add, req.continue_final_message)
        else:
            self.limits.check_chars("prompt", len(prompt))
            special = req.add_special_tokens if req.HasField("add_special_tokens") else True
            ids = await asyncio.to_thread(encode_prompt, self.tokenizer, prompt, self.limits, special)
        tokens = [self.tokenizer.id_to_token(t) or "" for t in ids]
        return gen.TokenizeResponse(token_ids=ids, tokens=tokens, max_model_len=self.limits.context)

    async def detokenize(self, req: gen.DetokenizeRequest) -> gen.DetokenizeResponse:
        """Raises NotFound for another model, InvalidRequest for ids outside the vocabulary or more
        ids than the context holds."""
        if req.HasField("model"):
            check_model(req.model, self.model_names)
        if len(req.token_ids) > self.limits.context:
            raise InvalidRequest(f"token_ids holds {len(req.token_ids)} ids; the model's context holds "
                                 f"{self.limits.context}")
        ids = check_prompt_ids(req.token_ids, self.token_id_limit) if req.token_ids else []
        skip = req.skip_special_tokens if req.HasField("skip_special_tokens") else True
        text = await asyncio.to_thread(self.tokenizer.decode, ids, skip)
        return gen.DetokenizeResponse(text=text)


def _fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(n[:64] for n in unknown[:8])}",
                           unknown[0][:64])
    return body


def _typed(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body[name]
    if not isinstance(value, kind):
        raise RequestError(f"{name} must be a {'boolean' if kind is bool else 'string'}", name)
    return value


def tokenize_request(body: Any) -> gen.TokenizeRequest:
    """{"model", "prompt" | "messages", "add_special_tokens", "add_generation_prompt",
    "continue_final_message"} -> TokenizeRequest. Raises RequestError naming the field."""
    body = _fields(body, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                          "continue_final_message"})
    req = gen.TokenizeRequest()
    for name in ("model", "prompt"):
        if body.get(name) is not None:
            setattr(req, name, _typed(body, name, str))
    for name in ("add_special_tokens", "add_generation_prompt", "continue_final_message"):
        if body.get(name) is not None:
            setattr(req, name, _typed(body, name, bool))
    if body.get("messages") is not None:
        chat = parse_chat({"messages": body["messages"]})
        req.messages.extend(gen.ChatMessage(role=m["role"], content=m["content"]) for m in chat.messages)
    return req


def detokenize_request(body: Any) -> gen.DetokenizeRequest:
    """{"model", "tokens": [ids]} -> DetokenizeRequest. Raises RequestError naming the field."""
    body = _fields(body, {"model", "tokens"})
    req = gen.DetokenizeRequest()
    if body.get("model") is not None:
        req.model = _typed(body, "model", str)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                                               for t in tokens):
        raise RequestError("tokens must be a list of token ids", "tokens")
    req.token_ids.extend(tokens)
    return req
