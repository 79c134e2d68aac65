"""KV transfers between real processes over tcp and ipc: byte-exact copies, and peers killed mid-way."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtransfer import KVSender, TransferCode
from tests.kvtransfer.kvpeers import (
    SHAPE,
    SRC_IDS,
    Allocator,
    digest,
    layout_of,
    make_pool,
    receiver_main,
    sender_main,
)

CTX = mp.get_context("spawn")
TIMEOUT_S = 1.0


def _next(events: Any, event: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        msg = events.get(timeout=max(0.01, deadline - time.monotonic()))
        if msg["event"] == event:
            return msg


@pytest.fixture(scope="module")
def remote_receivers(ipc_dir: Path) -> Iterator[tuple[dict[tuple[str, str], str], Any]]:
    """A receiver process with one KVReceiver per (transport, dtype)."""
    binds = [(("tcp://127.0.0.1:0" if t == "tcp" else f"ipc://{ipc_dir}/rx-{d}"), d)
             for t in ("tcp", "ipc") for d in ("float32", "float16", "bfloat16")]
    events, commands = CTX.Queue(), CTX.Queue()
    proc = CTX.Process(target=receiver_main, args=(binds, 5.0, events, commands), daemon=True)
    proc.start()
    addresses = _next(events, "up")["addresses"]
    keys = [(t, d) for t in ("tcp", "ipc") for d in ("float32", "float16", "bfloat16")]
    yield dict(zip(keys, addresses, strict=True)), events
    commands.put("stop")
    proc.join(10)
    if proc.is_alive():
        proc.kill()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_transfer_between_processes_is_byte_exact(transport: str, remote_receivers: Any) -> None:
    addresses, events = remote_receivers
    for dtype in ("float32", "float16", "bfloat16"):
        kv = make_pool(dtype, seed=7)
        with_tokens = len(SRC_IDS) * SHAPE["block_size"] - 5  # last block partly filled
        sender = KVSender(kv, layout_of(kv), timeout_s=5.0, max_inflight_bytes=256 << 10)
        try:
            rid = f"{transport}-{dtype}"
            handle = sender.begin(rid, addresses[transport, dtype], SRC_IDS, with_tokens,
                                  traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", meta=b"\x01\x02")
            for layer in range(SHAPE["num_layers"]):
                handle.layer_ready(layer)
            result = handle.result(timeout=20)
        finally:
            sender.close()
        assert result.ok, result.error
        assert result.bytes == layout_of(kv).transfer_bytes(len(SRC_IDS)) and result.seconds > 0
        done = _next(events, "complete")
        assert done["rid"] == rid and done["num_tokens"] == with_tokens and done["meta"] == "0102"
        assert done["traceparent"].startswith("00-0af7") and done["bytes"] == result.bytes
        assert done["ids"] != SRC_IDS and len(done["ids"]) == len(SRC_IDS)
        assert done["digest"] == digest(kv, SRC_IDS), f"{transport}/{dtype}: pages differ"


def test_sender_killed_mid_transfer_releases_within_timeout(ipc_dir: Path) -> None:
    kv = make_pool("float16", None)
    alloc = Allocator(kv.shape[1])
    receiver = alloc.receiver(kv, f"ipc://{ipc_dir}/kill-sender", timeout_s=TIMEOUT_S)
    events = CTX.Queue()
    proc = CTX.Process(target=sender_main, args=("float16", receiver.address, "doomed", 30.0, events), daemon=True)
    try:
        proc.start()
        _next(events, "begun")
        alloc.wait(lambda a: a.reservations == 1)
        time.sleep(0.2)  # layer 0 moves; layers 1, 2 never become ready
        assert not alloc.completed
        proc.kill()  # SIGKILL: no cleanup of any kind
        killed = time.monotonic()
        alloc.wait(lambda a: a.released == ["doomed"], timeout=TIMEOUT_S + 2)
        assert time.monotonic() - killed < TIMEOUT_S + 1.0  # + scheduling slack
        assert alloc.balanced() and receiver.stats()["held_blocks"] == 0
        assert alloc.failed and alloc.failed[0].request_id == "doomed"
    finally:
        proc.kill()
        proc.join(5)
        receiver.close()


def test_receiver_killed_sender_fails_within_timeout(ipc_dir: Path) -> None:
    events, commands = CTX.Queue(), CTX.Queue()
    proc = CTX.Process(target=receiver_main, args=([("tcp://127.0.0.1:0", "bfloat16")], 30.0, events, commands),
                       daemon=True)
    kv = make_pool("bfloat16", seed=3)
    sender = KVSender(kv, layout_of(kv), timeout_s=TIMEOUT_S)
    try:
        proc.start()
        (peer,) = _next(events, "up")["addresses"]
        handle = sender.begin("orphan", peer, SRC_IDS, len(SRC_IDS) * SHAPE["block_size"])
        handle.layer_ready(0)
        _next(events, "reserved")
        proc.kill()  # SIGKILL: no cleanup of any kind
        killed = time.monotonic()
        result = handle.result(timeout=TIMEOUT_S + 2)
        assert time.monotonic() - killed < TIMEOUT_S + 1.0  # + scheduling slack
        assert not result.ok and result.code is TransferCode.TIMEOUT
        assert peer in (result.error or "")
        assert sender.stats()["inflight_bytes"] == 0 and sender.stats()["live"] == 0
    finally:
        proc.kill()
        proc.join(5)
        sender.close()
        try:
            while True:
                events.get_nowait()
        except queue.Empty:
            pass
