"""CUDA graphs of the decode forward: the model's kernel launches recorded once per padded batch size at
start-up and replayed for every step that only decodes.

Why: a decode step's forward is hundreds of small launches (about ten per layer, each a Python call into
torch or a Triton launcher), and on a GPU their host cost is the step: a 16-layer 1B model at batch 256
spends about 10 ms of host time launching what the H200 runs in about 1 ms (docs/benchmarks.md, "GPU").
A replay is one launch.

What is captured: `model(input_ids, positions, ctx)` -> hidden (b, H) for b in `capture_sizes`, reading
static input buffers (token ids, positions, slots, block tables, context lengths) that `run` fills
before each replay; the logits projection and sampling run eagerly on the real rows after it. A step
replays the smallest graph of at least its n rows; the padded rows n..b get slot -1 (store nothing,
kernels/kv_store.py) and context length 1 (attention reads one cached row of a real block, never
written, and their output is dropped). The block-table buffer is as wide as the longest sequence the
engine admits, so the decode kernel's split count (chosen from that width) is the same at every replay.

Which steps replay (`fits`): every sequence computes one token and samples it (T = B = R), the step's
block tables fit the buffer, and the runner passes no per-layer hook, copy-on-write pages or prompt
logprobs; everything else (prefill chunks, mixed steps, speculative verification) runs eagerly. Not
under tensor parallelism (rank 0 drives its followers' collectives step by step).
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import Tensor

from engine.model import CausalLM, ForwardContext
from kernels.ops import Ops

logger = logging.getLogger(__name__)

MAX_CAPTURED_BATCH = 512


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 16, up to max_batch
    (itself included), at most MAX_CAPTURED_BATCH."""
    top = max(1, min(max_batch, MAX_CAPTURED_BATCH))
    sizes = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    """Interface (the thread that runs forwards; built on the runner's thread, after the KV pool):

    fits(n, rows, max_query_len, width)  whether a step of n rows can replay a graph (see module doc)
    run(input_ids, positions, ctx)       hidden (n, H) of the step, from one graph replay
    replays                              steps served from a graph so far (a counter)
    """

    def __init__(self, model: CausalLM, kv: Tensor, ops: Ops, kv_scale: float | None, max_batch: int,
                 max_blocks: int, device: torch.device) -> None:
        self.model = model
        self.sizes = capture_sizes(max_batch)
        self.max_blocks = max_blocks
        self.replays = 0
        top = self.sizes[-1]
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(top, dtype=i64, device=device)  # (top,)
        self.positions = torch.zeros(top, dtype=i64, device=device)  # (top,)
        self.slot_mapping = torch.full((top,), -1, dtype=i64, device=device)  # (top,): -1 stores nothing
        self.block_tables = torch.zeros((top, max_blocks), dtype=i32, device=device)  # (top, max_blocks)
        self.seq_lens = torch.ones(top, dtype=i32, device=device)  # (top,)
        self.query_start_loc = torch.arange(top + 1, dtype=i32, device=device)  # (top + 1,): a row per sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, Tensor] = {}  # b -> (b, H), written by graph b's replay
        t0 = time.perf_counter()
        pool = None
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            ctx = ForwardContext(kv=kv, slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                 query_start_loc=self.query_start_loc[: b + 1], seq_lens=self.seq_lens[:b],
                                 max_query_len=1, ops=ops, kv_scale=kv_scale)
            model(self.input_ids[:b], self.positions[:b], ctx)  # eager first: Triton compiles, cuBLAS chooses
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (a previous engine's forward thread letting go of
            # its graphs, say) cannot invalidate this capture, as they can in the default global mode
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.hidden[b] = model(self.input_ids[:b], self.positions[:b], ctx)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(device)
        logger.info("captured %d CUDA graphs of the decode forward (batch 1..%d) in %.1f s", len(self.sizes), top,
                    time.perf_counter() - t0)

    def fits(self, n: int, rows: int, max_query_len: int, width: int) -> bool:
        return 0 < n <= self.sizes[-1] and rows == n and max_query_len == 1 and width <= self.max_blocks

    def run(self, input_ids: Tensor, positions: Tensor, ctx: ForwardContext) -> Tensor:
        n = input_ids.shape[0]
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.block_tables[:n, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        self.seq_lens[:n].copy_(ctx.seq_lens)
        self.seq_lens[n:b].fill_(1)
        self.graphs[b].replay()
        self.replays += 1
        return self.hidden[b][:n]
