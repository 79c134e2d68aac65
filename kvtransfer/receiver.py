"""KVReceiver: the decode side. One ROUTER socket, bound at a configured endpoint, on one I/O thread.

Per transfer: KVTransferBegin -> check the layout -> want(n blocks) -> the owner of the pool grants
them (or refuses) whenever its admission policy allows -> KVReady -> write each KVLayer's frames into
the granted pages, KVAck each -> KVDone and on_complete. See kvtransfer/__init__.py for the sequence
diagram, ownership and timeouts.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import torch
import zmq
from google.protobuf.message import Message
from zmq.auth.thread import ThreadAuthenticator

from kvtransfer import wire
from kvtransfer.curve import CurveServer
from kvtransfer.frames import MAX_CHUNK_BYTES, PagePool, run_lengths
from kvtransfer.inbound import Inbound, Phase, refuse_begin
from kvtransfer.ioloop import IOThread
from kvtransfer.layout import PROTOCOL_VERSION, KVLayout
from kvtransfer.results import CompletedTransfer, FailedTransfer, TransferCode

log = logging.getLogger(__name__)

WantFn = Callable[[str, int], None]
ReleaseFn = Callable[[str, list[int]], None]
_MAX_TOMBSTONES = 1 << 16  # aborted request ids remembered (for max(60 s, 4 timeouts))
_HEADER_ROOM = 1 << 20  # a KVMessage header (meta, traceparent) is far smaller


def max_frame_bytes(layout: KVLayout) -> int:
    """The largest ZeroMQ frame a receiver accepts (zmq.MAXMSGSIZE, per frame): one chunk of KV, or
    one page when a page is bigger than a chunk; a sender that exceeds it is disconnected."""
    return max(MAX_CHUNK_BYTES, layout.page_bytes) + _HEADER_ROOM


class KVReceiver(IOThread):
    """Receives KV pages from KVSenders into this worker's pool.

    kv: the pool (num_layers, num_blocks, 2, block_size, Hk, D), contiguous, CPU or CUDA, matching
        `layout` (ValueError otherwise). The receiver writes only pages it reserved and still holds.
    bind: "tcp://host:port" (port 0 or * picks one), or "ipc:///path". `address` is the endpoint
        ZeroMQ resolved (with a wildcard host, advertise the host's own name instead).
    want(request_id, n): a transfer needs n blocks. The pool's owner answers once, from any thread and
        whenever its admission allows, with `grant(request_id, ids)` (n distinct block ids, owned by
        the receiver from then on) or `refuse(request_id, code, message)`; no KV byte moves before.
        Without an answer within `reserve_timeout_s` the sender gets NO_SPACE (a later grant is
        released). An owner that keeps its own deadlines (and refuses with the precise reason) sets it
        longer than those, as a backstop; by default it is `timeout_s`.
    release(request_id, block_ids): granted ids go back to the owner (the transfer failed or was
        aborted, or the grant came for a transfer that had already ended).
    on_complete(CompletedTransfer): every page is written; the ids now belong to the caller.
    on_failed(FailedTransfer): optional; a transfer ended without on_complete, after its release.
        Not called for the receiver's own abort() or close().
    All callbacks run on the I/O thread: they must be short, must not raise, must not call close()
    (post the work to the owner's thread: the receiver never takes the owner's locks).
    timeout_s: a transfer whose sender has been silent that long is dropped (and released).
    max_inflight_bytes: the credit window granted to each transfer.
    max_transfers: transfers live at once (reserving or receiving); a KVTransferBegin beyond it is
        refused with NO_SPACE before anything is reserved, so no peer can grow the receiver's state.
    curve: CurveZMQ keys and the allowed senders' public keys (kvtransfer.curve); None: plaintext.
    """

    def __init__(self, kv: torch.Tensor, layout: KVLayout, bind: str, *, want: WantFn, release: ReleaseFn,
                 on_complete: Callable[[CompletedTransfer], None],
                 on_failed: Callable[[FailedTransfer], None] | None = None,
                 timeout_s: float = 30.0, max_inflight_bytes: int = 256 << 20, max_transfers: int = 4096,
                 curve: CurveServer | None = None, reserve_timeout_s: float | None = None) -> None:
        if timeout_s <= 0 or max_inflight_bytes <= 0 or max_transfers <= 0 or (reserve_timeout_s or 1) <= 0:
            raise ValueError("timeout_s, reserve_timeout_s, max_inflight_bytes and max_transfers must be > 0")
        if not bind.startswith(("tcp://", "ipc://")):
            raise ValueError(f"bind must be a tcp:// or ipc:// endpoint, got {bind!r}")
        self.pool = PagePool(kv, layout)
        self.layout = layout
        self.timeout_s = float(timeout_s)
        self.reserve_timeout_s = float(reserve_timeout_s if reserve_timeout_s is not None else timeout_s)
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.max_transfers = int(max_transfers)
        self._curve = curve
        self._zap: ThreadAuthenticator | None = None  # the ZAP handler thread, when curve is set
        self._bind = bind[:-2] + ":*" if bind.startswith("tcp://") and bind.endswith(":0") else bind
        self._want, self._release = want, release
        self._on_complete, self._on_failed = on_complete, on_failed
        super().__init__("kv-receiver")
        self.address = ""
        self._sock: zmq.Socket | None = None
        self._transfers: dict[str, Inbound] = {}
        self._refusing = ""  # non-empty: every new transfer is refused with this reason (refuse_all)
        self._tombstones: collections.OrderedDict[str, float] = collections.OrderedDict()  # aborted here
        self._stats = dict.fromkeys(("reservations", "releases", "completed", "failed", "rejected",
                                     "bytes_received", "held_blocks"), 0)
        self.start()

    # -- public API (any thread) ----------------------------------------------------------------
    def grant(self, request_id: str, block_ids: list[int]) -> None:
        """The answer to want(): these blocks are the transfer's. If it has ended meanwhile, they go
        straight back through release()."""
        ids = list(block_ids)
        self.call_soon(lambda: self._on_grant(request_id, ids))

    def refuse(self, request_id: str, code: TransferCode, message: str) -> None:
        """The answer to want(): no blocks; the transfer fails with `code` (reported via on_failed)."""
        self.call_soon(lambda: self._on_refuse(request_id, code, message))

    def refuse_all(self, reason: str) -> None:
        """Fail every live transfer and refuse every new one (the worker is dying)."""
        self.call_soon(lambda: self._refuse_all(reason))

    def abort(self, request_id: str, reason: str = "aborted by the decode worker") -> None:
        """Stop `request_id`'s transfer: release its reservation, tell the sender, and refuse a
        KVTransferBegin that arrives later. No effect once on_complete has run. Idempotent."""
        self.call_soon(lambda: self._local_abort(request_id, reason))

    def stats(self) -> dict[str, int]:
        """Counters (reservations, releases, completed, failed, rejected, bytes_received), blocks held
        by unfinished transfers, and live / expected transfers now."""
        return {**self._stats, "live": len(self._transfers)}

    # -- I/O thread: setup, messages --------------------------------------------------------------
    def _setup(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.ROUTER_MANDATORY, 1),
                           (zmq.ROUTER_HANDOVER, 1), (zmq.MAXMSGSIZE, max_frame_bytes(self.layout))):
            sock.setsockopt(opt, value)
        if self._curve is not None:
            self._zap = self._curve.start_authenticator(self.ctx)
            self._curve.apply(sock)
        try:
            sock.bind(self._bind)
        except zmq.ZMQError as e:
            sock.close(0)
            self._stop_zap()
            raise ValueError(f"cannot bind the KV receiver at {self._bind}: {e}") from e
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller.register(sock, zmq.POLLIN)
        self._sock = sock

    def _reply(self, ident: bytes, body: Message) -> bool:
        """Send to one sender; False if it is gone (ROUTER_MANDATORY: unroutable)."""
        assert self._sock is not None
        try:
            self._sock.send_multipart([ident, wire.encode(body)], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _on_readable(self, sock: zmq.Socket) -> None:
        for _ in range(256):  # bounded, so timers still run under a flood
            try:
                ident = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            header = sock.recv() if sock.rcvmore else b""
            try:
                env = wire.decode(header)
            except wire.WireError as e:
                _drain(sock)
                code, text = TransferCode.PROTOCOL, str(e)
                if e.peer_version is not None:
                    code, text = TransferCode.MISMATCH, (f"KV layout mismatch: protocol_version: sender "
                                                         f"{e.peer_version}, receiver {PROTOCOL_VERSION}")
                self._reply(ident, wire.Reject(request_id=wire.request_id_of(header), code=code.wire, message=text))
                continue
            t = self._transfers.get(env.request_id)
            if env.kind == "layer":
                self._on_layer(sock, ident, t, env.body)
            elif env.kind == "begin":
                self._on_begin(ident, env.body)
            elif t is not None and t.ident == ident and env.kind in ("abort", "heartbeat"):
                t.last_heard = time.monotonic()
                if env.kind == "abort":
                    self._fail(t, TransferCode.from_wire(env.body.code),
                               f"the sender aborted transfer {t.request_id}: {env.body.reason}", notify=False)
            _drain(sock)

    def _on_begin(self, ident: bytes, b: wire.Begin) -> None:
        rid = b.request_id
        if rid in self._transfers:
            self._refuse(ident, rid, TransferCode.DUPLICATE, f"a transfer for {rid} is already live", report=False)
        elif rid in self._tombstones:
            self._refuse(ident, rid, TransferCode.ABORTED, f"request {rid} was aborted by the decode worker",
                         report=False)
        elif self._refusing:
            self._refuse(ident, rid, TransferCode.CLOSED, self._refusing)
        elif (refusal := refuse_begin(b, self.layout, self.pool.num_blocks)) is not None:
            self._refuse(ident, rid, *refusal)
        elif len(self._transfers) >= self.max_transfers:
            self._refuse(ident, rid, TransferCode.NO_SPACE, f"the receiver has {len(self._transfers)} transfers in "
                         f"progress (limit {self.max_transfers}); retry later")
        else:
            window = min(self.max_inflight_bytes, b.max_inflight_bytes or self.max_inflight_bytes)
            t = Inbound(ident, rid, b.num_blocks, b.num_tokens, b.meta, b.traceparent, window, time.monotonic())
            self._transfers[rid] = t
            try:
                self._want(rid, t.num_blocks)
            except Exception:
                log.exception("want(%s, %d) raised", rid, t.num_blocks)
                self._fail(t, TransferCode.INTERNAL, "the receiver failed to ask for blocks")

    def _refuse(self, ident: bytes, rid: str, code: TransferCode, message: str, report: bool = True) -> None:
        self._stats["rejected"] += 1
        if report:  # locally first: when the sender hears of it, the decode side is already clean
            self._report(FailedTransfer(rid, code, message))
        self._reply(ident, wire.Reject(request_id=rid, code=code.wire, message=message))

    def _on_grant(self, rid: str, ids: list[int]) -> None:
        t = self._transfers.get(rid)
        if t is None or t.phase is not Phase.RESERVING:  # ended (or answered) meanwhile: give them back
            self._give_back(rid, ids)
            return
        ok = len(ids) == t.num_blocks == len(set(ids)) and all(0 <= b < self.pool.num_blocks for b in ids)
        t.reserved(list(ids), self.layout.num_layers)
        self._stats["reservations"] += 1
        self._stats["held_blocks"] += len(ids)
        if not ok:
            log.error("reserve(%s, %d) returned invalid ids %s", t.request_id, t.num_blocks, ids)
            self._fail(t, TransferCode.INTERNAL, "the receiver reserved invalid blocks")
            return
        assert t.ids is not None
        ready = wire.Ready(request_id=t.request_id, num_blocks=t.num_blocks, window_bytes=t.window,
                           dst_runs=run_lengths(t.ids.tolist()))
        if not self._reply(t.ident, ready):
            self._fail(t, TransferCode.ABORTED, "the sender disconnected", notify=False)

    def _on_refuse(self, rid: str, code: TransferCode, message: str) -> None:
        t = self._transfers.get(rid)
        if t is not None and t.phase is Phase.RESERVING:
            self._fail(t, code, message)

    def _refuse_all(self, reason: str) -> None:
        self._refusing = reason
        for t in list(self._transfers.values()):
            self._fail(t, TransferCode.CLOSED, reason, report=False)

    def _give_back(self, rid: str, ids: list[int]) -> None:
        try:
            self._release(rid, ids)
        except Exception:
            log.exception("release(%s) raised", rid)

    def _on_layer(self, sock: zmq.Socket, ident: bytes, t: Inbound | None, h: wire.Layer) -> None:
        if t is None:
            _drain(sock)
            self._reply(ident, wire.Abort(request_id=h.request_id, code=TransferCode.UNKNOWN_REQUEST.wire,
                                          reason=f"the receiver has no live transfer {h.request_id}"))
            return
        if t.ident != ident:
            _drain(sock)  # someone else's message with this request id: not ours to act on
            return
        t.last_heard = time.monotonic()
        error = t.check_layer(h, self.layout.num_layers, self.pool.page_bytes)
        if error is None:
            error = t.write_layer(sock, h, self.pool)
        if error is not None:
            _drain(sock)
            self._fail(t, TransferCode.PROTOCOL, f"transfer {t.request_id}: {error}")
            return
        self._reply(ident, wire.Ack(request_id=t.request_id, layer=h.layer, first_block=h.first_block,
                                    num_blocks=h.num_blocks, bytes=h.num_blocks * h.bytes_per_block))
        t.last_sent = t.last_heard
        if t.pages_left == 0:
            self._complete(t)

    def _complete(self, t: Inbound) -> None:
        assert t.ids is not None
        del self._transfers[t.request_id]
        duration_ns = t.t_last_ns - t.t_first_ns
        self._stats["completed"] += 1
        self._stats["bytes_received"] += t.bytes
        self._stats["held_blocks"] -= t.num_blocks
        done = CompletedTransfer(t.request_id, t.ids.tolist(), t.num_tokens, t.meta, t.traceparent, t.bytes,
                                 duration_ns / 1e9)
        try:  # hand the blocks over before the sender hears of it: its ok means the decode side has them
            self._on_complete(done)
        except Exception:
            log.exception("on_complete(%s) raised; the blocks count as handed over", t.request_id)
        self._reply(t.ident, wire.Done(request_id=t.request_id, bytes=t.bytes, duration_ns=duration_ns))

    # -- I/O thread: endings, timers --------------------------------------------------------------
    def _fail(self, t: Inbound, code: TransferCode, message: str, *, notify: bool = True, report: bool = True) -> None:
        """End `t` without on_complete: release its blocks, report through on_failed, then tell the
        sender (Reject before KVReady, Abort after)."""
        if self._transfers.pop(t.request_id, None) is None:
            return
        self._stats["failed"] += 1
        if t.ids is not None:
            self._stats["releases"] += 1
            self._stats["held_blocks"] -= len(t.ids)
            self._give_back(t.request_id, t.ids.tolist())
        if report:  # before notifying, as in _refuse
            self._report(FailedTransfer(t.request_id, code, message))
        if notify:
            msg = (wire.Reject(request_id=t.request_id, code=code.wire, message=message) if t.phase is Phase.RESERVING
                   else wire.Abort(request_id=t.request_id, code=code.wire, reason=message))
            self._reply(t.ident, msg)

    def _report(self, failed: FailedTransfer) -> None:
        if self._on_failed is not None:
            try:
                self._on_failed(failed)
            except Exception:
                log.exception("on_failed(%s) raised", failed.request_id)

    def _local_abort(self, rid: str, reason: str) -> None:
        self._tombstones[rid] = time.monotonic() + max(60.0, 4 * self.timeout_s)
        self._tombstones.move_to_end(rid)  # keeps the dict in expiry order
        if len(self._tombstones) > _MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        t = self._transfers.get(rid)
        if t is not None:
            self._fail(t, TransferCode.ABORTED, f"aborted by the receiver: {reason}", report=False)

    def _on_tick(self, now: float) -> float | None:
        limit = self.timeout_s
        for t in list(self._transfers.values()):
            if t.phase is Phase.RESERVING and now - t.begin_at > self.reserve_timeout_s:
                self._fail(t, TransferCode.NO_SPACE,
                           f"no space for {t.num_blocks} KV blocks within {self.reserve_timeout_s:.1f} s")
            elif t.phase is not Phase.RESERVING and now - t.last_heard > limit:  # reserving: the sender waits on us
                self._fail(t, TransferCode.TIMEOUT, f"no message from the sender for {limit:.1f} s "
                           f"({t.progress(self.layout.num_layers)} received)")
            elif now - t.last_sent > limit / 4:
                t.last_sent = now
                if not self._reply(t.ident, wire.Heartbeat(request_id=t.request_id)):
                    self._fail(t, TransferCode.ABORTED, "the sender disconnected", notify=False)
        while self._tombstones and next(iter(self._tombstones.values())) < now:
            self._tombstones.popitem(last=False)
        return min(0.05, limit / 8) if self._transfers else None

    def _teardown(self) -> None:
        for t in list(self._transfers.values()):
            self._fail(t, TransferCode.CLOSED, "the KV receiver was closed", report=False)
        if self._sock is not None:
            self._sock.close(0)
        self._stop_zap()

    def _stop_zap(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None


def _drain(sock: zmq.Socket) -> None:
    """Discard the rest of the current multipart message."""
    while sock.rcvmore:
        sock.recv_into(bytearray())
