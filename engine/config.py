"""Frozen, validated configuration.

`ModelConfig` is what the model runtime needs from a Hugging Face `config.json`; `EngineConfig` is
what a person chooses when starting an engine. Both reject bad values with `ValueError` naming the
field, the value and what is allowed. Derived values are properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SPECULATIVE_METHODS: tuple[str, ...] = ("ngram",)
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_SPECULATIVE_TOKENS = 4
QUANTIZATIONS: tuple[str, ...] = ("int8", "int4", "fp8")  # engine/quant; docs/quantization.md
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one decoder-only transformer, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    sliding_window: int | None
    checkpoint_dtype: str

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} (config.json 'architectures'={archs!r}); "
                f"Tandem supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        # transformers 5 moved rope settings into `rope_parameters`.
        rope_params = cfg.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        sliding = None
        if arch == "MistralForCausalLM":
            sliding = cfg.get("sliding_window")
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and cfg.get("use_sliding_window"):
            sliding = cfg.get("sliding_window")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(sliding) if sliding else None,
            checkpoint_dtype=dtype if dtype in DTYPES else "float32",
        )

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """auto: the checkpoint's dtype on GPU, float32 on CPU."""
    key = _DTYPE_ALIASES.get(name, name)
    if key == "auto":
        return DTYPES[checkpoint_dtype] if device.type == "cuda" else torch.float32
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class EngineConfig:
    """Everything a person picks when starting an engine (offline, prefill or decode worker)."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    kv_cache_memory_bytes: int | None = None  # None: a fraction of free memory (GPU) or 2 GiB (CPU)
    num_kv_blocks: int | None = None  # overrides the memory budget (tests)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | torch | triton
    quantization: str | None = None  # int8 | int4 | fp8: projection weights quantized at load (engine/quant)
    kv_cache_dtype: str = "auto"  # auto: the model dtype | fp8: float8_e4m3fn pages (kernels/kv_store.py)
    seed: int = 0
    # speculative decoding (engine.spec; docs/speculative.md): at most one of model / method
    speculative_model: str | None = None  # a draft checkpoint with the target's tokenizer
    speculative_method: str | None = None  # "ngram": prompt lookup, no model
    num_speculative_tokens: int | None = None  # k in 1..16; None: DEFAULT_SPECULATIVE_TOKENS
    speculative_adaptive: bool = True  # shrink k (to 0) when verifying costs more than it yields
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose one of "
                             f"{', '.join(QUANTIZATIONS)} (or None)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        key = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if key != "auto" and key not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        resolve_device(self.device) if self.device != "auto" else None
        self._check_speculation()

    def _check_speculation(self) -> None:
        if self.speculative_model is not None and self.speculative_method is not None:
            raise ValueError(f"set speculative_model ({self.speculative_model!r}) or speculative_method "
                             f"({self.speculative_method!r}), not both")
        if self.speculative_method is not None and self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, got "
                             f"{self.speculative_method!r} (a draft model is given as speculative_model=DIR)")
        k = self.num_speculative_tokens
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
                raise ValueError(f"num_speculative_tokens must be an integer in 1..{MAX_SPECULATIVE_TOKENS}, "
                                 f"got {k!r}")
            if not self.speculative:
                raise ValueError("num_speculative_tokens needs speculative_model or speculative_method")

    @property
    def speculative(self) -> bool:
        """Whether this engine speculates (a draft model or n-gram lookup)."""
        return self.speculative_model is not None or self.speculative_method is not None

    @property
    def speculative_tokens(self) -> int:
        """k: the most draft tokens verified per sequence and step (0 when not speculating)."""
        if not self.speculative:
            return 0
        return self.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)
