"""Streaming a checkpoint's tensors: one at a time from memory-mapped safetensors files, so loading
never holds a second full copy of the checkpoint in memory (layouts: engine.checkpoint)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.checkpoint import INDEX_FILE, CheckpointError, check_dir, load_index, safetensors_files

logger = logging.getLogger(__name__)

# Checkpoints larger than this show a progress bar when `progress` is None.
PROGRESS_MIN_BYTES = 256 << 20


def iter_safetensors(
    model_dir: str | Path, *, progress: bool | None = None
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
                    tensor = f.get_tensor(name)
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
