"""Offline throughput: Tandem's engine against transformers `generate` on the same model and prompts.

Run: `make bench` (or `.venv/bin/python -m bench.offline --help`). Builds a ~50M-parameter random
Llama with `make_tiny_model`, draws 64 prompts (32..512 tokens) with output lengths (16..256), and
measures output tokens/s for: transformers sequential (batch 1), transformers static padded batches
(left padding, each batch runs to its longest output), and Tandem (continuous batching, chunked
prefill). EOS is ignored everywhere so every system makes exactly the requested tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from training.tiny import make_tiny_model

MODEL_SHAPE = dict(hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=8, intermediate_size=2048,
                   vocab_size=8192, max_position_embeddings=2048)


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(32, 512))], rng.randint(16, 256))
            for _ in range(n)]


def run_tandem(path: Path, work, max_batched: int) -> float:
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=max_batched, max_num_seqs=256)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in work]
    llm.generate([work[0][0]], SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params)
    elapsed = time.perf_counter() - t0
    assert sum(len(o.token_ids) for o in outs) == sum(m for _, m in work)
    return elapsed


def hf_generate(model, prompts: list[list[int]], max_new: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only batching needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                       do_sample=False, pad_token_id=0)


def run_hf(path: Path, work, batch: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_generate(model, [work[0][0]], 2)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i : i + batch]
        hf_generate(model, [p for p, _ in chunk], max(m for _, m in chunk))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-sizes", default="1,8,16,32", help="comma list; 1 = sequential")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="bench/results/offline.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "bench-llama", "llama", **MODEL_SHAPE)
        params = sum(t.numel() for t in LLM(path, dtype="float32", device="cpu", num_kv_blocks=1)
                     .engine.runner.model.parameters())
        work = workload(args.num_prompts, args.seed, MODEL_SHAPE["vocab_size"])
        out_tokens = sum(m for _, m in work)
        results = {"tandem": out_tokens / run_tandem(path, work, args.max_num_batched_tokens)}
        print(f"tandem: {results['tandem']:.1f} output tok/s", flush=True)
        if not args.skip_hf:
            for b in (int(x) for x in args.hf_batch_sizes.split(",")):
                results[f"hf_batch{b}"] = out_tokens / run_hf(path, work, b)
                print(f"transformers batch {b}: {results[f'hf_batch{b}']:.1f} output tok/s", flush=True)
    best_hf = max((v for k, v in results.items() if k.startswith("hf")), default=None)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.platform()}",
        "torch": torch.__version__,
        "model_params": params,
        "num_prompts": args.num_prompts,
        "output_tokens": out_tokens,
        "tokens_per_s": results,
        "ratio_vs_best_hf": results["tandem"] / best_hf if best_hf else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
