"""What each rank of a real 2-process gloo group runs in tests/engine/test_tensor_parallel.py.

Rank 0 first runs every checkpoint unsharded (tensor_parallel_size 1) greedily: a prefill, then decode
steps, keeping each step's logits. Its tokens go to rank 1; then both ranks run the same steps on their
shards (teacher-forced on those tokens, a prefill chunk and single-token decode steps over the paged
KV cache), and rank 0 compares each step's gathered logits with the unsharded ones. Then the KV relay
(engine/parallel/relay.py): every rank's heads of the run's pages are gathered into whole pages on rank 0,
which must equal the unsharded pool's pages, scattered back into other blocks and gathered again. Results
go back through `out` (a multiprocessing queue): (case, max |logit difference|, argmax equal at every step,
KV heads per rank, logit std, max |relayed page - unsharded page|, scatter-then-gather exact, the sharded
projections' module types).
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.model_runner import ModelRunner, StepInput
from engine.parallel.group import TPGroup, destroy_group, init_group
from engine.parallel.relay import gather_layer, gather_pages, scatter_pages
from engine.quant import projection_modules
from engine.sampling.params import SamplingParams
from engine.sequence import Sequence

PROMPT = [5, 17, 300, 42, 9, 77, 128, 3, 64, 21, 999, 7, 250]
DECODE_STEPS = 6


def _config(path: str, tp: int, quantization: str | None) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=16, block_size=8,
                        tensor_parallel_size=tp, quantization=quantization)


def _steps(runner: ModelRunner, forced: list[int] | None) -> tuple[list[int], list[torch.Tensor]]:
    """A prefill of PROMPT then DECODE_STEPS decode steps: greedy tokens (or `forced`) and each step's logits."""
    seq = Sequence("tp", list(PROMPT), SamplingParams(temperature=0.0), token_ids=list(PROMPT))
    seq.block_table = list(range(4))
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    new = len(PROMPT)
    for i in range(DECODE_STEPS + 1):
        out = runner.forward_logits(StepInput([seq], [new], [True]))  # (1, V) on rank 0, (0, V) elsewhere
        logits.append(out.clone())
        seq.num_computed_tokens += new
        token = forced[i] if forced is not None else int(out[0].argmax())
        tokens.append(token)
        seq.append_token(token)
        new = 1
    return tokens, logits


def _relay(group: TPGroup, runner: ModelRunner, ref: ModelRunner | None) -> tuple[float, bool]:
    """Gather pages 0..2 into whole pages, compare with the unsharded pool; scatter them to blocks 8..10,
    gather those again: (max difference from the unsharded pages, the round trip exact)."""
    kv, heads = runner.kv, runner.model_config.num_kv_heads
    layers, _, two, bs, _, d = kv.shape
    whole = torch.zeros((layers, 3, two, bs, heads, d)) if group.rank == 0 else None
    again = torch.zeros_like(whole) if whole is not None else None
    sids = torch.arange(3) if group.rank == 0 else None
    by_layer = torch.zeros_like(whole) if whole is not None else None
    gather_pages(group, kv, torch.arange(3), heads, whole, sids)
    for layer in range(layers):  # as a TP prefill forward does, layer by layer
        gather_layer(group, kv, layer, torch.arange(3), heads, by_layer, sids)
    scatter_pages(group, kv, torch.arange(8, 11), heads, whole, sids)
    gather_pages(group, kv, torch.arange(8, 11), heads, again, sids)
    if whole is None or again is None or by_layer is None or ref is None:
        return 0.0, True
    return float((whole - ref.kv[:, :3]).abs().max()), torch.equal(whole, again) and torch.equal(whole, by_layer)


def rank_main(rank: int, addr: str, cases: list[tuple[str, str, str | None]], out: Any) -> None:
    try:
        group = init_group(rank, 2, addr, 60.0, torch.device("cpu"))
        for name, path, quant in cases:
            ref_tokens: list[int] = []
            ref_logits: list[torch.Tensor] = []
            ref = None
            if rank == 0:
                ref = ModelRunner(_config(path, 1, quant))
                ref_tokens, ref_logits = _steps(ref, None)
            box = [ref_tokens]
            dist.broadcast_object_list(box, src=0)
            runner = ModelRunner(_config(path, 2, quant), group=group)
            tokens, logits = _steps(runner, box[0])
            relay_diff, round_trip = _relay(group, runner, ref)
            if rank == 0:
                diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
                same = all(int(a[0].argmax()) == t for a, t in zip(logits, ref_tokens, strict=True))
                kinds = sorted({type(m).__name__ for _, m in projection_modules(runner.model)})
                out.put((name, diff, same, runner.kv.shape[4], float(ref_logits[0].std()), relay_diff, round_trip,
                         kinds))  # fmt: skip
        destroy_group()
    except BaseException:
        out.put(("error", rank, traceback.format_exc()))
        raise
