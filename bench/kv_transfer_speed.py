"""KV transfer throughput: KVSender -> KVReceiver (another process) over tcp loopback and ipc, against a
plain torch copy of the same bytes in one process.

Run from the repository root: `.venv/bin/python -m bench.kv_transfer_speed [--tokens 1024 4096 16384] [--reps 3]`.
The layout is
Llama-3.2-1B's (16 layers, 8 KV heads, head_dim 64, bfloat16, 16-token blocks: 32 KiB per page,
32 KiB of KV per token). Two placements: "contiguous" (both sides' blocks are one run: zero-copy frames
sent and received straight into the pool) and "fragmented" (random blocks on both sides: pages gathered
into staging frames and scattered on arrival). GB/s are 1e9 bytes/s over each side's own window:
sender first KV byte -> KVDone, receiver first frame -> last frame written. `copy` is the same
bytes moved by `dst.copy_(src)` (contiguous) or `dst[:, d] = src[:, s]` (fragmented). Best of reps.
Writes bench/results/kvtransfer.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kvtransfer import CompletedTransfer, KVLayout, KVReceiver, KVSender

SHAPE = dict(num_layers=16, block_size=16, num_kv_heads=8, head_dim=64)  # Llama-3.2-1B
FINGERPRINT = "llama-3.2-1b-shaped"


def pool(num_blocks: int, dtype: torch.dtype, fill: bool) -> torch.Tensor:
    s = SHAPE
    kv = torch.empty(s["num_layers"], num_blocks, 2, s["block_size"], s["num_kv_heads"], s["head_dim"], dtype=dtype)
    return kv.normal_() if fill else kv.zero_()  # written either way: no first-touch page faults later


def placement(name: str, n: int, num_blocks: int, seed: int) -> list[int]:
    if name == "contiguous":
        return list(range(n))
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def receiver_main(bind: str, num_blocks: int, dtype: str, events: Any, commands: Any) -> None:
    kv = pool(num_blocks, getattr(torch, dtype), fill=False)

    def want(rid: str, n: int) -> None:  # the same blocks every time: no leaks
        receiver.grant(rid, placement(rid.split("/")[0], n, num_blocks, seed=2))

    def on_complete(done: CompletedTransfer) -> None:
        events.put({"rid": done.request_id, "seconds": done.seconds, "bytes": done.bytes})

    receiver = KVReceiver(kv, KVLayout.for_pool(kv, FINGERPRINT), bind, want=want,
                          release=lambda rid, ids: None, on_complete=on_complete, timeout_s=60)
    events.put({"address": receiver.address})
    commands.get()
    receiver.close()


def copy_gbps(src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int], contiguous: bool,
              reps: int) -> float:
    nbytes = src[:, src_ids].numel() * src.element_size()
    best = float("inf")
    s, d = torch.tensor(src_ids), torch.tensor(dst_ids)
    for _ in range(reps):
        t0 = time.perf_counter()
        if contiguous:
            dst[:, : len(dst_ids)].copy_(src[:, : len(src_ids)])
        else:
            dst[:, d] = src[:, s]
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kvtransfer.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the copy baseline gets one core, like the transport's I/O thread
    bs = SHAPE["block_size"]
    num_blocks = max(args.tokens) // bs + 64
    dtype = getattr(torch, args.dtype)
    src = pool(num_blocks, dtype, fill=True)
    layout = KVLayout.for_pool(src, FINGERPRINT)
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tandem-kvbench-", dir="/tmp") as tmp:
        for transport in ("tcp", "ipc"):
            bind = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp}/rx"
            events, commands = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=receiver_main, args=(bind, num_blocks, args.dtype, events, commands))
            proc.start()
            address = events.get(timeout=60)["address"]
            sender = KVSender(src, layout, timeout_s=60)
            try:
                for place in ("contiguous", "fragmented"):
                    for tokens in args.tokens:
                        n = -(-tokens // bs)
                        ids = placement(place, n, num_blocks, seed=1)
                        best: dict[str, float] = {}
                        for rep in range(args.reps + 1):  # rep 0 warms up
                            t0 = time.perf_counter()
                            handle = sender.begin(f"{place}/{tokens}/{rep}", address, ids, tokens)
                            handle.all_ready()
                            result = handle.result(timeout=120)
                            total = time.perf_counter() - t0
                            if not result.ok:
                                raise RuntimeError(result.error)
                            recv = events.get(timeout=60)
                            if rep:
                                for key, value in (("sender", result.seconds), ("receiver", recv["seconds"]),
                                                   ("end_to_end", total)):
                                    best[key] = min(best.get(key, float("inf")), value)
                        rows.append({"transport": transport, "placement": place, "tokens": tokens, "blocks": n,
                                     "bytes": result.bytes, **{f"{k}_s": v for k, v in best.items()},
                                     **{f"{k}_gbps": result.bytes / v / 1e9 for k, v in best.items()}})
                        print(_fmt(rows[-1]), flush=True)
            finally:
                sender.close()
                commands.put("stop")
                proc.join(30)
    dst = pool(num_blocks, dtype, fill=False)
    for place in ("contiguous", "fragmented"):
        for tokens in args.tokens:
            n = -(-tokens // bs)
            s_ids, d_ids = placement(place, n, num_blocks, 1), placement(place, n, num_blocks, 2)
            gbps = copy_gbps(src, dst, s_ids, d_ids, place == "contiguous", args.reps)
            rows.append({"transport": "copy", "placement": place, "tokens": tokens, "blocks": n,
                         "bytes": layout.transfer_bytes(n), "sender_gbps": gbps})
            print(_fmt(rows[-1]), flush=True)
    record = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
              "cpu_count": os.cpu_count(), "layout": {**SHAPE, "dtype": args.dtype},
              "page_bytes": layout.page_bytes, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


def _fmt(row: dict[str, Any]) -> str:
    mib = row["bytes"] / (1 << 20)
    cols = " ".join(f"{k[:-5]} {row[k]:6.2f} GB/s" for k in ("sender_gbps", "receiver_gbps", "end_to_end_gbps")
                    if k in row)
    return f"{row['transport']:4} {row['placement']:10} {row['tokens']:6} tok {mib:7.1f} MiB  {cols}"


if __name__ == "__main__":
    main()
