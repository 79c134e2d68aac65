"""kvtransfer: moves a request's KV pages from a prefill worker's pool to a decode worker's, over ZeroMQ.

Memory layout (each worker has its own pool and its own block ids; layout.py has the details):

    kv: (num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim)       contiguous
    kv[l, b] = one page = K and V of block_size tokens of layer l: page_bytes contiguous bytes

    sender pool, layer l     [ . | A | B | . | C | . ]      block_ids = [1, 2, 4]
                                   │   │       │             (position i -> i-th reserved block)
    receiver pool, layer l   [ B'| . | . | C'| . | A'| . ]   reserved  = [5, 0, 3]   (A'= A, ...)

Message sequence (headers are kv.proto's KVMessage, protobuf; KV bytes are raw frames after a
KVLayer header; sender = DEALER per receiver, receiver = ROUTER):

    prefill engine      KVSender                               KVReceiver          decode engine
         │ begin(rid, peer, ids, n)  │                                  │                 │
         │──────────────────────────►│── KVTransferBegin ──────────────►│ layout equal?   │
         │                           │   {rid, layout, num_tokens,      │  no: KVReject   │
         │                           │    num_blocks, traceparent, meta}│      MISMATCH   │
         │                           │                                  │── want(rid, n) ─►│ admission
         │                           │◄── KVHeartbeat (while waiting) ──│                 │ (when blocks
         │                           │◄── KVReady {window, dst_runs} ───│◄─ grant(rid,ids)│  allow; or
         │ layer_ready(0)            │                                  │                 │  NO_SPACE)
         │──────────────────────────►│── KVLayer {l=0, pages, frames} ─►│ write kv[0,ids] │
         │ layer_ready(1)            │   [frame][frame]...              │                 │
         │──────────────────────────►│── KVLayer {l=1, ...} ───────────►│ write kv[1,ids] │
         │                           │◄── KVAck {l=0, bytes} ───────────│ (credit back)   │
         │          ...              │◄── KVAck {l=L-1} ────────────────│                 │
         │                           │◄── KVDone {bytes, duration_ns} ──│── on_complete ─►│ owns ids
         │◄── result(): ok ──────────│                                  │                 │
    Either side may send KVAbort {rid, code, reason} at any point; both then release everything.

API (the classes' docstrings have the details):

    layout = KVLayout.for_pool(kv, model_fingerprint)           # frozen; .page_bytes, .mismatches()
    rx = KVReceiver(kv, layout, "tcp://0.0.0.0:0", want=fn(rid, n), release=fn(rid, ids),
                    on_complete=fn(CompletedTransfer), on_failed=fn(FailedTransfer) | None,
                    timeout_s=30.0, max_inflight_bytes=256 MiB)
    rx.grant(rid, ids) | rx.refuse(rid, code, message)        # the pool owner's answer to want()
    rx.address; rx.abort(rid, reason); rx.refuse_all(reason); rx.stats(); rx.close()
    tx = KVSender(kv, layout, timeout_s=30.0, max_inflight_bytes=256 MiB)
    h = tx.begin(rid, rx.address, block_ids, num_tokens, traceparent="", meta=b"")  # -> TransferHandle
    h.layer_ready(l); h.all_ready(); h.abort(reason); h.done(); h.add_done_callback(fn)
    h.result(timeout) -> TransferResult(ok, error, code, bytes, seconds, num_blocks); tx.stats(); tx.close()

`meta` is opaque here; by convention it is a serialized kv.proto KVRequestMeta (first token, its
logprob, prompt and cached token counts, prefill_ns), which the decode worker parses in on_complete.

Contract:
- Handshake: every KVTransferBegin carries the sender's KVLayout (protocol version, model fingerprint,
  dtype, layers, block size, kv heads, head dim); a mismatch is refused with code MISMATCH and a
  message naming each field and both values, "block_size: sender 16, receiver 32".
- Reservation: the receiver calls `want(rid, n)` before any KV byte is sent; the pool's owner (the
  decode worker's scheduler, on its own thread) answers with `grant(rid, ids)` when its admission
  policy allows, or `refuse(...)`; without an answer within `timeout_s` the sender gets NO_SPACE.
  Granted blocks belong to the receiver until it calls exactly one of `release(rid, ids)` (failure,
  abort, close, or a grant that came too late) or `on_complete(CompletedTransfer)` (the decode
  engine owns them from then on). The receiver never takes a lock of the pool's owner.
- Streaming: a layer is read only after the engine calls `layer_ready(l)` (or `all_ready()`), in the
  order layers become ready, so transfer overlaps the rest of the prefill. Each layer goes in chunks
  of <= 16 MiB (one KVLayer + one KVAck each); unacknowledged bytes stay within the window
  (min of both sides' `max_inflight_bytes`, at least one chunk). Pages that are contiguous on both
  sides go as zero-copy frames of tensor memory and are received straight into the pool (CPU);
  runs shorter than 256 KiB are gathered into one frame and scattered on arrival (frames.py).
- Timeouts: each side fails a transfer whose peer has been silent for `timeout_s` (both send
  KVHeartbeat every timeout_s/4 while idle), so a dead sender's reservation is released and a dead
  receiver's sender gets a TIMEOUT naming the peer, each within about `timeout_s`. The sender also
  fails a transfer whose engine made no layer ready for `timeout_s`.
- Abort: `TransferHandle.abort()` and `KVReceiver.abort()` end the transfer on both sides; the
  receiver also refuses a later KVTransferBegin for a request it aborted. Abort racing completion:
  on_complete on the receiver decides who owns the blocks.
- Measurement: the sender's bytes/seconds span first KV byte sent -> KVDone received, the receiver's
  first KV frame received -> last frame written: the same bytes over the same window, honest GB/s.
- Threads: each KVSender/KVReceiver runs one I/O thread that owns its sockets (ioloop.py); public
  methods are thread-safe and only queue work. Callbacks (want, release, on_complete, on_failed,
  done callbacks) run on that thread: keep them short, never block or raise in them, never call
  close() from them. close() fails or releases whatever is live and closes the sockets (linger 0).
- Endpoints: `tcp://host:port` (port 0 picks one; see KVReceiver.address) and `ipc:///path`.
"""

from kvtransfer.handle import TransferHandle
from kvtransfer.layout import PROTOCOL_VERSION, KVLayout
from kvtransfer.receiver import KVReceiver
from kvtransfer.results import CompletedTransfer, FailedTransfer, TransferCode, TransferResult
from kvtransfer.sender import KVSender

__all__ = [
    "PROTOCOL_VERSION",
    "CompletedTransfer",
    "FailedTransfer",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "TransferCode",
    "TransferHandle",
    "TransferResult",
]
