"""Both workers' process main: one engine, its KV layout, metrics, a core and its gRPC service.

    serve_worker(kind, cfg, stop, tracing)
        Engine(cfg.engine) -> KVLayout of its pool -> WorkerMetrics
        kind.build(engine, layout, metrics, tracing) -> Worker(core, service, gauges, info)
        /metrics (EngineCollector reads core.loop.stats + gauges at scrape time)
        core.start(); serve the gRPC service until `stop`; core.close()

What differs between a prefill and a decode worker is `kind.build`; everything else is said here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine.checkpoint import checkpoint_fingerprint
from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.sampling.params import SamplingParams
from engine.structured.compiler import Grammar
from kvtransfer import KVLayout, TransferCode
from server import process
from server.config import ServerOptions
from server.errors import DeadlineExceeded, Mismatch, Overloaded, TandemError, Unavailable
from server.metrics import EngineCollector, WorkerMetrics, new_registry, start_metrics_server
from server.tracing import Tracing, disabled


class WorkerCore(Protocol):
    """A worker's engine-side half: an engine loop plus its KV transport."""

    loop: EngineLoop

    def start(self) -> None: ...

    def close(self) -> None: ...

    def health_error(self) -> str: ...


@dataclass(frozen=True)
class Worker:
    core: WorkerCore
    service: Any  # the gRPC servicer; serve_component fills in its address and worker_id
    gauges: Callable[[], Mapping[str, float]]  # worker gauges exported as tandem_<name>{role}
    info: Mapping[str, str]  # extra ready-file fields (the KV address)


@dataclass(frozen=True)
class WorkerKind:
    role: str  # "prefill" | "decode"
    service_name: str  # "tandem.v1.PrefillWorker"
    add_to_server: Callable[[Any, Any], None]
    build: Callable[[Engine, KVLayout, WorkerMetrics, Tracing], Worker]


async def serve_worker(kind: WorkerKind, engine_config: EngineConfig, opts: ServerOptions, stop: asyncio.Event,
                       *, tracing: Tracing | None = None) -> int:
    """Serve until `stop` (exit code 0), or until the worker cannot serve (its engine died, its KV
    I/O thread died): then health turns NOT_SERVING, and after a short drain the process exits with
    code 1 for its supervisor to restart it. `tracing` is the process's, off when None."""
    engine = Engine(engine_config)  # a packaged name or Hugging Face id resolves to a local path here
    runner = engine.runner  # under tensor parallelism: rank 0, its followers started (engine/parallel)
    layout = KVLayout.for_pool(runner.transfer_pool, checkpoint_fingerprint(engine.config.model),
                               tp_size=engine_config.tensor_parallel_size, rank_kv_heads=runner.num_kv_heads)
    registry = new_registry(engine.model_name, kind.role)
    worker = kind.build(engine, layout, WorkerMetrics(registry, kind.role), tracing or disabled())
    loop = worker.core.loop
    if runner.tp is not None:  # fail-stop: a dead rank kills the engine loop, which fails every request
        runner.tp.when_failed(loop.kill)
    registry.register(EngineCollector(kind.role, lambda: loop.snapshot.stats, worker.gauges))
    metrics_server = start_metrics_server(opts.host, opts.metrics_port, registry)
    info = dict(worker.info)
    if metrics_server is not None:
        info["metrics_address"] = metrics_server.address
    health = process.Health()
    worker.core.start()
    watch = asyncio.create_task(_watch(worker.core, health), name="worker-health")
    try:
        return await process.serve_component(kind.role, worker.service, kind.add_to_server, kind.service_name,
                                             opts, stop, info, health=health)
    finally:
        watch.cancel()
        worker.core.close()
        runner.close()
        if metrics_server is not None:
            metrics_server.close()


async def _watch(core: WorkerCore, health: process.Health, interval_s: float = 0.1) -> None:
    """Fail-stop: the first time the core cannot serve (its engine died: every request has already
    been failed), the process stops serving and exits."""
    while not (error := core.health_error()):
        await asyncio.sleep(interval_s)
    health.die(error)


ABORT_ANSWER_S = 2.0  # Abort waits this long for the engine thread to say whether it found the request


async def abort_and_tell(abort: Callable[[Callable[[bool], None]], None], dead: bool) -> bool:
    """Run `abort(found)` (which answers `found(bool)` from the engine thread) and wait for the answer;
    False when the engine is dead or does not answer within ABORT_ANSWER_S."""
    if dead:
        return False
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bool] = loop.create_future()

    def settle(value: bool) -> None:
        if not answer.done():
            answer.set_result(value)

    def found(value: bool) -> None:
        loop.call_soon_threadsafe(settle, value)

    abort(found)
    try:
        return await asyncio.wait_for(answer, ABORT_ANSWER_S)
    except TimeoutError:
        return False


async def compile_grammar(engine: Engine, params: SamplingParams, metrics: WorkerMetrics,
                          span: Any = None) -> Grammar | None:
    """A constrained request's compiled grammar, before the request is admitted: compiled on the
    engine's compile pool (the engine thread never waits for a grammar), or found in its cache by
    content. None for an unconstrained request. Raises GrammarError (INVALID_ARGUMENT) with the
    compiler's message. Both workers call it: each compiles with its own tokenizer view."""
    spec = params.structured
    if spec is None:
        return None
    compiled = await asyncio.wrap_future(engine.grammars.submit(spec))
    metrics.grammar_compiled(spec.kind, compiled.seconds, compiled.cached)
    if span is not None:
        span.set_attributes({"tandem.structured.kind": spec.kind, "tandem.grammar.cache_hit": compiled.cached,
                             "tandem.grammar.compile_ms": compiled.seconds * 1e3})
    return compiled.grammar


def transfer_error(code: TransferCode, message: str) -> TandemError:
    """The one table from a KV transfer's outcome to the status its request ends with (prefill and
    decode workers both use it): the layouts disagree -> FAILED_PRECONDITION, no space -> RESOURCE_EXHAUSTED,
    a silent peer -> DEADLINE_EXCEEDED, anything else (an abort, a peer gone, a protocol error, a
    closing receiver) -> UNAVAILABLE."""
    kind = _TRANSFER_ERRORS.get(code, Unavailable)
    return kind(message, retry_after_s=1.0) if kind is Overloaded else kind(message)


_TRANSFER_ERRORS: dict[TransferCode, type[TandemError]] = {
    TransferCode.MISMATCH: Mismatch,
    TransferCode.NO_SPACE: Overloaded,
    TransferCode.TIMEOUT: DeadlineExceeded,
}
