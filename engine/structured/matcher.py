"""One sequence's grammar state: an llguidance matcher that has consumed exactly its output tokens.

The engine keeps the invariant `state.num_tokens == seq.num_output_tokens`: every appended token is
accepted here (`Engine.append_token`), a forked choice copies the state before its first token
(`fork`), and the decode worker re-advances a fresh state over the tokens the prefill worker sampled
(it appends them through the same path). Speculative drafts never touch the state on the engine
thread: the mask filler consumes a sequence's drafts to compute their rows and rolls them back, and
the engine then accepts only the tokens it emits, so rejected drafts leave no trace.

Termination: `done` is true once the grammar can take no further token but EOS (a JSON object's
closing brace, the last choice's last character, EOS itself when the grammar allowed it): the
engine finishes the sequence with STOP then, EOS or not, ignore_eos or not.
"""

from __future__ import annotations

import logging

import llguidance as llg

from engine.structured.compiler import Grammar

logger = logging.getLogger(__name__)


class GrammarState:
    """Not thread-safe: the engine thread owns it, except while the mask filler reads it during a
    step's forward (the engine thread does not touch it then)."""

    __slots__ = ("grammar", "matcher", "num_tokens")

    def __init__(self, grammar: Grammar, matcher: llg.LLMatcher | None = None, num_tokens: int = 0) -> None:
        self.grammar = grammar
        self.matcher = matcher if matcher is not None else grammar.new_matcher()
        self.num_tokens = num_tokens

    @property
    def kind(self) -> str:
        return self.grammar.kind

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (the matcher is then in its error state, and `done`) when the
        grammar forbids it, which only happens when other constraints left a row no allowed token."""
        ok = self.matcher.consume_token(token)
        if ok:
            self.num_tokens += 1
        else:
            logger.warning("a %s grammar refused token %d after %d tokens: %s", self.kind, token, self.num_tokens,
                           self.matcher.get_error())
        return ok

    def advance(self, tokens: list[int]) -> bool:
        """Accept each of `tokens` in turn; False at the first one refused."""
        return all(self.accept(t) for t in tokens)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, from the start, the grammar would accept now (the state is unchanged)."""
        return self.matcher.validate_tokens(tokens) if tokens else 0

    @property
    def done(self) -> bool:
        """The grammar takes nothing more (complete, or in its error state)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def fork(self) -> GrammarState:
        """An independent copy at the same position (a forked choice)."""
        return GrammarState(self.grammar, self.matcher.deep_copy(), self.num_tokens)
