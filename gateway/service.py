"""The public Generation service: validate, tokenize, route, then relay the decode worker's stream.

    Generate(req) -> admission (max_inflight) -> validate + tokenize (a chat request: checked, its
        tool-call constraint added, rendered through the chat template) -> one or two attempts:
        Router.plan -> length check -> Router.commit (a refused request changes no routing state)
        -> Decode stream opened on D (it registers the request)  +  Prefill(P, kv -> D) in parallel
              (local prefill: Decode with local_prefill, no P)
        relay D's messages to the client, each tagged with its choice's index (n > 1: one prefill,
        one KV transfer, n choices forked on D); the last one carries usage and timing; prompt
        logprobs (P's answer, or D's first message on a local prefill) go in choice 0's first message
    a worker that fails or is lost (registry) before the first token: one more attempt, elsewhere
    on client cancel / deadline / any failure: cancel both calls and Abort on both workers
    a chat request's messages are read back on their way out (gateway/chat_output.py): reasoning and
    tool calls split out of the text, per choice

Identity is the server's: every request gets an id minted here, the key on every worker; a client's
`request_id` (or HTTP X-Request-Id) is only a label echoed back, so no client can reach another's
request by naming it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine.config import ModelConfig
from engine.sampling.params import SamplingParams
from engine.tokenizer import Tokenizer
from gateway.chat_output import ChatOutput, OutputFormat
from gateway.chat_request import ChatFormats, PreparedChat
from gateway.config import GatewayLimits
from gateway.observe import GatewayObserver, RequestObservation
from gateway.registry import WorkerHandle, WorkerRegistry
from gateway.router import Route, Router
from gateway.structured import GrammarChecker
from gateway.tokenization import Texts
from gateway.tool_constraint import apply_constraint
from gateway.validation import PromptLimits, check_length, check_prompt_ids, check_request, encode_prompt
from server.errors import Overloaded, TandemError, Unavailable
from server.grpc_server import answered
from server.process import Health
from server.protoconv import sampling_from_proto, sampling_to_proto
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tandem.v1 import worker_pb2 as pb

logger = logging.getLogger(__name__)

# How long a finished stream's last message waits for the prefill worker's answer (its timings; the KV it
# answers for has already arrived, so the answer is in flight)
_PREFILL_ANSWER_WAIT_S = 1.0


class WorkerFailure(Exception):
    """A worker failed or was lost under a request: retried once elsewhere before the first token."""

    def __init__(self, worker: WorkerHandle, error: TandemError) -> None:
        super().__init__(error.message)
        self.worker, self.error = worker, error


@dataclass(eq=False)
class _Attempt:
    """One try at serving a request on one route; `lost` resolves when one of its workers is lost."""

    rid: str  # the workers' key
    route: Route
    lost: asyncio.Future[WorkerHandle] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    prefill: asyncio.Task[pb.PrefillResponse] | None = None  # the Prefill call, while there is one

    def depends_on(self, w: WorkerHandle) -> bool:
        """The decode worker always; the prefill worker until its call has succeeded."""
        if w is self.route.decode:
            return True
        return w is self.route.prefill and not (self.prefill is not None and self.prefill.done()
                                                and not self.prefill.cancelled() and self.prefill.exception() is None)


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
                 model_names: Sequence[str], limits: GatewayLimits, observer: GatewayObserver | None = None,
                 health: Health | None = None, chat_formats: ChatFormats | None = None) -> None:
        """`model_names`: every name the model is served under (`model` may be any); the first is
        the one responses carry. `chat_formats`: the chat template's tool-call format and thinking
        (default: read from the template)."""
        if not model_names:
            raise ValueError("the gateway needs at least one model name")
        self.registry = registry
        self.observer = observer or GatewayObserver()
        self.router = router
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.token_id_limit = tokenizer.token_id_limit(model_config.vocab_size)
        self.model_names = tuple(model_names)
        self.texts = Texts(tokenizer, self.model_names, PromptLimits(model_config.max_position_embeddings),
                           self.token_id_limit, chat_formats)
        self.limits = limits
        self.grammars = GrammarChecker(self.observer.metrics)
        self.health = health or Health(serving=False)
        self.inflight = 0
        self._attempts: set[_Attempt] = set()
        self._background: set[asyncio.Task[object]] = set()
        registry.on_change(self._worker_changed)
        self._worker_changed(None)

    # ------------------------------------------------------------ workers coming and going
    def _worker_changed(self, worker: WorkerHandle | None) -> None:
        """A worker turned healthy or unhealthy: requests on a lost one move on; health follows."""
        if worker is not None and not worker.healthy:
            for a in list(self._attempts):
                if a.depends_on(worker) and not a.lost.done():
                    a.lost.set_result(worker)
        decodes = self.registry.by_role(gen.WORKER_ROLE_DECODE)
        reason = "" if decodes else "no healthy decode worker; see ClusterStatus for the workers' errors"
        if bool(decodes) != self.health.serving or worker is None:
            self._spawn(self.health.set(bool(decodes), reason))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _worker_error(self, exc: grpc.aio.AioRpcError, worker: WorkerHandle) -> TandemError | WorkerFailure:
        """A failed worker call as the client should see it. UNAVAILABLE (the worker is dying, or
        the call broke because the worker is gone) is a WorkerFailure: retried elsewhere if nothing
        was sent yet."""
        code = exc.code()
        if not answered(exc):  # the transport broke: the worker process is gone or unreachable
            self.registry.lost(worker, f"{code.name}: {exc.details()}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) \
                or not answered(exc):
            return WorkerFailure(worker, Unavailable(f"{worker.name} failed: {exc.details()}", retry_after_s=1.0))
        err = TandemError(exc.details() or code.name, retry_after_s=_retry_after_s(exc))
        err.code = code
        return err

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    # ------------------------------------------------------------ validation
    async def _prompt_ids(self, req: gen.GenerateRequest, chat: PreparedChat | None) -> list[int]:
        limits = PromptLimits(self.model_config.max_position_embeddings)  # sizes first: gateway/validation.py
        prompt = check_request(req, self.model_names, limits)
        if chat is not None:
            ids = await asyncio.to_thread(self.texts.render, chat)
        elif prompt:
            ids = await asyncio.to_thread(encode_prompt, self.tokenizer, prompt, limits)
        else:
            ids = req.prompt_token_ids
        return check_prompt_ids(ids, self.token_id_limit)

    def _chat(self, req: gen.GenerateRequest) -> tuple[PreparedChat | None, gen.SamplingParams]:
        """A chat request checked, and its sampling with the tool-call constraint (if any) added."""
        if not req.messages:
            return None, req.sampling
        chat = self.texts.prepare(req.messages, req.chat)
        sampling = apply_constraint(chat.constraint, req.sampling) if chat.constraint is not None else req.sampling
        return chat, sampling

    def _check_length(self, ids: list[int], max_tokens: int, route: Route) -> None:
        limit = route.decode.status.max_model_len if route.decode.status else self.model_config.max_position_embeddings
        check_length(len(ids), max_tokens, limit)

    # --------------------------------------------------------------- Generate
    async def Generate(self, request: gen.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[gen.GenerateResponse]:
        async with aclosing(self.generate(request, context.invocation_metadata())) as stream:
            async with aclosing(bounded_by_reader(stream, self.limits.client_read_timeout_s)) as relayed:
                async for out in relayed:
                    yield out

    async def generate(self, request: gen.GenerateRequest, metadata: Sequence[tuple[str, Any]] | None = None
                       ) -> AsyncGenerator[gen.GenerateResponse, None]:
        """One request's whole path: what gRPC's Generate and the HTTP API (gateway/http_api.py) both run.

        `metadata`: the caller's (key, value) pairs; a `traceparent` there parents the request's trace.
        A refused request (validation, limits, no worker) raises TandemError / ValueError before the
        first message; closing the generator early aborts the request on every worker. Every message
        carries the client's `request_id` label (or, without one, the id minted here).
        """
        rid = secrets.token_hex(12)
        label = request.request_id or rid
        obs = self.observer.start(label, self.model_name, metadata)
        try:
            async with aclosing(self._generate(request, rid, label, obs)) as stream:
                async for out in stream:
                    yield out
        except BaseException as exc:
            obs.end(exc)
            raise
        obs.end(None)

    async def _generate(self, request: gen.GenerateRequest, rid: str, label: str, obs: RequestObservation
                        ) -> AsyncGenerator[gen.GenerateResponse, None]:
        t0 = time.monotonic()
        if self.inflight >= self.limits.max_inflight:
            raise Overloaded(f"the gateway is serving {self.inflight} requests (limit {self.limits.max_inflight}); "
                             f"retry after about 1 s", retry_after_s=1.0)
        self.inflight += 1  # the slot is held from admission (tokenizing counts) to the end of the call
        try:
            chat, sampling = self._chat(request)
            params = sampling_from_proto(sampling, default_max_tokens=self.limits.default_max_tokens)
            params.check_vocab(self.model_config.vocab_size)
            obs.request(params)
            if params.structured is not None:  # refused here, before admission, when it cannot be enforced
                await self.grammars.check(params.structured)
            with obs.span("gateway.tokenize") as span:
                ids = await self._prompt_ids(request, chat)
                obs.tokenized(span, ids, bool(request.prompt) or chat is not None)
            output = ChatOutput(chat.output if chat is not None else OutputFormat())
            excluded: set[WorkerHandle] = set()
            for attempt in range(2):
                with obs.span("gateway.route") as span:
                    route = self.router.plan(ids, exclude=excluded)
                    obs.routed(span, route)
                self._check_length(ids, params.max_tokens, route)
                self.router.commit(route)  # admitted: only now does routing state change
                sent = False
                try:
                    async with aclosing(self._attempt(f"{rid}-{attempt}" if attempt else rid, label, route, ids,
                                                      params, request.priority, obs, t0)) as stream:
                        async for out in stream:
                            sent = True
                            yield output.read(out)
                    return
                except WorkerFailure as failure:
                    if sent or attempt:
                        raise failure.error from None
                    excluded.add(failure.worker)
                    logger.warning("request %s (%s): %s; trying once more elsewhere", label, rid, failure.error.message)
        finally:
            self.inflight -= 1

    async def _attempt(self, rid: str, label: str, route: Route, ids: list[int], params: SamplingParams,
                       priority: int, obs: RequestObservation, t0: float
                       ) -> AsyncGenerator[gen.GenerateResponse, None]:
        attempt = _Attempt(rid, route)
        self._attempts.add(attempt)
        timeout = self.limits.request_timeout_s
        d_span, d_md, d_traceparent = obs.client_call("tandem.v1.DecodeWorker/Decode", route.decode.worker_id,
                                                      route.decode.address)
        finished = False
        p_task: asyncio.Task[pb.PrefillResponse] | None = None
        d_call = route.decode.stub.Decode(pb.DecodeRequest(
            request_id=rid, prompt_token_ids=ids, sampling=sampling_to_proto(params), traceparent=d_traceparent,
            local_prefill=route.prefill is None, priority=priority,
        ), timeout=timeout, metadata=d_md)
        try:
            if route.prefill is not None:
                p_span, p_md, p_traceparent = obs.client_call("tandem.v1.PrefillWorker/Prefill",
                                                              route.prefill.worker_id, route.prefill.address)
                p_task = asyncio.ensure_future(route.prefill.stub.Prefill(pb.PrefillRequest(
                    request_id=rid, prompt_token_ids=ids, sampling=sampling_to_proto(params),
                    decode_kv_address=route.decode.status.kv_address if route.decode.status else "",
                    traceparent=p_traceparent, timeout_ms=int(timeout * 1000), priority=priority,
                ), timeout=timeout, metadata=p_md))
                attempt.prefill = p_task
                obs.watch_call(p_span, p_task)
            completion = 0
            first_ns = 0
            unfinished = params.n  # choices still running
            prompt_logprobs = params.prompt_logprobs is not None  # still to send, with choice 0's first message
            async for resp in self._relay(d_call, p_task, attempt):
                completion += len(resp.token_ids)
                obs.relayed(len(resp.token_ids), resp.text)
                out = gen.GenerateResponse(request_id=label, token_ids=resp.token_ids, text=resp.text,
                                           logprobs=resp.logprobs, finish_reason=resp.finish_reason,
                                           finish_message=resp.finish_message, index=resp.index)
                if prompt_logprobs and resp.index == 0:
                    prompt_logprobs = False
                    out.prompt_token_ids.extend(ids)
                    out.prompt_logprobs.extend(resp.prompt_logprobs if p_task is None else
                                               (await self._prefilled(p_task, attempt)).prompt_logprobs)
                if not first_ns and resp.token_ids:
                    first_ns = int((time.monotonic() - t0) * 1e9)
                if resp.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
                    unfinished -= 1
                if not unfinished and not finished:
                    finished = True
                    out.usage.CopyFrom(gen.Usage(prompt_tokens=len(ids), completion_tokens=completion,
                                                 cached_tokens=resp.num_cached_tokens))
                    out.timing.CopyFrom(await self._timing(p_task, t0, first_ns))
                    obs.finished(resp.finish_reason, out.usage, resp.finish_message)
                yield out
            if not finished:
                raise WorkerFailure(route.decode, Unavailable(f"{route.decode.name} ended the stream without "
                                                              f"finishing"))
            obs.call_done(d_span, None)
        finally:
            self._attempts.discard(attempt)
            if not finished:
                self._abort(rid, route, d_call, p_task)

    async def _relay(self, d_call: Any, p_task: asyncio.Task[pb.PrefillResponse] | None, attempt: _Attempt
                     ) -> AsyncIterator[pb.DecodeResponse]:
        """Yield D's messages; fail fast with the prefill's error if it fails first, and with a
        WorkerFailure as soon as the registry loses either worker."""
        route = attempt.route
        while True:
            read = asyncio.ensure_future(d_call.read())
            waiting: set[asyncio.Future[Any]] = {read, attempt.lost}
            if p_task is not None and not p_task.done():
                waiting.add(p_task)
            try:
                while not read.done():
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if attempt.lost.done():
                        w = attempt.lost.result()
                        raise WorkerFailure(w, Unavailable(f"{w.name} stopped answering ({w.error})",
                                                           retry_after_s=1.0))
                    if p_task is not None and p_task in waiting and p_task.done():
                        waiting.discard(p_task)
                        exc = p_task.exception()
                        if isinstance(exc, grpc.aio.AioRpcError):
                            raise self._worker_error(exc, route.prefill)  # type: ignore[arg-type]
                        if exc is not None:
                            raise exc
                msg = read.result()
            except grpc.aio.AioRpcError as exc:
                if p_task is not None:  # a failed transfer explains a failed decode better
                    done, _ = await asyncio.wait({p_task}, timeout=1.0)
                    if done and isinstance(p_task.exception(), grpc.aio.AioRpcError):
                        raise self._worker_error(p_task.exception(), route.prefill) from None  # type: ignore[arg-type]
                raise self._worker_error(exc, route.decode) from None
            finally:
                if not read.done():
                    read.cancel()
            if msg is grpc.aio.EOF:
                return
            yield msg

    async def _prefilled(self, p_task: asyncio.Task[pb.PrefillResponse], attempt: _Attempt) -> pb.PrefillResponse:
        """The prefill worker's answer, with the prompt logprobs (its KV has arrived, so the answer is on
        its way); a WorkerFailure if the registry loses a worker meanwhile."""
        waiting: set[asyncio.Future[Any]] = {p_task, attempt.lost}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not p_task.done():
            w = attempt.lost.result()
            raise WorkerFailure(w, Unavailable(f"{w.name} stopped answering ({w.error})", retry_after_s=1.0))
        exc = p_task.exception()
        if isinstance(exc, grpc.aio.AioRpcError):
            raise self._worker_error(exc, attempt.route.prefill)  # type: ignore[arg-type]
        if exc is not None:
            raise exc
        return p_task.result()

    async def _timing(self, p_task: asyncio.Task[pb.PrefillResponse] | None, t0: float, first_ns: int) -> gen.Timing:
        """The final message's timing. The prefill worker's answer (its queue, prefill and transfer times)
        is on its way once its KV has arrived, but a short generation can finish before it lands: wait
        for it a little (never past _PREFILL_ANSWER_WAIT_S), else leave those times out."""
        timing = gen.Timing(time_to_first_token_ns=first_ns, total_ns=int((time.monotonic() - t0) * 1e9))
        if p_task is not None and not p_task.done():
            await asyncio.wait({p_task}, timeout=_PREFILL_ANSWER_WAIT_S)
        if p_task is not None and p_task.done() and not p_task.cancelled() and not p_task.exception():
            p = p_task.result()
            timing.queue_ns, timing.prefill_ns, timing.kv_transfer_ns = p.queue_ns, p.prefill_ns, p.transfer.transfer_ns
        return timing

    def _abort(self, rid: str, route: Route, d_call: Any, p_task: asyncio.Task[pb.PrefillResponse] | None) -> None:
        d_call.cancel()
        if p_task is not None and not p_task.done():
            p_task.cancel()
        for w in (route.decode, route.prefill):
            if w is not None and w.healthy:
                self._spawn(w.stub.Abort(pb.AbortRequest(request_id=rid, reason="request ended"), timeout=2.0))

    async def ClusterStatus(self, request: gen.ClusterStatusRequest, context: grpc.aio.ServicerContext
                            ) -> gen.ClusterStatusResponse:
        await self.registry.poll_all()
        return gen.ClusterStatusResponse(workers=[w.to_proto() for w in self.registry.workers])

    async def Models(self, request: gen.ModelsRequest, context: grpc.aio.ServicerContext) -> gen.ModelsResponse:
        return gen.ModelsResponse(names=self.model_names, max_model_len=self.model_config.max_position_embeddings)

    async def Tokenize(self, request: gen.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> gen.TokenizeResponse:
        return await self.texts.tokenize(request)

    async def Detokenize(self, request: gen.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> gen.DetokenizeResponse:
        return await self.texts.detokenize(request)


class ClientTooSlow(Unavailable):
    """The client did not read its stream for too long; the request was aborted."""


async def bounded_by_reader(stream: AsyncGenerator[Any, None], read_timeout_s: float, depth: int = 64
                            ) -> AsyncGenerator[Any, None]:
    """Relay `stream` through a queue of `depth` messages, produced by its own task: a client that
    stops reading for `read_timeout_s` while the queue is full gets the request aborted (`stream`
    closed: its slot and every worker's blocks freed at once), then ClientTooSlow if it ever reads on."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)
    end = object()

    async def produce() -> None:
        try:
            async for item in stream:
                await asyncio.wait_for(queue.put(item), read_timeout_s)
        except TimeoutError:
            await stream.aclose()
            logger.warning("a client read nothing for %.0f s with %d messages queued; request aborted",
                           read_timeout_s, depth)
            _put_last(queue, ClientTooSlow(f"the client did not read its stream for {read_timeout_s:.0f} s; "
                                           f"the request was aborted"))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            _put_last(queue, exc)
            return
        await queue.put(end)

    task = asyncio.ensure_future(produce())
    try:
        while True:
            item = await queue.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()


def _put_last(queue: asyncio.Queue[Any], item: Any) -> None:
    """Put a failed stream's last item even into a full queue (the undelivered messages are dropped)."""
    while queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
