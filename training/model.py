"""A dense, differentiable twin of the serving model, for training and distillation.

`TrainableLM` runs Llama / Mistral / Qwen2 / Qwen3 over whole padded-free batches with causal
`scaled_dot_product_attention`; no KV cache, so it is for training and offline evaluation only.
Its parameter names are exactly the Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...,
`lm_head.weight`), so loading and saving are plain `state_dict` traffic:

    TrainableLM.from_pretrained(dir)   config.json + safetensors -> module (float32 by default)
    model(input_ids (B, L)) -> logits (B, L, V) float32
    save_hf_checkpoint(model, out_dir, tokenizer_src_dir)   -> a directory the engine and transformers load

The math follows the engine op for op (`rms_norm_ref`, `rotary_ref`, the same cos/sin cache), so in
float32 its logits match `engine.model.CausalLM` and transformers to ~1e-5.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.checkpoint import INDEX_FILE, CheckpointError, load_hf_config, safetensors_files
from engine.config import ModelConfig
from engine.device import TORCH_DTYPES as DTYPES
from engine.weights import iter_safetensors
from kernels.rmsnorm import rms_norm_ref
from kernels.rotary import build_cos_sin_cache, rotary_ref

logger = logging.getLogger(__name__)

# Tokenizer-side files a checkpoint may carry; whichever exist are copied from the teacher.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


class RMSNorm(nn.Module):
    """`weight * x / rms(x)` over the last dim; the parameter is named `weight`, as in Hugging Face."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        out = rms_norm_ref(x.reshape(-1, shape[-1]), self.weight, self.eps)
        assert isinstance(out, Tensor)
        return out.reshape(shape)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, cos_sin: Tensor, mask: Tensor | None) -> Tensor:
        cfg = self.cfg
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b * length, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b * length, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary_ref(positions, q, k, cos_sin)  # (B*L, H, D)
        # (B, heads, L, D); K/V heads repeated to the query heads (grouped-query attention)
        group = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.reshape(b, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2).repeat_interleave(group, 1)
        v = v.transpose(1, 2).repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, cos_sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cos_sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TrainableLM(nn.Module):
    """A decoder-only LM built from a Hugging Face config dict; `forward(input_ids) -> logits`.

    `hf_config` is kept (copied) so `save_hf_checkpoint` can write it back; its shape fields must
    describe this module. Raises ValueError for an unsupported architecture (see `ModelConfig.from_hf`).
    """

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        self.hf_config = dict(hf_config)
        self.cfg = ModelConfig.from_hf(self.hf_config)
        self.model = Backbone(self.cfg)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False)
        self.cos_sin_cache: Tensor
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> TrainableLM:
        """Load a checkpoint directory. Raises CheckpointError/ValueError for missing, unexpected or
        mis-shaped tensors (a tied checkpoint's `lm_head.weight`, if present, is ignored)."""
        model = cls(load_hf_config(model_dir))
        model.load_weights(dict(iter_safetensors(model_dir)))
        return model.to(dtype)

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """A GPT-2-style init: N(0, std) matrices and embeddings, residual outputs (o_proj, down_proj)
        scaled by 1/sqrt(2 * layers), zero biases, unit norms. Deterministic in `seed`."""
        gen = torch.Generator().manual_seed(seed)
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Copy Hugging Face-named tensors into place (cast to each parameter's dtype).

        Raises ValueError naming the first missing, unexpected or mis-shaped tensor.
        """
        own = self.state_dict()
        weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
        if self.cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit {self.cfg.architecture}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        for name, tensor in weights.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
        self.load_state_dict(weights)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope(self, length: int, device: torch.device) -> Tensor:
        """The (>= length, head_dim) float32 cos/sin cache, rebuilt when too short or elsewhere."""
        cache = self.cos_sin_cache
        if cache.shape[0] < length or cache.device != device:
            size = max(length, min(self.cfg.max_position_embeddings, 4096))
            cache = build_cos_sin_cache(self.cfg.head_dim, size, self.cfg.rope_theta, self.cfg.rope_scaling,
                                        dtype=torch.float32, device=device)
            self.cos_sin_cache = cache
        return cache

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) int64 -> final-normed hidden states (B, L, H), positions 0..L-1."""
        b, length = input_ids.shape
        if length > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        device = input_ids.device
        cos_sin = self._rope(length, device)
        positions = torch.arange(length, device=device).repeat(b)  # (B*L,), rows laid out batch-major
        mask = None
        window = self.cfg.sliding_window
        if window is not None and length > window:
            # Mistral: key j is visible from query i iff i - window < j <= i (an explicit (L, L) mask).
            i = torch.arange(length, device=device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, cos_sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) int64 -> logits (B, L, V) float32; causal, no padding."""
        h = self.hidden_states(input_ids)
        weight = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, weight).float()


def _generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    return {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}


def save_hf_checkpoint(
    model: TrainableLM, out_dir: str | Path, tokenizer_src_dir: str | Path | None, dtype: str = "float32"
) -> Path:
    """Write `model` as a Hugging Face checkpoint in `out_dir` (created; old weight files replaced).

    Files: config.json (the model's `hf_config`, `torch_dtype` = `dtype`), model.safetensors (tensors
    cast to `dtype`; a tied model omits lm_head.weight), the tokenizer files and generation_config.json
    copied from `tokenizer_src_dir` (generation_config.json is derived from the config when absent
    there). `tokenizer_src_dir` may equal `out_dir` or be None (nothing copied). Returns `out_dir`.
    Raises ValueError for an unknown dtype, CheckpointError if `tokenizer_src_dir` has no tokenizer.json.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(tokenizer_src_dir) if tokenizer_src_dir is not None else None
    if src is not None and not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src} has no tokenizer.json to copy")
    config = dict(model.hf_config, torch_dtype=dtype)
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    if src is not None and src.resolve() != out.resolve():
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    if not (out / "generation_config.json").is_file():
        (out / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
    if (out / INDEX_FILE).is_file() or list(out.glob("*.safetensors")):
        for old in [*safetensors_files(out), out / INDEX_FILE]:
            old.unlink(missing_ok=True)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    logger.info("saved %s (%.2fM parameters, %s) to %s", model.cfg.architecture, model.num_parameters / 1e6,
                dtype, out)
    return out
