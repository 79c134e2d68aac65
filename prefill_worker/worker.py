"""The prefill worker's core: an engine that stops after the first token and ships the KV.

Per request (all on the engine thread unless noted; the record is a PrefillRequest):

    Prefill RPC -> add (prefill_only) -> chunks scheduled under the token budget (prefix cache hits skip)
    final chunk scheduled  -> before_execute: KVSender.begin(peer, block_table)   (handshake, reserve)
    forward, layer l done  -> on_layer_done: handle.layer_ready(l) for l < L-1    (transfer overlaps)
    first token sampled    -> after_process: handle.finish(meta with the token)   (last layer + meta)
                              (n > 1 choices: their n first tokens, sampled from the one prefill)
    transfer ends (sender I/O thread) -> command: blocks released, the record leaves, req.done(...)

Block ownership: the sequence's blocks are the engine's until the transfer ends (success or not);
then they are freed into the prefix cache, still named, so the next request with this prefix hits.

Tensor parallelism (the runner has a `staging` pool, engine/parallel/relay.py): each rank holds only its
KV heads, so rank 0 relays whole pages. When the final chunk is scheduled, staging blocks are taken and
the transfer begins from them; the forward gathers every rank's heads of the prompt's pages into them
layer by layer (`ModelRunner.relay_next_step`), so layers still go out as they are computed. The staging
blocks go back when the transfer ends. A request that finds the staging pool full is gathered after its
forward instead, once blocks free (`_relay_waiting`, retried on every loop tick; every layer at once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.engine import Engine
from engine.engine_loop import EngineLoop, Request
from engine.model_runner import StepInput
from engine.outputs import RequestGone, RequestOutput
from kvtransfer import KVLayout, KVSender, TransferCode, TransferHandle, TransferResult
from kvtransfer.curve import CurveClient
from prefill_worker.observe import PrefillObserver, PrefillTrace
from server.metrics import WorkerMetrics, new_registry
from server.protoconv import logprob_to_proto
from server.tracing import disabled
from tandem.v1 import kv_pb2

logger = logging.getLogger(__name__)


@dataclass
class PrefillDone:
    output: RequestOutput | None
    result: TransferResult
    prefill_ns: int
    queue_ns: int


def _never(done: PrefillDone) -> None:
    raise AssertionError("PrefillRequest.done was not set")


@dataclass(eq=False)
class PrefillRequest(Request):
    """A prompt to prefill here and ship to `peer` (a decode worker's KV address).

    done(PrefillDone): the transfer ended (ok or not); thread-safe, called once, instead of fail().
    """

    peer: str = ""
    done: Callable[[PrefillDone], object] = _never
    streams: bool = False  # its one output goes to the transfer, not to emit
    first_forward: float | None = None  # monotonic, set before its first forward
    handle: TransferHandle | None = None
    begin_error: str = ""
    staging_ids: list[int] | None = None  # tensor parallelism: the whole-page staging blocks it ships from
    trace: PrefillTrace = field(default_factory=PrefillTrace)


class PrefillCore:
    """The engine loop's hooks (engine.engine_loop.StepHooks) plus the KV sender."""

    def __init__(self, engine: Engine, layout: KVLayout, kv_timeout_s: float,
                 obs: PrefillObserver | None = None, *, curve: CurveClient | None = None,
                 watchdog_s: float | None = None, fault: tuple[str, int] | None = None) -> None:
        self.engine = engine
        self.obs = obs or PrefillObserver(disabled(), WorkerMetrics(new_registry(), "prefill"))
        self.layout = layout
        self.staging = engine.runner.staging  # None: one rank, the pool's pages are shipped as they are
        self.loop = EngineLoop(engine, name="prefill-engine", hooks=self, watchdog_s=watchdog_s, fault=fault,
                               observers=[lambda *a: self.obs.on_step(self.requests, *a)], gauges=self._gauges,
                               tick=self._relay_pending if self.staging is not None else None)
        self.sender = KVSender(engine.runner.transfer_pool, layout, timeout_s=kv_timeout_s, curve=curve)
        self._step_handles: list[TransferHandle] = []
        self._relay_waiting: list[tuple[PrefillRequest, RequestOutput, bytes, int, int]] = []

    @property
    def requests(self) -> dict[str, PrefillRequest]:
        return self.loop.requests  # type: ignore[return-value]

    def start(self) -> None:
        self.loop.start()

    def close(self) -> None:
        self.sender.close()
        self.loop.stop()

    # ------------------------------------------------------------ requests (any thread)
    def prefill(self, req: PrefillRequest) -> None:
        """Queue `req` (its prefill_only sequence already validated); req.done or req.fail answers."""
        req.seq.prefill_only = True
        self.loop.add(req)

    def abort(self, request_id: str, reason: str, found: Callable[[bool], None] | None = None) -> None:
        """End `request_id`: a transfer in flight is aborted (its blocks are released when the sender
        lets go), a queued or running prefill is dropped. `found(bool)`: whether it was live."""
        def abort() -> None:
            req = self.requests.get(request_id)
            waiting = [w for w in self._relay_waiting if w[0] is req]
            if req is not None and req.handle is not None:
                req.handle.abort(reason)  # its done callback releases the blocks and answers
            elif req is not None and waiting:  # sampled, waiting for staging blocks: it holds its own
                self._relay_waiting.remove(waiting[0])
                del self.requests[request_id]
                self.engine.release(req.seq)
                req.fail(RequestGone(reason))
            elif req is not None:
                del self.requests[request_id]
                self.engine.abort(request_id)
                req.fail(RequestGone(reason))
            if found is not None:
                found(req is not None)

        self.loop.submit(abort)

    # -------------------------------------------------------------- hooks (engine thread)
    def before_execute(self, step: StepInput) -> None:
        self._step_handles = []
        now = time.monotonic()
        for seq, sample in zip(step.seqs, step.sample, strict=True):
            req = self.requests[seq.request_id]
            if req.first_forward is None:
                req.first_forward = now
            if not sample or req.handle is not None:
                continue
            ids = list(seq.block_table)
            if self.staging is not None:  # relayed: ship whole pages from staging blocks, gathered in the forward
                staged = self.staging.alloc(len(ids))
                if staged is None:
                    continue  # staging is full: gathered after the forward (after_process)
                ids = staged
            traceparent = self.loop.observe(self.obs.transfer_begin, req, default="")
            try:
                handle = self.sender.begin(seq.request_id, req.peer, ids, seq.num_prompt_tokens,
                                           traceparent=traceparent)
            except (ValueError, RuntimeError) as exc:
                if self.staging is not None:
                    self.staging.free(ids)
                req.begin_error = str(exc)
                self.loop.observe(self.obs.transfer_not_started, req, str(exc), default=None)
                continue
            if self.staging is not None:
                req.staging_ids = ids
                self.engine.runner.relay_next_step(list(seq.block_table), ids)
            req.handle = handle
            self._step_handles.append(handle)

    def on_layer_done(self, step: StepInput, layer: int) -> None:
        if layer < self.layout.num_layers - 1:  # the last layer goes with the first token
            for handle in self._step_handles:
                handle.layer_ready(layer)

    def after_process(self, step: StepInput, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            req = self.requests[out.request_id]
            seq = req.seq
            first_forward = req.first_forward if req.first_forward is not None else time.monotonic()
            queue_ns = int((first_forward - req.arrived) * 1e9)
            prefill_ns = int((time.monotonic() - first_forward) * 1e9)
            handle = req.handle
            if self.staging is not None and handle is None and not req.begin_error:
                self._relay_waiting.append((req, out, self._meta(out, prefill_ns), prefill_ns, queue_ns))
                continue
            if handle is None:
                del self.requests[req.id]
                self.engine.release(seq)
                err = req.begin_error or "no KV transfer was started"
                req.done(PrefillDone(out, TransferResult(False, err, TransferCode.INTERNAL, 0, 0.0, 0),
                                     prefill_ns, queue_ns))
                continue
            handle.finish(self._meta(out, prefill_ns))  # the last layer goes with the first token
            handle.add_done_callback(self._on_transfer_end(req, out, prefill_ns, queue_ns))
        if self._relay_waiting:
            self._relay_pending()

    @staticmethod
    def _meta(out: RequestOutput, prefill_ns: int) -> bytes:
        seq = out.seq
        assert seq is not None
        meta = kv_pb2.KVRequestMeta(first_token_id=out.new_token_ids[0], num_prompt_tokens=seq.num_prompt_tokens,
                                    num_cached_tokens=seq.num_cached_tokens, prefill_ns=prefill_ns)
        if out.new_logprobs:
            meta.first_token_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
        for token, lps in out.sibling_tokens:
            meta.sibling_token_ids.append(token)
            meta.sibling_token_logprobs.extend(logprob_to_proto(lp) for lp in lps)
        return meta.SerializeToString()

    def _relay_pending(self) -> None:
        """Tensor parallelism: gather and ship the waiting requests, oldest first, while staging allows."""
        assert self.staging is not None
        while self._relay_waiting:
            req, out, meta, prefill_ns, queue_ns = self._relay_waiting[0]
            seq = req.seq
            ids = self.staging.alloc(len(seq.block_table))
            if ids is None:
                return  # first come, first served: the next transfer's end frees some
            self._relay_waiting.pop(0)
            try:
                self.engine.runner.gather_kv(list(seq.block_table), ids)  # every rank's heads -> whole pages
            except Exception as exc:  # a rank is gone: fail-stop, as a failed step would
                self.loop.kill(f"KV relay gather failed: {type(exc).__name__}: {exc}")
                return
            traceparent = self.loop.observe(self.obs.transfer_begin, req, default="")
            try:
                handle = self.sender.begin(seq.request_id, req.peer, ids, seq.num_prompt_tokens,
                                           traceparent=traceparent)
            except (ValueError, RuntimeError) as exc:
                self.staging.free(ids)
                self.loop.observe(self.obs.transfer_not_started, req, str(exc), default=None)
                del self.requests[req.id]
                self.engine.release(seq)
                req.done(PrefillDone(out, TransferResult(False, str(exc), TransferCode.INTERNAL, 0, 0.0, 0),
                                     prefill_ns, queue_ns))
                continue
            req.handle, req.staging_ids = handle, ids
            handle.finish(meta)  # every layer at once, the first token with it
            handle.add_done_callback(self._on_transfer_end(req, out, prefill_ns, queue_ns))

    def _on_transfer_end(self, req: PrefillRequest, out: RequestOutput, prefill_ns: int, queue_ns: int
                         ) -> Callable[[TransferResult], None]:
        """The handle's done callback (sender I/O thread): hand the outcome to the engine thread."""
        def ended(res: TransferResult) -> None:
            self.loop.submit(lambda: self._transfer_done(req, PrefillDone(out, res, prefill_ns, queue_ns)))

        return ended

    def _transfer_done(self, req: PrefillRequest, done: PrefillDone) -> None:
        """The transfer ended: its blocks go back (into the prefix cache), the RPC gets the result."""
        if self.requests.get(req.id) is req:
            del self.requests[req.id]
        self.engine.release(req.seq)
        if req.staging_ids is not None and self.staging is not None:
            self.staging.free(req.staging_ids)
            req.staging_ids = None
        self.loop.observe(self.obs.transfer_done, req, done.result, self.layout.num_layers, default=None)
        req.done(done)

    # --------------------------------------------------------------- status
    def _gauges(self) -> dict[str, int]:
        sched = self.engine.scheduler
        return {"outstanding_prefill_tokens": sum(s.num_uncomputed_tokens for s in [*sched.running, *sched.waiting]),
                "transferring": sum(1 for r in self.requests.values() if r.handle is not None)} | (
                {"kv_relay_blocks_free": self.staging.num_free, "kv_relay_waiting": len(self._relay_waiting)}
                if self.staging is not None else {})

    def health_error(self) -> str:
        """Why this worker cannot serve ("" when it can): its engine thread or its KV sender died."""
        if self.loop.dead.is_set():
            return f"engine failed: {self.loop.error}"
        if self.sender.error is not None:
            return f"KV sender failed: {self.sender.error!r}"
        return ""
