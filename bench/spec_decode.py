"""Speculative decoding on CPU: output tokens/s with and without it, at batch 1 and batch 32.

Run: `.venv/bin/python -m bench.spec_decode` (`--help` for options). Uses the demo pair
(models/demo/teacher verifies, models/demo/draft proposes) when both exist, else a tiny random pair
(a 4-layer target; the draft is its first layer with noise on its weights) and says so. Prompts
are held-out standard-library files (the demo model never trained on them), `--prompt-len` tokens each.

For each batch size, every configuration runs on its own engine, side by side: off (no speculation),
n-gram lookup and the draft model, each with the adaptive policy and with a fixed k (adaptive off,
to show what the policy avoids). Each is warmed up once (the adaptive policy learns its costs
then), then timed `--repeats` times: each unit of work (one request at batch 1, the 32 requests at
batch 32) runs under every configuration back to back, in alternating order, and the speedup is the
median over units of the ratio to off (with its interquartile range in the JSON); tok/s is over
all units. Greedy, EOS ignored, so every configuration produces exactly the same tokens (checked).

Acceptance beside every speedup: acc = accepted / proposed draft tokens, len = draft tokens
accepted per verification (0..k), tok/fwd = output tokens per target forward for speculating
sequences (len + 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from engine import LLM, SamplingParams
from engine.tokenizer import Tokenizer

DEMO = Path("models/demo")


def tiny_pair(out: Path) -> tuple[Path, Path]:
    """A random 4-layer target; the draft is its first layer with noise (same tokenizer by construction)."""
    from safetensors.torch import load_file, save_file

    from training.tiny import make_tiny_model

    target = make_tiny_model(out / "target", "llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                             intermediate_size=768, vocab_size=4096)
    draft = out / "draft"
    draft.mkdir(parents=True, exist_ok=True)
    for f in target.iterdir():
        if f.suffix != ".safetensors":
            (draft / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((target / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    g = torch.Generator().manual_seed(0)
    weights = {k: v + torch.randn(v.shape, generator=g) * v.std() * 0.02
               for k, v in load_file(target / "model.safetensors").items() if ".layers." not in k or ".layers.0." in k}
    save_file(weights, draft / "model.safetensors")
    return target, draft


def stdlib_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens from held-out standard-library files: a third into each
    file first, then two thirds into each, and so on, until there are enough."""
    from training.demo import stdlib_split

    _, held_out = stdlib_split()
    texts = [tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
             for f in held_out]
    texts = [ids for ids in texts if len(ids) >= 4 * length]
    prompts: list[list[int]] = []
    for frac in (1 / 3, 2 / 3, 1 / 6, 1 / 2, 5 / 6):
        for ids in texts:
            start = int(len(ids) * frac)
            prompts.append(ids[start : start + length])
            if len(prompts) == count:
                return prompts
    raise RuntimeError(f"only {len(prompts)} prompts of {length} tokens in the held-out files; lower --prompt-len")


def run_once(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list]:
    """Generate for `prompts` as one batch; (seconds, outputs)."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="target checkpoint (default: models/demo/teacher)")
    ap.add_argument("--draft", default=None, help="draft checkpoint (default: models/demo/draft)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batch1-prompts", type=int, default=4, help="requests run one at a time at batch 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: unseeded sampling (the draft's rejection rule); outputs then differ by configuration")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: steadiest on a shared machine; 0: torch's default)")
    ap.add_argument("--out", default="bench/results/spec_decode.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = "demo"
    if args.target and args.draft:
        target, draft = Path(args.target), Path(args.draft)
        pair = "given"
    elif (DEMO / "teacher" / "config.json").exists() and (DEMO / "draft" / "config.json").exists():
        target, draft = DEMO / "teacher", DEMO / "draft"
    else:
        target, draft = tiny_pair(Path(tempfile.mkdtemp(prefix="spec-bench-")))
        pair = "tiny random pair (the demo pair is not there yet)"
    print(f"target {target}, draft {draft} ({pair}); threads {torch.get_num_threads()}", flush=True)
    tok = Tokenizer.from_dir(target)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True)
    # a pool for 64 sequences of 1024 tokens, not the 2 GiB default: four engines live side by side
    base = dict(device="cpu", dtype="float32", max_num_seqs=64, max_num_batched_tokens=2048, num_kv_blocks=4096)
    configs: dict[str, dict[str, Any]] = {
        "off": {},
        "ngram": {"speculative_method": "ngram", "num_speculative_tokens": args.k},
        "draft": {"speculative_model": str(draft), "num_speculative_tokens": args.k},
        "ngram, fixed k": {"speculative_method": "ngram", "num_speculative_tokens": args.k,
                           "speculative_adaptive": False},
        "draft, fixed k": {"speculative_model": str(draft), "num_speculative_tokens": args.k,
                           "speculative_adaptive": False},
    }
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = stdlib_prompts(tok, args.batch1_prompts if batch == 1 else batch, args.prompt_len)
        engines = {name: LLM(target, **base, **cfg) for name, cfg in configs.items()}
        units = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        tokens: dict[str, list[list[int]]] = {}
        for name, llm in engines.items():  # warm-up: the adaptive policy measures its costs here
            tokens[name] = [o.token_ids for u in units for o in run_once(llm, u, params)[1]]
        # every unit (a batch of prompts) runs under every configuration back to back, in alternating
        # order: the ratio to "off" within a unit is what the machine's changing load disturbs least
        times: dict[str, list[float]] = {name: [] for name in configs}
        for r in range(args.repeats):
            for j, unit in enumerate(units):
                order = list(engines) if (r + j) % 2 == 0 else list(reversed(engines))
                for name in order:
                    seconds, outs = run_once(engines[name], unit, params)
                    times[name].append(seconds)
                    if args.temperature == 0:
                        want = tokens["off"][j * batch : j * batch + len(unit)]
                        assert [o.token_ids for o in outs] == want, f"{name} changed the greedy output"
        n_tokens = sum(len(t) for t in tokens["off"])
        for name, llm in engines.items():
            s = llm.engine.stats()
            drafted, accepted, steps = (s.get("spec_draft_tokens", 0), s.get("spec_accepted_tokens", 0),
                                        s.get("spec_steps", 0))
            ratios = sorted(o / t for o, t in zip(times["off"], times[name], strict=True))
            total = sum(times[name]) / args.repeats  # seconds for all prompts, per repeat
            rows.append({
                "batch": batch, "method": name, "tokens": n_tokens, "seconds": total, "tok_per_s": n_tokens / total,
                "speedup": statistics.median(ratios),
                "speedup_iqr": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
                "acceptance_rate": accepted / drafted if drafted else None,
                "mean_accepted_length": accepted / steps if steps else None,
                "spec_steps": steps, "draft_tokens": drafted, "accepted_tokens": accepted,
                "unit_seconds": times[name],
            })
    print(f"\n{'batch':>5} {'method':<15} {'tok/s':>8} {'speedup':>8} {'acc':>6} {'len':>5} {'tok/fwd':>7}")
    for row in rows:
        acc = f"{row['acceptance_rate']:.2f}" if row["acceptance_rate"] is not None else "-"
        ln = f"{row['mean_accepted_length']:.2f}" if row["mean_accepted_length"] is not None else "-"
        tf = f"{row['mean_accepted_length'] + 1:.2f}" if row["mean_accepted_length"] is not None else "-"
        print(f"{row['batch']:>5} {row['method']:<15} {row['tok_per_s']:>8.1f} {row['speedup']:>7.2f}x "
              f"{acc:>6} {ln:>5} {tf:>7}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "target": str(target), "draft": str(draft), "pair": pair, "k": args.k, "max_tokens": args.max_tokens,
        "prompt_len": args.prompt_len, "repeats": args.repeats, "temperature": args.temperature, "rows": rows,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
