"""Speculation counters of one request or one engine, and the rates derived from them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecMetrics:
    """How speculation went for one request (or a whole engine).

    num_spec_steps: target forwards that verified at least one draft token for it.
    num_draft_tokens: draft tokens proposed and verified.
    num_accepted_tokens: of those, the ones the target accepted (each is a token gained for free;
    every verification also emits one token of the target's own: the correction or the bonus).
    """

    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens; None when nothing was proposed."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Draft tokens accepted per verification (0..k); a verification emits this plus one token."""
        return self.num_accepted_tokens / self.num_spec_steps if self.num_spec_steps else None

    @classmethod
    def of(cls, seq: object) -> SpecMetrics:
        """Read the counters of an `engine.sequence.Sequence`."""
        return cls(getattr(seq, "num_spec_steps", 0), getattr(seq, "num_draft_tokens", 0),
                   getattr(seq, "num_accepted_tokens", 0))
