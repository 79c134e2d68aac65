"""The decode worker's core: an engine on its own thread plus the KV receiver that feeds it.

Block ownership on this worker (see docs/ARCHITECTURE.md):

    free pool --reserve()--> held by the KVReceiver --on_complete--> adopted by a Sequence (running)
         ^                        |  (transfer failed/aborted: release())        |
         +------------------------+<-------------- finished / aborted: free -----+

`reserve`/`release` run on the receiver's I/O thread and take the engine loop's lock; adoption runs
on the engine thread. A request aborted before its KV arrived frees the blocks when they land.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from decode_worker.observe import DecodeObserver
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams
from engine.sequence import Sequence
from kvtransfer import CompletedTransfer, FailedTransfer, KVLayout, KVReceiver
from kvtransfer.curve import CurveServer
from server.metrics import WorkerMetrics, new_registry
from server.protoconv import logprob_from_proto
from server.tracing import disabled
from tandem.v1 import kv_pb2

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]
FailSink = Callable[[str, str], None]  # (code name, message)


@dataclass
class Pending:
    """A request whose KV is on its way."""

    seq: Sequence
    sink: Sink
    fail: FailSink
    since: float = field(default_factory=time.monotonic)


class DecodeCore:
    def __init__(self, engine: Engine, layout: KVLayout, kv_bind: str, kv_timeout_s: float,
                 obs: DecodeObserver | None = None, *, curve: CurveServer | None = None) -> None:
        self.engine = engine
        self.obs = obs or DecodeObserver(disabled(), WorkerMetrics(new_registry(), "decode"))
        self.loop = EngineLoop(engine, name="decode-engine")
        self.loop.on_step = self.obs.on_step
        self.layout = layout
        self.kv_timeout_s = kv_timeout_s
        self._pending: dict[str, Pending] = {}  # engine thread only
        self.receiver = KVReceiver(
            engine.runner.kv, layout, kv_bind, reserve=self._reserve, release=self._release,
            on_complete=self._on_complete, on_failed=self._on_failed, timeout_s=kv_timeout_s, curve=curve,
        )

    def start(self) -> None:
        self.loop.start()

    def close(self) -> None:
        self.receiver.close()
        self.loop.stop()

    # -------------------------------------------------------- request entry
    def expect_kv(self, request_id: str, prompt: list[int], params: SamplingParams, sink: Sink,
                  fail: FailSink, timeout_s: float, *, traceparent: str = "") -> None:
        """Register a request whose KV a prefill worker will send (validates: raises ValueError).
        `traceparent`: the Decode call's span, parent of this request's engine-side spans."""
        seq = self.engine.make_sequence(request_id, prompt, params)
        seq.extra.update(traceparent=traceparent, t_call=time.monotonic())

        def register() -> None:
            self._pending[request_id] = Pending(seq, sink, fail)

        self.loop.submit(register)
        self.receiver.expect(request_id, timeout_s)

    def local(self, request_id: str, prompt: list[int], params: SamplingParams, sink: Sink, *,
              traceparent: str = "") -> None:
        """Conditional disaggregation: prefill here (the prefix cache may already hold it)."""
        self.loop.add_request(request_id, prompt, params, sink,
                              extra={"traceparent": traceparent, "t_call": time.monotonic()})

    def abort(self, request_id: str) -> None:
        self.receiver.abort(request_id)

        def drop() -> None:
            self._pending.pop(request_id, None)

        self.loop.submit(drop)
        self.loop.abort(request_id)

    # ------------------------------------------------ receiver callbacks (I/O thread)
    def _reserve(self, request_id: str, num_blocks: int) -> list[int] | None:
        with self.loop.lock:
            return self.engine.block_manager.allocate_blocks(num_blocks)

    def _release(self, request_id: str, block_ids: list[int]) -> None:
        with self.loop.lock:
            self.engine.block_manager.free_blocks(block_ids)

    def _on_complete(self, t: CompletedTransfer) -> None:
        self.obs.kv_received(t)
        self.loop.submit(lambda: self._adopt(t))

    def _on_failed(self, f: FailedTransfer) -> None:
        self.obs.kv_failed(f)

        def fail() -> None:
            pending = self._pending.pop(f.request_id, None)
            if pending is not None:
                pending.fail(f.code.name, f.message)

        self.loop.submit(fail)

    # ------------------------------------------------------ engine thread
    def _adopt(self, t: CompletedTransfer) -> None:
        """The KV is in place: the sequence joins the running batch with its first token."""
        bm = self.engine.block_manager
        pending = self._pending.pop(t.request_id, None)
        if pending is None:  # aborted while the KV was in flight
            bm.free_blocks(t.block_ids)
            return
        meta = kv_pb2.KVRequestMeta.FromString(t.meta)
        seq = pending.seq
        if t.num_tokens != seq.num_prompt_tokens:
            bm.free_blocks(t.block_ids)
            pending.fail("PROTOCOL", f"KV for {t.num_tokens} tokens arrived for a {seq.num_prompt_tokens}-token prompt")
            return
        seq.block_table = list(t.block_ids)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_cached_tokens = meta.num_cached_tokens
        bm.cache_full_blocks(seq)
        lps = [logprob_from_proto(meta.first_token_logprob)] if meta.HasField("first_token_logprob") else []
        seq.logprobs.extend(lps)
        self.engine.scheduler.add_running(seq)
        self.loop.register_sink(seq.request_id, pending.sink)
        out = self.engine.append_token(seq, meta.first_token_id, lps)
        self.obs.adopted(seq, out)
        self.loop.deliver(out)

    # -------------------------------------------------------------- status
    def num_pending(self) -> int:
        return len(self._pending)

    def health_error(self) -> str:
        """Why this worker cannot serve ("" when it can): its engine thread or its KV receiver died."""
        if self.loop.error is not None:
            return f"engine failed: {self.loop.error}"
        if self.receiver.error is not None:
            return f"KV receiver failed: {self.receiver.error!r}"
        return ""
