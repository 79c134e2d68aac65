"""server.inbox: outputs from other threads reach their asyncio queues complete, in order, with one
loop wake-up per burst; a closed loop is an error, not a silent drop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.inbox import Inbox


def test_two_threads_bursts_arrive_in_order_with_few_wakeups() -> None:
    async def main() -> tuple[dict[int, list[tuple[int, int]]], int]:
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        queues = [asyncio.Queue[tuple[int, int]]() for _ in range(3)]
        n = 3000

        def produce(who: int) -> None:
            for i in range(n):
                inbox.put(queues[i % 3], (who, i))

        threads = [threading.Thread(target=produce, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        got: dict[int, list[tuple[int, int]]] = {q: [] for q in range(3)}
        while sum(len(v) for v in got.values()) < 2 * n:
            for q in range(3):
                while not queues[q].empty():
                    got[q].append(queues[q].get_nowait())
            await asyncio.sleep(0.001)
        for t in threads:
            t.join()
        return got, inbox.wakeups

    got, wakeups = asyncio.run(main())
    assert sum(len(v) for v in got.values()) == 6000
    for q, items in got.items():
        for who in (0, 1):
            mine = [i for w, i in items if w == who]
            assert mine == list(range(q, 3000, 3))  # each producer's items, in its order
    assert wakeups < 6000  # bursts share wake-ups


def test_a_blocked_loop_gets_a_whole_burst_from_one_wakeup() -> None:
    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        queue: asyncio.Queue[int] = asyncio.Queue()
        release = threading.Event()
        loop.call_soon(release.wait)  # the loop is busy while the burst is put

        def produce() -> None:
            for i in range(500):
                inbox.put(queue, i)
            release.set()

        t = threading.Thread(target=produce)
        t.start()
        items = [await queue.get() for _ in range(500)]
        t.join()
        return items, inbox.wakeups

    items, wakeups = asyncio.run(main())
    assert items == list(range(500)) and wakeups == 1


def test_a_closed_loop_raises_every_time() -> None:
    loop = asyncio.new_event_loop()
    inbox = Inbox(loop)
    queue: asyncio.Queue[int] = asyncio.Queue()
    loop.close()
    for i in range(2):  # the failed item is not left behind to swallow the next one
        with pytest.raises(RuntimeError):
            inbox.put(queue, i)
