"""Prompt logprobs: every prompt token's logprob, rank and top alternatives under the model, computed
in the prefill (chunked or not), checked against transformers on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_reference import hf_model, random_prompts

OPTS = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=128)


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(path):
    """log_softmax of transformers' logits at every position of the prompt, (P, V)."""
    model = hf_model(path)
    prompt = random_prompts(model.config.vocab_size, [37], seed=4)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return prompt, logits.log_softmax(dim=-1)


@pytest.mark.parametrize("budget", [64, 8, 5])  # whole prompt, chunks of 8, chunks that split blocks
def test_prompt_logprobs_match_transformers(path, reference, budget: int) -> None:
    prompt, logp = reference
    llm = LLM(path, max_num_batched_tokens=budget, **OPTS)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3))[0]
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(prompt) - 1
    for i, lp in enumerate(lps):  # entry i is prompt token i + 1, predicted at position i
        row = logp[i]
        assert lp.token_id == prompt[i + 1]
        assert lp.logprob == pytest.approx(float(row[prompt[i + 1]]), abs=1e-4)
        assert lp.rank == int((row > row[prompt[i + 1]]).sum()) + 1
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(path, reference) -> None:
    prompt, _ = reference
    llm = LLM(path, max_num_batched_tokens=64, **OPTS)
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None
    first = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0))[0]
    again = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0))[0]
    assert again.num_cached_tokens == 0 and len(again.prompt_logprobs or []) == len(prompt) - 1
    assert [(a.token_id, a.logprob, a.top) for a in again.prompt_logprobs or []] == \
        [(a.token_id, a.logprob, a.top) for a in first.prompt_logprobs or []]
    assert llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2))[0].num_cached_tokens == 36


def test_prompt_logprobs_survive_preemption_once_each_and_go_with_choice_zero(path, reference) -> None:
    prompt, logp = reference
    tight = LLM(path, device="cpu", dtype="float32", block_size=4, num_kv_blocks=24, max_num_batched_tokens=8)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=1, n=2),
              SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)]
    outs = tight.generate([prompt, prompt[:30][::-1]], params)
    assert tight.engine.scheduler.num_preemptions > 0
    lps = outs[0].prompt_logprobs
    assert lps is not None and [lp.token_id for lp in lps] == prompt[1:]
    assert [lp.logprob for lp in lps] == pytest.approx([float(logp[i, t]) for i, t in enumerate(prompt[1:])],
                                                       abs=1e-4)
    assert outs[1].prompt_logprobs is None and outs[2].prompt_logprobs is None
    assert tight.engine.block_manager.num_free_blocks == 24
