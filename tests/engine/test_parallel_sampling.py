"""Parallel sampling: n choices from one prefill, sharing the prompt's blocks, exact under speculation."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.sampling.seeds import sibling_seed
from tests.spec_models import make_draft

OPTS = dict(device="cpu", block_size=4, num_kv_blocks=128, max_num_batched_tokens=32)
PROMPT = list(range(5, 23))  # 18 tokens: 4 full blocks and a partial one


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(path) -> LLM:
    return LLM(path, **OPTS)


def sampled(**kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 10, "ignore_eos": True, **kw})  # type: ignore[arg-type]


def test_seeded_choices_are_the_single_requests_of_their_derived_seeds(llm: LLM) -> None:
    outs = llm.generate([PROMPT], sampled(n=4, seed=7))
    assert [o.index for o in outs] == [0, 1, 2, 3]
    for o in outs:
        alone = llm.generate([PROMPT], sampled(seed=sibling_seed(7, o.index)))[0]
        assert o.token_ids == alone.token_ids and o.prompt_token_ids == PROMPT
    assert sibling_seed(7, 0) == 7 and len({tuple(o.token_ids) for o in outs}) == 4
    assert llm.engine.block_manager.num_free_blocks == 128


def test_one_prefill_then_shared_blocks_until_each_choice_writes(path) -> None:
    llm = LLM(path, enable_prefix_caching=False, **OPTS)
    eng = llm.engine
    eng.add_request("r", PROMPT, sampled(n=4, seed=1, max_tokens=6))
    step = eng.schedule()  # the whole prompt in one chunk
    assert step is not None and step.num_new_tokens == [18]
    outs = eng.process(step, eng.execute(step))
    assert [o.index for o in outs] == [0, 1, 2, 3] and all(len(o.new_token_ids) == 1 for o in outs)
    seqs = [o.seq for o in outs]
    assert all(s is not None and s.block_table == seqs[0].block_table for s in seqs)  # type: ignore[union-attr]
    table = seqs[0].block_table  # type: ignore[union-attr]
    assert [eng.block_manager.ref_count(b) for b in table] == [4] * 5
    assert eng.num_computed_tokens_total == 18  # one prefill for four choices
    step = eng.schedule()  # each choice writes position 18, inside the shared partial block
    assert step is not None and len(step.copies) == 3  # the last one to write keeps the original
    eng.process(step, eng.execute(step))
    assert [eng.block_manager.ref_count(b) for b in table[:4]] == [4] * 4
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_free_blocks == 128


def test_greedy_choices_are_identical_and_match_one_request(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, n=3))
    want = llm.generate([PROMPT], greedy)[0].token_ids
    assert [o.token_ids for o in outs] == [want] * 3


def test_aborting_some_choices_then_the_rest_frees_every_block(path) -> None:
    llm = LLM(path, **OPTS)
    eng = llm.engine
    eng.add_request("r", PROMPT, sampled(n=4, seed=3, max_tokens=30))
    for _ in range(4):
        eng.step()
    assert len(eng.scheduler.running) == 4
    assert [s.index for s in eng.abort("r", index=2)] == [2]
    assert sorted(s.index for s in eng.scheduler.running) == [0, 1, 3]
    eng.step()
    assert sorted(s.index for s in eng.abort("r")) == [0, 1, 3]
    assert not eng.has_unfinished() and eng.block_manager.num_free_blocks == 128


def test_choices_survive_preemption_with_the_same_tokens(path) -> None:
    big = LLM(path, **OPTS)
    tight = LLM(path, device="cpu", block_size=4, num_kv_blocks=16, max_num_batched_tokens=32)
    params = [sampled(n=3, seed=5, max_tokens=24), sampled(n=2, seed=6, max_tokens=24)]
    prompts = [PROMPT, list(range(30, 41))]
    want = [o.token_ids for o in big.generate(prompts, params)]
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert got == want and tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == 16


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_choices_are_exact_under_speculation(path, tmp_path, kind: str, llm: LLM) -> None:
    spec = {"speculative_method": "ngram"} if kind == "ngram" else {
        "speculative_model": str(make_draft(path, tmp_path / "draft", noise=0.05))}
    specd = LLM(path, speculative_adaptive=False, num_speculative_tokens=3, **spec, **OPTS)  # type: ignore[arg-type]
    prompt = [5, 9, 14, 3, 7] * 6  # repeats: n-gram lookups find something
    params = [SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True, n=4, seed=11),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, n=2)]
    want = [o.token_ids for o in llm.generate([prompt[:-3], prompt], params)]
    got = specd.generate([prompt[:-3], prompt], params)
    assert [o.token_ids for o in got] == want
    assert specd.engine.spec is not None and specd.engine.spec.metrics.num_draft_tokens > 0  # drafts were verified
    assert specd.engine.block_manager.num_free_blocks == 128


def test_priority_orders_the_waiting_queue(path) -> None:
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=128, max_num_batched_tokens=8, max_num_seqs=1)
    eng = llm.engine
    p = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for rid, prio in (("low", 5), ("mid", 0), ("high", -1), ("mid2", 0)):
        eng.add_request(rid, [7, 8, 9], p, priority=prio)
    assert [s.request_id for s in eng.scheduler.waiting] == ["high", "mid", "mid2", "low"]
    finished: list[str] = []
    while eng.has_unfinished():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["high", "mid", "mid2", "low"]


def test_preemption_takes_the_lowest_priority_not_the_newest(path) -> None:
    """The running batch is ordered by priority once two priorities meet in it: when the pool runs
    short, the sequence preempted is the newest of the lowest priority (here the older one)."""
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=8, max_num_batched_tokens=8, max_num_seqs=2)
    eng = llm.engine
    p = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    low = eng.add_request("low", [7, 8, 9], p, priority=5)
    eng.step()  # "low" runs alone first
    high = eng.add_request("high", [7, 8, 9], p, priority=0)
    while eng.has_unfinished():
        eng.step()
    assert low.num_preemptions > 0 and high.num_preemptions == 0
    assert eng.block_manager.num_free_blocks == 8
