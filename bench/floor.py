"""The floor of an engine run on this machine: what its forwards cannot avoid, measured alone.

For every step of a run (recorded by `StepRecorder`), the floor is the model's own matmuls at that
step's shapes (a decoder layer's four projections at T rows, times the layers, and the LM head at the
R sampled rows), each timed alone on the real weights through the modules and the head matmul the
engine calls (F.linear, oneDNN where engine.model.use_onednn_linears chose it, or a quantized kernel),
plus the KV the step's attention must read (every sequence's context, K and V of every layer) at this
machine's measured memory bandwidth.
Everything else (attention arithmetic, norms, rotary, sampling, the host's bookkeeping) is above it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.engine import Engine
from engine.model_runner import StepInput


@dataclass
class StepRecorder:
    """Wraps `engine.execute` to record each step's (T new tokens, R sampled rows, KV tokens read)."""

    steps: list[tuple[int, int, int]] = field(default_factory=list)

    def attach(self, engine: Engine) -> None:
        execute = engine.execute

        def recorded(step: StepInput, *args: Any, **kwargs: Any) -> Any:
            kv = sum(s.num_computed_tokens + n for s, n in zip(step.seqs, step.num_new_tokens, strict=True))
            self.steps.append((sum(step.num_new_tokens), sum(step.sample), kv))
            return execute(step, *args, **kwargs)

        engine.execute = recorded  # type: ignore[method-assign]


def _time(fn: Any, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _in_features(module: Any) -> int:
    """K of a projection module: nn.Linear and quantized modules say it; a ConcatLinear's shards do."""
    return int(module.in_features if hasattr(module, "in_features") else _in_features(module.shards[0]))


@torch.inference_mode()
def floor(engine: Engine, steps: list[tuple[int, int, int]]) -> dict[str, float]:
    """Seconds of matmuls and KV reads the recorded `steps` need at least, and the bandwidth used."""
    model = engine.runner.model
    mc = engine.runner.model_config
    layer: Any = model.layers[0]
    # the modules the engine calls, as loaded: nn.Linear (F.linear), OneDNNLinear or a quantized module
    projections: list[Any] = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                              layer.mlp.down_proj]
    dtype = model.norm.dtype  # the activation dtype

    def layer_matmuls(t: int) -> float:
        xs = [torch.randn(t, _in_features(p), dtype=dtype) for p in projections]
        return _time(lambda: [p(x) for x, p in zip(xs, projections, strict=True)])

    matmul_s = 0.0
    for t, count in Counter(t for t, _, _ in steps).items():
        matmul_s += layer_matmuls(t) * mc.num_layers * count
    for r, count in Counter(r for _, r, _ in steps if r).items():
        x = torch.randn(r, mc.hidden_size, dtype=dtype)
        matmul_s += _time(lambda x=x: model.head_matmul(x)) * count  # F.linear or oneDNN, as compute_logits
    # bandwidth: a copy of 256 MiB reads it once and writes it once
    src = torch.empty(64 << 20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _time(lambda: dst.copy_(src))
    kv_bytes = sum(kv for _, _, kv in steps) * 2 * mc.kv_size * engine.runner.kv_dtype.itemsize * mc.num_layers
    kv_s = kv_bytes / bandwidth
    return {"matmul_s": matmul_s, "kv_read_s": kv_s, "floor_s": matmul_s + kv_s, "kv_bytes": kv_bytes,
            "bandwidth_gb_s": bandwidth / 1e9, "steps": len(steps)}
