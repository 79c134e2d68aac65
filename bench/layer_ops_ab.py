"""The CPU forward and greedy sample with the references against the C++ layer kernels, in one process.

Run from the repository root: ``.venv/bin/python -m bench.layer_ops_ab [--batch 256] [--model NAME]
[--dequantize] [--rounds 6] [--reps 50] [--out PATH]`` (``--help``). One engine (bench.overhead's near-free model,
or ``--model``: a checkpoint, or a packaged name such as SmolLM2-135M-Instruct) decodes ``--batch``
sequences to a steady step; that one step's inputs are then run through ``runner._forward`` with the
ops bundle swapped, A = the references for the layer's small ops (TORCH_OPS plus the C++ attention,
the bundle "auto" chose before the layer kernels) and B = CPU_OPS, in A B B A rounds, on one thread's
CPU time; likewise the sampler with torch.argmax (A) and kernels.layer_ops_cpu.argmax_rows (B). The
sampler's tokens must be equal; the logits' largest difference is reported (the near-free model's must
be below 1e-5; a GGUF model kept quantized rounds activations to bfloat16 before its int4 matmuls, so
last-bit differences of RMSNorm's sum grow there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import engine.sampling.sampler as sampler_mod
from bench.overhead import engine_config, near_free_model, prompt
from engine.engine import Engine
from engine.sampling.params import SamplingParams
from kernels.ops import CPU_OPS, TORCH_OPS

OLD_OPS = TORCH_OPS._replace(paged_attention=CPU_OPS.paged_attention)


def per_call_ms(fn: Callable[[], Any], reps: int) -> float:
    t = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t) / reps * 1e3


def measure(path: str, batch: int, rounds: int, reps: int, dequantize: bool) -> dict[str, Any]:
    engine = Engine(dataclasses.replace(engine_config(Path(path), batch, "serial"), gguf_dequantize=dequantize))
    runner: Any = engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", prompt(i), params)
    for _ in range(4):
        engine.step()
    with torch.inference_mode():
        step = engine.schedule()
        assert step is not None
        input_ids, positions, ctx, rows = runner.prepare(step)
        sbatch = runner.sampling_batch(step.seqs)

        def forward(ops: Any) -> Callable[[], Any]:
            def run() -> Any:
                ctx.ops = ops
                return runner._forward(step, input_ids, positions, ctx, rows)

            return run

        def sample(argmax: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
            def run() -> Any:
                sampler_mod.argmax_rows = argmax
                return runner.sampler(logits_b, sbatch)

            return run

        logits_a, logits_b = forward(OLD_OPS)(), forward(CPU_OPS)()
        max_diff = (logits_a - logits_b).abs().max().item()
        new_argmax = sampler_mod.argmax_rows
        old = sample(lambda x: x.argmax(dim=-1))().token_ids
        assert torch.equal(sample(new_argmax)().token_ids, old)
        cases = {"forward": (forward(OLD_OPS), forward(CPU_OPS)),
                 "sample": (sample(lambda x: x.argmax(dim=-1)), sample(new_argmax))}  # fmt: skip
        times: dict[str, dict[str, list[float]]] = {k: {"A": [], "B": []} for k in cases}
        for _ in range(rounds):
            for name, (a, b) in cases.items():
                for label, fn in (("A", a), ("B", b), ("B", b), ("A", a)):
                    times[name][label].append(per_call_ms(fn, reps))
        sampler_mod.argmax_rows = new_argmax
    result: dict[str, Any] = {"max_logit_diff": max_diff}
    for name, t in times.items():
        a, b = sorted(t["A"])[len(t["A"]) // 2], sorted(t["B"])[len(t["B"]) // 2]
        result[name] = {"old_ms": a, "new_ms": b, "ratio": b / a, "old_all": t["A"], "new_all": t["B"]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", default=None, help="a checkpoint or packaged name (default: the near-free model)")
    ap.add_argument("--dequantize", action="store_true", help="a GGUF model's weights as float32 (gguf_dequantize)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            path = str(near_free_model(Path(tmp)))
        else:
            from engine.hub import resolve_model

            path = str(resolve_model(args.model).path)
        load_before = os.getloadavg()
        result = measure(path, args.batch, args.rounds, args.reps, args.dequantize)
    if args.model is None and result["max_logit_diff"] > 1e-5:
        raise SystemExit(f"the kernels' logits differ from the references' by {result['max_logit_diff']}")
    report = {"model": args.model or "near-free", "dequantize": args.dequantize, "batch": args.batch, "threads": torch.get_num_threads(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), **result}  # fmt: skip
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if not kk.endswith("_all")} if isinstance(v, dict) else v)
                      for k, v in report.items()}, indent=1))  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
