"""Fail-stop and isolation over real processes: a worker whose engine dies or hangs, workers frozen
(SIGSTOP) for 20 s, a KV transfer that wins the race against its request's registration, clients
that stop reading. Each test asserts what the client sees and how fast, the health status, and
free == total blocks on every live worker (docs/ARCHITECTURE.md's failure table names them).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.launcher import Child, Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc
from tests.e2e.conftest import ENGINE_ARGS, generate, stub, wait_all_blocks_free
from tests.hf_reference import random_prompts
from tests.reliability.streams import Stream, wait_until


def _health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _make(model: Path, workdir: Path, *, prefill: int = 1, decode: int = 1, decode_args: tuple[str, ...] = (),
          gateway_args: tuple[str, ...] = ()) -> Stack:
    return Stack(model, prefill_workers=prefill, decode_workers=decode, engine_args=ENGINE_ARGS,
                 workdir=workdir, prefill_args=["--kv-timeout", "3"], decode_args=["--kv-timeout", "3", *decode_args],
                 gateway_args=["--local-prefill-threshold", "0", "--heartbeat-interval", "0.25", *gateway_args]).start()


@pytest.mark.parametrize(("fault", "cause"), [("raise@30", "injected fault at step 30"),
                                              ("hang@30", "no progress")], ids=["raises", "hangs"])
def test_a_dead_engine_fails_every_stream_at_once_and_the_worker_exits(rel_model, tmp_path, fault, cause) -> None:
    stack = _make(rel_model, tmp_path, decode_args=("--fault", fault, "--watchdog", "2"))
    try:
        victim = stack.decode[0]
        streams = [Stream(stub(stack), p, 300) for p in random_prompts(512, [20, 30, 40], seed=21)]
        for s in streams:
            s.join(60)
        ends = sorted(s.ended for s in streams)
        for s in streams:
            assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
            assert victim.info["address"] in s.error.details() and cause in s.error.details(), s.error.details()
        assert ends[-1] - ends[0] < 1.0, "every request hears of the death at once"
        assert victim.proc is not None
        assert victim.proc.wait(10) == 1, "the worker exits non-zero for its supervisor"
        assert "fatal" in victim.log_path.read_text()
        wait_until(lambda: _health(stack.address) == "NOT_SERVING", 5, "the gateway to stop serving (no decode worker)")
        stack.restart(victim)
        wait_until(lambda: _health(stack.address) == "SERVING", 10, "the gateway to serve again")
        tokens, _ = generate(stack, random_prompts(512, [25], seed=22)[0], temperature=0.0, max_tokens=8)
        assert len(tokens) == 8
        wait_all_blocks_free(stack)
    finally:
        stack.stop()


def test_frozen_workers_lose_their_requests_within_seconds_and_rejoin(rel_model, tmp_path) -> None:
    """A decode and a prefill worker of a 2p+2d stack are frozen (SIGSTOP) for 20 s: the streams on the
    frozen decode worker hear UNAVAILABLE within a few seconds, the others finish, new requests are
    served by the other pair meanwhile; once resumed, both free every block and rejoin."""
    stack = _make(rel_model, tmp_path, prefill=2, decode=2)
    try:
        d_frozen, p_frozen = stack.decode[0], stack.prefill[0]
        streams = [Stream(stub(stack), p, 400) for p in random_prompts(512, [30] * 4, seed=23)]
        wait_until(lambda: all(s.tokens >= 2 for s in streams), 60, "every stream to be under way")
        for child in (d_frozen, p_frozen):
            os.kill(child.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        frozen_at = time.monotonic()
        try:
            for s in streams:
                s.join(60)
            lost = [s for s in streams if s.error is not None]
            assert lost and len(lost) < len(streams), "the router spreads 4 streams over 2 decode workers"
            for s in lost:
                assert s.error.code() == grpc.StatusCode.UNAVAILABLE and d_frozen.info["address"] in s.error.details()
                assert s.ended - frozen_at < 5.0, f"a stream waited {s.ended - frozen_at:.1f} s on a frozen worker"
            assert all(s.tokens == 400 for s in streams if s.error is None)
            during = [Stream(stub(stack), p, 8) for p in random_prompts(512, [40] * 4, seed=24)]
            for s in during:
                s.join(60)
                assert s.error is None and s.tokens == 8, s.error
            unhealthy = [w for w in stub(stack).ClusterStatus(gen.ClusterStatusRequest(), timeout=5).workers
                         if not w.healthy]
            assert {w.address for w in unhealthy} == {d_frozen.info["address"], p_frozen.info["address"]}
            assert all(w.error and w.kv_blocks_total == 0 and w.running == 0 for w in unhealthy)  # no stale numbers
            time.sleep(max(0.0, frozen_at + 20 - time.monotonic()))
        finally:
            for child in (d_frozen, p_frozen):
                os.kill(child.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        workers = wait_all_blocks_free(stack, timeout_s=20)
        wait_until(lambda: all(w.healthy for w in stub(stack).ClusterStatus(gen.ClusterStatusRequest(), timeout=5).workers),
              10, "the resumed workers to rejoin")
        assert len(workers) == 4
    finally:
        stack.stop()


def _worker_stub(child: Child) -> worker_pb2_grpc.DecodeWorkerStub | worker_pb2_grpc.PrefillWorkerStub:
    channel = grpc.insecure_channel(child.info["address"])
    return (worker_pb2_grpc.PrefillWorkerStub if child.name.startswith("prefill") else
            worker_pb2_grpc.DecodeWorkerStub)(channel)


def test_kv_that_wins_the_race_against_its_registration_waits_for_it(rel_model, tmp_path) -> None:
    """Driven on the workers directly: the prefill worker ships a request's KV before the decode
    worker has heard of the request. The transfer waits, keyed by id, for the registration; one whose
    registration never comes is refused after the KV timeout. No block is lost either way."""
    stack = _make(rel_model, tmp_path)
    try:
        prefill, decode = stack.prefill[0], stack.decode[0]
        prompt = random_prompts(512, [60], seed=25)[0]
        want, _ = generate(stack, prompt, temperature=0.0, max_tokens=6)
        sampling = gen.SamplingParams(temperature=0.0, max_tokens=6)
        p_stub, d_stub = _worker_stub(prefill), _worker_stub(decode)
        early = p_stub.Prefill.future(pb.PrefillRequest(request_id="early", prompt_token_ids=prompt, sampling=sampling,
                                                        decode_kv_address=decode.info["kv_address"]), timeout=30)
        time.sleep(1.0)  # the KV is at the decode worker's door before its Decode call
        assert not early.done(), "the transfer must wait for the registration"
        got = [t for m in d_stub.Decode(pb.DecodeRequest(request_id="early", prompt_token_ids=prompt,
                                                         sampling=sampling), timeout=30) for t in m.token_ids]
        assert got == want and early.result().transfer.bytes > 0
        orphan = p_stub.Prefill.future(pb.PrefillRequest(request_id="orphan", prompt_token_ids=prompt,
                                                         sampling=sampling, decode_kv_address=decode.info["kv_address"]),
                                       timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            orphan.result()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no Decode call" in err.value.details()
        wait_all_blocks_free(stack)
    finally:
        stack.stop()


def test_clients_that_stop_reading_lose_their_slot(rel_model, tmp_path) -> None:
    """Two clients fill a --max-inflight 2 gateway and stop reading: after --client-read-timeout their
    requests are aborted, a third client is served, and every block comes back."""
    stack = _make(rel_model, tmp_path, gateway_args=("--max-inflight", "2", "--client-read-timeout", "2"))
    try:
        # no BDP probing: the flow-control window stays at 64 KiB, so an unread stream fills it soon
        channels = [grpc.insecure_channel(stack.address, options=[("grpc.http2.bdp_probe", 0)]) for _ in range(2)]
        prompt = random_prompts(512, [10], seed=26)[0]
        stalled = [channel.unary_stream("/tandem.v1.Generation/Generate")(
            gen.GenerateRequest(prompt_token_ids=prompt, sampling=gen.SamplingParams(
                temperature=0.0, max_tokens=900, ignore_eos=True, logprobs=20)).SerializeToString(), timeout=120)
            for channel in channels]
        wait_until(lambda: stub(stack).ClusterStatus(gen.ClusterStatusRequest(), timeout=5).workers[-1].running > 0, 30,
              "the stalled requests to run")
        with pytest.raises(grpc.RpcError) as err:
            generate(stack, prompt, temperature=0.0, max_tokens=4)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        t0 = time.monotonic()
        wait_until(lambda: _try(stack, prompt), 60, "a slot to be freed from the stalled clients")
        assert time.monotonic() - t0 < 45
        wait_all_blocks_free(stack)
        for call in stalled:
            call.cancel()
        for channel in channels:
            channel.close()
    finally:
        stack.stop()


def _try(stack: Stack, prompt: list[int]) -> bool:
    try:
        tokens, _ = generate(stack, prompt, temperature=0.0, max_tokens=4)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        return False
    return len(tokens) == 4
