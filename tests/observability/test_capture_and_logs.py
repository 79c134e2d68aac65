"""Prompt/completion capture is opt-in and follows the GenAI conventions; the access line and the JSON
log format carry structured fields. The gateway's real observer with the real OpenTelemetry SDK."""

from __future__ import annotations

import json
import logging
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.sampling.params import SamplingParams
from gateway.config import GatewayConfig
from gateway.main import CAPTURE_ENV, capture_content
from gateway.observe import GatewayObserver
from server.logs import JsonFormatter, setup_logging
from server.metrics import GatewayMetrics, new_registry
from server.tracing import Tracing
from tandem.v1 import generation_pb2 as gen


def _observe(decode) -> tuple[dict, list[logging.LogRecord]]:
    """One request through a GatewayObserver; returns its root span's attributes and the access records."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = GatewayObserver(Tracing(provider.get_tracer("test"), True, provider),
                               GatewayMetrics(new_registry("m", "gateway")), decode)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    access = logging.getLogger("tandem.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        obs = observer.start("req-1", "m", None)
        obs.request(SamplingParams(max_tokens=2))
        with obs.span("gateway.tokenize") as span:
            obs.tokenized(span, [7, 8, 9], True)
        obs.relayed(1, "Par")
        obs.relayed(1, "is")
        obs.finished(gen.FINISH_REASON_STOP, gen.Usage(prompt_tokens=3, completion_tokens=2), "")
        obs.end(None)
    finally:
        access.removeHandler(handler)
    [root] = [s for s in exporter.get_finished_spans() if s.name == "text_completion m"]
    return dict(root.attributes or {}), records


def test_prompts_and_completions_are_captured_only_when_asked() -> None:
    attrs, _ = _observe(decode=None)
    assert "gen_ai.input.messages" not in attrs and "gen_ai.output.messages" not in attrs
    attrs, _ = _observe(decode=lambda ids: "<" + ",".join(map(str, ids)) + ">")
    [inp] = json.loads(attrs["gen_ai.input.messages"])
    assert inp == {"role": "user", "parts": [{"type": "text", "content": "<7,8,9>"}]}
    [out] = json.loads(attrs["gen_ai.output.messages"])
    assert out == {"role": "assistant", "finish_reason": "stop", "parts": [{"type": "text", "content": "Paris"}]}


def test_capture_is_off_by_default_and_follows_the_genai_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = GatewayConfig(model="m", decode_workers=("127.0.0.1:1",))
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    assert not capture_content(cfg)
    assert capture_content(GatewayConfig(model="m", decode_workers=("127.0.0.1:1",), trace_content=True))
    monkeypatch.setenv(CAPTURE_ENV, "true")
    assert capture_content(cfg)


def test_the_access_line_says_what_happened_and_json_keeps_the_fields() -> None:
    _, [record] = _observe(decode=None)
    text = record.getMessage()
    assert text.startswith("gRPC /tandem.v1.Generation/Generate OK id=req-1 prompt_tokens=3 completion_tokens=2")
    assert "finish=stop" in text and "ttft_ms=" in text and "duration_ms=" in text
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == "tandem.access" and line["level"] == "INFO" and line["message"] == text
    assert line["request_id"] == "req-1" and line["status"] == "OK" and line["completion_tokens"] == 2
    assert line["protocol"] == "grpc" and isinstance(line["ttft_ms"], float)


def test_setup_logging_refuses_unknown_levels_and_formats() -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("LOUD", "text")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "xml")


def test_the_throughput_line_comes_once_per_busy_interval() -> None:
    from server.logs import ThroughputLog

    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test.throughput")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    log = ThroughputLog("decode", interval_s=0.05, logger=logger)
    log.t_last -= 1.0  # long idle before the first step: no line for the idle time
    log.step(2, 2, 2, 0, 0.01)
    assert not records
    deadline = time.monotonic() + 0.2
    while not records and time.monotonic() < deadline:  # busy: a step every 10 ms
        time.sleep(0.01)
        log.step(2, 10, 2, 1, 0.01)
    [record] = records
    assert record.getMessage().startswith("decode: ") and "(mean batch 2.0" in record.getMessage()
    assert record.fields["steps"] >= 5  # type: ignore[attr-defined]
