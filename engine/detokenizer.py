"""Incremental detokenization: token ids in, final text out, with stop strings cut exactly.

Byte-level BPE tokenizers (the decoder is GPT-2's `ByteLevel`: Llama 3, Qwen2/3, SmolLM2, GGUF "gpt2";
`Tokenizer.byte_tables`) decode by table: a token's text is its bytes, appended to the bytes of an
incomplete character held from earlier tokens, and everything but a trailing incomplete character is
final (`codecs.utf_8_decode` with final=False: ill-formed bytes become U+FFFD at once, as decode()
makes them). A token whose bytes are whole UTF-8, with nothing held, is one list look-up (its text).
Such a decoder has no leading-space rules, so the prompt gives no context.

Other decoders (SentencePiece-style Metaspace, byte fallback, ...): decoding one token at a time is
wrong where a character can span tokens or the decoder looks at neighbours (leading-space rules). So
each step decodes a short window of ids twice and emits the difference:

    ids:   ... p p p p r r r n        p = prefix_offset .. read_offset (already emitted, context only)
                 ^prefix  ^read       r = read_offset .. end (not yet emitted), n = the new token
    emitted += decode(ids[prefix:]) - decode(ids[prefix:read])

Nothing is emitted while the window's text ends in U+FFFD (an incomplete UTF-8 character); then both
offsets move forward. The tokenizers library runs exactly this window in Rust (`DecodeStream`, one
call per token, ~8x cheaper than two `decode` calls from Python): `Tokenizer.decode_stream`.

Either way, emitted text then passes a stop-string filter: a tail that could still grow into a stop
string is held back, and on a match the stop string and everything after it are dropped. Ids that
decode() drops before its decoder (`Tokenizer.is_skipped`: ids past the tokenizer's vocabulary, which
a model with padded embedding rows can sample, and special tokens when they are skipped) yield no
text, and never enter `ids` above: they cannot change any text, and keeping them would grow the window
by one id per token for as long as a run of them lasts (quadratic work over the run).
"""

from __future__ import annotations

import logging
from codecs import utf_8_decode
from collections.abc import Sequence

from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Prompt tokens decoded as context before the first output token, so its leading space is right.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens.

    Contract: without a stop match, the concatenation of every `step()` result and `flush()` equals
    `tokenizer.decode(output_ids, skip_special_tokens)` for byte-level BPE tokenizers, whatever the
    prompt; decoders that strip a sequence's leading space (SentencePiece-style) keep it here, as the
    prompt context implies. No returned piece carries U+FFFD for a character that later tokens
    complete. With stop strings, the returned text is that decode cut just before (with
    include_stop: just after) the stop string that completes first in the token stream (among
    several completing on the same token, the one starting earliest; then the first listed);
    `stop_reason` names it and `finished` becomes True.
    Ids the tokenizer lacks (>= its vocab_size) yield no text and never raise. The ids decoded per
    token are bounded by the text's shape (a character's tokens, the context), not by the length of a
    run of skipped ids.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop: bool = False,
    ) -> None:
        """Raises ValueError if `stop` contains an empty string. `include_stop`: the text ends with the
        stop string that matched instead of just before it."""
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop
        self._vocab_size = tokenizer.vocab_size
        self._skipped_ids = tokenizer.skipped_ids(skip_special_tokens)  # `_skipped`: these and ids >= _vocab_size
        tables = tokenizer.byte_tables
        self._texts = None if tables is None else tables.texts_skipping if skip_special_tokens else tables.texts
        self._bytes = None if tables is None else tables.token_bytes
        self._held = b""  # (byte-level) the bytes of an incomplete character, held for the next tokens
        # (other decoders) the stream's context and the ids it has not turned into text yet
        self._ids: list[int] = [] if tables is not None else self._context(prompt_token_ids)
        self._read_offset = len(self._ids)  # _ids[read_offset:] are held by the stream (no text yet)
        self._stream = None if tables is not None else tokenizer.decode_stream(self._ids, skip_special_tokens)
        self._num_output = 0
        self._pending = ""  # decoded text held back because it may begin a stop string
        self._pieces: list[str] = []  # `text`, as returned
        self.stop_reason: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        """The text returned so far."""
        return "".join(self._pieces)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens consumed; after a stop match, the token that completed it is the last."""
        return self._num_output

    def _skipped(self, token_id: int) -> bool:
        return self._tokenizer.is_skipped(token_id, self._skip_special)

    def _context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The prompt's last few ids that take part in decoding (see the module docstring), whose text
        is whole: a context that ends inside a character (a prompt of raw ids can) would let the stream
        hand back prompt text with the first output token, so its tail is dropped until it is whole."""
        context = [int(t) for t in prompt_token_ids[-4 * _CONTEXT_TOKENS:] if not self._skipped(int(t))]
        context = context[-_CONTEXT_TOKENS:]
        while context and self._tokenizer.decode(context, self._skip_special).endswith(_REPLACEMENT):
            context.pop()
        return context

    def _decode_new(self, token_id: int) -> str:
        """Text made final by `token_id` ("" while it ends in an incomplete character)."""
        if token_id < 0:
            raise ValueError(f"token ids must be >= 0, got {token_id}")
        if self._bytes is not None:
            # The longest prefix that no later byte can change: only a trailing incomplete character is
            # held back (an ill-formed byte is final at once, as U+FFFD, exactly as decode() makes it).
            held = self._held + self._bytes[token_id]
            piece, used = utf_8_decode(held, "replace", False)
            self._held = held[used:]
            return piece
        assert self._stream is not None
        text = self._stream(token_id)
        self._ids.append(token_id)
        if text is None:
            return ""
        del self._ids[: len(self._ids) - _CONTEXT_TOKENS]  # keep a little context for flush()
        self._read_offset = len(self._ids)
        return text

    def _filter_stops(self, new_text: str) -> str:
        """Add `new_text` to the held-back text and return what is now known to precede any stop."""
        pending = self._pending + new_text
        if not self._stop:
            return pending
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = pending.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            self.stop_reason, self.finished, self._pending = best[1], True, ""
            return pending[: best[0] + (len(best[1]) if self._include_stop else 0)]
        # Hold back the longest tail that is a proper prefix of some stop string.
        hold = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:n]):
                    hold = n
                    break
        self._pending = pending[len(pending) - hold:]
        return pending[: len(pending) - hold]

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Consume output tokens and return the text that became final. Tokens after a stop match
        (even within this call) are not consumed. Raises RuntimeError once finished, ValueError for a
        negative id."""
        if self.finished:
            raise RuntimeError("step() after the detokenizer finished (a stop string matched or flush() ran)")
        if len(new_token_ids) == 1 and not self._stop:  # a decode step's token, no stop to look for
            return self.next_token(int(new_token_ids[0]))
        out: list[str] = []
        for new_id in new_token_ids:
            # One token at a time, so a stop completes at the same token however calls group tokens.
            token_id = int(new_id)
            self._num_output += 1
            if token_id >= self._vocab_size or token_id in self._skipped_ids:
                continue  # no text, so no stop string can complete here
            text = self._decode_new(token_id)
            out.append(self._filter_stops(text) if self._stop else text)
            if self.finished:
                break
        piece = "".join(out)
        if piece:
            self._pieces.append(piece)
        return piece

    def next_token(self, token_id: int) -> str:
        """`step((token_id,))` for a detokenizer without stop strings, not finished (the caller checks
        both: the text maker's plain decode rows); the text `token_id` made final."""
        self._num_output += 1
        texts = self._texts
        if texts is not None and not self._held and 0 <= token_id < self._vocab_size:
            piece = texts[token_id]  # None: the token's bytes are part of a character
            if piece is not None:
                if piece:
                    self._pieces.append(piece)
                return piece
        if token_id >= self._vocab_size or token_id in self._skipped_ids:
            return ""
        piece = self._decode_new(token_id)
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """End of the sequence: return the text still held back (a trailing incomplete character
        decodes to U+FFFD) and mark the detokenizer finished. Returns "" after a stop match."""
        if self.finished:
            return ""
        tail = ""
        if self._held:
            tail = utf_8_decode(self._held, "replace", True)[0]
            self._held = b""
        elif self._read_offset < len(self._ids):  # ids held for an incomplete character: it decodes to U+FFFD
            skip, context = self._skip_special, self._ids[: self._read_offset]
            tail = self._tokenizer.decode(self._ids, skip)[len(self._tokenizer.decode(context, skip)):]
        self._read_offset = len(self._ids)
        piece = self._filter_stops(tail)
        piece += self._pending  # nothing more can complete a stop string
        self._pending = ""
        self.finished = True
        if piece:
            self._pieces.append(piece)
        return piece
