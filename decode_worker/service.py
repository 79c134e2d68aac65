"""The DecodeWorker gRPC service: Decode streams a request's tokens; Abort and Status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from decode_worker.worker import DecodeCore, DecodeRequest
from engine.outputs import RequestOutput
from server.errors import Overloaded, Unavailable
from server.inbox import Inbox
from server.protoconv import finish_to_proto, logprob_to_proto, sampling_from_proto
from server.tracing import finish_span, start_server_span, traceparent_of
from server.worker import abort_and_tell, compile_grammar
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, core: DecodeCore, worker_id: str, address: str, max_streams: int) -> None:
        self.core = core
        self.worker_id = worker_id
        self.address = address
        self.max_streams = max_streams
        self.streams = 0
        self._inbox_of_loop: Inbox | None = None  # the engine's outputs into the streams' queues

    def _inbox(self) -> Inbox:
        """The running loop's inbox (a server runs one loop; a new loop gets a new inbox)."""
        loop = asyncio.get_running_loop()
        if self._inbox_of_loop is None or self._inbox_of_loop.loop is not loop:
            self._inbox_of_loop = Inbox(loop)
        return self._inbox_of_loop

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[pb.DecodeResponse]:
        span = start_server_span(self.core.obs.tracing, "tandem.v1.DecodeWorker/Decode", context.invocation_metadata(),
                                 request.traceparent, {"tandem.request_id": request.request_id,
                                                       "tandem.local_prefill": request.local_prefill})
        tokens = 0
        try:
            async with aclosing(self._decode(request, traceparent_of(span) or request.traceparent, span)) as stream:
                async for resp in stream:
                    tokens += len(resp.token_ids)
                    yield resp
        except BaseException as exc:
            span.set_attribute("gen_ai.usage.output_tokens", tokens)
            finish_span(span, exc)
            raise
        span.set_attribute("gen_ai.usage.output_tokens", tokens)
        finish_span(span)

    async def _decode(self, request: pb.DecodeRequest, traceparent: str, span: Any = None
                      ) -> AsyncGenerator[pb.DecodeResponse, None]:
        core = self.core
        if health := core.health_error():
            raise Unavailable(f"decode worker {self.worker_id} {health}", retry_after_s=1.0)
        if self.streams >= self.max_streams:
            raise Overloaded(f"decode worker {self.worker_id} has {self.streams} requests (limit "
                             f"{self.max_streams}); retry later", retry_after_s=1.0)
        rid = request.request_id
        params = sampling_from_proto(request.sampling)
        grammar = await compile_grammar(core.engine, params, core.obs.metrics, span)  # before admission
        seq = core.engine.make_sequence(rid, list(request.prompt_token_ids), params, request.priority, grammar)
        inbox = self._inbox()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        req = DecodeRequest(seq, emit=lambda out: inbox.put(queue, out), fail=lambda exc: inbox.put(queue, exc),
                            local=request.local_prefill)
        req.trace.traceparent = traceparent
        t0 = time.monotonic()
        core.decode(req)
        self.streams += 1
        unfinished = seq.params.n  # choices still running
        first = True
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                outs = [item]  # coalesce what is already queued: one message per choice
                while not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        raise nxt
                    outs.append(nxt)
                for index, group in _by_choice(outs).items():
                    resp = _message(index, group)
                    if resp.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
                        unfinished -= 1
                    if first:
                        resp.kv_wait_ns = 0 if request.local_prefill else int((time.monotonic() - t0) * 1e9)
                        first = False
                    yield resp
        finally:
            self.streams -= 1
            if unfinished:  # cancelled, deadline, failure: free everything this request holds
                core.abort(rid, "the Decode call ended before the request finished")

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=await abort_and_tell(
            lambda found: self.core.abort(request.request_id, request.reason or "aborted by the gateway", found),
            self.core.loop.dead.is_set()))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        core = self.core
        stats = core.loop.snapshot.stats
        return pb.StatusResponse(
            worker_id=self.worker_id, role=gen.WORKER_ROLE_DECODE,
            kv_blocks_total=stats["kv_blocks_total"], kv_blocks_free=stats["kv_blocks_free"],
            running=stats["running"], waiting=stats["waiting"] + stats.get("kv_wanted", 0),
            kv_address=core.receiver.address, kv_layout=core.layout.to_proto(),
            cached_blocks=stats["kv_blocks_cached"], inflight_transfers=core.receiver.stats().get("live", 0),
            max_model_len=core.engine.max_model_len, address=self.address, error=core.health_error(),
        )



def _by_choice(outs: list[RequestOutput]) -> dict[int, list[RequestOutput]]:
    """Outputs grouped by choice, choices in order of their first output (choice 0 comes first)."""
    groups: dict[int, list[RequestOutput]] = {}
    for out in outs:
        groups.setdefault(out.index, []).append(out)
    return groups


def _message(index: int, outs: list[RequestOutput]) -> pb.DecodeResponse:
    """One choice's consecutive outputs as one message; the last one's state."""
    last = outs[-1]
    resp = pb.DecodeResponse(
        token_ids=[t for o in outs for t in o.new_token_ids],
        text="".join(o.new_text for o in outs),
        logprobs=[logprob_to_proto(lp) for o in outs for lp in o.new_logprobs],
        finish_reason=finish_to_proto(last.finish_reason) if last.finished else gen.FINISH_REASON_UNSPECIFIED,
        num_cached_tokens=last.num_cached_tokens, index=index,
    )
    prompt = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
    if prompt is not None:
        resp.prompt_logprobs.extend(logprob_to_proto(lp) for lp in prompt)
    if last.finished:
        resp.num_prompt_tokens = last.num_prompt_tokens
        resp.num_output_tokens = last.num_output_tokens
        stop = last.stop_reason if last.stop_reason is not None else last.seq.stop_reason if last.seq else None
        if isinstance(stop, str):
            resp.finish_message = stop
    return resp
