"""The public Generation service: validate, tokenize, route, then relay the decode worker's stream.

    Generate(req) -> validate + tokenize -> Router.route
        remote prefill:  Decode stream opened on D (it expects the KV)  +  Prefill(P, kv -> D) in parallel
        local prefill:   Decode stream on D with local_prefill
        relay D's messages to the client; the last one carries usage and timing
    on client cancel / deadline / any failure: cancel both calls and Abort on both workers
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import grpc

from engine.config import ModelConfig
from engine.tokenizer import Tokenizer
from gateway.config import GatewayLimits
from gateway.observe import GatewayObserver, RequestObservation
from gateway.registry import WorkerHandle, WorkerRegistry
from gateway.router import Route, Router
from gateway.validation import check_length, check_prompt_ids, check_request
from server.errors import Overloaded, TandemError, Unavailable
from server.protoconv import sampling_from_proto, sampling_to_proto
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tandem.v1 import worker_pb2 as pb

logger = logging.getLogger(__name__)


def _error_from_rpc(exc: grpc.aio.AioRpcError, worker: WorkerHandle) -> TandemError:
    """A worker's failure, as the client should see it."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        worker.mark_failed(f"{code.name}: {exc.details()}")
        return Unavailable(f"worker {worker.worker_id} ({worker.address}) failed: {exc.details()}", retry_after_s=1.0)
    err = TandemError(exc.details() or code.name, retry_after_s=_retry_after_s(exc))
    err.code = code
    return err


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """A worker's `retry-after-ms` trailer (RESOURCE_EXHAUSTED), passed on to the client."""
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return int(value) / 1000
            except (TypeError, ValueError):
                return None
    return None


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, registry: WorkerRegistry, router: Router, tokenizer: Tokenizer, model_config: ModelConfig,
                 model_name: str, limits: GatewayLimits, observer: GatewayObserver | None = None) -> None:
        self.registry = registry
        self.observer = observer or GatewayObserver()
        self.router = router
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name
        self.limits = limits
        self.inflight = 0
        self._background: set[asyncio.Task[object]] = set()

    # ------------------------------------------------------------ validation
    async def _prompt_ids(self, req: gen.GenerateRequest) -> list[int]:
        check_request(req, self.model_name)
        ids = await asyncio.to_thread(self.tokenizer.encode, req.prompt) if req.prompt else req.prompt_token_ids
        return check_prompt_ids(ids, self.model_config.vocab_size)

    def _check_length(self, ids: list[int], max_tokens: int, route: Route) -> None:
        limit = route.decode.status.max_model_len if route.decode.status else self.model_config.max_position_embeddings
        check_length(len(ids), max_tokens, limit)

    # --------------------------------------------------------------- Generate
    async def Generate(self, request: gen.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[gen.GenerateResponse]:
        async with aclosing(self.generate(request, context.invocation_metadata())) as stream:
            async for out in stream:
                yield out

    async def generate(self, request: gen.GenerateRequest, metadata: Sequence[tuple[str, Any]] | None = None
                       ) -> AsyncGenerator[gen.GenerateResponse, None]:
        """One request's whole path: what gRPC's Generate and the HTTP API (gateway/http_api.py) both run.

        `metadata`: the caller's (key, value) pairs; a `traceparent` there parents the request's trace.
        A refused request (validation, limits, no worker) raises TandemError / ValueError before the
        first message; closing the generator early aborts the request on every worker.
        """
        rid = request.request_id or secrets.token_hex(8)
        obs = self.observer.start(rid, self.model_name, metadata)
        try:
            async with aclosing(self._generate(request, rid, obs)) as stream:
                async for out in stream:
                    yield out
        except BaseException as exc:
            obs.end(exc)
            raise
        obs.end(None)

    async def _generate(self, request: gen.GenerateRequest, rid: str, obs: RequestObservation
                        ) -> AsyncGenerator[gen.GenerateResponse, None]:
        t0 = time.monotonic()
        if self.inflight >= self.limits.max_inflight:
            raise Overloaded(f"the gateway is serving {self.inflight} requests (limit {self.limits.max_inflight}); "
                             f"retry after about 1 s", retry_after_s=1.0)
        self.inflight += 1  # the slot is held from admission (tokenizing counts) to the end of the call
        try:
            params = sampling_from_proto(request.sampling, default_max_tokens=self.limits.default_max_tokens)
            obs.request(params)
            with obs.span("gateway.tokenize") as span:
                ids = await self._prompt_ids(request)
                obs.tokenized(span, ids, bool(request.prompt))
            with obs.span("gateway.route") as span:
                route = self.router.route(ids)
                obs.routed(span, route)
            self._check_length(ids, params.max_tokens, route)
            d_span, d_md, d_traceparent = obs.client_call("tandem.v1.DecodeWorker/Decode", route.decode.worker_id,
                                                          route.decode.address)
        except BaseException:
            self.inflight -= 1
            raise
        finished = False
        p_task: asyncio.Task[pb.PrefillResponse] | None = None
        d_call = route.decode.stub.Decode(pb.DecodeRequest(
            request_id=rid, prompt_token_ids=ids, sampling=sampling_to_proto(params), traceparent=d_traceparent,
            local_prefill=route.prefill is None, kv_timeout_ms=int(self.limits.kv_timeout_s * 1000),
        ), timeout=self.limits.request_timeout_s, metadata=d_md)
        try:
            if route.prefill is not None:
                p_span, p_md, p_traceparent = obs.client_call("tandem.v1.PrefillWorker/Prefill",
                                                              route.prefill.worker_id, route.prefill.address)
                p_task = asyncio.ensure_future(route.prefill.stub.Prefill(pb.PrefillRequest(
                    request_id=rid, prompt_token_ids=ids, sampling=sampling_to_proto(params),
                    decode_kv_address=route.decode.status.kv_address if route.decode.status else "",
                    traceparent=p_traceparent, timeout_ms=int(self.limits.request_timeout_s * 1000),
                ), timeout=self.limits.request_timeout_s, metadata=p_md))
                obs.watch_call(p_span, p_task)
            completion = 0
            first_ns = 0
            async for resp in self._relay(d_call, p_task, route):
                completion += len(resp.token_ids)
                obs.relayed(len(resp.token_ids), resp.text)
                out = gen.GenerateResponse(request_id=rid, token_ids=resp.token_ids, text=resp.text,
                                           logprobs=resp.logprobs, finish_reason=resp.finish_reason,
                                           finish_message=resp.finish_message)
                if not first_ns and resp.token_ids:
                    first_ns = int((time.monotonic() - t0) * 1e9)
                if resp.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
                    finished = True
                    out.usage.CopyFrom(gen.Usage(prompt_tokens=len(ids), completion_tokens=completion,
                                                 cached_tokens=resp.num_cached_tokens))
                    out.timing.CopyFrom(await self._timing(p_task, t0, first_ns))
                    obs.finished(resp.finish_reason, out.usage, resp.finish_message)
                yield out
            if not finished:
                raise Unavailable(f"decode worker {route.decode.worker_id} ended the stream without finishing")
            obs.call_done(d_span, None)
        finally:
            self.inflight -= 1
            if not finished:
                self._abort(rid, route, d_call, p_task)

    async def _relay(self, d_call, p_task: asyncio.Task[pb.PrefillResponse] | None, route: Route
                     ) -> AsyncIterator[pb.DecodeResponse]:
        """Yield D's messages; fail fast with the prefill's error if it fails first."""
        while True:
            read = asyncio.ensure_future(d_call.read())
            waiting: set[asyncio.Future[Any]] = {read}
            if p_task is not None and not p_task.done():
                waiting.add(p_task)
            try:
                while not read.done():
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if p_task is not None and p_task in waiting and p_task.done():
                        waiting.discard(p_task)
                        exc = p_task.exception()
                        if isinstance(exc, grpc.aio.AioRpcError):
                            raise _error_from_rpc(exc, route.prefill)  # type: ignore[arg-type]
                        if exc is not None:
                            raise exc
                msg = read.result()
            except grpc.aio.AioRpcError as exc:
                if p_task is not None:  # a failed transfer explains a failed decode better
                    done, _ = await asyncio.wait({p_task}, timeout=1.0)
                    if done and isinstance(p_task.exception(), grpc.aio.AioRpcError):
                        raise _error_from_rpc(p_task.exception(), route.prefill) from None  # type: ignore[arg-type]
                raise _error_from_rpc(exc, route.decode) from None
            finally:
                if not read.done():
                    read.cancel()
            if msg is grpc.aio.EOF:
                return
            yield msg

    async def _timing(self, p_task: asyncio.Task[pb.PrefillResponse] | None, t0: float, first_ns: int) -> gen.Timing:
        timing = gen.Timing(time_to_first_token_ns=first_ns, total_ns=int((time.monotonic() - t0) * 1e9))
        if p_task is not None and p_task.done() and not p_task.exception():
            p = p_task.result()
            timing.queue_ns, timing.prefill_ns, timing.kv_transfer_ns = p.queue_ns, p.prefill_ns, p.transfer.transfer_ns
        return timing

    def _abort(self, rid: str, route: Route, d_call, p_task: asyncio.Task[pb.PrefillResponse] | None) -> None:
        d_call.cancel()
        if p_task is not None and not p_task.done():
            p_task.cancel()
        for w in (route.decode, route.prefill):
            if w is not None and w.healthy:
                task = asyncio.ensure_future(w.stub.Abort(pb.AbortRequest(request_id=rid, reason="request ended"),
                                                          timeout=2.0))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def ClusterStatus(self, request: gen.ClusterStatusRequest, context: grpc.aio.ServicerContext
                            ) -> gen.ClusterStatusResponse:
        await self.registry.poll_all()
        return gen.ClusterStatusResponse(workers=[w.to_proto() for w in self.registry.workers])
