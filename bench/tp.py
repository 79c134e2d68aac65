"""Tensor-parallel scaling: the same model and workload at 1, 2, 4, 8 ranks (NCCL on GPUs, gloo on CPU).

For each size it starts an engine (`LLM(..., tensor_parallel_size=n)`: rank 0 here, its followers as
processes) and measures, after a warm-up:

    load_s          engine start: the followers spawned, the group joined, each rank's shard loaded
    prefill_tok_s   prompt tokens/s of a batch of prompts with max_tokens=1 (compute-bound)
    decode_tok_s    output tokens/s of `--decode-seqs` sequences generating `--output-tokens` each
                    (bandwidth-bound: where splitting the weights over more devices pays on GPUs)
    step_ms         mean wall time of one decode step (decode time / steps)
    relay_ms_per_block  rank 0's KV relay: gather every rank's heads of one block into a whole page, and
                    scatter one back (engine/parallel/relay.py; what a TP worker adds to each KV transfer)

and checks that the greedy tokens at every size equal those at the first size (a correctness guard, not a
speed number). Sizes above the visible GPUs are skipped on CUDA.

    GPU:  .venv/bin/python -m bench.tp --model /path/to/llama --device cuda --dtype bfloat16 --sizes 1,2,4,8
    CPU:  OMP_NUM_THREADS=1 .venv/bin/python -m bench.tp --sizes 1,2     (a random ~50M Llama; gloo)

On a 2-core CPU box tensor parallelism cannot speed anything up (2 ranks share 2 cores with the rest); the
CPU run shows that it is correct and what the collectives cost. Writes bench/results/tp-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from engine import LLM, SamplingParams
from training.tiny import make_tiny_model

CPU_SHAPE = dict(hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=8, intermediate_size=2048,
                 vocab_size=8192, max_position_embeddings=2048)  # bench/offline.py's model


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def measure(model: str, size: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = LLM(model, device=args.device, dtype=args.dtype, tensor_parallel_size=size, block_size=16,
              max_num_batched_tokens=args.batched_tokens, num_kv_blocks=args.kv_blocks)
    load_s = time.perf_counter() - t0
    runner = llm.engine.runner
    try:
        llm.generate(_prompts(2, 16, vocab, 0), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        prompts = _prompts(args.prefill_seqs, args.prompt_tokens, vocab, 1)
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        prefill_s = time.perf_counter() - t0
        decode_prompts = _prompts(args.decode_seqs, 32, vocab, 2)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(decode_prompts, params)
        decode_s = time.perf_counter() - t0
        relay_ms = None
        if runner.staging is not None:
            n = min(32, runner.staging.num_blocks, runner.num_blocks)
            ids = list(range(n))
            t0 = time.perf_counter()
            for _ in range(3):
                runner.gather_kv(ids, ids)
                runner.scatter_kv(ids, ids)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            relay_ms = (time.perf_counter() - t0) / 3 / n * 1e3
        return {"tp": size, "load_s": round(load_s, 2),
                "prefill_tok_s": round(args.prefill_seqs * args.prompt_tokens / prefill_s, 1),
                "decode_tok_s": round(args.decode_seqs * args.output_tokens / decode_s, 1),
                "step_ms": round(decode_s / args.output_tokens * 1e3, 2),
                "relay_ms_per_block": round(relay_ms, 3) if relay_ms is not None else None,
                "tokens": [o.token_ids for o in outs]}
    finally:
        runner.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: a random ~50M Llama, written to a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sizes", default="1,2,4,8", help="tensor-parallel sizes to run, comma-separated")
    p.add_argument("--prefill-seqs", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-seqs", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--batched-tokens", type=int, default=2048)
    p.add_argument("--kv-blocks", type=int, default=1024)
    p.add_argument("--out", default=None, help="default: bench/results/tp-<cpu|cuda>.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.device.startswith("cuda"):
        sizes = [s for s in sizes if s <= torch.cuda.device_count()]
    model = args.model
    if model is None:
        model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="tandem-tp-bench-")), "llama", **CPU_SHAPE))  # type: ignore[arg-type]
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    results = []
    for size in sizes:
        r = measure(model, size, args, vocab)
        r["same_tokens_as_first"] = r["tokens"] == (results[0]["tokens"] if results else r["tokens"])
        results.append(r)
        print({k: v for k, v in r.items() if k != "tokens"}, flush=True)
    for r in results:
        del r["tokens"]
    out = Path(args.out or f"bench/results/tp-{'cuda' if args.device.startswith('cuda') else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": load,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "model": args.model or f"random llama {CPU_SHAPE}", "device": args.device, "dtype": args.dtype,
        "workload": {k: getattr(args, k) for k in ("prefill_seqs", "prompt_tokens", "decode_seqs", "output_tokens")},
        "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
