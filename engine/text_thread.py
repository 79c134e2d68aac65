"""Detokenization and stop strings after the engine's step: on a thread of their own, or, where that
is cheaper, on the engine thread right after the step (engine.engine_loop.helper_threads_pay).

    engine thread (EngineLoop)                        TextMaker (text thread, or the engine thread)
    --------------------------                        ---------------------------------------------
    process() -> StepOutput: token ids, no text
    deliver_all(step output) --- one Delivery ------>  a RequestOutput for each plain decode row;
                          per step, FIFO              seq.detokenizer.step(out's tokens): the text made
                                                      final, stop strings held back and matched
                                                      request.emit(output with its text)
                                                      a stop string matched: the output is cut after the
                                                      token that completed it, finished with STOP, and
    command: stopped(request, output) <--------------  later outputs of that choice are dropped
    Engine.stop_by_text: the sequence leaves the
    batch, its blocks are freed, tokens it made
    since are dropped from it

With a text thread the engine thread never waits for text. A sequence a stop string ended runs on for the
steps already under way when the command arrives: made on the engine thread, at most the one already
launched (overlap), since commands run before every step; on a text thread, also the steps the engine
ran while the text thread caught up (one or two when it keeps up, more on a loaded box). Only the text
maker touches a sequence's detokenizer once the sequence is delivered to it; the sequence itself stays
the engine thread's (the maker reads only the output it was handed and the sequence's fixed params), so
what the stop changes in it is done by the command.

Where: a thread pays where the forward leaves the GIL free long enough to hide the text (a GPU step
waits on the device). On the CPU the threads' Python shares the GIL and each step's handoff costs more
than it hides: the near-free model's steps at batch 256 are 12-14 % cheaper with the text made on the
engine thread (docs/benchmarks.md), and a real model's step is so long that its text is noise either way.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from engine.outputs import FinishReason, RequestOutput, StepOutput, plain_output
from kernels import fast_new

if TYPE_CHECKING:
    from engine.engine_loop import Request

logger = logging.getLogger(__name__)


class Delivery(NamedTuple):
    """One step's outputs for the text maker, in the order the engine made them: `outputs` with
    their requests, then the plain decode rows of `step` (`engine.outputs.plain_output`): plain[i] is
    row i's request (None, or one that does not stream: nothing to deliver)."""

    outputs: list[tuple[Request, RequestOutput]]
    step: StepOutput
    plain: list[Request | None]


def add_text(out: RequestOutput) -> tuple[RequestOutput, bool] | None:
    """`out` with the text its tokens make final (the sequence's detokenizer advances), or None when
    its choice already ended on a stop string (the output is dropped). The flag says a stop string
    ended the choice in this output before the engine did: the engine must stop it too.

    A stop string completed by token j of the output keeps tokens ..j (their logprobs too) and
    finishes with STOP, unless the engine finished the choice on that same token (EOS, length), whose
    reason stands, as when text was made inline.
    """
    seq = out.seq
    detok = seq.detokenizer if seq is not None else None
    if detok is None or (seq is not None and seq.prefill_only):
        return out, False
    if detok.finished:
        return None
    before = detok.num_output_tokens
    text = detok.step(out.new_token_ids)
    if detok.stop_reason is None:
        if out.finished:
            text += detok.flush()
        out.new_text = text  # the engine thread handed `out` over: this thread owns it now
        return out, False
    kept = detok.num_output_tokens - before
    dropped = len(out.new_token_ids) - kept
    engine_finished = out.finished and dropped == 0
    cut = dataclasses.replace(
        out, new_token_ids=out.new_token_ids[:kept], new_text=text, finished=True,
        finish_reason=out.finish_reason if engine_finished else FinishReason.STOP,
        num_output_tokens=out.num_output_tokens - dropped, new_logprobs=out.new_logprobs[:kept],
        stop_reason=out.stop_reason if engine_finished else detok.stop_reason,
    )
    return cut, not engine_finished


class TextMaker:
    """Interface: `deliver(delivery)` on whichever thread makes the text (in the order the outputs are
    made). `stopped(req, out)` is called there for an output a stop string finished before the engine
    did (the owner turns it into an engine-thread command). An EngineLoop calls `deliver` on the engine
    thread itself where that is cheaper (the CPU: see `helper_threads_pay`), else a `TextThread` does."""

    def __init__(self, stopped: Callable[[Request, RequestOutput], None]) -> None:
        self._stopped = stopped
        self._new_output = fast_new.constructor(RequestOutput)  # a plain decode's output, made per row

    def deliver(self, delivery: Delivery) -> None:
        for req, out in delivery.outputs:
            self._emit(req, out)
        self._emit_plain(delivery.step, delivery.plain)

    def _emit_plain(self, step: StepOutput, requests: list[Request | None]) -> None:
        """The step's plain decodes (one token each, none finished): without stop strings, `add_text`
        comes down to the detokenizer's next piece, made here inline; the others go through it."""
        rows = zip(requests, step.seqs, step.tokens, step.num_output_tokens, strict=True)
        new = self._new_output
        for req, seq, token, count in rows:
            if req is None or not req.streams:
                continue
            detok = seq.detokenizer
            if detok is None or detok.finished or seq.params.stop:
                self._emit(req, plain_output(seq, token, count, "", new))
                continue
            req.emit(plain_output(seq, token, count, detok.next_token(token), new))

    def _emit(self, req: Request, out: RequestOutput) -> None:
        result = add_text(out)
        if result is None:
            return
        final, stopped = result
        if stopped:
            self._stopped(req, final)
        req.emit(final)


class TextThread:
    """A `TextMaker` on a thread of its own. Interface: `put(delivery)` from the engine thread (in the
    order the outputs are made); `stop()` from any thread; `on_error(exc)` if making text raises (the
    owner's fail-stop)."""

    def __init__(self, name: str, maker: TextMaker, on_error: Callable[[BaseException], None]) -> None:
        self._queue: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._maker = maker
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, delivery: Delivery) -> None:
        self._queue.put(delivery)

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while (delivery := self._queue.get()) is not None:
                self._maker.deliver(delivery)
        except BaseException as exc:  # noqa: BLE001 - the owner's fail-stop: every request hears it
            logger.exception("text thread died")
            self._on_error(exc)
