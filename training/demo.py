"""`make demo-model`: train a small Python-code teacher on this machine's standard library, distill its
draft, and measure both on held-out files.

    python -m training.demo --out models/demo

writes `OUT/teacher` and `OUT/draft` (Hugging Face checkpoints, float16, the same byte-level BPE
tokenizer trained on the standard library as `make_tiny_model`'s) and `OUT/metrics.json` (shapes,
losses, times, greedy agreement and k=4 speculative acceptance against a random draft, sample
completions). The split is by file: a fixed 1 in 20 of the non-test library modules (by CRC-32 of the
path) is held out; everything else, the test suite included, is training text.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_hf_config
from engine.llm import LLM
from engine.sampling.params import SamplingParams
from engine.tokenizer import Tokenizer
from training.config import TrainConfig
from training.data import tokenize_files
from training.distill import StudentShape, distill, init_student, train_lm
from training.draft_eval import greedy_agreement, mean_loss, speculative_acceptance
from training.loop import STATE_FILE
from training.model import TrainableLM
from training.tiny import make_tiny_model

logger = logging.getLogger(__name__)

# Folders that are data rather than code (encoding tables, pydoc's text dump) or not the stdlib.
_SKIP_DIRS = frozenset({"site-packages", "encodings", "pydoc_data", "__pycache__"})
_HELD_OUT_MOD = 20
# No trailing newline: the byte-level pre-tokenizer merges a newline with the next line's indentation,
# so a prompt ending in a bare "\n" tells the model the next line is not indented.
SAMPLE_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):",
    "import os\n\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
    "    def __repr__(self):",
)


@dataclass(frozen=True)
class DemoShape:
    """The demo pair's sizes (teacher; the draft is the same width with `draft_layers`)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 768
    seq_len: int = 512
    draft_layers: int = 1


def stdlib_split(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the standard library's .py sources, each sorted.

    Held out: non-test modules whose relative path's CRC-32 is 0 mod 20. Raises RuntimeError if the
    library sources are missing.
    """
    root = root or Path(sysconfig.get_path("stdlib"))
    train, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]):
            continue
        is_test = bool({"test", "tests", "idle_test"} & set(rel.parts[:-1]))
        if not is_test and zlib.crc32(rel.as_posix().encode()) % _HELD_OUT_MOD == 0:
            held_out.append(path)
        else:
            train.append(path)
    if len(train) < 50 or not held_out:
        raise RuntimeError(f"too few Python sources under {root} for the demo model")
    return train, held_out


def _prompts(files: list[Path], tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """Up to `count` prompts of `length` tokens, one from the middle of each held-out file."""
    prompts = []
    for f in files:
        ids = tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= 2 * length:
            mid = len(ids) // 2
            prompts.append(ids[mid : mid + length])
        if len(prompts) == count:
            break
    return prompts


def _samples(model_dir: Path, max_tokens: int = 48) -> dict[str, str]:
    """Greedy completions of SAMPLE_PROMPTS through the serving engine."""
    llm = LLM(str(model_dir), dtype="float32", device="cpu", num_kv_blocks=256)
    outs = llm.generate(list(SAMPLE_PROMPTS), SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return {p: o.text for p, o in zip(SAMPLE_PROMPTS, outs, strict=True)}


def evaluate(teacher_dir: Path, draft_dir: Path, held_out: list[Path], seq_len: int, seed: int) -> dict[str, Any]:
    """Held-out losses of teacher and draft, and the draft against a random-initialised one of its shape."""
    tokenizer = Tokenizer.from_dir(teacher_dir)
    tokens = tokenize_files(held_out, tokenizer)
    teacher, draft = TrainableLM.from_pretrained(teacher_dir), TrainableLM.from_pretrained(draft_dir)
    random_draft = TrainableLM(draft.hf_config)
    random_draft.init_weights(seed + 1)
    undistilled = init_student(teacher, draft.hf_config, seed)  # the draft's starting point
    prompts = _prompts(held_out, tokenizer, count=24, length=32)
    counts = torch.bincount(tokens, minlength=teacher.cfg.vocab_size).double()
    probs = counts[counts > 0] / counts.sum()
    report: dict[str, Any] = {"held_out_files": len(held_out), "held_out_tokens": tokens.numel(),
                              "uniform_loss": math.log(teacher.cfg.vocab_size),
                              "held_out_unigram_entropy": float(-(probs * probs.log()).sum()),
                              "acceptance_prompts": len(prompts), "acceptance_max_new_tokens": 64}
    started = time.perf_counter()
    models = (("teacher", teacher), ("draft", draft), ("random_draft", random_draft),
              ("undistilled_draft", undistilled))
    for name, model in models:
        report[f"{name}_loss"] = mean_loss(model, tokens, seq_len)
        if name != "teacher":
            report[f"{name}_greedy_agreement"] = greedy_agreement(teacher, model, tokens, seq_len)
            stats = speculative_acceptance(teacher, model, prompts, k=4, max_new_tokens=64)
            report[f"{name}_k4"] = {**asdict(stats), "mean_accepted_length": stats.mean_accepted_length,
                                    "tokens_per_step": stats.tokens_per_step,
                                    "acceptance_rate": stats.acceptance_rate}
        logger.info("evaluated %s: %s", name, {k: v for k, v in report.items() if k.startswith(name)})
    report["eval_seconds"] = time.perf_counter() - started
    return report


def build(out: Path, shape: DemoShape, teacher_steps: int, draft_steps: int, seed: int) -> dict[str, Any]:
    """Train the teacher, distill the draft, evaluate; return the metrics (also written to metrics.json)."""
    train_files, _ = stdlib_split()
    teacher_dir, draft_dir = out / "teacher", out / "draft"
    metrics: dict[str, Any] = {"shape": asdict(shape), "train_files": len(train_files), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        # Only for its config.json and stdlib-trained tokenizer; the weights are re-initialised below.
        make_tiny_model(tmp, "llama", hidden_size=shape.hidden_size, num_layers=shape.layers,
                        num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                        intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                        max_position_embeddings=shape.seq_len, tie_word_embeddings=True, seed=seed)
        tokens = tokenize_files(train_files, Tokenizer.from_dir(tmp))
        metrics["train_tokens"] = tokens.numel()
        teacher = TrainableLM(load_hf_config(tmp))
        teacher.init_weights(seed)
        cfg = TrainConfig(steps=teacher_steps, batch_size=8, seq_len=shape.seq_len, lr=2e-3, warmup_steps=100,
                          seed=seed, save_every=100, bf16=True, save_dtype="float16")
        result = train_lm(teacher, teacher_dir, tokens, cfg, tokenizer_src_dir=tmp)
    metrics["teacher"] = {"parameters": teacher.num_parameters, "steps": result.step, "seconds": result.seconds,
                          "tokens_per_second": result.tokens_per_second, "config": asdict(cfg),
                          "final_train_loss": sum(result.losses[-50:]) / len(result.losses[-50:])}
    dcfg = TrainConfig(steps=draft_steps, batch_size=8, seq_len=shape.seq_len, lr=2e-3, warmup_steps=50,
                       seed=seed, save_every=100, bf16=True, save_dtype="float16")
    result = distill(teacher_dir, draft_dir, tokens, StudentShape(layers=shape.draft_layers), dcfg)
    metrics["draft"] = {"steps": result.step, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                        "config": asdict(dcfg), "first_kl": result.losses[0],
                        "final_train_kl": sum(result.losses[-50:]) / len(result.losses[-50:])}
    for d in (teacher_dir, draft_dir):
        (d / STATE_FILE).unlink(missing_ok=True)  # optimizer state: large, and not part of the model
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return measure(out, shape, seed)


def measure(out: Path, shape: DemoShape, seed: int) -> dict[str, Any]:
    """(Re)compute the "eval" and "samples" entries of OUT/metrics.json (created if missing); return it."""
    path = out / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {"shape": asdict(shape)}
    teacher_dir, draft_dir = out / "teacher", out / "draft"
    metrics["eval"] = evaluate(teacher_dir, draft_dir, stdlib_split()[1], shape.seq_len, seed)
    metrics["samples"] = {"teacher": _samples(teacher_dir), "draft": _samples(draft_dir)}
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="output folder (default models/demo)")
    parser.add_argument("--teacher-steps", type=int, default=900)
    parser.add_argument("--draft-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--eval-only", action="store_true",
                        help="re-measure an existing pair in --out (rewrites metrics.json's eval and samples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shape = DemoShape()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        metrics = measure(args.out, shape, args.seed)
    else:
        for d in (args.out / "teacher", args.out / "draft"):
            (d / STATE_FILE).unlink(missing_ok=True)  # `make demo-model` always starts over
        metrics = build(args.out, shape, args.teacher_steps, args.draft_steps, args.seed)
    json.dump(metrics, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
