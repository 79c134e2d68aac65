"""Tiny random checkpoints in Hugging Face format, for tests, `make run` and benchmarks.

`make_tiny_model(out_dir, arch)` writes a directory that `transformers` loads as-is:

    config.json              architectures, model_type and the family's usual fields
    generation_config.json   bos / eos ids (Qwen: a list of eos ids, as its instruct models ship)
    tokenizer.json           byte-level BPE trained on this machine's Python standard library
    tokenizer_config.json    special tokens, add_bos_token, chat_template, PreTrainedTokenizerFast
    model.safetensors        or model-0000i-of-0000N.safetensors + model.safetensors.index.json

Weights are random but deterministic in `seed`, and scaled so a 2-layer model's greedy argmaxes vary
(a std-0.02 init gives near-constant logits): embeddings N(0, 1) (N(0, 0.25/hidden) when tied),
lm_head N(0, 4/hidden) so logits have std ~2, projections N(0, 1/fan_in), biases N(0, 0.1^2),
norm weights U(0.75, 1.25).
The trained tokenizer is cached per user (see `tokenizer_cache_dir`), so repeated calls are fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from engine.device import TORCH_DTYPES
from training.tiny_shape import ARCHITECTURES, TinyShape

logger = logging.getLogger(__name__)

# Bump when the training recipe changes, so stale cached tokenizers are not reused.
_TOKENIZER_RECIPE = "bytelevel-bpe-stdlib-v2"
_CORPUS_CAP_BYTES = 8 << 20
_QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}{% endfor %}"
)
# Multi-line on purpose: it renders right only with trim_blocks and lstrip_blocks, as in transformers.
_CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def llama3_rope_scaling(original_max_position_embeddings: int = 8192, factor: float = 8.0) -> dict[str, Any]:
    """The `rope_scaling` entry of a Llama-3.1-style config.json."""
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


def tokenizer_cache_dir() -> Path:
    """Where trained tiny tokenizers are cached: $TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem,
    else ~/.cache/tandem; then `tiny-tokenizers/` below it."""
    root = os.environ.get("TANDEM_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "tandem") if xdg else str(Path.home() / ".cache" / "tandem")
    return Path(root) / "tiny-tokenizers"


def _special_tokens(family: str) -> list[str]:
    if family == "qwen":
        return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return ["<unk>", "<s>", "</s>"]


def _corpus() -> list[str]:
    """The first few MB of the standard library's .py sources, in sorted path order."""
    root = Path(sysconfig.get_path("stdlib"))
    texts: list[str] = []
    total = 0
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        texts.append(data.decode("utf-8", errors="replace"))
        total += len(data)
        if total >= _CORPUS_CAP_BYTES:
            break
    if total < 64 << 10:
        raise RuntimeError(f"not enough Python sources under {root} to train a tokenizer")
    return texts


def _train_tokenizer(family: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE. Llama's specials get ids 0..2 (as in Llama 2); Qwen's go last (as in Qwen)."""
    specials = _special_tokens(family)
    tok = Tokenizer(models.BPE())
    if family == "qwen":
        # Qwen's own pipeline: transformers rebuilds it for model_type qwen2 whatever tokenizer.json says.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (len(specials) if family == "qwen" else 0),
        special_tokens=[] if family == "qwen" else specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if family == "qwen":
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos = specials[1]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _cached_tokenizer(family: str, vocab_size: int) -> Tokenizer:
    """Train once per (family, vocab size, Python version); later calls read the cached JSON."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = tokenizer_cache_dir() / f"{family}-{vocab_size}-{py}-{_TOKENIZER_RECIPE}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # a torn or foreign file: retrain below and replace it
            logger.warning("ignoring unreadable cached tokenizer %s: %s", path, exc)
    logger.info("training a %d-token byte-level BPE tokenizer (%s)", vocab_size, family)
    tok = _train_tokenizer(family, vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so concurrent test processes never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tok.to_str())
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not cache the tiny tokenizer in %s: %s", path.parent, exc)
    return tok


def _config(arch: str, cfg: dict[str, Any], bos_id: int, eos_id: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6 if arch.startswith("qwen") else 1e-5,
        "use_cache": True,
        **cfg,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch.startswith("qwen"):
        config.update(use_sliding_window=False, sliding_window=None)
        config["max_window_layers"] = cfg["num_hidden_layers"]
        if arch == "qwen3":
            config["attention_bias"] = False
    return dict(sorted(config.items()))


def _weights(arch: str, cfg: dict[str, Any], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights in Hugging Face names, in a fixed order so `seed` fixes every value."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, std=1.0 / math.sqrt(in_features))

    def norm(size: int) -> torch.Tensor:
        return (0.75 + 0.5 * torch.rand(size, generator=gen)).to(dtype)

    # Logits are the final-normed hidden state (entries ~1) times lm_head rows: std 2/sqrt(hidden) gives
    # logits of std ~2. Tied embeddings that large make greedy decoding loop on one token (a token's own
    # embedding in the residual favours itself), so tied models get std 0.5/sqrt(hidden): logits std ~0.5.
    head_std = 2.0 / math.sqrt(hidden)
    embed_std = 0.5 / math.sqrt(hidden) if cfg["tie_word_embeddings"] else 1.0
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, hidden, std=embed_std)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = linear(q_out, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_out, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_out, hidden)
        if arch == "qwen2":
            for name, size in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                w[p + f"self_attn.{name}_proj.bias"] = normal(size, std=0.1)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, q_out)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    w["model.norm.weight"] = norm(hidden)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(vocab, hidden, std=head_std)
    return w


def _save_weights(out: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    """One model.safetensors, or `num_shards` contiguous, roughly equal-byte shards plus the index."""
    for old in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    if num_shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    sizes = [weights[n].numel() * weights[n].element_size() for n in names]
    total = sum(sizes)
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    cur, done = 0, 0
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        # Move on at each 1/num_shards of the bytes, or when every later shard needs one of the rest.
        if shards[cur] and (done >= (cur + 1) * total / num_shards or len(names) - i <= num_shards - 1 - cur):
            cur += 1
        shards[cur].append(name)
        done += size
    weight_map: dict[str, str] = {}
    for k, shard_names in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: weights[n] for n in shard_names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(out: Path, family: str, vocab_size: int, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json; return the special tokens' ids."""
    tok = _cached_tokenizer(family, vocab_size)
    ids: dict[str, int] = {}
    for text in _special_tokens(family):
        token_id = tok.token_to_id(text)
        assert token_id is not None, f"trained tokenizer lacks {text}"
        ids[text] = token_id
    tok.save(str(out / "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    if family == "qwen":
        named = {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": None,
                 "pad_token": "<|endoftext|>"}
    else:
        named = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        # Read by transformers 4 and other tools; transformers 5 follows tokenizer.json's post-processor.
        "add_bos_token": family == "llama",
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in ids.items()},
        "chat_template": _CHATML_TEMPLATE if family == "qwen" else _LLAMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return ids


def make_tiny_model(out_dir: str | Path, arch: str = "llama", **shape: Any) -> Path:
    """Write a random `arch` checkpoint with a trained tokenizer to `out_dir` (created if needed;
    existing checkpoint files there are replaced) and return its path.

    `shape` takes TinyShape's fields (hidden_size, num_layers, ..., dtype, seed). `vocab_size` sizes the
    tokenizer; `model_vocab_size` (default: the same) the embedding and lm_head, and config.json's
    vocab_size, as Qwen checkpoints ship 151,936 rows for 151,665 tokens. `head_dim` defaults
    to hidden_size // num_heads (always written for qwen3, else only when given); `rope_scaling` is
    copied into config.json (see `llama3_rope_scaling`); `sliding_window` is Mistral's.
    Raises ValueError for an unknown arch or dtype, or sizes that do not fit together (TinyShape's
    checks); nothing is written then.
    """
    return write_tiny_model(out_dir, TinyShape(arch=arch, **shape))


def write_tiny_model(out_dir: str | Path, t: TinyShape) -> Path:
    """`make_tiny_model` for a validated shape."""
    arch, hidden_size, num_heads, head_dim = t.arch, t.hidden_size, t.num_heads, t.head_dim
    vocab_size, max_position_embeddings, rope_scaling = t.vocab_size, t.max_position_embeddings, t.rope_scaling
    cfg: dict[str, Any] = {
        "hidden_size": hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": t.num_kv_heads,
        "max_position_embeddings": max_position_embeddings, "vocab_size": t.model_vocab_size or vocab_size,
        "rope_theta": t.rope_theta, "rope_scaling": dict(rope_scaling) if rope_scaling else None,
        "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": t.dtype,
    }
    if head_dim is not None or arch == "qwen3":
        cfg["head_dim"] = head_dim if head_dim is not None else hidden_size // num_heads
    if arch == "mistral":
        cfg["sliding_window"] = t.sliding_window
    weights = _weights(arch, cfg, t.seed, TORCH_DTYPES[t.dtype])
    if t.num_shards > len(weights):
        raise ValueError(f"num_shards ({t.num_shards}) exceeds the number of tensors ({len(weights)})")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = "qwen" if arch.startswith("qwen") else "llama"
    ids = _write_tokenizer(out, family, vocab_size, max_position_embeddings)
    if family == "qwen":  # as Qwen instruct models ship: <|endoftext|> is bos and pad, eos is a list
        bos_id, eos_id = ids["<|endoftext|>"], ids["<|im_end|>"]
        generation: dict[str, Any] = {
            "bos_token_id": bos_id, "eos_token_id": [eos_id, bos_id], "pad_token_id": bos_id,
        }
    else:
        bos_id, eos_id = ids["<s>"], ids["</s>"]
        generation = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    config = _config(arch, cfg, bos_id, eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _save_weights(out, weights, t.num_shards)
    logger.info("wrote a tiny %s checkpoint (%d tensors) to %s", arch, len(weights), out)
    return out
