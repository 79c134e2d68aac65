"""`bad_words`: strings a request never generates, as token-id sequences and the bans they imply.

Following vLLM: each word is tokenized as it is and with a leading space (the two ways it can start
inside text), without special tokens. At each step, for each such sequence w of L tokens, the last
token w[L-1] is banned when the output so far ends with w[:L-1] (a one-token word is always banned).
A word can then never be completed token by token; the same text made of other tokens is not caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def bad_word_ids(tokenizer: _Encoder, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The distinct non-empty token sequences of `words`, each with and without a leading space."""
    seen: dict[tuple[int, ...], None] = {}
    for word in words:
        for text in (word, " " + word.lstrip(" ")):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                seen[ids] = None
    return tuple(seen)


def banned_now(output_ids: Sequence[int], words: Sequence[Sequence[int]]) -> set[int]:
    """Token ids that would complete one of `words` if sampled after `output_ids`."""
    banned: set[int] = set()
    for w in words:
        prefix = len(w) - 1
        if prefix == 0 or (len(output_ids) >= prefix and list(output_ids[len(output_ids) - prefix:]) == list(w[:-1])):
            banned.add(w[-1])
    return banned
