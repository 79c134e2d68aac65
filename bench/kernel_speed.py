"""GPU benchmark of the Triton kernels against the PyTorch path (issue 4).

Run from the repository root: ``.venv/bin/python -m bench.kernel_speed [--out PATH] [--rep MS]``.
For each kernel, and for the same op through the PyTorch references (SDPA for attention), it
prints and writes to ``bench/results/`` the median time, the achieved GB/s (memory-bound kernels)
or TFLOP/s (extend attention), that figure as a fraction of this GPU's ceilings measured in the
same run (a large device-to-device copy; a large bfloat16 matmul), and the relative error of the
bfloat16 result, max|out - ref| / max|ref|, against the PyTorch reference fed float64 copies of
the same inputs (the references compute in float32 or better).
Targets (issue 4): decode attention >= 70% of copy bandwidth at batch 64 x 4k context; norm,
rotary and activation >= 80%; every relative error <= 1e-2.

Without CUDA it exits with status 2. ``--smoke`` instead runs tiny float32 shapes on CPU through
the Triton interpreter (set TRITON_INTERPRET=1 first): it checks this script, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch

import kernels as K

RESULTS = Path(__file__).resolve().parent / "results"
BANDWIDTH_TARGETS = {"paged_decode": 0.70, "rms_norm": 0.80, "rotary": 0.80, "silu_and_mul": 0.80}
MAX_REL_ERR = 1e-2
# Full shapes: Llama-3-8B-like (H 4096, I 14336, 32 query / 8 KV heads of 128), 16k-token batches.
FULL = dict(tokens=16384, hidden=4096, inter=14336, hq=32, hk=8, head_dim=128, block_size=16,
            decode_batch=64, decode_ctx=4096, extend_batch=4, extend_q=2048, extend_ctx=4096,
            copy_bytes=4 << 30, matmul=8192)  # fmt: skip
SMOKE = dict(tokens=8, hidden=64, inter=96, hq=4, hk=2, head_dim=64, block_size=16,
             decode_batch=3, decode_ctx=100, extend_batch=2, extend_q=16, extend_ctx=40,
             copy_bytes=1 << 20, matmul=128)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One op at one shape: the two implementations, their work, and how to check them."""

    name: str
    unit: str  # "GB/s" (amount = bytes moved) or "TFLOP/s" (amount = flops)
    amount: float
    triton: Callable[[], Any]
    torch: Callable[[], Any]
    reference: Callable[[], Any]  # the PyTorch reference on float64 copies of the inputs


@dataclass(frozen=True)
class Row:
    kernel: str
    backend: str
    ms: float
    rate: float
    unit: str
    fraction_of_ceiling: float
    rel_err: float
    target_fraction: float | None
    meets_target: bool


def timer(device: torch.device, rep_ms: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of ``fn``: triton's do_bench (L2 flushed between calls) on CUDA."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))

    def cpu_time(fn: Callable[[], Any]) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_time


def ceilings(
    s: dict[str, int], device: torch.device, time_ms: Callable[[Callable[[], Any]], float]
) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul throughput (TFLOP/s) of this device."""
    src = torch.empty(s["copy_bytes"] // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    n = s["matmul"]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = time_ms(lambda: a @ b)
    return {"copy_GBps": 2 * s["copy_bytes"] / copy_ms / 1e6, "matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9}


class Paged(NamedTuple):
    """Inputs of one paged-attention call (see kernels/paged_attention.py)."""

    q: torch.Tensor  # (T, Hq, D)
    kv: torch.Tensor  # (num_blocks, 2, block_size, Hk, D)
    tables: torch.Tensor  # (B, max_blocks) int32, blocks in shuffled order
    starts: torch.Tensor  # (B+1,) int32
    seq_lens: torch.Tensor  # (B,) int32

    @staticmethod
    def make(s: dict[str, int], q_lens: list[int], seq_lens: list[int], dtype: torch.dtype, device: torch.device) -> Paged:  # fmt: skip
        bs = s["block_size"]
        per_seq = [math.ceil(n / bs) for n in seq_lens]
        kv = torch.randn(sum(per_seq), 2, bs, s["hk"], s["head_dim"], device=device, dtype=dtype)
        perm = torch.randperm(sum(per_seq), device=device).to(torch.int32)
        tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32, device=device)
        for b, n in enumerate(per_seq):
            tables[b, :n] = perm[sum(per_seq[:b]) : sum(per_seq[:b]) + n]
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q = torch.randn(sum(q_lens), s["hq"], s["head_dim"], device=device, dtype=dtype)
        return Paged(q, kv, tables, starts, torch.tensor(seq_lens, dtype=torch.int32, device=device))

    def attention_ref(self, scale: float, float64: bool = False) -> torch.Tensor:
        q, kv = (self.q.double(), self.kv.double()) if float64 else (self.q, self.kv)
        return K.paged_attention_ref(q, kv, self.tables, self.starts, self.seq_lens, scale)


def stored(
    store: Callable[..., None], k: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """``store(k, k, pool, slots)`` (k as both K and V), then the pool."""
    store(k, k, pool, slots)
    return pool


def build_cases(s: dict[str, int], dtype: torch.dtype, device: torch.device) -> list[Case]:
    t, h, inter, hq, hk, d = s["tokens"], s["hidden"], s["inter"], s["hq"], s["hk"], s["head_dim"]
    es = torch.finfo(dtype).bits // 8
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    x, res, w = rnd(t, h), rnd(t, h), rnd(h)
    q, k = rnd(t, hq, d), rnd(t, hk, d)
    cache = K.build_cos_sin_cache(d, 2 * t, 500000.0, None, device=device)
    pos = torch.randint(0, 2 * t, (t,), device=device)
    gate_up = rnd(t, 2 * inter)
    pool = torch.zeros(2 * t // s["block_size"], 2, s["block_size"], hk, d, device=device, dtype=dtype)
    slots = torch.randperm(2 * t, device=device)[:t]
    dec = Paged.make(s, [1] * s["decode_batch"], [s["decode_ctx"]] * s["decode_batch"], dtype, device)
    n_ext, q_ext, ctx_ext = s["extend_batch"], s["extend_q"], s["extend_ctx"]
    ext = Paged.make(s, [q_ext] * n_ext, [ctx_ext] * n_ext, dtype, device)
    scale = d**-0.5
    # Causal chunk over a cached prefix: query i sees ctx - q_len + i + 1 keys; QK^T and PV each 2 flops/MAC.
    visible = n_ext * sum(ctx_ext - q_ext + i + 1 for i in range(q_ext))
    # Contiguous (B, Hk, ctx, D) K/V for the plain-SDPA line: the torch path without paging.
    sdpa_q = dec.q[:, :, None].contiguous()  # (B, Hq, 1, D)
    sdpa_kv = rnd(s["decode_batch"], hk, s["decode_ctx"], d)
    return [
        Case("rms_norm", "GB/s", (4 * t * h + h) * es,
             lambda: K.rms_norm(x, w, 1e-6, res), lambda: K.rms_norm_ref(x, w, 1e-6, res),
             lambda: K.rms_norm_ref(x.double(), w.double(), 1e-6, res.double())),
        Case("rotary", "GB/s", 2 * t * (hq + hk) * d * es + t * d * 4 + t * 8,
             lambda: K.rotary(pos, q, k, cache), lambda: K.rotary_ref(pos, q, k, cache),
             lambda: K.rotary_ref(pos, q.double(), k.double(), cache.double())),
        Case("silu_and_mul", "GB/s", 3 * t * inter * es,
             lambda: K.silu_and_mul(gate_up), lambda: K.silu_and_mul_ref(gate_up),
             lambda: K.silu_and_mul_ref(gate_up.double())),
        Case("store_kv", "GB/s", 4 * t * hk * d * es + t * 8,
             lambda: stored(K.store_kv, k, pool, slots), lambda: stored(K.store_kv_ref, k, pool, slots),
             lambda: stored(K.store_kv_ref, k.double(), torch.zeros_like(pool, dtype=torch.float64), slots)),
        Case("paged_decode", "GB/s", dec.kv.numel() * es + 2 * dec.q.numel() * es + dec.tables.numel() * 4,
             lambda: K.paged_decode_attention(dec.q, dec.kv, dec.tables, dec.seq_lens, scale),
             lambda: dec.attention_ref(scale), lambda: dec.attention_ref(scale, float64=True)),
        Case("sdpa_contiguous_decode", "GB/s", 2 * sdpa_kv.numel() * es + 2 * sdpa_q.numel() * es,
             lambda: None,
             lambda: torch.nn.functional.scaled_dot_product_attention(sdpa_q, sdpa_kv, sdpa_kv, enable_gqa=True),
             lambda: None),
        Case("paged_extend", "TFLOP/s", 4 * visible * hq * d,
             lambda: K.paged_extend_attention(*ext, scale, max_query_len=q_ext),
             lambda: ext.attention_ref(scale), lambda: ext.attention_ref(scale, float64=True)),
    ]  # fmt: skip


def rel_err(out: Any, ref: Any) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max(
        float((o.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
        for o, r in zip(outs, refs, strict=True)
    )


def run(
    s: dict[str, int], dtype: torch.dtype, device: torch.device, rep_ms: int, judge: bool
) -> dict[str, Any]:
    """Measure every case on both backends; ``judge`` applies the issue's targets (not in --smoke)."""
    time_ms = timer(device, rep_ms)
    ceil = ceilings(s, device, time_ms)
    rows: list[Row] = []
    for case in build_cases(s, dtype, device):
        ref = case.reference()
        for backend, fn in (("triton", case.triton), ("torch", case.torch)):
            if case.name == "sdpa_contiguous_decode" and backend == "triton":
                continue
            err = rel_err(fn(), ref) if ref is not None else 0.0
            ms = time_ms(fn)
            rate = case.amount / ms / (1e6 if case.unit == "GB/s" else 1e9)
            frac = rate / (ceil["copy_GBps"] if case.unit == "GB/s" else ceil["matmul_TFLOPs"])
            target = BANDWIDTH_TARGETS.get(case.name) if backend == "triton" and judge else None
            ok = not judge or (err <= MAX_REL_ERR and (target is None or frac >= target))
            rows.append(Row(case.name, backend, ms, rate, case.unit, frac, err, target, ok))
            verdict = "" if not judge else "ok" if ok else "MISSES TARGET"
            print(f"{case.name:24s} {backend:6s} {ms:9.4f} ms {rate:9.1f} {case.unit:8s} "
                  f"{100 * frac:5.1f}% of ceiling  rel_err {err:.1e}  {verdict}")  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter smoke run)"
    return {"device": name, "dtype": str(dtype), "torch": torch.__version__, "shapes": s, "ceilings": ceil,
            "rows": [asdict(r) for r in rows], "when": datetime.now(UTC).isoformat()}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_speed", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/kernels-<time>.json)"
    )
    p.add_argument("--rep", type=int, default=200, help="milliseconds of timed repetitions per measurement")
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes on CPU via TRITON_INTERPRET=1")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        result = run(SMOKE, torch.float32, torch.device("cpu"), args.rep, judge=False)
    elif not torch.cuda.is_available():
        print(
            "bench/kernel_speed.py needs a CUDA GPU (none found); --smoke checks the script on CPU",
            file=sys.stderr,
        )
        return 2
    else:
        result = run(FULL, torch.bfloat16, torch.device("cuda"), args.rep, judge=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"kernels-{'smoke' if args.smoke else 'gpu'}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["meets_target"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
