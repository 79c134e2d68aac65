"""A saturated worker still answers health checks promptly: its event loop never runs the model."""

from __future__ import annotations

import statistics
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.v1 import generation_pb2 as gen
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc
from tests.e2e.conftest import stub, wait_all_blocks_free
from tests.hf_reference import random_prompts


def test_health_answers_within_100ms_while_saturated(make_stack, tiny_model) -> None:
    model = tiny_model("llama", hidden_size=256, num_layers=4, intermediate_size=1024, max_position_embeddings=2048)
    stack = make_stack(model, gateway_args=["--local-prefill-threshold", "100000"],  # all work on the decoder
                       engine_args=["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "2048"])
    s = stub(stack)
    prompts = random_prompts(1000, [400] * 12, seed=3)
    streams = [s.Generate(gen.GenerateRequest(prompt_token_ids=p, sampling=gen.SamplingParams(
        temperature=0.0, max_tokens=200, ignore_eos=True)), timeout=120) for p in prompts]
    drained = threading.Event()

    def drain() -> None:
        try:
            for st in streams:
                for _ in st:
                    pass
        except grpc.RpcError:  # cancelled at the end of the test
            return
        drained.set()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    decode_addr = stack.decode[0].info["address"]
    channel = grpc.insecure_channel(decode_addr)
    health = health_pb2_grpc.HealthStub(channel)
    status = worker_pb2_grpc.DecodeWorkerStub(channel)
    deadline = time.monotonic() + 20
    while status.Status(pb.StatusRequest(), timeout=5).running == 0:  # wait until it is busy
        assert time.monotonic() < deadline, "the decode worker never got busy"
        time.sleep(0.05)
    latencies = []
    for _ in range(20):
        t0 = time.perf_counter()
        resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        latencies.append(time.perf_counter() - t0)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.05)
    busy = status.Status(pb.StatusRequest(), timeout=5)
    assert busy.running > 0 and not drained.is_set(), "the worker was not saturated while we measured"
    latencies.sort()
    print("health latencies (ms):", [round(x * 1000, 1) for x in latencies])
    # p90, not max: the test box is shared, and one scheduler hiccup is not the event loop waiting
    assert latencies[int(0.9 * len(latencies))] < 0.100, f"health latencies (s): {latencies}"
    assert statistics.median(latencies) < 0.05, f"health latencies (s): {latencies}"
    for st in streams:
        st.cancel()
    t.join(30)
    wait_all_blocks_free(stack, timeout_s=30)
