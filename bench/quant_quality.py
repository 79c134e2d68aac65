"""Quantization on CPU (issue 6): quality against the unquantized model, linear-weight memory, speed.

Run from the repository root: ``.venv/bin/python -m bench.quant_quality [--quick] [--out PATH]``.

Quality. Each model reads the same windows of held-out text (the demo model's held-out standard-library
files, training/demo.py ``stdlib_split``) once unquantized and once per variant, all in float32 so
only the quantization differs; reported: top-1 agreement and the mean per-token KL(unquantized ||
variant) in nats (training/quant_quality.py). Variants: int8, int4, fp8 weights; fp8 KV cache; int4 with
fp8 KV. Models: a random tiny model of each architecture (hidden 256, 4 layers, intermediate 768, so every
int4 layer has groups of 128), and the demo model (models/demo/teacher) when it exists, else the ~50M
random Llama of bench/offline.py (MODEL_SHAPE); the JSON says which.

Memory. Bytes of the decoder layers' projection weights (with scales and zero points) against the
16-bit model, in the float16 layout (ours) and the bfloat16 one (torch's packed CPU kernels).

Speed. Output tokens/s of greedy decoding (32-token prompts, 16 new tokens, prefill included) at batch
1 and 16 on the ~50M Llama, for each scheme in float32 (dequantize-and-matmul) and bfloat16 (torch's
packed int8/int4 kernels), against the dense model of the same dtype, over ``--rounds`` rounds that
each run every configuration once. The CPU is shared, so the best round (the least disturbed) is the
headline and the median is kept too. ``--parts`` picks what to run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__" and not __package__:
    raise SystemExit("run from the repository root as a module: python -m bench.quant_quality")

from bench.offline import MODEL_SHAPE  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.quant import linear_weight_bytes  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from training.demo import stdlib_split  # noqa: E402
from training.quant_quality import agreement  # noqa: E402
from training.tiny import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo" / "teacher"
TINY_SHAPE: dict[str, Any] = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                                   vocab_size=2048, max_position_embeddings=1024)
VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"quantization": "int8"}, "int4": {"quantization": "int4"}, "fp8": {"quantization": "fp8"},
    "fp8_kv": {"kv_cache_dtype": "fp8"}, "int4+fp8_kv": {"quantization": "int4", "kv_cache_dtype": "fp8"},
}
SCHEMES = ("int8", "int4", "fp8")


def text_windows(model: Path, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens from the middle of held-out stdlib files."""
    tok = Tokenizer.from_dir(model)
    windows: list[list[int]] = []
    for f in stdlib_split()[1]:
        ids = tok.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= 2 * length:
            windows.append(ids[len(ids) // 2 : len(ids) // 2 + length])
        if len(windows) == count:
            break
    return windows


def quality(model: Path, windows: list[list[int]]) -> dict[str, dict[str, float]]:
    blocks = 2 * (max(map(len, windows)) // 16 + 1)
    ref = LLM(model, device="cpu", dtype="float32", num_kv_blocks=blocks).engine.runner
    out = {}
    for name, kw in VARIANTS.items():
        runner = LLM(model, device="cpu", dtype="float32", num_kv_blocks=blocks, **kw).engine.runner
        a = agreement(ref, runner, windows)
        out[name] = {"top1": a.top1, "mean_kl": a.mean_kl, "tokens": a.num_tokens}
        print(f"  {name:12s} top-1 {a.top1:.4f}  KL {a.mean_kl:.5f} nats  ({a.num_tokens} tokens)", flush=True)
    return out


def memory(model: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dtype in ("float16", "bfloat16"):
        dense = linear_weight_bytes(LLM(model, device="cpu", dtype=dtype, num_kv_blocks=1).engine.runner.model)
        row: dict[str, Any] = {"dense_bytes": dense}
        for s in SCHEMES:
            q = linear_weight_bytes(LLM(model, device="cpu", dtype=dtype, num_kv_blocks=1, quantization=s)
                                    .engine.runner.model)
            row[s] = {"bytes": q, "ratio": q / dense}
        out[dtype] = row
        print(f"  {dtype}: " + ", ".join(f"{s} {row[s]['ratio']:.4f}" for s in SCHEMES), flush=True)
    return out


def decode_speed(model: Path, batches: list[int], rounds: int, new_tokens: int) -> dict[str, Any]:
    rng = random.Random(0)
    configs = [(dt, s) for dt in ("float32", "bfloat16") for s in (None, *SCHEMES)]
    llms = {c: LLM(model, device="cpu", dtype=c[0], quantization=c[1], num_kv_blocks=512, max_num_seqs=64)
            for c in configs}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for llm in llms.values():
        llm.generate([[5] * 32], SamplingParams(max_tokens=2))  # warm-up
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):  # every config once per round, so load swings hit them all alike
        for b in batches:
            prompts = [[rng.randrange(3, MODEL_SHAPE["vocab_size"]) for _ in range(32)] for _ in range(b)]
            for (dt, s), llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(prompts, params)
                runs.setdefault(f"{dt}/{s or 'dense'}/batch{b}", []).append(
                    b * new_tokens / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in runs.items()}
    out: dict[str, Any] = {"tokens_per_s_best": best, "tokens_per_s_median": median, "tokens_per_s_runs": runs,
                           "vs_dense_best": {}, "vs_dense_median": {}}
    for key in best:
        dtype_name, _, batch_name = key.split("/")
        base = f"{dtype_name}/dense/{batch_name}"
        out["vs_dense_best"][key] = best[key] / best[base]
        out["vs_dense_median"][key] = median[key] / median[base]
        print(f"  {key:28s} best {best[key]:7.1f} tok/s x{out['vs_dense_best'][key]:.2f}, median "
              f"{median[key]:7.1f} x{out['vs_dense_median'][key]:.2f} vs dense {dtype_name}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="text windows per model")
    ap.add_argument("--window-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7, help="speed: rounds (best and median reported)")
    ap.add_argument("--parts", default="quality,speed", help="comma list of quality (and memory), speed")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="2 short windows, one tiny arch, batch 1, 1 round")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quant_quality.json"))
    args = ap.parse_args()
    if args.quick:
        args.windows, args.window_tokens, args.rounds, args.new_tokens = 2, 64, 1, 4
    archs = ("llama",) if args.quick else ("llama", "mistral", "qwen2", "qwen3")
    record: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.platform()}",
        "torch": torch.__version__, "args": vars(args), "quality": {}, "memory": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        big = make_tiny_model(Path(tmp) / "llama-50m", "llama", **MODEL_SHAPE)  # type: ignore[arg-type]
        models = {f"tiny-{a}": make_tiny_model(Path(tmp) / a, a, **TINY_SHAPE) for a in archs}
        if (DEMO / "model.safetensors").exists():  # copied: the trainer may rewrite it while we read
            demo = Path(shutil.copytree(DEMO, Path(tmp) / "demo", ignore=shutil.ignore_patterns("_*")))
            models["demo-teacher"] = demo
            record["demo_model"] = {"path": str(DEMO), "mtime": datetime.fromtimestamp(
                (DEMO / "model.safetensors").stat().st_mtime, UTC).isoformat(timespec="seconds")}
        else:
            models["random-llama-50m (no demo model yet)"] = big
        for name, path in models.items() if "quality" in args.parts else ():
            print(f"quality: {name}", flush=True)
            record["quality"][name] = quality(path, text_windows(path, args.windows, args.window_tokens))
            print(f"memory: {name}", flush=True)
            record["memory"][name] = memory(path)
        if "quality" in args.parts:
            print("memory: llama-50m", flush=True)
            record["memory"]["llama-50m"] = memory(big)
        if "speed" in args.parts:
            print("speed: llama-50m", flush=True)
            batches = [1] if args.quick else [1, 16]
            record["speed_llama_50m"] = decode_speed(big, batches, args.rounds, args.new_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
