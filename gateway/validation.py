"""The gateway's checks of a GenerateRequest, as plain functions (the property tests drive them).

Every size is checked before any work that grows with it, so a hostile request costs the event loop
a bounded few milliseconds however large it is:

    check_generate_wire   the serialized request, from field lengths alone (before protobuf parses it)
    check_request         model (any served name), exactly one prompt form (prompt, ids, messages),
                          request_id, prompt size (a chat's: gateway/chat_request.py)
    encode_prompt         tokenize off the event loop; refused past the context before the ids are built
    check_prompt_ids      non-empty, inside the vocabulary
    (route)               then `check_length`: prompt + max_tokens inside the chosen decode worker's context

Sampling fields are checked by `server.protoconv.sampling_from_proto` (and token ids in them by
`SamplingParams.check_vocab`). Each raises InvalidRequest /
NotFound with a message naming the field, the value and the limit; none allocates more than the
request already holds, and none echoes more than a bounded part of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.structured.spec import MAX_STRUCTURED_CHARS
from engine.tokenizer import Tokenizer, TooManyTokens
from server.errors import InvalidRequest, NotFound
from server.wirecheck import top_level_fields
from tandem.v1 import generation_pb2 as gen

MAX_PROMPT_CHARS = 4 << 20  # prompt text (or chat content) of any model, in characters
# A prompt longer than this many characters per token of context cannot fit it (English text
# averages ~4, code ~3): such a prompt is refused by its length before it is tokenized.
MAX_CHARS_PER_TOKEN = 32
MAX_REQUEST_ID_CHARS = 256  # request_id (HTTP: X-Request-Id) is echoed in every response message
MAX_MODEL_NAME_CHARS = 256  # the model field is echoed when it names another model
# The serialized SamplingParams at its limits: 16 stop strings and 64 bad words of 256 characters
# (4 bytes each at most: 80 KiB), 1024 stop token ids and 16384 allowed token ids (5 bytes each:
# 85 KiB) and 1024 logit_bias entries (13 bytes each: 13 KiB) take under 192 KiB.
# A structured output spec adds at most MAX_STRUCTURED_CHARS characters (4 bytes each) and its tags'
# framing (3 strings of up to 3 bytes of header each, 256 tags): 1 MiB + 4 KiB.
MAX_SAMPLING_BYTES = (192 << 10) + 4 * MAX_STRUCTURED_CHARS + (4 << 10)
# A GenerateRequest has 8 fields, one of them repeated per chat message; past this many (repeated
# prompt_token_ids sent unpacked, one field per id, or more messages than any conversation needs), a
# request over UNPACKED_MAX_BYTES is refused: protobuf's default encoding packs ids.
MAX_WIRE_FIELDS = 4096
# messages and chat (tools, template variables): like the prompt, plus room for roles, ids and keys.
CHAT_OVERHEAD_BYTES = 64 << 10
UNPACKED_MAX_BYTES = 64 << 10
_UTF8_MAX = 4  # bytes per character
_VARINT32_MAX = 5  # bytes per uint32 token id


@dataclass(frozen=True)
class PromptLimits:
    """The prompt sizes a model whose context holds `context` tokens can take (the gateway's model's
    max_position_embeddings: no decode worker's context is longer)."""

    context: int

    @property
    def max_prompt_tokens(self) -> int:
        return self.context - 1  # one token must be left to generate

    @property
    def max_prompt_chars(self) -> int:
        return min(MAX_PROMPT_CHARS, self.context * MAX_CHARS_PER_TOKEN)

    def check_chars(self, what: str, num_chars: int) -> None:
        """Raises InvalidRequest when `what` ("prompt", "messages") has more than max_prompt_chars."""
        if num_chars > self.max_prompt_chars:
            raise InvalidRequest(f"{what} has {num_chars} characters; the limit is {self.max_prompt_chars} "
                                 f"({MAX_CHARS_PER_TOKEN} per token of the model's {self.context}-token context, "
                                 f"at most {MAX_PROMPT_CHARS})")


def check_request_id(request_id: str, name: str = "request_id") -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"{name} has {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")


def check_generate_wire(data: bytes, limits: PromptLimits) -> None:
    """Refuse a serialized GenerateRequest whose fields cannot fit, from their lengths alone, before
    protobuf parses it (parsing 4M token ids takes longer than the event loop may be held)."""
    fields, complete = top_level_fields(data, MAX_WIRE_FIELDS)
    if not complete and len(data) > UNPACKED_MAX_BYTES:
        raise InvalidRequest(f"the request has more than {MAX_WIRE_FIELDS} fields in its {len(data)} bytes; "
                             f"send prompt_token_ids packed (protobuf's default encoding), and fewer messages")
    sizes: dict[int, int] = {}
    for f in fields:
        if f.wire_type == 2:  # the longest of a string sent twice (the last wins); all of packed ids and sampling
            merged = f.number in (3, 4, 7, 8)  # repeated (ids, messages) or a message sent in parts
            sizes[f.number] = sizes.get(f.number, 0) + f.length if merged else max(sizes.get(f.number, 0), f.length)
    for number, name, limit_chars in ((1, "request_id", MAX_REQUEST_ID_CHARS), (5, "model", MAX_MODEL_NAME_CHARS),
                                      (2, "prompt", limits.max_prompt_chars)):
        if sizes.get(number, 0) > limit_chars * _UTF8_MAX:
            raise InvalidRequest(f"{name} is {sizes[number]} bytes long; the limit is {limit_chars} characters")
    for number, name in ((7, "messages"), (8, "chat")):
        if sizes.get(number, 0) > limits.max_prompt_chars * _UTF8_MAX + CHAT_OVERHEAD_BYTES:
            raise InvalidRequest(f"{name} is {sizes[number]} bytes long; the limit is "
                                 f"{limits.max_prompt_chars * _UTF8_MAX + CHAT_OVERHEAD_BYTES} bytes (the prompt's "
                                 f"{limits.max_prompt_chars} characters, and room for roles, ids and keys)")
    if sizes.get(4, 0) > MAX_SAMPLING_BYTES:
        raise InvalidRequest(f"sampling is {sizes[4]} bytes long; the limit is {MAX_SAMPLING_BYTES} bytes "
                             f"(every list in it at its own limit takes under 192 KiB, a structured output "
                             f"spec under 1 MiB)")
    min_ids = -(-sizes.get(3, 0) // _VARINT32_MAX)
    if min_ids > limits.max_prompt_tokens:
        raise InvalidRequest(f"prompt_token_ids holds at least {min_ids} ids ({sizes[3]} bytes); the model's "
                             f"context holds {limits.context} tokens, leaving no room to generate")


def check_model(model: str, names: Sequence[str]) -> None:
    """Raises InvalidRequest for an overlong name, NotFound for one that is not among `names`."""
    if len(model) > MAX_MODEL_NAME_CHARS:
        raise InvalidRequest(f"model has {len(model)} characters; the limit is {MAX_MODEL_NAME_CHARS}")
    if model not in names:
        served = ", ".join(repr(n) for n in names)
        raise NotFound(f"model {model!r} is not served here; this gateway serves {served}")


def check_request(req: gen.GenerateRequest, model_names: Sequence[str], limits: PromptLimits) -> str:
    """The prompt text (read once: each read of a protobuf string decodes it). Raises NotFound for
    a model name not among `model_names`, InvalidRequest for both prompt forms, an overlong
    request_id or model, or a prompt over `limits` (characters, or token ids past the context)."""
    check_request_id(req.request_id)
    if req.HasField("model"):
        check_model(req.model, model_names)
    prompt = req.prompt
    if sum(map(bool, (prompt, req.prompt_token_ids, req.messages))) > 1:
        given = " and ".join(n for n, v in (("prompt", prompt), ("prompt_token_ids", req.prompt_token_ids),
                                            ("messages", req.messages)) if v)
        raise InvalidRequest(f"set exactly one of prompt, prompt_token_ids and messages, not {given}")
    if req.HasField("chat") and not req.messages:
        raise InvalidRequest("chat is read only with messages; send messages, or leave chat unset")
    limits.check_chars("prompt", len(prompt))
    check_length(len(req.prompt_token_ids), 0, limits.context)
    return prompt


def encode_prompt(tokenizer: Tokenizer, text: str, limits: PromptLimits, add_special_tokens: bool = True
                  ) -> list[int]:
    """`text`'s token ids (run it in a thread: the tokenizer releases the GIL). Raises InvalidRequest,
    before the ids become a list, when they cannot fit the context."""
    try:
        return tokenizer.encode(text, add_special_tokens, max_tokens=limits.max_prompt_tokens)
    except TooManyTokens as exc:
        check_length(exc.num_tokens, 0, limits.context)
        raise  # unreachable: more tokens than the limit fail check_length


def check_prompt_ids(ids: Sequence[int], token_id_limit: int) -> list[int]:
    """`ids` as a list. Raises InvalidRequest when empty or when an id is outside [0, token_id_limit)
    (`Tokenizer.token_id_limit`: the larger of the tokenizer's and the model's vocabularies)."""
    ids = list(ids)
    if not ids:
        raise InvalidRequest("the prompt is empty: set prompt or prompt_token_ids")
    if min(ids) < 0 or max(ids) >= token_id_limit:  # C loops; the slow search only for the message
        bad = next(t for t in ids if not 0 <= t < token_id_limit)
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {token_id_limit})")
    return ids


def check_length(num_prompt_tokens: int, max_tokens: int, limit: int) -> None:
    """Raises InvalidRequest unless the prompt and max_tokens fit a context of `limit` tokens."""
    if num_prompt_tokens >= limit:
        raise InvalidRequest(f"the prompt has {num_prompt_tokens} tokens; the model's context holds {limit}, "
                             f"leaving no room to generate")
    if num_prompt_tokens + max_tokens > limit:
        raise InvalidRequest(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {limit} tokens; lower max_tokens to at most {limit - num_prompt_tokens}")
