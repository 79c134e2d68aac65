"""Overload: a full gateway answers RESOURCE_EXHAUSTED with a `retry-after-ms` trailer at once (never a
timeout), and requests that overflow the decode worker's KV pool are preempted and recomputed until
every one completes, with the tokens each makes alone (greedy)."""

from __future__ import annotations

import time

import grpc
import pytest

from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import wait_all_blocks_free
from tests.hf_reference import random_prompts
from tests.reliability.conftest import DECODE_BLOCKS, MAX_INFLIGHT, SecureStack, bearer

PROMPT, NEW = 24, 60  # 84 tokens = 11 blocks each; four of them need 44 of the decode worker's 16


def test_full_gateway_refuses_with_retry_hint_and_kv_pressure_preempts_until_all_complete(
        secure: SecureStack) -> None:
    assert MAX_INFLIGHT * -(-(PROMPT + NEW) // 8) > 2 * DECODE_BLOCKS
    prompts = random_prompts(512, [PROMPT] * MAX_INFLIGHT, seed=21)
    stub = secure.stub()
    sampling = gen.SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    calls = [stub.Generate(gen.GenerateRequest(prompt_token_ids=p, sampling=sampling), timeout=180,
                           metadata=bearer("user")) for p in prompts]
    firsts = [next(c) for c in calls]  # every slot is taken by a streaming request

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gen.GenerateRequest(prompt_token_ids=[5, 6, 7]), timeout=30, metadata=bearer("user")))
    assert time.monotonic() - t0 < 2.0, "a full gateway must refuse at once, not time out"
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert f"limit {MAX_INFLIGHT}" in err.value.details()
    assert ("retry-after-ms", "1000") in tuple(err.value.trailing_metadata() or ())

    got = []
    for first, call in zip(firsts, calls, strict=True):
        msgs = [first, *call]
        assert msgs[-1].finish_reason == gen.FINISH_REASON_LENGTH
        got.append([t for m in msgs for t in m.token_ids])
    alone = [[t for m in secure.generate(p, temperature=0.0, max_tokens=NEW, ignore_eos=True) for t in m.token_ids]
             for p in prompts]  # one at a time: no pressure, no preemption
    assert got == alone, "preemption and recompute changed the greedy tokens"
    wait_all_blocks_free(secure.stub(), metadata=bearer("admin"))
