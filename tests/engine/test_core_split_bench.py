"""bench.core_split's prototype: the engine's tokens reach a text process over ZeroMQ, all of them, and
the text it makes there is the tokenizer's decode (its contract check can fail)."""

from __future__ import annotations

from pathlib import Path

from bench.core_split import run_core
from bench.overhead import near_free_model


def test_every_token_reaches_the_text_process_and_decodes_right(tmp_path: Path) -> None:
    path = near_free_model(tmp_path)
    row = run_core(path, batch=4, warmup=2, steps=3, send=True)
    assert row["mode"] == "core"
    assert row["tokens_detokenized"] == 4 * (2 + 3)  # the prefill's first tokens, then one a step
    assert row["requests_with_wrong_text"] == 0
    assert row["text_lag_ms_max"] >= row["text_lag_ms_mean"] > 0
    alone = run_core(path, batch=4, warmup=2, steps=3, send=False)
    assert alone["mode"] == "alone" and "tokens_detokenized" not in alone
