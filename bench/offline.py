"""Offline throughput: Tandem's engine against transformers `generate` on the same model and prompts.

Run: `make bench` (or `.venv/bin/python -m bench.offline --help`). By default builds a ~50M-parameter
random Llama with `make_tiny_model`, draws 64 prompts (32..512 random token ids) with output lengths
(16..256), and measures output tokens/s for: transformers sequential (batch 1), transformers static
padded batches (left padding, each batch runs to its longest output), and Tandem (continuous batching,
chunked prefill). EOS is ignored everywhere so every system makes exactly the requested tokens.

`--model` runs any checkpoint instead: a directory, a `.gguf` file, a packaged name such as
`SmolLM2-135M-Instruct` or a Hugging Face id (engine.hub.resolve_model); its prompts are then real
text, windows of 32..512 tokens of held-out standard-library files in the model's own tokenizer, and
`--output-len` fixes every output's length. A GGUF file is loaded into transformers through its own
GGUF reader (dequantized to float32, as Tandem loads it).
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


def text_workload(path: Path, n: int, seed: int, output_len: int | None) -> list[tuple[list[int], int]]:
    """n windows of 32..512 tokens from held-out standard-library files, in `path`'s tokenizer."""
    from engine.tokenizer import Tokenizer
    from training.demo import stdlib_split

    tok = Tokenizer.from_dir(path)
    rng = random.Random(seed)
    _, held_out = stdlib_split()
    files = sorted(held_out)
    rng.shuffle(files)
    texts = [tok.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False) for f in files]
    work: list[tuple[list[int], int]] = []
    for _ in range(4):  # a window of each file in turn, until there are n
        for ids in texts:
            length = rng.randint(32, 512)
            if len(ids) < length:
                continue
            start = rng.randrange(0, len(ids) - length + 1)
            work.append((ids[start : start + length], output_len or rng.randint(16, 256)))
            if len(work) == n:
                return work
    raise RuntimeError(f"only {len(work)} windows of the held-out files for {n} prompts")


def load_hf(path: Path, device: str = "cpu", dtype: str = "float32"):
    """A transformers model of `path` (a directory, or a .gguf file through its GGUF reader) on `device`
    in `dtype`."""
    import transformers

    if path.suffix != ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items()
                                                                        if k != "model_type"}))
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.to(device, getattr(torch, dtype)).eval()


def run_tandem(path: Path, work, max_batched: int, floor: dict | None = None, onednn_linear: bool = True,
               device: str = "cpu", dtype: str = "float32") -> float:
    """Seconds Tandem takes for `work`; with `floor` (a dict), the run's floor (bench.floor) is added
    to it, measured right after the run on the same engine and steps. `onednn_linear`: the engine
    option (oneDNN for the wide float32 linears; False: F.linear everywhere)."""
    # a .gguf dequantized (to float32 on the CPU), as transformers loads it (and bench.floor times float weights)
    llm = LLM(path, dtype=dtype, device=device, max_num_batched_tokens=max_batched, max_num_seqs=256,
              gguf_dequantize=True, onednn_linear=onednn_linear)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in work]
    llm.generate([work[0][0]], SamplingParams(max_tokens=2))  # warm-up
    recorder = None
    if floor is not None:
        from bench.floor import StepRecorder

        recorder = StepRecorder()
        recorder.attach(llm.engine)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params)
    elapsed = time.perf_counter() - t0
    assert sum(len(o.token_ids) for o in outs) == sum(m for _, m in work)
    if floor is not None and recorder is not None:
        from bench.floor import floor as measure_floor

        floor.update(measure_floor(llm.engine, recorder.steps), run_s=elapsed)
        floor["run_over_floor"] = elapsed / floor["floor_s"]
    return elapsed


def hf_generate(model, prompts: list[list[int]], max_new: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only batching needs
        ids[i, width - len(p):] = torch.tensor(p, device=model.device)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                       do_sample=False, pad_token_id=0)


def run_hf(path: Path, work, batch: int, device: str = "cpu", dtype: str = "float32") -> float:
    model = load_hf(path, device, dtype)
    hf_generate(model, [work[0][0]], 2)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i : i + batch]
        hf_generate(model, [p for p, _ in chunk], max(m for _, m in chunk))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint (directory, .gguf, packaged name or Hugging "
                    "Face id) with real-text prompts; default: a random 50M Llama with random prompts")
    ap.add_argument("--output-len", type=int, default=None, help="every output's length (default 16..256)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-sizes", default="1,8,16,32", help="comma list; 1 = sequential")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--floor", action="store_true", help="also measure the Tandem run's floor (bench.floor)")
    ap.add_argument("--no-onednn-linear", action="store_true",
                    help="F.linear for every float32 layer (the engine's --no-onednn-linear), for A/B runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: Tandem and transformers on the same device")
    ap.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA (both systems)")
    ap.add_argument("--out", default="bench/results/offline.json")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.floor and args.device != "cpu":
        ap.error("--floor times CPU matmuls: it runs with --device cpu only")
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            path = make_tiny_model(Path(tmp) / "bench-llama", "llama", **MODEL_SHAPE)
        else:
            from engine.hub import resolve_model

            path = resolve_model(args.model).path
        params = sum(t.numel() for t in LLM(path, dtype="float32", device="cpu", num_kv_blocks=1, gguf_dequantize=True)
                     .engine.runner.model.parameters())
        if args.model is None:
            work = workload(args.num_prompts, args.seed, MODEL_SHAPE["vocab_size"])
        else:
            work = text_workload(path, args.num_prompts, args.seed, args.output_len)
        out_tokens = sum(m for _, m in work)
        floor: dict | None = {} if args.floor else None
        results = {"tandem": out_tokens / run_tandem(path, work, args.max_num_batched_tokens, floor,
                                                     onednn_linear=not args.no_onednn_linear,
                                                     device=args.device, dtype=dtype)}
        if floor:
            print(f"floor: {floor['floor_s']:.1f} s (matmuls {floor['matmul_s']:.1f} s, KV reads "
                  f"{floor['kv_read_s']:.2f} s); the run is {floor['run_over_floor']:.2f}x it", flush=True)
        print(f"tandem: {results['tandem']:.1f} output tok/s", flush=True)
        if not args.skip_hf:
            for b in (int(x) for x in args.hf_batch_sizes.split(",")):
                results[f"hf_batch{b}"] = out_tokens / run_hf(path, work, b, args.device, dtype)
                print(f"transformers batch {b}: {results[f'hf_batch{b}']:.1f} output tok/s", flush=True)
    best_hf = max((v for k, v in results.items() if k.startswith("hf")), default=None)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.platform()}",
        "device": args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()})",
        "dtype": dtype,
        "torch": torch.__version__,
        "model": args.model or "random llama " + json.dumps(MODEL_SHAPE),
        "model_params": params,
        "num_prompts": args.num_prompts,
        "output_tokens": out_tokens,
        "tokens_per_s": results,
        "ratio_vs_best_hf": results["tandem"] / best_hf if best_hf else None,
        "floor": floor,
        "onednn_linear": not args.no_onednn_linear,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
