"""engine.Tokenizer gives exactly what transformers.AutoTokenizer gives on the tiny checkpoints."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from engine.checkpoint import CheckpointError
from engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "mistral", "qwen2", "qwen3")

TEXTS = [
    "", " ", "  ", "\n", "\t\t", "Hello, world!", " leading space", "trailing space ", "a  b   c    d",
    "x = 12345 + 678.9e-3  # comment", "def f(a, *, b=None) -> int:\n    return a ** 2\n\n\n",
    "Ångström e\u0301 café naïve", "日本語のテキスト、句読点。", "Привет, мир", "مرحبا بالعالم",
    "emoji 😀👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧", "zero\u200bwidth and\u00a0nbsp", "tabs\tand\r\nCRLF\r\n",
    "<s>start</s> inside <unk>", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<s><s></s>",
    "{\"json\": [1, 2, {\"k\": null}]}", "x" * 300, "\\u00e9 \\n not escapes", "'s 're 've 'll 'd I'M",
    "ﬁ ligature ①②③ ＡＢＣ fullwidth", "\U0001f9d1\u200d\U0001f4bb coder",
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = list("abcXYZ019 _.,;:(){}[]<>/\\\"'\n\t") + [
        "  ", "é", "ß", "中", "ん", "😀", "🏽", "\u0301", "\u200d",
        "<s>", "</s>", "<|im_end|>", "<|endoftext|>", "def ", "\r\n",
    ]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def pairs(tiny_model) -> dict[str, tuple[Tokenizer, object]]:
    """For each arch: (ours, transformers') loaded from the same tiny checkpoint."""
    return {a: (Tokenizer.from_dir(tiny_model(a)), transformers.AutoTokenizer.from_pretrained(tiny_model(a)))
            for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_transformers(pairs, arch: str) -> None:
    ours, ref = pairs[arch]
    for text in TEXTS + _random_texts(150, seed=1):
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_of_arbitrary_ids_matches_transformers(pairs, arch: str) -> None:
    """Random ids split multi-byte characters and scatter special tokens."""
    ours, ref = pairs[arch]
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 20))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    with pytest.raises(ValueError, match=">= 0"):
        ours.decode([5, -1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ids_past_the_vocabulary_decode_to_nothing_as_in_transformers(tiny_model, arch: str) -> None:
    """A model padded past its tokenizer (Qwen: 151,936 rows, 151,665 tokens) samples ids the tokenizer
    lacks; they decode to no text, never an error, exactly as transformers decodes them."""
    path = tiny_model(arch, vocab_size=384, model_vocab_size=512)
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size == len(ref) == 384
    text = ours.encode("def f(): 🦊", add_special_tokens=False)
    assert ours.decode([400, *text, 511, 384, 2**40]) == ours.decode(text) == "def f(): 🦊"
    assert ours.decode([384]) == ours.decode([10**9], skip_special_tokens=False) == ""
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(512) for _ in range(rng.randint(1, 20))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
            # what is_skipped names really has no say in the text, wherever it stands
            kept = [i for i in ids if not ours.is_skipped(i, skip)]
            assert ours.decode(kept, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip)
    specials = sorted(ours.all_special_ids)
    assert all(ours.is_skipped(i) and not ours.is_skipped(i, skip_special_tokens=False) for i in specials)
    assert ours.is_skipped(384, skip_special_tokens=False) and not ours.is_skipped(100)


def test_prompt_id_limit_is_the_larger_vocabulary(tiny_model) -> None:
    tok = Tokenizer.from_dir(tiny_model("qwen2", vocab_size=384, model_vocab_size=512))
    assert tok.token_id_limit(512) == 512  # the model's padded rows are valid prompt ids
    assert tok.token_id_limit(300) == 384  # a tokenizer past the model (vLLM takes the larger too)


def test_special_ids_and_vocab(pairs) -> None:
    llama, llama_ref = pairs["llama"]
    assert llama.bos_token_id == 1 and llama.eos_token_ids == frozenset({2})
    assert llama.encode("hi")[0] == 1 and llama.encode("hi", add_special_tokens=False)[0] != 1
    qwen, qwen_ref = pairs["qwen2"]
    assert qwen.bos_token_id is None
    assert qwen.eos_token_ids == {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")}
    for ours, ref in (pairs["llama"], pairs["qwen2"]):
        assert ours.vocab_size == len(ref)
        assert set(ref.all_special_ids) <= ours.all_special_ids
        assert all(ours.decode([i]) == "" for i in ours.all_special_ids)
        assert [ours.id_to_token(i) for i in range(0, ours.vocab_size, 7)] == \
            ref.convert_ids_to_tokens(list(range(0, ours.vocab_size, 7)))
    assert llama.id_to_token(10**6) is None


def _edit_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_tokenizer_config_variants_match_transformers(
    tmp_path: Path, tiny_model, caplog: pytest.LogCaptureFixture
) -> None:
    src = tiny_model("llama")
    as_dict = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False,
               "normalized": False, "single_word": False}
    variants = {
        "no_bos": {"add_bos_token": False},
        "bos_and_eos": {"add_bos_token": True, "add_eos_token": True},
        "dict_tokens": {"eos_token": as_dict, "bos_token": {"__type": "AddedToken", "content": "<s>"}},
    }
    for name, changes in variants.items():
        path = _edit_config(src, tmp_path / name, **changes)
        ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
        for text in ["hello world", "</s> x <s>", ""]:
            assert ours.encode(text) == ref.encode(text), (name, text)
    # transformers 5 ignores add_bos/eos_token beside a tokenizer.json; we do too, but say so.
    caplog.clear()
    assert Tokenizer.from_dir(tmp_path / "no_bos").encode("hi")[0] == 1
    assert "add_bos_token=False" in caplog.text and "add_eos_token" not in caplog.text
    caplog.clear()
    assert Tokenizer.from_dir(tmp_path / "bos_and_eos").encode("hi")[-1] != 2
    assert "add_eos_token=True" in caplog.text and "add_bos_token" not in caplog.text
    assert Tokenizer.from_dir(tmp_path / "dict_tokens").eos_token_ids == frozenset({2})


def test_eos_ids_come_from_generation_config_then_config(tmp_path: Path, tiny_model) -> None:
    path = shutil.copytree(tiny_model("llama"), tmp_path / "eos")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert Tokenizer.from_dir(path).eos_token_ids == frozenset({2, 5, 6})  # + tokenizer_config's </s>
    (path / "generation_config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"eos_token_id": [2, 7]}))
    assert Tokenizer.from_dir(path).eos_token_ids == frozenset({2, 7})


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 😀 × 2?"}],
    [{"role": "user", "content": "  spaced\nlines  "}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chat_template_matches_transformers(pairs, arch: str) -> None:
    ours, ref = pairs[arch]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    qwen_prompt = ours.apply_chat_template(CONVERSATIONS[0])
    if arch == "qwen3":
        assert qwen_prompt.endswith("<|im_start|>assistant\n") and "\n\n" not in qwen_prompt
    with pytest.raises(ValueError, match="messages"):
        ours.apply_chat_template([{"content": "no role"}])


def test_chat_template_errors_and_filters(tmp_path: Path, tiny_model) -> None:
    llama = Tokenizer.from_dir(tiny_model("llama"))
    with pytest.raises(ValueError, match="Unknown role: tool"):
        llama.apply_chat_template([{"role": "tool", "content": "x"}])
    template = "{{ messages | tojson }}{{ raise_exception('stop') if messages|length > 1 }}"
    path = _edit_config(tiny_model("llama"), tmp_path / "tojson", chat_template=template)
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "é \"quoted\""}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(ValueError, match="stop"):
        ours.apply_chat_template(msgs * 2)
    (path / "chat_template.jinja").write_text("from file: {{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(path).apply_chat_template(msgs) == "from file: é \"quoted\""
    bare = shutil.copytree(tiny_model("llama"), tmp_path / "bare")
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(bare).apply_chat_template(msgs)


def test_missing_tokenizer_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{tmp_path} has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
