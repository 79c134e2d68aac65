"""The PrefillWorker gRPC service: Prefill answers once the request's KV has reached its decode worker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from prefill_worker.worker import PrefillCore, PrefillDone, PrefillRequest
from server.errors import DeadlineExceeded, Overloaded, Unavailable
from server.protoconv import logprob_to_proto, sampling_from_proto
from server.tracing import finish_span, start_server_span, traceparent_of
from server.worker import abort_and_tell, compile_grammar, transfer_error
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, core: PrefillCore, worker_id: str, address: str, timeout_s: float, max_queued: int) -> None:
        self.core = core
        self.worker_id = worker_id
        self.address = address
        self.timeout_s = timeout_s
        self.max_queued = max_queued
        self.inflight = 0

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        span = start_server_span(self.core.obs.tracing, "tandem.v1.PrefillWorker/Prefill",
                                 context.invocation_metadata(), request.traceparent,
                                 {"tandem.request_id": request.request_id,
                                  "tandem.prompt_tokens": len(request.prompt_token_ids)})
        try:
            resp = await self._prefill(request, traceparent_of(span) or request.traceparent, span)
        except BaseException as exc:
            finish_span(span, exc)
            raise
        span.set_attributes({"tandem.prefix_hit_tokens": resp.num_cached_tokens, "tandem.kv.bytes": resp.transfer.bytes,
                             "tandem.queue_ns": resp.queue_ns, "tandem.prefill_ns": resp.prefill_ns})
        finish_span(span)
        return resp

    async def _prefill(self, request: pb.PrefillRequest, traceparent: str, span: Any = None) -> pb.PrefillResponse:
        core = self.core
        if health := core.health_error():
            raise Unavailable(f"prefill worker {self.worker_id} {health}", retry_after_s=1.0)
        if self.inflight >= self.max_queued:
            raise Overloaded(f"prefill worker {self.worker_id} has {self.inflight} requests queued (limit "
                             f"{self.max_queued}); retry later", retry_after_s=1.0)
        rid = request.request_id
        params = sampling_from_proto(request.sampling)
        grammar = await compile_grammar(core.engine, params, core.obs.metrics, span)  # before admission
        seq = core.engine.make_sequence(rid, list(request.prompt_token_ids), params, request.priority, grammar)
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.timeout_s
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[PrefillDone] = loop.create_future()

        def settle(value: PrefillDone | BaseException) -> None:
            if answer.done():
                return
            if isinstance(value, BaseException):
                answer.set_exception(value)
            else:
                answer.set_result(value)

        req = PrefillRequest(seq, emit=lambda out: None, fail=lambda exc: loop.call_soon_threadsafe(settle, exc),
                             peer=request.decode_kv_address,
                             done=lambda d: loop.call_soon_threadsafe(settle, d))
        req.trace.traceparent = traceparent
        core.prefill(req)
        self.inflight += 1
        try:
            done = await asyncio.wait_for(asyncio.shield(answer), timeout)
        except TimeoutError:
            core.abort(rid, f"prefill of {rid} took longer than {timeout:.1f} s")
            raise DeadlineExceeded(f"prefill of request {rid} did not finish within {timeout:.1f} s") from None
        except asyncio.CancelledError:
            core.abort(rid, "the gateway cancelled the request")
            raise
        finally:
            self.inflight -= 1
        res = done.result
        if not res.ok or done.output is None:
            raise transfer_error(res.code, f"KV transfer of request {rid} to {request.decode_kv_address} failed "
                                           f"({res.code.name}): {res.error}")
        out = done.output
        return pb.PrefillResponse(
            num_cached_tokens=out.num_cached_tokens, num_prompt_tokens=out.num_prompt_tokens,
            prefill_ns=done.prefill_ns, queue_ns=done.queue_ns,
            transfer=pb.KVTransferStats(bytes=res.bytes, transfer_ns=int(res.seconds * 1e9), num_blocks=res.num_blocks),
            prompt_logprobs=[logprob_to_proto(lp) for lp in out.prompt_logprobs or ()],
        )

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=await abort_and_tell(
            lambda found: self.core.abort(request.request_id, request.reason or "aborted by the gateway", found),
            self.core.loop.dead.is_set()))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        core = self.core
        stats = core.loop.snapshot.stats
        return pb.StatusResponse(
            worker_id=self.worker_id, role=gen.WORKER_ROLE_PREFILL,
            kv_blocks_total=stats["kv_blocks_total"], kv_blocks_free=stats["kv_blocks_free"],
            running=stats["running"], waiting=stats["waiting"],
            outstanding_prefill_tokens=stats.get("outstanding_prefill_tokens", 0), kv_layout=core.layout.to_proto(),
            cached_blocks=stats["kv_blocks_cached"], inflight_transfers=stats.get("transferring", 0),
            max_model_len=core.engine.max_model_len, address=self.address, error=core.health_error(),
        )
