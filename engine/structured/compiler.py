"""Compiling specs into grammars, off the engine thread, cached by content.

    GrammarCompiler(tokenizer)        starts building the tokenizer's llguidance view in its pool at once
      .submit(spec) -> Future[Compiled]  a cache hit is a done future; a miss compiles on the pool (a spec
                                          already compiling is waited for, not compiled twice)
      .compile(spec) -> Compiled          the same, blocking (the offline API's caller thread)

A compiled `Grammar` holds a pristine matcher (never advanced) that has computed its first mask once,
so llguidance's lazily built lexer states are warm; each request gets `Grammar.new_matcher()`, a deep
copy (~10 us; a fresh matcher would cost milliseconds). The cache is an LRU of `cache_size` grammars
keyed by `StructuredOutput.key`; failures are cached too (the same spec fails the same way).

Vocabularies: the llguidance tokenizer has the tokenizer's `vocab_size` tokens; a model with more
logit rows (Qwen pads 151,665 tokens to 151,936) never samples the extra ids under a grammar, since
`engine.structured.masks` leaves their mask bits 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance as llg
import numpy as np

from engine.structured.grammar import GrammarError, grammar_text, refusal
from engine.structured.spec import StructuredOutput
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def llg_tokenizer(tokenizer: Tokenizer) -> llg.LLTokenizer:
    """The tokenizer's llguidance view: the same tokens, its EOS ids (allowed once a grammar accepts)."""
    return llg.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                           eos_token=sorted(tokenizer.eos_token_ids) or None)


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled spec: copy its pristine matcher for each sequence."""

    kind: str
    key: str
    pristine: llg.LLMatcher
    compile_seconds: float

    def new_matcher(self) -> llg.LLMatcher:
        return self.pristine.deep_copy()


@dataclass(frozen=True)
class Compiled:
    """What one request's compile returned: the grammar, how long the request waited for it, and
    whether it came from the cache."""

    grammar: Grammar
    seconds: float
    cached: bool


@dataclass
class CompilerStats:
    compiles: int = 0
    hits: int = 0
    failures: int = 0
    compile_seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)


class GrammarCompiler:
    """Thread-safe. `threads` compile in parallel (llguidance drops the GIL while it builds)."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256, threads: int = 2) -> None:
        if cache_size < 1 or threads < 1:
            raise ValueError(f"cache_size and threads must be >= 1, got {cache_size} and {threads}")
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar-compile")
        self._lltok: Future[llg.LLTokenizer] = self._pool.submit(llg_tokenizer, tokenizer)
        self._cache: OrderedDict[str, Future[Grammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CompilerStats()
        self._specials: dict[str, int] | None = None

    @property
    def llg_tokenizer(self) -> llg.LLTokenizer:
        return self._lltok.result()

    @property
    def specials(self) -> dict[str, int]:
        """The special tokens (text -> id) that structural tags match as single tokens."""
        if self._specials is None:
            lt = self.llg_tokenizer
            found = {}
            for i in sorted(self.tokenizer.all_special_ids):
                text = self.tokenizer.id_to_token(i)
                if text and i < lt.vocab_size and lt.is_special_token(i):
                    found[text] = i
            self._specials = found
        return self._specials

    def submit(self, spec: StructuredOutput) -> Future[Compiled]:
        """The compiled grammar of `spec`, now (a cache hit) or once the pool has built it. The future
        fails with GrammarError when the spec does not compile with this tokenizer."""
        t0 = time.perf_counter()
        key = spec.key
        with self._lock:
            fut = self._cache.get(key)
            hit = fut is not None
            if fut is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
            else:
                fut = self._pool.submit(self._build, spec, key)
                self._cache[key] = fut
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self.stats.by_kind[spec.kind] = self.stats.by_kind.get(spec.kind, 0) + 1
        out: Future[Compiled] = Future()

        def settle(done: Future[Grammar]) -> None:
            exc = done.exception()
            if exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(Compiled(done.result(), time.perf_counter() - t0, hit))

        fut.add_done_callback(settle)
        return out

    def compile(self, spec: StructuredOutput) -> Compiled:
        """`submit(spec).result()`: blocks; raises GrammarError."""
        return self.submit(spec).result()

    def _build(self, spec: StructuredOutput, key: str) -> Grammar:
        t0 = time.perf_counter()
        lltok = self._lltok.result()
        try:
            text = grammar_text(spec, self.specials)
            matcher = llg.LLMatcher(lltok, text, log_level=0)
            if matcher.is_error():
                raise GrammarError(refusal(spec.kind, matcher.get_error()))
            # one mask warms the lexer states every copy shares (the first mask costs ~10x the next)
            scratch = np.empty((lltok.vocab_size + 31) // 32, dtype=np.int32)
            matcher.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
        except GrammarError:
            with self._lock:
                self.stats.failures += 1
            raise
        seconds = time.perf_counter() - t0
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
        logger.debug("compiled a %s grammar in %.1f ms", spec.kind, seconds * 1e3)
        return Grammar(spec.kind, key, matcher, seconds)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
