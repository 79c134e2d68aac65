"""The PrefillWorker gRPC service: Prefill answers once the request's KV has reached its decode worker."""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvtransfer import TransferCode
from prefill_worker.worker import PrefillCore
from server.errors import DeadlineExceeded, Mismatch, Overloaded, TandemError, Unavailable
from server.protoconv import logprob_to_proto, sampling_from_proto
from server.tracing import finish_span, start_server_span, traceparent_of
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)

_ERRORS: dict[TransferCode, type[TandemError]] = {
    TransferCode.MISMATCH: Mismatch,
    TransferCode.NO_SPACE: Overloaded,
    TransferCode.TIMEOUT: DeadlineExceeded,
}


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
            resp = await self._prefill(request, context, traceparent_of(span) or request.traceparent)
        except BaseException as exc:
            finish_span(span, exc)
            raise
        span.set_attributes({"tandem.prefix_hit_tokens": resp.num_cached_tokens, "tandem.kv.bytes": resp.transfer.bytes,
                             "tandem.queue_ns": resp.queue_ns, "tandem.prefill_ns": resp.prefill_ns})
        finish_span(span)
        return resp

    async def _prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext,
                       traceparent: str) -> pb.PrefillResponse:
        core = self.core
        if health := core.health_error():
            raise Unavailable(f"prefill worker {self.worker_id} {health}")
        if self.inflight >= self.max_queued:
            raise Overloaded(f"prefill worker {self.worker_id} has {self.inflight} requests queued (limit "
                             f"{self.max_queued}); retry later", retry_after_s=1.0)
        params = sampling_from_proto(request.sampling)
        rid = request.request_id
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.timeout_s
        fut = core.prefill(rid, list(request.prompt_token_ids), params, request.decode_kv_address, traceparent)
        self.inflight += 1
        try:
            done = await asyncio.wait_for(asyncio.shield(fut), timeout)
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
            raise _ERRORS.get(res.code, Unavailable)(
                f"KV transfer of request {rid} to {request.decode_kv_address} failed ({res.code.name}): {res.error}")
        out = done.output
        resp = pb.PrefillResponse(
            first_token_id=out.new_token_ids[0], num_cached_tokens=out.num_cached_tokens,
            num_prompt_tokens=out.num_prompt_tokens, prefill_ns=done.prefill_ns, queue_ns=done.queue_ns,
            transfer=pb.KVTransferStats(bytes=res.bytes, transfer_ns=int(res.seconds * 1e9), num_blocks=res.num_blocks),
        )
        if out.new_logprobs:
            resp.first_token_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
        return resp

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self.core.abort(request.request_id, request.reason or "aborted by the gateway")
        return pb.AbortResponse(found=True)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        core = self.core
        stats = core.loop.stats()
        err = core.health_error()
        return pb.StatusResponse(
            worker_id=self.worker_id, role=gen.WORKER_ROLE_PREFILL,
            kv_blocks_total=stats["kv_blocks_total"], kv_blocks_free=stats["kv_blocks_free"],
            running=stats["running"], waiting=stats["waiting"],
            outstanding_prefill_tokens=core.outstanding_tokens(), kv_layout=core.layout.to_proto(),
            cached_blocks=stats["kv_blocks_cached"], inflight_transfers=core.num_transferring(),
            max_model_len=core.engine.max_model_len, address=self.address, error=err,
        )
