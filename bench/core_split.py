"""What the near-free decode step would cost with the engine core in a process of its own, measured: a
prototype of the split issue 18 left for later (vLLM v1's engine-core process), run beside today's loop.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m bench.core_split` (`--help`). For each batch size B (B
requests of bench.overhead's near-free model and prompts, EOS ignored) it runs, `--repeats` times in
turn:

  loop   bench.overhead's serial row: one EngineLoop, text where it makes it by default, as a worker runs;
  core   this process runs the engine's steps and nothing else (schedule, forward, sample, process),
         and after each step sends its tokens over ZeroMQ (PUSH/PULL, ipc) to a text process, which
         detokenizes them with the same `IncrementalDetokenizer` and makes every `RequestOutput`;
  alone  the same steps with nothing sent and no text anywhere: the floor of such a core.

The core's ms/step are this process's (wall time between the ends of consecutive steps); the text
process reports its lag (from the end of a step to its last output made: it keeps up when this stays
below a step) and checks its contract: each request's text equals the tokenizer's decode of the tokens
it received. Only plain decodes and first tokens cross, which is all this workload makes: no stop
strings, aborts, KV transfer or metrics, so it is an upper bound for the real split, not the split.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from bench.overhead import engine_config, near_free_model, prompt, run_one
from engine.engine import Engine
from engine.sampling.params import SamplingParams


def text_process(path: str, batch: int, address: str, results: Any) -> None:
    """The text side: detokenize each step's tokens as they arrive; at the end put (lags, outputs made,
    requests whose text differs from the tokenizer's decode) on `results`."""
    torch.set_num_threads(1)
    from engine.detokenizer import IncrementalDetokenizer
    from engine.outputs import RequestOutput
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    _ = tok.byte_tables
    detoks = [IncrementalDetokenizer(tok, prompt(i)) for i in range(batch)]
    names = [f"r{i}" for i in range(batch)]  # what a front process holds per request, made once
    prompt_lens = [len(prompt(i)) for i in range(batch)]
    ids: list[list[int]] = [[] for _ in range(batch)]
    texts: list[list[str]] = [[] for _ in range(batch)]
    made: list[RequestOutput] = []
    lags: list[float] = []
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.connect(address)
    while (parts := pull.recv_multipart())[0] != b"end":
        made.clear()
        rows = np.frombuffer(parts[1], np.int32).tolist()
        tokens = np.frombuffer(parts[2], np.int32).tolist()
        counts = np.frombuffer(parts[3], np.int32).tolist()
        for i, new in pickle.loads(parts[4]):  # first tokens (the prefill's outputs)
            text = detoks[i].step(new)
            ids[i].extend(new)
            texts[i].append(text)
            made.append(RequestOutput(names[i], new, text, False, None, prompt_lens[i], len(ids[i]), 0))
        for i, token, n in zip(rows, tokens, counts, strict=True):
            text = detoks[i].next_token(token)
            ids[i].append(token)
            texts[i].append(text)
            made.append(RequestOutput(names[i], [token], text, False, None, prompt_lens[i], n, 0, [], None, None, 0,
                                      None, [], None))  # fmt: skip
        lags.append(time.perf_counter() - float(parts[0]))
    wrong = sum("".join(texts[i]) + detoks[i].flush() != tok.decode(ids[i], True) for i in range(batch))
    results.put((lags, sum(len(x) for x in ids), wrong))


def run_core(path: Path, batch: int, warmup: int, steps: int, send: bool) -> dict[str, Any]:
    """`steps` engine steps of `batch` sequences after `warmup`, their tokens sent to a text process
    (`send`) or not."""
    push = results = proc = None
    if send:
        spawn = mp.get_context("spawn")
        results = spawn.Queue()
        address = f"ipc://{tempfile.gettempdir()}/tandem-core-split-{os.getpid()}.sock"
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.bind(address)
        proc = spawn.Process(target=text_process, args=(str(path), batch, address, results), daemon=True)
        proc.start()
    engine = Engine(engine_config(path, batch, "serial"))
    engine.inline_text = False  # plain decodes stay rows, as under a loop with a text thread
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 4, ignore_eos=True)
    row_of = {engine.add_request(f"r{i}", prompt(i), params).request_id: i for i in range(batch)}
    stamps: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup + steps):
            step = engine.schedule()
            assert step is not None
            out = engine.process_step(step, engine.execute(step))
            if push is not None:
                rows = np.array([row_of[s.request_id] for s in out.seqs], np.int32)
                firsts = [(row_of[o.request_id], o.new_token_ids) for o in out.outputs]
                push.send_multipart([repr(time.perf_counter()).encode(), rows.tobytes(),
                                     np.array(out.tokens, np.int32).tobytes(),
                                     np.array(out.num_output_tokens, np.int32).tobytes(), pickle.dumps(firsts)])
            stamps.append(time.perf_counter())
    seconds = stamps[-1] - stamps[warmup - 1]
    row: dict[str, Any] = {"batch": batch, "mode": "core" if send else "alone", "ms_per_step": seconds / steps * 1e3,
                           "tokens_per_s": batch * steps / seconds}
    if push is not None and results is not None and proc is not None:
        push.send_multipart([b"end"])
        lags, tokens, wrong = results.get(timeout=120)
        proc.join(30)
        push.close(linger=0)
        timed = lags[warmup:]
        row |= {"text_lag_ms_mean": sum(timed) / len(timed) * 1e3, "text_lag_ms_max": max(timed) * 1e3,
                "tokens_detokenized": tokens, "requests_with_wrong_text": wrong}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="bench/results/core_split.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = near_free_model(Path(tmp))
        for batch in [int(x) for x in args.batch_sizes.split(",")]:
            for _ in range(args.repeats):
                for mode in ("loop", "core", "alone"):
                    row = (run_one(path, batch, "serial", args.warmup, args.steps, profile=False) | {"mode": "loop"}
                           if mode == "loop" else run_core(path, batch, args.warmup, args.steps, mode == "core"))
                    row["load_avg"] = os.getloadavg()[0]
                    rows.append(row)
                    lag = f"  text lag {row['text_lag_ms_mean']:.2f} ms" if "text_lag_ms_mean" in row else ""
                    print(f"B={batch:4d} {mode:6s} {row['ms_per_step']:7.3f} ms/step {row['tokens_per_s']:9.0f} tok/s"
                          f"{lag}  (load {row['load_avg']:.2f})", flush=True)
                    if row.get("requests_with_wrong_text"):
                        raise SystemExit(f"the text process's text differs from decode for "
                                         f"{row['requests_with_wrong_text']} requests")
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
              "torch": torch.__version__, "warmup_steps": args.warmup, "timed_steps": args.steps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
