"""Structured outputs in the engine: compile time (cold, cached), per-step mask time against the forward,
and constrained against unconstrained throughput at batch 1 and 32, side by side in one run.

    .venv/bin/python -m bench.structured --out bench/results/structured.json      (SmolLM2-135M-Instruct)

Every step's forward is timed (ModelRunner.forward_logits) next to its masks' fill time (on the mask
thread, while the forward runs) and the time the sampler still waited for them after the forward.
Throughput is output tokens per second of wall time over the whole batch, the best of `--repeats`
alternating runs of each (greedy; the constrained
requests ask for a JSON Schema, so some finish before max_tokens: tokens/s, not requests/s, compares).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from engine import LLM, SamplingParams
from engine.structured.spec import StructuredOutput

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60}, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
    "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "horror", "sci-fi"]}},
    "cast": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"},
                                                                         "role": {"type": "string"}},
                                        "required": ["name", "role"]}}},
    "required": ["title", "year", "genres", "cast"]}
SPECS = {
    "json_schema": StructuredOutput.of_schema(SCHEMA),
    "regex": StructuredOutput(regex=r"[A-Z][a-z]+( [a-z]+){3,12}\."),
    "tool_tag": StructuredOutput.of_schema({"anyOf": [{"type": "object", "properties": {
        "name": {"const": f"tool_{i}"}, "arguments": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}},
        "required": ["name", "arguments"]} for i in range(16)]}),
}
PROMPTS = ["Describe a famous movie as JSON with title, year, genres and cast.",
           "Give me a JSON record for a science fiction film.",
           "Return the details of a classic comedy film in JSON."]


class StepClock:
    """Times each forward, and the masks each step filled / waited for."""

    def __init__(self, llm: LLM) -> None:
        self.forward: list[float] = []
        self.fill: list[float] = []
        self.wait: list[float] = []
        runner, engine = llm.engine.runner, llm.engine
        forward, execute = runner.forward_logits, engine.execute

        def timed_forward(step: Any, hook: Any = None) -> Any:
            t0 = time.perf_counter()
            out = forward(step, hook)
            self.forward.append(time.perf_counter() - t0)
            return out

        def timed_execute(step: Any, hook: Any = None) -> Any:
            out = execute(step, hook)
            if step.masks is not None:
                self.fill.append(step.masks.fill_seconds)
                self.wait.append(step.masks.wait_seconds)
            return out

        runner.forward_logits = timed_forward  # type: ignore[method-assign]
        engine.execute = timed_execute  # type: ignore[method-assign]

    def reset(self) -> None:
        self.forward, self.fill, self.wait = [], [], []


def ms(xs: list[float]) -> float:
    return statistics.mean(xs) * 1e3 if xs else 0.0


def run(llm: LLM, clock: StepClock, batch: int, spec: StructuredOutput | None, max_tokens: int) -> dict[str, Any]:
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured=spec)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, structured=spec))  # warm, compile
    clock.reset()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    valid = sum(1 for o in outs if o.finish_reason == "stop" and _parses(o.text)) if spec is not None else None
    return {"batch": batch, "constrained": spec is not None, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "steps": len(clock.forward), "forward_ms": ms(clock.forward),
            "mask_fill_ms": ms(clock.fill), "mask_wait_ms": ms(clock.wait), "complete_and_valid": valid}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def compile_times(llm: LLM) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in SPECS.items():
        cold = llm.engine.grammars.compile(spec)
        warm = llm.engine.grammars.compile(spec)
        out[name] = {"cold_ms": cold.seconds * 1e3, "cached_ms": warm.seconds * 1e3, "cached": warm.cached}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating unconstrained/constrained runs per "
                        "batch size; the best of each is kept (the box is shared: the load moves)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/structured.json"))
    args = parser.parse_args()
    load0 = os.getloadavg()
    llm = LLM(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto", block_size=16,
              max_num_batched_tokens=2048, num_kv_blocks=1024)
    clock = StepClock(llm)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
                              "device": args.device, "load_average_start": load0, "compile": compile_times(llm),
                              "runs": []}
    for batch in args.batches:
        tries: list[list[dict[str, Any]]] = [[], []]
        for _ in range(args.repeats):  # alternating, so both see the same drift in the machine's load
            tries[0].append(run(llm, clock, batch, None, args.max_tokens))
            tries[1].append(run(llm, clock, batch, SPECS["json_schema"], args.max_tokens))
        pair = [max(t, key=lambda r: r["tokens_per_s"]) for t in tries]
        for r, t in zip(pair, tries, strict=True):
            r["tokens_per_s_all"] = [x["tokens_per_s"] for x in t]
        pair[1]["throughput_vs_unconstrained"] = pair[1]["tokens_per_s"] / pair[0]["tokens_per_s"]
        pair[1]["mask_wait_vs_forward"] = pair[1]["mask_wait_ms"] / pair[1]["forward_ms"]
        result["runs"] += pair
        print(json.dumps(pair, indent=1), flush=True)
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
