"""What the prefill worker reports about each request: spans of its stages, and worker metrics.

    tandem.v1.PrefillWorker/Prefill   SERVER, asyncio (service.py); its traceparent rides in seq.extra
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
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from engine.model_runner import StepInput
from engine.outputs import RequestOutput
from engine.sequence import Sequence
from kvtransfer import TransferResult
from server.logs import ThroughputLog
from server.metrics import WorkerMetrics
from server.tracing import (
    Tracing,
    epoch_ns_from_monotonic,
    epoch_ns_from_perf,
    record_span,
    sampled_parent,
    traceparent_of,
)


class PrefillObserver:
    """Called by PrefillCore at its hooks; owns no request state beyond keys in `seq.extra`.

    Expects seq.extra["traceparent"] (the SERVER span's), ["t0"] (monotonic arrival) and
    ["t_first_forward"] (monotonic, set by PrefillCore before the first forward)."""

    def __init__(self, tracing: Tracing, metrics: WorkerMetrics) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.throughput = ThroughputLog("prefill")

    def _parent(self, seq: Sequence) -> Context | None:
        return sampled_parent(self.tracing, seq.extra)

    # ------------------------------------------------------------------ engine thread
    def on_step(self, step: StepInput, outputs: list[RequestOutput], t_exec_ns: int, t_done_ns: int) -> None:
        """After each engine step: queue and prefill time, chunk spans, the throughput line."""
        step_s = (t_done_ns - t_exec_ns) / 1e9
        self.metrics.step_seconds.observe(step_s)
        batch_tokens = sum(step.num_new_tokens)
        self.metrics.iteration_tokens.observe(batch_tokens)
        self.throughput.step(len(step.seqs), batch_tokens, 0, sum(step.sample), step_s)
        for seq, n, sample in zip(step.seqs, step.num_new_tokens, step.sample, strict=True):
            x = seq.extra
            first = "obs_queued" not in x
            if first:
                x["obs_queued"] = True
                x["obs_first_forward_ns"] = t_exec_ns
                t_first = x.get("t_first_forward", time.monotonic())
                self.metrics.queue_wait.observe(max(t_first - x.get("t0", t_first), 0.0))
            if sample:  # the final chunk: the prompt is computed
                self.metrics.prefill_time.observe((t_done_ns - x.get("obs_first_forward_ns", t_exec_ns)) / 1e9)
            parent = self._parent(seq)
            if parent is None:
                continue
            tracer = self.tracing.tracer
            if first:
                t_first = x.get("t_first_forward", time.monotonic())
                record_span(tracer, "prefill.queue_wait", parent, epoch_ns_from_monotonic(x.get("t0", t_first)),
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

    def transfer_begin(self, seq: Sequence, peer: str) -> str:
        """The final chunk is scheduled: open kv.send; returns the traceparent for KVTransferBegin."""
        parent = self._parent(seq)
        if parent is None:
            return str(seq.extra.get("traceparent", ""))
        span = self.tracing.tracer.start_span("kv.send", context=parent, attributes={
            "tandem.request_id": seq.request_id,
            "tandem.kv.peer": peer,
            "tandem.kv.num_blocks": len(seq.block_table),
            "tandem.kv.num_tokens": seq.num_prompt_tokens,
        })
        seq.extra["obs_kv_span"] = span
        return traceparent_of(span)

    def transfer_not_started(self, seq: Sequence, error: str) -> None:
        span: Any = seq.extra.pop("obs_kv_span", None)
        self.metrics.transfers.labels(self.metrics.role, "send", "NOT_STARTED").inc()
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, error))
            span.end()

    # ------------------------------------------------------------------ sender I/O thread
    def transfer_done(self, seq: Sequence, res: TransferResult, num_layers: int) -> None:
        """The transfer ended (any outcome): metrics, and close kv.send with what it moved."""
        self.metrics.transfer("send", res.code.name, res.bytes, res.seconds)
        span: Any = seq.extra.pop("obs_kv_span", None)
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

