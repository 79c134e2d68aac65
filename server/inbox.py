"""Items from engine threads into asyncio queues, one event-loop wake-up per burst.

A worker's engine thread (or its text thread) hands each request's outputs to the request's asyncio queue. Doing
that with `loop.call_soon_threadsafe(queue.put_nowait, out)` per output costs the calling thread a
lock, a callback object and a write to the loop's self-pipe every time: about 1 ms of a step's 256
outputs, on the thread every step waits for. An `Inbox` appends (queue, item) to one list under a lock
and wakes the loop only when the list was empty; the loop then moves the whole list into the queues:

    engine thread: put(q1, a) [wakes the loop]  put(q2, b)  put(q1, c)  ...
    event loop:    _drain: q1 <- a, q2 <- b, q1 <- c   (put order, so each queue sees its items in order)

One inbox serves every queue of one loop; `put` may be called from any thread, the loop's own included.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class Inbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self.wakeups = 0  # drains scheduled on the loop

    def put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """`queue.put_nowait(item)` on the loop, after every item put before it. Raises RuntimeError
        when the loop is closed (as `call_soon_threadsafe` does); the item is then dropped."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) == 1:  # the first since the last drain: the loop has to be woken
                self.wakeups += 1
                try:
                    self.loop.call_soon_threadsafe(self._drain)
                except RuntimeError:
                    self._items.clear()
                    raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
