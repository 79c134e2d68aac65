"""Hugging Face checkpoint directories: config, weight files, streaming tensors, a fingerprint.

A checkpoint directory holds `config.json` and its weights in one of three layouts, tried in order:

    model.safetensors.index.json   {"weight_map": {tensor name: shard file name}} + the shards it names
    model.safetensors              a single file
    *.safetensors                  any other files, read in sorted name order

or it is a single llama.cpp `.gguf` file (engine.gguf_file): config, tokenizer and weights in one.

Torch-free (the gateway reads configs through it); `engine.weights` streams the tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# llama.cpp's quantization suffix of a GGUF file name: "SmolLM2-135M-Instruct.Q4_1.gguf", "-Q4_K_M.gguf"
_QUANT_SUFFIX = re.compile(r"[.-](?:[IT]?Q\d[\w]*|F16|F32|BF16|f16|f32|bf16)$", re.IGNORECASE)


def model_name(path: str | Path) -> str:
    """The name a checkpoint goes by: its directory's name, or a GGUF file's stem without the
    quantization suffix ("SmolLM2-135M-Instruct" for SmolLM2-135M-Instruct.Q4_1.gguf)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return _QUANT_SUFFIX.sub("", p.stem) or p.stem
    return p.name


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or malformed; the message names the path and the problem."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def check_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory (expected a Hugging Face model folder "
                              "or a .gguf file)")
    return path


def load_index(path: Path) -> dict[str, str]:
    """The index's tensor-name -> file-name map; raises CheckpointError if malformed."""
    index = _read_json(path / INDEX_FILE)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path / INDEX_FILE} has no 'weight_map' of tensor names to shard files")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path / INDEX_FILE}: 'weight_map' must map tensor names to file names")
    return weight_map


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint, in read order (see the module docstring for the layouts).

    Raises CheckpointError if the directory is missing, has no *.safetensors, or its index names a
    shard that is not there.
    """
    path = check_dir(model_dir)
    if (path / INDEX_FILE).is_file():
        names = list(dict.fromkeys(load_index(path).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{path / INDEX_FILE} names shard files missing from {path}: {', '.join(missing)}"
            )
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(
            f"no *.safetensors weights in {path} (only safetensors checkpoints are supported; "
            "convert .bin/.pt weights first)"
        )
    return files


def load_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """Read `config.json` of a checkpoint directory, or derive it from a `.gguf` file's metadata.

    Raises CheckpointError if the directory does not exist or is not a directory, has no config.json
    (or it is not a JSON object), or has no safetensors weights; for a GGUF file, if it is malformed
    or of an architecture Tandem does not serve.
    """
    from engine import gguf_file

    if gguf_file.is_gguf(model_dir):
        return gguf_file.hf_config(gguf_file.read_gguf(model_dir))
    path = check_dir(model_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model directory?")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    safetensors_files(path)
    return config


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """A short stable id of a checkpoint: 16 hex digits of a SHA-256 over config.json (parsed and
    re-serialised with sorted keys, so formatting does not matter) and the weight files' names and
    sizes. Two workers serve the same model iff their fingerprints match (up to same-size edits of
    the weights, which are not read). Raises CheckpointError as `load_hf_config` does.
    """
    from engine import gguf_file

    if gguf_file.is_gguf(model_dir):
        return gguf_file.fingerprint(gguf_file.read_gguf(model_dir))
    config = load_hf_config(model_dir)
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for file in safetensors_files(model_dir):
        h.update(f"\0{file.name}\0{file.stat().st_size}".encode())
    return h.hexdigest()[:16]
