"""The grouped int8 CPU kernel against the dense float32 matmul and dequantize-every-call, at
SmolLM2-135M's projection shapes (issue 20: GGUF Q8_0 / Q6_K and 8-bit GPTQ kept quantized on CPU).

Run from the repository root: ``OMP_NUM_THREADS=1 .venv/bin/python -m bench.int8_group_cpu [--rounds N]
[--out PATH]``. Shapes (N, K): qkv (960, 576), o (576, 576), gate_up (3072, 576), down (576, 1536);
rows M = 1 (decode), 16 and 48; the Q8_0 layout (G = 32, zero point 128, float32 scales as
GroupQuantLinear keeps them). Candidates, same x, answers checked against the reference first:

* ``kernel``: kernels.int8_group_gemm_cpu's Int8GroupGemm, as GroupQuantLinear calls it (1 byte per
  weight + a float32 scale and a zero point per 32);
* ``dense``: F.linear with the dequantized float32 W (what build_linear expanded Q8_0 to before);
* ``wna16_ref``: dequantize W, then F.linear, every call (GroupQuantLinear's "dequant" kernel).

Two cache regimes: ``hot`` calls one weight again and again (it stays in L2/L3); ``cold`` cycles
through copies of it totalling > 64 MB, so each call reads its weight from memory as a 30-layer
decode step does (wna16_ref is timed hot only: its dequantization dominates). The candidates run
interleaved (A B C A B C ...), ``--rounds`` times; the median and minimum wall times are kept with
the load average. One thread (torch.set_num_threads(1)). Writes ``bench/results/int8_group_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.int8_group_gemm_cpu import Int8GroupGemm, int8_group_gemm_cpu, load_kernel
from kernels.wna16_gemm import GroupWeight, dequantize_group, wna16_ref

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
ROWS = (1, 16, 48)
GROUP, ZERO = 32, 128  # GGUF Q8_0
COLD_BYTES = 64 << 20
LAYERS = 30  # SmolLM2-135M


def q8_0_weight(n: int, k: int, seed: int) -> GroupWeight:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // GROUP, generator=gen) * 0.01
    return GroupWeight(q, scales, torch.full((n, k // GROUP), ZERO, dtype=torch.uint8), GROUP, 8)


def weight_bytes(w: GroupWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))


def time_interleaved(fns: dict[str, Callable[[], Tensor]], rounds: int) -> dict[str, dict[str, float]]:
    """Median and minimum wall ms of each candidate, run A B C A B C ... after one warm call each."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - start)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in wall.items()}


def run_shape(name: str, n: int, k: int, rounds: int) -> list[dict[str, Any]]:
    w = q8_0_weight(n, k, seed=n + k)
    dense = dequantize_group(w)  # (N, K) float32
    copies = max(2, -(-COLD_BYTES // (dense.numel() * 4)))
    cold_q = [q8_0_weight(n, k, seed=i) for i in range(copies)]
    cold_d = [dequantize_group(c) for c in cold_q]
    prepared, cold_p = Int8GroupGemm(w), [Int8GroupGemm(c) for c in cold_q]
    turn = {"kernel": 0, "dense": 0}

    def nxt(kind: str) -> int:
        turn[kind] = (turn[kind] + 1) % copies
        return turn[kind]

    def measure(x: Tensor) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        hot = time_interleaved({"kernel": lambda: prepared(x), "dense": lambda: F.linear(x, dense),
                                "wna16_ref": lambda: wna16_ref(x, w)}, rounds)  # fmt: skip
        cold = time_interleaved({"kernel": lambda: cold_p[nxt("kernel")](x),
                                 "dense": lambda: F.linear(x, cold_d[nxt("dense")])}, rounds)  # fmt: skip
        return hot, cold

    rows = []
    for m in ROWS:
        x = torch.randn(m, k)
        err = float((int8_group_gemm_cpu(x, w) - wna16_ref(x, w)).abs().max())
        hot, cold = measure(x)
        row = {"shape": name, "n": n, "k": k, "m": m, "max_abs_err": err, "hot": hot, "cold": cold,
               "kernel_over_dense_hot": hot["kernel"]["median_ms"] / hot["dense"]["median_ms"],
               "kernel_over_dense_cold": cold["kernel"]["median_ms"] / cold["dense"]["median_ms"],
               "gflops_kernel_hot": 2 * m * n * k / hot["kernel"]["median_ms"] / 1e6,
               "gflops_dense_hot": 2 * m * n * k / hot["dense"]["median_ms"] / 1e6,
               "load_avg": os.getloadavg()[0]}  # fmt: skip
        rows.append(row)
        print(f"{name:8s} M={m:3d}  hot: kernel {hot['kernel']['median_ms']:7.3f} dense {hot['dense']['median_ms']:7.3f}"
              f" ref {hot['wna16_ref']['median_ms']:7.3f}  cold: kernel {cold['kernel']['median_ms']:7.3f}"
              f" dense {cold['dense']['median_ms']:7.3f} ms (median)  load {row['load_avg']:.1f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_group_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if load_kernel() is None:
        raise SystemExit("the grouped int8 CPU kernel did not build (see the log)")
    per_layer = {s: weight_bytes(q8_0_weight(n, k, 0)) for s, (n, k) in SHAPES.items()}
    dense_per_layer = {s: n * k * 4 for s, (n, k) in SHAPES.items()}
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg(), "rounds": args.rounds, "group_size": GROUP, "zero_point": ZERO,
        "smollm2_projection_mib": {"kernel": sum(per_layer.values()) * LAYERS / 2**20,
                                   "dense_float32": sum(dense_per_layer.values()) * LAYERS / 2**20},
        "rows": [],
    }  # fmt: skip
    for name, (n, k) in SHAPES.items():
        result["rows"].extend(run_shape(name, n, k, args.rounds))
    result["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
