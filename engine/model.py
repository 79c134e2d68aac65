"""The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3, over a paged KV cache.

One forward takes a flat batch of new tokens from many sequences (T tokens in all) and the
`ForwardContext` describing where their KV lives; every layer stores its new K/V into the pool and
attends over each sequence's cached context plus its new tokens ("extend"). Prefill chunks, decode
steps and speculative verification are all this one call.

Weights use fused projections: `qkv_proj` stacks q, k, v rows and `gate_up_proj` stacks gate and up
rows, so a layer runs 4 matmuls. `load_weights` maps Hugging Face names onto them.

Tensor parallelism (engine/parallel): built with a `TPShard` and its `TPGroup`, each rank holds its
query and KV heads, its intermediate rows and its vocabulary rows (engine/parallel/shard.py): qkv_proj
and gate_up_proj are column-parallel (no communication), o_proj and down_proj row-parallel (their
outputs all-reduced), the embedding vocabulary-parallel (masked lookup, all-reduced) and the LM head
too (logits gathered to rank 0). The KV pool then holds only the rank's KV heads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from engine.config import ModelConfig
from engine.parallel.group import TPGroup
from engine.parallel.shard import TPShard
from kernels.onednn_linear import OneDNNLinear, available, onednn_linear_unchecked, prefers_onednn
from kernels.ops import Ops
from kernels.rotary import build_cos_sin_cache


@dataclass
class ForwardContext:
    """Where the batch's KV lives. Shapes: T new tokens in all, B sequences."""

    kv: Tensor  # (num_layers, num_blocks, 2, block_size, Hk, D)
    slot_mapping: Tensor  # (T,) int64: block_id * block_size + offset of each new token
    block_tables: Tensor  # (B, max_blocks) int32
    query_start_loc: Tensor  # (B+1,) int32: sequence b owns rows [qsl[b], qsl[b+1])
    seq_lens: Tensor  # (B,) int32: context length after this step
    max_query_len: int
    ops: Ops
    on_layer_done: Callable[[int], None] | None = None  # KV of layer l is final (transfer overlap)
    kv_scale: float | None = None  # fp8 pools: stored = value / kv_scale (kernels/kv_store.py)


def _shard(cfg: ModelConfig, shard: TPShard | None) -> TPShard:
    return shard if shard is not None else TPShard(cfg, 1, 0)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: TPShard | None = None,
                 group: TPGroup | None = None) -> None:
        super().__init__()
        sh = _shard(cfg, shard)
        self.layer_idx = layer_idx
        self.group = group
        self.num_heads, self.num_kv_heads, self.head_dim = sh.num_heads, sh.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = sh.q_size, sh.kv_size
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        self.eps = cfg.rms_norm_eps
        if self.qk_norm:
            self.q_norm = nn.Parameter(torch.empty(self.head_dim))
            self.k_norm = nn.Parameter(torch.empty(self.head_dim))

    def forward(self, positions: Tensor, x: Tensor, cos_sin: Tensor, ctx: ForwardContext) -> Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, q + 2kv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3: RMSNorm over head_dim, per head, before RoPE
            q = cast(Tensor, ctx.ops.rms_norm(q.reshape(-1, self.head_dim), self.q_norm, self.eps)).view_as(q)
            k = cast(Tensor, ctx.ops.rms_norm(k.reshape(-1, self.head_dim), self.k_norm, self.eps)).view_as(k)
        q, k = ctx.ops.rotary(positions, q, k, cos_sin)
        kv_layer = ctx.kv[self.layer_idx]  # (num_blocks, 2, block_size, Hk, D)
        ctx.ops.store_kv(k, v, kv_layer, ctx.slot_mapping, kv_scale=ctx.kv_scale)
        out = ctx.ops.paged_attention(
            q, kv_layer, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens, self.scale,
            self.sliding_window, max_query_len=ctx.max_query_len, kv_scale=ctx.kv_scale,
        )  # (T, Hq, D): this rank's heads
        out = self.o_proj(out.reshape(t, self.q_size))  # (T, H): this rank's partial sum
        return self.group.all_reduce(out) if self.group is not None else out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: TPShard | None = None, group: TPGroup | None = None) -> None:
        super().__init__()
        inter = _shard(cfg, shard).intermediate_size
        self.group = group
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, ops: Ops) -> Tensor:
        out = self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))  # (T, H): a partial sum under TP
        return self.group.all_reduce(out) if self.group is not None else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: TPShard | None = None,
                 group: TPGroup | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, shard, group)
        self.mlp = MLP(cfg, shard, group)
        self.input_layernorm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.eps = cfg.rms_norm_eps

    def forward(
        self, positions: Tensor, x: Tensor, residual: Tensor | None, cos_sin: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        ops = ctx.ops
        if residual is None:
            residual = x
            h = ops.rms_norm(x, self.input_layernorm, self.eps)
        else:
            h, residual = ops.rms_norm(x, self.input_layernorm, self.eps, residual)
        h = self.self_attn(positions, h, cos_sin, ctx)
        h, residual = ops.rms_norm(h, self.post_attention_layernorm, self.eps, residual)
        return self.mlp(h, ops), residual


class CausalLM(nn.Module):
    """forward(input_ids (T,), positions (T,), ctx) -> hidden (T, H); compute_logits -> (N, V) fp32
    (on rank 0 under tensor parallelism; the other ranks take part in the gather and get (0, V))."""

    def __init__(self, cfg: ModelConfig, shard: TPShard | None = None, group: TPGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.shard = _shard(cfg, shard)
        self.group = group if self.shard.size > 1 else None
        rows = self.shard.vocab_per_rank  # V, or Vp = ceil(V / tp) under TP
        self.embed_tokens = nn.Embedding(rows, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, shard, self.group) for i in range(cfg.num_layers)])
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, rows, bias=False)
        self.onednn_head = False  # compute_logits through oneDNN (use_onednn_linears), not F.linear
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)

    def init_rope(self, max_position: int) -> None:
        """(Re)build the rotary cache; call after weights are on their device. (max_position, D) fp32."""
        self.cos_sin_cache = build_cos_sin_cache(
            self.cfg.head_dim, max_position, self.cfg.rope_theta, self.cfg.rope_scaling,
            dtype=torch.float32, device=self.norm.device,
        )

    def embed(self, input_ids: Tensor) -> Tensor:
        """(T,) -> (T, H). Under TP each rank looks up the ids in its vocabulary rows (zeros elsewhere)
        and the ranks' rows are summed."""
        if self.group is None:
            return self.embed_tokens(input_ids)
        local = input_ids - self.shard.vocab_start
        outside = (local < 0) | (local >= self.shard.vocab_rows)
        x = self.embed_tokens(local.masked_fill(outside, 0))
        x.masked_fill_(outside[:, None], 0.0)
        return self.group.all_reduce(x)

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: ForwardContext) -> Tensor:
        x = self.embed(input_ids)  # (T, H)
        residual: Tensor | None = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, self.cos_sin_cache, ctx)
            if ctx.on_layer_done is not None:
                ctx.on_layer_done(cast(DecoderLayer, layer).self_attn.layer_idx)
        x, _ = ctx.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps, residual)
        return x

    @property
    def head_weight(self) -> Tensor:
        """The LM head's (V, H) weight, or (Vp, H) under TP: the embedding's when tied."""
        return self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def head_matmul(self, hidden: Tensor) -> Tensor:
        """(N, H) -> this rank's (N, V) or (N, Vp) logits in the model dtype: the LM head's matmul alone,
        through oneDNN when ``onednn_head`` is set (use_onednn_linears), else F.linear."""
        if self.onednn_head:
            return onednn_linear_unchecked(hidden, self.head_weight)
        return torch.nn.functional.linear(hidden, self.head_weight)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = self.head_matmul(hidden).float()  # (N, V), or (N, Vp) under TP
        if self.group is None or logits.shape[0] == 0:  # every rank knows the row count: all skip the gather
            return logits[:, : self.cfg.vocab_size]
        full = self.group.gather_last_dim(logits)  # (N, tp * Vp) on rank 0: rank r's rows at [r*Vp, (r+1)*Vp)
        if full is None:
            return logits.new_empty((0, self.cfg.vocab_size))
        return full[:, : self.cfg.vocab_size]

    # ----------------------------------------------------------------- loading
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy Hugging Face tensors into place one at a time; raise if any parameter is left unset.

        Under TP a tensor may come whole (its rank's slice is taken here) or already sliced (a
        safetensors `get_slice` read, engine.weights); the vocabulary padding rows are zeroed."""
        params = dict(self.named_parameters())
        sh = self.shard
        q, kv, inter = sh.q_size, sh.kv_size, sh.intermediate_size
        shards = {
            "q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, inter), "up_proj": ("gate_up_proj", inter, inter),
        }
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name.startswith("lm_head") and self.cfg.tie_word_embeddings):
                continue
            name = name.replace("_layernorm.weight", "_layernorm").replace("_norm.weight", "_norm")
            if name == "norm.weight":
                name = "norm"
            target, start, size = name, 0, None
            for short, (fused, offset, rows) in shards.items():
                if f".{short}." in name:
                    target, start, size = name.replace(short, fused), offset, rows
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {self.cfg.architecture}")
            param = params[target]
            tensor = self._take_slice(hf_name, tensor)
            dst = param.data if size is None else param.data.narrow(0, start, size)
            if target in ("embed_tokens.weight", "lm_head.weight") and sh.size > 1:
                dst[sh.vocab_rows :].zero_()  # padding rows of the last rank
                dst = dst[: sh.vocab_rows]
            if dst.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(f"{target}:{start}")
        expected = {f"{n}:{s}" for n in params for s in self._shard_starts(n, shards)}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _take_slice(self, hf_name: str, tensor: Tensor) -> Tensor:
        """This rank's part of `tensor`: narrowed when it came whole, as is when already sliced."""
        part = self.shard.slice_for(hf_name)
        if part is None or tensor.shape[part.dim] != part.full or part.size == part.full:
            return tensor
        return tensor.narrow(part.dim, part.start, part.size)

    @staticmethod
    def _shard_starts(name: str, shards: dict[str, tuple[str, int, int]]) -> list[int]:
        starts = [off for fused, off, _ in shards.values() if f".{fused}." in name]
        return starts or [0]


def _onednn_fits(weight: Tensor) -> bool:
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and prefers_onednn(*weight.shape)


def use_onednn_linears(model: CausalLM) -> list[str]:
    """Run ``model``'s float32 CPU linears that :func:`kernels.onednn_linear.prefers_onednn` takes (wide
    ones: the fused gate_up_proj, the LM head) through oneDNN instead of F.linear: each such plain
    nn.Linear is swapped for a :class:`OneDNNLinear` sharing its parameters, and the LM head (tied or
    not) is flagged. Quantized modules, other dtypes and devices are left alone, and so is everything
    where oneDNN is unavailable (logged once). Call once, after the weights are loaded and placed.
    Returns the qualified names that now use oneDNN ("lm_head" for the head)."""
    if not available():
        return []
    chosen: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not getattr(model, "lm_head", None) and _onednn_fits(child.weight):
                setattr(parent, name, OneDNNLinear.from_linear(child))
                chosen.append(f"{parent_name}.{name}" if parent_name else name)
    if _onednn_fits(model.head_weight):
        model.onednn_head = True
        chosen.append("lm_head")
    return chosen
