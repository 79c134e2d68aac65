"""`tandem quantize`: calibrated post-training quantization of a checkpoint, one decoder layer at a time,
written as a compressed-tensors checkpoint (training/compressed_writer.py) that Tandem loads as is.

    windows = num_samples x seq_len tokens drawn from the calibration text (the model's tokenizer)
    states  = the windows' hidden states entering layer 0 (embeddings)
    for each layer i:
        gptq  for qkv, o, gate_up, down in turn: run the layer on every window, collecting the projection's
              inputs into a Hessian; GPTQ it (training/gptq.py); put the rounded weight in place, so
              the next projection sees its inputs as the quantized model will (true-sequential)
              states <- the layer's outputs with its quantized weights
              asymmetric calibration (gptaq > 0): an unquantized copy of the layer first runs on
              fp_states (the unquantized model's states), giving each projection's unquantized inputs
              token for token (Hessian.add's x_fp) and fp_states <- that copy's outputs
        awq   run the layer once, collecting every projection's inputs; states <- its outputs (AWQ
              propagates unquantized activations); search scales and clips (training/awq.py); fold
              the scales into the RMSNorm weights
        rtn   round each projection to nearest (no data)
        save  OUT/_quantize/layer_<i>.safetensors, states_<i+1>.pt (states and fp_states), progress.json
              (done = i + 1), then states_<i>.pt removed   <- a rerun resumes at layer `done`

The forward pass is the engine's own model (engine/model.py) over a scratch paged KV cache, in float32 on
CPU. Scales are stored in the checkpoint's dtype and computed with it (training/quant_grid.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from engine.checkpoint import load_hf_config
from engine.device import TORCH_DTYPES
from engine.model import CausalLM, DecoderLayer, ForwardContext
from engine.model_runner import load_model
from engine.quant.apply import PROJECTIONS
from engine.quant.prequantized import detect
from engine.tokenizer import Tokenizer
from kernels.ops import select_ops
from training.awq import SEARCH_TOKENS, awq_layer
from training.compressed_writer import write_checkpoint
from training.data import WindowSampler, collect_text_files, tokenize_files
from training.gptq import Hessian, gptq_quantize
from training.quant_grid import GridSpec, QuantResult, rtn
from training.quantize_config import QuantizeConfig

logger = logging.getLogger(__name__)

STATE_DIR = "_quantize"
_BLOCK = 16
State = tuple[Tensor, Tensor | None]  # (hidden, residual) entering a layer, for one batch of windows


def calibration_windows(cfg: QuantizeConfig, tokenizer: Tokenizer) -> Tensor:
    """(num_samples, seq_len) int64 windows at random places of the calibration text."""
    files = [f for p in cfg.calib for f in collect_text_files(p)]
    tokens = tokenize_files(files, tokenizer)
    return WindowSampler(tokens, cfg.seq_len - 1, cfg.num_samples, cfg.seed).next()


class Calibration:
    """Runs one decoder layer over every batch of calibration windows (a scratch KV pool per batch)."""

    def __init__(self, model: CausalLM, windows: Tensor, batch_size: int) -> None:
        self.model, self.batches = model, list(windows.split(batch_size))
        b, t = min(batch_size, windows.shape[0]), windows.shape[1]
        mc = model.cfg
        self.blocks = math.ceil(t / _BLOCK)
        self.kv = torch.zeros(mc.num_layers, b * self.blocks, 2, _BLOCK, mc.num_kv_heads, mc.head_dim)
        self.ops = select_ops("torch", torch.device("cpu"))
        model.init_rope(max(t, mc.max_position_embeddings))

    def _ctx(self, b: int, t: int) -> tuple[Tensor, ForwardContext]:
        j = torch.arange(b)
        slots = (j[:, None] * self.blocks * _BLOCK + torch.arange(t)[None, :]).reshape(-1)
        ctx = ForwardContext(
            kv=self.kv, slot_mapping=slots,
            block_tables=(j[:, None] * self.blocks + torch.arange(self.blocks)[None, :]).to(torch.int32),
            query_start_loc=(torch.arange(b + 1) * t).to(torch.int32), seq_lens=torch.full((b,), t, dtype=torch.int32),
            max_query_len=t, ops=self.ops,
        )  # fmt: skip
        return torch.arange(t).repeat(b), ctx

    @torch.no_grad()
    def embed(self) -> list[State]:
        return [(self.model.embed_tokens(ids.reshape(-1)), None) for ids in self.batches]

    @torch.no_grad()
    def run(self, layer: DecoderLayer, states: list[State]) -> list[State]:
        """The layer's outputs for every batch (what enters the next layer)."""
        out = []
        for ids, (x, res) in zip(self.batches, states, strict=True):
            positions, ctx = self._ctx(*ids.shape)
            out.append(layer(positions, x, res, self.model.cos_sin_cache, ctx))
        return out

    @torch.no_grad()
    def feed(self, layer: DecoderLayer, states: list[State], module: torch.nn.Module, sink: Callable[[Tensor], None]) -> None:
        """Run the layer on every batch only as far as ``module``, handing ``sink`` its inputs (T, K): the
        rest of the layer is not needed for a Hessian (SmolLM2: ~2.4 layer passes instead of 4 for the four
        projections' Hessians, the MLP being most of a layer's time)."""

        def stop(_m: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            sink(args[0].detach())
            raise _Reached

        handle = module.register_forward_pre_hook(stop)
        try:
            for ids, (x, res) in zip(self.batches, states, strict=True):
                positions, ctx = self._ctx(*ids.shape)
                try:
                    layer(positions, x, res, self.model.cos_sin_cache, ctx)
                except _Reached:
                    pass
        finally:
            handle.remove()


class _Reached(Exception):
    """Raised by :meth:`Calibration.feed`'s hook once the projection's inputs are taken."""


def _capture(module: torch.nn.Module, sink: Callable[[Tensor], None]) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda _m, args: sink(args[0].detach()))


def _linear(layer: DecoderLayer, fused: str) -> torch.nn.Linear:
    parent = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
    return getattr(getattr(layer, parent), fused)


class LayerOutput(NamedTuple):
    results: dict[str, QuantResult]  # by fused projection name
    states: list[State]  # what enters the next layer
    fp_states: list[State] | None  # the same in the unquantized model (asymmetric calibration only)


def quantize_layer(
    cfg: QuantizeConfig, calib: Calibration | None, layer: DecoderLayer, states: list[State], scale_dtype: torch.dtype,
    fp_states: list[State] | None = None,
) -> LayerOutput:  # fmt: skip
    """Quantize one layer in place (see the module docstring). ``fp_states``: the unquantized model's states
    entering the layer, for GPTQ's asymmetric calibration (``cfg.gptaq_alpha``)."""
    bits, group, results = cfg.bits, cfg.group, {}
    if cfg.method == "rtn" or calib is None:
        for _, fused in PROJECTIONS:
            w = _linear(layer, fused).weight
            results[fused] = rtn(w, bits, group if group > 0 else w.shape[1], cfg.sym, scale_dtype)
        return LayerOutput(results, states, None)
    if cfg.method == "gptq":
        fp_inputs: dict[str, list[Tensor]] = {}
        fp_next = None
        if fp_states is not None:  # the unquantized layer's projection inputs, token for token
            fp_layer = copy.deepcopy(layer)
            fp_inputs = {fused: [] for _, fused in PROJECTIONS}
            handles = [_capture(_linear(fp_layer, f), fp_inputs[f].append) for f in fp_inputs]
            fp_next = calib.run(fp_layer, fp_states)
            for h in handles:
                h.remove()
            del fp_layer
        for _, fused in PROJECTIONS:
            lin = _linear(layer, fused)
            hess = Hessian(lin.in_features)
            if fp_inputs:
                paired = iter(fp_inputs.pop(fused))
                calib.feed(layer, states, lin, lambda x, it=paired, hs=hess: hs.add(x, next(it)))  # type: ignore[misc]
            else:
                calib.feed(layer, states, lin, hess.add)
            r = gptq_quantize(lin.weight, hess.h, bits, group, cfg.sym, cfg.gptq_act_order, scale_dtype, cfg.damp,
                              mse=cfg.gptq_mse_grid, static_groups=cfg.gptq_static_groups, dxx=hess.dxx,
                              alpha=cfg.gptaq_alpha)  # fmt: skip
            lin.weight.data.copy_(r.dequantized())
            results[fused] = r
        return LayerOutput(results, calib.run(layer, states), fp_next)
    seen: dict[str, list[Tensor]] = {fused: [] for _, fused in PROJECTIONS}

    def keep(name: str) -> Callable[[Tensor], None]:
        return lambda x: seen[name].append(x) if sum(map(len, seen[name])) < SEARCH_TOKENS else None

    handles = [_capture(_linear(layer, f), keep(f)) for f in seen]
    nxt = calib.run(layer, states)
    for h in handles:
        h.remove()
    weights = {f: _linear(layer, f).weight for f in seen}
    attn = layer.self_attn
    spec = GridSpec(bits, group, cfg.sym, scale_dtype)
    scales, results = awq_layer(weights, {f: torch.cat(v) for f, v in seen.items()}, layer.mlp.down_proj.in_features,
                                attn.q_size + attn.kv_size, spec)  # fmt: skip
    layer.input_layernorm.data /= scales.qkv
    layer.post_attention_layernorm.data /= scales.gate_up
    return LayerOutput(results, nxt, None)


def _states_file(state: Path, done: int) -> Path:
    """The states entering layer ``done``: one file per count, so progress.json's count always has its
    own (a run killed between writing the states and progress.json resumes from the older pair)."""
    return state / f"states_{done}.pt"


def _save_layer(state: Path, i: int, layer: DecoderLayer, out: LayerOutput) -> None:
    tensors = {f"{name}.{field}": getattr(r, field) for name, r in out.results.items()
               for field in ("codes", "scales", "zeros", "g_idx") if getattr(r, field) is not None}  # fmt: skip
    tensors["input_layernorm"] = layer.input_layernorm.data
    tensors["post_attention_layernorm"] = layer.post_attention_layernorm.data
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(state / f"layer_{i}.safetensors"))
    tmp = state / "states.tmp"
    torch.save({"states": out.states, "fp_states": out.fp_states}, tmp)
    tmp.replace(_states_file(state, i + 1))


def _load_layer(state: Path, i: int, cfg: QuantizeConfig, layer: DecoderLayer) -> dict[str, QuantResult]:
    t = load_file(str(state / f"layer_{i}.safetensors"))
    layer.input_layernorm.data.copy_(t["input_layernorm"])
    layer.post_attention_layernorm.data.copy_(t["post_attention_layernorm"])
    out = {}
    for _, fused in PROJECTIONS:
        k = t[f"{fused}.codes"].shape[1]
        out[fused] = QuantResult(t[f"{fused}.codes"], t[f"{fused}.scales"], t[f"{fused}.zeros"],
                                 t.get(f"{fused}.g_idx"), cfg.group if cfg.group > 0 else k, cfg.bits)  # fmt: skip
    return out


def _settings(cfg: QuantizeConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k != "out"}


def quantize_checkpoint(cfg: QuantizeConfig, stop_after: int | None = None, progress: bool = True) -> Path | None:
    """Quantize ``cfg.model`` into ``cfg.out``; returns the checkpoint directory, or None when ``stop_after``
    layers were done in this call (run it again to resume). A run in ``cfg.out`` with the same settings
    is resumed after its last finished layer. Raises ValueError for an already quantized model, a run
    in ``cfg.out`` with other settings, or calibration text that cannot be read.
    """
    hf = load_hf_config(cfg.model)
    if detect(hf) is not None:
        raise ValueError(f"{cfg.model} is already quantized ({hf['quantization_config'].get('quant_method')})")
    out, started = Path(cfg.out), time.perf_counter()
    state = out / STATE_DIR
    progress_file = state / "progress.json"
    done = 0
    if progress_file.is_file():
        saved = json.loads(progress_file.read_text())
        if saved["settings"] != _settings(cfg):
            raise ValueError(f"{out} holds an unfinished run with other settings {saved['settings']}; "
                             "remove it or use the same settings")
        done = int(saved["done"])
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no unfinished `tandem quantize` run")
    state.mkdir(parents=True, exist_ok=True)
    scale_dtype = TORCH_DTYPES.get(str(hf.get("torch_dtype") or "float32"), torch.float32)
    model = load_model(cfg.model, torch.float32, torch.device("cpu"), gguf_dequantize=True)
    calib = None
    if cfg.method != "rtn":
        calib = Calibration(model, calibration_windows(cfg, Tokenizer.from_dir(cfg.model)), cfg.batch_size)
    saved_states = torch.load(_states_file(state, done)) if done else {}
    states: list[State] = saved_states["states"] if done else (calib.embed() if calib else [])
    fp_states: list[State] | None = None
    if calib is not None and cfg.gptaq_alpha > 0:
        fp_states = saved_states["fp_states"] if done else calib.embed()
    results: dict[tuple[int, str], QuantResult] = {}
    for i in range(done):
        results.update({(i, f): r for f, r in _load_layer(state, i, cfg, cast(DecoderLayer, model.layers[i])).items()})
    layers = tqdm(range(done, len(model.layers)), desc=f"quantize ({cfg.method})", unit="layer", file=sys.stderr,
                  initial=done, total=len(model.layers), disable=not progress)  # fmt: skip
    for i in layers:
        t0 = time.perf_counter()
        layer = cast(DecoderLayer, model.layers[i])
        step = quantize_layer(cfg, calib, layer, states, scale_dtype, fp_states)
        states, fp_states = step.states, step.fp_states
        results.update({(i, f): r for f, r in step.results.items()})
        _save_layer(state, i, layer, step)
        progress_tmp = state / "progress.tmp"
        progress_tmp.write_text(json.dumps({"settings": _settings(cfg), "done": i + 1}))
        progress_tmp.replace(progress_file)
        _states_file(state, i).unlink(missing_ok=True)
        logger.info("layer %d/%d quantized (%s) in %.1f s", i + 1, len(model.layers), cfg.method,
                    time.perf_counter() - t0)
        if stop_after is not None and i + 1 - done >= stop_after and i + 1 < len(model.layers):
            logger.info("stopping after %d layers; run again to resume", stop_after)
            return None
    write_checkpoint(model, results, cfg, scale_dtype, out)
    shutil.rmtree(state)
    logger.info("wrote %s (%s, %d-bit, group %s) in %.0f s", out, cfg.method, cfg.bits, cfg.group,
                time.perf_counter() - started)
    return out
