"""Device and dtype names (engine.config, torch-free) resolved to torch objects."""

from __future__ import annotations

import torch

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
