"""float32 CPU linears: F.linear (MKL's sgemm) against oneDNN (kernels/onednn_linear.py) on the same
dense weight, and against MKL's sgemm on that weight stored transposed, (K, N) contiguous
(``torch.mm(x, w_t)``: no transposed operand), at real models' projection shapes; the data behind
``prefers_onednn`` (issue 18).

Run from the repository root: ``.venv/bin/python -m bench.cpu_linear [--threads 1,2] [--rows 1,8,...]
[--budget-s S] [--out PATH]``. Shapes (N, K) as the engine holds them (fused qkv and gate_up):

* SmolLM2-135M (hidden 576, intermediate 1536, 9/3 heads of 64, vocab 49152);
* Qwen2.5-0.5B (896, 4864, 14/2 heads of 64, vocab 151936);
* Llama-3.2-1B (2048, 8192, 32/8 heads of 64, vocab 128256);
* probes of the rule's edges: tiny layers (K 32..128); N = 1.5K .. 32K around N = 2048 and K = 256.

Rows M = 1 (decode) .. 512 (a prefill chunk); the LM heads of the two larger models stop at M = 48
(a 512-row call of a 1 GB head takes seconds and a prefill samples a row per sequence, not 512).
Each call reads its weight from memory, as a 30-layer step does: weights under 64 MB are cycled
through copies totalling >= 64 MB (the last-level cache is 8 MB a CCX here). The two candidates run
interleaved (A B A B ...) for ``--budget-s`` each or 15 rounds, at least 3; the median and minimum
wall times are kept with the load average. oneDNN is timed as the engine calls it
(``onednn_linear_unchecked``, OneDNNLinear's forward, without the argument checks). Answers are checked against each other first. Writes
``bench/results/cpu_linear.json``.
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

from kernels.onednn_linear import available, onednn_linear, onednn_linear_unchecked, prefers_onednn

RESULTS = Path(__file__).resolve().parent / "results"
COLD_BYTES = 64 << 20
BIG_HEAD_MAX_M = 48


def model_shapes(name: str, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int,
                 vocab: int) -> dict[str, tuple[int, int]]:
    return {f"{name}.qkv": ((heads + 2 * kv_heads) * head_dim, hidden), f"{name}.o": (hidden, heads * head_dim),
            f"{name}.gate_up": (2 * inter, hidden), f"{name}.down": (hidden, inter), f"{name}.lm_head": (vocab, hidden)}


SHAPES: dict[str, tuple[int, int]] = {
    **model_shapes("smollm2", 576, 1536, 9, 3, 64, 49152),
    **model_shapes("qwen2.5-0.5b", 896, 4864, 14, 2, 64, 151936),
    **model_shapes("llama3.2-1b", 2048, 8192, 32, 8, 64, 128256),
    "tiny.k32": (128, 32), "tiny.k64": (256, 64), "edge.k128_n4k": (512, 128),
    "edge.k256_n2k": (512, 256), "edge.k384_n2k": (768, 384), "edge.k576_n1.5k": (864, 576),
    "edge.k576_n1536": (1536, 576), "edge.k576_n2048": (2048, 576), "edge.k128_n4096": (4096, 128),
    "edge.k256_n4096": (4096, 256), "edge.k1024_n1024": (1024, 1024), "edge.k1024_n2048": (2048, 1024),
    "edge.k4096_n1024": (1024, 4096),
}


def time_interleaved(fns: dict[str, Callable[[], Tensor]], budget_s: float) -> dict[str, dict[str, float]]:
    """Median and minimum wall ms of each candidate, run A B A B ... after one warm call each."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    while True:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - start)
        spent = min(sum(v) for v in wall.values())
        rounds = len(next(iter(wall.values())))
        if rounds >= 15 or (rounds >= 3 and spent >= budget_s):
            break
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "rounds": len(v)}
            for k, v in wall.items()}


def run_shape(name: str, n: int, k: int, rows: list[int], budget_s: float) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(n * 7 + k)
    copies = max(1, -(-COLD_BYTES // (n * k * 4)))
    ws = [torch.randn(n, k, generator=gen) * k**-0.5 for _ in range(copies)]
    wts = [w.t().contiguous() for w in ws]  # (K, N): the same weights, stored transposed
    turn = {"F.linear": 0, "onednn": 0, "mm.kn": 0}

    def weight(kind: str) -> Tensor:
        turn[kind] = (turn[kind] + 1) % copies
        return ws[turn[kind]]

    out = []
    for m in rows:
        if "lm_head" in name and n * k > 100_000_000 and m > BIG_HEAD_MAX_M:
            continue
        x = torch.randn(m, k, generator=gen)
        err = float((onednn_linear(x, ws[0]) - F.linear(x, ws[0])).abs().max())

        def mkl(x: Tensor = x) -> Tensor:
            return F.linear(x, weight("F.linear"))

        def dnn(x: Tensor = x) -> Tensor:
            return onednn_linear_unchecked(x, weight("onednn"))

        def kn(x: Tensor = x) -> Tensor:
            turn["mm.kn"] = (turn["mm.kn"] + 1) % copies
            return torch.mm(x, wts[turn["mm.kn"]])

        err = max(err, float((kn() - F.linear(x, ws[turn["mm.kn"]])).abs().max()))
        t = time_interleaved({"F.linear": mkl, "onednn": dnn, "mm.kn": kn}, budget_s)
        f, d, c = t["F.linear"]["median_ms"], t["onednn"]["median_ms"], t["mm.kn"]["median_ms"]
        row = {"shape": name, "n": n, "k": k, "m": m, "threads": torch.get_num_threads(), "max_abs_diff": err,
               "times": t, "onednn_over_flinear": d / f, "kn_over_flinear": c / f, "rule_prefers_onednn": prefers_onednn(n, k),
               "load_avg": os.getloadavg()[0]}  # fmt: skip
        out.append(row)
        mark = "onednn" if prefers_onednn(n, k) else "F"
        print(f"t={row['threads']} {name:22s} N={n:6d} K={k:5d} M={m:3d}  F.linear {f:9.3f}  onednn {d:9.3f} ms "
              f"({d / f:5.2f}x)  mm.kn {c:9.3f} ms ({c / f:5.2f}x)  rule: {mark:6s} load {row['load_avg']:.1f}",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma list of torch intra-op thread counts")
    ap.add_argument("--rows", default="1,8,16,48,128,512", help="comma list of M")
    ap.add_argument("--shapes", default=None, help="comma list of shape-name prefixes (default: all)")
    ap.add_argument("--budget-s", type=float, default=0.4, help="seconds each candidate runs per (shape, M)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_linear.json")
    args = ap.parse_args()
    if not available():
        raise SystemExit("oneDNN linear is unavailable in this torch (see the log)")
    rows = [int(m) for m in args.rows.split(",")]
    shapes = {s: nk for s, nk in SHAPES.items()
              if args.shapes is None or any(s.startswith(p) for p in args.shapes.split(","))}
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_start": os.getloadavg(),
        "budget_s": args.budget_s, "cold_bytes": COLD_BYTES, "rows": [],
    }  # fmt: skip
    try:
        result["cpu_model"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with torch.inference_mode():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for name, (n, k) in shapes.items():
                result["rows"].extend(run_shape(name, n, k, rows, args.budget_s))
    result["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
