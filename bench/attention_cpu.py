"""CPU paged attention at SmolLM2-135M's shapes: the gathering reference, the in-place C++ kernel and
FlexAttention over the paged cache compiled by inductor (issue 18).

Run from the repository root: ``.venv/bin/python -m bench.attention_cpu [--threads 1 2] [--rounds N]
[--no-flex] [--out PATH]``. SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64, 16-token blocks,
float32 pool. Cases: decode batches of 1, 16 and 64 sequences at 128, 512 and 1024 tokens of context
(and 64 of ragged 32-1024), 512-token prefill chunks over 0, 512 and 1024 cached tokens, and one
engine-like mix (a 512-token chunk with 15 decodes). Block tables are random permutations of a pool
big enough that every call reads its pages from memory, as a 30-layer forward does (each call takes
the next of several layer pools).

Candidates (the same inputs, answers checked against the reference first):
* ``reference``: kernels.paged_attention.paged_attention_ref (index_select of each group's pages, SDPA);
* ``cpu_kernel``: kernels.paged_attention_cpu (pages read where they lie, online softmax);
* ``flex``: torch.nn.attention.flex_attention compiled by inductor (dynamic shapes) over the pool
  viewed as one flat K and one flat V sequence, with a paged block mask (each query block's list of
  physical pages; a mask_mod mapping a physical key back to its logical position). Decode batches and
  single prefill chunks only; its block mask is built once per forward, so it is timed apart
  (``flex_mask_ms``), and each shape's compile time is recorded (``flex_compile_s``).

Timing: the candidates run interleaved, round after round; per case the median and the minimum wall
time are kept (the box is shared: read the minima, and the load averages recorded beside them).
With one thread the median thread CPU time is kept too. Writes ``bench/results/attention_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_cpu import load_kernel, paged_attention_cpu

RESULTS = Path(__file__).resolve().parent / "results"
HQ, HK, D, BS, SCALE = 9, 3, 64, 16, 0.125
POOL_BYTES = 256 << 20  # layer pools in all: more than any cache, so every call reads memory
# The tensors flex's mask_mods read are padded to this fixed length (fewer distinct shapes).
_FLEX_BUFFER = 1 << 16


class Case(NamedTuple):
    name: str
    q_lens: list[int]
    seq_lens: list[int]


def cases() -> list[Case]:
    out = [Case(f"decode B={b} ctx={c}", [1] * b, [c] * b) for b in (1, 16, 64) for c in (128, 512, 1024)]
    rnd = random.Random(0)
    out.append(Case("decode B=64 ctx=32-1024", [1] * 64, [rnd.randint(32, 1024) for _ in range(64)]))
    out += [Case(f"prefill 512 ctx={c}", [512], [512 + c]) for c in (0, 512, 1024)]
    out.append(Case("mix 512-chunk ctx=256 + 15 decodes ctx=300", [512] + [1] * 15, [768] + [300] * 15))
    return out


class Batch(NamedTuple):
    q: Tensor  # (T, Hq, D)
    pools: list[Tensor]  # each (num_blocks, 2, BS, Hk, D): one per "layer"
    tables: Tensor  # (B, max_blocks) int32
    qsl: Tensor  # (B+1,) int32
    lens: Tensor  # (B,) int32


def make_batch(case: Case, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(s / BS) for s in case.seq_lens]
    num_blocks = sum(pages) + 8
    layer_bytes = num_blocks * 2 * BS * HK * D * 4
    layers = max(2, min(30, POOL_BYTES // layer_bytes))
    pools = [torch.randn(num_blocks, 2, BS, HK, D, generator=gen) for _ in range(layers)]
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(pages), max(pages), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[used : used + n]
        used += n
    qsl = torch.tensor([0, *torch.tensor(case.q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(case.q_lens), HQ, D, generator=gen)
    return Batch(q, pools, tables, qsl, torch.tensor(case.seq_lens, dtype=torch.int32))


class Flex:
    """FlexAttention over the paged pool, compiled by inductor for each shape (dynamic=False).

    Static shapes because the dynamic-shape compile fails in torch 2.13: inductor's CPU flex template
    emits C++ that names an undeclared size symbol ("cur_qSplitSize8") for a mask_mod that indexes a
    captured tensor by the batch index, so every case pays its own compile (``flex_compile_s``).

    The pool (N, 2, BS, Hk, D) viewed flat is 2N pages of BS tokens, K and V alternating; K is the
    flat view without its last page and V the view from its second page, so physical page 2b of
    both is block b's K and V: no copy. Flex's key blocks are BS tokens, so a block mask names pages.
    """

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        self.block_mask_cls = BlockMask
        # one compile per case: past dynamo's default of 8 it would silently run flex eagerly
        torch._dynamo.config.recompile_limit = 1000
        self.fn = torch.compile(flex_attention, dynamic=False)
        self.compile_s: dict[str, float] = {}

    @staticmethod
    def flat(pool: Tensor) -> tuple[Tensor, Tensor]:
        n = pool.shape[0]
        flat = pool.view(n * 2 * BS, HK, D)
        return flat[:-BS].transpose(0, 1).unsqueeze(0), flat[BS:].transpose(0, 1).unsqueeze(0)  # (1, Hk, L, D)

    def supports(self, case: Case) -> bool:
        return all(q == 1 for q in case.q_lens) or len(case.q_lens) == 1

    def mask(self, b: Batch) -> tuple[Any, str]:
        """The block mask for this batch's shape kind (built once per forward, outside the timing)."""
        n_blocks = b.pools[0].shape[0]
        cols = 2 * n_blocks - 1  # flat pages of K
        lens = b.lens.long()
        pages = (lens + BS - 1) // BS
        phys = 2 * b.tables.long()  # (B, P): flat page of each logical page
        batch = lens.shape[0]
        if all(int(b.qsl[i + 1] - b.qsl[i]) == 1 for i in range(batch)):  # decode: rows are the G heads
            full = torch.zeros(batch, 1, 1, cols, dtype=torch.int32)
            full[:, 0, 0, : phys.shape[1]] = phys.int()
            part = torch.zeros(batch, 1, 1, cols, dtype=torch.int32)
            part[:, 0, 0, 0] = phys.gather(1, (pages - 1)[:, None])[:, 0].int()
            fill = torch.zeros(_FLEX_BUFFER, dtype=torch.int64)  # see _FLEX_BUFFER
            fill[:batch] = lens - (pages - 1) * BS

            def decode_mask(bi: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return (kv_idx % BS) < fill[bi]

            bm = self.block_mask_cls.from_kv_blocks(
                torch.ones(batch, 1, 1, dtype=torch.int32), part, (pages - 1).int().view(batch, 1, 1), full,
                BLOCK_SIZE=(128, BS), mask_mod=decode_mask, seq_lengths=(HQ // HK, cols * BS),
                compute_q_blocks=False)  # fmt: skip
            return bm, "decode"
        # one prefill chunk: q (1, Hq, W, D), blocks of QB query rows
        width, length = b.q.shape[0], int(lens[0])
        ctx, qb = length - width, 64
        n_q = math.ceil(width / qb)
        p2l = torch.full((max(cols, _FLEX_BUFFER),), -1, dtype=torch.int64)
        p2l[phys[0, : int(pages[0])]] = torch.arange(int(pages[0]))
        full_num, part_num = torch.zeros(1, 1, n_q, dtype=torch.int32), torch.zeros(1, 1, n_q, dtype=torch.int32)
        full_idx = torch.zeros(1, 1, n_q, cols, dtype=torch.int32)
        part_idx = torch.zeros(1, 1, n_q, cols, dtype=torch.int32)
        for i in range(n_q):
            lo, hi = ctx + i * qb, min(ctx + (i + 1) * qb, length) - 1  # positions of the block's rows
            n_full = (lo + 1) // BS  # pages whose every key is <= lo
            last = hi // BS
            full_num[0, 0, i], part_num[0, 0, i] = n_full, last + 1 - n_full
            full_idx[0, 0, i, :n_full] = phys[0, :n_full].int()
            part_idx[0, 0, i, : last + 1 - n_full] = phys[0, n_full : last + 1].int()
        q_pos = torch.zeros(_FLEX_BUFFER, dtype=torch.int64)  # q_idx + ctx as a lookup
        q_pos[:width] = torch.arange(ctx, length)

        def prefill_mask(bi: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            logical = p2l[kv_idx // BS] * BS + kv_idx % BS
            return (logical >= 0) & (logical <= q_pos[q_idx])

        bm = self.block_mask_cls.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=(qb, BS),
                                                mask_mod=prefill_mask, seq_lengths=(width, cols * BS),
                                                compute_q_blocks=False)  # fmt: skip
        return bm, "prefill"

    def __call__(self, b: Batch, pool: Tensor, bm: Any, kind: str) -> Tensor:
        key, value = self.flat(pool)
        if kind == "decode":
            batch = b.lens.shape[0]
            out = self.fn(b.q.view(batch, HK, HQ // HK, D), key, value, block_mask=bm, scale=SCALE)
            return out.reshape(batch, HQ, D)
        q = b.q.transpose(0, 1).unsqueeze(0)  # (1, Hq, W, D)
        out = self.fn(q, key, value, block_mask=bm, scale=SCALE, enable_gqa=True)
        return out[0].transpose(0, 1)

    def first_call(self, name: str, b: Batch, bm: Any, kind: str) -> Tensor:
        start = time.perf_counter()
        out = self(b, b.pools[0], bm, kind)
        self.compile_s[name] = time.perf_counter() - start  # a new shape: a compile (or a cache hit)
        return out


def run_case(case: Case, threads: int, rounds: int, flex: Flex | None) -> dict[str, Any]:
    b = make_batch(case)
    layer = [0]

    def next_pool() -> Tensor:
        layer[0] = (layer[0] + 1) % len(b.pools)
        return b.pools[layer[0]]

    fns: dict[str, Callable[[], Tensor]] = {
        "reference": lambda: paged_attention_ref(b.q, next_pool(), b.tables, b.qsl, b.lens, SCALE),
        "cpu_kernel": lambda: paged_attention_cpu(b.q, next_pool(), b.tables, b.qsl, b.lens, SCALE),
    }
    row: dict[str, Any] = {"case": case.name, "threads": threads, "kv_mb": sum(case.seq_lens) * 2 * HK * D * 4 / 1e6}
    want = paged_attention_ref(b.q, b.pools[0], b.tables, b.qsl, b.lens, SCALE)
    errs = {"cpu_kernel": (paged_attention_cpu(b.q, b.pools[0], b.tables, b.qsl, b.lens, SCALE) - want).abs().max()}
    if flex is not None and flex.supports(case):
        start = time.perf_counter()
        bm, kind = flex.mask(b)
        row["flex_mask_ms"] = (time.perf_counter() - start) * 1e3
        errs["flex"] = (flex.first_call(f"{threads}T {case.name}", b, bm, kind) - want).abs().max()
        fns["flex"] = lambda: flex(b, next_pool(), bm, kind)
    row["max_abs_err"] = {k: float(v) for k, v in errs.items()}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm
    for _ in range(rounds):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    for name in fns:
        row[name] = {"wall_min_ms": min(wall[name]) * 1e3, "wall_median_ms": statistics.median(wall[name]) * 1e3}
        if threads == 1:
            row[name]["cpu_median_ms"] = statistics.median(cpu[name]) * 1e3
    row["speedup_min"] = {k: row["reference"]["wall_min_ms"] / row[k]["wall_min_ms"] for k in fns if k != "reference"}
    row["load_avg"] = os.getloadavg()[0]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS / "attention_cpu.json")
    args = ap.parse_args()
    start = time.perf_counter()
    if load_kernel() is None:
        raise SystemExit("the CPU attention kernel did not build (see the log)")
    kernel_load_s = time.perf_counter() - start
    flex = None if args.no_flex else Flex()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_start": os.getloadavg(),
        "kernel_load_s": kernel_load_s, "shape": {"hq": HQ, "hk": HK, "head_dim": D, "block_size": BS},
        "rows": [],
    }  # fmt: skip
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in cases():
            row = run_case(case, threads, args.rounds, flex)
            result["rows"].append(row)
            cols = "  ".join(f"{k} {row[k]['wall_min_ms']:8.2f}" for k in ("reference", "cpu_kernel", "flex") if k in row)
            print(f"{threads}T {case.name:44s} {cols}  ms (min)  x{row['speedup_min']['cpu_kernel']:.2f}"
                  f"  load {row['load_avg']:.1f}", flush=True)  # fmt: skip
    result["load_avg_end"] = os.getloadavg()
    if flex is not None:
        result["flex_compile_s"] = flex.compile_s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
