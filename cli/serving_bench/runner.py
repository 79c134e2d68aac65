"""Drive one load against a client: Poisson arrivals at a rate, or a fixed number of concurrent streams.

Every run is bounded: no request is sent after `max_duration_s`, and each request's own timeout is
cut to what is left of it, so a run ends within `max_duration_s` plus a moment, whatever the server does.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from cli.serving_bench.clients import Client, RequestResult
from cli.serving_bench.workload import BenchRequest, arrival_offsets
from engine.heap import freeze_startup_heap


@dataclass(frozen=True)
class LoadSpec:
    """Open loop at `rate` req/s (inf: all at once), capped at `max_concurrency` in flight (0: no cap);
    or, when `concurrency` > 0, a closed loop of that many streams (rate is then ignored)."""

    rate: float = math.inf
    concurrency: int = 0
    max_concurrency: int = 0
    max_duration_s: float = 600.0
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.concurrency < 0 or self.max_concurrency < 0:
            raise ValueError("rate must be > 0; concurrency and max_concurrency >= 0")
        if self.max_duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("max_duration_s and timeout_s must be > 0")

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency else f"rate {self.rate:g}/s"


@dataclass
class RunResult:
    backend: str
    load: LoadSpec
    results: list[RequestResult]
    not_sent: int
    duration_s: float  # first send -> last answer
    loadavg_1m: float = field(default_factory=lambda: os.getloadavg()[0])  # this machine's, as the run ends


async def run_load(client: Client, requests: list[BenchRequest], load: LoadSpec, *, seed: int = 0,
                   progress: bool = True) -> RunResult:
    """Send `requests` under `load`; returns every request's result (failures included)."""
    # The client is a Python process too: a full collection of its heap would stall every stream it
    # reads and show as the server's inter-token gap. Its heap is frozen before the first send, as
    # every Tandem process freezes its own (engine.heap.freeze_startup_heap).
    freeze_startup_heap()
    results: list[RequestResult] = []
    bar = tqdm(total=len(requests), desc=f"{client.name} {load.label}", unit="req", file=sys.stderr,
               disable=not progress, leave=False)
    t0 = time.monotonic()
    deadline = t0 + load.max_duration_s

    async def one(req: BenchRequest) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        results.append(await client.send(req, min(load.timeout_s, left)))
        bar.update(1)

    try:
        if load.concurrency:
            pending = iter(requests)

            async def stream() -> None:
                for req in pending:  # one shared iterator: each request is taken once
                    await one(req)

            await asyncio.gather(*(stream() for _ in range(load.concurrency)))
        else:
            limit = asyncio.Semaphore(load.max_concurrency or len(requests))

            async def limited(req: BenchRequest) -> None:
                async with limit:
                    await one(req)

            tasks: list[asyncio.Task[None]] = []
            for req, offset in zip(requests, arrival_offsets(len(requests), load.rate, seed=seed), strict=True):
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() >= deadline:
                    break
                tasks.append(asyncio.create_task(limited(req)))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    end = max((r.sent_at + r.e2e_s for r in results), default=time.monotonic())
    start = min((r.sent_at for r in results), default=t0)
    return RunResult(client.name, load, results, len(requests) - len(results), max(end - start, 1e-9))
