"""KVSender: the prefill side. One DEALER socket per receiver address, all on one I/O thread.

Per transfer: KVTransferBegin -> wait for KVReady (or KVReject) -> stream the chunks of each layer
as the engine marks it ready, within the credit window -> wait for KVDone. See kvtransfer/__init__.py
for the sequence diagram and the timeouts.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np
import torch
import zmq
from google.protobuf.message import Message

from kvtransfer import wire
from kvtransfer.curve import CurveClient, HandshakeWatch
from kvtransfer.frames import (
    MAX_CHUNK_BYTES,
    PagePool,
    breaks_from_runs,
    plan_chunks,
    plan_frames,
    run_breaks,
)
from kvtransfer.handle import TransferHandle
from kvtransfer.ioloop import IOThread
from kvtransfer.layout import PROTOCOL_VERSION, KVLayout
from kvtransfer.outbound import Outbound, State
from kvtransfer.results import TransferCode, TransferResult

_SCHEMES = ("tcp://", "ipc://")


class KVSender(IOThread):
    """Sends KV pages of a local pool to KVReceivers.

    kv: this worker's pool (num_layers, num_blocks, 2, block_size, Hk, D), contiguous, CPU or CUDA;
        it must match `layout` (ValueError otherwise). The sender only reads it.
    timeout_s: a transfer fails with TIMEOUT when the receiver has been silent that long (it sends
        heartbeats while it waits for space), or when the engine has made no layer ready for that
        long while nothing else is pending.
    max_inflight_bytes: KV bytes sent but not yet acknowledged, over all transfers (a single chunk
        may exceed it when nothing else is in flight); receivers may grant less per transfer.
    chunk_bytes: the most KV one KVLayer message carries (one ack each).
    curve: CurveZMQ keys and the receivers' public key (kvtransfer.curve); None: plaintext. A receiver
        that refuses the handshake (wrong key, or CurveZMQ at one end only) fails that peer's
        transfers at once with MISMATCH, saying why.
    """

    def __init__(self, kv: torch.Tensor, layout: KVLayout, *, timeout_s: float = 30.0,
                 max_inflight_bytes: int = 256 << 20, chunk_bytes: int = MAX_CHUNK_BYTES,
                 curve: CurveClient | None = None) -> None:
        if timeout_s <= 0 or max_inflight_bytes <= 0 or chunk_bytes <= 0:
            raise ValueError("timeout_s, max_inflight_bytes and chunk_bytes must be > 0")
        self.pool = PagePool(kv, layout)
        self.layout = layout
        self.timeout_s = float(timeout_s)
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.chunk_bytes = min(int(chunk_bytes), max(self.pool.page_bytes, self.max_inflight_bytes // 4))
        super().__init__("kv-sender")
        self._peers: dict[str, zmq.Socket] = {}
        self._peer_of: dict[zmq.Socket, str] = {}
        self._curve = curve
        self._watches: dict[str, HandshakeWatch] = {}  # peer -> its handshake monitor
        self._watched: dict[zmq.Socket, str] = {}  # monitor socket -> peer
        self._transfers: dict[str, Outbound] = {}
        self._inflight = 0
        self._live: set[str] = set()  # request ids with an unfinished handle; guarded by _lock
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("started", "completed", "failed", "bytes_sent", "inflight_peak_bytes"), 0)
        self.start()

    # -- public API (any thread) ----------------------------------------------------------------
    def begin(self, request_id: str, peer: str, block_ids: Sequence[int], num_tokens: int, *,
              traceparent: str = "", meta: bytes = b"") -> TransferHandle:
        """Start sending blocks `block_ids` (in this order: position i lands in the receiver's i-th
        reserved block) holding `num_tokens` tokens to the KVReceiver at `peer`.

        Returns at once; layers go out as the handle's layer_ready()/all_ready() allow. Raises
        ValueError for an empty or out-of-range block list, a num_tokens the blocks cannot hold
        (or that leaves a block empty), a peer that is not tcp:// or ipc://, or a request_id with
        a live transfer; RuntimeError once closed.
        """
        if not request_id:
            raise ValueError("request_id must not be empty")
        if not peer.startswith(_SCHEMES):
            raise ValueError(f"peer must be a tcp:// or ipc:// endpoint, got {peer!r}")
        ids = np.asarray(list(block_ids), dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= self.pool.num_blocks:
            raise ValueError(f"block_ids must be a non-empty list of ids in [0, {self.pool.num_blocks})")
        bs = self.layout.block_size
        if not (len(ids) - 1) * bs < num_tokens <= len(ids) * bs:
            raise ValueError(f"{len(ids)} blocks of {bs} tokens cannot hold exactly {num_tokens} tokens")
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"a KV transfer for request {request_id!r} is already live")
            self._live.add(request_id)
        handle = TransferHandle(self, request_id, peer, self.layout.num_layers, len(ids))
        begin = wire.Begin(request_id=request_id, layout=self.layout.to_proto(), num_tokens=num_tokens,
                           num_blocks=len(ids), traceparent=traceparent, meta=bytes(meta),
                           max_inflight_bytes=self.max_inflight_bytes)
        if not self.call_soon(lambda: self._start(handle, ids, begin)):
            with self._lock:
                self._live.discard(request_id)
            raise RuntimeError("KVSender is closed")
        return handle

    def stats(self) -> dict[str, int]:
        """Counters (started, completed, failed, bytes_sent, inflight_peak_bytes); live transfers and
        in-flight bytes now."""
        return {**self._stats, "live": len(self._live), "inflight_bytes": self._inflight, "peers": len(self._peers)}

    # -- I/O thread -----------------------------------------------------------------------------
    def _setup(self) -> None:
        pass  # sockets are made per peer, on first use

    def _socket(self, peer: str) -> zmq.Socket:
        sock = self._peers.get(peer)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            # HWM 0: bytes are bounded by credit, not message counts. A fixed routing id lets the
            # receiver's ROUTER recognise us after a reconnect.
            for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
                sock.setsockopt(opt, value)
            sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
            if self._curve is not None:
                self._curve.apply(sock)
            watch = self._watches[peer] = HandshakeWatch(sock)  # a refused handshake fails fast
            self._watched[watch.socket] = peer
            self.poller.register(watch.socket, zmq.POLLIN)
            try:
                sock.connect(peer)
            except zmq.ZMQError:
                sock.close(0)
                raise
            self.poller.register(sock, zmq.POLLIN)
            self._peers[peer], self._peer_of[sock] = sock, peer
        return sock

    def _drop_peer(self, peer: str) -> None:
        sock = self._peers.pop(peer, None)
        if sock is not None:
            del self._peer_of[sock]
            self.poller.unregister(sock)
            sock.close(0)  # drops frames still queued for a dead peer
        watch = self._watches.pop(peer, None)
        if watch is not None:
            del self._watched[watch.socket]
            self.poller.unregister(watch.socket)
            watch.close()

    def _start(self, handle: TransferHandle, ids: np.ndarray, begin: wire.Begin) -> None:
        try:
            sock = self._socket(handle.peer)
        except zmq.ZMQError as e:
            self._finish(handle, TransferCode.INTERNAL, f"cannot connect to receiver {handle.peer}: {e}")
            return
        chunks = plan_chunks(len(ids), self.pool.page_bytes, self.chunk_bytes)
        t = Outbound(handle, sock, ids, run_breaks(ids), chunks, time.monotonic(),
                     chunks_left=len(chunks) * self.layout.num_layers)
        self._transfers[handle.request_id] = t
        self._stats["started"] += 1
        if not self._send(t, begin) and not self._redial(t, begin):
            self._end(t, TransferCode.ABORTED, f"receiver {handle.peer} is unreachable", notify=False)

    def _redial(self, t: Outbound, begin: wire.Begin) -> bool:
        """The peer's socket lost its route (a refused handshake tears it down): replace the socket,
        failing whatever else was queued on it, and send `begin` on the new one."""
        peer = t.handle.peer
        self._fail_peer(peer, TransferCode.ABORTED, f"the connection to receiver {peer} was torn down",
                        but=t.handle.request_id)
        self._drop_peer(peer)
        try:
            t.sock = self._socket(peer)
        except zmq.ZMQError:
            return False
        return self._send(t, begin)

    def _send(self, t: Outbound, body: Message) -> bool:
        """Queue a header-only message for t's receiver. False when ZeroMQ will not take it (its route
        to the peer is gone, e.g. after a refused CurveZMQ handshake): never raise on the I/O thread."""
        try:
            t.sock.send(wire.encode(body), zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        t.last_sent = time.monotonic()
        return True

    def _on_layers_ready(self, request_id: str, layers: range) -> None:
        t = self._transfers.get(request_id)
        if t is None:
            return
        for layer in layers:
            if layer not in t.ready:
                t.ready.add(layer)
                t.queue.extend((layer, first, n) for first, n in t.chunks)
        t.last_engine = time.monotonic()
        self._pump()

    def _on_finish(self, request_id: str, meta: bytes) -> None:
        t = self._transfers.get(request_id)
        if t is not None:
            t.meta = meta
            self._on_layers_ready(request_id, range(self.layout.num_layers))

    def _on_local_abort(self, request_id: str, reason: str) -> None:
        t = self._transfers.get(request_id)
        if t is not None:
            self._end(t, TransferCode.ABORTED, f"aborted by the sender: {reason}", notify=True)

    def _pump(self) -> None:
        """Send queued chunks while credit allows, one chunk per transfer per round (fairness)."""
        page = self.pool.page_bytes
        progress = True
        while progress:
            progress = False
            for t in list(self._transfers.values()):
                if t.state is not State.STREAMING or not t.queue:
                    continue
                size = t.queue[0][2] * page
                if t.inflight and t.inflight + size > t.window:
                    continue
                if self._inflight and self._inflight + size > self.max_inflight_bytes:
                    return
                self._send_chunk(t, *t.queue.popleft())
                progress = True

    def _send_chunk(self, t: Outbound, layer: int, first: int, n: int) -> None:
        assert t.dst_breaks is not None
        page = self.pool.page_bytes
        frames = plan_frames(t.breaks, t.dst_breaks, first, n, page)
        bufs, staged = self.pool.read_frames(layer, t.ids[first : first + n], t.breaks[first : first + n], frames)
        if staged:
            t.staged[layer, first] = staged
        layer_msg = wire.Layer(request_id=t.handle.request_id, layer=layer, first_block=first,
                               num_blocks=n, bytes_per_block=page, frame_pages=frames)
        if t.chunks_left == 1 and t.meta is not None:
            layer_msg.meta = t.meta
        header = wire.encode(layer_msg)
        if not t.t_first_ns:
            t.t_first_ns = time.perf_counter_ns()
        try:
            t.sock.send_multipart([header, *(b.data for b in bufs)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            self.pool.give_back(t.staged.pop((layer, first), []))
            self._end(t, TransferCode.ABORTED, f"receiver {t.handle.peer} is unreachable: {e}", notify=False)
            return
        t.last_sent = time.monotonic()
        t.inflight += n * page
        self._inflight += n * page
        self._stats["inflight_peak_bytes"] = max(self._stats["inflight_peak_bytes"], self._inflight)
        t.sent += n * page
        t.chunks_left -= 1
        if t.chunks_left == 0:
            t.state = State.WAIT_DONE

    def _on_readable(self, sock: zmq.Socket) -> None:
        if sock in self._watched:
            peer = self._watched[sock]
            failure = self._watches[peer].failure()
            if failure is not None:
                self._fail_peer(peer, TransferCode.MISMATCH, f"receiver {peer}: {failure}")
                self._drop_peer(peer)  # discards what was queued; the next begin dials afresh
            return
        peer = self._peer_of[sock]
        for _ in range(256):  # bounded, so one busy peer cannot starve the others
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                env = wire.decode(parts[0])
            except wire.WireError as e:
                if e.peer_version is not None:
                    self._fail_peer(peer, TransferCode.MISMATCH, f"receiver {peer}: KV layout mismatch: protocol_version: "
                                    f"sender {PROTOCOL_VERSION}, receiver {e.peer_version}")
                else:
                    self._fail_peer(peer, TransferCode.PROTOCOL, f"receiver {peer} sent a bad message: {e}")
                continue
            t = self._transfers.get(env.request_id)
            if t is not None and t.handle.peer == peer:
                t.last_heard = time.monotonic()
                self._dispatch(t, env)

    def _dispatch(self, t: Outbound, env: wire.Envelope) -> None:
        peer, rid, body = t.handle.peer, t.handle.request_id, env.body
        if env.kind == "ready" and t.state is State.WAIT_READY:
            if sum(body.dst_runs) != len(t.ids) or body.num_blocks != len(t.ids):
                self._end(t, TransferCode.PROTOCOL, f"receiver {peer} reserved a wrong block count", notify=True)
                return
            t.window = body.window_bytes or self.max_inflight_bytes
            t.dst_breaks = breaks_from_runs(list(body.dst_runs))
            t.state = State.STREAMING
            self._pump()
        elif env.kind == "ack" and body.bytes <= t.inflight:
            t.inflight -= body.bytes
            self._inflight -= body.bytes
            self.pool.give_back(t.staged.pop((body.layer, body.first_block), []))
            self._pump()
        elif env.kind == "done" and t.state is State.WAIT_DONE and t.inflight == 0:
            self._end(t, TransferCode.OK, None, notify=False)
        elif env.kind in ("reject", "abort"):
            text = body.message if env.kind == "reject" else body.reason
            verb = "refused" if env.kind == "reject" else "aborted"
            self._end(t, TransferCode.from_wire(body.code), f"receiver {peer} {verb} transfer {rid}: {text}",
                      notify=False)
        elif env.kind != "heartbeat":
            self._end(t, TransferCode.PROTOCOL, f"receiver {peer} sent {env.kind!r} while {t.state.value}",
                      notify=True)

    def _fail_peer(self, peer: str, code: TransferCode, error: str, but: str = "") -> None:
        for t in [t for t in self._transfers.values() if t.handle.peer == peer and t.handle.request_id != but]:
            self._end(t, code, error, notify=True)

    def _on_tick(self, now: float) -> float | None:
        limit = self.timeout_s
        for t in list(self._transfers.values()):
            idle_engine = t.state is State.STREAMING and not t.queue and t.inflight == 0
            if now - t.last_heard > limit:
                self._end(t, TransferCode.TIMEOUT, f"no answer from receiver {t.handle.peer} for {limit:.1f} s "
                          f"while {t.state.value} (transfer {t.handle.request_id})", notify=True)
            elif idle_engine and now - t.last_engine > limit:
                self._end(t, TransferCode.TIMEOUT, f"the engine made no layer ready for {limit:.1f} s "
                          f"({len(t.ready)} of {self.layout.num_layers} ready)", notify=True)
            elif now - t.last_sent > limit / 4:
                self._send(t, wire.Heartbeat(request_id=t.handle.request_id))
        return min(0.05, limit / 8) if self._transfers else None

    def _end(self, t: Outbound, code: TransferCode, error: str | None, *, notify: bool) -> None:
        """Finish `t` once: free its credit, tell the peer if asked, resolve the handle."""
        rid, peer = t.handle.request_id, t.handle.peer
        if self._transfers.pop(rid, None) is None:
            return
        self._inflight -= t.inflight
        if notify and not t.sock.closed:
            self._send(t, wire.Abort(request_id=rid, code=code.wire, reason=error or ""))
        if code is TransferCode.TIMEOUT and not any(o.handle.peer == peer for o in self._transfers.values()):
            self._drop_peer(peer)
        seconds = (time.perf_counter_ns() - t.t_first_ns) / 1e9 if t.t_first_ns else 0.0
        self._stats["bytes_sent"] += t.sent
        self._finish(t.handle, code, error, t.sent, seconds)

    def _finish(self, handle: TransferHandle, code: TransferCode, error: str | None,
                sent: int = 0, seconds: float = 0.0) -> None:
        self._stats["completed" if code is TransferCode.OK else "failed"] += 1
        with self._lock:
            self._live.discard(handle.request_id)
        handle._finish(TransferResult(code is TransferCode.OK, error, code, sent, seconds, handle.num_blocks))

    def _teardown(self) -> None:
        for t in list(self._transfers.values()):
            try:
                self._end(t, TransferCode.CLOSED, "the KV sender was closed", notify=True)
            except Exception:  # noqa: BLE001 - every handle must resolve, even after a crash
                self._transfers.pop(t.handle.request_id, None)
                self._finish(t.handle, TransferCode.CLOSED, "the KV sender was closed")
        for peer in list(self._peers):
            self._drop_peer(peer)
