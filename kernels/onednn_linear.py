"""float32 CPU linear through oneDNN, beside its reference :func:`onednn_linear_ref` (``F.linear``,
which runs MKL's sgemm): ``out = x @ W.T + b`` by ``torch.ops.mkldnn._linear_pointwise`` on the
same dense (N, K) weight, nothing prepacked or copied.

Which engine is faster depends on the shape (bench/cpu_linear.py, docs/benchmarks.md issue 18; one
thread of a 2-core AVX2 EPYC, weights read from memory): oneDNN wins for wide outputs, 20-40 % on
SmolLM2's tied 49152 x 576 LM head at M = 8..128 (46 against 32 ms at M = 8) and 15-30 % on the fused
gate_up of Qwen2.5-0.5B / Llama-3.2-1B, 5-15 % on SmolLM2's 3072 x 576 one from M = 16 up (it loses
up to 15 % at M <= 4 there); it loses 10-30 % on small square or narrow layers at M = 8..16 and ~50 us a
call on tiny ones (its fixed cost). :func:`prefers_onednn` is the rule (N >= 2K, K >= 512,
N * K >= 2^20), a function of the weight's shape; a projection (``OneDNNLinear``) still runs F.linear
below ``MIN_ROWS`` rows, where oneDNN lost on SmolLM2's gate_up (1.07x MKL's time at one row, 30 cold
layers, one thread), while the LM head takes oneDNN at every M (0.82x at one row). The choice is a
function of the shapes, so a step's answer is reproducible; like MKL's own kernels, it can round a row
differently at different batch sizes.
Prepacking the weight (``torch.ops.mkldnn._reorder_linear_weight``) was measured and not taken: it
is tuned to one M, slower at others, and an opaque copy (the tied head would be held twice).

:func:`available` probes the op once (logged once, False on any failure: a torch without oneDNN
keeps F.linear). float32 only (a bfloat16 call failed to create its primitive on this AVX2 box); inference
only (the op has no autograd formula).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import check, check_tensor

logger = logging.getLogger(__name__)

MIN_ROWS = 4  # OneDNNLinear: fewer rows (a lone decode) run F.linear (oneDNN 1.07x at 1 row, 0.89x at 4)
MIN_K = 512  # in_features below this: oneDNN's fixed cost per call is not repaid (4096 x 256 lost 4-15 % at M <= 16)
MIN_WIDTH = 2  # out_features >= MIN_WIDTH * in_features
MIN_WEIGHTS = 1 << 20  # N * K: smaller wide layers (1536 x 576, 768 x 384) lose 10-20% at M = 8..16
_CPU = torch.device("cpu")


def onednn_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """PyTorch reference: ``F.linear`` (MKL's sgemm on CPU)."""
    return F.linear(x, weight, bias)


def prefers_onednn(n: int, k: int) -> bool:
    """Whether an (N, K) float32 weight runs faster through oneDNN on CPU: wide (N >= 2K), K >= 512 and
    at least 2^20 weights (4 MiB). bench/results/cpu_linear.json has the sweep behind it."""
    return k >= MIN_K and n >= MIN_WIDTH * k and n * k >= MIN_WEIGHTS


@functools.cache
def available() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists and agrees with F.linear on a small
    input (checked once per process; the reason logged once when not)."""
    try:
        if not torch.backends.mkldnn.is_available():
            logger.info("oneDNN is not available in this torch build; float32 CPU linears use F.linear")
            return False
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 64, generator=gen)
        w = torch.randn(160, 64, generator=gen)
        b = torch.randn(160, generator=gen)
        with torch.inference_mode():
            got = onednn_linear_unchecked(x, w, b)
            want = F.linear(x, w, b)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            logger.warning("oneDNN linear disagrees with F.linear on a probe (max abs diff %s); using F.linear",
                           (got - want).abs().max().item() if got.shape == want.shape else tuple(got.shape))
            return False
    except Exception as e:  # noqa: BLE001 - any failure (missing op, unsupported CPU) means "use F.linear"
        logger.warning("oneDNN linear is unavailable (%s: %s); float32 CPU linears use F.linear",
                       type(e).__name__, e)
        return False
    return True


def onednn_linear_unchecked(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The op, unchecked (what :class:`OneDNNLinear` calls): x (..., K) float32 CPU, any strides -> (..., N)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`onednn_linear_ref`'s contract for float32 on CPU: x (..., K) any strides, weight (N, K),
    bias (N,) or None -> new (..., N) float32. ValueError on a shape, dtype or device mismatch;
    whatever the op raises where :func:`available` is False (callers check it first)."""
    f32 = (torch.float32,)
    check_tensor("weight", weight, 2, f32, _CPU, contiguous_last=False)
    n, k = weight.shape
    check(isinstance(x, Tensor), f"x must be a torch.Tensor, got {type(x).__name__}")
    check(x.dim() >= 1 and x.shape[-1] == k, f"x must be (..., {k}), got {tuple(x.shape)}")
    check(x.dtype == torch.float32 and x.device == _CPU, f"x must be float32 on cpu, got {x.dtype} on {x.device}")
    if bias is not None:
        check_tensor("bias", bias, 1, f32, _CPU, contiguous_last=False)
        check(bias.shape[0] == n, f"bias must be ({n},), got {tuple(bias.shape)}")
    return onednn_linear_unchecked(x, weight, bias)


class OneDNNLinear(torch.nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose forward runs :func:`onednn_linear`,
    unchecked: the engine swaps it in at load for float32 CPU weights :func:`prefers_onednn` takes
    (``from_linear``), where :func:`available` is True; inputs of fewer than ``MIN_ROWS`` rows run
    F.linear. Inference only."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> OneDNNLinear:
        """A module sharing ``linear``'s weight and bias (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() < MIN_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        return onednn_linear_unchecked(x, self.weight, self.bias)
