"""IncrementalDetokenizer: streamed text equals a full decode; stop strings cut exactly."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

SAMPLE = "The quick brown fox 🦊 jumps over the lazy dog. 日本語 café naïve 👨‍👩‍👧 done.\n\tdef f(): pass"


class _NoTables(Tokenizer):
    """The same tokenizer without byte tables: its text is made by the library's DecodeStream."""

    byte_tables = None  # type: ignore[assignment]


# Every test of a byte-level tokenizer runs on both paths: its byte tables and the DecodeStream.
PATHS = {"table": Tokenizer, "stream": _NoTables}


@pytest.fixture(scope="module", params=list(PATHS))
def toks(tiny_model, request) -> dict[str, Tokenizer]:
    return {arch: PATHS[request.param].from_dir(tiny_model(arch)) for arch in ("llama", "qwen2")}


def _stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random
) -> tuple[list[str], str]:
    """Feed `ids` in random-sized groups; return the pieces and flush()'s result."""
    pieces, i = [], 0
    while i < len(ids) and not detok.finished:
        n = rng.randint(1, 3)
        pieces.append(detok.step(ids[i:i + n]))
        i += n
    return pieces, detok.flush()


def _random_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Token ids that often split multi-byte characters: slices of encoded text, byte tokens, specials."""
    if rng.random() < 0.5:
        ids = tok.encode(SAMPLE, add_special_tokens=False)
        start = rng.randrange(len(ids))
        return ids[start:start + rng.randint(1, 30)]
    return [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_stream_equals_full_decode(toks, arch: str, skip_special: bool) -> None:
    tok = toks[arch]
    rng = random.Random(f"{arch}{skip_special}")
    prompt = tok.encode("Once upon a time,")
    for _ in range(300):
        ids = _random_ids(tok, rng)
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
        pieces, tail = _stream(detok, ids, rng)
        full = tok.decode(ids, skip_special_tokens=skip_special)
        assert "".join(pieces) + tail == full == detok.text
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces + [tail])
        assert detok.finished and detok.stop_reason is None and detok.num_output_tokens == len(ids)


def test_split_character_is_held_until_complete(toks) -> None:
    tok = toks["llama"]
    ids = tok.encode("🦊", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens in a tiny vocabulary
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.step([i]) for i in ids] == [""] * (len(ids) - 1) + ["🦊"]
    assert detok.flush() == ""
    # Output ending mid-character: flush releases the replacement character, as decode() gives.
    detok = IncrementalDetokenizer(tok, [])
    assert detok.step(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1]) and "\ufffd" in detok.text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_prompt_ending_inside_a_character_adds_none_of_its_text(toks, arch: str) -> None:
    """Prompts of raw token ids can stop in the middle of a character: the output's text is still
    exactly decode(output), never a piece of the prompt (the stream's context is cut to whole text)."""
    tok = toks[arch]
    fox = tok.encode("ab 🦊", add_special_tokens=False)
    rng = random.Random(arch)
    for cut in range(1, len(fox)):
        for _ in range(20):
            ids = _random_ids(tok, rng)
            detok = IncrementalDetokenizer(tok, fox[:cut])
            pieces, tail = _stream(detok, ids, rng)
            assert "".join(pieces) + tail == tok.decode(ids) == detok.text


def test_prompt_context_keeps_leading_space(tmp_path: Path) -> None:
    """SentencePiece-style decoders drop a sequence's leading space; mid-text it must stay."""
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"], show_progress=False)
    raw.train_from_iterator(["The quick brown fox jumps over the lazy dog"] * 3, trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("The quick brown fox jumps over")
    split = next(k for k in range(len(ids)) if tok.decode(ids[:k]) == "The quick")
    assert tok.decode(ids[split:]) == "brown fox jumps over"  # alone, the space is stripped
    detok = IncrementalDetokenizer(tok, ids[:split])
    assert "".join(detok.step([i]) for i in ids[split:]) + detok.flush() == " brown fox jumps over"


def _stop_run(tok: Tokenizer, text: str, stop: Sequence[str], group: int = 1) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tok, tok.encode("prompt:"), stop=stop)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [detok.step(ids[i:i + group]) for i in range(0, len(ids), group) if not detok.finished]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text
    return detok


def test_stop_string_spanning_tokens_is_cut_exactly(toks) -> None:
    tok = toks["llama"]
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    stop = "k brown f"
    assert not any(stop in tok.decode([i]) for i in ids)  # it really spans tokens
    for group in (1, 2, 5):
        detok = _stop_run(tok, SAMPLE, [stop], group)
        assert detok.text == "The quic" and detok.stop_reason == stop and detok.finished
        assert tok.decode(ids[: detok.num_output_tokens]).startswith("The quick brown f")
    with pytest.raises(RuntimeError):
        detok.step([5])


def test_earliest_stop_wins(toks) -> None:
    tok = toks["qwen2"]
    detok = _stop_run(tok, SAMPLE, ["lazy", "fox", "quick"])
    assert (detok.text, detok.stop_reason) == ("The ", "quick")
    # "own" completes before "brown fox" does, though the latter starts earlier.
    detok = _stop_run(tok, SAMPLE, ["brown fox", "own"])
    assert (detok.text, detok.stop_reason) == ("The quick br", "own")
    # Both complete on the same token: the one starting earliest.
    detok = _stop_run(tok, "ab", ["b", "ab"], group=10)
    assert (detok.text, detok.stop_reason) == ("", "ab")


def test_possible_stop_prefix_is_held_then_released(toks) -> None:
    tok = toks["llama"]
    detok = IncrementalDetokenizer(tok, [], stop=["dog!"])
    ids = tok.encode("the lazy dog", add_special_tokens=False)
    streamed = "".join(detok.step([i]) for i in ids)
    assert streamed == "the lazy " and detok.text == "the lazy "
    assert detok.flush() == "dog" and detok.text == "the lazy dog" and detok.stop_reason is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_random_stop_strings_cut_at_first_occurrence(toks, arch: str) -> None:
    tok = toks[arch]
    rng = random.Random(arch)
    checked = 0
    for _ in range(200):
        ids = _random_ids(tok, rng)
        full = tok.decode(ids)
        start = rng.randrange(len(full)) if full else 0
        stop = full[start:start + rng.randint(1, 6)]
        if not stop or "\ufffd" in stop:
            continue
        detok = IncrementalDetokenizer(tok, [], stop=[stop])
        pieces, tail = _stream(detok, ids, rng)
        expected = full[: full.find(stop)]
        assert "".join(pieces) + tail == expected == detok.text, (full, stop)
        assert detok.stop_reason == stop
        assert not any(stop in p for p in pieces)
        checked += 1
    assert checked > 150


def test_empty_stop_string_is_rejected(toks) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(toks["llama"], [], stop=["ok", ""])


# --- ids the tokenizer lacks (a model's padded vocabulary) and runs of skipped ids -----------------

TOK_VOCAB, MODEL_VOCAB = 384, 512  # the model samples ids 384..511, which the tokenizer lacks


@pytest.fixture(scope="module", params=list(PATHS))
def padded(tiny_model, request) -> dict[str, Tokenizer]:
    toks = {a: PATHS[request.param].from_dir(tiny_model(a, vocab_size=TOK_VOCAB, model_vocab_size=MODEL_VOCAB))
            for a in ("llama", "qwen2")}
    assert all(t.vocab_size == TOK_VOCAB for t in toks.values())
    return toks


def _with_padded_ids(ids: Sequence[int], rng: random.Random) -> list[int]:
    """`ids` with runs of 0..3 ids past the tokenizer's vocabulary before each one."""
    out: list[int] = []
    for i in ids:
        out += [rng.randrange(TOK_VOCAB, MODEL_VOCAB) for _ in range(rng.randint(0, 3))] + [i]
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_ids_past_the_vocabulary_stream_no_text_and_never_raise(padded, arch: str, skip_special: bool) -> None:
    tok = padded[arch]
    rng = random.Random(f"padded{arch}{skip_special}")
    for _ in range(200):
        prompt = _with_padded_ids(tok.encode("Once upon a time,"), rng)  # prompts may hold them too
        ids = _with_padded_ids(_random_ids(tok, rng), rng)
        ids += [rng.randrange(TOK_VOCAB, MODEL_VOCAB)] * rng.randint(0, 3)  # may end in a run of them
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
        pieces, tail = _stream(detok, ids, rng)
        full = tok.decode(ids, skip_special_tokens=skip_special)
        assert full == tok.decode([i for i in ids if i < TOK_VOCAB], skip_special_tokens=skip_special)
        assert "".join(pieces) + tail == full == detok.text
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces + [tail])
        assert detok.num_output_tokens == len(ids)


def test_character_split_by_padded_ids_is_held_until_complete(padded) -> None:
    tok = padded["llama"]
    ids = tok.encode("🦊", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [])
    stream = [ids[0], 400, 511, *ids[1:-1], 384, ids[-1], 450]
    assert "".join(detok.step([i]) for i in stream[:-2]) == ""
    assert detok.step([ids[-1]]) == "🦊" and detok.step([450]) == "" and detok.flush() == ""
    assert detok.num_output_tokens == len(stream)


@pytest.mark.parametrize("group", [1, 3])
def test_stop_string_across_padded_ids_is_cut_exactly(padded, group: int) -> None:
    tok = padded["qwen2"]
    ids = _with_padded_ids(tok.encode(SAMPLE, add_special_tokens=False), random.Random(group))
    detok = IncrementalDetokenizer(tok, tok.encode("prompt:"), stop=["k brown f"])
    pieces = [detok.step(ids[i:i + group]) for i in range(0, len(ids), group) if not detok.finished]
    assert "".join(pieces) == detok.text == "The quic" and detok.stop_reason == "k brown f"
    # the token that completed the stop string is the last one consumed, padded ids counted
    n = detok.num_output_tokens
    assert "k brown f" in tok.decode(ids[:n]) and "k brown f" not in tok.decode(ids[:n - 1])


class _CountingTokenizer(Tokenizer):
    """The real tokenizer, recording how many ids each decode() call is asked to decode."""

    calls: list[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        return super().decode(ids, skip_special_tokens)


class _CountingNoTables(_CountingTokenizer):
    byte_tables = None  # type: ignore[assignment]


@pytest.mark.parametrize("counting", [_CountingTokenizer, _CountingNoTables])
@pytest.mark.parametrize("skip_special", [True, False])
def test_runs_of_skipped_ids_keep_the_decode_window_bounded(tiny_model, counting: type[_CountingTokenizer],
                                                            skip_special: bool) -> None:
    """Long runs of special tokens (when skipped) and of ids past the vocabulary cost O(1) ids per
    token: the window decoded each step stays short, where it used to grow by one id per token."""
    tok = counting.from_dir(tiny_model("qwen2", vocab_size=TOK_VOCAB, model_vocab_size=MODEL_VOCAB))
    tok.calls = []
    special = tok.token_to_id("<|im_start|>")
    assert special is not None and special in tok.all_special_ids
    text = tok.encode(SAMPLE, add_special_tokens=False)
    ids = text[:10] + [special] * 300 + list(range(TOK_VOCAB, MODEL_VOCAB)) * 2 + text[10:]
    detok = IncrementalDetokenizer(tok, tok.encode("prompt:"), skip_special_tokens=skip_special)
    per_token = []
    for i in ids:
        before = sum(tok.calls)
        detok.step([i])
        per_token.append(sum(tok.calls) - before)
    detok.flush()
    assert detok.text == tok.decode(ids, skip_special_tokens=skip_special)
    assert max(per_token) <= 24, max(per_token)  # two decodes of a few context and unread ids
    # skipped ids (specials too, when skip_special_tokens) cost no decoding at all
    assert sum(per_token) <= 12 * sum(not tok.is_skipped(i, skip_special) for i in ids)
