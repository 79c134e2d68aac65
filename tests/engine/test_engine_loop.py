"""The engine loop is fail-stop: a dying or hanging engine fails every request at once; a command's
or an observer's bug does not stop serving. Real engines on a tiny checkpoint, real threads."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop, Request
from engine.model_runner import StepInput
from engine.outputs import DuplicateRequest, EngineDied, RequestGone, RequestOutput
from engine.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(EngineConfig(model=str(tiny_model("llama")), device="cpu", dtype="float32", num_kv_blocks=64,
                               block_size=8, max_num_batched_tokens=64))


class Client:
    """One request's end of the loop: what emit and fail deliver, in order."""

    def __init__(self, engine: Engine, rid: str, max_tokens: int = 8) -> None:
        self.events: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        seq = engine.make_sequence(rid, [1, 2, 3, 4, 5], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                        ignore_eos=True))
        self.req = Request(seq, self.events.put, self.events.put)

    def outcome(self, timeout: float = 10.0) -> RequestOutput | BaseException:
        """The last output, or the failure."""
        while True:
            item = self.events.get(timeout=timeout)
            if isinstance(item, BaseException) or item.finished:
                return item


class Hooks:
    """A worker's hooks; `fail_at` / `hang_at` make step N raise or hang, like a broken device."""

    def __init__(self, fail_at: int = 0, hang_at: int = 0) -> None:
        self.steps, self.fail_at, self.hang_at = 0, fail_at, hang_at
        self.release = threading.Event()

    def before_execute(self, step: StepInput) -> None:
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.steps == self.hang_at:
            self.release.wait(30)

    def on_layer_done(self, step: StepInput, layer: int) -> None:
        pass

    def after_process(self, step: StepInput, outputs: list[RequestOutput]) -> None:
        pass


def wait_free(engine: Engine, loop: EngineLoop, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = loop.snapshot.stats
        if s["kv_blocks_free"] == s["kv_blocks_total"] and not loop.requests:
            return
        time.sleep(0.02)
    raise AssertionError(f"blocks held: {loop.snapshot.stats}")


def test_requests_finish_and_blocks_come_back(engine) -> None:
    loop = EngineLoop(engine)
    loop.start()
    try:
        clients = [Client(engine, f"r{i}") for i in range(4)]
        for c in clients:
            loop.add(c.req)
        for c in clients:
            out = c.outcome()
            assert isinstance(out, RequestOutput) and out.num_output_tokens == 8
        wait_free(engine, loop)
    finally:
        loop.stop()


def test_an_engine_that_raises_fails_every_request_within_a_second(engine) -> None:
    died: list[BaseException] = []
    loop = EngineLoop(engine, hooks=Hooks(fail_at=3), on_death=died.append)
    loop.start()
    try:
        running = [Client(engine, f"run{i}", max_tokens=50) for i in range(3)]
        for c in running:
            loop.add(c.req)
        t0 = time.monotonic()
        outcomes = [c.outcome() for c in running]
        assert time.monotonic() - t0 < 1.0 + 1.0  # the steps before the fault, then at once
        assert all(isinstance(o, EngineDied) and "illegal memory access" in str(o) for o in outcomes)
        assert loop.dead.is_set() and died and "illegal memory access" in str(loop.error)
        late = Client(engine, "late")
        loop.add(late.req)  # a dead loop refuses at once
        assert isinstance(late.outcome(timeout=1.0), EngineDied)
    finally:
        loop.stop()
        engine.scheduler.running.clear()  # the dead loop's sequences: reset the shared engine
        engine.scheduler.waiting.clear()
        for seq in [c.req.seq for c in running]:
            engine.block_manager.free(seq)


def test_a_step_that_hangs_is_death_for_the_watchdog(engine) -> None:
    hooks = Hooks(hang_at=2)
    loop = EngineLoop(engine, hooks=hooks, watchdog_s=1.0)
    loop.start()
    c = Client(engine, "stuck", max_tokens=50)
    try:
        loop.add(c.req)
        t0 = time.monotonic()
        out = c.outcome(timeout=10)
        assert isinstance(out, EngineDied) and "no progress" in str(out)
        assert 1.0 <= time.monotonic() - t0 < 3.0
        assert loop.dead.is_set()
    finally:
        hooks.release.set()
        loop.stop()
        engine.scheduler.running.clear()
        engine.scheduler.waiting.clear()
        engine.block_manager.free(c.req.seq)


def test_a_command_that_raises_fails_only_its_request(engine) -> None:
    loop = EngineLoop(engine)
    loop.start()
    try:
        good = Client(engine, "good")
        loop.add(good.req)
        bad = Client(engine, "bad")

        def broken() -> None:
            raise KeyError("a bug in one request's command")

        loop.add(bad.req, then=broken)
        assert isinstance(bad.outcome(), KeyError)
        assert isinstance(good.outcome(), RequestOutput)
        loop.submit(lambda: 1 / 0)  # a stray command's bug: logged and counted
        again = Client(engine, "again")
        loop.add(again.req)
        assert isinstance(again.outcome(), RequestOutput)
        assert not loop.dead.is_set() and loop.snapshot.command_errors == 2
        wait_free(engine, loop)
    finally:
        loop.stop()


def test_an_observer_that_raises_never_stops_serving(engine) -> None:
    calls = []

    def broken(*args: object) -> None:
        calls.append(1)
        raise ValueError("a metrics bug")

    loop = EngineLoop(engine, observers=[broken])
    loop.start()
    try:
        c = Client(engine, "observed")
        loop.add(c.req)
        assert isinstance(c.outcome(), RequestOutput)
        assert calls and loop.snapshot.observer_errors == len(calls) and not loop.dead.is_set()
        wait_free(engine, loop)
    finally:
        loop.stop()


def test_abort_and_a_duplicate_id(engine) -> None:
    loop = EngineLoop(engine)
    loop.start()
    try:
        first = Client(engine, "same", max_tokens=200)
        loop.add(first.req)
        second = Client(engine, "same")
        loop.add(second.req)
        assert isinstance(second.outcome(), DuplicateRequest)  # the live one is left alone
        loop.abort("same", "the client went away")
        out = first.outcome()
        assert isinstance(out, RequestGone) and "went away" in str(out)
        wait_free(engine, loop)
    finally:
        loop.stop()


def test_injected_fault_raises_at_its_step(tmp_path: Path, engine) -> None:
    loop = EngineLoop(engine, fault=("raise", 2))
    loop.start()
    c = Client(engine, "f", max_tokens=20)
    try:
        loop.add(c.req)
        out = c.outcome()
        assert isinstance(out, EngineDied) and "injected fault at step 2" in str(out)
    finally:
        loop.stop()
        engine.scheduler.running.clear()
        engine.scheduler.waiting.clear()
        engine.block_manager.free(c.req.seq)
