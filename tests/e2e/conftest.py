"""Real stacks: gateway, prefill and decode workers as separate processes on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc

ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32", "--block-size", "8", "--num-kv-blocks", "256",
               "--max-num-batched-tokens", "64"]


@pytest.fixture(scope="session")
def stack_model(tiny_model) -> Path:
    return tiny_model("llama", max_position_embeddings=1024)


@pytest.fixture
def make_stack(tmp_path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(model: Path, *, prefill: int = 1, decode: int = 1, gateway_args: list[str] | None = None,
             prefill_args: list[str] | None = None, decode_args: list[str] | None = None,
             engine_args: list[str] | None = None) -> Stack:
        s = Stack(model, prefill_workers=prefill, decode_workers=decode,
                  engine_args=engine_args if engine_args is not None else ENGINE_ARGS,
                  prefill_args=prefill_args, decode_args=decode_args,
                  gateway_args=gateway_args if gateway_args is not None else ["--local-prefill-threshold", "0"],
                  workdir=tmp_path / f"stack{len(stacks)}")
        stacks.append(s)
        return s.start()

    yield make
    for s in stacks:
        s.stop()


def stub(stack: Stack) -> generation_pb2_grpc.GenerationStub:
    return generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.address))


def generate(stack_or_stub, prompt_ids: list[int], **sampling) -> tuple[list[int], list[gen.GenerateResponse]]:
    s = stub(stack_or_stub) if isinstance(stack_or_stub, Stack) else stack_or_stub
    msgs = list(s.Generate(gen.GenerateRequest(prompt_token_ids=prompt_ids,
                                               sampling=gen.SamplingParams(**sampling)), timeout=60))
    return [t for m in msgs for t in m.token_ids], msgs


def wait_all_blocks_free(stack_or_stub, timeout_s: float = 10.0, metadata=None) -> list[gen.WorkerStatus]:
    """Every e2e test ends here: once idle, free == total on every live worker. Takes a Stack, or a
    stub (with `metadata`, e.g. an admin token) for a gateway that needs credentials."""
    s = stub(stack_or_stub) if isinstance(stack_or_stub, Stack) else stack_or_stub
    deadline = time.monotonic() + timeout_s
    workers: list[gen.WorkerStatus] = []
    while time.monotonic() < deadline:
        workers = list(s.ClusterStatus(gen.ClusterStatusRequest(), timeout=5, metadata=metadata).workers)
        live = [w for w in workers if w.healthy]
        if live and all(w.kv_blocks_free == w.kv_blocks_total for w in live):
            return workers
        time.sleep(0.1)
    raise AssertionError(f"blocks still held after {timeout_s} s: " + ", ".join(
        f"{w.worker_id} free {w.kv_blocks_free}/{w.kv_blocks_total}" for w in workers))
