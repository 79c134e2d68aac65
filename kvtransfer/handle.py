"""TransferHandle: what the prefill engine holds for one outgoing transfer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from kvtransfer.results import TransferCode, TransferResult

log = logging.getLogger(__name__)


class _Owner(Protocol):
    """What a handle needs from its KVSender (kept narrow so the two modules stay apart)."""

    def call_soon(self, fn: Callable[[], None]) -> bool: ...
    def _on_layers_ready(self, request_id: str, layers: range) -> None: ...
    def _on_local_abort(self, request_id: str, reason: str) -> None: ...
    def _on_finish(self, request_id: str, meta: bytes) -> None: ...


class TransferHandle:
    """One transfer started by KVSender.begin(). Thread-safe; every method returns at once except
    `result`.

    Ownership: the sender reads the source pages until the handle is done (whatever the outcome);
    the engine must neither modify nor free them before `done()` is True. A layer's pages must be
    final when `layer_ready(layer)` is called: they may be read at any moment after it.
    """

    def __init__(self, owner: _Owner, request_id: str, peer: str, num_layers: int, num_blocks: int) -> None:
        self._owner = owner
        self.request_id = request_id
        self.peer = peer
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._result: TransferResult | None = None
        self._callbacks: list[Callable[[TransferResult], None]] = []

    def layer_ready(self, layer: int) -> None:
        """Layer `layer`'s KV of these blocks is final; it may be sent now (layers go in the order they
        become ready). Repeats are ignored. Raises ValueError for a layer out of range."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        self._owner.call_soon(lambda: self._owner._on_layers_ready(self.request_id, range(layer, layer + 1)))

    def all_ready(self) -> None:
        """Every layer is final (a prefill that does not stream layer by layer calls only this)."""
        self._owner.call_soon(lambda: self._owner._on_layers_ready(self.request_id, range(self.num_layers)))

    def finish(self, meta: bytes) -> None:
        """Every layer is final, and `meta` replaces the meta given to begin(): it travels on the last
        chunk, so the receiver's CompletedTransfer carries it. Lets the engine stream layers 0..L-2 during
        the forward and send the last one with what it learned after (the first sampled token). Call
        it instead of making the last layer ready; once every chunk is out, a late meta is ignored."""
        self._owner.call_soon(lambda: self._owner._on_finish(self.request_id, bytes(meta)))

    def abort(self, reason: str) -> None:
        """Stop the transfer; the receiver is told and releases its reservation. The result becomes
        ABORTED unless the transfer had already ended. Idempotent."""
        self._owner.call_soon(lambda: self._owner._on_local_abort(self.request_id, reason))

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> TransferResult:
        """Wait for the outcome. Raises TimeoutError if it is not there within `timeout` seconds
        (the transfer goes on; its own timeouts still bound it)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"KV transfer {self.request_id} to {self.peer} not finished after {timeout} s")
        assert self._result is not None
        return self._result

    def add_done_callback(self, fn: Callable[[TransferResult], None]) -> None:
        """Call `fn(result)` when the transfer ends: on the sender's I/O thread (keep it short, e.g.
        `loop.call_soon_threadsafe`), or right here if it has ended already."""
        with self._lock:
            if self._result is None:
                self._callbacks.append(fn)
                return
        fn(self._result)

    def _finish(self, result: TransferResult) -> None:
        """Record the outcome once (later calls are ignored) and run the callbacks. I/O thread only."""
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        for fn in callbacks:
            try:
                fn(result)
            except Exception:
                log.exception("done callback of KV transfer %s failed", self.request_id)

    def __repr__(self) -> str:
        state = "pending" if self._result is None else TransferCode(self._result.code).name
        return f"TransferHandle({self.request_id!r} -> {self.peer}, {self.num_blocks} blocks, {state})"
