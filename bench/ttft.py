"""TTFT and decode smoothness for disaggregated, conditional and co-located prefill, on CPU.

Run: `.venv/bin/python -m bench.ttft` (a few minutes). For each mode a real local stack (gateway,
1 prefill + 1 decode worker) serves the same requests:
  * disaggregated: every prompt is prefilled on the prefill worker and its KV shipped (threshold 0);
  * conditional:   prompts with fewer than 256 uncached tokens are prefilled by the decode worker;
  * co-located:    the decode worker prefills everything (no KV moves; the prefill worker idles).
Measured: TTFT per prompt length with an idle stack, and the inter-token latency of 4 running
streams while long prompts arrive (what disaggregation protects).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import torch

from cli.launcher import Stack
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from training.tiny import make_tiny_model

MODES = {"disaggregated": 0, "conditional": 256, "co-located": 1_000_000}
SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536,
             vocab_size=8192, max_position_embeddings=4096)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 8000, (n,), generator=g).tolist()


def stream(stub, ids: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """(ttft_s, arrival times of every message)"""
    t0 = time.perf_counter()
    times = []
    for _ in stub.Generate(gen.GenerateRequest(prompt_token_ids=ids, sampling=gen.SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True)), timeout=300):
        times.append(time.perf_counter())
    return times[0] - t0, times


def measure(model: Path, threshold: int, lengths: list[int], reps: int) -> dict:
    engine = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "4096", "--max-num-batched-tokens", "512"]
    with Stack(model, engine_args=engine, gateway_args=["--local-prefill-threshold", str(threshold)]) as stack:
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.address))
        stream(stub, prompt(16, 0), 2)  # warm-up
        ttft = {n: statistics.median(stream(stub, prompt(n, 100 + r), 1)[0] for r in range(reps)) for n in lengths}
        # decode smoothness: 4 background streams, then long prompts arrive one after another
        gaps: list[float] = []
        done = threading.Event()

        def background(i: int) -> None:
            _, times = stream(stub, prompt(64, 200 + i), 160)
            gaps.extend(b - a for a, b in zip(times, times[1:], strict=False))

        threads = [threading.Thread(target=background, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        for r in range(3):
            stream(stub, prompt(1024, 300 + r), 1)
        for t in threads:
            t.join()
        done.set()
        gaps.sort()
        return {"ttft_s": ttft, "itl_p50_s": gaps[len(gaps) // 2], "itl_p99_s": gaps[int(len(gaps) * 0.99)],
                "itl_max_s": gaps[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32,256,1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/ttft.json")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "ttft-llama", "llama", **SHAPE)
        results = {mode: measure(model, th, lengths, args.reps) for mode, th in MODES.items()}
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "model": SHAPE,
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"{'mode':<15}" + "".join(f"TTFT@{n:<6}" for n in lengths) + "ITL p50   p99    max")
    for mode, r in results.items():
        print(f"{mode:<15}" + "".join(f"{r['ttft_s'][n] * 1e3:7.0f}ms " for n in lengths)
              + f"{r['itl_p50_s'] * 1e3:5.0f}ms {r['itl_p99_s'] * 1e3:5.0f}ms {r['itl_max_s'] * 1e3:5.0f}ms")


if __name__ == "__main__":
    main()
