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


@pytest.fixture(scope="module")
def toks(tiny_model) -> dict[str, Tokenizer]:
    return {arch: Tokenizer.from_dir(tiny_model(arch)) for arch in ("llama", "qwen2")}


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
