"""What the failure tests share: a Generate stream consumed on its own thread, and a bounded wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc


class Stream(threading.Thread):
    """Consumes one greedy Generate stream; records how many tokens came, when it ended and how."""

    def __init__(self, stub: generation_pb2_grpc.GenerationStub, prompt: list[int], max_tokens: int,
                 **sampling: object) -> None:
        super().__init__(daemon=True)
        self.call = stub.Generate(gen.GenerateRequest(prompt_token_ids=prompt, sampling=gen.SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)), timeout=120)
        self.tokens = 0
        self.error: grpc.RpcError | None = None
        self.ended = 0.0
        self.start()

    def run(self) -> None:
        try:
            for m in self.call:
                self.tokens += len(m.token_ids)
        except grpc.RpcError as err:
            self.error = err
        self.ended = time.monotonic()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)
