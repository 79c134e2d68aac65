"""Faults over real processes: a decode worker SIGKILLed mid-stream, a prefill worker SIGKILLed mid-transfer,
the gateway SIGKILLed mid-stream. Each test restarts what it killed and ends with free == total blocks
on every live worker. One stack (1 prefill, 2 decode) serves the module.

The model is wider than the other tests' (hidden 256, 6 layers) so that a 1,500-token prefill takes a
good fraction of a second: long enough to kill the prefill worker while its KV is in flight.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.launcher import Child, Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc
from tests.e2e.conftest import ENGINE_ARGS, stub, wait_all_blocks_free
from tests.hf_reference import random_prompts
from tests.reliability.streams import Stream, wait_until

KV_TIMEOUT = 2.0
LONG_PROMPT = 1500


@pytest.fixture(scope="module")
def wide_model(tiny_model) -> Path:
    return tiny_model("llama", hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=1024,
                      max_position_embeddings=2048)


@pytest.fixture(scope="module")
def stack(wide_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    kv = ["--kv-timeout", str(KV_TIMEOUT)]
    s = Stack(wide_model, prefill_workers=1, decode_workers=2, engine_args=ENGINE_ARGS,
              workdir=tmp_path_factory.mktemp("faults"),
              prefill_args=[*kv, "--max-num-batched-tokens", "2048"], decode_args=kv,
              gateway_args=["--local-prefill-threshold", "0"])
    s.start()
    yield s
    s.stop()


def _status(child: Child) -> pb.StatusResponse:
    channel = grpc.insecure_channel(child.info["address"])
    try:
        cls = worker_pb2_grpc.PrefillWorkerStub if child.name.startswith("prefill") else worker_pb2_grpc.DecodeWorkerStub
        return cls(channel).Status(pb.StatusRequest(), timeout=2)
    finally:
        channel.close()


def _cluster(stack: Stack) -> dict[str, gen.WorkerStatus]:
    return {w.address: w for w in stub(stack).ClusterStatus(gen.ClusterStatusRequest(), timeout=5).workers}


def test_decode_worker_killed_mid_stream(stack: Stack) -> None:
    victim, survivor = stack.decode
    streams = [Stream(stub(stack), p, 300) for p in random_prompts(1024, [40] * 4, seed=5)]
    wait_until(lambda: all(s.tokens >= 3 for s in streams), 60, "every stream to be under way")
    victim.kill()
    killed = time.monotonic()
    for s in streams:
        s.join(120)
    failed = [s for s in streams if s.error is not None]
    assert failed and len(failed) < len(streams), "the router should have spread 4 streams over 2 workers"
    for s in failed:
        assert s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error.details()
        assert victim.info["address"] in s.error.details()
        assert s.ended - killed < 2.0, f"the client waited {s.ended - killed:.1f} s for its error"
    assert all(s.tokens == 300 for s in streams if s.error is None)

    wait_until(lambda: not _cluster(stack)[victim.info["address"]].healthy, 5, "the gateway to mark the worker down")
    assert _cluster(stack)[victim.info["address"]].error
    again = [Stream(stub(stack), p, 8) for p in random_prompts(1024, [30] * 3, seed=6)]
    for s in again:
        s.join(60)
        assert s.error is None and s.tokens == 8, "new requests must go to the healthy worker"

    stack.restart(victim)
    wait_until(lambda: _cluster(stack)[victim.info["address"]].healthy, 10, "the restarted worker to rejoin")
    busy = [Stream(stub(stack), p, 200) for p in random_prompts(1024, [30] * 2, seed=7)]
    wait_until(lambda: _status(victim).running + _status(victim).waiting > 0 or all(not s.is_alive() for s in busy), 30,
          "the rejoined worker to be given work")
    assert _status(victim).running + _status(victim).waiting > 0 or any(s.tokens for s in busy)
    for s in busy:
        s.join(120)
        assert s.error is None and s.tokens == 200
    assert _status(survivor).kv_blocks_free == _status(survivor).kv_blocks_total
    wait_all_blocks_free(stack)


def test_prefill_worker_killed_mid_transfer_frees_the_reservation(stack: Stack) -> None:
    """Driven on the workers directly (no gateway to cancel anything): only the decode worker's KV
    receiver can free the blocks it reserved for a sender that died, by noticing the disconnect or at
    its KV timeout."""
    prefill, decode = stack.prefill[0], stack.decode[0]
    total = _status(decode).kv_blocks_total
    prompt = random_prompts(1024, [LONG_PROMPT], seed=8)[0]
    sampling = gen.SamplingParams(temperature=0.0, max_tokens=4)
    d_channel, p_channel = grpc.insecure_channel(decode.info["address"]), grpc.insecure_channel(prefill.info["address"])
    d_call = worker_pb2_grpc.DecodeWorkerStub(d_channel).Decode(pb.DecodeRequest(
        request_id="doomed", prompt_token_ids=prompt, sampling=sampling), timeout=60)
    p_future = worker_pb2_grpc.PrefillWorkerStub(p_channel).Prefill.future(pb.PrefillRequest(
        request_id="doomed", prompt_token_ids=prompt, sampling=sampling,
        decode_kv_address=decode.info["kv_address"]), timeout=60)
    wait_until(lambda: _status(decode).kv_blocks_free < total, 60, "the decode worker to reserve blocks for the KV")
    os.kill(prefill.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    prefill.proc.wait()
    assert _status(decode).kv_blocks_free < total, "the transfer finished before the kill: the test proves nothing"
    wait_until(lambda: _status(decode).kv_blocks_free == total, KV_TIMEOUT + 2.0, "the reservation to be released")
    freed = time.monotonic() - killed
    with pytest.raises(grpc.RpcError) as err:
        list(d_call)
    # a dead sender's TCP connection closes, so the receiver usually notices at its next reply
    # (UNAVAILABLE, "the sender disconnected"); a silent one is dropped at the KV timeout (DEADLINE_EXCEEDED)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err.value.details()
    assert "doomed" in err.value.details()
    assert p_future.exception() is not None
    d_channel.close()
    p_channel.close()
    assert freed <= KV_TIMEOUT + 1.0, f"freed {freed:.1f} s after the kill (KV timeout {KV_TIMEOUT} s)"

    stack.restart(prefill)
    wait_until(lambda: _cluster(stack)[prefill.info["address"]].healthy, 10, "the prefill worker to rejoin")
    msgs = list(stub(stack).Generate(gen.GenerateRequest(prompt_token_ids=prompt[:200], sampling=sampling),
                                     timeout=60))
    assert msgs[-1].timing.kv_transfer_ns > 0, "the request should have been prefilled remotely"
    wait_all_blocks_free(stack)


def test_gateway_killed_mid_stream_workers_clean_up_and_accept_a_new_one(stack: Stack) -> None:
    assert stack.gateway is not None
    streams = [Stream(stub(stack), p, 400) for p in random_prompts(1024, [60] * 2, seed=9)]
    wait_until(lambda: all(s.tokens >= 3 for s in streams), 60, "the streams to be under way")
    stack.gateway.kill()
    for s in streams:
        s.join(10)
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE
    workers = [*stack.prefill, *stack.decode]
    wait_until(lambda: all(_status(w).kv_blocks_free == _status(w).kv_blocks_total and not _status(w).running
                      for w in workers), 10, "the workers to abort the orphaned requests")
    stack.start_gateway()
    streams = [Stream(stub(stack), p, 16) for p in random_prompts(1024, [50] * 3, seed=10)]
    for s in streams:
        s.join(60)
        assert s.error is None and s.tokens == 16
    wait_all_blocks_free(stack)
