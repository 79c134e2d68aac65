"""Which prefill worker and which decode worker serve a request, and why.

Prefill: prefix-affine, then load-aware. The gateway remembers the block hashes of the prompts it
sent to each prefill worker (a bounded LRU, a stand-in for that worker's prefix cache); the worker
holding the longest prefix wins, ties go to the fewest outstanding prefill tokens.
Decode: the most free KV blocks, less what was routed there since its last status.
Conditional disaggregation: when the uncached part of the prompt is shorter than
`local_prefill_threshold` tokens, the decode worker prefills it itself and no KV moves.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from engine.prefix_hash import hash_prefix
from gateway.registry import WorkerHandle, WorkerRegistry
from server.errors import Unavailable
from tandem.v1 import generation_pb2 as gen

PREFIX_LRU_BLOCKS = 65536  # per prefill worker


@dataclass(frozen=True)
class Route:
    prefill: WorkerHandle | None  # None: the decode worker prefills locally
    decode: WorkerHandle
    matched_tokens: int  # prompt tokens expected to hit the prefill worker's prefix cache
    reason: str


class Router:
    def __init__(self, registry: WorkerRegistry, local_prefill_threshold: int) -> None:
        self.registry = registry
        self.local_prefill_threshold = local_prefill_threshold

    def route(self, prompt: list[int], exclude: Collection[WorkerHandle] = ()) -> Route:
        """The route for `prompt`, avoiding the workers in `exclude` (they just failed this request)."""
        decodes = [w for w in self.registry.by_role(gen.WORKER_ROLE_DECODE) if w not in exclude]
        if not decodes:
            raise Unavailable("no healthy decode worker; check `ClusterStatus` for the workers' errors",
                              retry_after_s=1.0)
        decode = max(decodes, key=self._decode_score)
        decode.assigned += 1
        prefills = [w for w in self.registry.by_role(gen.WORKER_ROLE_PREFILL) if w not in exclude]
        best: WorkerHandle | None = None
        best_key = (-1, 0.0)
        hashes: list[int] = []
        for w in prefills:
            bs = w.status.kv_layout.block_size if w.status else 16
            hashes = hash_prefix(prompt, bs, len(prompt) - 1)
            matched = 0
            for h in hashes:
                if h not in w.prefix_lru:
                    break
                matched += 1
            load = (w.status.outstanding_prefill_tokens if w.status else 0) + w.assigned * len(prompt)
            key = (matched * bs, -float(load))
            if key > best_key:
                best, best_key = w, key
        matched_tokens = max(best_key[0], 0)
        uncached = len(prompt) - matched_tokens
        if best is None or uncached < self.local_prefill_threshold:
            why = "no healthy prefill worker" if best is None else (
                f"{uncached} uncached tokens < local_prefill_threshold {self.local_prefill_threshold}")
            return Route(None, decode, 0, f"local prefill on {decode.worker_id}: {why}")
        best.assigned += 1
        for h in hashes:
            best.prefix_lru.pop(h, None)
            best.prefix_lru[h] = None
        while len(best.prefix_lru) > PREFIX_LRU_BLOCKS:
            best.prefix_lru.pop(next(iter(best.prefix_lru)))
        return Route(best, decode, matched_tokens,
                     f"prefill on {best.worker_id} (prefix hit {matched_tokens} tokens, load {-best_key[1]:.0f}), "
                     f"decode on {decode.worker_id}")

    @staticmethod
    def _decode_score(w: WorkerHandle) -> float:
        s = w.status
        free = s.kv_blocks_free if s else 0
        return free - 8 * w.assigned - (s.waiting if s else 0)
