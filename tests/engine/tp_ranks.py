"""What each rank of a real 2-process gloo group runs in tests/engine/test_tensor_parallel.py.

Rank 0 first runs every checkpoint unsharded (tensor_parallel_size 1) greedily: a prefill, then decode
steps, keeping each step's logits. Its tokens go to rank 1; then both ranks run the same steps on their
shards (teacher-forced on those tokens, a prefill chunk and single-token decode steps over the paged
KV cache), and rank 0 compares each step's gathered logits with the unsharded ones. Results go back
through `out` (a multiprocessing queue): (case, max |logit difference|, argmax equal at every step).
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.model_runner import ModelRunner, StepInput
from engine.parallel.group import destroy_group, init_group
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


def rank_main(rank: int, addr: str, cases: list[tuple[str, str, str | None]], out: Any) -> None:
    try:
        group = init_group(rank, 2, addr, 60.0, torch.device("cpu"))
        for name, path, quant in cases:
            ref_tokens: list[int] = []
            ref_logits: list[torch.Tensor] = []
            if rank == 0:
                ref_tokens, ref_logits = _steps(ModelRunner(_config(path, 1, quant)), None)
            box = [ref_tokens]
            dist.broadcast_object_list(box, src=0)
            runner = ModelRunner(_config(path, 2, quant), group=group)
            tokens, logits = _steps(runner, box[0])
            if rank == 0:
                diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
                same = all(int(a[0].argmax()) == t for a, t in zip(logits, ref_tokens, strict=True))
                out.put((name, diff, same, runner.kv.shape[4], float(ref_logits[0].std())))
        destroy_group()
    except BaseException:
        out.put(("error", rank, traceback.format_exc()))
        raise
