"""Speculative decoding on the decode worker: same greedy tokens through the stack, blocks all free."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from engine import LLM, SamplingParams
from tests.e2e.conftest import generate, stub, wait_all_blocks_free
from tests.hf_reference import random_prompts
from tests.spec_models import make_draft

MAX_NEW = 24


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_speculating_decode_worker_gives_the_same_greedy_tokens(make_stack, stack_model, tmp_path, kind) -> None:
    if kind == "ngram":
        spec = ["--speculative-method", "ngram", "--num-speculative-tokens", "3"]
    else:  # the decode worker builds the draft's KV of each prompt itself (a draft prefill)
        spec = ["--speculative-model", str(make_draft(stack_model, tmp_path / "draft", noise=0.05)),
                "--num-speculative-tokens", "3"]
    stack = make_stack(stack_model, decode_args=spec)
    prompts = [[5, 9, 14, 3, 7] * 8, *random_prompts(512, [3, 17, 40, 66], seed=5)]
    maxes = [MAX_NEW, MAX_NEW, 1, MAX_NEW, 2]  # max_tokens 1 and 2 never speculate: a mixed batch
    s = stub(stack)
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda pm: generate(s, pm[0], temperature=0.0, max_tokens=pm[1], ignore_eos=True)[0],
                            zip(prompts, maxes, strict=True)))
    llm = LLM(stack_model, device="cpu", dtype="float32", block_size=8, num_kv_blocks=512)
    want = [o.token_ids for o in llm.generate(
        prompts, [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in maxes])]
    assert got == want
    wait_all_blocks_free(stack)
    assert "speculative decoding: " in stack.decode[0].log_path.read_text()  # the flags reached the engine
    assert "speculative decoding: " not in stack.prefill[0].log_path.read_text()  # prefill workers ignore them
