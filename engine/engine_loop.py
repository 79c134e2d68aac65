"""Runs an `Engine` on its own thread, fail-stop, so that a worker's asyncio loop never waits on the model.

    asyncio / KV I/O threads            engine thread (owns every Request and the scheduler)
    ------------------------            -------------
    add(req) ---------\\
    abort(id) ---------+-- commands -->  run commands (each guarded: one that raises fails only its
    submit(fn) -------/                 request, or is logged and counted)
                                        schedule() -> hooks.before_execute(step)
                                        execute()  -> hooks.on_layer_done(step, layer)   (the forward)
                                        process()  -> hooks.after_process(step, outputs)
                                        observers (guarded: a metrics/tracing bug is logged and counted)
                                        each output to the text maker; finished ones leave the table
    snapshot (any thread, no lock)  <-- published after every step and every batch of commands

    text (engine.text_thread): detokenizes each output, matches stop strings, calls the Request's `emit`;
    a stop string that ends a choice comes back as a command (the sequence leaves the batch, its blocks
    are freed, `on_text_stop` observes it). On a text thread of its own for an accelerator's engine; on
    the CPU the engine thread makes it right after each step, where that is cheaper (`text_thread`).

Fail-stop: if schedule/execute/process or a hook raises, or a step makes no progress for `watchdog_s`,
the loop is dead: every Request hears `EngineDied` at once (its `fail`), `dead` is set and `on_death`
runs (the worker turns unhealthy and exits for its supervisor to restart it).

Nothing but the engine thread touches the scheduler, the block manager or the Request table while
the loop is alive; other threads ask through commands. After death the table is frozen and failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from engine.engine import Engine
from engine.model_runner import StepInput
from engine.outputs import DuplicateRequest, EngineDied, RequestGone, RequestOutput, StepOutput
from engine.overlap import OverlapRunner, without_finished
from engine.sampling.sampler import SamplerOutput
from engine.sequence import Sequence
from engine.text_thread import Delivery, TextMaker, TextThread

logger = logging.getLogger(__name__)
T = TypeVar("T")


def helper_threads_pay(device: torch.device) -> bool:
    """Whether a loop's helper threads (the forward thread of async scheduling, the text thread) are on
    by default: on an accelerator, where the forward waits on the device with the GIL free; not on the
    CPU, where their Python shares the GIL with the engine thread's and each hand-off costs more than the
    work it moves (docs/ARCHITECTURE.md, "Threads")."""
    return device.type != "cpu"

_IDLE_WAIT_S = 0.05
_WATCHDOG_TICK_S = 0.25


@dataclass(eq=False)
class Request:
    """One request's record: created by a worker's RPC handler, owned by the engine thread once added.

    seq: the engine's sequence (validated by `Engine.make_sequence` before add): choice 0 of the
        request's `seq.params.n`, which forks the others (they share its request id).
    emit(output): called on the engine thread for every output; must be quick and thread-safe
        (e.g. `loop.call_soon_threadsafe`). Each choice's output with finished=True is its last; the
        last choice to finish is the request's last output.
    fail(exc): ends the request with an error instead; thread-safe and idempotent (it may be called
        from the watchdog while the engine thread hangs). After emit(finished) or fail, nothing more.
    Worker-specific state lives in subclasses (prefill_worker.worker, decode_worker.worker).
    """

    seq: Sequence
    emit: Callable[[RequestOutput], object]
    fail: Callable[[BaseException], object]
    arrived: float = field(default_factory=time.monotonic)
    streams: bool = True  # False: deliver() leaves its outputs to the worker's hooks (prefill)
    unfinished: int = -1  # choices still running (set from seq.params.n)

    def __post_init__(self) -> None:
        if self.unfinished < 0:
            self.unfinished = self.seq.params.n

    @property
    def id(self) -> str:
        return self.seq.request_id


class StepHooks(Protocol):
    """A worker's part of each step, on the engine thread. A hook that raises kills the loop."""

    def before_execute(self, step: StepInput) -> None: ...
    def on_layer_done(self, step: StepInput, layer: int) -> None: ...
    def after_process(self, step: StepInput, outputs: list[RequestOutput]) -> None: ...


# (step, outputs, t_exec_ns, t_done_ns): perf_counter_ns around execute + process, before delivery
Observer = Callable[[StepInput, StepOutput, int, int], None]


@dataclass(frozen=True)
class EngineSnapshot:
    """What Status and /metrics read: engine counters and the loop's own, as of the last publish."""

    stats: Mapping[str, int]
    requests: int = 0  # records in the table (running, waiting, waiting for KV, transferring)
    steps: int = 0
    command_errors: int = 0
    observer_errors: int = 0
    published: float = 0.0  # monotonic


class EngineLoop:
    """Interface (any thread unless noted):

    add(req, schedule) the request joins the table and, with schedule=True, the scheduler (a decode
                       worker keeps one waiting for its KV out of the scheduler); outputs go to req.emit
    abort(id, reason)  end it: its sequence is aborted (blocks freed) and req.fail(RequestGone(reason))
    submit(fn)         run fn() on the engine thread before the next step (guarded)
    requests           engine thread only: id -> Request, every live request of this worker
    deliver(out)       engine thread only: hand one output to its request
    fail_all(exc)      fail every live request (the loop's death, or a worker shutting down)
    snapshot / dead / error      published state; `dead` is set once, with `error` its cause
    tick               engine thread: run after every batch of commands and every step (guarded)
    """

    def __init__(self, engine: Engine, *, name: str = "engine", hooks: StepHooks | None = None,
                 observers: list[Observer] | None = None, watchdog_s: float | None = None,
                 on_death: Callable[[BaseException], None] | None = None,
                 gauges: Callable[[], Mapping[str, int]] | None = None,
                 tick: Callable[[], None] | None = None, fault: tuple[str, int] | None = None,
                 text_thread: bool | None = None,
                 on_text_stop: Callable[[RequestOutput], None] | None = None) -> None:
        """`text_thread`: detokenize on a thread of its own (True) or on the engine thread right after each
        step (False); None: a thread for an accelerator, the engine thread on the CPU (`helper_threads_pay`).
        `on_text_stop(out)`: engine thread, observes a choice a stop string ended (guarded). `fault` injects a failure for tests (docs/ARCHITECTURE.md): ("raise", N) makes step N raise,
        ("hang", N) makes it hang (for the watchdog to find)."""
        if watchdog_s is not None and watchdog_s <= 0:
            raise ValueError(f"watchdog_s must be > 0 or None, got {watchdog_s}")
        self._fault = fault
        self.engine = engine
        self.hooks = hooks
        self.observers = list(observers or [])
        self.watchdog_s = watchdog_s
        self.on_death = on_death
        self.gauges = gauges  # engine thread: worker counters published with each snapshot
        self.tick = tick
        self.requests: dict[str, Request] = {}
        self._adding: set[Request] = set()  # added, their command not run yet: death fails them too
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dead = threading.Event()
        self.error: BaseException | None = None
        self._death_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._busy_since: float | None = None  # monotonic start of the step in progress
        self._steps = self._command_errors = self._observer_errors = 0
        self.snapshot = EngineSnapshot(engine.stats())
        self.on_text_stop = on_text_stop
        # Overlapped steps (engine.overlap): a forward thread runs step N while this thread schedules
        # and prepares N+1, then processes N. Not with hooks (a prefill worker's KV transfer follows
        # each forward), with speculation (drafts need the last token) or tensor parallelism (rank 0
        # drives its followers' collectives and KV relay step by step on the engine thread).
        self._overlap: OverlapRunner | None = None
        self._forward: ThreadPoolExecutor | None = None
        self._inflight: tuple[StepInput, Future[SamplerOutput | None], int] | None = None
        overlap = engine.config.async_scheduling
        if overlap is None:
            overlap = helper_threads_pay(engine.runner.device)
        if overlap and hooks is None and engine.spec is None and engine.runner.tp is None:
            self._overlap = OverlapRunner(engine.runner)
            self._forward = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-forward")
        engine.inline_text = False  # outputs leave a step as token ids; the text maker makes their text
        self._maker = TextMaker(self._stopped_by_text)
        self._text: TextThread | None = None
        if text_thread if text_thread is not None else helper_threads_pay(engine.runner.device):
            self._text = TextThread(f"{name}-text", self._maker,
                                    lambda exc: self._die(exc, f"text thread died: {type(exc).__name__}: {exc}"))

    def start(self) -> None:
        if self._text is not None:
            self._text.start()
        self._thread.start()
        if self.watchdog_s is not None:
            self._watchdog.start()

    def kill(self, message: str) -> None:
        """Declare the loop dead from outside (a tensor-parallel rank died): every request fails with
        EngineDied(message) at once, as when a step raises. Any thread; idempotent."""
        self._die(EngineDied(message), message)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._text is not None:
            self._text.stop(timeout)
        if self._forward is not None:
            # let the forward thread finish what it runs and drop it (a GPU engine's CUDA graphs with it,
            # which must not be freed while another engine captures its own), never waiting on a hung forward
            with contextlib.suppress(Exception):
                self._forward.submit(lambda: None).result(timeout)
            self._forward.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------------------- commands
    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread before the next step. A command that raises is logged and
        counted; it does not stop the loop. Ignored once the loop is dead."""
        self._commands.append(fn)
        self._wake.set()

    def add(self, req: Request, *, schedule: bool = True, then: Callable[[], None] | None = None) -> None:
        """Register `req` (and queue its sequence for the scheduler unless `schedule` is False), then
        run `then` on the engine thread. A dead loop fails it at once; a live duplicate id fails it
        with DuplicateRequest, leaving the live one alone."""
        self._adding.add(req)
        if self.dead.is_set():
            self._adding.discard(req)
            req.fail(EngineDied(f"engine is dead: {self.error}"))
            return

        def add() -> None:
            self._adding.discard(req)
            if req.id in self.requests:
                req.fail(DuplicateRequest(f"request id {req.id!r} is already live on this worker"))
                return
            self.requests[req.id] = req
            if schedule:
                self.engine.scheduler.add(req.seq)
            if then is not None:
                then()

        self._command(req, add)

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        def abort() -> None:
            req = self.requests.pop(request_id, None)
            self.engine.abort(request_id)
            if req is not None:
                req.fail(RequestGone(reason))

        self.submit(abort)

    def _command(self, req: Request, fn: Callable[[], None]) -> None:
        """`fn` as a command that fails `req` (not the loop) if it raises."""
        def guarded() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a bug in one request's command fails that request
                self._command_errors += 1
                logger.exception("command for request %s failed", req.id)
                if self.requests.get(req.id) is req:
                    del self.requests[req.id]
                    self.engine.abort(req.id)
                req.fail(exc)

        self.submit(guarded)

    def deliver(self, out: RequestOutput) -> None:
        """Engine thread only: hand `out` to its request (which leaves the table once every choice finished)."""
        self.deliver_all(StepOutput([out]))

    def deliver_all(self, outputs: StepOutput) -> None:
        """Engine thread only: hand a step's outputs to their requests (one hand-off to the text maker,
        which makes the plain decodes' RequestOutputs). Making text that raises kills the loop, on
        either thread."""
        requests = self.requests
        batch: list[tuple[Request, RequestOutput]] = []
        for out in outputs.outputs:
            req = requests.get(out.request_id)
            if req is None or not req.streams:
                continue
            if out.finished:
                req.unfinished -= 1
                if req.unfinished <= 0:
                    del requests[out.request_id]
            batch.append((req, out))
        get = requests.get
        plain = [get(seq.request_id) for seq in outputs.seqs]  # the plain decodes' requests: none finished
        if not batch and not plain:
            return
        if self._text is not None:
            self._text.put(Delivery(batch, outputs, plain))
            return
        try:
            self._maker.deliver(Delivery(batch, outputs, plain))
        except Exception as exc:  # noqa: BLE001 - fail-stop, as the text thread's death is
            self._die(exc, f"making text failed: {type(exc).__name__}: {exc}")

    def _stopped_by_text(self, req: Request, out: RequestOutput) -> None:
        """The text maker: a stop string ended one of `req`'s choices at `out`; the engine learns it
        before its next step."""
        def stopped() -> None:
            assert out.seq is not None
            if not self.engine.stop_by_text(out.seq, out.num_output_tokens, out.stop_reason):
                return  # the engine had finished it (and deliver counted it) or it was aborted
            if self.on_text_stop is not None:
                self.observe(self.on_text_stop, out, default=None)
            req.unfinished -= 1
            if req.unfinished <= 0 and self.requests.get(req.id) is req:
                del self.requests[req.id]

        self.submit(stopped)

    def observe(self, fn: Callable[..., T], *args: object, default: T) -> T:
        """`fn(*args)` for an observer (metrics, tracing): if it raises, log and count it and return
        `default`; an observer's bug never stops serving."""
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001
            self._observer_errors += 1
            logger.exception("engine observer failed (serving goes on)")
            return default

    def fail_all(self, exc: BaseException) -> None:
        """Fail every live request with `exc`, and every one still being added (any thread; the
        table is not modified)."""
        for req in [*self.requests.values(), *list(self._adding)]:
            try:
                req.fail(exc)
            except Exception:  # noqa: BLE001 - one broken callback must not keep the others waiting
                logger.exception("failing request %s raised", req.id)

    # ------------------------------------------------------------------- loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self.dead.is_set():
                ran = self._drain_commands()
                self._tick()
                if not self.engine.has_unfinished() and self._inflight is None:
                    if ran:
                        self._publish()
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                if self._overlap is not None:
                    self._step_overlapped(self._overlap)
                else:
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - fail-stop: every request hears it
            self._die(exc, f"engine thread died: {type(exc).__name__}: {exc}")

    def _drain_commands(self) -> bool:
        ran = False
        while self._commands and not self.dead.is_set():
            fn = self._commands.popleft()
            ran = True
            try:
                fn()
            except Exception:  # noqa: BLE001 - logged and counted; the loop goes on
                self._command_errors += 1
                logger.exception("engine command failed")
        return ran

    def _tick(self) -> None:
        if self.tick is None:
            return
        try:
            self.tick()
        except Exception:  # noqa: BLE001 - logged and counted; the loop goes on
            self._command_errors += 1
            logger.exception("engine tick failed")

    def _step(self) -> None:
        eng = self.engine
        self._busy_since = time.monotonic()
        step = eng.schedule()
        if step is None:
            self._busy_since = None
            self._wake.wait(0.01)
            self._wake.clear()
            return
        t_exec = time.perf_counter_ns()
        if self._fault is not None and self._steps + 1 == self._fault[1]:
            self._inject(self._fault[0])
        if self.hooks is not None:
            self.hooks.before_execute(step)
        hook = self.hooks.on_layer_done if self.hooks is not None else None
        sampled = eng.execute(step, hook)
        outputs = eng.process_step(step, sampled)
        if self.hooks is not None:
            self.hooks.after_process(step, outputs.all())
        self._busy_since = None
        self._steps += 1
        t_done = time.perf_counter_ns()
        for observer in self.observers:
            self.observe(observer, step, outputs, t_exec, t_done, default=None)
        self.deliver_all(outputs)
        self._publish()

    def _step_overlapped(self, overlap: OverlapRunner) -> None:
        """Schedule and prepare the next step while the one in flight runs, then process that one
        (engine.overlap); a step that cannot overlap runs serially once the one in flight is done."""
        eng = self.engine
        self._busy_since = time.monotonic()
        step = eng.schedule() if eng.has_unfinished() else None
        launched = None
        if step is not None:
            if self._fault is not None and self._steps + 1 == self._fault[1]:
                self._inject(self._fault[0])
            if not overlap.can_overlap(step):
                if self._inflight is not None:
                    self._finish_inflight()
                overlap.forget()
                t_exec = time.perf_counter_ns()
                step = without_finished(step)  # some may have finished in the step just processed
                if step is not None:
                    self._finish(step, eng.process_step(step, eng.execute(step)), t_exec)
                self._busy_since = None
                return
            prep = overlap.prepare(step)
            overlap.launch(step)
            assert self._forward is not None
            launched = (step, self._forward.submit(overlap.run, prep), time.perf_counter_ns())
        if self._inflight is not None:
            self._finish_inflight()
        self._inflight = launched
        self._busy_since = None
        if launched is None:
            self._wake.wait(0.01)
            self._wake.clear()

    def _finish_inflight(self) -> None:
        assert self._inflight is not None
        step, future, t_exec = self._inflight
        self._inflight = None
        self._finish(step, self.engine.process_step(step, future.result()), t_exec)

    def _finish(self, step: StepInput, outputs: StepOutput, t_exec: int) -> None:
        """A processed step: observers, outputs to their requests, the snapshot."""
        self._steps += 1
        t_done = time.perf_counter_ns()
        for observer in self.observers:
            self.observe(observer, step, outputs, t_exec, t_done, default=None)
        self.deliver_all(outputs)
        self._publish()

    def _inject(self, kind: str) -> None:
        logger.warning("injecting fault %r at step %d", kind, self._steps + 1)
        if kind == "raise":
            raise RuntimeError(f"injected fault at step {self._steps + 1}")
        while not self._stop.is_set():  # "hang": a step that never ends
            time.sleep(0.1)

    def _publish(self) -> None:
        stats = dict(self.engine.stats())
        if self.gauges is not None:
            stats.update(self.gauges())
        self.snapshot = EngineSnapshot(stats, len(self.requests), self._steps, self._command_errors,
                                       self._observer_errors, time.monotonic())

    # ------------------------------------------------------------------ death
    def _die(self, cause: BaseException, message: str) -> None:
        with self._death_lock:
            if self.dead.is_set():
                return
            self.error = cause
            self.dead.set()
        logger.critical("%s", message, exc_info=cause if not isinstance(cause, EngineDied) else None)
        self.fail_all(EngineDied(message))
        if self.on_death is not None:
            try:
                self.on_death(cause)
            except Exception:  # noqa: BLE001
                logger.exception("on_death raised")

    def _watch(self) -> None:
        """Declare the loop dead when one step runs longer than `watchdog_s` of this thread's own
        time: time while the whole process was stopped (SIGSTOP, a suspended VM) does not count, since
        each tick adds at most two tick lengths however long it really slept."""
        assert self.watchdog_s is not None
        stalled, last, seen = 0.0, time.monotonic(), None
        while not self._stop.is_set() and not self.dead.is_set():
            time.sleep(_WATCHDOG_TICK_S)
            now = time.monotonic()
            tick = min(now - last, 2 * _WATCHDOG_TICK_S)
            last = now
            busy = self._busy_since
            if busy is None or busy != seen:
                stalled, seen = 0.0, busy
                continue
            stalled += tick
            if stalled > self.watchdog_s:
                self._die(EngineDied(f"a step made no progress for {stalled:.1f} s"),
                          f"engine watchdog: a step made no progress for {stalled:.1f} s (limit {self.watchdog_s} s)")
                return

