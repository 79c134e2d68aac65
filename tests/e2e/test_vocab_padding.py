"""A checkpoint whose model vocabulary is larger than its tokenizer (Qwen2.5: 151,936 rows, 151,665
tokens) through the whole stack. Sampling an id the tokenizer lacks once killed a decode worker's engine
thread; prompt ids in [tokenizer size, model vocabulary) were refused though the model has rows for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cli.launcher import Stack
from engine import LLM, SamplingParams
from engine.tokenizer import Tokenizer
from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import ENGINE_ARGS, generate, stub, wait_all_blocks_free
from tests.hf_reference import assert_same_or_near_tie, hf_greedy, hf_model, random_prompts

TOK_VOCAB, MODEL_VOCAB = 384, 512  # ids 384..511 have rows in the model but no token
MAX_NEW = 20


@pytest.fixture(scope="module")
def padded_model(tiny_model) -> Path:
    return tiny_model("qwen2", vocab_size=TOK_VOCAB, model_vocab_size=MODEL_VOCAB)


@pytest.fixture(scope="module")
def stack(padded_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One prefill and one decode worker (every request's KV crosses ZeroMQ) on the padded checkpoint."""
    s = Stack(padded_model, engine_args=ENGINE_ARGS, gateway_args=["--local-prefill-threshold", "0"],
              workdir=tmp_path_factory.mktemp("padded-stack"))
    s.start()
    yield s
    s.stop()


def test_concurrent_streams_sampling_padded_ids_finish_and_free_every_block(
        stack: Stack, padded_model: Path) -> None:
    prompts = random_prompts(MODEL_VOCAB, [5, 9, 14, 17, 22, 29, 33, 41, 47, 60], seed=7)
    prompts[0] = [5, TOK_VOCAB, MODEL_VOCAB - 1, 7]  # the bound's both ends, past the tokenizer
    assert sum(t >= TOK_VOCAB for p in prompts for t in p) >= 10
    s = stub(stack)
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(
            lambda p: generate(s, p, temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), prompts))
    got = [ids for ids, _ in results]
    tok = Tokenizer.from_dir(padded_model)
    for ids, msgs in results:
        assert msgs[-1].finish_reason == gen.FINISH_REASON_LENGTH and len(ids) == MAX_NEW
        assert "".join(m.text for m in msgs) == tok.decode(ids)  # streamed text: exact, padded ids add none
    assert sum(t >= TOK_VOCAB for ids in got for t in ids) >= 10, "no stream sampled a padded id"
    assert sum(len(m.text) for _, msgs in results for m in msgs) >= 50
    llm = LLM(padded_model, device="cpu", dtype="float32", block_size=8, num_kv_blocks=256)
    want = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    assert got == [o.token_ids for o in want]
    ref = hf_model(padded_model)
    for p, g in zip(prompts[::3], got[::3], strict=True):
        r = hf_greedy(ref, p, MAX_NEW)  # transformers stops at EOS; we ignored it, so compare up to there
        assert_same_or_near_tie(ref, p, g[: len(r)], r)
    workers = wait_all_blocks_free(stack)
    assert sorted(w.role for w in workers) == sorted([gen.WORKER_ROLE_PREFILL, gen.WORKER_ROLE_DECODE])


def test_prompt_id_past_the_model_vocabulary_is_invalid_argument(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(stack, [5, MODEL_VOCAB - 1, MODEL_VOCAB], temperature=0.0, max_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt token id {MODEL_VOCAB} " in err.value.details()
    assert f"[0, {MODEL_VOCAB})" in err.value.details()
    wait_all_blocks_free(stack)
