"""The disaggregated stack end to end: real processes, real gRPC and ZeroMQ on loopback."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from engine import LLM, SamplingParams
from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import generate, stub, wait_all_blocks_free
from tests.hf_reference import assert_same_or_near_tie, hf_greedy, hf_model, random_prompts

LENGTHS = [3, 9, 14, 17, 22, 29, 33, 41, 47, 52, 60, 66, 71, 80, 95, 120]
MAX_NEW = 20


def concurrent_greedy(stack, prompts: list[list[int]]) -> list[list[int]]:
    s = stub(stack)
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: generate(s, p, temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)[0],
                             prompts))


@pytest.mark.parametrize("workers", [(1, 1), (2, 2)], ids=["1p1d", "2p2d"])
def test_concurrent_streams_match_engine_and_transformers(make_stack, stack_model, workers) -> None:
    stack = make_stack(stack_model, prefill=workers[0], decode=workers[1])
    prompts = random_prompts(512, LENGTHS, seed=7)
    got = concurrent_greedy(stack, prompts)
    llm = LLM(stack_model, device="cpu", dtype="float32", block_size=8, num_kv_blocks=512)
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                                      ignore_eos=True))]
    assert got == want
    ref = hf_model(stack_model)
    for p, g in zip(prompts[::3], got[::3], strict=True):
        r = hf_greedy(ref, p, MAX_NEW)  # transformers stops at EOS; we ignored it, so compare up to there
        assert_same_or_near_tie(ref, p, g[: len(r)], r)
    workers_status = wait_all_blocks_free(stack)
    assert sum(w.role == gen.WORKER_ROLE_PREFILL for w in workers_status) == workers[0]


def test_streaming_is_real_and_usage_is_reported(make_stack, stack_model) -> None:
    stack = make_stack(stack_model)
    arrivals: list[float] = []
    msgs = []
    for m in stub(stack).Generate(gen.GenerateRequest(
            prompt="def main():", sampling=gen.SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)),
            timeout=60):
        arrivals.append(time.monotonic())
        msgs.append(m)
    assert len(msgs) >= 4, "tokens arrived in too few messages to be a stream"
    assert msgs[0].token_ids and arrivals[-1] - arrivals[0] > 0.01
    last = msgs[-1]
    assert last.finish_reason == gen.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 64 and last.usage.prompt_tokens > 0
    assert last.timing.time_to_first_token_ns > 0 and last.timing.kv_transfer_ns > 0
    assert "".join(m.text for m in msgs)
    wait_all_blocks_free(stack)


def test_cancel_mid_stream_frees_every_block(make_stack, stack_model) -> None:
    stack = make_stack(stack_model)
    call = stub(stack).Generate(gen.GenerateRequest(
        prompt_token_ids=random_prompts(512, [90])[0],
        sampling=gen.SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)), timeout=60)
    for i, _ in enumerate(call):
        if i == 3:
            call.cancel()
            break
    wait_all_blocks_free(stack)


def test_shared_prefix_reuses_cached_blocks(make_stack, stack_model) -> None:
    stack = make_stack(stack_model)
    base = random_prompts(512, [48], seed=11)[0]
    _, first = generate(stack, base + [5, 6, 7], temperature=0.0, max_tokens=4)
    assert first[-1].usage.cached_tokens == 0
    _, second = generate(stack, base + [9, 10], temperature=0.0, max_tokens=4)
    assert second[-1].usage.cached_tokens == 48  # 6 blocks of 8 reused on the prefill worker
    wait_all_blocks_free(stack)


def test_conditional_disaggregation_prefills_short_prompts_locally(make_stack, stack_model) -> None:
    stack = make_stack(stack_model, gateway_args=["--local-prefill-threshold", "32"])
    short, long_ = random_prompts(512, [10, 70], seed=12)
    llm = LLM(stack_model, device="cpu", dtype="float32", block_size=8, num_kv_blocks=256)
    want = [o.token_ids for o in llm.generate([short, long_], SamplingParams(temperature=0.0, max_tokens=8,
                                                                             ignore_eos=True))]
    t_short, m_short = generate(stack, short, temperature=0.0, max_tokens=8, ignore_eos=True)
    t_long, m_long = generate(stack, long_, temperature=0.0, max_tokens=8, ignore_eos=True)
    assert [t_short, t_long] == want
    assert m_short[-1].timing.kv_transfer_ns == 0  # no KV moved
    assert m_long[-1].timing.kv_transfer_ns > 0
    wait_all_blocks_free(stack)


def test_mismatched_pair_is_refused_naming_the_field(make_stack, stack_model) -> None:
    stack = make_stack(stack_model, prefill_args=["--block-size", "16"])
    with pytest.raises(grpc.RpcError) as err:
        generate(stack, random_prompts(512, [20])[0], temperature=0.0, max_tokens=4)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block_size" in err.value.details() and "16" in err.value.details()
    wait_all_blocks_free(stack)


def test_a_frozen_prefill_worker_loses_its_request_to_a_local_prefill(make_stack, stack_model) -> None:
    """The prefill worker hangs (SIGSTOP) before it sends a byte: within a few seconds the gateway's
    heartbeat loses it and the request is prefilled on the decode worker instead; once resumed, the
    prefill worker frees what it held and rejoins."""
    stack = make_stack(stack_model, gateway_args=["--local-prefill-threshold", "0"],
                       prefill_args=["--kv-timeout", "2"], decode_args=["--kv-timeout", "2"])
    prefill_pid = stack.prefill[0].proc.pid
    prompt = random_prompts(512, [40])[0]
    want, _ = generate(stack, prompt, temperature=0.0, max_tokens=4)
    os.kill(prefill_pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        got, msgs = generate(stack, prompt, temperature=0.0, max_tokens=4)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(prefill_pid, signal.SIGCONT)
    assert got == want and msgs[-1].timing.kv_transfer_ns == 0  # no KV moved: prefilled locally
    assert elapsed < 8.0, elapsed
    workers = wait_all_blocks_free(stack, timeout_s=15)
    assert all(w.healthy for w in workers)
