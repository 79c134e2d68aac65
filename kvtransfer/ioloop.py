"""The one background thread that owns a KVSender's or KVReceiver's ZeroMQ sockets.

ZeroMQ sockets are not thread-safe, so every socket is created, used and closed on this thread.
Other threads hand it work with `call_soon(fn)`: `fn` goes on a queue and a byte on a pipe wakes
the poller (a pipe is safe to write from any number of threads, unlike an inproc socket).

    caller threads ──call_soon(fn)──► deque + wake pipe ──► I/O thread: poll(sockets, pipe, tick)
                                                              ├─ run queued fns
                                                              ├─ _on_readable(socket)
                                                              └─ _on_tick(now) -> next tick (s)

Everything a subclass does runs on this thread; so do the user callbacks it makes, which must be
short and must not block (they may call back into the public API, which only queues).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)


class IOThread:
    """Base of KVSender and KVReceiver: a started daemon thread plus its ZeroMQ context.

    Subclasses implement `_setup` (create sockets, register them with `self.poller`; an exception
    there is re-raised from `start`), `_on_readable`, `_on_tick` and `_teardown` (release everything,
    close sockets with linger 0). `close()` stops the thread; it is idempotent.
    """

    def __init__(self, name: str) -> None:
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self._closing = False  # no more call_soon
        self._close_called = False
        self._stop = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.error: BaseException | None = None  # why the thread died, if it crashed (workers report it)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- for subclasses -------------------------------------------------------------------------
    def _setup(self) -> None:
        raise NotImplementedError

    def _on_readable(self, sock: zmq.Socket) -> None:
        raise NotImplementedError

    def _on_tick(self, now: float) -> float | None:
        """Periodic work (timeouts, heartbeats); returns seconds until it wants to run again."""
        raise NotImplementedError

    def _teardown(self) -> None:
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closing

    def start(self) -> None:
        """Start the thread and wait for `_setup`; re-raises its exception (then nothing is left open)."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            self._close_fds()
            raise self._start_error

    def call_soon(self, fn: Callable[[], None]) -> bool:
        """Run `fn()` on the I/O thread. Returns False (and drops fn) once close() has begun."""
        if self._closing:
            return False
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the thread will wake
        except OSError:
            return False  # closed under us
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (it runs `_teardown`) and free the context. Idempotent; callable from
        any thread but the I/O thread itself."""
        if self._close_called:
            return
        self._close_called = True
        if threading.current_thread() is self._thread:
            raise RuntimeError("close() called from the KV I/O thread (from a callback?)")
        self.call_soon(self._request_stop)
        self._closing = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("%s did not stop within %.1f s", self._thread.name, timeout_s)
            return
        self._close_fds()

    # -- the loop -------------------------------------------------------------------------------
    def _request_stop(self) -> None:
        self._stop = True

    def _close_fds(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.ctx.destroy(linger=0)  # sockets are closed by _teardown; this only frees the context

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # noqa: BLE001 - handed to start(), which re-raises it
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        try:
            while not self._stop:
                tick = self._on_tick(time.monotonic())
                events = self.poller.poll(None if tick is None else max(0, int(tick * 1000)))
                # Drain the wake pipe before running the queue: a call queued after the drain still
                # has its byte in the pipe, so it wakes the next poll (the other order loses it).
                if any(sock == self._wake_r for sock, _ in events):
                    self._drain_wake()
                self._run_calls()
                for sock, _ in events:
                    if isinstance(sock, zmq.Socket) and not sock.closed:
                        self._on_readable(sock)
        except Exception as exc:
            log.exception("%s crashed; failing every transfer it holds", self._thread.name)
            self.error = exc
        finally:
            self._closing = True  # nothing queued from now on would ever run
            self._run_calls()
            self._teardown()

    def _run_calls(self) -> None:
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("queued call failed on %s", self._thread.name)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
