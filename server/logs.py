"""Logging for every Tandem process: one `setup_logging()` in the `tandem` command's main.

    --log-level LEVEL     DEBUG, INFO (default), WARNING, ERROR
    --log-format text     `2026-12-03 08:00:00,123 INFO tandem.access: POST /v1/chat/completions 200 ...`
    --log-format json     one JSON object a line: {"ts", "level", "logger", "message", ...fields}

A record may carry structured fields as `extra={"fields": {...}}`: the text format appends nothing
(the message already says them), the JSON format merges them into the object, so a log pipeline
gets `request_id`, `status`, `ttft_ms`, ... as keys. The gateway writes one such line per request to
the `tandem.access` logger; workers log their throughput every `ThroughputLog.interval_s` while busy.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "tandem.access"


class JsonFormatter(logging.Formatter):
    """A record as one JSON line; `extra={"fields": {...}}` adds keys; exceptions go in "exc_info"."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            obj.update({k: v for k, v in fields.items() if k not in obj})
        if record.exc_info:
            obj["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


_HANDLER_NAME = "tandem-stderr"


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger on stderr. Raises ValueError for an unknown level or format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):  # ours from an earlier call, not anyone else's (a test's capture)
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)


class ThroughputLog:
    """A worker's "what am I doing" line, at most once per `interval_s` and only after work:

        decode: 52.3 tokens/s computed, 41.8 generated, 96 steps (mean batch 3.2, 9.8 ms), 4 finished

    `step()` is called from the engine thread after each step; it only adds numbers until the
    interval has passed. Single-threaded (the engine thread's); never raises into its caller."""

    def __init__(self, role: str, interval_s: float = 10.0, logger: logging.Logger | None = None) -> None:
        self.role = role
        self.interval_s = interval_s
        self.logger = logger or logging.getLogger(f"tandem.{role}")
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.t0 = self.t_last = now
        self.steps = self.seqs = self.computed = self.generated = self.finished = 0
        self.step_s = 0.0

    def step(self, num_seqs: int, computed: int, generated: int, finished: int, step_s: float) -> None:
        """One engine step: `computed` tokens through the model, `generated` sampled, `finished` requests."""
        now = time.monotonic()
        if now - self.t_last > self.interval_s:  # idle since: a new window starts with this step
            self._reset(now - step_s)
        self.t_last = now
        self.steps += 1
        self.seqs += num_seqs
        self.computed += computed
        self.generated += generated
        self.finished += finished
        self.step_s += step_s
        if now - self.t0 < self.interval_s:
            return
        span = now - self.t0
        self.logger.info(
            "%s: %.1f tokens/s computed, %.1f generated, %d steps (mean batch %.1f, %.1f ms), %d finished",
            self.role, self.computed / span, self.generated / span, self.steps, self.seqs / self.steps,
            1000 * self.step_s / self.steps, self.finished,
            extra={"fields": {"role": self.role, "interval_s": round(span, 3),
                              "generation_tokens_per_s": round(self.generated / span, 2),
                              "computed_tokens_per_s": round(self.computed / span, 2), "steps": self.steps,
                              "mean_batch": round(self.seqs / self.steps, 2), "finished": self.finished}})
        self._reset(now)
