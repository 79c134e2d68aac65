"""Each token's bytes, for tokenizers whose decoder is GPT-2's byte-level one (Llama 3, Qwen2/3,
SmolLM2, GGUF "gpt2" tokenizers), so text can be made from ids by table look-ups.

The `ByteLevel` decoder turns every token string into bytes, concatenates them, and decodes the
result as UTF-8, an ill-formed sequence becoming U+FFFD ("lossy"):

    token string --(each char through the byte map; a string with any char outside the map:
                    its own UTF-8 bytes)--> bytes;   decode(ids) = lossy(b"".join(bytes of ids))

The byte map is GPT-2's: the 188 printable Latin-1 characters stand for their own byte, and the other
68 bytes (controls, space, DEL, NBSP, soft hyphen, ...) for chr(256), chr(257), ... in byte order.
Ids the tokenizer lacks, and the rows of a vocabulary with holes, have no token string: no bytes.
"""

from __future__ import annotations

import logging
from codecs import utf_8_decode
from typing import NamedTuple

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders

logger = logging.getLogger(__name__)


def _byte_map() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if chr(b) not in chars]
    chars.update({chr(256 + n): b for n, b in enumerate(others)})
    return chars


# str.translate table: a stand-in becomes the Latin-1 character of its byte; a character below 256 that
# stands for no byte becomes one Latin-1 cannot encode, so that such a token fails over to its own text.
_TO_LATIN1 = {ord(c): b for c, b in _byte_map().items()}
_TO_LATIN1 |= {b: 0x100 for b in range(256) if b not in _TO_LATIN1}


def _bytes_of(token: str) -> bytes:
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:  # as the decoder does: a string it cannot map passes as its own text
        return token.encode("utf-8")


class ByteTables(NamedTuple):
    """Per id below the tokenizer's vocabulary size (added tokens included): `token_bytes[i]`, and the
    text id i makes final when no incomplete character is held before it, where it leaves none held
    itself (None where its bytes end inside a character). That text is its bytes decoded, ill-formed
    bytes (a lone continuation byte) as U+FFFD, exactly what the incremental decode makes of them.
    `texts_skipping` is `texts` with the ids skip_special_tokens drops made ""."""

    token_bytes: list[bytes]
    texts: list[str | None]
    texts_skipping: list[str | None]


def byte_tables(backend: _Backend, skipped_specials: frozenset[int]) -> ByteTables | None:
    """The tables of `backend`, such that for every list of ids below its vocabulary size
    backend.decode(ids, skip_special_tokens=False) == b"".join(token_bytes[i] for i in ids).decode(
    "utf-8", "replace") (with skip_special_tokens: the same without `skipped_specials`). None when the
    decoder is not exactly the byte-level one (any other decoder, or a sequence of decoders, may change
    text in ways bytes cannot say) or a token fails the check below. Costs ~3 us per id, a third of it
    the check's batched decode of every id: ~0.4 s for 150k ids, once per tokenizer."""
    if type(backend.decoder) is not decoders.ByteLevel:
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    table = [b"" if token is None else _bytes_of(token) for token in map(backend.id_to_token, range(size))]
    # Check each id alone against the library's own decode: a token it treats otherwise than the
    # model above says (an added token's handling, a future change) disables the tables.
    decoded = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    texts: list[str | None] = []
    for i, (b, text) in enumerate(zip(table, decoded, strict=True)):
        if b.decode("utf-8", "replace") != text:
            logger.warning("byte-level decoder: id %d decodes to %r, not its bytes %r; text is made by the "
                           "library's incremental decoder instead", i, text, b)
            return None
        piece, used = utf_8_decode(b, "replace", False)  # as IncrementalDetokenizer decodes it, nothing held
        texts.append(piece if used == len(b) else None)
    skipping = list(texts)
    for i in skipped_specials:
        skipping[i] = ""
    return ByteTables(table, texts, skipping)
