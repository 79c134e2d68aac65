"""Write a Hugging Face checkpoint as a llama.cpp GGUF file with the `gguf` library's writer, the way
llama.cpp's convert_hf_to_gguf.py does: its tensor names, its q/k row permutation for `llama`, its
tokenizer metadata. Tests use it to check that `engine` reads such a file back to the same model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotary halves -> interleaved pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    stem, _, kind = hf.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}.{kind}"


Blocks = Callable[[str, np.ndarray], "tuple[np.ndarray, gguf.GGMLQuantizationType] | None"]


def export_gguf(model_dir: Path, out: Path, *, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                pre: str | None = None, blocks: Blocks | None = None) -> Path:
    """`model_dir` (a single-file safetensors checkpoint) as a GGUF file at `out`. 2-D weights are stored
    as `qtype` (F32, F16, Q8_0, ...), norms and biases as F32. `pre`: tokenizer.ggml.pre (default: by family).
    `blocks(hf_name, weight)` may store a 2-D weight its own way instead: (its raw blocks, their type), for
    the types gguf cannot quantize (the K-quants); None leaves it to `qtype`."""
    cfg = json.loads((model_dir / "config.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    arch = _ARCH[cfg["architectures"][0]]
    w = gguf.GGUFWriter(str(out), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_name(model_dir.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    _tokenizer(w, tok, tok_cfg, cfg, pre or ("qwen2" if arch.startswith("qwen") else "gpt2"))
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        data: np.ndarray[Any, Any] = tensor.to(torch.float32).numpy()
        if arch == "llama" and ".q_proj.weight" in name:
            data = permute(data, heads)
        elif arch == "llama" and ".k_proj.weight" in name:
            data = permute(data, kv_heads)
        own = blocks(name, data) if blocks is not None and data.ndim == 2 else None
        if own is not None:
            w.add_tensor(gguf_name(name), own[0], raw_dtype=own[1])
        elif data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            packed = gguf.quants.quantize(data, qtype)
            w.add_tensor(gguf_name(name), packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _tokenizer(w: gguf.GGUFWriter, tok: dict[str, Any], tok_cfg: dict[str, Any], cfg: dict[str, Any],
               pre: str) -> None:
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    specials = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    vocab.update(specials)
    size = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if text in specials else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("unk_token", w.add_unk_token_id), ("pad_token", w.add_pad_token_id)):
        if tok_cfg.get(key):
            add(vocab[tok_cfg[key]])
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token")))
    w.add_chat_template(tok_cfg["chat_template"])
