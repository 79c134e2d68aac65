"""Runs an `Engine` on its own thread so that a worker's asyncio loop never waits on the model.

    asyncio thread                      engine thread                         other threads (kvtransfer)
    --------------                      -------------                         --------------------------
    submit(fn) ----- command queue ---> run commands (under lock)
                                        schedule()            (under lock)
                                        execute() -> forward  (no lock)  ---> hooks: layer_done, ...
                                        process()             (under lock)
    sink(out) <-- call_soon_threadsafe  outputs to each request's sink
                                                                               reserve/release blocks
                                                                               (take `lock`)

Every mutation of the scheduler happens on the engine thread; the block manager is also touched by
KV-transfer callbacks, which hold `lock`. A sink is called on the engine thread and must be quick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from engine.engine import Engine
from engine.model_runner import StepInput
from engine.outputs import RequestOutput
from engine.sampling.sampler import SamplerOutput

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


class EngineLoop:
    def __init__(self, engine: Engine, *, name: str = "engine") -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None
        # hooks for the workers; each runs on the engine thread
        self.on_layer_done: Callable[[StepInput, int], None] | None = None
        self.before_execute: Callable[[StepInput], None] | None = None
        self.after_process: Callable[[StepInput, list[RequestOutput]], None] | None = None
        # observability: (step, outputs, t_exec_ns, t_done_ns) perf_counter_ns around execute+process,
        # called before the outputs are delivered
        self.on_step: Callable[[StepInput, list[RequestOutput], int, int], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # --------------------------------------------------------------- commands
    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread, under the lock, before the next step."""
        self._commands.append(fn)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params, sink: Sink, **seq_fields) -> None:
        """Validate now (raises ValueError), queue for the engine thread."""
        seq = self.engine.make_sequence(request_id, prompt_token_ids, params)
        for key, value in seq_fields.items():
            setattr(seq, key, value)

        def add() -> None:
            self._sinks[request_id] = sink
            self.engine.scheduler.add(seq)

        self.submit(add)

    def register_sink(self, request_id: str, sink: Sink) -> None:
        """Engine thread only: route `request_id`'s outputs to `sink` (sequences added directly)."""
        self._sinks[request_id] = sink

    def abort(self, request_id: str) -> None:
        def abort() -> None:
            self._sinks.pop(request_id, None)
            self.engine.abort(request_id)

        self.submit(abort)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return self.engine.stats()

    # ------------------------------------------------------------------- loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # the worker reports this as unhealthy and fails its requests
            logger.exception("engine thread died")
            self.error = exc

    def _drain_commands(self) -> None:
        while self._commands:
            fn = self._commands.popleft()
            with self.lock:
                fn()

    def _step(self) -> None:
        eng = self.engine
        with self.lock:
            step = eng.schedule()
        if step is None:
            self._wake.wait(0.01)
            self._wake.clear()
            return
        t_exec = time.perf_counter_ns()
        if self.before_execute is not None:
            self.before_execute(step)
        sampled: SamplerOutput | None = eng.execute(step, self.on_layer_done)
        with self.lock:
            outputs = eng.process(step, sampled)
        if self.after_process is not None:
            self.after_process(step, outputs)
        if self.on_step is not None:
            self.on_step(step, outputs, t_exec, time.perf_counter_ns())
        for out in outputs:
            self.deliver(out)

    def deliver(self, out: RequestOutput) -> None:
        """Engine thread only: hand `out` to its request's sink (dropped once finished)."""
        sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
        if sink is not None:
            sink(out)
