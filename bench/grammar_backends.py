"""xgrammar against llguidance on CPU, side by side in one run: what the library choice rests on.

For the SmolLM2-135M-Instruct tokenizer (49,152 tokens): import time and what the import loads (torch?),
the tokenizer view's build time, compile time of a few JSON Schemas, a regex and an EBNF grammar, and
the per-step mask fill time along a valid output (the mean over its tokens, first mask excluded), and
whether each refuses a schema keyword it cannot enforce.

    .venv/bin/python -m bench.grammar_backends --out bench/results/grammar_backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0}, "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "email": {"type": "string", "format": "email"}},
                  "required": ["name"]},
        "status": {"enum": ["open", "closed", "merged"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["id", "tags", "owner", "status"]},
    "tools": {"anyOf": [{"type": "object", "properties": {"name": {"const": f"fn_{i}"}, "arguments": {
        "type": "object", "properties": {f"p{j}": {"type": ["string", "integer", "boolean"][j % 3]}
                                         for j in range(6)}, "required": ["p0", "p1"]}},
        "required": ["name", "arguments"]} for i in range(12)]},
}
SAMPLES = {
    "flat": '{"name": "Ada Lovelace", "age": 36}',
    "nested": '{"id": 42, "tags": ["a", "bb", "ccc"], "owner": {"name": "Grace", "email": "g@navy.mil"}, '
              '"status": "merged", "score": 0.75}',
    "tools": '{"name": "fn_7", "arguments": {"p0": "hello world", "p1": 12345, "p2": true}}',
    "regex": "2026-12-03T11:22:33Z",
    "ebnf": "(1 + (22 * 333)) * 4",
}
REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"
EBNF = ('root ::= expr\nexpr ::= term (" + " term)*\nterm ::= factor (" * " factor)*\n'
        'factor ::= [0-9]+ | "(" expr ")"')
REFUSED = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}


def import_cost(module: str) -> dict[str, Any]:
    code = (f"import sys, time; t = time.perf_counter(); import {module}; "
            f"print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    seconds, torch = out.stdout.split()
    return {"import_s": float(seconds), "imports_torch": torch == "True"}


def mask_steps(fill: Any, consume: Any, tokens: list[int]) -> list[float]:
    times = []
    for tok in tokens:
        t0 = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t0)
        consume(tok)
    return times[1:]  # the first mask builds lazy state: reported as part of compile


def bench_llguidance(tok: Any, text_of: Any) -> dict[str, Any]:
    import llguidance as llg

    from engine.structured.grammar import JSON_OPTIONS

    t0 = time.perf_counter()
    lt = llg.LLTokenizer(tok.to_json(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids))
    out: dict[str, Any] = {"tokenizer_s": time.perf_counter() - t0, "compile_ms": {}, "first_mask_ms": {},
                           "mask_us_mean": {}, "mask_us_p99": {}}
    words = (lt.vocab_size + 31) // 32
    buf = np.zeros(words, dtype=np.int32)
    grammars = {k: llg.LLMatcher.grammar_from_json_schema(s, defaults=JSON_OPTIONS) for k, s in SCHEMAS.items()}
    grammars["regex"] = llg.LLMatcher.grammar_from_regex(REGEX)
    grammars["ebnf"] = llg.grammar_from("gbnf", EBNF)
    for name, g in grammars.items():
        t0 = time.perf_counter()
        m = llg.LLMatcher(lt, g, log_level=0)
        out["compile_ms"][name] = (time.perf_counter() - t0) * 1e3
        assert not m.is_error(), m.get_error()
        t0 = time.perf_counter()
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)
        out["first_mask_ms"][name] = (time.perf_counter() - t0) * 1e3
        m = llg.LLMatcher(lt, g, log_level=0)
        ids = text_of(SAMPLES[name])
        steps = mask_steps(lambda m=m: m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes),
                           lambda t, m=m: m.consume_token(t), ids)
        out["mask_us_mean"][name] = statistics.mean(steps) * 1e6
        out["mask_us_p99"][name] = float(np.percentile(steps, 99)) * 1e6
    g = llg.LLMatcher.grammar_from_json_schema(REFUSED, defaults=JSON_OPTIONS)
    out["refuses_uniqueItems"] = llg.LLMatcher.validate_grammar(g)
    return out


def bench_xgrammar(tok: Any, text_of: Any) -> dict[str, Any]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    from tokenizers import Tokenizer as Backend

    hf = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(tok.to_json()))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_token_ids))
    out: dict[str, Any] = {"tokenizer_s": time.perf_counter() - t0, "compile_ms": {}, "first_mask_ms": {},
                           "mask_us_mean": {}, "mask_us_p99": {}}
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compilers = {k: (lambda s=s: comp.compile_json_schema(json.dumps(s), any_whitespace=False))
                 for k, s in SCHEMAS.items()}
    compilers["regex"] = lambda: comp.compile_regex(REGEX)
    compilers["ebnf"] = lambda: comp.compile_grammar(EBNF)
    bm = xgr.allocate_token_bitmask(1, info.vocab_size)
    for name, build in compilers.items():
        t0 = time.perf_counter()
        cg = build()
        out["compile_ms"][name] = (time.perf_counter() - t0) * 1e3
        m = xgr.GrammarMatcher(cg)
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bm)
        out["first_mask_ms"][name] = (time.perf_counter() - t0) * 1e3
        m = xgr.GrammarMatcher(cg)
        steps = mask_steps(lambda m=m: m.fill_next_token_bitmask(bm), lambda t, m=m: m.accept_token(t),
                           text_of(SAMPLES[name]))
        out["mask_us_mean"][name] = statistics.mean(steps) * 1e6
        out["mask_us_p99"][name] = float(np.percentile(steps, 99)) * 1e6
    try:
        comp.compile_json_schema(json.dumps(REFUSED))
        out["refuses_uniqueItems"] = ""
    except Exception as exc:  # noqa: BLE001 - any refusal counts
        out["refuses_uniqueItems"] = str(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/grammar_backends.json"))
    args = parser.parse_args()
    from engine.hub import resolve_model
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(resolve_model("SmolLM2-135M-Instruct").path)

    def text_of(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(),
        "tokenizer": "SmolLM2-135M-Instruct", "vocab_size": tok.vocab_size,
        "llguidance": {**import_cost("llguidance"), **bench_llguidance(tok, text_of)},
        "xgrammar": {**import_cost("xgrammar"), **bench_xgrammar(tok, text_of)},
    }
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
