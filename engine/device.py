"""Device and dtype names (engine.config, torch-free) resolved to torch objects, and the KV pool's
zeroed allocation (on huge pages on a Linux CPU)."""

from __future__ import annotations

import math
import mmap

import torch
from torch import Tensor

from engine.config import canonical_dtype, check_device

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """auto: the checkpoint's dtype on GPU, float32 on CPU. Raises ValueError for an unknown name."""
    key = canonical_dtype(name)
    if key == "auto":
        return TORCH_DTYPES[checkpoint_dtype] if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[key]


def resolve_device(name: str) -> torch.device:
    """Raises ValueError for an unknown name, or for cuda on a machine without a CUDA device."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


HUGE_PAGE = 2 * 2**20  # x86-64's transparent huge page


def pool_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros(shape)``. On a CPU whose OS takes madvise(MADV_HUGEPAGE) (Linux), a pool of at least
    one huge page lies in fresh anonymous memory of its own, 2 MB aligned and asked to be transparent huge
    pages before anything touches it, so the zeroing faults it in as huge pages where the kernel allows
    it (THP "always" or "madvise"). Fresh memory, not torch's allocator's: a long-lived process's heap
    hands back pages already faulted in as 4 KB ones. Paged attention reads a few KB from each of many
    scattered blocks, and on 4 KB pages nearly every block costs a TLB miss: on huge pages a
    SmolLM2-shaped decode's attention (48 sequences of 360 tokens, 150 MB a layer) took 2.24-2.31 ms a
    layer instead of 2.40-2.45 (docs/benchmarks.md). The memory is released with the tensor."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched; reads as zeros
    buf.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps `buf` alive
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape).zero_()  # faulted in now, as torch.zeros does
