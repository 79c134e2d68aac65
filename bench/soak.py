"""Soak: minutes of mixed load on a local stack, with cancellations, bad requests and worker kills.

    python -m bench.soak --minutes 3 [--model DIR] [--clients 6] [--out bench/results/soak.json]

A stack of 1 prefill and 2 decode workers (decode pools small enough to preempt) serves `--clients`
threads that loop over random requests: prompts of 4..200 tokens, 1..96 new tokens, greedy or seeded
sampling, some stop strings; ~15% are cancelled mid-stream and ~3% are malformed. At 1/3 of the run a
decode worker is SIGKILLed and restarted, at 2/3 the prefill worker. RSS of every process is sampled
every few seconds. The run fails (exit 1) when, once idle, any live worker holds a KV block
(free != total), a worker is unhealthy, a request ended with an unexpected status, or a process's RSS
grew more than the bound between its warmed-up start and the end of the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cli.launcher import Child, Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc

log = logging.getLogger("soak")
ENGINE = ["--device", "cpu", "--dtype", "float32", "--block-size", "8", "--num-kv-blocks", "256",
          "--max-num-batched-tokens", "256"]
# statuses a request may legitimately end with while workers are killed or the gateway is full
EXPECTED = {"OK", "CANCELLED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
RSS_GROWTH_BOUND = (0.15, 96 << 20)  # a process may grow by max(15 %, 96 MiB) after its warm-up


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Incarnation:
    """One process's life: (seconds since start, RSS) samples."""

    name: str
    pid: int
    started: float
    samples: list[tuple[float, int]] = field(default_factory=list)

    def growth(self, warmup_s: float) -> tuple[int, int] | None:
        """(RSS after warm-up, RSS at the end), or None when it lived too briefly to judge."""
        warm = [r for t, r in self.samples if t - self.started >= warmup_s]
        if len(warm) < 4:
            return None
        return int(statistics.median(warm[: max(2, len(warm) // 5)])), int(statistics.median(warm[-3:]))


class Soak:
    def __init__(self, stack: Stack, seconds: float, clients: int, seed: int) -> None:
        self.stack, self.seconds, self.clients = stack, seconds, clients
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.tokens = 0
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: dict[int, Incarnation] = {}
        self.t0 = time.monotonic()

    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(grpc.insecure_channel(self.stack.address))

    # -- load ----------------------------------------------------------------------------------
    def request(self, rng: random.Random) -> tuple[gen.GenerateRequest, int | None]:
        """A random request and the message count after which to cancel it (None: read to the end)."""
        ids = [rng.randrange(3, 1000) for _ in range(rng.randint(4, 200))]
        s = gen.SamplingParams(max_tokens=rng.randint(1, 96), ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.5:
            s.temperature, s.seed, s.top_p = 0.8, rng.randrange(1 << 32), 0.9
        else:
            s.temperature = 0.0
        if rng.random() < 0.1:
            s.stop.append("e")
        if rng.random() < 0.03:  # malformed on purpose: the error path must not leak either
            s.top_p = 1.5
        return gen.GenerateRequest(prompt_token_ids=ids, sampling=s), rng.randint(1, 4) if rng.random() < 0.15 else None

    def client(self, index: int) -> None:
        rng = random.Random(self.rng.random() + index)
        stub = self.stub()
        while not self.stop.is_set():
            req, cancel_after = self.request(rng)
            t = time.monotonic()
            code, n = "OK", 0
            call = stub.Generate(req, timeout=60)
            try:
                for i, m in enumerate(call, 1):
                    n += len(m.token_ids)
                    if cancel_after is not None and i >= cancel_after:
                        call.cancel()
                        code = "CANCELLED"
                        break
            except grpc.RpcError as err:
                code = err.code().name
                if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                    time.sleep(0.2)  # what a polite client does with the retry hint
            with self.lock:
                self.outcomes[code] += 1
                self.tokens += n
                if code == "OK":
                    self.latencies.append(time.monotonic() - t)

    # -- faults and sampling --------------------------------------------------------------------
    def track(self, child: Child) -> None:
        assert child.proc is not None
        self.procs.setdefault(child.proc.pid, Incarnation(child.name, child.proc.pid, time.monotonic()))

    def sample(self) -> None:
        for c in [self.stack.gateway, *self.stack.prefill, *self.stack.decode]:
            if c is not None and c.proc is not None and c.proc.poll() is None:
                self.track(c)
                try:
                    self.procs[c.proc.pid].samples.append((time.monotonic(), rss_bytes(c.proc.pid)))
                except OSError:
                    pass

    def kill_and_restart(self, child: Child) -> None:
        log.info("SIGKILL %s at %.0f s", child.name, time.monotonic() - self.t0)
        child.kill()
        time.sleep(3.0)
        self.stack.restart(child)
        log.info("%s restarted at %.0f s", child.name, time.monotonic() - self.t0)

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        for th in threads:
            th.start()
        faults = [(self.seconds / 3, self.stack.decode[-1]), (2 * self.seconds / 3, self.stack.prefill[0])]
        while (elapsed := time.monotonic() - self.t0) < self.seconds:
            if faults and elapsed >= faults[0][0]:
                self.kill_and_restart(faults.pop(0)[1])
            self.sample()
            time.sleep(2.0)
        self.stop.set()
        for th in threads:
            th.join(90)
        self.sample()


def check_idle(stack: Stack, timeout_s: float = 30.0) -> list[gen.WorkerStatus]:
    """Once idle, every worker is healthy and holds no KV block; raises AssertionError otherwise."""
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.address))
    deadline = time.monotonic() + timeout_s
    while True:
        workers = list(stub.ClusterStatus(gen.ClusterStatusRequest(), timeout=5).workers)
        if all(w.healthy and w.kv_blocks_free == w.kv_blocks_total for w in workers):
            return workers
        if time.monotonic() > deadline:
            raise AssertionError("not idle and clean: " + ", ".join(
                f"{w.worker_id} healthy={w.healthy} free {w.kv_blocks_free}/{w.kv_blocks_total}" for w in workers))
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a fresh tiny llama)")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/soak.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="tandem-soak-"))
    model = args.model
    if model is None:
        from training.tiny import make_tiny_model
        model = str(make_tiny_model(workdir / "model", "llama", max_position_embeddings=1024))
    stack = Stack(model, prefill_workers=1, decode_workers=2, engine_args=ENGINE, workdir=workdir / "stack",
                  decode_args=["--num-kv-blocks", "64", "--kv-timeout", "5"], prefill_args=["--kv-timeout", "5"],
                  gateway_args=["--local-prefill-threshold", "16", "--max-inflight", "16"])
    stack.start()
    try:
        soak = Soak(stack, args.minutes * 60, args.clients, args.seed)
        soak.run()
        workers = check_idle(stack)
        soak.sample()
    finally:
        stack.stop()
    return report(soak, workers, args)


def report(soak: Soak, workers: list[gen.WorkerStatus], args: argparse.Namespace) -> int:
    problems = [f"{n} requests ended {code}" for code, n in soak.outcomes.items() if code not in EXPECTED]
    rss = {}
    for inc in soak.procs.values():
        g = inc.growth(warmup_s=min(30.0, soak.seconds / 6))
        if g is None:
            continue
        start, end = g
        rss[f"{inc.name}[{inc.pid}]"] = {"warm_mib": round(start / 2**20, 1), "end_mib": round(end / 2**20, 1)}
        if end - start > max(RSS_GROWTH_BOUND[0] * start, RSS_GROWTH_BOUND[1]):
            problems.append(f"{inc.name} (pid {inc.pid}) grew from {start >> 20} to {end >> 20} MiB")
    lat = sorted(soak.latencies)
    result = {
        "minutes": args.minutes, "clients": args.clients, "requests": sum(soak.outcomes.values()),
        "outcomes": dict(soak.outcomes), "tokens": soak.tokens,
        "latency_s": {"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)]} if lat else {},
        "rss": rss, "blocks_free_at_end": {w.worker_id: f"{w.kv_blocks_free}/{w.kv_blocks_total}" for w in workers},
        "problems": problems, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
