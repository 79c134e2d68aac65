"""Fused RMSNorm (+ residual add) against rms_norm_ref, and rms_norm_ref against Hugging Face."""

from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm import rms_norm, rms_norm_ref

EPS = 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 128, 1000, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(
    device: torch.device, dtype: torch.dtype, hidden: int, with_residual: bool
) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    residual = torch.randn(5, hidden, generator=gen).to(device, dtype) if with_residual else None
    out = rms_norm(x, weight, EPS, residual)
    ref = rms_norm_ref(x, weight, EPS, residual)
    torch.testing.assert_close(out, ref)
    if residual is not None:
        assert torch.equal(out[1], (x + residual).to(dtype))  # the new residual stream, exactly


def test_rms_norm_per_head_view(device: torch.device) -> None:
    # Qwen3 q-norm: (T, Hq, D) slice of a fused qkv output, viewed as (T*Hq, D) rows.
    qkv = torch.randn(7, (8 + 2 * 2) * 128).to(device, torch.float16)
    q = qkv[:, : 8 * 128].view(7, 8, 128)
    rows = q.reshape(7 * 8, 128)
    weight = torch.rand(128).to(device, torch.float16)
    torch.testing.assert_close(rms_norm(rows, weight, EPS), rms_norm_ref(rows, weight, EPS))
    strided = qkv[:, :128]  # (7, 128) rows with a row stride of 12 * 128
    torch.testing.assert_close(rms_norm(strided, weight, EPS), rms_norm_ref(strided, weight, EPS))


def test_rms_norm_ref_matches_hugging_face() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=EPS).half()
    norm.weight.data = torch.randn(64).half()
    x = torch.randn(4, 64).half()
    torch.testing.assert_close(rms_norm_ref(x, norm.weight, EPS), norm(x), rtol=0, atol=0)


def test_rms_norm_errors(device: torch.device) -> None:
    x = torch.randn(3, 64, device=device)
    w = torch.ones(64, device=device)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, w[:32], EPS)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm(x, w.half(), EPS)
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(x, w, EPS, x[:2])
    with pytest.raises(ValueError, match="x must have 2 dims"):
        rms_norm(x[None], w, EPS)
    with pytest.raises(ValueError, match="stride 1"):
        rms_norm(torch.randn(64, 3, device=device).t(), w, EPS)
    with pytest.raises(ValueError, match="x dtype"):
        rms_norm(x.double(), w, EPS)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, 0.0)


@pytest.mark.gpu
def test_rms_norm_bf16_gpu(cuda_device: torch.device) -> None:
    x, r = (torch.randn(33, 4096, device=cuda_device, dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(4096, device=cuda_device, dtype=torch.bfloat16)
    out, res = rms_norm(x, w, EPS, r)
    ref, ref_res = rms_norm_ref(x, w, EPS, r)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(res, ref_res)
