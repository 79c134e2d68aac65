"""bench.json: what a run writes, and the plots and table drawn from it (also for `--replot`).

    {"date", "machine", "command", "workload",
     "runs": [summary + {"label", "latencies_s": {"ttft", "tpot", "itl", "e2e"}}],
     "baseline": same shape or null, "ratios": [one per run] or null, "plots": [file names]}
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cli.serving_bench.metrics import Slo, latencies_s, ratios, summarize
from cli.serving_bench.runner import RunResult

logger = logging.getLogger(__name__)
_NUMBER_LIST = re.compile(r"\[\s+((?:-?[0-9.eE+-]+,?\s+)+)\]")


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _entry(run: RunResult, slo: Slo) -> dict[str, Any]:
    label = run.backend if run.backend.startswith("hf") else f"{run.backend}, {run.load.label}"
    raw = {k: [round(v, 6) for v in vs] for k, vs in latencies_s(run.results).items()}
    return {**summarize(run, slo), "label": label, "latencies_s": raw}


def build(runs: list[RunResult], baseline: RunResult | None, slo: Slo, command: list[str],
          workload: dict[str, Any]) -> dict[str, Any]:
    summaries = [_entry(r, slo) for r in runs]
    base = _entry(baseline, slo) if baseline is not None else None
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "command": command,
            "workload": workload, "runs": summaries, "baseline": base,
            "ratios": [ratios(s, base) for s in summaries] if base else None, "plots": []}


def draw(report: dict[str, Any], out: Path, title: str) -> list[str]:
    """Write latency_cdf.png, and rate_sweep[_<protocol>].png for each backend run at >= 2 finite
    rates, into `out`; returns the file names (none, with a warning, without matplotlib: the
    `tandem[bench]` extra)."""
    try:
        from cli.serving_bench import plots
    except ImportError as exc:
        logger.warning("no plots: %s (pip install 'tandem[bench]')", exc)
        return []
    entries = report["runs"] + ([report["baseline"]] if report["baseline"] else [])
    names = [plots.latency_cdfs([(e["label"], e["latencies_s"]) for e in entries], out / "latency_cdf.png",
                                title).name]
    for backend in dict.fromkeys(s["backend"] for s in report["runs"]):
        mine = [s for s in report["runs"] if s["backend"] == backend]
        if sum(s["request_rate"] is not None and math.isfinite(s["request_rate"]) for s in mine) >= 2:
            name = "rate_sweep.png" if backend.endswith("grpc") else f"rate_sweep_{backend.split('-')[-1]}.png"
            names.append(plots.rate_sweep(mine, out / name, report["baseline"], f"{title} ({backend})").name)
    return names


def write(report: dict[str, Any], out: Path) -> Path:
    """OUT/bench.json, indented, with each list of numbers on one line (thousands of latencies)."""
    path = out / "bench.json"
    text = json.dumps(report, indent=1, default=str)
    path.write_text(_NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text))
    return path


SMALL_SAMPLE = 30  # completed requests below which p99 is one of the few slowest, not a percentile
_WIDTH = 50


def _line(label: str, value: Any, fmt: str = "") -> str:
    return f"{label:<40} {format(value, fmt) if value is not None else '-':>9}"


def _section(title: str) -> str:
    return f"{title:-^{_WIDTH}}"


def summary(s: dict[str, Any]) -> str:
    """One run's result, laid out as `vllm bench serve` prints it, plus the failures' reasons."""
    load = f"concurrency {s['concurrency']}" if s["concurrency"] else f"request rate {s['request_rate']:g}/s"
    rows = [f"{' ' + s['backend'] + ', ' + load + ' ':=^{_WIDTH}}",
            _line("Successful requests:", s["completed"]),
            _line("Failed requests:", s["failed"])]
    rows += [f"  {e['count']} x {e['error']}" for e in s.get("errors", []) if isinstance(e, dict)]
    if s.get("not_sent"):
        rows.append(_line("Not sent (run ended first):", s["not_sent"]))
    rows += [_line("Benchmark duration (s):", s["duration_s"], ".2f"),
             _line("Total input tokens:", s["prompt_tokens"]),
             _line("Total generated tokens:", s["output_tokens"]),
             _line("Request throughput (req/s):", s["request_throughput"], ".2f"),
             _line("Output token throughput (tok/s):", s["output_throughput"], ".2f"),
             _line("Total Token throughput (tok/s):", s["total_token_throughput"], ".2f")]
    g = s["goodput"]
    if g["slo_ttft_ms"] is not None or g["slo_tpot_ms"] is not None:
        rows.append(_line("Request goodput (req/s):", g["requests_per_s"], ".2f"))
    for key, title, short in (("ttft_ms", "Time to First Token", "TTFT"),
                              ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl_ms", "Inter-token Latency", "ITL"), ("e2e_ms", "End-to-end Latency", "E2EL")):
        d = s[key]
        rows += [_section(title), _line(f"Mean {short} (ms):", d.get("mean"), ".2f"),
                 _line(f"Median {short} (ms):", d["p50"], ".2f"), _line(f"P99 {short} (ms):", d["p99"], ".2f")]
    rows.append("=" * _WIDTH)
    return "\n".join(rows)


def warnings(report: dict[str, Any]) -> list[str]:
    """What makes a run's numbers weak: failures, and too few requests for a p99."""
    out = []
    for s in report["runs"] + ([report["baseline"]] if report["baseline"] else []):
        name = f"{s['backend']} ({s['label'].split(', ', 1)[-1]})"
        if s["failed"]:
            reasons = "; ".join(f"{e['count']} x {e['error']}" for e in s.get("errors", []) if isinstance(e, dict))
            out.append(f"warning: {name}: {s['failed']} of {s['completed'] + s['failed']} requests failed: {reasons}")
        if s["completed"] < SMALL_SAMPLE:
            out.append(f"warning: {name}: only {s['completed']} completed requests: p99 is about the slowest one, "
                       f"and percentiles move a lot between runs (--num-requests {SMALL_SAMPLE * 4} or more "
                       "for stable numbers)")
    return out


def table(report: dict[str, Any]) -> str:
    """What a run prints at the end: each run's summary, the comparison table, the warnings."""
    blocks = [summary(s) for s in report["runs"] + ([report["baseline"]] if report["baseline"] else [])]
    rows = [f"{'backend':<32} {'load':>8} {'ok/fail':>8} {'req/s':>7} {'tok/s':>8} {'TTFT p50/p99 ms':>17} "
            f"{'TPOT p50/p99 ms':>17} {'goodput/s':>9}"]
    for s in report["runs"] + ([report["baseline"]] if report["baseline"] else []):
        load = f"c={s['concurrency']}" if s["concurrency"] else f"r={s['request_rate']:g}"
        rows.append(f"{s['backend']:<32} {load:>8} {s['completed']:>4}/{s['failed']:<3} "
                    f"{s['request_throughput']:>7.2f} {s['output_throughput']:>8.1f} {_pair(s['ttft_ms']):>17} "
                    f"{_pair(s['tpot_ms']):>17} {s['goodput']['requests_per_s']:>9.2f}")
    for s, r in zip(report["runs"], report["ratios"] or [], strict=False):
        rows.append(f"tandem vs baseline ({s['label']}): " +
                    ", ".join(f"{k} {v:.2f}" for k, v in r.items() if v is not None))
    return "\n\n".join([*blocks, "\n".join(rows), *(["\n".join(warnings(report))] if warnings(report) else [])])


def _pair(d: dict[str, float | None]) -> str:
    return "-" if d["p50"] is None else f"{d['p50']:.0f}/{d['p99']:.0f}"
