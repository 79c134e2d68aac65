"""Speculative decoding: proposers (n-gram lookup, a draft model), exact verification, adaptive k.

See docs/speculative.md. `SpecDecoder` is what `engine.Engine` drives; the rest are its parts:
`ngram` and `draft` propose, `verify` decides, `policy` chooses k, `metrics` reports.
"""

from engine.spec.decoder import SpecDecoder
from engine.spec.metrics import SpecMetrics

__all__ = ["SpecDecoder", "SpecMetrics"]
