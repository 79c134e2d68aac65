"""Text <-> token ids for clients: the Tokenize / Detokenize RPCs, HTTP /tokenize and /detokenize, and
the chat rendering every chat-shaped endpoint shares (chat completions, responses, tokenize).

    prepare(messages, ChatOptions) -> PreparedChat    a chat request checked (gateway/chat_request.py)
    render(PreparedChat) -> ids                        it through the chat template (tools, template kwargs)
    render_chat(messages, add_generation_prompt, continue_final_message)   plain dicts -> ids (/v1/responses)
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
from dataclasses import replace
from typing import Any

from engine.tokenizer import Tokenizer
from gateway.chat_request import ChatFormats, PreparedChat, prepare_chat
from gateway.chat_schema import CHAT_OPTION_FIELDS, chat_messages, chat_options
from gateway.json_body import RequestError
from gateway.reasoning import prompt_opens_thinking
from gateway.validation import PromptLimits, check_model, check_prompt_ids, encode_prompt
from server.errors import InvalidRequest
from tandem.v1 import generation_pb2 as gen


class Texts:
    """Tokenizing for one served model: its tokenizer, its names, its context (`limits`) and what its
    chat template writes (`formats`: tool-call format, thinking; read from the template by default)."""

    def __init__(self, tokenizer: Tokenizer, model_names: Sequence[str], limits: PromptLimits,
                 token_id_limit: int, formats: ChatFormats | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_names = tuple(model_names)
        self.limits = limits
        self.token_id_limit = token_id_limit
        self.formats = formats if formats is not None else ChatFormats.from_template(tokenizer.chat_template)
        self.specials = {text: i for i in tokenizer.all_special_ids if (text := tokenizer.id_to_token(i))}

    def prepare(self, messages: Sequence[gen.ChatMessage], options: gen.ChatOptions) -> PreparedChat:
        """A chat request checked (gateway/chat_request.py); cheap, on the event loop."""
        return prepare_chat(messages, options, self.formats, self.limits, self.specials)

    def render(self, chat: PreparedChat) -> list[int]:
        """A prepared chat through the template, as token ids; notes in `chat.output` whether the prompt
        left the model thinking. Run it in a thread. Raises InvalidRequest as render_chat does."""
        text = self._template(chat.messages, chat.add_generation_prompt, chat.continue_final_message,
                              chat.num_chars, chat.variables)
        if chat.output.reasoning and chat.constraint is None:  # a constrained reply starts with its calls
            chat.output = replace(chat.output, thinking_open=prompt_opens_thinking(text))
        return encode_prompt(self.tokenizer, text, self.limits, add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
        """The conversation through the checkpoint's chat template, as token ids (no extra BOS).
        Run it in a thread. Raises InvalidRequest past the context (before the ids are built) or for a
        template that refuses the conversation."""
        num_chars = sum(len(str(m.get("content") or "")) for m in messages)
        text = self._template(messages, add_generation_prompt, continue_final_message, num_chars, {})
        return encode_prompt(self.tokenizer, text, self.limits, add_special_tokens=False)

    def _template(self, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final_message: bool,
                  num_chars: int, variables: dict[str, Any]) -> str:
        self.limits.check_chars("messages", num_chars)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message, **variables)
        except ValueError as exc:
            raise RequestError(str(exc), "messages") from None
        self.limits.check_chars("the rendered conversation", len(text))
        return text

    async def tokenize(self, req: gen.TokenizeRequest) -> gen.TokenizeResponse:
        """Raises NotFound for another model, InvalidRequest for both or neither input, or a prompt past
        the context."""
        if req.HasField("model"):
            check_model(req.model, self.model_names)
        prompt = req.prompt
        if prompt and req.messages:
            raise InvalidRequest("set exactly one of prompt and messages, not both")
        if req.HasField("chat") and not req.messages:
            raise InvalidRequest("chat is read only with messages; send messages, or leave chat unset")
        if req.messages:
            options = gen.ChatOptions()
            options.CopyFrom(req.chat)
            options.continue_final_message = req.continue_final_message or req.chat.continue_final_message
            if req.HasField("add_generation_prompt"):
                options.add_generation_prompt = req.add_generation_prompt
            ids = await asyncio.to_thread(self.render, self.prepare(req.messages, options))
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
    "continue_final_message", "tools", "tool_choice", "chat_template_kwargs"} -> TokenizeRequest.
    Raises RequestError naming the field."""
    body = _fields(body, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                          "continue_final_message", *CHAT_OPTION_FIELDS})
    req = gen.TokenizeRequest()
    for name in ("model", "prompt"):
        if body.get(name) is not None:
            setattr(req, name, _typed(body, name, str))
    for name in ("add_special_tokens", "add_generation_prompt", "continue_final_message"):
        if body.get(name) is not None:
            setattr(req, name, _typed(body, name, bool))
    if body.get("messages") is not None:
        req.messages.extend(chat_messages(body["messages"]))
        req.chat.CopyFrom(chat_options(body))
    elif set(body) & CHAT_OPTION_FIELDS:
        raise RequestError("tools, tool_choice and chat_template_kwargs go with messages", "messages")
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
