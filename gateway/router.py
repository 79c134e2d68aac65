"""Which prefill worker and which decode worker serve a request, and why.

Prefill: prefix-affine, then load-aware. The gateway remembers the block hashes of the prompts it
sent to each prefill worker (a bounded LRU, a stand-in for that worker's prefix cache); the worker
holding the longest prefix wins, ties go to the fewest outstanding prefill tokens.
Decode: the most free KV blocks, less what was routed there since its last status.
Conditional disaggregation: when the uncached part of the prompt is shorter than
`local_prefill_threshold` tokens, the decode worker prefills it itself and no KV moves.

Two steps, so a refused request leaves no trace:

    plan(prompt)  -> Route      reads the registry, changes nothing (the service checks the length next)
    commit(route)               the request is admitted: count it on its workers, remember its blocks

Both run on the event loop and are bounded: only the first ROUTE_PREFIX_TOKENS tokens are hashed
(once per block size), and the LRU is trimmed in one pass.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from itertools import islice

from engine.prefix_hash import hash_prefix
from gateway.registry import WorkerHandle, WorkerRegistry
from server.errors import Unavailable
from tandem.v1 import generation_pb2 as gen

PREFIX_LRU_BLOCKS = 65536  # per prefill worker
# Prefix affinity looks this far into a prompt, no further: shared system prompts and few-shot
# examples sit at the front, and hashing is linear in the tokens hashed (~2-6 us a block).
ROUTE_PREFIX_TOKENS = 4096


@dataclass(frozen=True)
class Route:
    prefill: WorkerHandle | None  # None: the decode worker prefills locally
    decode: WorkerHandle
    matched_tokens: int  # prompt tokens expected to hit the prefill worker's prefix cache
    reason: str
    block_hashes: tuple[int, ...] = ()  # the prompt's leading blocks, remembered for `prefill` on commit


class Router:
    def __init__(self, registry: WorkerRegistry, local_prefill_threshold: int) -> None:
        self.registry = registry
        self.local_prefill_threshold = local_prefill_threshold

    def route(self, prompt: list[int], exclude: Collection[WorkerHandle] = ()) -> Route:
        """plan + commit, for a request already known to fit."""
        route = self.plan(prompt, exclude)
        self.commit(route)
        return route

    def plan(self, prompt: list[int], exclude: Collection[WorkerHandle] = ()) -> Route:
        """The workers for `prompt`, avoiding those in `exclude` (they just failed this request);
        changes no state. Raises Unavailable when no decode worker is healthy."""
        decodes = [w for w in self.registry.by_role(gen.WORKER_ROLE_DECODE) if w not in exclude]
        if not decodes:
            raise Unavailable("no healthy decode worker; check `ClusterStatus` for the workers' errors",
                              retry_after_s=1.0)
        decode = max(decodes, key=self._decode_score)
        best: WorkerHandle | None = None
        best_key = (-1, 0.0)
        best_hashes: list[int] = []
        by_block_size: dict[int, list[int]] = {}
        for w in self.registry.by_role(gen.WORKER_ROLE_PREFILL):
            if w in exclude:
                continue
            bs = w.status.kv_layout.block_size if w.status else 16
            if bs not in by_block_size:
                by_block_size[bs] = hash_prefix(prompt, bs, min(len(prompt) - 1, ROUTE_PREFIX_TOKENS))
            hashes = by_block_size[bs]
            matched = 0
            for h in hashes:
                if h not in w.prefix_lru:
                    break
                matched += 1
            load = (w.status.outstanding_prefill_tokens if w.status else 0) + w.assigned * len(prompt)
            key = (matched * bs, -float(load))
            if key > best_key:
                best, best_key, best_hashes = w, key, hashes
        matched_tokens = max(best_key[0], 0)
        uncached = len(prompt) - matched_tokens
        if best is None or uncached < self.local_prefill_threshold:
            why = "no healthy prefill worker" if best is None else (
                f"{uncached} uncached tokens < local_prefill_threshold {self.local_prefill_threshold}")
            return Route(None, decode, 0, f"local prefill on {decode.worker_id}: {why}")
        return Route(best, decode, matched_tokens,
                     f"prefill on {best.worker_id} (prefix hit {matched_tokens} tokens, load {-best_key[1]:.0f}), "
                     f"decode on {decode.worker_id}", tuple(best_hashes))

    def commit(self, route: Route) -> None:
        """The planned request is admitted: its workers' `assigned` counts grow (until their next
        status) and the prefill worker's LRU learns its blocks, dropping the oldest past PREFIX_LRU_BLOCKS."""
        route.decode.assigned += 1
        if route.prefill is None:
            return
        route.prefill.assigned += 1
        lru = route.prefill.prefix_lru
        for h in route.block_hashes:
            lru.pop(h, None)
            lru[h] = None
        excess = len(lru) - PREFIX_LRU_BLOCKS
        if excess > 0:  # one pass: popping the front one at a time rescans the deleted slots (quadratic)
            for h in list(islice(lru, excess)):
                del lru[h]

    @staticmethod
    def _decode_score(w: WorkerHandle) -> float:
        s = w.status
        free = s.kv_blocks_free if s else 0
        return free - 8 * w.assigned - (s.waiting if s else 0)
