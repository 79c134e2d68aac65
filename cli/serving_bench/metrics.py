"""A run's numbers: latency percentiles, throughput and goodput (requests that met every SLO, per s).

    TTFT  send -> first token                    TPOT  (e2e - ttft) / (output tokens - 1), per request
    ITL   gap between consecutive chunks          E2E   send -> last token
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cli.serving_bench.clients import RequestResult
from cli.serving_bench.runner import RunResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Goodput counts a request only if it met each SLO that is set (None: not checked)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and r.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 in milliseconds (None when there is no value)."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def latencies_s(results: list[RequestResult]) -> dict[str, list[float]]:
    """Every completed request's TTFT, TPOT and E2E, and every ITL gap, in seconds."""
    ok = [r for r in results if r.ok]
    return {"ttft": [r.ttft_s for r in ok], "tpot": [t for r in ok if (t := r.tpot_s) is not None],
            "itl": [g for r in ok for g in r.itl_s], "e2e": [r.e2e_s for r in ok]}


def summarize(run: RunResult, slo: Slo) -> dict[str, Any]:
    """The JSON-ready summary of one run."""
    ok = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(slo.met(r) for r in run.results)
    lat = latencies_s(run.results)
    return {
        "backend": run.backend,
        "request_rate": None if run.load.concurrency else run.load.rate,
        "concurrency": run.load.concurrency or None,
        "completed": len(ok), "failed": len(failed), "not_sent": run.not_sent,
        "duration_s": run.duration_s, "loadavg_1m": run.loadavg_1m,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / run.duration_s,
        "output_throughput": out_tokens / run.duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / run.duration_s,
        **{f"{name}_ms": distribution_ms(values) for name, values in lat.items()},
        "goodput": {"slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms,
                    "requests_per_s": good / run.duration_s,
                    "fraction": good / len(run.results) if run.results else 0.0},
        "errors": error_counts(failed),
    }


def error_counts(failed: list[RequestResult], limit: int = 5) -> list[dict[str, Any]]:
    """The failures' reasons, most frequent first: [{"error": "UNAVAILABLE: ...", "count": 3}, ...]."""
    counts: dict[str, int] = {}
    for r in failed:
        reason = r.error or "failed without a reason (a bug: every failure should say one)"
        counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [{"error": e, "count": n} for e, n in ranked]


def ratios(tandem: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """Tandem against the baseline: > 1 means Tandem is better (throughput up, latency down)."""
    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "output_throughput_x": div(tandem["output_throughput"], baseline["output_throughput"]),
        "request_throughput_x": div(tandem["request_throughput"], baseline["request_throughput"]),
        "ttft_p50_x": div(baseline["ttft_ms"]["p50"], tandem["ttft_ms"]["p50"]),
        "tpot_p50_x": div(baseline["tpot_ms"]["p50"], tandem["tpot_ms"]["p50"]),
        "e2e_p50_x": div(baseline["e2e_ms"]["p50"], tandem["e2e_ms"]["p50"]),
    }
