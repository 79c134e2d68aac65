"""The same workload through Hugging Face `transformers` `generate`, on this machine, for a ratio.

Requests run in arrival order in static batches of `batch_size` (1: sequentially), left-padded; a
batch runs until its longest output, and each request counts as done at the step that made its last
token. Latencies are measured from the start of the request's batch (a closed loop: no queueing),
so under load they flatter the baseline; the throughput ratio is the fair comparison. EOS is banned
until `max_tokens` (min_new_tokens), as Tandem's requests set ignore_eos.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cli.serving_bench.clients import RequestResult
from cli.serving_bench.runner import LoadSpec, RunResult
from cli.serving_bench.workload import BenchRequest


class _StepClock:
    """A transformers streamer that only notes when each decoding step's tokens exist."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt
            self._prompt_seen = True
            return
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def _prompt_ids(model_dir: Path, requests: list[BenchRequest]) -> list[list[int]]:
    """Token ids of every prompt, tokenized as the gateway tokenizes text."""
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir) if any(r.prompt is not None for r in requests) else None
    return [list(r.prompt_token_ids) if r.prompt_token_ids is not None else tok.encode(r.prompt or "")  # type: ignore[union-attr]
            for r in requests]


def run_hf(model_dir: str | Path, requests: list[BenchRequest], *, batch_size: int = 1, device: str = "cpu",
           dtype: str = "float32", max_duration_s: float = 600.0, progress: bool = True) -> RunResult:
    """Generate every request with transformers; stops sending batches after `max_duration_s`."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_dir = Path(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) or 0
    all_ids = _prompt_ids(model_dir, requests)
    results: list[RequestResult] = []
    deadline = time.monotonic() + max_duration_s

    def batch_run(idx: list[int]) -> None:
        longest = max(len(all_ids[i]) for i in idx)
        ids = torch.tensor([[pad] * (longest - len(all_ids[i])) + all_ids[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (longest - len(all_ids[i])) + [1] * len(all_ids[i]) for i in idx], device=device)
        steps = max(requests[i].max_tokens for i in idx)
        clock = _StepClock()
        start = time.monotonic()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=pad, streamer=clock)
        for i in idx:
            n = requests[i].max_tokens
            times = [t - start for t in clock.times[:n]]
            results.append(RequestResult(ok=True, prompt_tokens=len(all_ids[i]), output_tokens=n, sent_at=start,
                                         ttft_s=times[0], e2e_s=times[-1], chunks=[(t, 1) for t in times]))

    with torch.inference_mode():  # warm-up: first-call allocations out of the measurement
        model.generate(input_ids=torch.tensor([all_ids[0][:8]], device=device), max_new_tokens=2,
                       do_sample=False, pad_token_id=pad)
    bar = tqdm(total=len(requests), desc=f"hf batch {batch_size}", unit="req", disable=not progress, leave=False)
    t0 = time.monotonic()
    for lo in range(0, len(requests), batch_size):
        if time.monotonic() >= deadline:
            break
        batch_run(list(range(lo, min(lo + batch_size, len(requests)))))
        bar.update(min(batch_size, len(requests) - lo))
    bar.close()
    duration = max(time.monotonic() - t0, 1e-9)
    return RunResult(f"hf-transformers (batch {batch_size})", LoadSpec(concurrency=batch_size), results,
                     len(requests) - len(results), duration)
