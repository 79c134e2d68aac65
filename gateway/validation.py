"""The gateway's checks of a GenerateRequest, as plain functions (the property tests drive them).

Order in the service: `check_request` (model, exactly one prompt form, size) -> tokenize ->
`check_prompt_ids` (non-empty, inside the vocabulary) -> route -> `check_length` (prompt + max_tokens
inside the chosen decode worker's context). Sampling fields are checked by
`server.protoconv.sampling_from_proto`. Each raises InvalidRequest / NotFound with a message naming
the field, the value and the limit; none allocates more than the request already holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.errors import InvalidRequest, NotFound
from tandem.v1 import generation_pb2 as gen

MAX_PROMPT_CHARS = 4 << 20


def check_request(req: gen.GenerateRequest, model_name: str) -> None:
    """Raises NotFound for another model's name, InvalidRequest for both prompt forms or a prompt over
    MAX_PROMPT_CHARS."""
    if req.HasField("model") and req.model != model_name:
        raise NotFound(f"model {req.model!r} is not served here; this gateway serves {model_name!r}")
    if req.prompt and req.prompt_token_ids:
        raise InvalidRequest("set exactly one of prompt and prompt_token_ids, not both")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt has {len(req.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")


def check_prompt_ids(ids: Sequence[int], token_id_limit: int) -> list[int]:
    """`ids` as a list. Raises InvalidRequest when empty or when an id is outside [0, token_id_limit)
    (`Tokenizer.token_id_limit`: the larger of the tokenizer's and the model's vocabularies)."""
    if not ids:
        raise InvalidRequest("the prompt is empty: set prompt or prompt_token_ids")
    bad = next((t for t in ids if not 0 <= t < token_id_limit), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {token_id_limit})")
    return list(ids)


def check_length(num_prompt_tokens: int, max_tokens: int, limit: int) -> None:
    """Raises InvalidRequest unless the prompt and max_tokens fit a context of `limit` tokens."""
    if num_prompt_tokens >= limit:
        raise InvalidRequest(f"the prompt has {num_prompt_tokens} tokens; the model's context holds {limit}, "
                             f"leaving no room to generate")
    if num_prompt_tokens + max_tokens > limit:
        raise InvalidRequest(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {limit} tokens; lower max_tokens to at most {limit - num_prompt_tokens}")
