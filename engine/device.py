"""Device and dtype names (engine.config, torch-free) resolved to torch objects, and the KV pool's
zeroed allocation (on huge pages on a Linux CPU)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable

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
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn  # type: ignore[no-any-return]


def pool_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros(shape)``. On a Linux CPU, the tensor's whole 2 MB pages are first asked to be
    transparent huge pages (madvise MADV_HUGEPAGE, before anything touches them), so the zeroing
    faults them in as huge pages where the kernel allows it (THP "always" or "madvise"). Paged
    attention reads a few KB from each of many scattered blocks, and with 4 KB pages nearly every
    block costs a TLB miss: on huge pages a SmolLM2-shaped decode's attention (48 sequences of 360
    tokens, 150 MB a layer) took 2.24-2.31 ms a layer instead of 2.40-2.45 (docs/benchmarks.md). A
    refused madvise (THP "never", another OS) changes nothing but the page size."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype)
    madvise = _madvise()
    start, size = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + size) // HUGE_PAGE * HUGE_PAGE
    if madvise is not None and hi > lo:
        madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return t.zero_()
