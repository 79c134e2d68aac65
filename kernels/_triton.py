"""Guarded Triton import, the device check before each launch, and the shared argument checks.

``import kernels`` must work where triton is missing (a CPU-only image serves through the PyTorch
references): without triton, ``triton.jit`` here returns the plain function and ``launchable``
raises before any launch.

On CPU the kernels run through the Triton interpreter, which Triton fixes when *triton* is first
imported: TRITON_INTERPRET=1 must be in the environment before anything imports triton (note that
``transformers`` model modules do). ``launchable`` tells the two cases apart by the kernel object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on images without triton
    HAS_TRITON = False

    class _MissingTriton:
        """Stands in for ``triton`` at kernel definition time (annotations are strings here)."""

        @staticmethod
        def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
            return fn

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def launchable(kernel: Any, device: torch.device) -> Any:
    """``kernel`` if it can run on ``device`` (CUDA compiled, CPU interpreted), else ValueError."""
    if not HAS_TRITON:
        raise ValueError("triton is not installed; use the PyTorch references (select_ops(backend='torch'))")
    interpreted = is_interpreted(kernel)
    if device.type == "cuda" and not interpreted:
        return kernel
    if device.type == "cpu" and interpreted:
        return kernel
    if device.type == "cuda":
        raise ValueError("triton was imported under TRITON_INTERPRET=1, which cannot launch on CUDA tensors")
    raise ValueError(
        f"Triton kernels run on CUDA tensors, or on CPU tensors through the interpreter, which needs "
        f"TRITON_INTERPRET=1 set before triton is first imported (got tensors on {device})"
    )


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) when cond is false (launcher argument checks survive ``python -O``)."""
    if not cond:
        raise ValueError(msg)


def check_tensor(
    name: str,
    t: Tensor,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    device: torch.device,
    contiguous_last: bool = True,
) -> None:
    """Check rank, dtype, device and (by default) a unit stride on the last dimension."""
    check(isinstance(t, Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    check(t.device == device, f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    if contiguous_last:
        check(
            t.stride(-1) == 1 or t.shape[-1] == 1, f"{name} needs stride 1 on its last dim, got {t.stride()}"
        )


def num_warps_for(block: int) -> int:
    """Warps for a 1-D row kernel of ``block`` elements: ~256 elements a warp, 1..16 warps."""
    return min(16, max(1, block // 256))
