"""The router on a real registry whose workers' statuses are set by hand (never polled): a plan changes
nothing, a commit changes exactly the counters and the LRU, and both stay cheap for any prompt length."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import pytest

from engine.checkpoint import load_hf_config
from engine.config import ModelConfig
from engine.prefix_hash import hash_prefix
from engine.tokenizer import Tokenizer
from gateway.config import GatewayLimits
from gateway.registry import WorkerRegistry
from gateway.router import PREFIX_LRU_BLOCKS, ROUTE_PREFIX_TOKENS, Router
from gateway.service import GenerationService
from server.errors import InvalidRequest
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import kv_pb2
from tandem.v1 import worker_pb2 as pb

BLOCK = 8


def _with_router(check: Callable[[Router, WorkerRegistry], object]) -> None:
    """Runs `check` (a function or a coroutine function) on a registry of 2 prefill and 1 decode workers."""
    async def scenario() -> None:
        registry = WorkerRegistry(["127.0.0.1:9", "127.0.0.1:10"], ["127.0.0.1:11"], interval_s=60)
        for i, w in enumerate(registry.workers):
            w.status = pb.StatusResponse(worker_id=f"w{i}", kv_blocks_free=100, max_model_len=128,
                                         kv_layout=kv_pb2.KVLayout(block_size=BLOCK))
            w.healthy = True
        try:
            result = check(Router(registry, local_prefill_threshold=0), registry)
            if inspect.isawaitable(result):
                await result
        finally:
            await registry.close()

    asyncio.run(scenario())


def test_plan_changes_nothing_and_commit_counts_once() -> None:
    def check(router: Router, registry: WorkerRegistry) -> None:
        prompt = list(range(100, 164))
        route = router.plan(prompt)
        assert route.prefill is not None and [w.assigned for w in registry.workers] == [0, 0, 0]
        assert all(not w.prefix_lru for w in registry.workers)
        router.commit(route)
        assert route.decode.assigned == 1 and route.prefill.assigned == 1
        assert list(route.prefill.prefix_lru) == hash_prefix(prompt, BLOCK, len(prompt) - 1)
        again = router.plan(prompt)  # the same prefix now goes where its blocks are
        assert again.prefill is route.prefill and again.matched_tokens == 56

    _with_router(check)


def test_routing_a_huge_prompt_hashes_a_bounded_prefix() -> None:
    def check(router: Router, registry: WorkerRegistry) -> None:
        prompt = list(range(4 << 20))  # 4M token ids: the router never sees one this long, but if it did
        t0 = time.perf_counter()
        route = router.plan(prompt)
        router.commit(route)
        elapsed = time.perf_counter() - t0
        assert len(route.block_hashes) == ROUTE_PREFIX_TOKENS // BLOCK
        assert elapsed < 0.25, f"routing took {elapsed * 1000:.0f} ms"  # ~5 ms here; was 43 s

    _with_router(check)


def test_the_lru_stays_bounded_in_linear_time() -> None:
    def check(router: Router, registry: WorkerRegistry) -> None:
        per_prompt = ROUTE_PREFIX_TOKENS // BLOCK
        prompts = (PREFIX_LRU_BLOCKS // per_prompt) * 3  # three times round the LRU
        t0 = time.perf_counter()
        first = None
        for i in range(prompts):
            route = router.plan([i] + [7] * ROUTE_PREFIX_TOKENS)  # distinct from the first block on
            router.commit(route)
            first = first or route
        elapsed = time.perf_counter() - t0
        assert first is not None and first.prefill is not None
        assert all(len(w.prefix_lru) <= PREFIX_LRU_BLOCKS for w in registry.workers)
        assert first.block_hashes[0] not in first.prefill.prefix_lru  # the oldest went first
        assert elapsed / prompts < 0.05, f"{elapsed / prompts * 1000:.1f} ms a request"

    _with_router(check)


def test_a_request_refused_after_planning_leaves_no_routing_state(tiny_model) -> None:
    """prompt + max_tokens past the decode worker's context: refused after the plan, before the commit."""
    model = tiny_model("llama", max_position_embeddings=1024)
    cfg = ModelConfig.from_hf(load_hf_config(model))

    async def check(router: Router, registry: WorkerRegistry) -> None:
        service = GenerationService(registry, router, Tokenizer.from_dir(model), cfg, "tiny", GatewayLimits())
        request = gen.GenerateRequest(prompt_token_ids=list(range(100, 200)), sampling=gen.SamplingParams(max_tokens=100))
        with pytest.raises(InvalidRequest, match="exceeds the model's context of 128 tokens"):
            async for _ in service.generate(request):
                raise AssertionError("the request was served")
        assert [w.assigned for w in registry.workers] == [0, 0, 0] and service.inflight == 0
        assert all(not w.prefix_lru for w in registry.workers)

    _with_router(check)
