"""What the decode worker reports about each request: spans of its stages, and worker metrics.

    tandem.v1.DecodeWorker/Decode      SERVER, asyncio (service.py); its traceparent is the record's
    ├── decode.admission_wait          Decode call -> KV adopted (or, local prefill: -> first forward)
    ├── decode.steps                   one per `steps_per_span` engine steps that gave this request tokens
    │                                  (tokens, steps, mean batch size, speculation counts when present)
    └── decode.finish                  the step that finished it: reason, output tokens
    kv.send (prefill worker)
    └── kv.receive                     first KV frame -> last page written (receiver's I/O thread), a child
                                       of the sender's span through the KVTransferBegin traceparent

Speculative decoding: each decode.steps span carries what its steps verified (tandem.spec.steps,
draft_tokens, accepted_tokens, acceptance_rate: deltas of the Sequence's num_spec_steps /
num_draft_tokens / num_accepted_tokens counters), decode.finish the request's totals.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from engine.model_runner import StepInput
from engine.outputs import RequestOutput, StepOutput
from engine.sequence import Sequence
from kvtransfer import CompletedTransfer, FailedTransfer
from server.logs import ThroughputLog
from server.metrics import WorkerMetrics
from server.tracing import (
    RequestTrace,
    Tracing,
    context_from_traceparent,
    epoch_ns_from_monotonic,
    epoch_ns_from_perf,
    record_span,
)

if TYPE_CHECKING:
    from decode_worker.worker import DecodeRequest

STEPS_PER_SPAN = 16


class _Window:
    """The decode steps of one request not yet reported in a decode.steps span."""

    __slots__ = ("start_ns", "steps", "tokens", "batch", "first_token", "spec0")

    def __init__(self, start_ns: int, first_token: int, spec0: tuple[int, int, int]) -> None:
        self.start_ns, self.first_token = start_ns, first_token  # perf_counter_ns, output index
        self.steps = self.tokens = self.batch = 0
        self.spec0 = spec0  # the sequence's speculation counters when the window opened


@dataclass
class DecodeTrace(RequestTrace):
    """What the observer keeps per request (on its DecodeRequest record)."""

    admitted: bool = False
    prefill_start_ns: int | None = None  # perf_counter_ns of a local prefill's first forward
    first_token_ns: int | None = None  # perf_counter_ns of its first token
    window: _Window | None = None
    spec: tuple[int, int, int] = (0, 0, 0)  # speculation counters at the last decode.steps span


def _spec(seq: Sequence) -> tuple[int, int, int]:
    """(verification steps, draft tokens, accepted tokens) so far; zeros without speculation."""
    return (getattr(seq, "num_spec_steps", 0), getattr(seq, "num_draft_tokens", 0),
            getattr(seq, "num_accepted_tokens", 0))


def _spec_attrs(steps: int, draft: int, accepted: int) -> dict[str, Any]:
    if not draft:
        return {}
    return {"tandem.spec.steps": steps, "tandem.spec.draft_tokens": draft, "tandem.spec.accepted_tokens": accepted,
            "tandem.spec.acceptance_rate": accepted / draft}


class DecodeObserver:
    """Called by DecodeCore at its hooks (engine thread, unless noted); per-request state is the
    record's `trace` (DecodeTrace), its arrival time the record's `arrived`."""

    def __init__(self, tracing: Tracing, metrics: WorkerMetrics, steps_per_span: int = STEPS_PER_SPAN) -> None:
        if steps_per_span < 1:
            raise ValueError(f"steps_per_span must be >= 1, got {steps_per_span}")
        self.tracing = tracing
        self.metrics = metrics
        self.steps_per_span = steps_per_span
        self.throughput = ThroughputLog("decode")

    # ------------------------------------------------------------------ receiver I/O thread
    def kv_received(self, t: CompletedTransfer) -> None:
        self.metrics.transfer("receive", "OK", t.bytes, t.seconds)
        if not self.tracing.enabled:
            return
        parent = context_from_traceparent(t.traceparent)
        if parent is None or not trace.get_current_span(parent).get_span_context().trace_flags.sampled:
            return
        end = time.time_ns()
        record_span(self.tracing.tracer, "kv.receive", parent, end - int(t.seconds * 1e9), end, {
            "tandem.request_id": t.request_id,
            "tandem.kv.bytes": t.bytes,
            "tandem.kv.num_blocks": len(t.block_ids),
            "tandem.kv.num_tokens": t.num_tokens,
            "tandem.kv.stream_seconds": t.seconds,
            "tandem.kv.gbps": t.bytes / t.seconds / 1e9 if t.seconds > 0 else 0.0,
        })

    def kv_failed(self, f: FailedTransfer) -> None:
        self.metrics.transfer("receive", f.code.name, 0, 0.0)

    # ------------------------------------------------------------------ engine thread
    def _admitted(self, req: DecodeRequest, end_ns: int, local: bool) -> None:
        """Admission wait: the Decode call -> `end_ns` (epoch ns)."""
        req.trace.admitted = True
        seq = req.seq
        start_ns = epoch_ns_from_monotonic(req.arrived)
        self.metrics.queue_wait.observe(max(end_ns - start_ns, 0) / 1e9)
        parent = req.trace.parent(self.tracing)
        if parent is not None:
            record_span(self.tracing.tracer, "decode.admission_wait", parent, start_ns, end_ns, {
                "tandem.request_id": seq.request_id, "tandem.local_prefill": local,
                "tandem.prompt_tokens": seq.num_prompt_tokens, "tandem.prefix_hit_tokens": seq.num_cached_tokens})

    def adopted(self, req: DecodeRequest, out: RequestOutput) -> None:
        """The KV arrived and the sequence joined the batch with its first token (`out`)."""
        now_ns = time.time_ns()
        self._admitted(req, now_ns, local=False)
        req.trace.first_token_ns = time.perf_counter_ns()
        if out.finished:
            self.metrics.decode_time.observe(0.0)
            if req.trace.parent(self.tracing) is not None:
                self._finish(req, out, now_ns)

    def on_step(self, requests: Mapping[str, DecodeRequest], step: StepInput, outputs: StepOutput,
                t_exec_ns: int, t_done_ns: int) -> None:
        """After each engine step: admission and prefill time of local prefills, decode time,
        decode.steps windows and finishes, the throughput line."""
        step_s = (t_done_ns - t_exec_ns) / 1e9
        self.metrics.step_seconds.observe(step_s)
        self.metrics.step_masks(step)
        computed = sum(step.num_new_tokens) + sum(step.num_draft(i) for i in range(len(step.seqs)))
        self.metrics.iteration_tokens.observe(computed)
        for seq in step.seqs:
            req = requests.get(seq.request_id)
            if req is not None and not req.trace.admitted:  # a local prefill's first forward
                self._admitted(req, epoch_ns_from_perf(t_exec_ns), local=True)
                req.trace.prefill_start_ns = t_exec_ns
        generated, finished = len(outputs.tokens), 0  # plain decodes: a token each, none finished
        for out in outputs.outputs:
            tr = requests[out.request_id].trace if out.request_id in requests else DecodeTrace()
            generated += len(out.new_token_ids)
            if out.new_token_ids and tr.first_token_ns is None:  # a local prefill's first token
                tr.first_token_ns = t_done_ns
                self.metrics.prefill_time.observe((t_done_ns - (tr.prefill_start_ns or t_exec_ns)) / 1e9)
            if out.finished:
                finished += 1
                self.metrics.decode_time.observe((t_done_ns - (tr.first_token_ns or t_done_ns)) / 1e9)
        self.throughput.step(len(step.seqs), computed, generated, finished, step_s)
        if not self.tracing.enabled:
            return
        for out in outputs.all():
            req = requests.get(out.request_id)
            if req is None or out.index or req.trace.parent(self.tracing) is None:  # spans follow choice 0
                continue
            seq, tr = req.seq, req.trace
            win = tr.window
            if win is None:
                win = tr.window = _Window(t_exec_ns, seq.num_output_tokens - len(out.new_token_ids), tr.spec)
            win.steps += 1
            win.tokens += len(out.new_token_ids)
            win.batch += len(step.seqs)
            if win.steps >= self.steps_per_span or out.finished:
                self._flush(req, win, t_done_ns)
            if out.finished:
                self._finish(req, out, epoch_ns_from_perf(t_done_ns))

    def text_stopped(self, requests: Mapping[str, DecodeRequest], out: RequestOutput) -> None:
        """A stop string ended a choice (found where its text was made, after its step): its decode time,
        and for choice 0 its last decode.steps window and its finish."""
        now_ns = time.perf_counter_ns()
        req = requests.get(out.request_id)
        tr = req.trace if req is not None else DecodeTrace()
        self.metrics.decode_time.observe((now_ns - (tr.first_token_ns or now_ns)) / 1e9)
        if req is None or out.index or not self.tracing.enabled or tr.parent(self.tracing) is None:
            return
        if tr.window is not None:
            self._flush(req, tr.window, now_ns)
        self._finish(req, out, epoch_ns_from_perf(now_ns))

    def _flush(self, req: DecodeRequest, win: _Window, end_ns: int) -> None:
        seq, tr = req.seq, req.trace
        tr.window = None
        attrs: dict[str, Any] = {
            "tandem.request_id": seq.request_id,
            "tandem.decode.steps": win.steps,
            "tandem.decode.tokens": win.tokens,
            "tandem.decode.first_output_token": win.first_token,
            "tandem.decode.mean_batch_size": win.batch / win.steps,
        }
        now = tr.spec = _spec(seq)
        attrs.update(_spec_attrs(*(a - b for a, b in zip(now, win.spec0, strict=True))))
        record_span(self.tracing.tracer, "decode.steps", tr.parent(self.tracing), epoch_ns_from_perf(win.start_ns),
                    epoch_ns_from_perf(end_ns), attrs)

    def _finish(self, req: DecodeRequest, out: RequestOutput, at_ns: int) -> None:
        seq = req.seq
        reason = out.finish_reason.value if out.finish_reason is not None else "unknown"
        attrs: dict[str, Any] = {
            "tandem.request_id": seq.request_id,
            "tandem.finish.reason": reason,
            "gen_ai.response.finish_reasons": [reason],
            "gen_ai.usage.input_tokens": seq.num_prompt_tokens,
            "gen_ai.usage.output_tokens": seq.num_output_tokens,
            "tandem.preemptions": seq.num_preemptions,
        }
        if seq.stop_reason is not None:
            attrs["tandem.finish.stop"] = str(seq.stop_reason)
        if seq.params.structured is not None:
            attrs["tandem.structured.kind"] = seq.params.structured.kind
            attrs["tandem.structured.complete"] = bool(seq.grammar is not None and seq.grammar.done)
        attrs.update(_spec_attrs(*_spec(seq)))
        record_span(self.tracing.tracer, "decode.finish", req.trace.parent(self.tracing), at_ns, at_ns, attrs)
