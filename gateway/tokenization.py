"""Text <-> token ids for clients: the Tokenize / Detokenize RPCs, HTTP /tokenize and /detokenize, and
the chat rendering every chat-shaped endpoint shares (chat completions, responses, tokenize).

    render_chat(messages, add_generation_prompt, continue_final_message)   the chat template -> ids
    tokenize(TokenizeRequest) -> TokenizeResponse     a prompt as Generate tokenizes it, or a chat
    detokenize(DetokenizeRequest) -> DetokenizeResponse

Sizes are checked before the work that grows with them (gateway/validation.py): text by its length
before it is tokenized (refused past the context before the ids are built), ids by their count.
Tokenizing runs off the event loop. Torch-free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from engine.tokenizer import Tokenizer
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
