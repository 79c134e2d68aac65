"""The gateway's check of a structured output spec, before the request is admitted.

llguidance is torch-free and imports in ~80 ms, so the gateway compiles every spec (without the
tokenizer: what the grammar says, not which tokens spell it) with the code the workers use
(engine.structured.grammar.check): a schema keyword the engine cannot enforce, or a grammar that does not
compile, is INVALID_ARGUMENT here (HTTP 400) with the compiler's message, before any worker sees the
request. Checks run off the event loop and are remembered by content (LRU), so a client repeating a
spec pays once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from engine.structured.grammar import GrammarError, check
from engine.structured.spec import StructuredOutput
from server.errors import InvalidRequest
from server.metrics import GatewayMetrics

CACHE_SIZE = 1024


class GrammarChecker:
    """asyncio thread only (the checks themselves run in the default executor)."""

    def __init__(self, metrics: GatewayMetrics | None = None, cache_size: int = CACHE_SIZE) -> None:
        self.metrics = metrics
        self.cache_size = cache_size
        self._seen: OrderedDict[str, str] = OrderedDict()  # spec key -> "" (ok) or the refusal

    async def check(self, spec: StructuredOutput) -> None:
        """Raises InvalidRequest with the reason when `spec` cannot be enforced."""
        key = spec.key
        t0 = time.perf_counter()
        error = self._seen.get(key)
        cached = error is not None
        if error is None:
            error = await asyncio.to_thread(_error_of, spec)
            self._seen[key] = error
            while len(self._seen) > self.cache_size:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(key)
        if self.metrics is not None:
            self.metrics.constrained.labels(spec.kind).inc()
            self.metrics.grammar_check.labels("hit" if cached else "miss").observe(time.perf_counter() - t0)
        if error:
            raise InvalidRequest(error)


def _error_of(spec: StructuredOutput) -> str:
    try:
        check(spec)
    except GrammarError as exc:
        return str(exc)
    return ""
