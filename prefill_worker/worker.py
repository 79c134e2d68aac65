"""The prefill worker's core: an engine that stops after the first token and ships the KV.

Per request (all on the engine thread unless noted):

    Prefill RPC -> add (prefill_only) -> chunks scheduled under the token budget (prefix cache hits skip)
    final chunk scheduled  -> before_execute: KVSender.begin(peer, block_table)   (handshake, reserve)
    forward, layer l done  -> on_layer_done: handle.layer_ready(l) for l < L-1    (transfer overlaps)
    first token sampled    -> after_process: handle.finish(meta with the token)   (last layer + meta)
    transfer ends (I/O thread) -> engine.release(seq) on the engine thread; the RPC gets the result

Block ownership: the sequence's blocks are the engine's until the transfer ends (success or not);
then they are freed into the prefix cache, still named, so the next request with this prefix hits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.model_runner import StepInput
from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams
from engine.sequence import Sequence
from kvtransfer import KVLayout, KVSender, TransferCode, TransferHandle, TransferResult
from kvtransfer.curve import CurveClient
from prefill_worker.observe import PrefillObserver
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


class PrefillCore:
    def __init__(self, engine: Engine, layout: KVLayout, kv_timeout_s: float,
                 obs: PrefillObserver | None = None, *, curve: CurveClient | None = None) -> None:
        self.engine = engine
        self.obs = obs or PrefillObserver(disabled(), WorkerMetrics(new_registry(), "prefill"))
        self.layout = layout
        self.loop = EngineLoop(engine, name="prefill-engine")
        self.sender = KVSender(engine.runner.kv, layout, timeout_s=kv_timeout_s, curve=curve)
        self.loop.before_execute = self._before_execute
        self.loop.on_layer_done = self._on_layer_done
        self.loop.after_process = self._after_process
        self.loop.on_step = self.obs.on_step
        self._step_handles: list[TransferHandle] = []
        self._futures: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[PrefillDone]]] = {}
        self._transferring: dict[str, Sequence] = {}  # first token sampled, KV on its way

    def start(self) -> None:
        self.loop.start()

    def close(self) -> None:
        self.sender.close()
        self.loop.stop()

    # ------------------------------------------------------------ requests
    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, peer: str,
                traceparent: str) -> asyncio.Future[PrefillDone]:
        """Queue a prefill; the future resolves when its KV transfer has ended. Raises ValueError."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PrefillDone] = loop.create_future()
        self._futures[request_id] = (loop, fut)
        try:
            self.loop.add_request(request_id, prompt, params, lambda out: None, prefill_only=True,
                                  extra={"peer": peer, "traceparent": traceparent, "t0": time.monotonic()})
        except Exception:
            self._futures.pop(request_id, None)
            raise
        return fut

    def abort(self, request_id: str, reason: str) -> None:
        def abort() -> None:
            handle: TransferHandle | None = None
            for seq in self._live_seqs():
                if seq.request_id == request_id:
                    handle = seq.extra.get("handle")
            if handle is not None:
                handle.abort(reason)  # its done-callback releases the blocks
            else:
                self.engine.abort(request_id)
                self._resolve(request_id, None, TransferResult(False, reason, TransferCode.ABORTED, 0, 0.0, 0), 0, 0)

        self.loop.submit(abort)

    def _live_seqs(self) -> list[Sequence]:
        return [*self._transferring.values(), *self.engine.scheduler.running, *self.engine.scheduler.waiting]

    # -------------------------------------------------------------- hooks (engine thread)
    def _before_execute(self, step: StepInput) -> None:
        self._step_handles = []
        now = time.monotonic()
        for seq, sample in zip(step.seqs, step.sample, strict=True):
            seq.extra.setdefault("t_first_forward", now)
            if not sample or "handle" in seq.extra:
                continue
            traceparent = self.obs.transfer_begin(seq, seq.extra["peer"])
            try:
                handle = self.sender.begin(seq.request_id, seq.extra["peer"], list(seq.block_table),
                                           seq.num_prompt_tokens, traceparent=traceparent)
            except (ValueError, RuntimeError) as exc:
                seq.extra["begin_error"] = str(exc)
                self.obs.transfer_not_started(seq, str(exc))
                continue
            seq.extra["handle"] = handle
            self._step_handles.append(handle)

    def _on_layer_done(self, step: StepInput, layer: int) -> None:
        if layer < self.layout.num_layers - 1:  # the last layer goes with the first token
            for handle in self._step_handles:
                handle.layer_ready(layer)

    def _after_process(self, step: StepInput, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            seq = out.seq
            assert seq is not None and seq.prefill_only
            t0 = seq.extra["t0"]
            queue_ns = int((seq.extra["t_first_forward"] - t0) * 1e9)
            prefill_ns = int((time.monotonic() - seq.extra["t_first_forward"]) * 1e9)
            handle = seq.extra.get("handle")
            if handle is None:
                self.engine.release(seq)
                err = seq.extra.get("begin_error", "no KV transfer was started")
                self._resolve(seq.request_id, out, TransferResult(False, err, TransferCode.INTERNAL, 0, 0.0, 0),
                              prefill_ns, queue_ns)
                continue
            meta = kv_pb2.KVRequestMeta(first_token_id=out.new_token_ids[0], num_prompt_tokens=seq.num_prompt_tokens,
                                        num_cached_tokens=seq.num_cached_tokens, prefill_ns=prefill_ns)
            if out.new_logprobs:
                meta.first_token_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
            self._transferring[seq.request_id] = seq
            handle.finish(meta.SerializeToString())  # the last layer goes with the first token
            handle.add_done_callback(
                lambda res, seq=seq, out=out, p=prefill_ns, q=queue_ns: self._transfer_done(seq, out, res, p, q))

    def _transfer_done(self, seq: Sequence, out: RequestOutput, res: TransferResult, p: int, q: int) -> None:
        """Sender I/O thread: free the blocks on the engine thread, answer the RPC."""
        def release() -> None:
            self._transferring.pop(seq.request_id, None)
            self.engine.release(seq)

        self.loop.submit(release)
        self.obs.transfer_done(seq, res, self.layout.num_layers)
        self._resolve(seq.request_id, out, res, p, q)

    def _resolve(self, request_id: str, out: RequestOutput | None, res: TransferResult, p: int, q: int) -> None:
        entry = self._futures.pop(request_id, None)
        if entry is None:
            return
        loop, fut = entry

        def set_result() -> None:
            if not fut.done():
                fut.set_result(PrefillDone(out, res, p, q))

        loop.call_soon_threadsafe(set_result)

    # --------------------------------------------------------------- status
    def outstanding_tokens(self) -> int:
        with self.loop.lock:
            sched = self.engine.scheduler
            return sum(s.num_uncomputed_tokens for s in [*sched.running, *sched.waiting])

    def num_transferring(self) -> int:
        return len(self._transferring)

    def health_error(self) -> str:
        """Why this worker cannot serve ("" when it can): its engine thread or its KV sender died."""
        if self.loop.error is not None:
            return f"engine failed: {self.loop.error}"
        if self.sender.error is not None:
            return f"KV sender failed: {self.sender.error!r}"
        return ""
