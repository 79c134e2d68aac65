"""The engine against Hugging Face transformers on tiny random checkpoints, float32 on CPU."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_reference import (
    assert_prompt_logits_match,
    assert_same_or_near_tie,
    hf_greedy,
    hf_model,
    random_prompts,
)

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENGTHS = [1, 5, 9, 17, 23, 31, 40, 57]  # block size 6 divides none of them
MAX_NEW = 24


def prompts_for(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    return random_prompts(vocab, lengths, seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_with_small_chunks(tiny_model, arch: str) -> None:
    path = tiny_model(arch)
    llm = LLM(path, dtype="float32", device="cpu", block_size=8, max_num_batched_tokens=7, num_kv_blocks=256)
    prompts = prompts_for(llm.engine.vocab_size)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    ref_model = hf_model(path)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_same_or_near_tie(ref_model, prompt, out.token_ids, hf_greedy(ref_model, prompt, MAX_NEW))
    assert llm.engine.block_manager.num_free_blocks == 256


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_forward_logits_match(tiny_model, arch: str) -> None:
    path = tiny_model(arch)
    llm = LLM(path, dtype="float32", device="cpu", block_size=8, num_kv_blocks=64)
    eng = llm.engine
    prompts = prompts_for(eng.vocab_size, [3, 11, 20])
    assert_prompt_logits_match(eng, path, prompts)


def test_llama3_rope_scaling_and_tied_embeddings(tiny_model) -> None:
    from training.tiny import llama3_rope_scaling

    path = tiny_model("llama", tie_word_embeddings=True, rope_scaling=llama3_rope_scaling(64, 8.0),
                      max_position_embeddings=512)
    llm = LLM(path, dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=64, num_kv_blocks=128)
    prompts = prompts_for(llm.engine.vocab_size, [70, 130], seed=3)  # past the original 64 positions
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    ref_model = hf_model(path)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_same_or_near_tie(ref_model, prompt, out.token_ids, hf_greedy(ref_model, prompt, 12))


def test_sharded_checkpoint_loads_identically(tiny_model) -> None:
    single = LLM(tiny_model("qwen2"), dtype="float32", device="cpu", num_kv_blocks=32)
    sharded = LLM(tiny_model("qwen2", num_shards=3), dtype="float32", device="cpu", num_kv_blocks=32)
    for (n, a), (_, b) in zip(single.engine.runner.model.state_dict().items(),
                              sharded.engine.runner.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
