"""A model vocabulary larger than the tokenizer's (Qwen2.5 ships 151,936 embedding rows for 151,665
tokens): the engine matches transformers, survives sampling ids the tokenizer lacks, and accepts them
in prompts up to the model's vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from tests.hf_reference import (
    assert_prompt_logits_match,
    assert_same_or_near_tie,
    hf_greedy,
    hf_model,
    random_prompts,
)

TOK_VOCAB, MODEL_VOCAB = 384, 512  # ids 384..511 have embedding rows but no tokens
MAX_NEW = 24


@pytest.fixture(params=["llama", "qwen2"])
def padded(request: pytest.FixtureRequest, tiny_model) -> Path:
    return tiny_model(request.param, vocab_size=TOK_VOCAB, model_vocab_size=MODEL_VOCAB)


def _llm(path: Path) -> LLM:
    return LLM(path, dtype="float32", device="cpu", block_size=8, max_num_batched_tokens=64, num_kv_blocks=256)


def test_logits_match_transformers_with_padded_ids_in_the_prompt(padded: Path) -> None:
    eng = _llm(padded).engine
    assert (eng.vocab_size, eng.tokenizer.vocab_size, eng.token_id_limit) == (MODEL_VOCAB, TOK_VOCAB, MODEL_VOCAB)
    prompts = random_prompts(MODEL_VOCAB, [3, 11, 20], seed=1)
    assert any(t >= TOK_VOCAB for p in prompts for t in p)
    logits = assert_prompt_logits_match(eng, padded, prompts)
    assert logits.shape[-1] == MODEL_VOCAB


def test_greedy_samples_padded_ids_with_text_and_matches_transformers(padded: Path) -> None:
    llm = _llm(padded)
    prompts = random_prompts(MODEL_VOCAB, [5, 9, 17, 30, 41], seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5))
    # Padded rows are random, so greedy decoding picks them: the case that killed a decode worker.
    assert sum(t >= TOK_VOCAB for o in outs for t in o.token_ids) >= 5
    assert any(t >= TOK_VOCAB for o in outs for lp in o.logprobs for t, _ in lp.top)
    for o in outs:
        assert o.finish_reason in ("length", "stop") and o.token_ids
        assert o.text == llm.tokenizer.decode(o.token_ids)  # the padded ids added nothing, took nothing
    assert sum(len(o.text) for o in outs) >= 20
    ref = hf_model(padded)
    for p, o in zip(prompts, outs, strict=True):
        assert_same_or_near_tie(ref, p, o.token_ids, hf_greedy(ref, p, MAX_NEW))
    assert llm.engine.block_manager.num_free_blocks == 256


def test_prompt_ids_are_valid_up_to_the_model_vocabulary(padded: Path) -> None:
    llm = _llm(padded)
    (out,) = llm.generate([[5, TOK_VOCAB, MODEL_VOCAB - 1]], SamplingParams(temperature=0.0, max_tokens=3))
    assert len(out.token_ids) == 3 or out.finish_reason == "stop"
    outside = rf"prompt token id {MODEL_VOCAB} is outside the vocabulary \[0, {MODEL_VOCAB}\)"
    with pytest.raises(ValueError, match=outside):
        llm.generate([[5, MODEL_VOCAB]])


def test_tokenizer_ids_past_the_model_are_refused_not_embedded(tiny_model, tmp_path: Path) -> None:
    """The other way round (a tokenizer larger than the model): the bound is still the larger vocabulary,
    as vLLM's, but an id the model has no embedding row for is refused, never looked up."""
    path = Path(shutil.copytree(tiny_model("llama", vocab_size=TOK_VOCAB, num_layers=1), tmp_path / "short"))
    rows = TOK_VOCAB - 24
    weights = load_file(path / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:rows].contiguous()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"vocab_size": rows}))
    llm = _llm(path)
    assert llm.engine.token_id_limit == TOK_VOCAB
    (out,) = llm.generate([[5, rows - 1]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3
    no_row = f"prompt token id {rows} has no embedding row: this model has {rows} rows, its tokenizer {TOK_VOCAB}"
    with pytest.raises(ValueError, match=no_row):
        llm.generate([[5, rows]])
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {TOK_VOCAB}\)"):
        llm.generate([[5, TOK_VOCAB]])
