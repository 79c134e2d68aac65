"""The engine's scheduling behaviour: prefix caching, eviction, preemption, sampling, options."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import CheckpointError

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


def test_prefix_hit_computes_only_the_remainder(path) -> None:
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=64)
    eng = llm.engine
    shared = prompts(eng.vocab_size, [12])[0]  # 3 full blocks
    first = shared + [5, 6]
    second = shared + [7, 8, 9]
    out1 = llm.generate([first], GREEDY)[0]
    before = eng.num_computed_tokens_total
    out2 = llm.generate([second], GREEDY)[0]
    computed = eng.num_computed_tokens_total - before
    # 3 prompt tokens beyond the cached 12, then 11 decode steps (the 12th token is not computed)
    assert out2.num_cached_tokens == 12
    assert computed == 3 + 11
    cold = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, enable_prefix_caching=False)
    assert cold.generate([second], GREEDY)[0].token_ids == out2.token_ids
    assert cold.generate([first], GREEDY)[0].token_ids == out1.token_ids
    assert eng.block_manager.num_free_blocks == 64


def test_eviction_under_pressure_keeps_outputs_right(path) -> None:
    small = LLM(path, device="cpu", block_size=4, num_kv_blocks=12, max_num_batched_tokens=32)
    big = LLM(path, device="cpu", block_size=4, num_kv_blocks=256, enable_prefix_caching=False)
    ps = prompts(small.engine.vocab_size, [20, 18, 20, 22], seed=1)
    ps.append(ps[0][:16] + [11, 12])  # shares a prefix with a long-evicted request
    for p in ps:  # one at a time: each evicts the previous one's cached blocks
        assert small.generate([p], GREEDY)[0].token_ids == big.generate([p], GREEDY)[0].token_ids
    assert small.engine.block_manager.num_free_blocks == 12


def test_preemption_completes_everything_with_the_same_output(path) -> None:
    ps = prompts(64, [30, 25, 33, 28, 31, 26], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    big = LLM(path, device="cpu", block_size=4, num_kv_blocks=512)
    tight = LLM(path, device="cpu", block_size=4, num_kv_blocks=30, max_num_batched_tokens=64)
    want = [o.token_ids for o in big.generate(ps, params)]
    got = [o.token_ids for o in tight.generate(ps, params)]
    assert got == want
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == 30


def test_seeded_sampling_reproduces_across_batch_compositions(path) -> None:
    llm = LLM(path, device="cpu", block_size=8, num_kv_blocks=128)
    ps = prompts(llm.engine.vocab_size, [7, 13, 9], seed=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([ps[0]], seeded)[0].token_ids
    other = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)
    mixed = llm.generate([ps[1], ps[0], ps[2]], [other, seeded, other])[1].token_ids
    assert alone == mixed
    assert llm.generate([ps[0]], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                                ignore_eos=True))[0].token_ids != alone


def test_top_k_never_leaves_the_allowed_set(path) -> None:
    llm = LLM(path, device="cpu", block_size=8, num_kv_blocks=128)
    p = prompts(llm.engine.vocab_size, [6], seed=4)[0]
    greedy = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=1))[0].token_ids
    outs = llm.generate([p] * 32, [SamplingParams(temperature=5.0, top_k=1, seed=i, max_tokens=1)
                                   for i in range(32)])
    assert {o.token_ids[0] for o in outs} == set(greedy)


def test_stop_strings_cut_exactly(path) -> None:
    llm = LLM(path, device="cpu", block_size=8, num_kv_blocks=128)
    p = prompts(llm.engine.vocab_size, [10], seed=5)[0]
    full = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    text = full.text
    assert len(text) > 8
    stop = text[5:8]
    cut = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert llm.engine.block_manager.num_free_blocks == 128


def test_logprobs_are_reported(path) -> None:
    llm = LLM(path, device="cpu", block_size=8, num_kv_blocks=64)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float64"}, "unknown dtype"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 12}, "power of two"),
        ({"device": "tpu"}, "unknown device"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ],
)
def test_bad_options_raise_clear_errors(path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(path, **kwargs)


def test_a_directory_that_is_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        LLM(tmp_path, device="cpu")


def test_unsupported_architecture_names_the_supported_ones(tmp_path, path) -> None:
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(bad, device="cpu")


def test_prompt_validation(path) -> None:
    llm = LLM(path, device="cpu", num_kv_blocks=8, block_size=4)  # 32 tokens of context
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**6]])
    with pytest.raises(ValueError, match="context"):
        llm.generate([list(range(3, 40))])
