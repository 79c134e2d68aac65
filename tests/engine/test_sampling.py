"""SamplingParams validation and the batched sampler: truncation, seeds, penalties, logprobs."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from engine.sampling.batch import SamplingBatch
from engine.sampling.params import MAX_LOGPROBS, MAX_STOP_LEN, MAX_STOP_STRINGS, SamplingParams
from engine.sampling.sampler import Sampler, penalized_logits, probabilities

NAN, INF = float("nan"), float("inf")
CPU = torch.device("cpu")


def make_batch(
    params: Sequence[SamplingParams],
    vocab: int,
    outputs: Sequence[Sequence[int]] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    eos: frozenset[int] | Sequence[frozenset[int]] = frozenset(),
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, prompts or [[]] * n, outputs or [[]] * n, eos, CPU, vocab)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale  # (B, V)


# ---------------------------------------------------------------- SamplingParams validation

BAD = [
    ("temperature", -0.5, ">= 0"),
    ("temperature", NAN, "finite"),
    ("temperature", INF, "finite"),
    ("temperature", "1.0", "number"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_p", NAN, "finite"),
    ("top_k", -2, ">= 1"),
    ("top_k", 2.5, "integer"),
    ("top_k", True, "integer"),
    ("min_p", -0.1, "[0, 1]"),
    ("min_p", 1.01, "[0, 1]"),
    ("min_p", NAN, "finite"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("repetition_penalty", NAN, "finite"),
    ("repetition_penalty", INF, "finite"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("presence_penalty", NAN, "finite"),
    ("frequency_penalty", -3.0, "[-2, 2]"),
    ("frequency_penalty", -INF, "finite"),
    ("seed", -1, "[0, 2**63)"),
    ("seed", 2**63, "[0, 2**63)"),
    ("seed", 1.0, "integer"),
    ("max_tokens", 0, ">= 1"),
    ("min_tokens", -1, "[0, max_tokens=16]"),
    ("min_tokens", 17, "[0, max_tokens=16]"),
    ("logprobs", -1, "[0, 20]"),
    ("logprobs", MAX_LOGPROBS + 1, "[0, 20]"),
    ("stop_token_ids", [-1], "non-negative"),
    ("stop_token_ids", ["2"], "non-negative"),
    ("stop_token_ids", "12", "list of token ids"),
    ("ignore_eos", "yes", "true or false"),
    ("skip_special_tokens", 1, "true or false"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_value_names_field_value_and_range(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    message = str(err.value)
    shown = value[0] if isinstance(value, list) else value  # a list names its bad element
    assert field in message and allowed in message and repr(shown) in message, message


@pytest.mark.parametrize(
    ("stop", "fragment"),
    [
        (["x"] * (MAX_STOP_STRINGS + 1), "at most 16"),
        ([""], "1 to 256"),
        (["y" * (MAX_STOP_LEN + 1)], "got 257"),
        ([3], "must be strings"),
        (3, "string or a list"),
        (b"ab", "string or a list"),
        (("a", 3), "must be strings"),
    ],
)
def test_bad_stop_strings(stop: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="stop") as err:
        SamplingParams(stop=stop)  # type: ignore[arg-type]
    assert fragment in str(err.value)


def test_edge_values_are_accepted_and_normalised() -> None:
    p = SamplingParams(
        temperature=0,
        top_p=1,
        top_k=-1,
        min_p=1,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=2**63 - 1,
        max_tokens=3,
        min_tokens=3,
        stop=["z" * MAX_STOP_LEN] * MAX_STOP_STRINGS,
        stop_token_ids=[5, 0],
        logprobs=MAX_LOGPROBS,
    )
    assert p.top_k == 0 and isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert isinstance(p.stop, tuple) and len(p.stop) == MAX_STOP_STRINGS
    assert p.stop_token_ids == (5, 0)
    assert SamplingParams(stop_token_ids=range(2), stop=("a", "b")).stop_token_ids == (0, 1)
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(seed=0, logprobs=0).logprobs == 0
    assert hash(p) == hash(dataclasses.replace(p))  # frozen and hashable: usable as a cache key
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]


def test_properties() -> None:
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
    assert not SamplingParams().needs_penalties and not SamplingParams().needs_history
    assert SamplingParams(presence_penalty=0.5).needs_penalties
    assert not SamplingParams(frequency_penalty=0.5).needs_history
    rep = SamplingParams(repetition_penalty=1.3)
    assert rep.needs_penalties and rep.needs_history


# ---------------------------------------------------------------- greedy and seeds


def test_greedy_rows_take_argmax_and_probabilities_are_one_hot() -> None:
    logits = random_logits(6, 40)
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=0.7, top_k=5)] * 3
    batch = make_batch(params, 40)
    out = Sampler(seed=1)(logits, batch)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (6,)
    assert torch.equal(out.token_ids[:3], logits[:3].argmax(-1))
    probs = probabilities(logits, batch)  # (B, V)
    assert torch.equal(probs[:3], torch.nn.functional.one_hot(logits[:3].argmax(-1), 40).float())
    all_greedy = make_batch([SamplingParams(temperature=0.0)] * 6, 40)
    assert torch.equal(Sampler()(logits, all_greedy).token_ids, logits.argmax(-1))


def seeded_tokens(
    batches: int, position: int, sampler: Sampler, neighbours: list[SamplingParams]
) -> list[int]:
    """Draw 20 steps for one seeded request placed at `position` among `neighbours`."""
    vocab = 64
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    tokens: list[int] = []
    for step in range(batches):
        logits = random_logits(len(neighbours) + 1, vocab, seed=100 + step)  # (B, V)
        own = random_logits(1, vocab, seed=step)[0]  # the target's logits do not change
        logits[position] = own
        params = neighbours[:position] + [target] + neighbours[position:]
        outputs = [[1] * (step + i % 3) for i in range(len(params))]
        outputs[position] = tokens
        out = sampler(logits, make_batch(params, vocab, outputs=outputs))
        tokens.append(int(out.token_ids[position]))
    return tokens


def test_seeded_rows_reproduce_across_batch_composition_and_position() -> None:
    others = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=7, top_k=3),
        SamplingParams(min_p=0.2, repetition_penalty=1.2),
    ]
    alone = seeded_tokens(20, 0, Sampler(seed=1), [])
    assert len(set(alone)) > 3  # the seed mixes in the step: not one token repeated
    assert seeded_tokens(20, 2, Sampler(seed=2), others) == alone
    assert seeded_tokens(20, 4, Sampler(), others) == alone
    assert seeded_tokens(20, 0, Sampler(), others[::-1]) == alone


def test_seeded_rows_reproduce_in_another_process() -> None:
    script = (
        "import torch\n"
        "from engine.sampling.batch import SamplingBatch\n"
        "from engine.sampling.params import SamplingParams\n"
        "from engine.sampling.sampler import Sampler\n"
        "logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3\n"
        "p = [SamplingParams(seed=s, top_k=20) for s in (11, 12, 13)]\n"
        "b = SamplingBatch.build(p, [[]] * 3, [[0] * 5] * 3, frozenset(), 'cpu', 50)\n"
        "print(Sampler()(logits, b).token_ids.tolist())\n"
    )
    here = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    logits = random_logits(3, 50)
    batch = make_batch([SamplingParams(seed=s, top_k=20) for s in (11, 12, 13)], 50, outputs=[[0] * 5] * 3)
    assert here.stdout.strip() == str(Sampler()(logits, batch).token_ids.tolist())


def test_unseeded_rows_differ_across_calls_and_follow_the_sampler_seed() -> None:
    logits = torch.zeros(16, 1000)  # uniform: 16 equal draws twice would be a 1e-48 event
    batch = make_batch([SamplingParams()] * 16, 1000)
    sampler = Sampler()
    assert not torch.equal(sampler(logits, batch).token_ids, sampler(logits, batch).token_ids)
    assert torch.equal(Sampler(seed=5)(logits, batch).token_ids, Sampler(seed=5)(logits, batch).token_ids)


# ---------------------------------------------------------------- truncation


def expected_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Reference for one row (V,): temperature, top-k, top-p, min-p, written out token by token."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[: p.top_k] if p.top_k > 0 else order
    total = sum(probs[i] for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:
        if mass >= p.top_p and p.top_p < 1.0:
            break
        nucleus.append(i)
        mass += probs[i] / total
    top = probs[nucleus[0]]
    final = [i for i in nucleus if probs[i] >= p.min_p * top]
    out = torch.zeros(len(probs), dtype=torch.float64)
    for i in final:
        out[i] = probs[i]
    return out / out.sum()


TRUNCATIONS = [
    SamplingParams(top_k=5),
    SamplingParams(top_p=0.6, temperature=0.8),
    SamplingParams(min_p=0.3, temperature=1.3),
    SamplingParams(top_k=8, top_p=0.9, min_p=0.05, temperature=0.7),
    SamplingParams(top_k=1, temperature=2.0),
]


@pytest.mark.parametrize(
    "params", TRUNCATIONS, ids=lambda p: f"k{p.top_k}-p{p.top_p}-m{p.min_p}-t{p.temperature}"
)
def test_truncation_keeps_the_allowed_set_and_matches_the_distribution(params: SamplingParams) -> None:
    vocab, draws = 30, 20000
    row = random_logits(1, vocab, seed=3, scale=1.5)[0]  # (V,)
    expected = expected_distribution(row, params)  # (V,)
    # Mixed with untruncated rows so the vectorised per-row thresholds are exercised.
    batch_params = [params, SamplingParams(), SamplingParams(temperature=0.0)]
    logits = row.expand(len(batch_params), vocab).contiguous()
    batch = make_batch(batch_params, vocab)
    torch.testing.assert_close(probabilities(logits, batch)[0].double(), expected, rtol=1e-5, atol=1e-7)

    many = make_batch([params] * draws, vocab)
    tokens = Sampler(seed=42)(row.expand(draws, vocab), many).token_ids  # (draws,)
    allowed = expected > 0
    assert allowed[tokens].all(), "drew a token outside the allowed set"
    observed = torch.bincount(tokens, minlength=vocab).double()[allowed]
    want = expected[allowed] * draws
    chi2 = float(((observed - want) ** 2 / want).sum())
    df = max(int(allowed.sum()) - 1, 1)
    # Wilson-Hilferty 99.9% quantile of chi-square(df); fixed seeds make the test deterministic.
    bound = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < bound, (chi2, bound)


def test_per_row_top_k_in_one_batch() -> None:
    vocab = 50
    logits = random_logits(1, vocab, seed=9)[0].expand(4, vocab).contiguous()  # (4, V)
    params = [SamplingParams(top_k=k) for k in (1, 2, 10, 0)]
    probs = probabilities(logits, make_batch(params, vocab))  # (4, V)
    assert (probs > 0).sum(-1).tolist() == [1, 2, 10, vocab]
    ranked = logits[0].argsort(descending=True)
    for row, k in enumerate((1, 2, 10)):
        assert set(probs[row].nonzero().flatten().tolist()) == set(ranked[:k].tolist())


def test_top_k_keeps_tokens_tied_with_the_kth() -> None:
    logits = torch.tensor([[5.0, 3.0, 3.0, 1.0, 3.0, 0.0]])
    probs = probabilities(logits, make_batch([SamplingParams(top_k=2)], 6))  # (1, V)
    assert (probs[0] > 0).tolist() == [True, True, True, False, True, False]


def test_a_rows_distribution_has_the_same_bits_whatever_its_neighbours() -> None:
    vocab = 300
    row = random_logits(1, vocab, seed=8)[0]  # (V,)
    targets = [SamplingParams(top_k=40, min_p=0.05), SamplingParams(top_k=60, top_p=0.8, temperature=0.6)]
    neighbours = [
        [],
        [SamplingParams(top_p=0.7)],  # forces a full sort instead of a top-W
        [SamplingParams(temperature=0.0), SamplingParams(top_k=200, repetition_penalty=1.3)],
    ]
    for target in targets:
        seen = []
        for others in neighbours:
            params = [*others, target]
            logits = random_logits(len(params), vocab, seed=len(params))
            logits[-1] = row
            seen.append(probabilities(logits, make_batch(params, vocab, outputs=[[1, 2]] * len(params)))[-1])
        assert all(torch.equal(seen[0], other) for other in seen[1:])


# ---------------------------------------------------------------- penalties and min_tokens


def test_repetition_penalty_matches_transformers() -> None:
    vocab, penalty = 40, 1.7
    logits = random_logits(3, vocab, seed=4)  # (B, V), both signs
    prompts = [[1, 2, 3, 3, 39], [5, 6, 45], [7, 8, 9]]  # 45 is outside the vocabulary: ignored
    outputs = [[4, 1, 20], [6, 30, 31], [10, 11]]
    params = [SamplingParams(repetition_penalty=penalty)] * 3
    ours = penalized_logits(logits, make_batch(params, vocab, outputs=outputs, prompts=prompts))
    processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for row in range(3):
        ids = torch.tensor([prompts[row] + outputs[row]])
        theirs = processor(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], theirs, rtol=0, atol=0)


def test_frequency_and_presence_follow_the_openai_formula() -> None:
    vocab = 20
    logits = random_logits(2, vocab, seed=5)  # (B, V)
    outputs = [[3, 3, 3, 7, 12], [0]]
    prompts = [[1, 2, 5], [4]]
    params = [SamplingParams(frequency_penalty=0.4, presence_penalty=-1.1), SamplingParams()]
    ours = penalized_logits(logits, make_batch(params, vocab, outputs=outputs, prompts=prompts))
    expected = logits.clone()
    for token in set(outputs[0]):
        count = outputs[0].count(token)
        expected[0, token] -= count * 0.4 + 1.0 * -1.1
    torch.testing.assert_close(ours, expected)  # prompt tokens and the unpenalised row untouched
    assert not torch.equal(ours[0, 3], logits[0, 3])


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    vocab, eos, stop = 12, 11, 4
    logits = torch.zeros(4, vocab)
    logits[:, eos], logits[:, stop] = 10.0, 9.0  # EOS first, the stop id second, by far
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop], logprobs=0),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True),
        SamplingParams(min_tokens=3, stop_token_ids=[stop]),
        SamplingParams(temperature=0.0, min_tokens=3),
    ]  # logprobs=0 on one row: the sampler computes logprobs only when some row asks
    outputs = [[0, 0], [0, 0], [0], [0, 0, 0]]
    batch = make_batch(params, vocab, outputs=outputs, eos=[frozenset({eos})] * 4)  # per-row sets
    out = Sampler(seed=0)(logits, batch)
    probs = probabilities(logits, batch)  # (B, V)
    assert out.token_ids[0] not in (eos, stop) and out.token_ids[2] not in (eos, stop)
    assert int(out.token_ids[1]) == eos  # ignore_eos: EOS is not banned, the stop id is
    assert probs[1, stop] == 0 and probs[2, eos] == 0 and probs[2, stop] == 0
    assert int(out.token_ids[3]) == eos  # min_tokens reached
    assert out.logprobs is not None and torch.isfinite(out.logprobs).all()


# ---------------------------------------------------------------- logprobs and inputs


def test_logprobs_are_log_softmax_of_penalised_logits_with_sorted_top() -> None:
    vocab = 64
    logits = random_logits(3, vocab, seed=6).to(torch.bfloat16)  # upcast inside
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=5, repetition_penalty=1.5),
        SamplingParams(logprobs=2),
        SamplingParams(temperature=0.0),
    ]
    batch = make_batch(params, vocab, outputs=[[1, 2], [3], []], prompts=[[4], [], []])
    out = Sampler(seed=3)(logits, batch)
    want = penalized_logits(logits, batch).log_softmax(-1)  # (B, V): no temperature, no top-k
    assert out.logprobs.dtype == torch.float32 and out.top_logprobs is not None and out.top_ids is not None
    torch.testing.assert_close(out.logprobs, want.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == (3, 5)
    torch.testing.assert_close(out.top_logprobs, want.gather(1, out.top_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.top_ids[:, 0], want.argmax(-1))
    assert Sampler()(logits, make_batch([SamplingParams()] * 3, vocab)).top_ids is None


def test_logits_are_not_modified_and_mismatches_raise() -> None:
    logits = random_logits(2, 10)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=2.0, min_tokens=1), SamplingParams()]
    batch = make_batch(params, 10, outputs=[[1], []], eos=frozenset({0}))
    Sampler()(logits, batch)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="shape"):
        Sampler()(random_logits(3, 10), batch)
    with pytest.raises(ValueError, match="rows"):
        make_batch(params, 10, eos=[frozenset()])
    with pytest.raises(ValueError, match="1 prompts"):
        SamplingBatch.build(params, [[]], [[], []], frozenset(), CPU, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_distribution_and_reproduces_seeds() -> None:
    params = [SamplingParams(top_k=7, top_p=0.8, seed=3, repetition_penalty=1.2), SamplingParams(min_p=0.1)]
    logits = random_logits(2, 128)
    args = (params, [[1, 2]] * 2, [[3]] * 2, frozenset({0}))
    cpu_batch = SamplingBatch.build(*args, "cpu", 128)
    gpu_batch = SamplingBatch.build(*args, "cuda", 128)
    torch.testing.assert_close(
        probabilities(logits.cuda(), gpu_batch).cpu(), probabilities(logits, cpu_batch)
    )
    first = Sampler()(logits.cuda(), gpu_batch).token_ids[0]
    assert Sampler()(logits.cuda(), gpu_batch).token_ids[0] == first


def test_no_log_softmax_without_a_row_asking_for_logprobs() -> None:
    logits = torch.randn(3, 16)
    quiet = make_batch([SamplingParams(temperature=0.0), SamplingParams(seed=1), SamplingParams()], 16)
    out = Sampler(seed=0)(logits, quiet)
    assert out.logprobs is None and out.top_ids is None
    asks = make_batch([SamplingParams(temperature=0.0), SamplingParams(seed=1), SamplingParams(logprobs=0)], 16)
    both = Sampler(seed=0)(logits, asks)
    assert torch.equal(both.token_ids, out.token_ids)  # the same draw either way
    assert both.logprobs is not None and both.logprobs.shape == (3,)
