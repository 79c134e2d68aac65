"""Engine host overhead: output tokens/s and milliseconds per decode step against batch size, with a
near-free model (1 layer, hidden 32, vocab 512), so nearly all of a step is the engine's own host work.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m bench.overhead` (`--help`). For each batch size B, B requests
(16-token prompts, EOS ignored) run on one `EngineLoop`, as a worker runs them, with text
(detokenization) on, made where the loop makes it by default (`--text`: on the CPU the engine thread,
right after each step); after `--warmup` decode steps the next `--steps` are timed from the loop's own
per-step observer (the wall time between the ends of consecutive steps, so everything the loop does
per step counts), and so is the process's CPU time over them (every thread: engine, text, forward),
which another process's load on a shared box inflates far less than the wall time. It also reports
the text lag, from the end of each step to the emission of its last output: a text thread that falls
behind the engine shows there, never in ms/step. `--modes` runs the same sizes with the overlap on and off (`serial` sets
`async_scheduling=False`); a build without that option runs `serial` only. `--repeats N` runs each size
and mode N times and keeps the median run (a shared box's single runs can be bimodal). `--profile B` adds a
cProfile of B's timed steps on the engine thread (top functions by own time); `--phases B` the CPU
time of each phase of B's step, all on one thread (`phases`).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import platform
import pstats
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop, Request
from engine.sampling.params import SamplingParams

SHAPE = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64, vocab_size=512,
             max_position_embeddings=4096)
PROMPT_LEN = 16


def near_free_model(out: Path) -> Path:
    from training.tiny import make_tiny_model

    return make_tiny_model(out / "near-free", "llama", **SHAPE)


def engine_config(path: Path, batch: int, mode: str, device: str = "cpu", dtype: str = "float32",
                  eager: bool = False) -> EngineConfig:
    cfg = EngineConfig(model=str(path), dtype=dtype, device=device, max_num_seqs=batch,
                       max_num_batched_tokens=max(2048, batch * PROMPT_LEN), num_kv_blocks=batch * 8 + 8)
    if eager:  # no CUDA graphs (a build without them has no such option)
        cfg = dataclasses.replace(cfg, enforce_eager=True)
    if "async_scheduling" in {f.name for f in dataclasses.fields(EngineConfig)}:
        cfg = dataclasses.replace(cfg, async_scheduling=mode != "serial")
    return cfg


def run_one(path: Path, batch: int, mode: str, warmup: int, steps: int, profile: bool,
            text: str = "auto", device: str = "cpu", dtype: str = "float32", eager: bool = False) -> dict[str, Any]:
    """Time `steps` decode steps of `batch` sequences after `warmup` steps (the first is the prefill);
    `text`: where the loop makes text (auto: its default; thread; engine: the engine thread)."""
    engine = Engine(engine_config(path, batch, mode, device, dtype, eager))
    stamps: list[float] = []
    cpu: list[float] = []
    done = threading.Event()
    prof = cProfile.Profile() if profile else None

    def observe(step: Any, outputs: Any, t_exec: int, t_done: int) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if prof is not None and len(stamps) == warmup:
            prof.enable()
        if len(stamps) == warmup + steps:
            if prof is not None:
                prof.disable()
            done.set()

    placement = {} if text == "auto" else {"text_thread": text == "thread"}
    loop = EngineLoop(engine, name=f"bench-{batch}", observers=[observe], **placement)
    finished = threading.Event()
    left = [batch]
    lock = threading.Lock()

    last_emit: dict[int, float] = {}  # k -> when the last output of a k-th token was emitted

    def emit(out: Any) -> None:
        last_emit[out.num_output_tokens] = time.perf_counter()
        if out.finished:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    finished.set()

    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 4, ignore_eos=True)
    for i in range(batch):
        seq = engine.make_sequence(f"r{i}", prompt(i), params)
        loop.add(Request(seq, emit=emit, fail=lambda exc: None))
    loop.start()
    ok = done.wait(600) and finished.wait(600)
    loop.stop()
    if not ok:
        raise RuntimeError(f"batch {batch} ({mode}) did not finish")
    timed = stamps[warmup:warmup + steps]
    seconds = stamps[warmup + steps - 1] - stamps[warmup - 1]
    ms = (seconds / len(timed)) * 1e3
    cpu_ms = (cpu[warmup + steps - 1] - cpu[warmup - 1]) / len(timed) * 1e3
    # Text lag: from the end of step j (which made every sequence's (j + 1)-th token) to the emission of
    # the last of those outputs. A text thread that falls behind the engine shows here, not in ms/step.
    lags = [last_emit[j + 1] - stamps[j] for j in range(warmup, warmup + steps) if j + 1 in last_emit]
    row: dict[str, Any] = {"batch": batch, "mode": mode, "ms_per_step": ms, "tokens_per_s": batch * len(timed) / seconds,
                           "cpu_ms_per_step": cpu_ms, "text_lag_ms_mean": sum(lags) / max(len(lags), 1) * 1e3,
                           "text_lag_ms_max": max(lags, default=0.0) * 1e3}
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is not None:
        row["cuda_graph_replays"] = graphs.replays
    if prof is not None:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values())
        top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:25]
        row["profile"] = {"total_s": total, "steps": steps, "top_own_time": [
            {"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls_per_step": v[1] / steps,
             "own_ms_per_step": v[2] / steps * 1e3, "cum_ms_per_step": v[3] / steps * 1e3} for k, v in top]}
    return row


def phases(path: Path, batch: int, warmup: int, steps: int, device: str = "cpu",
           dtype: str = "float32", eager: bool = False) -> dict[str, Any]:
    """CPU milliseconds per phase of a steady decode step of `batch` sequences, every phase on this one
    thread (no loop, no overlap, no GIL shared): schedule, prepare (the forward's inputs), forward,
    sample, process (tokens into place, stop checks, outputs) and text (what a loop's text thread does
    with those outputs: detokenize, make the outputs it emits). A build without a separate prepare
    counts it in forward; one that makes text inline counts it in process. On CUDA each phase is
    wall time ending in a device synchronize, so `forward` and `sample` hold the device's work too
    (`wall_ms_per_step`), and `cpu_ms_per_step` is the thread's own CPU time as on the CPU."""
    from engine.text_thread import add_text

    cuda = device.startswith("cuda")
    engine = Engine(engine_config(path, batch, "serial", device, dtype, eager))
    runner: Any = engine.runner
    split_forward = hasattr(runner, "_forward")
    if hasattr(engine, "inline_text"):
        engine.inline_text = False  # as under a loop with a text thread
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", prompt(i), params)
    for _ in range(warmup):
        engine.step()
    names = ("schedule", "prepare", "forward", "sample", "process", "text")
    spent = dict.fromkeys(names, 0.0)
    walls = dict.fromkeys(names, 0.0)
    t: list[float] = []
    w: list[float] = []

    def mark() -> None:
        if cuda:
            torch.cuda.synchronize()
        t.append(time.thread_time())
        w.append(time.perf_counter())

    with torch.inference_mode():
        for _ in range(steps):
            t.clear()
            w.clear()
            mark()
            step = engine.schedule()
            mark()
            assert step is not None
            if split_forward:
                inputs = runner.prepare(step)
                mark()
                logits = runner._forward(step, *inputs)
            else:
                mark()
                logits = runner.forward_logits(step)
            mark()
            sampled = runner.sampler(logits, runner.sampling_batch(step.seqs))
            mark()
            outputs: Any = (engine.process_step(step, sampled) if hasattr(engine, "process_step")
                            else engine.process(step, sampled))
            mark()
            if hasattr(engine, "inline_text"):
                for out in outputs.all() if hasattr(outputs, "all") else outputs:
                    add_text(out)
            mark()
            for name, a, b, wa, wb in zip(names, t[:-1], t[1:], w[:-1], w[1:], strict=True):
                spent[name] += b - a
                walls[name] += wb - wa
    ms = {name: v / steps * 1e3 for name, v in spent.items()}
    row: dict[str, Any] = {"batch": batch, "cpu_ms_per_step": ms, "host_ms_per_step": sum(ms.values()) - ms["forward"]}
    if cuda:
        row["wall_ms_per_step"] = {name: v / steps * 1e3 for name, v in walls.items()}
    return row


def prompt(i: int) -> list[int]:
    return [(7 * i + j) % (SHAPE["vocab_size"] - 3) + 3 for j in range(PROMPT_LEN)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32,64,128,256,512")
    ap.add_argument("--modes", default="overlap,serial", help="comma list of overlap, serial")
    ap.add_argument("--serial", action="store_true", help="only the serial mode (same as --modes serial)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile", default="256", help="comma list of batch sizes to profile ('' for none)")
    ap.add_argument("--phases", default="", help="comma list of batch sizes whose step is split into phases, "
                    "CPU time of each on one thread (`phases`)")
    ap.add_argument("--text", default="auto", choices=["auto", "thread", "engine"],
                    help="where text is made: the loop's default (auto), a text thread, the engine thread")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the near-free model on a GPU shows the host "
                    "work a GPU would wait on")
    ap.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--eager", action="store_true", help="CUDA: no CUDA graphs (the engine's --enforce-eager)")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of the near-free model "
                    "(e.g. a 1B-shaped random Llama from `tandem make-tiny-model`, to set host work against a "
                    "GPU's forward)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per batch size and mode; the row kept is the "
                    "median run's (all runs' ms/step in runs_ms_per_step): on a shared 2-core box single runs are "
                    "bimodal (docs/benchmarks.md), so compare medians")
    ap.add_argument("--label", default="", help="a name for this build in the JSON (e.g. baseline)")
    ap.add_argument("--out", default="bench/results/overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dev: dict[str, Any] = {"device": args.device, "dtype": dtype, "eager": args.eager}
    has_async = "async_scheduling" in {f.name for f in dataclasses.fields(EngineConfig)}
    modes = ["serial"] if args.serial or not has_async else args.modes.split(",")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    profiled = {int(x) for x in args.profile.split(",") if x}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else near_free_model(Path(tmp))
        for batch in sizes:
            for mode in modes:
                runs = []
                for _ in range(max(args.repeats, 1)):
                    run = run_one(path, batch, mode, args.warmup, args.steps, profile=False, text=args.text, **dev)
                    run["load_avg"] = os.getloadavg()[0]
                    runs.append(run)
                    print(f"B={batch:4d} {mode:8s} {run['ms_per_step']:8.2f} ms/step {run['tokens_per_s']:10.0f} "
                          f"tok/s {run['cpu_ms_per_step']:8.2f} CPU ms/step  text lag {run['text_lag_ms_mean']:.2f} "
                          f"ms (max {run['text_lag_ms_max']:.2f})  (load {run['load_avg']:.2f})", flush=True)
                row = sorted(runs, key=lambda r: r["ms_per_step"])[(len(runs) - 1) // 2]  # the (lower) median
                row["runs_ms_per_step"] = [r["ms_per_step"] for r in runs]
                rows.append(row)
                if len(runs) > 1:
                    print(f"B={batch:4d} {mode:8s} median of {len(runs)}: {row['ms_per_step']:.2f} ms/step "
                          f"{row['tokens_per_s']:.0f} tok/s", flush=True)
        profiles = []
        for batch in sorted(profiled):
            for mode in modes:
                p = run_one(path, batch, mode, args.warmup, args.steps, profile=True, text=args.text, **dev)
                profiles.append(p)
                print(f"\nprofile B={batch} {mode} (cProfile on, {p['ms_per_step']:.2f} ms/step):")
                for f in p["profile"]["top_own_time"][:15]:
                    print(f"  {f['own_ms_per_step']:7.3f} ms own {f['cum_ms_per_step']:7.3f} cum  {f['function']}")
        split = []
        for batch in [int(x) for x in args.phases.split(",") if x]:
            split.append(phases(path, batch, args.warmup, args.steps, **dev))
            print(f"\nphases B={batch} (CPU ms per step, one thread): host {split[-1]['host_ms_per_step']:.2f} + "
                  + ", ".join(f"{k} {v:.2f}" for k, v in split[-1]["cpu_ms_per_step"].items()), flush=True)
            if "wall_ms_per_step" in split[-1]:
                print("  wall ms (device synchronized): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in split[-1]["wall_ms_per_step"].items()), flush=True)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "text": args.text,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()})",
        "dtype": dtype,
        "cuda_graphs": args.device != "cpu" and not args.eager,
        "model": args.model or SHAPE,
        "prompt_len": PROMPT_LEN,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": max(args.repeats, 1),
        "rows": rows,
        "profiles": profiles,
        "phases": split,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
