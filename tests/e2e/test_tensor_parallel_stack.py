"""Disaggregated stacks whose prefill and decode workers run at different tensor-parallel sizes (CPU, gloo,
real processes): P at TP 1 with D at TP 2, and the reverse. Greedy output equals the unsharded engine's,
every KV block comes back; then a killed follower rank
fails its worker's streams at once and the worker exits 1 (fail-stop, never a hang in a collective).

Both stacks start together (their processes load side by side) and are shared by the module's tests.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cli.launcher import Stack
from engine.llm import LLM
from engine.sampling.params import SamplingParams
from tests.e2e.conftest import ENGINE_ARGS, generate, stub, wait_all_blocks_free
from tests.reliability.streams import Stream, wait_until

PROMPTS = [list(range(3, 103)), [7, 300, 12, 99, 4, 18, 640, 2, 33]]  # 100 tokens: two prefill chunks of 64


@pytest.fixture(scope="module")
def stacks(stack_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    root = tmp_path_factory.mktemp("tp-stacks")
    tp2 = ["--tensor-parallel-size", "2"]
    # few staging blocks, so concurrent transfers of 100-token prompts (13 blocks) wait for them: 14 on the
    # prefill side (one at a time), 30 on the decode side (two; its context is then 240 tokens)
    made = {"p1-d2": Stack(stack_model, engine_args=ENGINE_ARGS,
                           decode_args=[*tp2, "--kv-relay-blocks", "30", "--kv-timeout", "10"],
                           gateway_args=["--local-prefill-threshold", "0", "--heartbeat-interval", "0.25"],
                           workdir=root / "p1-d2"),
            "p2-d1": Stack(stack_model, engine_args=ENGINE_ARGS, prefill_args=[*tp2, "--kv-relay-blocks", "14"],
                           gateway_args=["--local-prefill-threshold", "0"], workdir=root / "p2-d1")}
    deadline = time.monotonic() + 240
    try:
        for s in made.values():  # every worker of both stacks loads at once (this thread outlives them)
            for c in [*s.prefill, *s.decode]:
                c.start(s.env)
        for s in made.values():
            for c in [*s.prefill, *s.decode]:
                c.wait_ready(deadline)
            s.start_gateway(deadline)
        yield made
    finally:
        for s in made.values():
            s.stop()


@pytest.fixture(scope="module")
def expected(stack_model: Path) -> list[list[int]]:
    llm = LLM(str(stack_model), device="cpu", dtype="float32", block_size=8, num_kv_blocks=64,
              max_num_batched_tokens=64)
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))]


@pytest.mark.parametrize("name", ["p1-d2", "p2-d1"])
def test_greedy_output_equals_the_unsharded_engine(stacks, expected, name) -> None:
    """Four requests at once, three of them 13-block prompts: the relaying rank 0's staging blocks hold one
    (prefill) or two (decode) such transfers at a time, so transfers can wait for them (and still match)."""
    stack = stacks[name]
    work = [0, 1, 0, 0]
    with ThreadPoolExecutor(len(work)) as pool:
        got = list(pool.map(lambda i: generate(stack, PROMPTS[i], temperature=0.0, max_tokens=10,
                                               ignore_eos=True)[0], work))
    assert got == [expected[i] for i in work], name
    wait_all_blocks_free(stack)
    log = (stack.decode[0] if name == "p1-d2" else stack.prefill[0]).log_path.read_text()
    assert "tensor parallel: 2 ranks joined" in log


def test_a_killed_follower_fails_the_worker_fast(stacks) -> None:
    stack = stacks["p1-d2"]
    worker = stack.decode[0]
    assert worker.proc is not None
    followers = [int(p) for t in Path(f"/proc/{worker.proc.pid}/task").iterdir()
                 for p in (t / "children").read_text().split()]
    assert len(followers) == 1, followers
    streams = [Stream(stub(stack), PROMPTS[1], 200) for _ in range(2)]  # within the 240-token context
    wait_until(lambda: all(s.tokens >= 2 for s in streams), 60, "every stream to be under way")
    killed = time.monotonic()
    os.kill(followers[0], signal.SIGKILL)
    for s in streams:
        s.join(30)
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
        assert s.ended - killed < 5.0, f"a stream took {s.ended - killed:.1f} s to hear of the dead rank"
    assert worker.proc.wait(15) == 1, "the worker exits non-zero for its supervisor to restart it"
    log = worker.log_path.read_text()
    assert "rank 1" in log and "fatal" in log
