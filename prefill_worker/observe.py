"""What the prefill worker reports about each request: spans of its stages, and worker metrics.

    tandem.v1.PrefillWorker/Prefill   SERVER, asyncio (service.py); its traceparent is the record's
    ├── prefill.queue_wait            arrival -> first forward                     (engine thread, after the fact)
    ├── prefill.chunk                 one per forward that computed part of the prompt   (engine thread)
    └── kv.send                       transfer begun (final chunk scheduled) -> KVDone or failure;
                                      started on the engine thread, ended on the sender's I/O thread;
                                      its traceparent travels in KVTransferBegin, so the decode
                                      worker's kv.receive is its child

With tracing off every method below is a few attribute loads plus the metric updates. Requests whose
trace is not sampled are skipped the same way (their parent context is cached as None).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode

from engine.model_runner import StepInput
from engine.outputs import StepOutput
from kvtransfer import TransferResult
from server.logs import ThroughputLog
from server.metrics import WorkerMetrics
from server.tracing import (
    RequestTrace,
    Tracing,
    epoch_ns_from_monotonic,
    epoch_ns_from_perf,
    record_span,
    traceparent_of,
)

if TYPE_CHECKING:
    from prefill_worker.worker import PrefillRequest


@dataclass
class PrefillTrace(RequestTrace):
    """What the observer keeps per request (on its PrefillRequest record)."""

    queued: bool = False  # its queue wait was reported
    first_forward_ns: int | None = None  # perf_counter_ns of its first forward
    kv_span: Any = None  # the open kv.send span


class PrefillObserver:
    """Called by PrefillCore at its hooks (engine thread); per-request state is the record's `trace`
    (PrefillTrace), its times the record's `arrived` and `first_forward`."""

    def __init__(self, tracing: Tracing, metrics: WorkerMetrics) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.throughput = ThroughputLog("prefill")

    # ------------------------------------------------------------------ engine thread
    def on_step(self, requests: Mapping[str, PrefillRequest], step: StepInput, outputs: StepOutput,
                t_exec_ns: int, t_done_ns: int) -> None:
        """After each engine step: queue and prefill time, chunk spans, the throughput line."""
        step_s = (t_done_ns - t_exec_ns) / 1e9
        self.metrics.step_seconds.observe(step_s)
        self.metrics.step_masks(step)
        batch_tokens = sum(step.num_new_tokens)
        self.metrics.iteration_tokens.observe(batch_tokens)
        self.throughput.step(len(step.seqs), batch_tokens, 0, sum(step.sample), step_s)
        for seq, n, sample in zip(step.seqs, step.num_new_tokens, step.sample, strict=True):
            req = requests.get(seq.request_id)
            if req is None:
                continue
            first = not req.trace.queued
            t_first = req.first_forward if req.first_forward is not None else time.monotonic()
            if first:
                req.trace.queued = True
                req.trace.first_forward_ns = t_exec_ns
                self.metrics.queue_wait.observe(max(t_first - req.arrived, 0.0))
            if sample:  # the final chunk: the prompt is computed
                first_ns = req.trace.first_forward_ns if req.trace.first_forward_ns is not None else t_exec_ns
                self.metrics.prefill_time.observe((t_done_ns - first_ns) / 1e9)
            parent = req.trace.parent(self.tracing)
            if parent is None:
                continue
            tracer = self.tracing.tracer
            if first:
                record_span(tracer, "prefill.queue_wait", parent, epoch_ns_from_monotonic(req.arrived),
                            epoch_ns_from_monotonic(t_first),
                            {"tandem.request_id": seq.request_id, "tandem.prefix_hit_tokens": seq.num_cached_tokens})
            record_span(tracer, "prefill.chunk", parent, epoch_ns_from_perf(t_exec_ns), epoch_ns_from_perf(t_done_ns), {
                "tandem.request_id": seq.request_id,
                "tandem.chunk.first_token": max(seq.num_computed_tokens - n, 0),
                "tandem.chunk.tokens": n,
                "tandem.chunk.final": sample,
                "tandem.prompt_tokens": seq.num_prompt_tokens,
                "tandem.step.tokens": batch_tokens,
                "tandem.step.seqs": len(step.seqs),
            })

    def transfer_begin(self, req: PrefillRequest) -> str:
        """The final chunk is scheduled: open kv.send; returns the traceparent for KVTransferBegin."""
        parent = req.trace.parent(self.tracing)
        if parent is None:
            return req.trace.traceparent
        seq = req.seq
        span = self.tracing.tracer.start_span("kv.send", context=parent, attributes={
            "tandem.request_id": seq.request_id,
            "tandem.kv.peer": req.peer,
            "tandem.kv.num_blocks": len(seq.block_table),
            "tandem.kv.num_tokens": seq.num_prompt_tokens,
        })
        req.trace.kv_span = span
        return traceparent_of(span)

    def transfer_not_started(self, req: PrefillRequest, error: str) -> None:
        span, req.trace.kv_span = req.trace.kv_span, None
        self.metrics.transfers.labels(self.metrics.role, "send", "NOT_STARTED").inc()
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, error))
            span.end()

    def transfer_done(self, req: PrefillRequest, res: TransferResult, num_layers: int) -> None:
        """The transfer ended (any outcome): metrics, and close kv.send with what it moved."""
        self.metrics.transfer("send", res.code.name, res.bytes, res.seconds)
        span, req.trace.kv_span = req.trace.kv_span, None
        if span is None:
            return
        span.set_attributes({
            "tandem.kv.bytes": res.bytes,
            "tandem.kv.num_layers": num_layers,
            "tandem.kv.stream_seconds": res.seconds,
            "tandem.kv.gbps": res.gbps,
            "tandem.kv.result": res.code.name,
        })
        if not res.ok:
            span.set_status(Status(StatusCode.ERROR, f"{res.code.name}: {res.error}"))
        span.end()

