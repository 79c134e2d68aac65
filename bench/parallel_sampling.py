"""Parallel sampling: one request with n = 4 against four separate requests, on a real local stack.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m bench.parallel_sampling` (a few minutes on CPU). A stack
(gateway, 1 prefill + 1 decode worker, every prompt's KV shipped: --local-prefill-threshold 0, or
--co-located for a decode worker that prefills itself) serves P prompts of L tokens twice over:

  * n=4:       P requests at once, each with n = 4 and its own seed;
  * separate:  4P requests at once, n = 1, choice j of prompt i seeded with sibling_seed(seed_i, j),
               so both runs generate exactly the same tokens (checked).

Every timed run gets prompts no earlier run has seen (a prompt seen before would be a prefix-cache
hit); within a run, a separate request may hit the prefix cache of its prompt's first copy, as it
would in production. An untimed pair of runs on the same prompts first checks that both modes
generate exactly the same tokens. The modes alternate `--repeats` times; reported are the medians of
wall time, output tokens per second, the mean time to each choice's first token, and the prefill time
the workers reported (Timing.prefill_ns summed over requests).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import torch

from cli.launcher import Stack
from engine.sampling.seeds import sibling_seed
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from training.tiny import make_tiny_model

SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536,
             vocab_size=8192, max_position_embeddings=4096)
N = 4


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 8000, (n,), generator=g).tolist()


def one(stub: generation_pb2_grpc.GenerationStub, ids: list[int], n: int, seed: int, max_tokens: int
        ) -> tuple[dict[int, list[int]], list[float], int]:
    """(tokens per choice, seconds to each choice's first token, prefill_ns)"""
    t0 = time.perf_counter()
    tokens: dict[int, list[int]] = {}
    first: dict[int, float] = {}
    last = gen.GenerateResponse()
    for m in stub.Generate(gen.GenerateRequest(prompt_token_ids=ids, sampling=gen.SamplingParams(
            n=n, seed=seed, temperature=0.8, max_tokens=max_tokens, ignore_eos=True)), timeout=600):
        first.setdefault(m.index, time.perf_counter() - t0)
        tokens.setdefault(m.index, []).extend(m.token_ids)
        last = m
    return tokens, list(first.values()), last.timing.prefill_ns


def run(stub: generation_pb2_grpc.GenerationStub, prompts: list[list[int]], separate: bool, max_tokens: int
        ) -> dict:
    jobs = ([(p, 1, sibling_seed(1000 + i, j), (i, j)) for i, p in enumerate(prompts) for j in range(N)] if separate
            else [(p, N, 1000 + i, (i, None)) for i, p in enumerate(prompts)])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: one(stub, job[0], job[1], job[2], max_tokens), jobs))
    wall = time.perf_counter() - t0
    outputs: dict[tuple[int, int], list[int]] = {}
    for (_, _, _, (i, j)), (tokens, _, _) in zip(jobs, results, strict=True):
        for index, toks in tokens.items():
            outputs[(i, j if j is not None else index)] = toks
    made = sum(len(t) for t in outputs.values())
    return {"wall_s": wall, "output_tokens": made, "output_tok_per_s": made / wall, "requests": len(jobs),
            "ttft_mean_s": statistics.mean(t for _, ts, _ in results for t in ts),
            "prefill_s": sum(ns for _, _, ns in results) / 1e9, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="P: prompts per run")
    ap.add_argument("--prompt-len", type=int, default=512, help="L: tokens per prompt")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per choice (EOS ignored)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--co-located", action="store_true", help="no prefill worker: the decode worker prefills")
    ap.add_argument("--out", default="bench/results/parallel_sampling.json")
    args = ap.parse_args()
    prompts = [prompt(args.prompt_len, 1 + i) for i in range(args.prompts)]
    engine = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "4096", "--max-num-batched-tokens", "512"]
    runs: dict[str, list[dict]] = {"n=4": [], "separate": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "bench-llama", "llama", **SHAPE)
        with Stack(model, prefill_workers=0 if args.co_located else 1, engine_args=engine,
                   gateway_args=["--local-prefill-threshold", "0"]) as stack:
            stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.address))
            check = [p[:64] for p in prompts[:2]]
            same = run(stub, check, False, 8)["outputs"] == run(stub, check, True, 8)["outputs"]
            assert same, "n=4 and the separate requests generated different tokens"
            for r in range(args.repeats):
                for k, mode in enumerate(("n=4", "separate") if r % 2 == 0 else ("separate", "n=4")):
                    shift = 997 * (2 * r + k + 1)  # prompts no earlier run has seen: no prefix-cache hit
                    fresh = [[(t + shift) % 7990 + 3 for t in p] for p in prompts]
                    runs[mode].append(run(stub, fresh, mode == "separate", args.max_tokens))
    summary = {mode: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "output_tok_per_s",
                                                                      "ttft_mean_s", "prefill_s")}
               | {"requests": rs[0]["requests"], "output_tokens": rs[0]["output_tokens"]}
               for mode, rs in runs.items()}
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": "python -m bench.parallel_sampling " + " ".join(
                  f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                  for k, v in vars(args).items() if k != "out" and v is not False),
              "model": SHAPE, "prompts": args.prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "stack": "0p1d (co-located)" if args.co_located else "1p1d (every prompt's KV shipped)",
              "summary": summary,
              "runs": {m: [{k: v for k, v in r.items() if k != "outputs"} for r in rs] for m, rs in runs.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"{'mode':<10}{'requests':>9}{'wall s':>9}{'out tok/s':>11}{'TTFT ms':>9}{'prefill s':>11}")
    for mode, s in summary.items():
        print(f"{mode:<10}{s['requests']:>9}{s['wall_s']:>9.2f}{s['output_tok_per_s']:>11.1f}"
              f"{s['ttft_mean_s'] * 1e3:>9.0f}{s['prefill_s']:>11.2f}")
    ratio = summary["n=4"]["output_tok_per_s"] / summary["separate"]["output_tok_per_s"]
    print(f"n=4 / separate throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
