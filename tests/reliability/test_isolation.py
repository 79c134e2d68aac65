"""Isolation over real processes: no client can read, stall or cancel another's request, and no one
request or worker takes the stack down. Each finding of issue 22 is a test here (the hostile-input
rows are in test_bad_input.py, the launcher's restarts in test_up_supervision.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.launcher import Stack
from engine import LLM, SamplingParams
from tandem.v1 import generation_pb2 as gen
from tests.e2e.conftest import ENGINE_ARGS, stub, wait_all_blocks_free
from tests.hf_reference import random_prompts

MAX_INFLIGHT = 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def stack(rel_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """1 prefill + 1 decode worker behind a --max-inflight 200 gateway with the HTTP API and /metrics."""
    s = Stack(rel_model, prefill_workers=1, decode_workers=1, engine_args=ENGINE_ARGS,
              workdir=tmp_path_factory.mktemp("isolation"),
              gateway_args=["--local-prefill-threshold", "24", "--max-inflight", str(MAX_INFLIGHT),
                            "--heartbeat-interval", "0.25", "--http-port", "0", "--metrics-port", str(_free_port())])
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(rel_model: Path) -> LLM:
    return LLM(rel_model, device="cpu", dtype="float32", block_size=8, num_kv_blocks=256)


def _tokens(stack: Stack, prompt: list[int], request_id: str, max_tokens: int = 24) -> tuple[list[int], set[str]]:
    msgs = list(stub(stack).Generate(gen.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt,
        sampling=gen.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)), timeout=60))
    return [t for m in msgs for t in m.token_ids], {m.request_id for m in msgs}


def _http_tokens(stack: Stack, prompt: list[int], request_id: str, max_tokens: int = 24) -> tuple[str, str]:
    assert stack.gateway is not None
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://{stack.gateway.info['http_address']}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json", "X-Request-Id": request_id})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["text"], resp.headers["X-Request-Id"]


def test_clients_sharing_a_request_id_each_get_exactly_their_own_tokens(stack, reference) -> None:
    """Same id, different prompts, at once and one after another, over gRPC and HTTP, remote
    (long prompts) and local (short prompts) prefill: each client gets its own completion, and
    cancelling one leaves the other alone."""
    prompts = random_prompts(512, [60, 70, 12, 16], seed=31)  # two remote, two local prefills
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in reference.generate(prompts, params)]
    texts = [o.text for o in reference.generate(prompts, params)]
    with ThreadPoolExecutor(8) as pool:
        grpc_runs = [pool.submit(_tokens, stack, p, "shared-id") for p in prompts]
        http_runs = [pool.submit(_http_tokens, stack, p, "shared-id") for p in prompts]
        for run, expected in zip(grpc_runs, want, strict=True):
            tokens, labels = run.result()
            assert tokens == expected and labels == {"shared-id"}
        for run, expected in zip(http_runs, texts, strict=True):
            text, label = run.result()
            assert text == expected and label == "shared-id"
    for p, expected in zip(prompts, want, strict=True):  # sequentially
        assert _tokens(stack, p, "shared-id")[0] == expected

    victim = stub(stack).Generate(gen.GenerateRequest(request_id="twin", prompt_token_ids=prompts[0],
                                                      sampling=gen.SamplingParams(temperature=0.0, max_tokens=300,
                                                                                  ignore_eos=True)), timeout=60)
    next(victim)
    survivor: list[list[int]] = []
    t = threading.Thread(target=lambda: survivor.append(_tokens(stack, prompts[1], "twin")[0]))
    t.start()
    time.sleep(0.3)
    victim.cancel()  # the gateway aborts "twin" on every worker: only this client's request is hit
    t.join(60)
    assert survivor == [want[1]]
    wait_all_blocks_free(stack)


def test_a_burst_below_the_limit_queues_and_completes(stack) -> None:
    """150 cold requests at once (limit 200): all complete, slower; none times out waiting for KV."""
    prompts = random_prompts(512, [48 + i % 40 for i in range(150)], seed=32)

    def one(p: list[int]) -> int:
        msgs = list(stub(stack).Generate(gen.GenerateRequest(
            prompt_token_ids=p, sampling=gen.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)),
            timeout=240))
        return sum(len(m.token_ids) for m in msgs)

    with ThreadPoolExecutor(150) as pool:
        assert list(pool.map(one, prompts)) == [4] * 150
    wait_all_blocks_free(stack)


def _gateway_inflight(stack: Stack) -> float:
    assert stack.gateway is not None
    with urllib.request.urlopen(f"http://{stack.gateway.info['metrics_address']}/metrics", timeout=10) as resp:
        families = text_string_to_metric_families(resp.read().decode())
    return sum(sample.value for family in families if family.name == "tandem_gateway_requests_inflight"
               for sample in family.samples)


def test_a_burst_above_the_limit_is_refused_at_once(stack) -> None:
    # the earlier tests' calls have all ended, so every slot must be free again; a slot still held is a leak
    deadline = time.monotonic() + 30
    while (held := _gateway_inflight(stack)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held == 0, f"{held:.0f} gateway slots still held 30 s after every earlier call ended"
    prompts = random_prompts(512, [30] * (MAX_INFLIGHT + 40), seed=33)
    one = stub(stack)  # one channel: every call is on the wire at once; admitted ones stream until cancelled
    calls = [one.Generate(gen.GenerateRequest(
        prompt_token_ids=p, sampling=gen.SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)),
        timeout=240) for p in prompts]
    refused = []
    t0 = time.monotonic()

    def first(call) -> None:
        try:
            next(call)
        except grpc.RpcError as exc:
            refused.append((exc.code(), dict(exc.trailing_metadata() or ()), time.monotonic() - t0))

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(first, calls))
    for call in calls:
        call.cancel()
    assert len(refused) == 40  # the 200 admitted hold every slot until they are cancelled
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after-ms" in md for code, md, _ in refused)
    assert max(t for *_, t in refused) < 20  # refused at admission, not after queueing
    # 200 cancelled 900-token streams: under make test's second process their aborts took over 30 s to
    # free every block once (cause not found; docs note) - the assertion stays, the wait is longer
    wait_all_blocks_free(stack, timeout_s=90)


def test_a_decode_worker_that_dies_before_the_first_token_costs_a_retry_not_a_failure(rel_model, tmp_path) -> None:
    s = Stack(rel_model, prefill_workers=1, decode_workers=2, engine_args=ENGINE_ARGS, workdir=tmp_path,
              decode_args=["--kv-timeout", "3"],  # local prefills: the first step of a request is on the decode worker
              gateway_args=["--local-prefill-threshold", "100000", "--heartbeat-interval", "0.25", "--http-port", "0"])
    s.start()
    try:
        s.decode[1].stop()  # restarted with an engine that dies at its first step
        s.decode[1].argv = [*s.decode[1].argv, "--fault", "raise@1"]
        s.restart(s.decode[1])
        deadline = time.monotonic() + 10
        while sum(w.healthy for w in stub(s).ClusterStatus(gen.ClusterStatusRequest(), timeout=5).workers) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        prompts = random_prompts(512, [30, 34, 38, 42], seed=34)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: _tokens(s, p, "", 8)[0], prompts))
        assert all(len(t) == 8 for t in got)
        assert s.decode[1].proc is not None and s.decode[1].proc.wait(10) == 1  # it died, fail-stop
        assert s.gateway is not None
        with urllib.request.urlopen(f"http://{s.gateway.info['http_address']}/health", timeout=5) as resp:
            assert resp.status == 200  # one decode worker still serves: gRPC and HTTP health agree
        wait_all_blocks_free(s)
    finally:
        s.stop()
