"""logit_bias, allowed_token_ids, bad_words and include_stop_str_in_output: validation, the sampler's
distribution, the engine's outputs, and exactness under speculative decoding (the target's
verification distribution is biased too)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampling.bad_words import bad_word_ids, banned_now
from engine.sampling.batch import SamplingBatch
from engine.sampling.sampler import Sampler, probabilities
from engine.sampling.seeds import sibling_seed
from tests.spec_models import make_draft

CPU = torch.device("cpu")
OPTS = dict(device="cpu", block_size=4, num_kv_blocks=128, max_num_batched_tokens=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize(("kw", "says"), [
    ({"logit_bias": {5: 101}}, "[-100, 100]"),
    ({"logit_bias": {"x": 1}}, "token ids"),
    ({"logit_bias": {5: float("nan")}}, "finite"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, "at most 1024"),
    ({"allowed_token_ids": []}, "must not be empty"),
    ({"allowed_token_ids": [-1]}, "non-negative"),
    ({"bad_words": [""]}, "1 to 256"),
    ({"bad_words": ["w"] * 65}, "at most 64"),
    ({"n": 0}, "[1, 128]"),
    ({"n": 129}, "[1, 128]"),
    ({"prompt_logprobs": 21}, "[0, 20]"),
    ({"include_stop_str_in_output": 1}, "true or false"),
])
def test_bad_values_are_refused_naming_the_field(kw: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        SamplingParams(**kw)  # type: ignore[arg-type]
    name = next(iter(kw))
    assert str(err.value).startswith(name) and says in str(err.value)


def test_logit_bias_normalises_and_checks_the_vocabulary() -> None:
    p = SamplingParams(logit_bias={"7": 2, 3: -1.5})
    assert p.logit_bias == ((3, -1.5), (7, 2.0))
    p.check_vocab(8)
    with pytest.raises(ValueError, match="logit_bias names token id 7, outside the vocabulary"):
        p.check_vocab(7)
    with pytest.raises(ValueError, match="allowed_token_ids names token id 9"):
        SamplingParams(allowed_token_ids=[1, 9]).check_vocab(9)


def test_choice_seeds_are_derived_and_documented() -> None:
    p = SamplingParams(n=3, seed=42)
    assert [p.for_choice(i).seed for i in range(3)] == [42, sibling_seed(42, 1), sibling_seed(42, 2)]
    assert all(p.for_choice(i).n == 1 for i in range(3)) and SamplingParams(n=2).for_choice(1).seed is None
    assert len({sibling_seed(42, i) for i in range(100)}) == 100 and all(0 <= sibling_seed(42, i) < 2**63
                                                                           for i in range(100))


def test_the_distribution_is_biased_restricted_and_banned_exactly() -> None:
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))  # (B, V)
    params = [SamplingParams(logit_bias={2: 1.5, 4: -100}), SamplingParams(allowed_token_ids=[1, 6, 7]),
              SamplingParams(bad_words=())]
    batch = SamplingBatch.build(params, [[]] * 3, [[], [], [3, 8]], frozenset(), CPU, 10,
                                bad_words=[(), (), ((8, 5), (9,))])
    p = probabilities(logits, batch)
    want0 = logits[0].clone()
    want0[2] += 1.5
    want0[4] -= 100
    torch.testing.assert_close(p[0], want0.softmax(-1))
    assert set(p[1].nonzero().flatten().tolist()) == {1, 6, 7}
    torch.testing.assert_close(p[1][[1, 6, 7]], logits[1][[1, 6, 7]].softmax(-1))
    assert p[2][5] == 0 and p[2][9] == 0 and p[2][8] > 0  # 8 then 5 completes a word; 9 always banned
    draws = Sampler(seed=0)(logits.repeat(200, 1), SamplingBatch.build(
        [params[1]] * 600, [[]] * 600, [[]] * 600, frozenset(), CPU, 10)).token_ids
    assert set(draws.tolist()) <= {1, 6, 7}


def test_bad_words_ban_the_last_token_after_the_rest(path) -> None:
    assert banned_now([1, 2, 3], [(3, 4), (2, 9), (7,)]) == {4, 7}
    llm = LLM(path, **OPTS)
    tok = llm.tokenizer
    assert bad_word_ids(tok, ["return"]) == tuple(dict.fromkeys(
        (tuple(tok.encode("return", add_special_tokens=False)), tuple(tok.encode(" return", add_special_tokens=False)))))
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompt = [5, 9, 14, 3, 7] * 4
    out = llm.generate([prompt], greedy)[0]
    # two tokens the model emits greedily whose text tokenizes back to them (a word as a user writes it)
    i, word = next((i, w) for i in range(len(out.token_ids) - 1)
                   if tuple(out.token_ids[i:i + 2]) in bad_word_ids(tok, [w := tok.decode(out.token_ids[i:i + 2]).strip()]))
    banned = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                    bad_words=[word]))[0]
    for w in bad_word_ids(tok, [word]):
        seq = banned.token_ids
        assert not any(tuple(seq[i:i + len(w)]) == w for i in range(len(seq) - len(w) + 1))
    assert banned.token_ids[:i + 1] == out.token_ids[:i + 1] and banned.token_ids[i + 1] != out.token_ids[i + 1]


def test_engine_outputs_follow_bias_and_allowed_ids(path) -> None:
    llm = LLM(path, **OPTS)
    prompt = list(range(10, 30))
    forced = llm.generate([prompt], SamplingParams(temperature=1.0, seed=1, max_tokens=6, ignore_eos=True,
                                                    logit_bias={77: 100}))[0]
    assert forced.token_ids == [77] * 6
    allowed = llm.generate([prompt], SamplingParams(temperature=1.5, seed=2, max_tokens=30, ignore_eos=True,
                                                     allowed_token_ids=[40, 41, 42]))[0]
    assert set(allowed.token_ids) <= {40, 41, 42} and len(set(allowed.token_ids)) > 1


def test_include_stop_str_in_output_keeps_the_stop_string(path) -> None:
    llm = LLM(path, **OPTS)
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = llm.generate([[5, 9, 14, 3, 7] * 4], SamplingParams(**greedy))[0].text  # type: ignore[arg-type]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = llm.generate([[5, 9, 14, 3, 7] * 4], SamplingParams(stop=[stop], **greedy))[0]  # type: ignore[arg-type]
    kept = llm.generate([[5, 9, 14, 3, 7] * 4], SamplingParams(stop=[stop], include_stop_str_in_output=True,
                                                               **greedy))[0]  # type: ignore[arg-type]
    assert cut.finish_reason == kept.finish_reason == "stop" and cut.token_ids == kept.token_ids
    assert kept.text == cut.text + stop and text.startswith(kept.text)


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_bias_and_bans_are_exact_under_speculation(path, tmp_path, kind: str) -> None:
    plain = LLM(path, **OPTS)
    spec = {"speculative_method": "ngram"} if kind == "ngram" else {
        "speculative_model": str(make_draft(path, tmp_path / "draft", noise=0.05))}
    specd = LLM(path, num_speculative_tokens=3, speculative_adaptive=False, **spec, **OPTS)  # type: ignore[arg-type]
    prompt = [5, 9, 14, 3, 7] * 6
    greedy = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].token_ids
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias={greedy[4]: -100}),
              SamplingParams(temperature=0.9, seed=3, max_tokens=16, ignore_eos=True, n=2,
                             logit_bias={greedy[1]: 3.0, greedy[2]: -5.0}, bad_words=[" x"]),
              SamplingParams(temperature=0.7, seed=4, max_tokens=16, ignore_eos=True,
                             allowed_token_ids=sorted(set(greedy)))]
    want = plain.generate([prompt] * 3, params)
    got = specd.generate([prompt] * 3, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert greedy[4] not in got[0].token_ids and set(got[-1].token_ids) <= set(greedy)
    assert specd.engine.spec is not None and specd.engine.spec.metrics.num_draft_tokens > 0
