"""The C++ CPU attention kernel of several git revisions, side by side in one process.

Run from the repository root: ``.venv/bin/python -m bench.attention_cpu_ab REV [REV ...] [--batch 48]
[--rounds 6] [--layers 30] [--out PATH]`` (``--help``). Each revision's ``kernels/paged_attention_cpu.cpp``
(and the ``kernels/pyfast.h`` it includes, where it has one) is built with ``kernels/cpu_build.py`` into a
temporary cache and loaded beside the others; the revisions then run the same decode step in turn, round
after round, so a shared box's load falls on all of them alike (read the ratios, not the absolute times).

The step is SmolLM2-135M's decode attention (9 query heads, 3 KV heads, head_dim 64, 16-token blocks,
float32 pool): ``--batch`` sequences with contexts of 96-576 tokens (the issue-18 workload's 32-512-token
prompts after 64 tokens out), one layer at a time over 30 layer pools, as a 30-layer forward reads them
(the pools together are far larger than the caches; ``--layers 4`` fit in a large L3). Each sequence's
pages are consecutive blocks, as the block manager hands out a prompt's pages. One torch thread unless
``--threads``. Every revision's answer is checked against the first's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kernels import cpu_build
from kernels.paged_attention_cpu import _ARGTYPES, _INT

SOURCE = "kernels/paged_attention_cpu.cpp"
HQ, HK, D, BS = 9, 3, 64, 16


def _show(rev: str, path: str) -> str | None:
    """`path` as of `rev`, or None where it does not exist then."""
    done = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def load(rev: str, build_dir: Path) -> Callable[..., int]:
    """The entry point of `rev`'s kernel, built into `build_dir`."""
    src_dir = build_dir / rev.replace("/", "_")
    src_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / "paged_attention_cpu.cpp"
    source = _show(rev, SOURCE)
    if source is None:
        raise SystemExit(f"{rev} has no {SOURCE}")
    src.write_text(source)
    header = _show(rev, "kernels/pyfast.h")  # the fast-call wrappers it includes, where it has them
    if header is not None:
        (src_dir / "pyfast.h").write_text(header)
    cxx = cpu_build.compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler: nothing to compare")
    fn = ctypes.CDLL(str(cpu_build.build(src, cxx, build_dir / "so"))).tandem_paged_attention
    fn.restype, fn.argtypes = _INT, _ARGTYPES
    return fn  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revs", nargs="+", help="git revisions (commits, branches) to compare; the first is the reference")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=30,
                    help="layer pools read in turn: 30 (SmolLM2's) are out of cache; a few fit a large L3")
    ap.add_argument("--out", type=Path, default=Path("bench/results/attention_cpu_ab.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    torch.manual_seed(0)
    lens = [rng.randint(32, 512) + 64 for _ in range(args.batch)]
    pages = [(n + BS - 1) // BS for n in lens]
    num_blocks = sum(pages)
    pools = [torch.randn(num_blocks, 2, BS, HK, D) for _ in range(args.layers)]  # (blocks, K/V, slot, head, dim)
    tables = torch.zeros(args.batch, max(pages), dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):  # each sequence's pages consecutive
        tables[b, :n] = torch.arange(start, start + n, dtype=torch.int32)
        start += n
    q = torch.randn(args.batch, HQ, D)
    qsl = torch.arange(args.batch + 1, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)

    def step(fn: Callable[..., int], out: torch.Tensor) -> None:
        for pool in pools:
            sb, sk, ss, sh, _ = pool.stride()
            rc = fn(q.data_ptr(), q.stride(0), q.stride(1), pool.data_ptr(), 0, sb, sk, ss, sh, tables.data_ptr(),
                    tables.stride(0), qsl.data_ptr(), seq_lens.data_ptr(), out.data_ptr(), args.batch, args.batch,
                    HQ, HK, D, BS, num_blocks, tables.shape[1], 0, D**-0.5, 1.0)  # fmt: skip
            if rc != 0:
                raise RuntimeError(f"kernel returned {rc}")

    with tempfile.TemporaryDirectory() as tmp:
        fns = {rev: load(rev, Path(tmp)) for rev in args.revs}
        outs = {rev: torch.empty(args.batch, HQ, D) for rev in args.revs}
        times: dict[str, list[float]] = {rev: [] for rev in args.revs}
        load_avg = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for rev, fn in fns.items():
                t0 = time.perf_counter()
                step(fn, outs[rev])
                times[rev].append((time.perf_counter() - t0) / args.layers * 1e3)
        load_avg.append(os.getloadavg()[0])
    first = args.revs[0]
    rows: list[dict[str, Any]] = []
    for rev in args.revs:
        t = sorted(times[rev])
        same = torch.allclose(outs[rev], outs[first], atol=1e-5, rtol=1e-5)
        rows.append({"rev": rev, "ms_per_layer_median": t[len(t) // 2], "ms_per_layer_min": t[0],
                     "same_answer_as_first": same})  # fmt: skip
        print(f"{rev:>12}: {t[len(t) // 2]:.2f} ms a layer (median; min {t[0]:.2f}), "
              f"{t[len(t) // 2] / sorted(times[first])[len(t) // 2]:.2f}x {first}{'' if same else '  DIFFERENT ANSWER'}")
    kv_mb = sum(lens) * HK * D * 2 * 4 / 1e6
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
              "threads": args.threads, "layers": args.layers, "batch": args.batch, "mean_context": sum(lens) / len(lens),
              "kv_mb_per_layer": kv_mb, "load_avg": load_avg, "rounds": args.rounds, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"{kv_mb:.1f} MB of KV a layer; wrote {args.out}")


if __name__ == "__main__":
    main()
