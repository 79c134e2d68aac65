"""SiLU-and-mul, the gated activation of Llama/Qwen MLPs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def silu_and_mul_ref(x: Tensor) -> Tensor:
    """PyTorch reference: x (T, 2*I) holding ``[gate | up]`` -> (T, I) = ``silu(gate) * up``."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]
