"""Server-sent events for the HTTP API: opening an event stream, writing one event, and merging the
message streams of a batch of prompts into one.

    data: {json}\n\n                       chat and completion chunks (then "data: [DONE]")
    event: <type>\ndata: {json}\n\n        the Responses API's named events
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web

from tandem.v1 import generation_pb2 as gen

Stream = AsyncIterator[gen.GenerateResponse]
_DEPTH = 64  # messages queued from a batch's streams before their producers wait for the client


async def open_stream(http: web.Request, request_id: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Request-Id": request_id})
    await resp.prepare(http)
    return resp


async def send_event(resp: web.StreamResponse, obj: dict[str, Any], named: bool = False) -> None:
    """One server-sent event; `named`: with an `event:` line of its type (the Responses API's form)."""
    head = f"event: {obj.get('type', 'error')}\n".encode() if named else b""
    await resp.write(head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


async def merged(firsts: Sequence[gen.GenerateResponse], streams: Sequence[Stream]
                 ) -> AsyncIterator[tuple[int, gen.GenerateResponse]]:
    """(stream index, message) from several streams as they come, each stream's first message (already
    read: `firsts`) first. A stream that fails fails the whole; the caller closes the streams, which
    aborts the others. A client that stops reading stalls every producer once _DEPTH messages wait,
    so each stream's own read timeout (gateway.service.bounded_by_reader) still applies."""
    for i, first in enumerate(firsts):
        yield i, first
    if len(streams) == 1:
        async for msg in streams[0]:
            yield 0, msg
        return
    queue: asyncio.Queue[tuple[int, gen.GenerateResponse | BaseException | None]] = asyncio.Queue(maxsize=_DEPTH)

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for msg in stream:
                await queue.put((i, msg))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
