"""Streaming a checkpoint's tensors: one at a time from memory-mapped safetensors files (or a GGUF
file, tensor by tensor: dequantized, or its raw blocks for a loader that keeps them quantized), so
loading never holds a second full copy of the checkpoint in memory (layouts: engine.checkpoint; GGUF:
engine.gguf_file). `iter_weights` takes either.

Under tensor parallelism a rank passes `select` (TPShard.slice_for): a safetensors tensor that is split
is read as its rank's rows or columns only (`safe_open(...).get_slice`), so no rank reads the whole
checkpoint. A GGUF file's tensors are read whole and sliced by the model (or, kept quantized, by the
quantized loader after conversion: engine/parallel/quantized.py) (documented cost)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.checkpoint import INDEX_FILE, CheckpointError, check_dir, load_index, safetensors_files

logger = logging.getLogger(__name__)

# Checkpoints larger than this show a progress bar when `progress` is None.
PROGRESS_MIN_BYTES = 256 << 20


Selector = Callable[[str], Any]  # name -> a Slice (engine.parallel.shard: dim, start, size, full) or None


def iter_safetensors(
    model_dir: str | Path, *, progress: bool | None = None, select: Selector | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the checkpoint, one at a time, on CPU.

    Each tensor is read from a memory-mapped file when it is yielded; the caller owns it and should
    copy it into place and drop it. With an index, a file's tensors that the index assigns to another
    file are skipped, so no name is yielded twice. `progress=True` shows a byte-counting tqdm bar on
    stderr; `None` shows it only for checkpoints over PROGRESS_MIN_BYTES.
    Raises CheckpointError as `safetensors_files` does, or if an indexed tensor is in none of the files.
    """
    path = check_dir(model_dir)
    files = safetensors_files(path)
    weight_map = load_index(path) if (path / INDEX_FILE).is_file() else None
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else total > PROGRESS_MIN_BYTES
    seen: set[str] = set()
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr,
              disable=not show) as bar:
        for file in files:
            read = 0
            with safe_open(str(file), framework="pt", device="cpu") as f:
                rel = file.relative_to(path).as_posix()
                for name in f.keys():
                    if weight_map is not None and weight_map.get(name) != rel:
                        logger.debug("skipping %s in %s: the index places it elsewhere", name, rel)
                        continue
                    tensor = _read(f, name, select)
                    size = tensor.numel() * tensor.element_size()
                    bar.update(size)
                    read += size
                    seen.add(name)
                    yield name, tensor
            # The file's header and skipped tensors, so the bar ends at the total.
            bar.update(max(file.stat().st_size - read, 0))
    if weight_map is not None and len(seen) < len(weight_map):
        missing = sorted(set(weight_map) - seen)
        raise CheckpointError(
            f"{path / INDEX_FILE} lists {len(missing)} tensors found in no shard, "
            f"e.g. {', '.join(missing[:3])}"
        )


def _read(f: Any, name: str, select: Selector | None) -> torch.Tensor:
    """Tensor `name` of an open safetensors file, or only the part `select` names."""
    part = select(name) if select is not None else None
    if part is None or part.size == part.full:
        return f.get_tensor(name)
    sl = f.get_slice(name)
    shape = sl.get_shape()
    if shape[part.dim] != part.full:  # not the shape the split was planned for: the model's check reports it
        return f.get_tensor(name)
    index = [slice(None)] * len(shape)
    index[part.dim] = slice(part.start, part.start + part.size)
    return sl[tuple(index)]


def iter_gguf(
    path: str | Path, *, progress: bool | None = None, raw: Callable[[str, int], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(Hugging Face name, float32 tensor)` for every tensor of a llama.cpp GGUF file.

    Each tensor is read from the memory-mapped file and dequantized when it is yielded (`gguf.quants`
    knows F32/F16/BF16, Q4_0..Q8_0 and the K-quants); llama.cpp's rotary row permutation of q_proj
    and k_proj is undone (engine.gguf_file). The caller copies it into a parameter of its dtype.
    A tensor for which `raw(name, ggml_type)` is true is yielded as its bytes instead, a
    (rows, bytes per row) uint8 copy in the file's row order (not un-permuted: the caller converts it,
    engine/quant/formats/gguf.py). Raises CheckpointError for a malformed file or a tensor type gguf
    cannot dequantize.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    from engine.gguf_file import hf_tensor_name, permuted_heads, read_gguf, unpermute_rows

    f = read_gguf(path)
    data = np.memmap(f.path, dtype=np.uint8, mode="r")
    total = f.path.stat().st_size
    show = progress if progress is not None else total > PROGRESS_MIN_BYTES
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr,
              disable=not show) as bar:
        for info in f.tensors.values():
            name = hf_tensor_name(info.name)
            if name is None:
                logger.debug("skipping GGUF tensor %s: no place in a Hugging Face checkpoint", info.name)
                continue
            try:
                qtype = GGMLQuantizationType(info.type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{f.path}: tensor {info.name} has unknown type {info.type}") from exc
            *outer, inner = info.shape
            if inner % block:
                raise CheckpointError(f"{f.path}: tensor {info.name} has {inner} columns, not a multiple of "
                                      f"its {qtype.name} block of {block}")
            row_bytes = inner // block * type_size
            nbytes = row_bytes * int(np.prod(outer, dtype=np.int64))
            if info.offset + nbytes > data.size:
                raise CheckpointError(f"{f.path}: tensor {info.name} runs past the end of the file (truncated?)")
            blocks = data[info.offset : info.offset + nbytes].reshape(*outer, row_bytes)
            bar.update(nbytes)
            if raw is not None and raw(name, info.type):
                yield name, torch.from_numpy(np.array(blocks).reshape(-1, row_bytes))  # a copy
                continue
            try:
                values = np.array(dequantize(blocks, qtype), dtype=np.float32).reshape(info.shape)  # a copy
            except NotImplementedError as exc:
                raise CheckpointError(f"{f.path}: cannot dequantize {info.name} ({qtype.name}): {exc}") from exc
            heads = permuted_heads(f, name)
            if heads is not None:
                values = np.ascontiguousarray(unpermute_rows(values, heads))
            yield name, torch.from_numpy(values)


def iter_weights(path: str | Path, *, progress: bool | None = None,
                 select: Selector | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint under its Hugging Face name: a directory's safetensors, or a
    `.gguf` file's tensors dequantized to float32 (see `iter_safetensors`, `iter_gguf`); `select`:
    read only a rank's part of split safetensors tensors (GGUF tensors come whole)."""
    from engine.gguf_file import is_gguf

    if is_gguf(path):
        return iter_gguf(path, progress=progress)
    return iter_safetensors(path, progress=progress, select=select)
