"""Speculative decoding: exact greedy and seeded output, the target's distribution, block accounting."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampling.sampler import Sampler
from engine.sequence import Sequence
from engine.spec.ngram import propose_ngram
from engine.spec.policy import SpecPolicy
from engine.spec.verify import verify
from tests.spec_models import make_draft

OPTS = dict(device="cpu", block_size=4, num_kv_blocks=128, max_num_batched_tokens=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def draft(target, tmp_path_factory) -> Path:
    """The target with noise on every weight: it agrees with the target some of the time."""
    return make_draft(target, tmp_path_factory.mktemp("draft"), noise=0.05)


def spec_options(kind: str, target: Path, draft: Path) -> dict[str, object]:
    return {"ngram": {"speculative_method": "ngram"}, "draft": {"speculative_model": str(draft)},
            "self": {"speculative_model": str(target)}}[kind]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    rand = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 45, 12, 70, 5)]
    return [[5, 9, 14, 3, 7] * 6, *rand]  # a repetitive prompt gives n-gram lookup something to find


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2(counts: dict[int, int], probs: dict[int, float], n: int) -> tuple[float, int]:
    """Pearson's statistic over outcomes, pooling those expected fewer than 5 times."""
    stat, df, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for tok in set(probs) | set(counts):
        exp, obs = probs.get(tok, 0.0) * n, counts.get(tok, 0)
        if exp < 5:
            pool_obs, pool_exp = pool_obs + obs, pool_exp + exp
            continue
        stat, df = stat + (obs - exp) ** 2 / exp, df + 1
    if pool_exp > 0:
        stat, df = stat + (pool_obs - pool_exp) ** 2 / pool_exp, df + 1
    return stat, df


# ------------------------------------------------------------------------ greedy identity
@pytest.mark.parametrize("kind", ["ngram", "draft", "self"])
def test_greedy_output_is_identical_in_mixed_batches(target, draft, kind) -> None:
    plain = LLM(target, **OPTS)
    ps = prompts(plain.engine.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = plain.generate([ps[2]], greedy)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # cut mid-output, wherever the tokens fall
    params = [greedy, greedy, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True),
              greedy, SamplingParams(temperature=0.0, max_tokens=1), SamplingParams(temperature=0.0, max_tokens=3)]
    want = plain.generate(ps, params)
    llm = LLM(target, **OPTS, num_speculative_tokens=3, speculative_adaptive=False,
              **spec_options(kind, target, draft))
    got = llm.generate(ps, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want] and got[2].finish_reason == "stop"
    stats = llm.engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats.get("draft_kv_blocks_free") == stats.get("draft_kv_blocks_total")
    assert stats["spec_steps"] > 0
    assert got[4].spec is not None and got[4].spec.num_spec_steps == 0  # max_tokens=1 never speculates
    if kind == "self":  # a draft that is the target agrees with it everywhere
        assert all(g.spec.num_accepted_tokens == g.spec.num_draft_tokens for g in got if g.spec)
        assert got[0].spec.acceptance_rate == 1.0 and got[0].spec.mean_accepted_length > 2
    if kind == "draft":
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_adaptive_greedy_is_identical_and_drops_a_useless_draft(target, tmp_path) -> None:
    bad = make_draft(target, tmp_path / "bad", noise=3.0)
    ps = prompts(1024)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    want = [o.token_ids for o in LLM(target, **OPTS).generate(ps, greedy)]
    llm = LLM(target, **OPTS, speculative_model=str(bad))
    assert [o.token_ids for o in llm.generate(ps, greedy)] == want
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] <= 0.2 * stats["spec_draft_tokens"]
    assert stats["spec_steps"] < 0.5 * 31 * len(ps)  # speculation mostly off once measured


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_seeded_sampling_reproduces_the_plain_engine(target, draft, kind) -> None:
    plain = LLM(target, **OPTS)
    ps = prompts(plain.engine.vocab_size)[:4]
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, presence_penalty=0.5, repetition_penalty=1.2,
                             seed=100 + i, max_tokens=16, min_tokens=4, ignore_eos=True, logprobs=2)
              for i in range(len(ps))]
    want = plain.generate(ps, params)
    llm = LLM(target, **OPTS, num_speculative_tokens=3, speculative_adaptive=False,
              **spec_options(kind, target, draft))
    got = llm.generate(ps, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want, strict=True):
        assert [lp.token_id for lp in g.logprobs] == g.token_ids
        torch.testing.assert_close([lp.logprob for lp in g.logprobs], [lp.logprob for lp in w.logprobs],
                                   atol=1e-4, rtol=0)  # extend vs decode forwards: float rounding only
    if kind == "draft":
        assert llm.engine.stats()["spec_accepted_tokens"] > 0


def test_rejection_sampling_follows_the_target_distribution() -> None:
    """The rule itself on a 6-token vocabulary: emitted tokens at depth 0, 1 and the bonus follow p."""
    torch.manual_seed(0)
    v, b, k = 6, 3000, 2
    p = torch.softmax(torch.randn(k + 1, v) * 1.5, dim=-1)  # (k+1, V) the target's rows
    q = torch.softmax(torch.randn(k, v) * 1.5, dim=-1)  # (k, V) the draft's
    gen = torch.Generator().manual_seed(1)
    drafts = torch.stack([torch.multinomial(q[j], b, replacement=True, generator=gen) for j in range(k)], 1)
    seqs = [Sequence(f"r{i}", [1, 2], SamplingParams(temperature=1.0, max_tokens=8)) for i in range(b)]
    logits = p.log().repeat(b, 1)  # (b * (k+1), V): probabilities() gives back p exactly
    verdict = verify(logits, seqs, drafts.tolist(), [q] * b, Sampler(seed=2), torch.Generator().manual_seed(3))
    tokens = verdict.out.token_ids.view(b, k + 1)
    accepted = torch.tensor(verdict.num_accepted)
    assert 0 < accepted.float().mean() < k
    for depth in range(k + 1):
        emitted = tokens[accepted >= depth, depth]  # sequences that reached this depth
        counts = dict(zip(*[t.tolist() for t in emitted.unique(return_counts=True)], strict=True))
        stat, df = chi2(counts, dict(enumerate(p[depth].tolist())), len(emitted))
        assert stat < chi2_critical(df), (depth, stat, df)


def test_sampled_tokens_through_the_engine_follow_the_target(target, draft) -> None:
    """Unseeded sampling with a draft: the first three tokens' joint law is the target's (top-3)."""
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)
    prompt = prompts(1024)[1][:9]
    plain = LLM(target, **OPTS)

    def next_probs(prefix: list[int]) -> dict[int, float]:
        out = plain.generate([prompt + prefix], SamplingParams(temperature=0.0, max_tokens=1, logprobs=3))[0]
        top = out.logprobs[0].top  # (token, logprob) of the 3 most likely, before truncation
        z = sum(math.exp(lp) for _, lp in top)
        return {t: math.exp(lp) / z for t, lp in top}

    joint: dict[tuple[int, ...], float] = {}
    for a, pa in next_probs([]).items():
        for b_, pb in next_probs([a]).items():
            for c, pc in next_probs([a, b_]).items():
                joint[(a, b_, c)] = pa * pb * pc
    n = 1500
    llm = LLM(target, **{**OPTS, "num_kv_blocks": 1024, "max_num_batched_tokens": 1024},
              speculative_model=str(draft), num_speculative_tokens=2, speculative_adaptive=False)
    outs = llm.generate([prompt] * n, params)
    index = {key: i for i, key in enumerate(joint)}
    counts: dict[int, int] = {}
    for o in outs:
        key = index.get(tuple(o.token_ids[:3]), -1)
        counts[key] = counts.get(key, 0) + 1
    stat, df = chi2(counts, {i: joint[key] for key, i in index.items()}, n)
    assert stat < chi2_critical(df), (stat, df)
    assert sum(o.spec.num_draft_tokens for o in outs) > 0 and 0 < sum(o.spec.num_accepted_tokens for o in outs)


# -------------------------------------------------------------------------- KV accounting
def test_blocks_are_exact_after_rollbacks_preemption_and_aborts(target, draft) -> None:
    ps = prompts(1024)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in LLM(target, **OPTS).generate(ps, greedy)]
    tight = LLM(target, device="cpu", block_size=4, num_kv_blocks=40, max_num_batched_tokens=64,
                speculative_model=str(draft), num_speculative_tokens=4, speculative_adaptive=False)
    eng = tight.engine
    assert [o.token_ids for o in tight.generate(ps, greedy)] == want
    assert eng.scheduler.num_preemptions > 0 and eng.stats()["spec_draft_tokens"] > eng.stats()["spec_accepted_tokens"]
    # rolled-back blocks were never named: the prefix cache now serves the same prompts correctly
    assert [o.token_ids for o in tight.generate(ps, greedy)] == want
    for i, p in enumerate(ps):
        eng.add_request(f"a{i}", p, greedy)
    for _ in range(6):
        eng.step()
    eng.abort("a1")
    eng.abort("a4")
    while eng.has_unfinished():
        eng.step()
    stats = eng.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 40
    assert stats["draft_kv_blocks_free"] == stats["draft_kv_blocks_total"]
    assert eng.spec is not None and eng.spec.draft is not None and eng.spec.draft.num_mirrors == 0


# ------------------------------------------------------------------------- parts, options
def test_ngram_lookup() -> None:
    assert propose_ngram([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == [4, 5, 9]
    assert propose_ngram([7, 1, 2, 8, 1, 2, 9, 4, 1, 2], 2) == [9, 4]  # the latest occurrence wins
    assert propose_ngram([1, 2, 3, 1, 2, 3, 1, 2], 5) == [3, 1, 2]  # overlapping its own suffix
    assert propose_ngram([5, 6, 7, 8], 4) == []
    assert propose_ngram([4, 4], 3) == [] and propose_ngram([4, 4], 3, min_n=1) == [4]


def test_policy_speculates_when_cheap_and_stops_when_compute_bound() -> None:
    flat = SpecPolicy(max_batched_tokens=2048, adaptive=True, has_draft_model=False)
    flat.target_cost.observe(1, 0.010)
    flat.target_cost.observe(5, 0.0105)  # memory-bound: 5 rows cost what 1 does
    assert flat.choose([4], [0.7], 1, 1) == [4]
    bound = SpecPolicy(max_batched_tokens=2048, adaptive=True, has_draft_model=False)
    for tokens in (32, 64, 96, 128, 160):
        bound.target_cost.observe(tokens, 0.020 + 0.001 * tokens)  # compute-bound: time grows with tokens
    assert bound.choose([4] * 32, [0.5] * 32, 32, 32) == [0] * 32
    assert bound.choose([4] * 32, [0.98] * 32, 32, 32) != [0] * 32  # near-certain drafts still pay
    # probes, when speculation is off: every sequence's next n-gram draft; a draft model's: one
    # sequence, every draft it may take
    for has_draft_model, probed, deepest in ((False, 32, 1), (True, 4, 4)):
        off = SpecPolicy(max_batched_tokens=2048, adaptive=True, has_draft_model=has_draft_model, probe_every=4)
        for tokens in (32, 64, 96, 128, 160):
            off.target_cost.observe(tokens, 0.020 + 0.001 * tokens)
        off.draft_cost.observe(32, 0.02)
        picks = [off.choose([4] * 32, [0.5] * 32, 32, 32) for _ in range(20)]
        # steps 4, 8, 16: each probe that finds speculation off doubles the interval
        assert {i + 1: sum(p) for i, p in enumerate(picks) if sum(p)} == {4: probed, 8: probed, 16: probed}
        assert max(picks[3]) == deepest
        # while off, the next steps may skip choosing (probes and a change of candidates may not)
        assert [off.skip(32) for _ in range(9)] == [True] * 8 + [False]  # a fresh choice every 8 steps
        assert off.choose([4] * 32, [0.5] * 32, 32, 32) == [0] * 32
        assert off.skip(32) and not off.skip(31)
        off._off = None
        assert not off.skip(32)
    # a draft-model probe that kept most of its drafts stops the back-off where drafting was
    # predicted to break even; one that did not, or far from paying, does not
    off.probe_outcome(4, 3)
    assert off._probe_interval == 32  # compute-bound: far from paying
    off._best_ratio = 1.05  # within the margin
    off.probe_outcome(4, 1)
    assert off._probe_interval == 32
    off.probe_outcome(4, 3)
    assert off._probe_interval == 4
    capped = SpecPolicy(max_batched_tokens=40, adaptive=False, has_draft_model=False)
    assert sum(capped.choose([4] * 32, [0.9] * 32, 32, 32)) == 8  # the verify forward fits the budget


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"speculative_method": "ngram", "speculative_model": "x"}, "not both"),
    ({"speculative_method": "eagle"}, "speculative_method must be one of ngram"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be in \[1, 16\]"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 17}, r"in \[1, 16\]"),
    ({"num_speculative_tokens": 3}, "needs speculative_model or speculative_method"),
])
def test_bad_speculation_options(target, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(target, device="cpu", num_kv_blocks=16, **kwargs)


def test_a_draft_with_another_vocabulary_is_refused(target, tmp_path) -> None:
    small = tmp_path / "small"
    shutil.copytree(target, small)
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 512}))
    with pytest.raises(ValueError, match="vocabulary of 512 tokens but the target"):
        LLM(target, device="cpu", num_kv_blocks=16, speculative_model=str(small))
    other = tmp_path / "other"
    shutil.copytree(target, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different tokenizer"):
        LLM(target, device="cpu", num_kv_blocks=16, speculative_model=str(other))


def test_cost_curve_outvotes_one_slow_measurement_of_a_rare_size() -> None:
    cost = SpecPolicy(max_batched_tokens=2048, adaptive=True, has_draft_model=True).target_cost
    for _ in range(50):
        cost.observe(1, 0.005)  # the size measured every step
    cost.observe(2, 0.012)  # once, while the machine was busy
    for _ in range(8):
        cost.observe(5, 0.006)  # a larger size, measured a few times since
    low, two, five = cost.predict(np.array([1, 2, 5]))
    # nondecreasing, the outlier pooled with the larger size and outvoted (not copied up the curve)
    assert low == pytest.approx(0.005) and low <= two == five < 0.007
