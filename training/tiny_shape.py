"""The shape of a tiny random checkpoint (`tandem make-tiny-model`, tests, demos). Torch-free, so the
`tandem` command builds its flags from these fields without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DTYPES
from engine.options import check_options, option

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
MIN_VOCAB = 384  # 256 byte symbols + special tokens + some merges


@dataclass(frozen=True)
class TinyShape:
    """Raises ValueError for an unknown arch or dtype, or sizes that do not fit together.

    `vocab_size` is the tokenizer's; `model_vocab_size` (default: the same) the model's rows. Padded
    rows are random like the rest, so the model samples ids the tokenizer lacks, as a checkpoint
    with a padded vocabulary can.
    """

    arch: str = option("llama", "model family", choices=tuple(ARCHITECTURES))
    hidden_size: int = option(64, "hidden size", min=1)
    num_layers: int = option(2, "decoder layers", flag="layers", min=1)
    num_heads: int = option(4, "attention heads", flag="heads", min=1)
    num_kv_heads: int = option(2, "key/value heads (grouped-query attention)", flag="kv-heads", min=1)
    intermediate_size: int = option(128, "MLP inner size", min=1)
    vocab_size: int = option(1024, "vocabulary size (the tokenizer is trained to it)", min=MIN_VOCAB)
    model_vocab_size: int | None = option(
        None, "embedding and lm_head rows, config.json's vocab_size (default: vocab size); more rows than "
        "the tokenizer has tokens, as Qwen pads its vocabulary", min=MIN_VOCAB)
    head_dim: int | None = option(None, "per-head size (default: hidden size / heads)", min=2)
    max_position_embeddings: int = option(2048, "context length", min=1)
    tie_word_embeddings: bool = option(False, "share lm_head with the embeddings")
    rope_scaling: dict[str, Any] | None = option(None, "copied into config.json", cli=False)
    rope_theta: float = option(10000.0, "RoPE base", above=0)
    sliding_window: int | None = option(None, "attention window (mistral only)", min=1)
    num_shards: int = option(1, "safetensors files (>1 writes an index)", flag="shards", min=1)
    dtype: str = option("float32", "dtype of the written weights", choices=DTYPES)
    seed: int = option(0, "seed of the random weights", min=0)

    def __post_init__(self) -> None:
        check_options(self)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer, got {self.head_dim}")
        if self.model_vocab_size is not None and self.model_vocab_size < self.vocab_size:
            raise ValueError(f"model_vocab_size ({self.model_vocab_size}) must be >= vocab_size "
                             f"({self.vocab_size}), the tokenizer's")
        if self.sliding_window is not None and self.arch != "mistral":
            raise ValueError("sliding_window is only supported for arch 'mistral'")
