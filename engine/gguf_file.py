"""llama.cpp's GGUF files as checkpoints: the header read once, the config Hugging Face would write,
and each tensor's place in the file under its Hugging Face name.

A GGUF file is one little-endian file:

    "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type u32, value)        metadata: general.*, <arch>.*, tokenizer.*
    tensor_count x (name: string, n_dims u32, dims u64[n_dims] (innermost first), type u32, offset u64)
    padding to general.alignment (32)
    tensor data: each tensor at data_start + offset, `type`-encoded (F32, F16, Q8_0, Q4_1, Q4_K, ...)

`read_gguf(path)` parses the header in one pass (the `gguf` library's own reader builds a numpy view
per array element: 10 s for a 49k-token vocabulary; this takes ~0.2 s) and leaves the data in place;
`engine.weights` dequantizes tensors with `gguf.quants`. Torch-free: the gateway reads the config
and the tokenizer (engine.gguf_tokenizer) through it.

llama.cpp's converter renames tensors (`blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`)
and, for the `llama` architecture only, permutes the rows of q_proj and k_proj within each head so
that rotary pairs (i, i + head_dim/2) become adjacent (i*2, i*2+1); `unpermute_rows` undoes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.checkpoint import CheckpointError

SUFFIX = ".gguf"
_MAGIC = b"GGUF"
# GGUFValueType: id -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# llama.cpp tensor name -> Hugging Face name ({} is the layer index)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its suffix; `read_gguf` checks the magic)."""
    return str(path).endswith(SUFFIX) and Path(path).is_file()


@dataclass(frozen=True)
class TensorInfo:
    name: str  # llama.cpp's
    shape: tuple[int, ...]  # outermost first, as numpy and torch write it
    type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """`<arch>.key` from the metadata, e.g. get("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of a GGUF file (metadata and tensor directory; the data is not read).

    Raises CheckpointError if the file is missing, not GGUF (v2 or v3), or truncated.
    """
    path = Path(path)
    try:  # mapped: only the header's pages are read
        data: Any = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:  # ValueError: an empty file
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    buf = memoryview(data).cast("B")
    if bytes(buf[:4]) != _MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic)")
    cur = _Cursor(buf)
    cur.pos = 4
    try:
        version = cur.scalar("I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        num_tensors, num_kv = cur.scalar("Q"), cur.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(num_tensors):
            name = cur.string()
            dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
            infos.append((name, tuple(reversed(dims)), cur.scalar("I"), cur.scalar("Q")))
    except (struct.error, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: malformed or truncated GGUF header: {exc}") from exc
    align = int(metadata.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = {n: TensorInfo(n, shape, t, start + off) for n, shape, t, off in infos}
    return GGUFFile(path, version, metadata, tensors)


def hf_tensor_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for one without a place (rope_freqs)."""
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q_proj / k_proj rows (`num_heads`: the projection's
    heads, num_key_value_heads for k). (out, ...) -> (out, ...): within each head, the converter's
    `reshape(h, 2, d/2).swapaxes(1, 2)` is inverted by `reshape(h, d/2, 2).swapaxes(1, 2)`."""
    out = rows.shape[0]
    head_dim = out // num_heads
    return rows.reshape(num_heads, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def permuted_heads(f: GGUFFile, hf_name: str) -> int | None:
    """The head count to unpermute `hf_name` with, or None when it is stored as Hugging Face has it."""
    if f.architecture != "llama":
        return None
    if ".self_attn.q_proj." in hf_name:
        return int(f.get("attention.head_count"))
    if ".self_attn.k_proj." in hf_name:
        return int(f.get("attention.head_count_kv") or f.get("attention.head_count"))
    return None


def _torch_dtype(f: GGUFFile) -> str:
    from gguf import GGMLQuantizationType as Q

    types = {t.type for t in f.tensors.values() if len(t.shape) > 1}
    if types <= {Q.F32}:
        return "float32"
    if Q.BF16 in types:
        return "bfloat16"
    return "float16"  # F16 and the quantized formats, which llama.cpp computes in fp16/fp32


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def hf_config(f: GGUFFile) -> dict[str, Any]:
    """The `config.json` Hugging Face would have for this file. Raises CheckpointError for an
    architecture or rotary scaling Tandem does not serve."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    if "rope_freqs.weight" in f.tensors:
        raise CheckpointError(f"{f.path}: per-dimension rotary factors (rope_freqs, Llama-3.1 scaling) are "
                              "not supported from GGUF; serve the Hugging Face checkpoint instead")
    heads = int(f.get("attention.head_count"))
    hidden = int(f.get("embedding_length"))
    tokens = f.metadata.get("tokenizer.ggml.tokens") or []
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(f.get("vocab_size") or len(tokens) or f.tensors["token_embd.weight"].shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(f.get("feed_forward_length")),
        "num_hidden_layers": int(f.get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get("attention.head_count_kv") or heads),
        "head_dim": int(f.get("attention.key_length") or hidden // heads),
        "rms_norm_eps": _f32(f.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(f.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(f.get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "torch_dtype": _torch_dtype(f),
    }
    scaling = f.get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(f"{f.path}: rotary scaling {scaling!r} is not supported from GGUF (linear is)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(f.get("rope.scaling.factor"))}
    for key in ("bos_token_id", "eos_token_id"):
        value = f.metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[key] = int(value)
    return cfg


def fingerprint(f: GGUFFile) -> str:
    """16 hex digits of a SHA-256 over the derived config and the file's name and size
    (as `engine.checkpoint.checkpoint_fingerprint` does for a directory)."""
    h = hashlib.sha256(json.dumps(hf_config(f), sort_keys=True, separators=(",", ":")).encode())
    h.update(f"\0{f.path.name}\0{f.path.stat().st_size}".encode())
    return h.hexdigest()[:16]
