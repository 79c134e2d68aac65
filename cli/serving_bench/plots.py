"""PNG plots of benchmark runs, drawn on a bare matplotlib Figure (no pyplot, no global backend).

Both functions take what `bench.json` holds (per-run latency lists and summaries), so
`tandem bench --replot OUT/bench.json` redraws a finished run without re-running it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

Series = tuple[str, dict[str, list[float]]]  # (label, {"ttft"|"tpot"|"itl"|"e2e": seconds})
_PANELS = (("ttft", "time to first token"), ("tpot", "time per output token"),
           ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))


def latency_cdfs(series: list[Series], path: str | Path, title: str = "") -> Path:
    """One CDF panel per latency (TTFT, TPOT, ITL, E2E), one curve per series, log-scaled time so
    that runs of very different speed stay readable. Writes and returns `path`."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (key, name) in zip(axes.flat, _PANELS, strict=True):
        for label, lat in series:
            ms = np.sort(np.asarray(lat.get(key, []), dtype=np.float64) * 1e3)
            ms = ms[ms > 0]
            if ms.size:
                ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", label=label)
        log = _time_axis(ax, [np.asarray(lat.get(key, []), dtype=np.float64) * 1e3 for _, lat in series])
        ax.set_title(name)
        ax.set_xlabel("ms (log scale)" if log else "ms")
        ax.yaxis.set_major_locator(MaxNLocator(6))
        ax.set_ylabel("fraction of gaps" if key == "itl" else "fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def _time_axis(ax: Any, samples: list[np.ndarray]) -> bool:
    """Log scale with 1-2-5 labels when the times span more than a decade, else linear with ~6 labels
    (a log axis over 30..45 ms shows no label at all). Returns whether the axis is logarithmic."""
    values = np.concatenate([v[v > 0] for v in samples]) if samples else np.array([])
    if values.size == 0 or values.max() / values.min() < 10:
        ax.xaxis.set_major_locator(MaxNLocator(6))
        return False
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    return True


def rate_sweep(summaries: list[dict[str, Any]], path: str | Path, baseline: dict[str, Any] | None = None,
               title: str = "") -> Path:
    """Throughput, goodput and p50/p99 TTFT and TPOT against the request rate of each run in
    `summaries` (finite rates only); the baseline as dotted lines. Writes and returns `path`."""
    pts = sorted((s for s in summaries if s["request_rate"] is not None and math.isfinite(s["request_rate"])),
                 key=lambda s: s["request_rate"])
    rates = [s["request_rate"] for s in pts]
    fig = Figure(figsize=(15, 4), layout="constrained")
    tput, good, ttft, tpot = fig.subplots(1, 4)
    tput.plot(rates, [s["output_throughput"] for s in pts], "o-", label="tandem")
    tput.set_title("output throughput")
    tput.set_ylabel("tokens / s")
    good.plot(rates, [s["request_throughput"] for s in pts], "o-", label="completed")
    good.plot(rates, [s["goodput"]["requests_per_s"] for s in pts], "s--", label=_slo_label(pts))
    good.plot(rates, rates, ":", color="lightgray", label="offered")
    good.set_title("requests / s")
    for ax, key, name in ((ttft, "ttft_ms", "time to first token"), (tpot, "tpot_ms", "time per output token")):
        for p in ("p50", "p99"):
            ax.plot(rates, [s[key][p] for s in pts], "o-", label=f"tandem {p}")
        ax.set_title(name)
        ax.set_ylabel("ms")
    if baseline is not None:
        name = baseline["backend"]
        tput.axhline(baseline["output_throughput"], color="gray", ls=":", label=name)
        good.axhline(baseline["request_throughput"], color="gray", ls=":", label=name)
        ttft.axhline(baseline["ttft_ms"]["p50"], color="gray", ls=":", label=f"{name} p50")
        tpot.axhline(baseline["tpot_ms"]["p50"], color="gray", ls=":", label=f"{name} p50")
    for ax in (tput, good, ttft, tpot):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def _slo_label(pts: list[dict[str, Any]]) -> str:
    if not pts:
        return "goodput"
    g = pts[0]["goodput"]
    parts = [f"TTFT<={g['slo_ttft_ms']:g}ms" if g["slo_ttft_ms"] is not None else "",
             f"TPOT<={g['slo_tpot_ms']:g}ms" if g["slo_tpot_ms"] is not None else ""]
    return "goodput (" + ", ".join(p for p in parts if p) + ")" if any(parts) else "goodput (no SLO)"
